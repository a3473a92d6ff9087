//! Snapshot streams through QEMU's migration URIs: exec: (through gzip and
//! zstd), unix:, tcp: and fd: (a descriptor passed with getfd), both
//! directions; a stream written to a file restores like an image; cut,
//! corrupt and foreign streams are refused; a failing stream fails the job
//! and the VM keeps running.

mod common;

use common::*;
use serde_json::json;
use std::time::Duration;

const GUEST: &[&str] = &["--mem", "256M", "--cmdline", "workload=memwrite region=64M"];

fn source(d: &TempDir) -> (Running, Qmp) {
    let (a, q) = start_vm(d, "a", "1", GUEST);
    a.wait_line("refguest: cpu=0 t=", T);
    (a, q)
}

/// The source is still running and its guest still reports.
fn still_running(a: &Running, q: &mut Qmp) {
    assert_eq!(q.ok("query-status", json!({}))["status"], "running");
    a.wait_line("refguest: cpu=0 t=", T);
}

/// Restores with `--incoming URI`; the guest goes on.
fn restores_from(d: &TempDir, name: &str, uri: &str) {
    let (b, mut qb) = start_vm(d, name, "1", &["--incoming", uri]);
    assert_eq!(wait_settled(&mut qb), "running");
    goes_on_without_corruption(&b, 1);
    if !uri.starts_with("file:") {
        let m = qb.ok("query-migrate", json!({}));
        assert_eq!(m["status"], "completed", "{m}");
    }
    qb.ok("quit", json!({}));
}

/// A live snapshot to `uri` that fails, at the command or later; the
/// final query-migrate answer.
fn failed_snapshot(q: &mut Qmp, uri: &str) -> serde_json::Value {
    q.ok(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "background-snapshot", "state": true}]}),
    );
    let r = q.cmd("migrate", json!({ "uri": uri }));
    let m = q.wait_migration(T);
    if let Some(e) = r.get("error") {
        assert_eq!(m["error-desc"], e["desc"], "{m}");
    }
    assert_eq!(m["status"], "failed", "{uri}: {m}");
    m
}

fn completed(m: &serde_json::Value) {
    assert_eq!(m["status"], "completed", "{m}");
}

#[test]
fn exec_through_gzip_and_zstd_both_ways() {
    let d = TempDir::new("exec");
    let (a, mut qa) = source(&d);
    let gz = d.path("vm.snap.gz");
    completed(&live_snapshot_to(
        &mut qa,
        &format!("exec:gzip -1 -c > '{}'", gz.display()),
    ));
    still_running(&a, &mut qa);
    let zst = d.path("vm.snap.zst");
    qa.ok(
        "migrate-set-parameters",
        json!({"x-snapshot-method": "fork"}),
    );
    completed(&live_snapshot_to(
        &mut qa,
        &format!("exec:zstd -q -T0 -o '{}'", zst.display()),
    ));
    still_running(&a, &mut qa);
    // Compressed far below RAM: zero pages are not sent at all.
    let len = std::fs::metadata(&gz).unwrap().len();
    assert!(len < 100 << 20, "{len} bytes");
    restores_from(&d, "b", &format!("exec:gzip -dc '{}'", gz.display()));
    restores_from(&d, "c", &format!("exec:zstd -dc '{}'", zst.display()));
    qa.ok("quit", json!({}));
}

#[test]
fn a_stream_written_to_a_file_restores_like_an_image() {
    let d = TempDir::new("sfile");
    let (_a, mut qa) = source(&d);
    let f = d.path("vm.stream");
    completed(&live_snapshot_to(
        &mut qa,
        &format!("exec:cat > '{}'", f.display()),
    ));
    restores_from(&d, "b", &format!("file:{}", f.display()));
    // Cut short or damaged: refused with one clear line, nothing runs.
    let bytes = std::fs::read(&f).unwrap();
    let cut = d.path("cut.stream");
    std::fs::write(&cut, &bytes[..bytes.len() * 2 / 3]).unwrap();
    refused(&d, &format!("file:{}", cut.display()), "truncated");
    let bad = d.path("bad.stream");
    let mut b = bytes.clone();
    let mid = b.len() / 2;
    b[mid] ^= 0x40;
    std::fs::write(&bad, &b).unwrap();
    refused(&d, &format!("file:{}", bad.display()), "corrupt");
    refused(
        &d,
        &format!("exec:head -c 100000 '{}'", f.display()),
        "truncated",
    );
    qa.ok("quit", json!({}));
}

