//! QMP wire-protocol rules, spoken as raw bytes over real sockets.

mod common;

use common::{tcp_server, unix_server, Client, Mock};
use qmp::{RunState, MAX_MESSAGE_SIZE};
use serde_json::{json, Value};

fn err(class: &str, desc: &str) -> Value {
    json!({"error": {"class": class, "desc": desc}})
}

fn generic(desc: &str) -> Value {
    err("GenericError", desc)
}

#[test]
fn greeting_is_exact() {
    let (server, _dir) = unix_server(Mock::new());
    let mut c = Client::connect(&server);
    assert_eq!(
        c.line(),
        format!(
            "{{\"QMP\": {{\"version\": {{\"qemu\": {{\"major\": 10, \"minor\": 0, \"micro\": 0}}, \
             \"package\": \"snapvmm-{}\"}}, \"capabilities\": []}}}}\r\n",
            env!("CARGO_PKG_VERSION")
        )
    );
}

#[test]
fn greeting_over_tcp_with_port_zero() {
    let server = tcp_server(Mock::new());
    let addr = server.local_addr();
    assert!(
        addr.starts_with("tcp:127.0.0.1:") && !addr.ends_with(":0"),
        "{addr}"
    );
    let mut c = Client::connect(&server);
    assert!(c.json()["QMP"]["version"]["qemu"].is_object());
    let mut c = c.negotiate_after_greeting();
    assert_eq!(
        c.cmd(r#"{"execute":"query-kvm"}"#),
        json!({"return": {"enabled": true, "present": true}})
    );
}

trait AfterGreeting {
    fn negotiate_after_greeting(self) -> Self;
}

impl AfterGreeting for Client {
    fn negotiate_after_greeting(mut self) -> Self {
        assert_eq!(
            self.cmd(r#"{"execute":"qmp_capabilities"}"#),
            json!({"return": {}})
        );
        self
    }
}

#[test]
fn negotiation_mode() {
    let mock = Mock::new();
    let (server, _dir) = unix_server(mock.clone());
    let mut c = Client::connect(&server);
    c.json();
    let expecting = err(
        "CommandNotFound",
        "Expecting capabilities negotiation with 'qmp_capabilities'",
    );
    assert_eq!(c.cmd(r#"{"execute":"stop"}"#), expecting);
    assert_eq!(c.cmd(r#"{"execute":"nonexistent"}"#), expecting);
    assert!(mock.calls().is_empty(), "stop ran before negotiation");
    // No events before negotiation: emit, then check the next line is the
    // qmp_capabilities reply.
    server.events().emit("STOP", None);
    assert_eq!(
        c.cmd(r#"{"execute":"qmp_capabilities","id":1}"#),
        json!({"return": {}, "id": 1})
    );
    assert_eq!(
        c.cmd(r#"{"execute":"qmp_capabilities"}"#),
        err(
            "CommandNotFound",
            "Capabilities negotiation is already complete, command ignored"
        )
    );
    assert_eq!(c.cmd(r#"{"execute":"stop"}"#), json!({"return": {}}));
    assert_eq!(mock.calls(), vec!["stop"]);
}

#[test]
fn oob_refused() {
    let (server, _dir) = unix_server(Mock::new());
    let mut c = Client::connect(&server);
    c.json();
    assert_eq!(
        c.cmd(r#"{"execute":"qmp_capabilities","arguments":{"enable":["oob"]}}"#),
        generic("Capability oob not available")
    );
    assert_eq!(
        c.cmd(r#"{"execute":"qmp_capabilities","arguments":{"enable":["bogus"]}}"#),
        generic("Parameter 'enable[0]' does not accept value 'bogus'")
    );
    // Still in negotiation mode.
    let mut c = c.negotiate_after_greeting();
    assert_eq!(
        c.cmd(r#"{"exec-oob":"query-status","id":"x"}"#),
        json!({"error": {"class": "GenericError", "desc": "QMP input member 'exec-oob' is unexpected"}, "id": "x"})
    );
}

#[test]
fn ids_are_echoed() {
    let (server, _dir) = unix_server(Mock::new());
    let mut c = Client::connect(&server).negotiate();
    for id in [
        json!("abc"),
        json!(42),
        json!({"a": [1, null]}),
        json!(null),
        json!(1.5),
    ] {
        let ok = c.cmd(&json!({"execute": "query-name", "id": id}).to_string());
        assert_eq!(ok, json!({"return": {"name": "vm0"}, "id": id}));
        let bad = c.cmd(&json!({"execute": "nope", "id": id}).to_string());
        assert_eq!(bad["id"], id);
        let no_exec = c.cmd(&json!({"id": id}).to_string());
        assert_eq!(no_exec["id"], id);
    }
    // Key order and spacing like QEMU.
    c.send(b"{\"execute\":\"stop\",\"id\":\"s\"}");
    assert_eq!(c.line(), "{\"return\": {}, \"id\": \"s\"}\r\n");
}

#[test]
fn a_key_given_twice_is_refused_and_nothing_runs() {
    let mock = Mock::new();
    let (server, _dir) = unix_server(mock.clone());
    let mut c = Client::connect(&server).negotiate();
    for msg in [
        r#"{"execute":"query-status","execute":"quit"}"#,
        r#"{"execute":"human-monitor-command","arguments":{"command-line":"stop","command-line":"quit"}}"#,
    ] {
        let r = c.cmd(msg);
        assert_eq!(r["error"]["class"], "GenericError", "{r}");
        let desc = r["error"]["desc"].as_str().unwrap();
        assert!(desc.contains("duplicate key"), "{r}");
    }
    assert!(mock.calls().is_empty(), "ran {:?}", mock.calls());
    assert_eq!(c.cmd(r#"{"execute":"query-status","id":1}"#)["id"], 1);
}

#[test]
fn syntax_errors_recover() {
    let (server, _dir) = unix_server(Mock::new());
    let mut c = Client::connect(&server).negotiate();
    let r = c.cmd(r#"{"execute": "query-status", "id": 1,}"#);
    assert!(
        r["error"]["desc"]
            .as_str()
            .unwrap()
            .starts_with("JSON parse error, "),
        "{r}"
    );
    assert_eq!(r["error"]["class"], "GenericError");
    assert!(r.get("id").is_none());
    assert_eq!(c.cmd(r#"{"execute":"query-status","id":2}"#)["id"], 2);
    // Unterminated string: the newline resynchronises.
    let r = c.cmd("{\"execute\": \"query-sta");
    assert!(
        r["error"]["desc"]
            .as_str()
            .unwrap()
            .starts_with("JSON parse error"),
        "{r}"
    );
    assert_eq!(c.cmd(r#"{"execute":"query-status","id":3}"#)["id"], 3);
    // 0xFF resets a half-sent message.
    c.send(b"{\"execute\": [\xff");
    assert!(c.json()["error"].is_object());
    assert_eq!(c.cmd(r#"{"execute":"query-status","id":4}"#)["id"], 4);
}

#[test]
fn structure_errors() {
    let (server, _dir) = unix_server(Mock::new());
    let mut c = Client::connect(&server).negotiate();
    assert_eq!(
        c.cmd(r#"{"arguments":{}}"#),
        generic("QMP input lacks member 'execute'")
    );
    assert_eq!(c.cmd("[1, 2]"), generic("QMP input must be a JSON object"));
    assert_eq!(
        c.cmd("\"hello\""),
        generic("QMP input must be a JSON object")
    );
    assert_eq!(c.cmd("42"), generic("QMP input must be a JSON object"));
    assert_eq!(
        c.cmd(r#"{"execute":"stop","foo":1}"#),
        generic("QMP input member 'foo' is unexpected")
    );
    assert_eq!(
        c.cmd(r#"{"execute":7}"#),
        generic("QMP input member 'execute' must be a string")
    );
    assert_eq!(
        c.cmd(r#"{"execute":"stop","arguments":[]}"#),
        generic("QMP input member 'arguments' must be an object")
    );
}

#[test]
fn unknown_command() {
    let (server, _dir) = unix_server(Mock::new());
    let mut c = Client::connect(&server).negotiate();
    assert_eq!(
        c.cmd(r#"{"execute":"blockdev-add"}"#),
        err(
            "CommandNotFound",
            "The command blockdev-add has not been found"
        )
    );
}

#[test]
fn bad_arguments_do_not_execute() {
    let mock = Mock::new();
    let (server, _dir) = unix_server(mock.clone());
    let mut c = Client::connect(&server).negotiate();
    assert_eq!(
        c.cmd(r#"{"execute":"stop","arguments":{"x":1}}"#),
        generic("Parameter 'x' is unexpected")
    );
    assert_eq!(
        c.cmd(r#"{"execute":"human-monitor-command","arguments":{"command-line":5}}"#),
        generic("Invalid parameter type for 'command-line', expected: string")
    );
    assert_eq!(
        c.cmd(
            r#"{"execute":"human-monitor-command","arguments":{"command-line":"stop","x":true}}"#
        ),
        generic("Parameter 'x' is unexpected")
    );
    assert_eq!(
        c.cmd(r#"{"execute":"human-monitor-command","arguments":{"command-line":"stop","cpu-index":"0"}}"#),
        generic("Invalid parameter type for 'cpu-index', expected: integer")
    );
    assert_eq!(
        c.cmd(r#"{"execute":"human-monitor-command","arguments":{}}"#),
        generic("Parameter 'command-line' is missing")
    );
    assert_eq!(
        c.cmd(r#"{"execute":"human-monitor-command","arguments":{"command-line":"stop","cpu-index":9}}"#),
        generic("Parameter 'cpu-index' expects a CPU number")
    );
    assert!(mock.calls().is_empty(), "{:?}", mock.calls());
}

#[test]
fn oversized_message_refused() {
    let (server, _dir) = unix_server(Mock::new());
    let mut c = Client::connect(&server).negotiate();
    let mut big = br#"{"execute":"query-status","arguments":{"pad":""#.to_vec();
    big.extend(vec![b'a'; MAX_MESSAGE_SIZE * 3]);
    big.extend(br#""}}"#);
    c.send(&big);
    assert_eq!(c.json(), generic("JSON token size limit exceeded"));
    assert_eq!(
        c.cmd(r#"{"execute":"query-status","id":"after"}"#)["id"],
        "after"
    );
}

#[test]
fn deep_nesting_refused() {
    let (server, _dir) = unix_server(Mock::new());
    let mut c = Client::connect(&server).negotiate();
    let mut deep = br#"{"execute":"stop","arguments":{"a":"#.to_vec();
    deep.extend(vec![b'['; 10_000]);
    deep.extend(vec![b']'; 10_000]);
    deep.extend(b"}}");
    c.send(&deep);
    assert_eq!(c.json(), generic("JSON nesting depth limit exceeded"));
    // 64 levels are fine (then rejected as an unexpected argument).
    let mut ok = br#"{"execute":"stop","arguments":{"a":"#.to_vec();
    ok.extend(vec![b'['; 62]);
    ok.extend(vec![b']'; 62]);
    ok.extend(b"}}\n");
    c.send(&ok);
    assert_eq!(c.json(), generic("Parameter 'a' is unexpected"));
}

#[test]
fn invalid_utf8_refused() {
    let (server, _dir) = unix_server(Mock::new());
    let mut c = Client::connect(&server).negotiate();
    c.send(b"{\"execute\": \"query-\xc3\x28status\"}");
    assert_eq!(
        c.json(),
        generic("JSON parse error, invalid UTF-8 sequence in string")
    );
    assert_eq!(
        c.cmd(r#"{"execute":"query-status"}"#)["return"]["status"],
        "running"
    );
}

#[test]
fn query_status_reports_machine_state() {
    let mock = Mock::new();
    let (server, _dir) = unix_server(mock.clone());
    let mut c = Client::connect(&server).negotiate();
    let q = r#"{"execute":"query-status"}"#;
    assert_eq!(
        c.cmd(q),
        json!({"return": {"running": true, "status": "running"}})
    );
    mock.set_state(RunState::Postmigrate);
    assert_eq!(
        c.cmd(q),
        json!({"return": {"running": false, "status": "postmigrate"}})
    );
    mock.set_state(RunState::FinishMigrate);
    assert_eq!(c.cmd(q)["return"]["status"], "finish-migrate");
    mock.set_state(RunState::GuestPanicked);
    assert_eq!(c.cmd(q)["return"]["status"], "guest-panicked");
    assert!(c.cmd(q)["return"].get("singlestep").is_none());
    assert_eq!(c.cmd(r#"{"execute":"stop"}"#), json!({"return": {}}));
    assert_eq!(c.cmd(q)["return"]["status"], "paused");
    assert_eq!(c.cmd(r#"{"execute":"cont"}"#), json!({"return": {}}));
    assert_eq!(c.cmd(q)["return"]["running"], true);
    mock.set_state(RunState::Inmigrate);
    assert_eq!(
        c.cmd(r#"{"execute":"cont"}"#),
        generic("Migration is not finished yet")
    );
}

#[test]
fn query_commands_version_name_cpus() {
    let mock = Mock::new();
    let (server, _dir) = unix_server(mock.clone());
    let mut c = Client::connect(&server).negotiate();
    let cmds = c.cmd(r#"{"execute":"query-commands"}"#)["return"].clone();
    let names: Vec<&str> = cmds
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    for n in [
        "qmp_capabilities",
        "query-version",
        "query-commands",
        "query-status",
        "query-name",
        "query-kvm",
        "query-cpus-fast",
        "stop",
        "cont",
        "system_reset",
        "system_powerdown",
        "quit",
        "human-monitor-command",
    ] {
        assert!(names.contains(&n), "{n} missing");
        // Every listed command exists.
        let r = c.cmd(&json!({"execute": n, "arguments": {"zzz": 1}}).to_string());
        assert_eq!(r["error"]["class"], "GenericError", "{n}: {r}");
    }
    assert_eq!(
        c.cmd(r#"{"execute":"query-version"}"#),
        json!({"return": {"qemu": {"major": 10, "minor": 0, "micro": 0}, "package": qmp::package()}})
    );
    assert_eq!(
        c.cmd(r#"{"execute":"query-cpus-fast"}"#)["return"][1],
        json!({"cpu-index": 1, "qom-path": "/machine/unattached/device[1]", "thread-id": 1001,
               "props": {"core-id": 1, "thread-id": 0, "socket-id": 0}, "target": "x86_64"})
    );
    for (cmd, call) in [
        ("system_reset", "system_reset"),
        ("system_powerdown", "system_powerdown"),
    ] {
        assert_eq!(
            c.cmd(&json!({"execute": cmd}).to_string()),
            json!({"return": {}})
        );
        assert_eq!(mock.calls().last().unwrap(), call);
    }
}

#[test]
fn quit_replies_first() {
    let mock = Mock::new();
    let (server, _dir) = unix_server(mock.clone());
    let mut c = Client::connect(&server).negotiate();
    assert_eq!(
        c.cmd(r#"{"execute":"quit","id":"q"}"#),
        json!({"return": {}, "id": "q"})
    );
    assert!(common::wait_for(|| mock
        .quits
        .load(std::sync::atomic::Ordering::SeqCst)
        == 1));
}

#[test]
fn several_messages_in_one_write_and_split_writes() {
    let (server, _dir) = unix_server(Mock::new());
    let mut c = Client::connect(&server).negotiate();
    c.send(br#"{"execute":"query-kvm","id":1}{"execute":"query-kvm","id":2}  {"execute":"query-kvm","id":3}"#);
    for i in 1..=3 {
        assert_eq!(c.json()["id"], i);
    }
    for b in br#"{"execute":"query-kvm","id":4}"# {
        c.send(&[*b]);
    }
    assert_eq!(c.json()["id"], 4);
}
