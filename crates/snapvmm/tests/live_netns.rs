//! Live migration between two "hosts": two network namespaces joined by a
//! veth pair whose both ends are capped at 1 Gbit/s (tc tbf). The guest
//! writes memory at full speed and goes on on the target with no CORRUPT
//! line; a link taken down mid-post-copy pauses both sides (TCP user
//! timeout, keepalives) and, once it is up again, migrate-recover and
//! migrate resume=true carry on.
//!
//! Needs root (namespaces); as another user it says so and checks nothing.
//! `tc netem` (the 1 ms delay the issue asks for) is not in this host's
//! kernel (`Specified qdisc kind is unknown`): the delay is left out here;
//! `scripts/bench-live-migration.py` adds it with a relay.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

struct Net {
    a: String,
    b: String,
    veth_a: String,
    ip_a: String,
    ip_b: String,
}

fn sh(args: &[&str]) -> bool {
    Command::new(args[0])
        .args(&args[1..])
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

impl Net {
    fn new(tag: &str) -> Option<Net> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: network namespaces need root");
            return None;
        }
        let id = std::process::id() % 200 + 20;
        let n = Net {
            a: format!("sv{tag}a{id}"),
            b: format!("sv{tag}b{id}"),
            veth_a: format!("sv{tag}va{id}"),
            ip_a: format!("10.{id}.{}.1", tag.len()),
            ip_b: format!("10.{id}.{}.2", tag.len()),
        };
        let vb = format!("sv{tag}vb{id}");
        let (a, b, va) = (n.a.as_str(), n.b.as_str(), n.veth_a.as_str());
        let ok = sh(&["ip", "netns", "add", a])
            && sh(&["ip", "netns", "add", b])
            && sh(&["ip", "link", "add", va, "type", "veth", "peer", "name", &vb])
            && sh(&["ip", "link", "set", va, "netns", a])
            && sh(&["ip", "link", "set", &vb, "netns", b])
            && sh(&[
                "ip",
                "-n",
                a,
                "addr",
                "add",
                &format!("{}/24", n.ip_a),
                "dev",
                va,
            ])
            && sh(&[
                "ip",
                "-n",
                b,
                "addr",
                "add",
                &format!("{}/24", n.ip_b),
                "dev",
                &vb,
            ])
            && sh(&["ip", "-n", a, "link", "set", va, "up"])
            && sh(&["ip", "-n", b, "link", "set", &vb, "up"])
            && sh(&["ip", "-n", a, "link", "set", "lo", "up"])
            && sh(&["ip", "-n", b, "link", "set", "lo", "up"])
            && [(a, va), (b, vb.as_str())].iter().all(|(ns, dev)| {
                sh(&[
                    "ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
                    "rate", "1gbit", "burst", "256kb", "latency", "100ms",
                ])
            });
        assert!(ok, "cannot set up the namespaces");
        Some(n)
    }

    /// snapvmm in namespace `ns`.
    fn vm(&self, ns: &str, d: &TempDir, name: &str, extra: &[&str]) -> (Running, Qmp) {
        let sock = d.path(&format!("{name}.sock"));
        let qmp = format!("unix:{}", sock.display());
        let bin = bin();
        let mut args = vec![
            "netns",
            "exec",
            ns,
            bin.to_str().unwrap(),
            "run",
            "--qmp",
            &qmp,
        ];
        args.extend_from_slice(extra);
        let mut cmd = Command::new("ip");
        cmd.args(&args);
        let r = Running::spawn(cmd);
        (r, Qmp::connect(&sock))
    }

    fn link(&self, up: bool) {
        let state = if up { "up" } else { "down" };
        assert!(sh(&[
            "ip",
            "-n",
            &self.a,
            "link",
            "set",
            &self.veth_a,
            state
        ]));
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        sh(&["ip", "netns", "del", &self.a]);
        sh(&["ip", "netns", "del", &self.b]);
    }
}

fn wait_status(q: &mut Qmp, want: &str, limit: Duration) -> serde_json::Value {
    let end = Instant::now() + limit;
    loop {
        let m = q.ok("query-migrate", json!({}));
        if m["status"] == want {
            return m;
        }
        assert!(Instant::now() < end, "still not {want}: {m}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_busy_1g_guest_migrates_between_namespaces() {
    let Some(net) = Net::new("m") else { return };
    let d = TempDir::new("netns");
    let (a, mut qa) = net.vm(
        &net.a,
        &d,
        "a",
        &["--mem", "1G", "--cmdline", "workload=memwrite region=896M"],
    );
    a.wait_line("refguest: cpu=0 t=", T);
    let uri = format!("tcp:{}:4444", net.ip_b);
    let (b, mut qb) = net.vm(&net.b, &d, "b", &["--incoming", &uri]);
    // The target listens before the source connects.
    wait_status(&mut qb, "active", T);
    qa.ok("migrate", json!({ "uri": uri }));
    assert_eq!(wait_settled(&mut qb), "running");
    runs_on(&b);
    let m = wait_status(&mut qa, "completed", Duration::from_secs(120));
    let sent = m["x-postcopy"]["bytes-sent"].as_u64().unwrap();
    assert!(
        sent <= (1 << 30) + (8 << 20),
        "{sent} bytes sent for 1 GiB: {m}"
    );
    wait_status(&mut qb, "completed", T);
    qa.ok("quit", json!({}));
    qb.ok("quit", json!({}));
}

#[test]
fn a_link_down_mid_post_copy_pauses_and_recovers() {
    let Some(net) = Net::new("r") else { return };
    let d = TempDir::new("netns-r");
    let (a, mut qa) = net.vm(
        &net.a,
        &d,
        "a",
        &["--mem", "2G", "--cmdline", "workload=memwrite region=1792M"],
    );
    a.wait_line("refguest: cpu=0 t=", T);
    let uri = format!("tcp:{}:4444", net.ip_b);
    let (b, mut qb) = net.vm(&net.b, &d, "b", &["--incoming", &uri]);
    wait_status(&mut qb, "active", T);
    qa.ok(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "events", "state": true}]}),
    );
    qa.ok("migrate", json!({ "uri": uri }));
    wait_status(&mut qa, "postcopy-active", T);
    // The target runs the guest once the source's GO came back: cut after.
    wait_status(&mut qb, "postcopy-active", T);
    net.link(false);
    // Both sides notice (unacknowledged data, keepalives) and wait.
    wait_status(&mut qa, "postcopy-paused", Duration::from_secs(60));
    wait_status(&mut qb, "postcopy-paused", Duration::from_secs(60));
    net.link(true);
    let uri2 = format!("tcp:{}:4445", net.ip_b);
    qb.ok("migrate-recover", json!({ "uri": uri2 }));
    qa.ok("migrate", json!({"uri": uri2, "resume": true}));
    wait_status(&mut qa, "completed", Duration::from_secs(120));
    wait_status(&mut qb, "completed", T);
    runs_on(&b);
    assert_eq!(qa.ok("query-status", json!({}))["status"], "postmigrate");
    qa.ok("quit", json!({}));
    qb.ok("quit", json!({}));
}
