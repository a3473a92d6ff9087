//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};

use qcow2::Backend;

pub fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

#[macro_export]
macro_rules! require_qemu_img {
    () => {
        if !common::have("qemu-img") {
            eprintln!("skipped: qemu-img not found");
            return;
        }
    };
}

/// Run a command, panic on spawn failure, return (exit code, stdout+stderr).
pub fn run(cmd: &str, args: &[&str]) -> (i32, String) {
    let o = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    let mut s = String::from_utf8_lossy(&o.stdout).into_owned();
    s.push_str(&String::from_utf8_lossy(&o.stderr));
    (o.status.code().unwrap_or(-1), s)
}

pub fn run_ok(cmd: &str, args: &[&str]) -> String {
    let (c, out) = run(cmd, args);
    assert_eq!(c, 0, "{cmd} {args:?} failed:\n{out}");
    out
}

pub fn check(path: &Path) -> (i32, String) {
    run(
        "qemu-img",
        &["check", "-f", "qcow2", path.to_str().unwrap()],
    )
}

/// `qemu-img check` must report no errors and no leaks.
pub fn assert_clean(path: &Path) {
    let (c, out) = check(path);
    assert_eq!(c, 0, "qemu-img check failed:\n{out}");
    assert!(
        !out.contains("leaked") && !out.contains("ERROR"),
        "qemu-img check not clean:\n{out}"
    );
}

/// Content of the image (or of one of its snapshots) as raw bytes, via qemu-img.
pub fn to_raw(path: &Path, snapshot: Option<&str>) -> Vec<u8> {
    let out = path.with_extension(format!("raw-{}", std::process::id()));
    let p = path.to_str().unwrap();
    let o = out.to_str().unwrap();
    let l;
    let mut args = vec!["convert", "-f", "qcow2", "-O", "raw"];
    if let Some(s) = snapshot {
        l = format!("snapshot.name={s}");
        args.push("-l");
        args.push(&l);
    }
    args.push(p);
    args.push(o);
    run_ok("qemu-img", &args);
    let d = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    d
}

pub fn info(path: &Path) -> serde_json::Value {
    let out = run_ok(
        "qemu-img",
        &["info", "-U", "--output=json", path.to_str().unwrap()],
    );
    serde_json::from_str(&out).unwrap()
}

/// Deterministic pseudo-random bytes.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Simple xorshift RNG.
pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// A write issued since the last flush: (offset, bytes overwritten, bytes written).
pub type Unflushed = (usize, Vec<u8>, Vec<u8>);

/// In-memory backend shared with the test, which "crashes" (fails every
/// write) once its write budget is used up.
///
/// It also keeps a journal of the writes issued since the last flush, so
/// that tests can build images in which an arbitrary subset of them never
/// reached the disk (a write cache may persist unflushed writes in any order).
#[derive(Clone)]
pub struct CrashBackend {
    pub data: Arc<Mutex<Vec<u8>>>,
    pub budget: Arc<Mutex<Option<u64>>>,
    pub writes: Arc<Mutex<u64>>,
    /// Unflushed writes.
    pub journal: Arc<Mutex<Vec<Unflushed>>>,
    pub flushes: Arc<Mutex<u64>>,
}

impl CrashBackend {
    pub fn new(data: Vec<u8>, budget: Option<u64>) -> Self {
        Self {
            data: Arc::new(Mutex::new(data)),
            budget: Arc::new(Mutex::new(budget)),
            writes: Arc::new(Mutex::new(0)),
            journal: Arc::new(Mutex::new(Vec::new())),
            flushes: Arc::new(Mutex::new(0)),
        }
    }
    pub fn bytes(&self) -> Vec<u8> {
        self.data.lock().unwrap().clone()
    }
    /// Number of unflushed writes.
    pub fn unflushed(&self) -> usize {
        self.journal.lock().unwrap().len()
    }
    /// The image as it would be if only the unflushed writes `k` with
    /// `keep(k)` had reached the disk (in issue order).
    pub fn bytes_lossy(&self, keep: &dyn Fn(usize) -> bool) -> Vec<u8> {
        let mut d = self.bytes();
        let j = self.journal.lock().unwrap();
        for (off, old, _) in j.iter().rev() {
            d[*off..*off + old.len()].copy_from_slice(old);
        }
        for (k, (off, _, new)) in j.iter().enumerate() {
            if keep(k) {
                d[*off..*off + new.len()].copy_from_slice(new);
            }
        }
        d
    }
}

