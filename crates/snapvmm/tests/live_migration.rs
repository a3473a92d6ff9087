//! Live migration (post-copy) between two snapvmm processes: the guest
//! writing memory at full speed moves to the target and goes on there with
//! no CORRUPT line; the source ends `postmigrate` and keeps its RAM until
//! the target has it all; a connection broken after the switch pauses both
//! sides and `migrate-recover` + `migrate resume=true` carry on; a target
//! killed before the switch leaves the source running. A guest that writes
//! little moves by its pre-copy pass: only the chunks it wrote since travel
//! twice; `migrate-start-postcopy` ends the pass; `x-precopy` false skips it.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

const GUEST: &[&str] = &[
    "--mem",
    "512M",
    "--cmdline",
    "workload=memwrite region=256M",
];

fn events_on(q: &mut Qmp) {
    q.ok(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "events", "state": true}, {"capability": "postcopy-ram", "state": true}]}),
    );
}

fn statuses(q: &Qmp) -> Vec<String> {
    q.events
        .iter()
        .filter(|e| e["event"] == "MIGRATION")
        .map(|e| e["data"]["status"].as_str().unwrap_or("").to_string())
        .collect()
}

/// Polls query-migrate until `pred` holds on the status.
fn wait_status(q: &mut Qmp, what: &str, pred: impl Fn(&str) -> bool) -> serde_json::Value {
    let end = Instant::now() + T;
    loop {
        let m = q.ok("query-migrate", json!({}));
        if pred(m["status"].as_str().unwrap_or("")) {
            return m;
        }
        assert!(Instant::now() < end, "still not {what}: {m}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_busy_guest_moves_and_goes_on_on_the_target() {
    let d = TempDir::new("live");
    let (a, mut qa) = start_vm(&d, "a", "2", GUEST);
    a.wait_line("refguest: cpu=1 t=", T);
    let (b, mut qb) = start_vm(&d, "b", "2", &["--incoming", "defer"]);
    events_on(&mut qa);
    events_on(&mut qb);
    let sock = d.path("mig.sock");
    let id = qa.ok("query-vm-generation-id", json!({}));
    migrate_over(&mut qa, &mut qb, &sock);
    assert_eq!(wait_settled(&mut qb), "running");
    runs_on(&b);
    // The one VM moved: its generation ID came along unchanged.
    assert_eq!(qb.ok("query-vm-generation-id", json!({})), id);
    let m = wait_status(&mut qa, "completed", |s| s == "completed");
    assert_eq!(m["x-snapshot-method"], "postcopy", "{m}");
    let pc = &m["x-postcopy"];
    assert_eq!(pc["chunks-sent"], pc["chunks"], "{m}");
    assert!(m["downtime"].as_u64().is_some(), "{m}");
    assert_eq!(
        statuses(&qa),
        ["setup", "active", "postcopy-active", "completed"],
        "{m}"
    );
    assert_eq!(qa.ok("query-status", json!({}))["status"], "postmigrate");
    // The guest lives on the target now: the source may not run it again.
    let r = qa.cmd("cont", json!({}));
    assert!(
        r["error"]["desc"]
            .as_str()
            .unwrap_or("")
            .contains("migrated"),
        "{r}"
    );
    let mb = wait_status(&mut qb, "completed", |s| s == "completed");
    let t = &mb["x-postcopy-target"];
    assert!(t["chunks-received"].as_u64().unwrap() >= 256, "{mb}");
    runs_on(&b);
    qa.ok("quit", json!({}));
    qb.ok("quit", json!({}));
}

#[test]
fn a_broken_link_pauses_both_sides_and_recovery_carries_on() {
    let d = TempDir::new("live-recover");
    let (a, mut qa) = start_vm(
        &d,
        "a",
        "1",
        &["--mem", "2G", "--cmdline", "workload=memwrite region=1536M"],
    );
    a.wait_line("refguest: cpu=0 t=", T);
    let (b, mut qb) = start_vm(&d, "b", "1", &["--incoming", "defer"]);
    events_on(&mut qa);
    events_on(&mut qb);
    // Post-copy from the start: no pre-copy pass.
    qa.ok("migrate-set-parameters", json!({"x-precopy": false}));
    assert_eq!(
        qa.ok("query-migrate-parameters", json!({}))["x-precopy"],
        false
    );
    // Through a relay this test can cut: target <- relay <- source.
    let sock = d.path("mig.sock");
    let relay_sock = d.path("relay.sock");
    qb.ok(
        "migrate-incoming",
        json!({"uri": format!("unix:{}", sock.display())}),
    );
    let relay = Relay::start(&relay_sock, &sock);
    qa.ok(
        "migrate",
        json!({"uri": format!("unix:{}", relay_sock.display())}),
    );
    let m = wait_status(&mut qa, "postcopy-active", |s| s == "postcopy-active");
    assert!(m.get("x-precopy").is_none(), "{m}");
    // The source is post-copy once it heard the target's RUNNING; the
    // target runs the guest only once the source's GO came back. Cut before
    // that and the target rightly ends without running it (see
    // a_lost_switch_message_never_runs_the_guest_on_both_sides): this test
    // cuts a migration whose guest runs on the target.
    wait_status(&mut qb, "postcopy-active", |s| s == "postcopy-active");
    relay.cut();
    let m = wait_status(&mut qa, "paused", |s| s == "postcopy-paused");
    assert!(m["x-paused-reason"].is_string(), "{m}");
    wait_status(&mut qb, "paused", |s| s == "postcopy-paused");
    // The source keeps its RAM while paused (a `quit` now would give it up:
    // see killing_either_side_after_the_switch_never_makes_two_guests).
    std::thread::sleep(Duration::from_millis(300));
    let mut a = a;
    assert!(a.child.try_wait().unwrap().is_none(), "the source waits");
    // Recover on a new address.
    let sock2 = d.path("mig2.sock");
    qb.ok(
        "migrate-recover",
        json!({"uri": format!("unix:{}", sock2.display())}),
    );
    qa.ok(
        "migrate",
        json!({"uri": format!("unix:{}", sock2.display()), "resume": true}),
    );
    // The source lets go once the target has everything; quit then exits.
    wait_status(&mut qa, "completed", |s| s == "completed");
    qa.ok("quit", json!({}));
    assert!(a.wait(T).success());
    wait_status(&mut qb, "completed", |s| s == "completed");
    runs_on(&b);
    let sb = statuses(&qb);
    assert!(
        sb.contains(&"postcopy-paused".to_string()) && sb.contains(&"postcopy-recover".to_string()),
        "{sb:?}"
    );
    qb.ok("quit", json!({}));
}

#[test]
fn a_guest_that_writes_little_moves_by_its_precopy_pass() {
    let d = TempDir::new("live-pre");
    let guest = ["--mem", "512M", "--cmdline", "workload=memwrite region=8M"];
    let (a, mut qa) = start_vm(&d, "a", "1", &guest);
    a.wait_line("refguest: cpu=0 t=", T);
    let (b, mut qb) = start_vm(&d, "b", "1", &["--incoming", "defer"]);
    events_on(&mut qa);
    events_on(&mut qb);
    assert_eq!(
        qa.ok("query-migrate-parameters", json!({}))["x-precopy"],
        true,
        "pre-copy is the default"
    );
    migrate_over(&mut qa, &mut qb, &d.path("mig.sock"));
    let m = wait_status(&mut qa, "completed", |s| s == "completed");
    assert_eq!(
        statuses(&qa),
        ["setup", "active", "postcopy-active", "completed"],
        "{m}"
    );
    let pre = &m["x-precopy"];
    assert_eq!(pre["ended"], "all-sent", "{m}");
    assert_eq!(pre["chunks-sent"], pre["chunks"], "{m}");
    // Only what the guest wrote after the pass sent it travels again.
    let rewritten = pre["chunks-rewritten"].as_u64().unwrap();
    let chunks = pre["chunks"].as_u64().unwrap();
    let pc = &m["x-postcopy"];
    let again = pc["chunks-pushed"].as_u64().unwrap() + pc["chunks-requested"].as_u64().unwrap();
    assert_eq!(again, rewritten, "{m}");
    assert!(
        rewritten < chunks / 8,
        "an 8 MiB writer rewrote {rewritten} of {chunks} chunks: {m}"
    );
    let mb = wait_status(&mut qb, "completed", |s| s == "completed");
    let t = &mb["x-postcopy-target"];
    assert_eq!(
        t["precopy-chunks-dropped"].as_u64(),
        Some(rewritten),
        "{mb}"
    );
    assert_eq!(
        t["precopy-chunks-kept"].as_u64(),
        Some(chunks - rewritten),
        "{mb}"
    );
    // Its threads waited only on chunks sent again (a page at a time: a
    // chunk may be asked for more than once while its pieces come).
    assert!(t["chunks-requested"].as_u64().unwrap() <= rewritten, "{mb}");
    runs_on(&b);
    qa.ok("quit", json!({}));
    qb.ok("quit", json!({}));
}

#[test]
fn migrate_start_postcopy_ends_the_precopy_pass() {
    let d = TempDir::new("live-start-pc");
    let (a, mut qa) = start_vm(&d, "a", "1", GUEST);
    a.wait_line("refguest: cpu=0 t=", T);
    let (b, mut qb) = start_vm(&d, "b", "1", &["--incoming", "defer"]);
    events_on(&mut qa);
    let sock = d.path("mig.sock");
    let relay_sock = d.path("relay.sock");
    qb.ok(
        "migrate-incoming",
        json!({"uri": format!("unix:{}", sock.display())}),
    );
    // The relay holds the stream: the pass waits on a full socket.
    let (_relay, release) = Relay::start_gated(&relay_sock, &sock);
    qa.ok(
        "migrate",
        json!({"uri": format!("unix:{}", relay_sock.display())}),
    );
    let m = qa.ok("query-migrate", json!({}));
    assert_eq!(m["status"], "active", "{m}");
    // The guest runs during the pass.
    assert_eq!(qa.ok("query-status", json!({}))["status"], "running");
    qa.ok("migrate-start-postcopy", json!({}));
    release.send(()).unwrap();
    let m = wait_status(&mut qa, "completed", |s| s == "completed");
    let pre = &m["x-precopy"];
    assert_eq!(pre["ended"], "start-postcopy", "{m}");
    assert!(
        pre["chunks-sent"].as_u64().unwrap() < pre["chunks"].as_u64().unwrap(),
        "{m}"
    );
    wait_status(&mut qb, "completed", |s| s == "completed");
    runs_on(&b);
    qa.ok("quit", json!({}));
    qb.ok("quit", json!({}));
}

#[test]
fn a_target_killed_before_the_switch_leaves_the_source_running() {
    let d = TempDir::new("live-kill");
    let (a, mut qa) = start_vm(&d, "a", "1", GUEST);
    a.wait_line("refguest: cpu=0 t=", T);
    events_on(&mut qa);
    // A "target" that accepts and dies as soon as the state arrives.
    let sock = d.path("mig.sock");
    let l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let t = std::thread::spawn(move || {
        use std::io::Read;
        let (mut s, _) = l.accept().unwrap();
        let mut buf = [0u8; 4096];
        let _ = s.read(&mut buf);
        drop(s);
    });
    qa.ok(
        "migrate",
        json!({"uri": format!("unix:{}", sock.display())}),
    );
    t.join().unwrap();
    let m = wait_status(&mut qa, "failed", |s| s == "failed");
    assert!(m["error-desc"].is_string(), "{m}");
    assert_eq!(qa.ok("query-status", json!({}))["status"], "running");
    a.wait_line("refguest: cpu=0 t=", T);
    goes_on_without_corruption(&a, 1);
    qa.ok("quit", json!({}));
}

#[test]
fn a_source_cut_off_before_the_switch_runs_on_and_the_target_runs_nothing() {
    let d = TempDir::new("live-early");
    let (a, mut qa) = start_vm(&d, "a", "1", GUEST);
    a.wait_line("refguest: cpu=0 t=", T);
    let (b, mut qb) = start_vm(&d, "b", "1", &["--incoming", "defer"]);
    let sock = d.path("mig.sock");
    let relay_sock = d.path("relay.sock");
    qb.ok(
        "migrate-incoming",
        json!({"uri": format!("unix:{}", sock.display())}),
    );
    // Only the stream header and part of the device state get through.
    let _relay = Relay::start_limited(&relay_sock, &sock, 2000);
    qa.ok(
        "migrate",
        json!({"uri": format!("unix:{}", relay_sock.display())}),
    );
    let m = wait_status(&mut qa, "failed", |s| s == "failed");
    assert!(m["error-desc"].is_string(), "{m}");
    let mb = wait_status(&mut qb, "failed", |s| s == "failed");
    assert!(
        mb["error-desc"].as_str().unwrap().contains("truncated"),
        "{mb}"
    );
    // The guest runs on at the source; nothing runs at the target.
    assert_eq!(qa.ok("query-status", json!({}))["status"], "running");
    runs_on(&a);
    assert_eq!(qb.ok("query-status", json!({}))["status"], "inmigrate");
    assert!(b.lines.try_iter().all(|l| !l.contains("refguest")));
    qa.ok("quit", json!({}));
    qb.ok("quit", json!({}));
}

/// The target's RUNNING never reaches the source (the link drops what the
/// target says, then breaks): the source fails the job and runs its guest
/// on, so the target must not run it too — it waits for the source's GO,
/// which never comes, and ends without running anything.
#[test]
fn a_lost_switch_message_never_runs_the_guest_on_both_sides() {
    let d = TempDir::new("live-lost-running");
    let (a, mut qa) = start_vm(&d, "a", "1", GUEST);
    a.wait_line("refguest: cpu=0 t=", T);
    let (mut b, mut qb) = start_vm(&d, "b", "1", &["--incoming", "defer"]);
    let sock = d.path("mig.sock");
    qb.ok(
        "migrate-incoming",
        json!({"uri": format!("unix:{}", sock.display())}),
    );
    // Source to target passes; target to source is dropped, and the link
    // breaks a moment after the target first says something.
    let relay_sock = d.path("relay.sock");
    let l = std::os::unix::net::UnixListener::bind(&relay_sock).unwrap();
    let to = sock.clone();
    std::thread::spawn(move || {
        use std::io::Read;
        let Ok((s, _)) = l.accept() else { return };
        let Ok(t) = std::os::unix::net::UnixStream::connect(&to) else {
            return;
        };
        let (mut s2, mut t2) = (s.try_clone().unwrap(), t.try_clone().unwrap());
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut s2, &mut t2);
        });
        let mut buf = [0u8; 4096];
        let mut r = t.try_clone().unwrap();
        if matches!(r.read(&mut buf), Ok(n) if n > 0) {
            std::thread::sleep(Duration::from_millis(300));
        }
        let _ = s.shutdown(std::net::Shutdown::Both);
        let _ = t.shutdown(std::net::Shutdown::Both);
    });
    qa.ok(
        "migrate",
        json!({"uri": format!("unix:{}", relay_sock.display())}),
    );
    let m = wait_status(&mut qa, "failed", |s| s == "failed");
    assert!(m["error-desc"].is_string(), "{m}");
    assert_eq!(qa.ok("query-status", json!({}))["status"], "running");
    runs_on(&a);
    // The target ends, having run nothing.
    let st = b.wait(T);
    assert!(!st.success(), "the target must fail, not run: {st:?}");
    assert!(b.lines.try_iter().all(|l| !l.contains("refguest")));
    qa.ok("quit", json!({}));
}

