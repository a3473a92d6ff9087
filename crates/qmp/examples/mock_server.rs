//! A QMP server over a fake machine, for trying real QMP clients:
//! `cargo run -p qmp --example mock_server -- unix:/tmp/qmp.sock`
//! then e.g. `qmp-shell /tmp/qmp.sock`. Emits a `STOP`/`RESUME` event
//! when the fake machine is stopped/continued.

use std::sync::{Arc, Mutex, OnceLock};

use qmp::{CommandError, CpuInfo, EventBus, ListenAddr, Machine, RunState, Server};

#[derive(Default)]
struct Fake {
    state: Mutex<Option<RunState>>,
    bus: OnceLock<EventBus>,
}

impl Fake {
    fn set(&self, s: RunState, event: &str) {
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = Some(s);
        if let Some(bus) = self.bus.get() {
            bus.emit(event, None);
        }
    }
}

impl Machine for Fake {
    fn status(&self) -> RunState {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .unwrap_or(RunState::Running)
    }
    fn stop(&self) -> Result<(), CommandError> {
        self.set(RunState::Paused, "STOP");
        Ok(())
    }
    fn cont(&self) -> Result<(), CommandError> {
        self.set(RunState::Running, "RESUME");
        Ok(())
    }
    fn system_reset(&self) -> Result<(), CommandError> {
        Ok(())
    }
    fn system_powerdown(&self) -> Result<(), CommandError> {
        Ok(())
    }
    fn quit(&self) {
        if let Some(bus) = self.bus.get() {
            bus.emit(
                "SHUTDOWN",
                Some(serde_json::json!({"guest": false, "reason": "host-qmp-quit"})),
            );
            bus.flush(std::time::Duration::from_secs(1));
        }
        std::process::exit(0);
    }
    fn name(&self) -> Option<String> {
        Some("mock".into())
    }
    fn cpus(&self) -> Vec<CpuInfo> {
        vec![CpuInfo::x86_64(0, i64::from(std::process::id()))]
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let arg = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "unix:/tmp/qmp.sock".into());
    let machine = Arc::new(Fake::default());
    let server = Server::start(&ListenAddr::parse(&arg)?, machine.clone())?;
    let _ = machine.bus.set(server.events());
    println!("{}", server.local_addr());
    loop {
        std::thread::park();
    }
}