/// `--incoming URI` ends the process with a one-line error containing `why`.
fn refused(d: &TempDir, uri: &str, why: &str) {
    let _ = d;
    let o = run_with_timeout(snapvmm(&["run", "--incoming", uri]), T);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(err.contains(why), "{uri}: {err}");
    assert!(
        !stdout(&o).contains("refguest"),
        "a refused stream must not run a guest"
    );
}

#[test]
fn unix_socket_into_a_deferred_target() {
    let d = TempDir::new("unix");
    let (a, mut qa) = source(&d);
    let (b, mut qb) = start_vm(&d, "b", "1", &["--incoming", "defer"]);
    let sock = d.path("mig.sock");
    qb.ok(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "events", "state": true}]}),
    );
    qb.ok(
        "migrate-incoming",
        json!({"uri": format!("unix:{}", sock.display())}),
    );
    let m = qb.ok("query-migrate", json!({}));
    assert_eq!(m["status"], "active", "{m}");
    assert_eq!(m["socket-address"][0]["path"], sock.to_str().unwrap());
    // A second incoming while one waits is refused.
    let r = qb.cmd("migrate-incoming", json!({"uri": "unix:/nonexistent/x"}));
    assert!(r.get("error").is_some(), "{r}");
    completed(&live_snapshot_to(
        &mut qa,
        &format!("unix:{}", sock.display()),
    ));
    assert_eq!(wait_settled(&mut qb), "running");
    goes_on_without_corruption(&b, 1);
    assert_eq!(qb.ok("query-migrate", json!({}))["status"], "completed");
    assert!(!sock.exists(), "the listening socket is removed");
    still_running(&a, &mut qa);
    qa.ok("quit", json!({}));
    qb.ok("quit", json!({}));
}

#[test]
fn tcp_on_the_port_the_target_reports_and_a_stray_client_is_turned_away() {
    let d = TempDir::new("tcp");
    let (_a, mut qa) = source(&d);
    let (b, mut qb) = start_vm(&d, "b", "1", &["--incoming", "defer"]);
    qb.ok("migrate-incoming", json!({"uri": "tcp:127.0.0.1:0"}));
    let m = qb.ok("query-migrate", json!({}));
    let addr = &m["socket-address"][0];
    assert_eq!(addr["host"], "127.0.0.1", "{m}");
    let port = addr["port"].as_str().unwrap().to_string();
    // Something that is not a snapvmm stream: closed, the target waits on.
    {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(format!("127.0.0.1:{port}")).unwrap();
        s.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
        s.set_read_timeout(Some(T)).unwrap();
        let mut buf = [0u8; 16];
        assert_eq!(s.read(&mut buf).unwrap_or(0), 0, "closed at once");
    }
    assert_eq!(qb.ok("query-migrate", json!({}))["status"], "active");
    completed(&live_snapshot_to(&mut qa, &format!("tcp:127.0.0.1:{port}")));
    assert_eq!(wait_settled(&mut qb), "running");
    goes_on_without_corruption(&b, 1);
    qa.ok("quit", json!({}));
    qb.ok("quit", json!({}));
}

#[test]
fn a_descriptor_passed_with_getfd_both_ways() {
    let d = TempDir::new("fd");
    let (_a, mut qa) = source(&d);
    let (b, mut qb) = start_vm(&d, "b", "1", &["--incoming", "defer"]);
    let (x, y) = std::os::unix::net::UnixStream::pair().unwrap();
    use std::os::fd::AsRawFd;
    // Without a descriptor, getfd says so.
    let r = qa.cmd("getfd", json!({"fdname": "mig"}));
    assert!(
        r["error"]["desc"].as_str().unwrap().contains("SCM_RIGHTS"),
        "{r}"
    );
    let r = qa.cmd_with_fd("getfd", json!({"fdname": "mig"}), x.as_raw_fd());
    assert_eq!(r, json!({"return": {}}));
    let r = qb.cmd_with_fd("getfd", json!({"fdname": "mig"}), y.as_raw_fd());
    assert_eq!(r, json!({"return": {}}));
    drop((x, y));
    qb.ok("migrate-incoming", json!({"uri": "fd:mig"}));
    completed(&live_snapshot_to(&mut qa, "fd:mig"));
    assert_eq!(wait_settled(&mut qb), "running");
    goes_on_without_corruption(&b, 1);
    // The name was used up; an unknown one fails the job, the VM runs on.
    let m = failed_snapshot(&mut qa, "fd:mig");
    assert!(m["error-desc"].as_str().unwrap().contains("getfd"), "{m}");
    let r = qa.cmd("closefd", json!({"fdname": "nothing"}));
    assert!(r.get("error").is_some(), "{r}");
    qa.ok("quit", json!({}));
    qb.ok("quit", json!({}));
}

