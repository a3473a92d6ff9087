//! The QMP parser and dispatcher driven without a socket, for the property
//! tests and the cargo-fuzz target (`fuzz/fuzz_targets/qmp_session.rs`).
//! Built only for tests and with the `fuzzing` feature.

use std::sync::Arc;

use serde_json::Value;

use crate::error::CommandError;
use crate::machine::{CpuInfo, Machine, Request, RunState};
use crate::session::Session;
use crate::stream::MAX_MESSAGE_SIZE;

/// A machine that answers everything and does nothing.
pub struct NullMachine;

impl Machine for NullMachine {
    fn status(&self) -> RunState {
        RunState::Paused
    }
    fn name(&self) -> Option<String> {
        None
    }
    fn cpus(&self) -> Vec<CpuInfo> {
        vec![CpuInfo::x86_64(0, 1)]
    }
    fn request(&self, req: Request) -> Result<Value, CommandError> {
        match req {
            Request::Cont => Err(CommandError::generic("no")),
            Request::ListSnapshots => Ok(Value::Array(Vec::new())),
            Request::QueryJobs | Request::QueryMigrateCapabilities => Ok(Value::Array(Vec::new())),
            _ => Ok(Value::Object(serde_json::Map::new())),
        }
    }
}

/// One connection's worth of QMP state.
pub struct Connection(Session);

impl Default for Connection {
    fn default() -> Self {
        Connection(Session::new(Arc::new(NullMachine)))
    }
}

impl Connection {
    /// Feeds bytes; returns the reply lines. Panics if a reply is not one
    /// ASCII JSON line with `return` or `error.desc`, or if more than
    /// [`MAX_MESSAGE_SIZE`] bytes stay buffered.
    pub fn feed_checked(&mut self, data: &[u8]) -> Vec<String> {
        let mut out = Vec::new();
        for reply in self.0.feed(data) {
            assert!(reply.line.ends_with("\r\n"));
            assert!(reply.line.is_ascii(), "{:?}", reply.line);
            let v: Value = serde_json::from_str(&reply.line).expect("reply is JSON");
            assert!(
                v.get("return").is_some() || v["error"]["desc"].is_string(),
                "{v}"
            );
            out.push(reply.line);
        }
        assert!(self.0.buffered() <= MAX_MESSAGE_SIZE);
        out
    }
}

/// Feeds `data` to a fresh connection in chunks of the given sizes (cycled);
/// returns every reply line, checked as [`Connection::feed_checked`] does.
pub fn run(data: &[u8], chunks: &[usize]) -> Vec<String> {
    let mut c = Connection::default();
    let mut out = Vec::new();
    let mut rest = data;
    let mut sizes = chunks.iter().cycle();
    while !rest.is_empty() {
        let n = (*sizes.next().unwrap_or(&1)).clamp(1, rest.len());
        let (now, later) = rest.split_at(n);
        rest = later;
        out.extend(c.feed_checked(now));
    }
    out
}
