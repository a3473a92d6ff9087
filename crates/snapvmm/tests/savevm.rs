//! savevm into qcow2 disks, end to end: the reference guest writes its disk
//! (diskwrite: every block carries a sequence number the guest also keeps in
//! RAM) and its memory (memwrite) while snapshot-save runs; snapshot-load and
//! --loadvm must bring back RAM and disk of the same instant, or the guest
//! prints CORRUPT. `qemu-img` checks every image we write.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// Ends the test (as skipped, saying so) on a host without qemu-img.
macro_rules! needs_qemu_img {
    () => {
        if !have_qemu_img() {
            eprintln!("skipped: qemu-img not found");
            return;
        }
    };
}

fn have_qemu_img() -> bool {
    Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn qcow2(d: &TempDir, name: &str, size: &str) -> PathBuf {
    let p = d.path(name);
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&p)
        .arg(size)
        .status()
        .unwrap();
    assert!(st.success());
    p
}

/// `qemu-img check`: 0 clean, 3 leaks only (never 2: corruption).
fn check(p: &Path) -> i32 {
    let o = Command::new("qemu-img")
        .arg("check")
        .arg(p)
        .output()
        .unwrap();
    let code = o.status.code().unwrap();
    assert!(
        code == 0 || code == 3,
        "qemu-img check {}: {}",
        p.display(),
        String::from_utf8_lossy(&o.stdout)
    );
    code
}

