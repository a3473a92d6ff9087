//! Incremental snapshots through QMP: a guest whose hot set is a tenth of
//! its data; after a full snapshot, `x-parent` makes the next ones hold only
//! what changed. The chain restores (copy and fill), equals a full snapshot
//! of the same instant, squashes into one image, and a broken chain is
//! refused with a clear error.

mod common;

use std::path::Path;

use common::*;
use serde_json::json;

fn uri(p: &Path) -> String {
    format!("file:{}", p.display())
}

/// RAM as a chain (or a full image) holds it.
fn chain_ram(p: &Path) -> Vec<u8> {
    let chain = livesnap::chain::Chain::open(p).unwrap();
    let mut out = Vec::new();
    for (i, r) in chain.top().ranges().iter().enumerate() {
        let mut v = vec![0u8; r.len as usize];
        chain.read_ram_into_zeroed(i, &mut v).unwrap();
        out.extend_from_slice(&v);
    }
    out
}

fn restores(d: &TempDir, name: &str, image: &Path, mode: &str) {
    let (r, mut q) = start_vm(
        d,
        name,
        "1",
        &["--incoming", &uri(image), "--restore-mode", mode],
    );
    assert_eq!(wait_settled(&mut q), "running");
    for _ in 0..3 {
        let l = r.wait_line(" t=", T);
        assert!(!l.contains("CORRUPT"), "{l}");
        assert!(!l.contains("ready"), "must not boot again: {l}");
    }
    let l = r.wait_line("passes=", T);
    assert!(!l.contains("CORRUPT"), "{l}");
    q.ok("quit", json!({}));
}

#[test]
fn incremental_snapshots_hold_what_changed_and_restore_as_a_chain() {
    let d = TempDir::new("incr");
    let (full, inc1, inc2, same) = (
        d.path("full.snap"),
        d.path("inc1.snap"),
        d.path("inc2.snap"),
        d.path("same.snap"),
    );
    let (a, mut qa) = start_vm(
        &d,
        "a",
        "1",
        &[
            "--mem",
            "256M",
            "--cmdline",
            "workload=memwrite region=192M hot=10",
        ],
    );
    // Pass 1 (the whole region) is done once a second pass is reported.
    loop {
        let l = a.wait_line(" t=", T);
        let passes: u64 = l.rsplit("passes=").next().unwrap().parse().unwrap();
        if passes >= 2 {
            break;
        }
    }
    qa.ok(
        "migrate-set-parameters",
        json!({"x-snapshot-method": "uffd"}),
    );
    // Incremental before any full snapshot: refused, nothing written.
    qa.ok("migrate-set-parameters", json!({"x-parent": uri(&full)}));
    qa.ok(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "background-snapshot", "state": true}]}),
    );
    let r = qa.cmd("migrate", json!({"uri": uri(&inc1)}));
    let why = r["error"]["desc"].as_str().unwrap_or_default();
    assert!(why.contains("full.snap") && why.contains("missing"), "{r}");
    assert!(!inc1.exists());
    qa.ok("migrate-set-parameters", json!({"x-parent": ""}));
    let m = live_snapshot(&mut qa, &full);
    assert_eq!(m["status"], "completed", "{m}");
    let full_bytes = m["ram"]["normal-bytes"].as_u64().unwrap();
    assert!(full_bytes >= 192 << 20, "{m}");

    a.wait_line(" t=", T);
    qa.ok("migrate-set-parameters", json!({"x-parent": uri(&full)}));
    let m = live_snapshot(&mut qa, &inc1);
    assert_eq!(m["status"], "completed", "{m}");
    let inc = &m["x-incremental"];
    let written = inc["ram-bytes-written"].as_u64().unwrap();
    assert!(
        written * 100 <= full_bytes * 15,
        "a tenth of the data changed: {written} of {full_bytes} bytes written: {m}"
    );
    assert!(inc["chunks-unchanged"].as_u64().unwrap() > 64, "{m}");
    assert_eq!(
        qa.ok("query-migrate-parameters", json!({}))["x-parent"],
        uri(&full)
    );

    // A second level, then the same instant twice: incremental and full of
    // the paused VM hold the same RAM.
    a.wait_line(" t=", T);
    qa.ok("migrate-set-parameters", json!({"x-parent": uri(&inc1)}));
    qa.ok("stop", json!({}));
    assert_eq!(live_snapshot(&mut qa, &inc2)["status"], "completed");
    qa.ok("migrate-set-parameters", json!({"x-parent": ""}));
    assert_eq!(live_snapshot(&mut qa, &same)["status"], "completed");
    qa.ok("cont", json!({}));
    assert_eq!(
        livesnap::chain::Chain::open(&inc2).unwrap().len(),
        3,
        "inc2 over inc1 over full"
    );
    assert!(
        chain_ram(&inc2) == chain_ram(&same),
        "the chain holds the same RAM as a full snapshot of the same instant"
    );
    qa.ok("quit", json!({}));

    restores(&d, "b", &inc2, "copy");
    restores(&d, "c", &inc2, "uffd");
    // The default (mapped) mode cannot map a chain: it fills it.
    restores(&d, "e", &inc2, "lazy");

    // Squashed: one full image, the same RAM, restorable.
    let squashed = d.path("squashed.snap");
    let o = run_with_timeout(
        snapvmm(&[
            "squash-image",
            inc2.to_str().unwrap(),
            squashed.to_str().unwrap(),
        ]),
        T,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("3 image(s) squashed"), "{}", stdout(&o));
    assert!(livesnap::Image::open(&squashed).unwrap().parent().is_none());
    assert!(chain_ram(&squashed) == chain_ram(&same));
    restores(&d, "f", &squashed, "lazy");

    // A chain whose parent changed is refused, naming it.
    std::fs::rename(&same, &inc1).unwrap();
    let (mut g, mut qg) = start_vm(&d, "g", "1", &["--incoming", "defer"]);
    let r = qg.cmd("migrate-incoming", json!({"uri": uri(&inc2)}));
    let why = r["error"]["desc"].as_str().unwrap_or_default().to_string();
    assert!(
        why.contains("inc1.snap") && why.contains("changed since"),
        "{r}"
    );
    qg.ok("quit", json!({}));
    assert!(g.wait(T).success());
}

