//! Timing of the live-snapshot path on a 4 GiB image holding 2 GiB of data
//! (64 KiB clusters): `freeze()` with and without its `fdatasync`, and the
//! throughput of `write_frozen_vmstate` for 1 GiB in 8 MiB chunks.
//!
//! `cargo run --release -p qcow2 --example freeze_bench [DIR]` (needs ~4 GiB
//! free in DIR, default: the system temp directory).

use std::fs::OpenOptions;
use std::time::{Duration, Instant};

use qcow2::{Backend, CreateOptions, FileBackend, Qcow2};

/// A file backend whose `flush` does nothing, to isolate the fdatasync cost.
struct NoSync(FileBackend);

impl Backend for NoSync {
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.0.read_at(buf, offset)
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.0.write_at(buf, offset)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
    fn len(&mut self) -> std::io::Result<u64> {
        self.0.len()
    }
    fn set_len(&mut self, len: u64) -> std::io::Result<()> {
        self.0.set_len(len)
    }
}

fn chunk(seed: u8) -> Vec<u8> {
    (0..8usize << 20)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

fn open(path: &std::path::Path, sync: bool) -> Qcow2 {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let be: Box<dyn Backend> = if sync {
        Box::new(FileBackend::new(file))
    } else {
        Box::new(NoSync(FileBackend::new(file)))
    };
    Qcow2::open_with(be, true, None).unwrap()
}

fn stats(mut v: Vec<Duration>) -> String {
    v.sort();
    format!(
        "min {:?}, median {:?}, max {:?} ({} runs)",
        v[0],
        v[v.len() / 2],
        v[v.len() - 1],
        v.len()
    )
}

fn main() {
    let dir = std::env::args()
        .nth(1)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let path = dir.join(format!("freeze-bench-{}.qcow2", std::process::id()));
    let mut img = Qcow2::create(&path, 4 << 30, CreateOptions::default()).unwrap();
    let t = Instant::now();
    let data = chunk(0);
    for k in 0..256u64 {
        // 2 GiB spread over the whole disk: 8 MiB in every 16 MiB.
        img.write_at(&data, k * (16 << 20)).unwrap();
    }
    img.flush().unwrap();
    drop(img);
    println!("setup: 2 GiB written in {:?}", t.elapsed());

    for sync in [true, false] {
        let mut img = open(&path, sync);
        let mut times = Vec::new();
        for _ in 0..10 {
            let t = Instant::now();
            let f = img.freeze("bench").unwrap();
            times.push(t.elapsed());
            img.abort_frozen(f).unwrap();
        }
        let what = if sync {
            "with fdatasync"
        } else {
            "without fdatasync"
        };
        println!("freeze() {what}: {}", stats(times));
    }

    let mut img = open(&path, true);
    let f = img.freeze("bench").unwrap();
    let vm = chunk(7);
    let t = Instant::now();
    for k in 0..128u64 {
        img.write_frozen_vmstate(&f, k * (8 << 20), &vm).unwrap();
    }
    let w = t.elapsed();
    let t2 = Instant::now();
    img.commit_frozen(f, 0, 1 << 30).unwrap();
    let c = t2.elapsed();
    let mib_s = |d: Duration| 1024.0 / d.as_secs_f64();
    println!(
        "write_frozen_vmstate 1 GiB in 8 MiB chunks: {w:?} ({:.0} MiB/s, page cache); \
         commit (fdatasync of it all): {c:?}; total {:.0} MiB/s",
        mib_s(w),
        mib_s(w + c)
    );
    let mut b = vec![0u8; 8 << 20];
    img.read_vmstate("bench", 512 << 20, &mut b).unwrap();
    assert!(b == vm);
    assert!(img.check().unwrap().is_clean());
    drop(img);
    std::fs::remove_file(&path).unwrap();
}