/// After the switch either side may die: the other never runs a second copy
/// of the guest and never shows it corrupt.
#[test]
fn killing_either_side_after_the_switch_never_makes_two_guests() {
    for victim in victims() {
        let d = TempDir::new("live-kill-after");
        let (mut a, mut qa) = start_vm(
            &d,
            "a",
            "1",
            &["--mem", "2G", "--cmdline", "workload=memwrite region=1536M"],
        );
        a.wait_line("refguest: cpu=0 t=", T);
        let (mut b, mut qb) = start_vm(&d, "b", "1", &["--incoming", "defer"]);
        let sock = d.path("mig.sock");
        migrate_over(&mut qa, &mut qb, &sock);
        wait_status(&mut qa, "postcopy-active", |s| s == "postcopy-active");
        // A moment somewhere in the post-copy.
        let jitter = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_micros()
            % 300_000;
        std::thread::sleep(Duration::from_micros(jitter as u64));
        if victim == "target" {
            b.signal("KILL");
            b.wait(T);
            // The source keeps its (paused) guest and all its RAM; it never runs it again.
            let m = wait_status(&mut qa, "postcopy-paused or completed", |s| {
                s == "postcopy-paused" || s == "completed"
            });
            assert_ne!(qa.ok("query-status", json!({}))["status"], "running", "{m}");
            let r = qa.cmd("cont", json!({}));
            assert!(r.get("error").is_some(), "{r}");
            // quit ends it even so, saying what is given up.
            qa.send("quit", json!({}));
            let st = a.wait(Duration::from_secs(10));
            assert!(st.success(), "{st:?}");
        } else {
            a.signal("KILL");
            a.wait(T);
            // The target's guest waits for what it misses; nothing is corrupt.
            wait_status(&mut qb, "postcopy-paused or completed", |s| {
                s == "postcopy-paused" || s == "completed"
            });
            assert!(b.lines.try_iter().all(|l| !l.contains("CORRUPT")));
            b.signal("TERM");
            b.wait(T);
        }
    }
}

