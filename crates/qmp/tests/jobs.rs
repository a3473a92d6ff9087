//! Internal-snapshot job commands (QEMU 6.0+, qapi/migration.json and
//! qapi/job.json): argument checking, forwarding to the machine, defaults.

mod common;

use common::{unix_server, unix_server_for, Call, Client, JobMock, Mock};
use qmp::SnapshotJob;
use serde_json::{json, Value};

fn generic(desc: &str) -> Value {
    json!({"error": {"class": "GenericError", "desc": desc}})
}

fn run(c: &mut Client, cmd: &str, args: Value) -> Value {
    c.cmd(&json!({"execute": cmd, "arguments": args}).to_string())
}

fn job(id: &str, tag: &str, vmstate: Option<&str>, devices: &[&str]) -> SnapshotJob {
    SnapshotJob {
        job_id: id.into(),
        tag: tag.into(),
        vmstate: vmstate.map(str::to_string),
        devices: devices.iter().map(|d| d.to_string()).collect(),
    }
}

#[test]
fn snapshot_commands_forward_exact_values() {
    let mock = JobMock::new();
    let (server, _dir) = unix_server_for(mock.clone());
    let mut c = Client::connect(&server).negotiate();
    let r = c.cmd(
        r#"{"execute": "snapshot-save", "arguments": {"job-id": "snapsave0", "tag": "my-snap",
            "vmstate": "disk0", "devices": ["disk0", "disk1"]}, "id": 7}"#,
    );
    assert_eq!(r, json!({"return": {}, "id": 7}));
    let r = run(
        &mut c,
        "snapshot-load",
        json!({"job-id": "snapload0", "tag": "t \u{e9}", "vmstate": "d", "devices": []}),
    );
    assert_eq!(r, json!({"return": {}}));
    let r = run(
        &mut c,
        "snapshot-delete",
        json!({"devices": ["disk1"], "tag": "my-snap", "job-id": "snapdelete0"}),
    );
    assert_eq!(r, json!({"return": {}}));
    assert_eq!(
        mock.calls(),
        vec![
            Call::Job(
                "snapshot_save",
                job("snapsave0", "my-snap", Some("disk0"), &["disk0", "disk1"])
            ),
            Call::Job(
                "snapshot_load",
                job("snapload0", "t \u{e9}", Some("d"), &[])
            ),
            Call::Job(
                "snapshot_delete",
                job("snapdelete0", "my-snap", None, &["disk1"])
            ),
        ]
    );
}

#[test]
fn snapshot_arguments_checked_before_any_call() {
    let mock = JobMock::new();
    let (server, _dir) = unix_server_for(mock.clone());
    let mut c = Client::connect(&server).negotiate();
    let full = json!({"job-id": "j", "tag": "t", "vmstate": "v", "devices": ["d"]});
    let with = |k: &str, v: Value| {
        let mut a = full.clone();
        a[k] = v;
        a
    };
    let without = |k: &str| {
        let mut a = full.clone();
        a.as_object_mut().unwrap().remove(k);
        a
    };
    for cmd in ["snapshot-save", "snapshot-load"] {
        for (args, desc) in [
            (json!({}), "Parameter 'job-id' is missing"),
            (without("job-id"), "Parameter 'job-id' is missing"),
            (without("tag"), "Parameter 'tag' is missing"),
            (without("vmstate"), "Parameter 'vmstate' is missing"),
            (without("devices"), "Parameter 'devices' is missing"),
            (
                with("job-id", json!(1)),
                "Invalid parameter type for 'job-id', expected: string",
            ),
            (
                with("tag", json!(null)),
                "Invalid parameter type for 'tag', expected: string",
            ),
            (
                with("vmstate", json!(["v"])),
                "Invalid parameter type for 'vmstate', expected: string",
            ),
            (
                with("devices", json!("d")),
                "Invalid parameter type for 'devices', expected: array",
            ),
            (
                with("devices", json!(["d", 2])),
                "Invalid parameter type for 'devices[1]', expected: string",
            ),
            (with("foo", json!(1)), "Parameter 'foo' is unexpected"),
            // QEMU checks the schema's members before unexpected ones.
            (
                json!({"foo": 1, "tag": "t"}),
                "Parameter 'job-id' is missing",
            ),
        ] {
            assert_eq!(
                run(&mut c, cmd, args.clone()),
                generic(desc),
                "{cmd} {args}"
            );
        }
    }
    let del = json!({"job-id": "j", "tag": "t", "devices": ["d"]});
    for (args, desc) in [
        (
            json!({"job-id": "j", "tag": "t"}),
            "Parameter 'devices' is missing",
        ),
        (
            json!({"job-id": "j", "devices": []}),
            "Parameter 'tag' is missing",
        ),
        (full.clone(), "Parameter 'vmstate' is unexpected"),
        (
            json!({"job-id": "j", "tag": 5, "devices": []}),
            "Invalid parameter type for 'tag', expected: string",
        ),
        (
            json!({"job-id": "j", "tag": "t", "devices": {}}),
            "Invalid parameter type for 'devices', expected: array",
        ),
    ] {
        assert_eq!(run(&mut c, "snapshot-delete", args), generic(desc));
    }
    assert!(mock.calls().is_empty(), "{:?}", mock.calls());
    assert_eq!(run(&mut c, "snapshot-delete", del), json!({"return": {}}));
    assert_eq!(mock.calls().len(), 1);
}

