//! A minimal synchronous QMP client over a unix socket, for `snapvmm demo`.
//! It drives a child `snapvmm run` exactly as any QMP client would.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

pub struct QmpClient {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// Events received so far, in order.
    pub events: Vec<Value>,
}

impl QmpClient {
    /// Connects (retrying until `limit` while the server starts) and negotiates.
    pub fn connect(path: &Path, limit: Duration) -> Result<QmpClient> {
        let t0 = Instant::now();
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if t0.elapsed() < limit => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(e) => {
                    return Err(e).with_context(|| format!("cannot connect to {}", path.display()))
                }
            }
        };
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let writer = stream.try_clone()?;
        let mut c = QmpClient {
            reader: BufReader::new(stream),
            writer,
            events: Vec::new(),
        };
        let greeting = c.read()?;
        if greeting.get("QMP").is_none() {
            bail!("unexpected QMP greeting: {greeting}");
        }
        c.execute("qmp_capabilities", json!({}))?;
        Ok(c)
    }

    fn read(&mut self) -> Result<Value> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            bail!("QMP connection closed");
        }
        serde_json::from_str(&line).with_context(|| format!("bad QMP message: {line}"))
    }

    /// Runs a command and returns its `return` value, or its error as an error.
    pub fn execute(&mut self, name: &str, args: Value) -> Result<Value> {
        let msg = json!({"execute": name, "arguments": args});
        self.writer.write_all(format!("{msg}\n").as_bytes())?;
        loop {
            let v = self.read()?;
            if v.get("event").is_some() {
                self.events.push(v);
            } else if let Some(r) = v.get("return") {
                return Ok(r.clone());
            } else if let Some(e) = v.get("error") {
                bail!("{name}: {}", e["desc"].as_str().unwrap_or("error"));
            }
        }
    }

    /// Polls `query-migrate` until the job leaves setup/active.
    pub fn wait_migration(&mut self, limit: Duration) -> Result<Value> {
        let t0 = Instant::now();
        loop {
            let q = self.execute("query-migrate", json!({}))?;
            match q["status"].as_str() {
                Some("setup" | "active" | "cancelling") if t0.elapsed() < limit => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Some("setup" | "active" | "cancelling") => {
                    bail!("snapshot still running after {limit:?}")
                }
                _ => return Ok(q),
            }
        }
    }
}
