//! Helpers for end-to-end tests that drive the real `snapvmm` binary.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The snapvmm binary under test (`SNAPVMM_BIN` overrides it: the Linux tests
/// run this test binary inside a VM, where the build's path does not exist).
pub fn bin() -> PathBuf {
    std::env::var_os("SNAPVMM_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_snapvmm")))
}

pub fn snapvmm(args: &[&str]) -> Command {
    let mut c = Command::new(bin());
    c.args(args).stdin(Stdio::null());
    c
}

/// Runs to completion with a time limit; kills the process if it overruns.
pub fn run_with_timeout(mut cmd: Command, limit: Duration) -> Output {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn snapvmm");
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => out.expect("wait for snapvmm"),
        Err(_) => {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            panic!("snapvmm did not finish within {limit:?}");
        }
    }
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A running snapvmm whose stdout lines arrive on a channel.
pub struct Running {
    pub child: Child,
    pub lines: mpsc::Receiver<String>,
}

impl Running {
    pub fn spawn(mut cmd: Command) -> Running {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn snapvmm");
        let out = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines() {
                let Ok(l) = l else { break };
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Running { child, lines }
    }

    /// Waits for a line containing `needle`; returns it.
    pub fn wait_line(&self, needle: &str, limit: Duration) -> String {
        let end = Instant::now() + limit;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.contains(needle) => return l,
                Ok(_) => {}
                Err(_) => panic!("no line containing {needle:?} within {limit:?}"),
            }
        }
    }

    /// Waits for exit with a time limit.
    pub fn wait(&mut self, limit: Duration) -> std::process::ExitStatus {
        let end = Instant::now() + limit;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            if Instant::now() > end {
                let _ = self.child.kill();
                panic!("snapvmm did not exit within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn signal(&self, sig: &str) {
        let st = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(st.success());
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A fresh temporary directory under the target dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        let p = base.join(format!("{tag}-{}-{}", std::process::id(), rand_suffix()));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(Instant::now().elapsed().as_nanos() as u64);
    h.finish()
}

/// A minimal QMP client for tests: raw JSON lines over a unix socket.
pub struct Qmp {
    reader: BufReader<std::os::unix::net::UnixStream>,
    writer: std::os::unix::net::UnixStream,
    pub events: Vec<serde_json::Value>,
}

impl Qmp {
    /// Connects (retrying until the socket exists) and negotiates capabilities.
    pub fn connect(path: &std::path::Path) -> Qmp {
        let end = Instant::now() + Duration::from_secs(30);
        let s = loop {
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() > end => {
                    panic!("cannot connect to {}: {e}", path.display())
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        let mut q = Qmp {
            reader: BufReader::new(s.try_clone().unwrap()),
            writer: s,
            events: Vec::new(),
        };
        let greeting = q.read();
        assert!(greeting.get("QMP").is_some(), "{greeting}");
        let r = q.cmd("qmp_capabilities", serde_json::json!({}));
        assert_eq!(r, serde_json::json!({"return": {}}));
        q
    }

    fn read(&mut self) -> serde_json::Value {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).expect("read from QMP");
        assert!(n > 0, "QMP connection closed");
        serde_json::from_str(&line).expect("QMP sent JSON")
    }

    /// Sends a command; returns the whole response object (events are kept aside).
    pub fn cmd(&mut self, name: &str, args: serde_json::Value) -> serde_json::Value {
        self.send(name, args);
        self.response()
    }

    /// Sends a command without waiting for its response (the VM may end
    /// before it answers).
    pub fn send(&mut self, name: &str, args: serde_json::Value) {
        use std::io::Write;
        let msg = serde_json::json!({"execute": name, "arguments": args});
        self.writer
            .write_all(format!("{msg}\n").as_bytes())
            .unwrap();
    }

    /// Sends a command with a descriptor attached (SCM_RIGHTS), as libvirt
    /// passes one to `getfd`; returns the whole response.
    pub fn cmd_with_fd(
        &mut self,
        name: &str,
        args: serde_json::Value,
        fd: std::os::fd::RawFd,
    ) -> serde_json::Value {
        use std::os::fd::AsRawFd;
        let msg = format!(
            "{}\n",
            serde_json::json!({"execute": name, "arguments": args})
        );
        let mut iov = libc::iovec {
            iov_base: msg.as_ptr() as *mut libc::c_void,
            iov_len: msg.len(),
        };
        let mut cbuf = [0u64; 8];
        // SAFETY: msghdr/cmsghdr set up with the libc macros over `cbuf`,
        // which is large and aligned enough for one descriptor; every pointer
        // outlives the sendmsg call.
        let sent = unsafe {
            let mut m: libc::msghdr = std::mem::zeroed();
            m.msg_iov = &mut iov;
            m.msg_iovlen = 1;
            m.msg_control = cbuf.as_mut_ptr().cast();
            m.msg_controllen = libc::CMSG_SPACE(4) as usize;
            let c = libc::CMSG_FIRSTHDR(&m);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(4) as usize;
            libc::CMSG_DATA(c).cast::<i32>().write_unaligned(fd);
            libc::sendmsg(self.writer.as_raw_fd(), &m, 0)
        };
        assert_eq!(sent, msg.len() as isize, "sendmsg");
        self.response()
    }

    /// The next response (events read meanwhile are kept aside).
    fn response(&mut self) -> serde_json::Value {
        loop {
            let v = self.read();
            if v.get("event").is_some() {
                self.events.push(v);
            } else {
                return v;
            }
        }
    }

    /// Sends a command that must succeed; returns its `return` value.
    pub fn ok(&mut self, name: &str, args: serde_json::Value) -> serde_json::Value {
        let r = self.cmd(name, args.clone());
        match r.get("return") {
            Some(v) => v.clone(),
            None => panic!("{name} {args} failed: {r}"),
        }
    }

    /// Polls query-migrate until the status is final; returns the last answer.
    pub fn wait_migration(&mut self, limit: Duration) -> serde_json::Value {
        let end = Instant::now() + limit;
        loop {
            let m = self.ok("query-migrate", serde_json::json!({}));
            let s = m["status"].as_str().unwrap_or("").to_string();
            if ["completed", "failed", "cancelled"].contains(&s.as_str()) {
                return m;
            }
            assert!(Instant::now() < end, "migration still {s} after {limit:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn event_names(&self) -> Vec<String> {
        self.events
            .iter()
            .map(|e| e["event"].as_str().unwrap_or("").to_string())
            .collect()
    }
}

// Snapshot helpers shared by the snapshot tests.
use serde_json::json;

pub const T: Duration = Duration::from_secs(60);

pub fn start_vm(dir: &TempDir, name: &str, cpus: &str, extra: &[&str]) -> (Running, Qmp) {
    let sock = dir.path(&format!("{name}.sock"));
    let qmp = format!("unix:{}", sock.display());
    let mut args = vec!["run", "--qmp", &qmp, "--cpus", cpus];
    args.extend_from_slice(extra);
    let r = Running::spawn(snapvmm(&args));
    let q = Qmp::connect(&sock);
    (r, q)
}

/// Polls query-status while the VM is still being set up (prelaunch/inmigrate).
pub fn wait_settled(q: &mut Qmp) -> String {
    let end = std::time::Instant::now() + T;
    loop {
        let s = q.ok("query-status", json!({}))["status"]
            .as_str()
            .unwrap()
            .to_string();
        if (s != "inmigrate" && s != "prelaunch") || std::time::Instant::now() > end {
            return s;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub fn live_snapshot(q: &mut Qmp, path: &std::path::Path) -> serde_json::Value {
    live_snapshot_to(q, &format!("file:{}", path.display()))
}

/// A live snapshot (background-snapshot) to any migration URI; the final
/// query-migrate answer.
pub fn live_snapshot_to(q: &mut Qmp, uri: &str) -> serde_json::Value {
    q.ok(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "background-snapshot", "state": true}, {"capability": "events", "state": true}]}),
    );
    q.ok("migrate", json!({ "uri": uri }));
    q.wait_migration(T)
}

/// Checks a restored guest goes on from its snapshot: reports, no CORRUPT,
/// no fresh boot, several verified passes.
pub fn goes_on_without_corruption(b: &Running, cpus: usize) {
    let mut reports = 0;
    while reports < 3 * cpus {
        let l = b.wait_line("refguest:", T);
        assert!(!l.contains("CORRUPT") && !l.contains("FAULT"), "{l}");
        assert!(
            !l.contains("ready"),
            "a restored guest must not boot again: {l}"
        );
        reports += usize::from(l.contains(" t="));
    }
    let l = b.wait_line("passes=", T);
    let passes: u64 = l.rsplit("passes=").next().unwrap().parse().unwrap();
    assert!(passes >= 2, "several passes verified after restore: {l}");
}

/// The migrated guest goes on: no CORRUPT or FAULT line, no new boot, and
/// (its first touches of RAM take a while on a PVM host) verified passes.
pub fn runs_on(b: &Running) {
    let end = Instant::now() + T;
    loop {
        let l = b.wait_line("refguest:", T);
        assert!(!l.contains("CORRUPT") && !l.contains("FAULT"), "{l}");
        assert!(!l.contains("ready"), "the guest must not boot again: {l}");
        let passes: u64 = l
            .rsplit("passes=")
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        if passes >= 2 {
            return;
        }
        assert!(Instant::now() < end, "no verified pass on the target: {l}");
    }
}
