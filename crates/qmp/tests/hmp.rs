//! human-monitor-command output, byte for byte as QEMU's HMP prints it.

mod common;

use common::{unix_server, Client, Mock};
use qmp::RunState;
use serde_json::json;

fn hmp(c: &mut Client, line: &str) -> String {
    let r = c.cmd(
        &json!({"execute": "human-monitor-command", "arguments": {"command-line": line}})
            .to_string(),
    );
    r["return"]
        .as_str()
        .unwrap_or_else(|| panic!("{r}"))
        .to_string()
}

#[test]
fn info_status() {
    let mock = Mock::new();
    let (server, _dir) = unix_server(mock.clone());
    let mut c = Client::connect(&server).negotiate();
    assert_eq!(hmp(&mut c, "info status"), "VM status: running\r\n");
    mock.set_state(RunState::Paused);
    assert_eq!(hmp(&mut c, "info status"), "VM status: paused\r\n");
    mock.set_state(RunState::Postmigrate);
    assert_eq!(
        hmp(&mut c, "info status"),
        "VM status: paused (postmigrate)\r\n"
    );
    mock.set_state(RunState::Inmigrate);
    assert_eq!(
        hmp(&mut c, "  info   status  "),
        "VM status: paused (inmigrate)\r\n"
    );
}

#[test]
fn info_version_name_kvm_cpus() {
    let (server, _dir) = unix_server(Mock::new());
    let mut c = Client::connect(&server).negotiate();
    assert_eq!(
        hmp(&mut c, "info version"),
        format!("10.0.0{}\r\n", qmp::package())
    );
    assert_eq!(hmp(&mut c, "info name"), "vm0\r\n");
    assert_eq!(hmp(&mut c, "info kvm"), "kvm support: enabled\r\n");
    assert_eq!(
        hmp(&mut c, "info cpus"),
        "* CPU #0: thread_id=1000\r\n  CPU #1: thread_id=1001\r\n"
    );
}

#[test]
fn help_and_unknown() {
    let (server, _dir) = unix_server(Mock::new());
    let mut c = Client::connect(&server).negotiate();
    let help = hmp(&mut c, "help");
    for cmd in [
        "cont|c",
        "help|?",
        "info",
        "quit|q",
        "stop|s",
        "system_powerdown",
        "system_reset",
    ] {
        assert!(
            help.lines().any(|l| l.starts_with(&format!("{cmd} "))),
            "{cmd} not in {help:?}"
        );
    }
    assert!(help.lines().all(|l| l.contains(" -- ")));
    assert!(help.ends_with("\r\n"));
    assert_eq!(hmp(&mut c, "help stop"), "stop|s  -- stop emulation\r\n");
    assert!(hmp(&mut c, "info").contains("info status  -- "));
    assert_eq!(hmp(&mut c, "foo"), "unknown command: 'foo'\r\n");
    assert_eq!(hmp(&mut c, "info foo"), "unknown command: 'info foo'\r\n");
    assert_eq!(hmp(&mut c, ""), "");
    assert_eq!(hmp(&mut c, "   "), "");
}

#[test]
fn control_commands() {
    let mock = Mock::new();
    let (server, _dir) = unix_server(mock.clone());
    let mut c = Client::connect(&server).negotiate();
    assert_eq!(hmp(&mut c, "stop"), "");
    assert_eq!(hmp(&mut c, "c"), "");
    assert_eq!(hmp(&mut c, "system_reset"), "");
    assert_eq!(hmp(&mut c, "system_powerdown"), "");
    assert_eq!(
        mock.calls(),
        vec!["stop", "cont", "system_reset", "system_powerdown"]
    );
    // monitor/hmp.c prints the command's table name, then a hint.
    assert_eq!(
        hmp(&mut c, "stop now"),
        "stop|s: extraneous characters at the end of line\r\n\
         Try \"help stop\" for more information\r\n"
    );
    assert_eq!(
        hmp(&mut c, "info status x"),
        "status: extraneous characters at the end of line\r\n\
         Try \"help info status\" for more information\r\n"
    );
    mock.set_state(RunState::Inmigrate);
    assert_eq!(
        hmp(&mut c, "cont"),
        "Error: Migration is not finished yet\r\n"
    );
    assert_eq!(hmp(&mut c, "quit"), "");
    assert!(common::wait_for(|| mock
        .quits
        .load(std::sync::atomic::Ordering::SeqCst)
        == 1));
}