#[test]
fn a_failing_stream_fails_the_job_and_the_vm_keeps_running() {
    let d = TempDir::new("sfail");
    let (a, mut qa) = source(&d);
    for (uri, why) in [
        (
            "exec:cat > /dev/null; exit 3".to_string(),
            "exited with status 3",
        ),
        // No space on the far side.
        ("exec:cat > /dev/full".to_string(), "exited with status 1"),
        // The peer goes away after 1 MB.
        ("exec:head -c 1000000 > /dev/null".to_string(), "pipe"),
        (
            format!("unix:{}", d.path("nobody.sock").display()),
            "cannot open the stream",
        ),
        ("tcp:127.0.0.1:1".to_string(), "cannot open the stream"),
    ] {
        for method in ["uffd", "fork"] {
            qa.ok(
                "migrate-set-parameters",
                json!({"x-snapshot-method": method}),
            );
            let m = failed_snapshot(&mut qa, &uri);
            let e = m["error-desc"].as_str().unwrap();
            assert!(e.contains(why), "{uri}: {e}");
            still_running(&a, &mut qa);
        }
    }
    // Nothing was lost: the next snapshot works and restores.
    let f = d.path("after.snap");
    completed(&live_snapshot(&mut qa, &f));
    restores_from(&d, "b", &format!("file:{}", f.display()));
    qa.ok("quit", json!({}));
}

#[test]
fn quitting_while_listening_leaves_no_socket_file() {
    let d = TempDir::new("listen-quit");
    let (mut b, mut qb) = start_vm(&d, "b", "1", &["--incoming", "defer"]);
    let sock = d.path("mig.sock");
    qb.ok(
        "migrate-incoming",
        json!({"uri": format!("unix:{}", sock.display())}),
    );
    assert!(sock.exists());
    qb.ok("quit", json!({}));
    assert!(b.wait(T).success());
    assert!(!sock.exists(), "the listening socket is removed at exit");
}

/// The longest stall the guest reported (`maxgap_us`, per report) among the
/// lines it prints within `dur`.
fn longest_gap_within(a: &Running, dur: Duration) -> u64 {
    let end = std::time::Instant::now() + dur;
    let mut longest = 0;
    while let Ok(l) = a
        .lines
        .recv_timeout(end.saturating_duration_since(std::time::Instant::now()))
    {
        if let Some(v) = l
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix("maxgap_us="))
            .and_then(|v| v.parse::<u64>().ok())
        {
            longest = longest.max(v);
        }
    }
    longest
}

#[test]
fn a_destination_that_never_reads_never_stops_the_guest() {
    let d = TempDir::new("deaf");
    let (mut a, mut qa) = source(&d);
    // A unix listener that never accepts nor reads, and a command that
    // never reads its input.
    let deaf = d.path("deaf.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&deaf).unwrap();
    let deaf = format!("unix:{}", deaf.display());
    // 1. A pool too small for the guest's writes: once it is full the
    // guest's write waits at most the stall limit, then the snapshot is
    // abandoned and the guest runs on.
    qa.ok(
        "migrate-set-parameters",
        json!({"x-snapshot-method": "uffd", "x-wp-pool-size": 2 << 20,
               "x-wp-pool-max-size": 2 << 20, "x-wp-stall-limit-ms": 300}),
    );
    for uri in [deaf.as_str(), "exec:sleep 30"] {
        while a.lines.try_recv().is_ok() {}
        let t = std::time::Instant::now();
        let m = failed_snapshot(&mut qa, uri);
        let e = m["error-desc"].as_str().unwrap();
        assert!(e.contains("took no data"), "{uri}: {m}");
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{uri}: {:?}",
            t.elapsed()
        );
        let gap = longest_gap_within(&a, Duration::from_millis(1500));
        assert!(gap < 1_000_000, "{uri}: the guest stalled {gap} us");
        still_running(&a, &mut qa);
    }
    // 2. The default pool holds the guest's hot set: the snapshot waits for
    // the destination with the guest running; migrate_cancel ends it at once.
    qa.ok(
        "migrate-set-parameters",
        json!({"x-wp-pool-size": 64 << 20, "x-wp-pool-max-size": 256 << 20,
               "x-wp-stall-limit-ms": 500}),
    );
    for uri in [deaf.as_str(), "exec:sleep 30"] {
        qa.ok("migrate", json!({ "uri": uri }));
        let gap = longest_gap_within(&a, Duration::from_millis(1500));
        assert!(gap < 1_000_000, "{uri}: the guest stalled {gap} us");
        assert_eq!(qa.ok("query-migrate", json!({}))["status"], "active");
        let t = std::time::Instant::now();
        qa.ok("migrate_cancel", json!({}));
        let m = qa.wait_migration(T);
        assert_eq!(m["status"], "cancelled", "{uri}: {m}");
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "{uri}: cancel took {:?}",
            t.elapsed()
        );
        still_running(&a, &mut qa);
    }
    // Nothing was lost: the next snapshot works and restores.
    let f = d.path("after.snap");
    completed(&live_snapshot(&mut qa, &f));
    restores_from(&d, "b", &format!("file:{}", f.display()));
    // 3. quit exits even while a snapshot waits on a deaf destination.
    qa.ok("migrate", json!({ "uri": deaf }));
    std::thread::sleep(Duration::from_millis(300));
    qa.send("quit", json!({}));
    let st = a.wait(Duration::from_secs(10));
    assert!(st.success(), "{st:?}");
}