/// The target listens on `sock`, the source migrates there.
fn migrate_over(qa: &mut Qmp, qb: &mut Qmp, sock: &std::path::Path) {
    let uri = format!("unix:{}", sock.display());
    qb.ok("migrate-incoming", json!({ "uri": uri }));
    qa.ok("migrate", json!({ "uri": uri }));
}

/// A unix-socket relay whose connections can be cut.
struct Relay {
    conns: std::sync::Arc<std::sync::Mutex<Vec<std::os::unix::net::UnixStream>>>,
}

impl Relay {
    /// Passes at most `limit` bytes from the sender, then cuts both sides.
    fn start_limited(listen: &std::path::Path, to: &std::path::Path, limit: u64) -> Relay {
        let l = std::os::unix::net::UnixListener::bind(listen).unwrap();
        let conns = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let to = to.to_path_buf();
        std::thread::spawn(move || {
            use std::io::Read;
            let Ok((s, _)) = l.accept() else { return };
            let Ok(mut t) = std::os::unix::net::UnixStream::connect(&to) else {
                return;
            };
            let _ = std::io::copy(&mut (&s).take(limit), &mut t);
            let _ = s.shutdown(std::net::Shutdown::Both);
            let _ = t.shutdown(std::net::Shutdown::Both);
        });
        Relay { conns }
    }