#[test]
fn job_commands() {
    let mock = JobMock::new();
    let (server, _dir) = unix_server_for(mock.clone());
    let mut c = Client::connect(&server).negotiate();
    assert_eq!(
        c.cmd(r#"{"execute": "query-jobs", "id": "q"}"#),
        json!({"return": [{"id": "snapsave0", "type": "snapshot-save", "status": "concluded",
            "current-progress": 1, "total-progress": 1}], "id": "q"})
    );
    for cmd in ["job-dismiss", "job-cancel", "job-finalize"] {
        assert_eq!(
            run(&mut c, cmd, json!({})),
            generic("Parameter 'id' is missing")
        );
        assert_eq!(
            run(&mut c, cmd, json!({"id": 0})),
            generic("Invalid parameter type for 'id', expected: string")
        );
        assert_eq!(
            run(&mut c, cmd, json!({"id": "j", "force": true})),
            generic("Parameter 'force' is unexpected")
        );
    }
    assert_eq!(
        run(&mut c, "query-jobs", json!({"id": "j"})),
        generic("Parameter 'id' is unexpected")
    );
    assert_eq!(mock.calls(), vec![Call::Query("query_jobs")]);
    for cmd in ["job-finalize", "job-dismiss", "job-cancel"] {
        assert_eq!(
            run(&mut c, cmd, json!({"id": "snapsave0"})),
            json!({"return": {}})
        );
    }
    mock.fail_with(Some("Job not found"));
    assert_eq!(
        run(&mut c, "job-dismiss", json!({"id": "nope"})),
        generic("Job not found")
    );
    assert_eq!(
        run(
            &mut c,
            "snapshot-save",
            json!({"job-id": "snapsave0", "tag": "t", "vmstate": "v", "devices": []})
        ),
        generic("Job not found")
    );
    assert_eq!(
        c.cmd(r#"{"execute": "query-jobs"}"#),
        generic("Job not found")
    );
    let arg = |n, v: &str| Call::Arg(n, v.to_string());
    assert_eq!(
        mock.calls()[1..5],
        [
            arg("job_finalize", "snapsave0"),
            arg("job_dismiss", "snapsave0"),
            arg("job_cancel", "snapsave0"),
            arg("job_dismiss", "nope"),
        ]
    );
}

#[test]
fn defaults_are_not_supported() {
    let mock = Mock::new();
    let (server, _dir) = unix_server(mock.clone());
    let mut c = Client::connect(&server).negotiate();
    let job = json!({"job-id": "j", "tag": "t", "vmstate": "v", "devices": ["d"]});
    let del = json!({"job-id": "j", "tag": "t", "devices": ["d"]});
    for (cmd, args) in [
        ("snapshot-save", job.clone()),
        ("snapshot-load", job),
        ("snapshot-delete", del),
        ("query-jobs", json!({})),
        ("job-dismiss", json!({"id": "j"})),
        ("job-cancel", json!({"id": "j"})),
        ("job-finalize", json!({"id": "j"})),
    ] {
        assert_eq!(
            run(&mut c, cmd, args),
            generic(&format!("{cmd} is not supported by this machine"))
        );
    }
    assert!(mock.calls().is_empty());
}

#[test]
fn listed_in_query_commands() {
    let (server, _dir) = unix_server(Mock::new());
    let mut c = Client::connect(&server).negotiate();
    let r = c.cmd(r#"{"execute": "query-commands"}"#);
    let names: Vec<&str> = r["return"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    for cmd in [
        "snapshot-save",
        "snapshot-load",
        "snapshot-delete",
        "query-jobs",
        "job-dismiss",
        "job-cancel",
        "job-finalize",
    ] {
        assert!(names.contains(&cmd), "{cmd} missing from {names:?}");
    }
}
