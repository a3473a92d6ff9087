//! Shared helpers for the integration tests: a mock machine and a raw
//! byte-level QMP client.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use qmp::{
    CommandError, CpuInfo, ListenAddr, Machine, Request, RunState, Server, SnapshotEntry,
    SnapshotJob,
};
use serde_json::Value;

/// Records every call; state is settable by the test.
pub struct Mock {
    pub calls: Mutex<Vec<String>>,
    pub state: Mutex<RunState>,
    pub name: Option<String>,
    pub quits: AtomicUsize,
}

impl Mock {
    pub fn new() -> Arc<Mock> {
        Arc::new(Mock {
            calls: Mutex::new(Vec::new()),
            state: Mutex::new(RunState::Running),
            name: Some("vm0".into()),
            quits: AtomicUsize::new(0),
        })
    }

    pub fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }

    pub fn set_state(&self, s: RunState) {
        *self.state.lock().unwrap() = s;
    }

    fn record(&self, what: &str) {
        self.calls.lock().unwrap().push(what.to_string());
    }
}

impl Mock {
    fn stop(&self) -> Result<(), CommandError> {
        self.record("stop");
        self.set_state(RunState::Paused);
        Ok(())
    }
    fn cont(&self) -> Result<(), CommandError> {
        self.record("cont");
        if self.status() == RunState::Inmigrate {
            return Err(CommandError::generic("Migration is not finished yet"));
        }
        self.set_state(RunState::Running);
        Ok(())
    }
}

impl Machine for Mock {
    fn status(&self) -> RunState {
        *self.state.lock().unwrap()
    }
    fn name(&self) -> Option<String> {
        self.name.clone()
    }
    fn cpus(&self) -> Vec<CpuInfo> {
        vec![CpuInfo::x86_64(0, 1000), CpuInfo::x86_64(1, 1001)]
    }
    fn request(&self, req: Request) -> Result<Value, CommandError> {
        match req {
            Request::Stop => self.stop(),
            Request::Cont => self.cont(),
            Request::SystemReset => {
                self.record("system_reset");
                Ok(())
            }
            Request::SystemPowerdown => {
                self.record("system_powerdown");
                Ok(())
            }
            Request::Quit => {
                self.record("quit");
                self.quits.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
            other => return Err(other.unsupported()),
        }
        .map(|()| serde_json::json!({}))
    }
}

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "qmp-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
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

pub trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

/// Raw QMP client: writes bytes, reads `\r\n`-terminated lines.
pub struct Client {
    reader: BufReader<Box<dyn Stream>>,
    writer: Box<dyn Stream>,
}

impl Client {
    pub fn unix(path: &Path) -> Client {
        let s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Client {
            writer: Box::new(s.try_clone().unwrap()),
            reader: BufReader::new(Box::new(s)),
        }
    }

    pub fn tcp(addr: &str) -> Client {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Client {
            writer: Box::new(s.try_clone().unwrap()),
            reader: BufReader::new(Box::new(s)),
        }
    }

    /// Connects to a server's `local_addr()`.
    pub fn connect(server: &Server) -> Client {
        match ListenAddr::parse(&server.local_addr()).unwrap() {
            ListenAddr::Unix(p) => Client::unix(&p),
            ListenAddr::Tcp { host, port } => Client::tcp(&format!("{host}:{port}")),
        }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).unwrap();
    }

    /// Reads one raw line, checking the `\r\n` terminator.
    pub fn line(&mut self) -> String {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).unwrap();
        assert!(n > 0, "unexpected EOF");
        assert!(line.ends_with("\r\n"), "line not CRLF-terminated: {line:?}");
        line
    }

    pub fn json(&mut self) -> Value {
        let line = self.line();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad JSON {line:?}: {e}"))
    }

    /// Sends one message, returns the next reply.
    pub fn cmd(&mut self, msg: &str) -> Value {
        self.send(msg.as_bytes());
        self.send(b"\n");
        self.json()
    }

    /// Reads the greeting and negotiates capabilities.
    pub fn negotiate(mut self) -> Client {
        let g = self.json();
        assert!(g.get("QMP").is_some(), "{g}");
        assert_eq!(
            self.cmd(r#"{"execute":"qmp_capabilities"}"#),
            serde_json::json!({"return": {}})
        );
        self
    }

    /// True if the peer closed the connection (EOF or reset).
    pub fn at_eof(&mut self) -> bool {
        let mut buf = [0u8; 1];
        matches!(self.reader.read(&mut buf), Ok(0) | Err(_))
    }
}