    /// Connects to the target and passes bytes only once released.
    fn start_gated(
        listen: &std::path::Path,
        to: &std::path::Path,
    ) -> (Relay, std::sync::mpsc::Sender<()>) {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let l = std::os::unix::net::UnixListener::bind(listen).unwrap();
        let inner = to.to_path_buf();
        let hop = listen.with_extension("gated");
        let relay = Relay::start(&hop, &inner);
        std::thread::spawn(move || {
            let Ok((s, _)) = l.accept() else { return };
            if rx.recv().is_err() {
                return;
            }
            let Ok(t) = std::os::unix::net::UnixStream::connect(&hop) else {
                return;
            };
            for (mut x, mut y) in [(s.try_clone().unwrap(), t.try_clone().unwrap()), (t, s)] {
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut x, &mut y);
                    let _ = y.shutdown(std::net::Shutdown::Both);
                });
            }
        });
        (relay, tx)
    }

    fn start(listen: &std::path::Path, to: &std::path::Path) -> Relay {
        let l = std::os::unix::net::UnixListener::bind(listen).unwrap();
        let conns = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (c2, to) = (conns.clone(), to.to_path_buf());
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(s) = s else { return };
                let Ok(t) = std::os::unix::net::UnixStream::connect(&to) else {
                    return;
                };
                c2.lock()
                    .unwrap()
                    .extend([s.try_clone().unwrap(), t.try_clone().unwrap()]);
                for (mut x, mut y) in [(s.try_clone().unwrap(), t.try_clone().unwrap()), (t, s)] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut x, &mut y);
                        let _ = y.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Relay { conns }
    }

    fn cut(&self) {
        for c in self.conns.lock().unwrap().iter() {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }
}

fn victims() -> Vec<&'static str> {
    match std::env::var("LIVE_VICTIM").as_deref() {
        Ok("target") => vec!["target"],
        Ok("source") => vec!["source"],
        _ => vec!["target", "source"],
    }
}