#[test]
fn a_failed_stop_and_copy_resumes_a_guest_that_ran() {
    let d = TempDir::new("scfail");
    let (a, mut qa) = source(&d);
    qa.ok(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "events", "state": true}]}),
    );
    // Without background-snapshot: the guest stops for the copy, which fails.
    let r = qa.cmd("migrate", json!({"uri": "exec:exit 1"}));
    let m = qa.wait_migration(T);
    assert_eq!(m["status"], "failed", "{r} {m}");
    assert_eq!(wait_settled(&mut qa), "running", "{m}");
    let names = qa.event_names();
    let stop = names.iter().position(|n| n == "STOP");
    let resume = names.iter().rposition(|n| n == "RESUME");
    assert!(
        matches!((stop, resume), (Some(s), Some(r)) if s < r),
        "{names:?}"
    );
    still_running(&a, &mut qa);
    // A paused guest stays paused when its copy fails.
    qa.ok("stop", json!({}));
    qa.cmd("migrate", json!({"uri": "exec:exit 1"}));
    assert_eq!(qa.wait_migration(T)["status"], "failed");
    assert_eq!(qa.ok("query-status", json!({}))["status"], "paused");
    qa.ok("cont", json!({}));
    still_running(&a, &mut qa);
    qa.ok("quit", json!({}));
}

#[test]
fn peers_that_stall_or_close_after_the_header_do_not_end_a_waiting_target() {
    let d = TempDir::new("badpeer");
    let (_a, mut qa) = source(&d);
    let f = d.path("vm.stream");
    completed(&live_snapshot_to(
        &mut qa,
        &format!("exec:cat > '{}'", f.display()),
    ));
    qa.ok("quit", json!({}));
    let bytes = std::fs::read(&f).unwrap();
    // The stream header of one RAM range: 60 bytes.
    let header = &bytes[..60];
    // A target waiting on the command line.
    let sock = d.path("in.sock");
    let (b, mut qb) = start_vm(
        &d,
        "b",
        "1",
        &["--incoming", &format!("unix:{}", sock.display())],
    );
    let connect = || {
        let end = std::time::Instant::now() + T;
        loop {
            match std::os::unix::net::UnixStream::connect(&sock) {
                Ok(s) => return s,
                Err(e) => {
                    assert!(std::time::Instant::now() < end, "{e}");
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    };
    use std::io::Write;
    // 1. The header, then the connection closes.
    connect().write_all(header).unwrap();
    // 2. The header, then nothing: dropped after a short deadline.
    let mut stalled = connect();
    stalled.write_all(header).unwrap();
    // 3. A real sender, queued behind them: it restores.
    let mut sender = connect();
    let t = std::time::Instant::now();
    sender.write_all(&bytes).unwrap();
    drop(sender);
    assert_eq!(wait_settled(&mut qb), "running");
    assert!(
        t.elapsed() < Duration::from_secs(30),
        "the stalled peer held the target for {:?}",
        t.elapsed()
    );
    goes_on_without_corruption(&b, 1);
    drop(stalled);
    qb.ok("quit", json!({}));
}