fn qemu_img_snapshots(p: &Path) -> Vec<(String, u64)> {
    let o = Command::new("qemu-img")
        .args(["info", "--force-share", "--output=json"])
        .arg(p)
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    v["snapshots"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|s| {
                    (
                        s["name"].as_str().unwrap().to_string(),
                        s["vm-state-size"].as_u64().unwrap(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The VM clock (ns) qemu-img reports for snapshot `tag`.
fn vm_clock_ns(p: &Path, tag: &str) -> u64 {
    let o = Command::new("qemu-img")
        .args(["info", "--force-share", "--output=json"])
        .arg(p)
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    let s = v["snapshots"]
        .as_array()
        .and_then(|a| a.iter().find(|s| s["name"] == tag))
        .unwrap_or_else(|| panic!("no snapshot {tag}: {v}"))
        .clone();
    s["vm-clock-sec"].as_u64().unwrap() * 1_000_000_000 + s["vm-clock-nsec"].as_u64().unwrap()
}

const GUEST: &str = "workload=diskwrite disk_region=8M region=32M";

fn start(d: &TempDir, name: &str, disk: &Path, extra: &[&str]) -> (Running, Qmp) {
    let disk_arg = disk.display().to_string();
    let mut args = vec!["--mem", "128M", "--disk", &disk_arg, "--cmdline", GUEST];
    args.extend_from_slice(extra);
    start_vm(d, name, "2", &args)
}

/// Runs a job to its end; returns its query-jobs entry (dismissed afterwards).
fn run_job(q: &mut Qmp, cmd: &str, args: Value) -> Value {
    let id = args["job-id"].as_str().unwrap().to_string();
    q.ok(cmd, args);
    let end = Instant::now() + T;
    loop {
        let jobs = q.ok("query-jobs", json!({}));
        let j = jobs
            .as_array()
            .unwrap()
            .iter()
            .find(|j| j["id"] == id.as_str())
            .cloned()
            .expect("job listed");
        if j["status"] == "concluded" {
            assert_eq!(q.ok("job-dismiss", json!({"id": id})), json!({}));
            return j;
        }
        assert!(Instant::now() < end, "job {id} stuck: {j}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn job_statuses(q: &Qmp, id: &str) -> Vec<String> {
    q.events
        .iter()
        .filter(|e| e["event"] == "JOB_STATUS_CHANGE" && e["data"]["id"] == id)
        .map(|e| e["data"]["status"].as_str().unwrap().to_string())
        .collect()
}

/// The guest reports a few times with no CORRUPT, on the disk and in memory.
fn guest_consistent(r: &Running, reports: usize) {
    let mut disk = 0;
    let mut mem = 0;
    let end = Instant::now() + T;
    while disk < reports || mem < reports {
        let l = r.wait_line("refguest:", T);
        assert!(
            !l.contains("CORRUPT") && !l.contains("FAULT") && !l.contains("DISKERROR"),
            "{l}"
        );
        disk += usize::from(l.contains(" disk t="));
        mem += usize::from(l.contains(" cpu=1 t="));
        assert!(Instant::now() < end);
    }
}

/// 1 GiB guest, most of it written, plus its disk: a save takes a moment.
fn big_vm(d: &TempDir, disk: &Path) -> (Running, Qmp) {
    let (a, q) = start_vm(
        d,
        "a",
        "2",
        &[
            "--mem",
            "1G",
            "--disk",
            &disk.display().to_string(),
            "--cmdline",
            "workload=diskwrite disk_region=8M region=768M",
        ],
    );
    a.wait_line(" cpu=1 t=", T);
    (a, q)
}

fn save(q: &mut Qmp, id: &str, tag: &str) -> Value {
    run_job(
        q,
        "snapshot-save",
        json!({"job-id": id, "tag": tag, "vmstate": "disk0", "devices": ["disk0"]}),
    )
}

#[test]
fn snapshot_save_is_live_and_load_brings_back_ram_and_disk_together() {
    needs_qemu_img!();
    let d = TempDir::new("savevm");
    let disk = qcow2(&d, "disk.qcow2", "64M");
    let (mut a, mut q) = start(&d, "a", &disk, &[]);
    a.wait_line(" disk t=", T);
    // A random moment.
    std::thread::sleep(Duration::from_millis(u64::from(std::process::id()) % 700));
    let j = save(&mut q, "save1", "first");
    assert!(j.get("error").is_none(), "{j}");
    assert_eq!(j["type"], "snapshot-save");
    assert_eq!(
        job_statuses(&q, "save1"),
        [
            "created",
            "running",
            "waiting",
            "pending",
            "concluded",
            "null"
        ]
    );
    assert!(j["x-pause-us"].as_u64().unwrap() > 0);
    // Live: the VM never stopped.
    assert!(!q.event_names().iter().any(|e| e == "STOP"));
    assert_eq!(q.ok("query-status", json!({}))["status"], "running");
    let snaps = qemu_img_snapshots(&disk);
    assert_eq!(snaps.len(), 1);
    assert_eq!(snaps[0].0, "first");
    assert_eq!(snaps[0].1, j["x-vmstate-bytes"].as_u64().unwrap());
    assert!(snaps[0].1 > 32 << 20, "the VM state holds the guest's RAM");
    // The guest goes on writing (its disk now copies-on-write), then goes back.
    guest_consistent(&a, 2);
    let j = run_job(
        &mut q,
        "snapshot-load",
        json!({"job-id": "load1", "tag": "first", "vmstate": "disk0", "devices": ["disk0"]}),
    );
    assert!(j.get("error").is_none(), "{j}");
    assert_eq!(q.ok("query-status", json!({}))["status"], "running");
    guest_consistent(&a, 3);
    // HMP forms.
    let hmp = |q: &mut Qmp, line: &str| -> String {
        q.ok("human-monitor-command", json!({"command-line": line}))
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(hmp(&mut q, "savevm second"), "");
    let list = hmp(&mut q, "info snapshots");
    assert!(list.contains("first") && list.contains("second"), "{list}");
    guest_consistent(&a, 1);
    assert_eq!(hmp(&mut q, "loadvm second"), "");
    guest_consistent(&a, 2);
    assert_eq!(hmp(&mut q, "delvm second"), "");
    assert!(hmp(&mut q, "loadvm second").starts_with("Error: "));
    q.ok("quit", json!({}));
    // Let it exit by itself (dropping `a` would SIGKILL it, which may leak clusters).
    assert!(a.wait(T).success());
    drop(a);
    assert_eq!(check(&disk), 0, "no leaks after a clean run");
    assert_eq!(qemu_img_snapshots(&disk).len(), 1);

    // A new process starts from the snapshot.
    let (b, mut qb) = start(&d, "b", &disk, &["--loadvm", "first"]);
    assert_eq!(wait_settled(&mut qb), "running");
    guest_consistent(&b, 3);
    // The VM clock goes on from the loaded snapshot's (as after snapshot-load), not from 0.
    save(&mut qb, "s2", "second");
    qb.ok("quit", json!({}));
    drop(b);
    check(&disk);
    let (first, second) = (vm_clock_ns(&disk, "first"), vm_clock_ns(&disk, "second"));
    assert!(
        second > first + 1_000_000_000,
        "VM clock of a snapshot taken 3 s after --loadvm: {second} ns, the loaded one had {first} ns"
    );
}

#[test]
fn write_protect_savevm_is_live_and_loads_back() {
    needs_qemu_img!();
    let d = TempDir::new("savevm-wp");
    let disk = qcow2(&d, "disk.qcow2", "64M");
    let (mut a, mut q) = start(&d, "a", &disk, &[]);
    q.ok(
        "migrate-set-parameters",
        json!({"x-snapshot-method": "uffd"}),
    );
    a.wait_line(" disk t=", T);
    std::thread::sleep(Duration::from_millis(u64::from(std::process::id()) % 700));
    let j = save(&mut q, "save1", "first");
    assert!(j.get("error").is_none(), "{j}");
    assert!(!q.event_names().iter().any(|e| e == "STOP"), "live");
    assert_eq!(q.ok("query-status", json!({}))["status"], "running");
    guest_consistent(&a, 2);
    let j = run_job(
        &mut q,
        "snapshot-load",
        json!({"job-id": "load1", "tag": "first", "vmstate": "disk0", "devices": ["disk0"]}),
    );
    assert!(j.get("error").is_none(), "{j}");
    guest_consistent(&a, 2);
    // The loaded machine has new RAM: a second save registers it again.
    let j = save(&mut q, "save2", "second");
    assert!(j.get("error").is_none(), "{j}");
    guest_consistent(&a, 1);
    q.ok("quit", json!({}));
    assert!(a.wait(T).success());
    drop(a);
    assert_eq!(check(&disk), 0, "no leaks after a clean run");
    for tag in ["first", "second"] {
        let (b, mut qb) = start(&d, "b", &disk, &["--loadvm", tag]);
        assert_eq!(wait_settled(&mut qb), "running");
        guest_consistent(&b, 2);
        qb.ok("quit", json!({}));
    }
}

#[test]
fn bad_snapshot_requests_fail_the_job_and_change_nothing() {
    needs_qemu_img!();
    let d = TempDir::new("savevm-bad");
    let disk = qcow2(&d, "disk.qcow2", "32M");
    let raw = d.path("raw.img");
    std::fs::write(&raw, vec![0u8; 4 << 20]).unwrap();
    let raw_arg = format!("{},id=scratch", raw.display());
    let (mut a, mut q) = start(&d, "a", &disk, &["--disk", &raw_arg]);
    a.wait_line(" disk t=", T);
    assert_eq!(save(&mut q, "ok", "t1").get("error"), None);
    let cases = [
        (
            json!({"job-id": "j1", "tag": "t2", "vmstate": "disk0", "devices": ["nope"]}),
            "No block device node 'nope'",
        ),
        (
            json!({"job-id": "j2", "tag": "t2", "vmstate": "disk0", "devices": ["disk0", "scratch"]}),
            "does not support snapshots",
        ),
        (
            json!({"job-id": "j3", "tag": "t2", "vmstate": "scratch", "devices": ["disk0"]}),
            "vmstate block device 'scratch'",
        ),
        (
            json!({"job-id": "j4", "tag": "t1", "vmstate": "disk0", "devices": ["disk0"]}),
            "already exists",
        ),
    ];
    for (args, why) in cases {
        let j = run_job(&mut q, "snapshot-save", args.clone());
        let err = j["error"].as_str().unwrap_or_default();
        assert!(err.contains(why), "{args}: {j}");
    }
    let j = run_job(
        &mut q,
        "snapshot-load",
        json!({"job-id": "l", "tag": "missing", "vmstate": "disk0", "devices": ["disk0"]}),
    );
    assert!(
        j["error"].as_str().unwrap().contains("does not exist"),
        "{j}"
    );
    let j = run_job(
        &mut q,
        "snapshot-delete",
        json!({"job-id": "x", "tag": "missing", "devices": ["disk0"]}),
    );
    assert!(j.get("error").is_some(), "{j}");
    // Job ids: reused, malformed; unknown jobs.
    let r = q.cmd("job-dismiss", json!({"id": "nope"}));
    assert!(r.get("error").is_some(), "{r}");
    let r = q.cmd(
        "snapshot-save",
        json!({"job-id": "1bad", "tag": "t", "vmstate": "disk0", "devices": ["disk0"]}),
    );
    assert!(r["error"]["desc"]
        .as_str()
        .unwrap()
        .contains("Invalid job ID"));
    // Nothing changed, the VM runs.
    let snaps = qemu_img_snapshots(&disk);
    assert_eq!(snaps.len(), 1, "{snaps:?}");
    assert_eq!(q.ok("query-status", json!({}))["status"], "running");
    guest_consistent(&a, 1);
    q.ok("quit", json!({}));
    // Let it exit by itself (dropping `a` would SIGKILL it, which may leak clusters).
    assert!(a.wait(T).success());
    drop(a);
    assert_eq!(check(&disk), 0);
}

#[test]
fn killed_in_the_middle_of_a_save_the_image_stays_usable() {
    needs_qemu_img!();
    let d = TempDir::new("savevm-kill");
    let disk = qcow2(&d, "disk.qcow2", "64M");
    let (a, mut q) = big_vm(&d, &disk);
    assert_eq!(save(&mut q, "s1", "good").get("error"), None);
    // Start a second save and kill snapvmm while it streams its VM state.
    q.ok(
        "snapshot-save",
        json!({"job-id": "s2", "tag": "doomed", "vmstate": "disk0", "devices": ["disk0"]}),
    );
    std::thread::sleep(Duration::from_millis(150));
    a.signal("KILL");
    drop(a);
    check(&disk);
    let names: Vec<_> = qemu_img_snapshots(&disk).into_iter().map(|s| s.0).collect();
    assert!(names.contains(&"good".to_string()), "{names:?}");
    // The completed snapshot still loads (into a machine of its size: 1 GiB).
    let disk_arg = disk.display().to_string();
    let (b, mut qb) = start_vm(
        &d,
        "b",
        "2",
        &["--mem", "1G", "--disk", &disk_arg, "--loadvm", "good"],
    );
    assert_eq!(wait_settled(&mut qb), "running");
    guest_consistent(&b, 2);
    qb.ok("quit", json!({}));
    // Let it exit by itself: dropping `b` would SIGKILL it, and a kill in the
    // middle of one of the guest's disk writes leaks clusters of its own.
    let mut b = b;
    assert!(b.wait(T).success());
    drop(b);
    // Opening it again reclaimed what the killed save had taken (the dirty bit
    // told it to): nothing leaks, however many saves are killed.
    assert_eq!(check(&disk), 0, "leaks reclaimed by the next open");
}

/// A memory figure of a process from /proc/PID/status (`VmHWM:`, the peak
/// resident memory; `VmRSS:`, the current one), in bytes.
fn status_bytes(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb << 10
}

fn peak_rss(pid: u32) -> u64 {
    status_bytes(pid, "VmHWM:")
}

#[test]
fn loadvm_streams_the_vm_state_instead_of_buffering_it() {
    needs_qemu_img!();
    let d = TempDir::new("savevm-peak");
    let disk = qcow2(&d, "disk.qcow2", "64M");
    let disk_arg = disk.display().to_string();
    let args = |extra: &'static [&'static str]| {
        let mut v = vec![
            "--mem",
            "256M",
            "--disk",
            disk_arg.as_str(),
            "--cmdline",
            "workload=diskwrite disk_region=8M region=192M",
        ];
        v.extend_from_slice(extra);
        v
    };
    let (a, mut q) = start_vm(&d, "a", "2", &args(&[]));
    a.wait_line(" disk t=", T);
    assert_eq!(save(&mut q, "s", "big").get("error"), None);
    q.ok("quit", json!({}));
    drop(a);
    let (b, mut qb) = start_vm(&d, "b", "2", &args(&["--loadvm", "big"]));
    assert_eq!(wait_settled(&mut qb), "running");
    guest_consistent(&b, 1);
    let peak = peak_rss(b.child.id());
    qb.ok("quit", json!({}));
    // Guest RAM (256 MiB, of which the guest wrote ~200) and a small constant; the
    // VM state read whole into a buffer first would add its 256 MiB.
    assert!(
        peak < (256 + 64) << 20,
        "peak resident memory of --loadvm: {} MiB",
        peak >> 20
    );
}

#[test]
fn no_space_for_the_vm_state_fails_the_job_and_keeps_everything() {
    needs_qemu_img!();
    let d = TempDir::new("savevm-full");
    let mnt = d.path("small");
    std::fs::create_dir_all(&mnt).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=72m", "tmpfs"])
        .arg(&mnt)
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("skipped: cannot mount a tmpfs here");
        return;
    }
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _u = Unmount(mnt.clone());
    let disk = mnt.join("disk.qcow2");
    assert!(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&disk)
        .arg("32M")
        .status()
        .unwrap()
        .success());
    // 256 MiB of RAM, most of it written: the VM state cannot fit in 72 MiB. (The
    // guest does not write its disk here: during a live save its writes need
    // space too, and on a full file system they would fail like any write.)
    let (mut a, mut q) = start_vm(
        &d,
        "a",
        "2",
        &[
            "--mem",
            "256M",
            "--disk",
            &disk.display().to_string(),
            "--cmdline",
            "workload=memwrite region=200M",
        ],
    );
    a.wait_line(" cpu=1 t=", T);
    let j = save(&mut q, "big", "big");
    let err = j["error"].as_str().unwrap_or_default().to_string();
    assert!(err.contains("No space left"), "{j}");
    assert!(qemu_img_snapshots(&disk).is_empty(), "nothing visible");
    assert_eq!(q.ok("query-status", json!({}))["status"], "running");
    for _ in 0..4 {
        let l = a.wait_line(" t=", T);
        assert!(!l.contains("CORRUPT"), "{l}");
    }
    // The space came back: a smaller save (after a reset to a fresh guest) fits.
    q.ok("quit", json!({}));
    // Let it exit by itself (dropping `a` would SIGKILL it, which may leak clusters).
    assert!(a.wait(T).success());
    drop(a);
    assert_eq!(check(&disk), 0, "the aborted save left nothing behind");
    assert!(qemu_img_snapshots(&disk).is_empty());
}

#[test]
fn quit_during_a_save_leaves_the_disk_as_it_was() {
    needs_qemu_img!();
    let d = TempDir::new("savevm-quit");
    let disk = qcow2(&d, "disk.qcow2", "64M");
    let (mut a, mut q) = big_vm(&d, &disk);
    q.ok(
        "snapshot-save",
        json!({"job-id": "s", "tag": "cut-short", "vmstate": "disk0", "devices": ["disk0"]}),
    );
    q.ok("quit", json!({}));
    assert!(a.wait(T).success());
    drop(a);
    let snaps = qemu_img_snapshots(&disk);
    if snaps.is_empty() {
        assert_eq!(check(&disk), 0, "the cancelled save left no leaks");
    } else {
        // The save won the race: it is complete.
        assert_eq!(snaps[0].0, "cut-short");
        assert_eq!(check(&disk), 0);
    }
}

#[test]
fn job_cancel_stops_a_save_and_nothing_becomes_visible() {
    needs_qemu_img!();
    let d = TempDir::new("savevm-cancel");
    let disk = qcow2(&d, "disk.qcow2", "64M");
    let (mut a, mut q) = big_vm(&d, &disk);
    q.ok(
        "snapshot-save",
        json!({"job-id": "s", "tag": "cancelled", "vmstate": "disk0", "devices": ["disk0"]}),
    );
    let r = q.cmd("job-cancel", json!({"id": "s"}));
    let end = Instant::now() + T;
    let job = loop {
        let jobs = q.ok("query-jobs", json!({}));
        let j = jobs[0].clone();
        if j["status"] == "concluded" {
            break j;
        }
        assert!(Instant::now() < end, "{j}");
        std::thread::sleep(Duration::from_millis(20));
    };
    q.ok("job-dismiss", json!({"id": "s"}));
    let r2 = q.cmd("job-cancel", json!({"id": "s"}));
    assert!(r2.get("error").is_some(), "no such job any more: {r2}");
    if r.get("error").is_none() && job.get("error").is_some() {
        assert!(job["error"].as_str().unwrap().contains("canceled"), "{job}");
        assert!(qemu_img_snapshots(&disk).is_empty(), "nothing visible");
        assert!(
            job_statuses(&q, "s").contains(&"aborting".to_string()),
            "{:?}",
            job_statuses(&q, "s")
        );
    } else {
        eprintln!("the save finished before the cancel: {r} {job}");
    }
    assert_eq!(q.ok("query-status", json!({}))["status"], "running");
    guest_consistent(&a, 2);
    q.ok("quit", json!({}));
    assert!(a.wait(T).success());
    drop(a);
    assert_eq!(check(&disk), 0);
}

#[test]
fn a_load_that_cannot_apply_is_refused_and_the_vm_keeps_running() {
    needs_qemu_img!();
    let d = TempDir::new("savevm-ro");
    let disk = qcow2(&d, "disk.qcow2", "32M");
    let (mut a, mut q) = start(&d, "a", &disk, &[]);
    a.wait_line(" disk t=", T);
    assert_eq!(save(&mut q, "s", "t").get("error"), None);
    q.ok("quit", json!({}));
    assert!(a.wait(T).success());
    drop(a);
    // The same image attached read-only: its snapshot cannot be applied.
    let ro = format!("{},readonly=on", disk.display());
    let (b, mut qb) = start_vm(
        &d,
        "b",
        "1",
        &[
            "--mem",
            "128M",
            "--disk",
            &ro,
            "--cmdline",
            "workload=memwrite region=32M",
        ],
    );
    b.wait_line(" t=", T);
    let j = run_job(
        &mut qb,
        "snapshot-load",
        json!({"job-id": "l", "tag": "t", "vmstate": "disk0", "devices": ["disk0"]}),
    );
    assert!(
        j["error"].as_str().unwrap_or("").contains("read-only"),
        "{j}"
    );
    let hmp = qb
        .ok("human-monitor-command", json!({"command-line": "loadvm t"}))
        .as_str()
        .unwrap()
        .to_string();
    assert!(hmp.starts_with("Error: "), "{hmp}");
    assert_eq!(qb.ok("query-status", json!({}))["status"], "running");
    for _ in 0..2 {
        let l = b.wait_line(" t=", T);
        assert!(!l.contains("CORRUPT"), "{l}");
    }
    qb.ok("quit", json!({}));
}

/// `snapshot-load` never holds the old RAM and the loaded RAM at once: the
/// process's peak resident memory during the load stays within a small
/// constant of what it held before (a second copy of the guest's ~200 MiB
/// would show), and the loaded guest runs on consistently.
#[test]
fn snapshot_load_holds_one_copy_of_guest_ram() {
    needs_qemu_img!();
    let d = TempDir::new("load-peak");
    let disk = qcow2(&d, "disk.qcow2", "64M");
    let (a, mut q) = start_vm(
        &d,
        "a",
        "2",
        &[
            "--mem",
            "256M",
            "--disk",
            &disk.display().to_string(),
            "--cmdline",
            "workload=diskwrite disk_region=8M region=192M",
        ],
    );
    a.wait_line(" cpu=1 t=", T);
    assert_eq!(save(&mut q, "s", "t").get("error"), None);
    guest_consistent(&a, 1);
    let pid = a.child.id();
    // Peak resident memory from now on ("5": reset VmHWM to VmRSS).
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").unwrap();
    let before = status_bytes(pid, "VmRSS:");
    let j = run_job(
        &mut q,
        "snapshot-load",
        json!({"job-id": "l", "tag": "t", "vmstate": "disk0", "devices": ["disk0"]}),
    );
    assert_eq!(j.get("error"), None, "{j}");
    let peak = peak_rss(pid);
    guest_consistent(&a, 2);
    q.ok("quit", json!({}));
    assert!(
        peak < before + (48 << 20),
        "snapshot-load peaked at {} MiB resident, {} MiB before it",
        peak >> 20,
        before >> 20
    );
}
