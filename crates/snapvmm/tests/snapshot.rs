//! Live snapshots end to end: a memwrite guest is snapshotted while it writes,
//! keeps running, and the image restores in a new process where the guest goes
//! on with no CORRUPT line (its own check that registers and RAM agree).

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

fn snapshot_and_restore(cpus: &str, method: &str) {
    snapshot_and_restore_as(cpus, method, "lazy");
}

fn snapshot_and_restore_as(cpus: &str, method: &str, restore: &str) {
    let d = TempDir::new("live");
    let image = d.path("vm.snap");
    let (a, mut qa) = start_vm(
        &d,
        "a",
        cpus,
        &["--mem", "256M", "--cmdline", "workload=memwrite region=64M"],
    );
    a.wait_line("refguest: cpu=0 t=", T);
    // A random moment within the next half second.
    let jitter = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_micros()
        % 500_000;
    std::thread::sleep(Duration::from_micros(jitter as u64));
    qa.ok(
        "migrate-set-parameters",
        json!({"x-snapshot-method": method}),
    );
    let m = live_snapshot(&mut qa, &image);
    assert_eq!(m["status"], "completed", "{m}");
    assert_eq!(m["x-snapshot-method"], method, "{m}");
    if method == "uffd" {
        // Every 2 MiB chunk of RAM copied exactly once, by a fault or by the writer.
        let wp = &m["x-write-protect"];
        let chunks: u64 = ["chunks-by-fault", "chunks-by-writer"]
            .iter()
            .map(|k| wp[*k].as_u64().unwrap())
            .sum();
        assert_eq!(chunks, (256u64 << 20) / (2 << 20), "{m}");
        assert!(
            wp["faults"].as_u64().unwrap() > 0,
            "the guest wrote during the copy: {m}"
        );
    }
    assert_eq!(m["ram"]["total"], 256u64 << 20);
    assert!(m["x-downtime-us"].as_u64().unwrap() > 0);
    // The source VM kept running throughout and still runs.
    assert_eq!(qa.ok("query-status", json!({}))["status"], "running");
    let names = qa.event_names();
    assert!(
        names.iter().all(|n| n != "STOP"),
        "a live snapshot must not stop the VM: {names:?}"
    );
    let statuses: Vec<_> = qa
        .events
        .iter()
        .filter(|e| e["event"] == "MIGRATION")
        .map(|e| e["data"]["status"].clone())
        .collect();
    assert_eq!(
        statuses,
        vec![json!("setup"), json!("active"), json!("completed")]
    );
    a.wait_line("refguest: cpu=0 t=", T);

    // Restore in a new process: the guest continues where it was and finds no corruption.
    let (b, mut qb) = start_vm(
        &d,
        "b",
        cpus,
        &[
            "--incoming",
            &format!("file:{}", image.display()),
            "--restore-mode",
            restore,
        ],
    );
    assert_eq!(wait_settled(&mut qb), "running");
    let ncpus = cpus.parse::<usize>().unwrap();
    goes_on_without_corruption(&b, ncpus);
    if restore == "uffd" {
        // RAM was filled while the guest ran; the restored VM snapshots like a
        // booted one (the capture waits for the fill if it is not done), and
        // that snapshot restores too.
        let image2 = d.path("again.snap");
        qb.ok(
            "migrate-set-parameters",
            json!({"x-snapshot-method": method}),
        );
        let m = live_snapshot(&mut qb, &image2);
        assert_eq!(m["status"], "completed", "{m}");
        let fill = &m["x-restore-fill"];
        let chunks = fill["chunks-by-fault"].as_u64().unwrap()
            + fill["chunks-by-prefetch"].as_u64().unwrap();
        assert!(chunks > 0 && chunks <= 128, "{m}");
        assert!(
            fill["bytes-read"].as_u64().unwrap() >= 64 << 20,
            "the guest's data was read from the image: {m}"
        );
        goes_on_without_corruption(&b, ncpus);
        let (c, mut qc) = start_vm(
            &d,
            "c",
            cpus,
            &["--incoming", &format!("file:{}", image2.display())],
        );
        assert_eq!(wait_settled(&mut qc), "running");
        goes_on_without_corruption(&c, ncpus);
        qc.ok("quit", json!({}));
    }
    qb.ok("quit", json!({}));
    qa.ok("quit", json!({}));
}

#[test]
fn live_snapshot_one_vcpu_restores_without_corruption() {
    snapshot_and_restore("1", "fork");
}

#[test]
fn live_snapshot_two_vcpus_restores_without_corruption() {
    snapshot_and_restore("2", "fork");
}

#[test]
fn write_protect_snapshot_two_vcpus_restores_without_corruption() {
    snapshot_and_restore("2", "uffd");
}

#[test]
fn restore_by_fill_then_snapshot_again_write_protect() {
    snapshot_and_restore_as("2", "uffd", "uffd");
}

#[test]
fn restore_by_fill_then_snapshot_again_fork() {
    snapshot_and_restore_as("1", "fork", "uffd");
}

#[test]
fn unusable_destination_fails_and_the_vm_keeps_running() {
    let d = TempDir::new("baddest");
    let (_a, mut q) = start_vm(
        &d,
        "a",
        "1",
        &["--mem", "128M", "--cmdline", "workload=memwrite region=32M"],
    );
    assert_eq!(wait_settled(&mut q), "running");
    q.ok(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "background-snapshot", "state": true}]}),
    );
    let r = q.cmd("migrate", json!({"uri": "file:/nonexistent-dir/vm.snap"}));
    assert_eq!(r["error"]["class"], "GenericError", "{r}");
    let m = q.ok("query-migrate", json!({}));
    assert_eq!(m["status"], "failed", "{m}");
    assert_eq!(q.ok("query-status", json!({}))["status"], "running");
    assert!(!std::path::Path::new("/nonexistent-dir").exists());
    // Nobody listens on port 1: the job fails at once, the VM runs on.
    let r = q.cmd("migrate", json!({"uri": "tcp:127.0.0.1:1"}));
    assert_eq!(r["error"]["class"], "GenericError", "nobody listening: {r}");
    assert_eq!(q.ok("query-status", json!({}))["status"], "running");
    q.ok("quit", json!({}));
}

#[test]
fn ten_snapshots_in_a_row_then_restore_the_last() {
    let d = TempDir::new("ten");
    let image = d.path("vm.snap");
    let (a, mut q) = start_vm(
        &d,
        "a",
        "1",
        &["--mem", "128M", "--cmdline", "workload=memwrite region=32M"],
    );
    a.wait_line("refguest: cpu=0 t=", T);
    for i in 0..10 {
        let m = live_snapshot(&mut q, &image);
        assert_eq!(m["status"], "completed", "snapshot {i}: {m}");
    }
    assert_eq!(q.ok("query-status", json!({}))["status"], "running");
    let leftovers: Vec<_> = std::fs::read_dir(&d.0)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    q.ok("quit", json!({}));
    let (b, mut qb) = start_vm(
        &d,
        "b",
        "1",
        &["--incoming", &format!("file:{}", image.display())],
    );
    assert_eq!(wait_settled(&mut qb), "running");
    for _ in 0..2 {
        let l = b.wait_line(" t=", T);
        assert!(!l.contains("CORRUPT"), "{l}");
    }
    qb.ok("quit", json!({}));
}