impl Backend for CrashBackend {
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let d = self.data.lock().unwrap();
        buf.fill(0);
        let s = offset as usize;
        if s < d.len() {
            let e = (s + buf.len()).min(d.len());
            buf[..e - s].copy_from_slice(&d[s..e]);
        }
        Ok(())
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        let mut b = self.budget.lock().unwrap();
        if let Some(n) = b.as_mut() {
            if *n == 0 {
                return Err(std::io::Error::other("simulated crash"));
            }
            *n -= 1;
        }
        *self.writes.lock().unwrap() += 1;
        let mut d = self.data.lock().unwrap();
        let s = offset as usize;
        if d.len() < s + buf.len() {
            d.resize(s + buf.len(), 0);
        }
        let old = d[s..s + buf.len()].to_vec();
        d[s..s + buf.len()].copy_from_slice(buf);
        self.journal.lock().unwrap().push((s, old, buf.to_vec()));
        Ok(())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        // Once the budget is used up the flush fails too, so that a crash
        // image holds every write issued since the previous flush.
        if *self.budget.lock().unwrap() == Some(0) {
            return Err(std::io::Error::other("simulated crash"));
        }
        self.journal.lock().unwrap().clear();
        *self.flushes.lock().unwrap() += 1;
        Ok(())
    }
    fn len(&mut self) -> std::io::Result<u64> {
        Ok(self.data.lock().unwrap().len() as u64)
    }
    fn set_len(&mut self, len: u64) -> std::io::Result<()> {
        let mut b = self.budget.lock().unwrap();
        if let Some(n) = b.as_mut() {
            if *n == 0 {
                return Err(std::io::Error::other("simulated crash"));
            }
            *n -= 1;
        }
        self.data.lock().unwrap().resize(len as usize, 0);
        Ok(())
    }
}

// The base image of the crash and repair tests.
use qcow2::{CreateOptions, Qcow2};

pub const SIZE: u64 = 4 << 20;

pub struct Base {
    pub bytes: Vec<u8>,
    pub model: Vec<u8>,
    pub snap_model: Vec<u8>,
}

/// Image with data, one snapshot "old" (with VM state) and more data after it.
pub fn base(cluster_bits: u32) -> Base {
    let be = CrashBackend::new(Vec::new(), None);
    let mut img = Qcow2::create_with(
        Box::new(be.clone()),
        SIZE,
        CreateOptions {
            cluster_bits,
            ..Default::default()
        },
        None,
    )
    .unwrap();
    let mut model = vec![0u8; SIZE as usize];
    let d = pattern(1 << 20, 1);
    img.write_at(&d, 100_000).unwrap();
    model[100_000..100_000 + d.len()].copy_from_slice(&d);
    img.write_vmstate(0, &pattern(200_000, 2)).unwrap();
    img.create_snapshot("old", 1, 200_000).unwrap();
    let snap_model = model.clone();
    let d = pattern(300_000, 3);
    img.write_at(&d, 3 << 20).unwrap();
    model[3 << 20..(3 << 20) + d.len()].copy_from_slice(&d);
    img.flush().unwrap();
    drop(img);
    Base {
        bytes: be.bytes(),
        model,
        snap_model,
    }
}

pub fn read_all(img: &mut Qcow2) -> Vec<u8> {
    let mut b = vec![0u8; img.size() as usize];
    img.read_at(&mut b, 0).unwrap();
    b
}

pub fn read_snap(img: &mut Qcow2, name: &str) -> Vec<u8> {
    let mut b = vec![0u8; img.size() as usize];
    img.read_snapshot_at(name, &mut b, 0).unwrap();
    b
}