/// A server on a fresh unix socket.
pub fn unix_server(machine: Arc<Mock>) -> (Server, TempDir) {
    let dir = TempDir::new();
    let addr = ListenAddr::Unix(dir.path("qmp.sock"));
    (Server::start(&addr, machine).unwrap(), dir)
}

/// A server on 127.0.0.1 with an ephemeral port.
pub fn tcp_server(machine: Arc<Mock>) -> Server {
    Server::start(&ListenAddr::parse("tcp:127.0.0.1:0").unwrap(), machine).unwrap()
}

/// Polls `f` until true or 5 s pass.
pub fn wait_for(mut f: impl FnMut() -> bool) -> bool {
    for _ in 0..500 {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

/// A call to one of the snapshot/job methods of [`JobMock`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    /// `snapshot_save`, `snapshot_load` or `snapshot_delete`.
    Job(&'static str, SnapshotJob),
    /// `job_*`, `savevm`, `loadvm`, `delvm` with their argument.
    Arg(&'static str, String),
    /// `query_jobs` or `list_snapshots`.
    Query(&'static str),
}

/// A machine implementing the snapshot and job methods: records calls
/// with their exact arguments, fails with `fail` when set.
pub struct JobMock {
    pub base: Arc<Mock>,
    pub calls: Mutex<Vec<Call>>,
    pub fail: Mutex<Option<String>>,
    pub snapshots: Mutex<Vec<SnapshotEntry>>,
}

impl JobMock {
    pub fn new() -> Arc<JobMock> {
        Arc::new(JobMock {
            base: Mock::new(),
            calls: Mutex::new(Vec::new()),
            fail: Mutex::new(None),
            snapshots: Mutex::new(Vec::new()),
        })
    }

    pub fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }

    pub fn fail_with(&self, desc: Option<&str>) {
        *self.fail.lock().unwrap() = desc.map(str::to_string);
    }

    fn result(&self, call: Call) -> Result<(), CommandError> {
        self.calls.lock().unwrap().push(call);
        match self.fail.lock().unwrap().clone() {
            Some(desc) => Err(CommandError::generic(desc)),
            None => Ok(()),
        }
    }
}

impl Machine for JobMock {
    fn status(&self) -> RunState {
        self.base.status()
    }
    fn name(&self) -> Option<String> {
        self.base.name()
    }
    fn cpus(&self) -> Vec<CpuInfo> {
        self.base.cpus()
    }
    fn request(&self, req: Request) -> Result<Value, CommandError> {
        let done = |r: Result<(), CommandError>| r.map(|()| serde_json::json!({}));
        match req {
            Request::SnapshotSave(job) => done(self.result(Call::Job("snapshot_save", job))),
            Request::SnapshotLoad(job) => done(self.result(Call::Job("snapshot_load", job))),
            Request::SnapshotDelete(job) => done(self.result(Call::Job("snapshot_delete", job))),
            Request::QueryJobs => {
                self.result(Call::Query("query_jobs"))?;
                Ok(
                    serde_json::json!([{"id": "snapsave0", "type": "snapshot-save",
                    "status": "concluded", "current-progress": 1, "total-progress": 1}]),
                )
            }
            Request::JobDismiss(id) => done(self.result(Call::Arg("job_dismiss", id))),
            Request::JobCancel(id) => done(self.result(Call::Arg("job_cancel", id))),
            Request::JobFinalize(id) => done(self.result(Call::Arg("job_finalize", id))),
            Request::SaveVm(tag) => done(self.result(Call::Arg("savevm", tag))),
            Request::LoadVm(tag) => done(self.result(Call::Arg("loadvm", tag))),
            Request::DelVm(tag) => done(self.result(Call::Arg("delvm", tag))),
            Request::ListSnapshots => {
                self.result(Call::Query("list_snapshots"))?;
                Ok(serde_json::json!(self.snapshots.lock().unwrap().clone()))
            }
            other => self.base.request(other),
        }
    }
}

/// A server for any machine on a fresh unix socket.
pub fn unix_server_for(machine: Arc<dyn Machine>) -> (Server, TempDir) {
    let dir = TempDir::new();
    let addr = ListenAddr::Unix(dir.path("qmp.sock"));
    (Server::start(&addr, machine).unwrap(), dir)
}

/// Runs one HMP line, returns its output string.
pub fn hmp(c: &mut Client, line: &str) -> String {
    let r = c.cmd(
        &serde_json::json!({"execute": "human-monitor-command",
            "arguments": {"command-line": line}})
        .to_string(),
    );
    r["return"]
        .as_str()
        .unwrap_or_else(|| panic!("{r}"))
        .to_string()
}