#[test]
fn a_fifo_is_refused_wherever_an_image_is_read() {
    let d = TempDir::new("fifo");
    let fifo = d.path("image.fifo");
    let st = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(st.success());
    let f = fifo.to_str().unwrap();
    // The command line: squash-image and --incoming end at once, saying why.
    let out = d.path("out.snap");
    let o = run_with_timeout(snapvmm(&["squash-image", f, out.to_str().unwrap()]), T);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("not a regular file (a FIFO)"),
        "{}",
        stderr(&o)
    );
    let o = run_with_timeout(snapvmm(&["run", "--incoming", &uri(&fifo)]), T);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("not a regular file (a FIFO)"),
        "{}",
        stderr(&o)
    );
    // QMP: a FIFO as the parent of an incremental snapshot, or as the image
    // of migrate-incoming, gets an answer; a second client is answered too.
    let (_a, mut qa) = start_vm(
        &d,
        "a",
        "1",
        &["--mem", "64M", "--cmdline", "workload=memwrite region=8M"],
    );
    qa.ok(
        "migrate-set-parameters",
        json!({"x-snapshot-method": "uffd", "x-parent": uri(&fifo)}),
    );
    qa.ok(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "background-snapshot", "state": true}]}),
    );
    let r = qa.cmd("migrate", json!({"uri": uri(&d.path("inc.snap"))}));
    let m = qa.wait_migration(T);
    let why = r["error"]["desc"]
        .as_str()
        .or(m["error-desc"].as_str())
        .unwrap_or_default()
        .to_string();
    assert!(why.contains("not a regular file (a FIFO)"), "{r} {m}");
    let mut second = Qmp::connect(&d.path("a.sock"));
    assert_eq!(second.ok("query-status", json!({}))["status"], "running");
    let (_b, mut qb) = start_vm(&d, "b", "1", &["--incoming", "defer"]);
    let r = qb.cmd("migrate-incoming", json!({"uri": uri(&fifo)}));
    assert!(
        r["error"]["desc"]
            .as_str()
            .is_some_and(|e| e.contains("not a regular file (a FIFO)")),
        "{r}"
    );
    qa.ok("quit", json!({}));
}
