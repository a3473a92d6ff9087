//! The live snapshot's edges: what happens around, during and after one —
//! a restored VM snapshotted again, a second `migrate` while one runs,
//! cancel, the capture child killed, a full disk, paused restore, bad images,
//! and the image's content at the pause instant.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

fn enable_background(q: &mut Qmp) {
    q.ok(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "background-snapshot", "state": true}, {"capability": "events", "state": true}]}),
    );
}

fn file_uri(p: &Path) -> serde_json::Value {
    json!({ "uri": format!("file:{}", p.display()) })
}

fn entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with(".sock"))
        .collect()
}

/// The guest still prints reports: it runs.
fn assert_guest_runs(r: &Running) {
    for _ in 0..2 {
        let l = r.wait_line(" t=", T);
        assert!(!l.contains("CORRUPT"), "{l}");
    }
}

/// Pids of the processes `pid` forked (any of its threads).
fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let p = t.path().join("children");
        if let Ok(s) = std::fs::read_to_string(p) {
            out.extend(s.split_whitespace().filter_map(|x| x.parse::<u32>().ok()));
        }
    }
    out
}

/// A guest with enough RAM in use that a capture takes a moment.
fn big_vm(d: &TempDir, name: &str) -> (Running, Qmp) {
    let (r, q) = start_vm(
        d,
        name,
        "1",
        &["--mem", "1G", "--cmdline", "workload=memwrite region=900M"],
    );
    // First report: every page of the region has been touched once.
    r.wait_line("refguest: cpu=0 t=", T);
    (r, q)
}

#[test]
fn a_restored_vm_can_be_snapshotted_again() {
    let d = TempDir::new("again");
    let (first, second) = (d.path("first.snap"), d.path("second.snap"));
    let (a, mut qa) = start_vm(
        &d,
        "a",
        "2",
        &["--mem", "256M", "--cmdline", "workload=memwrite region=96M"],
    );
    a.wait_line("refguest: cpu=1 t=", T);
    assert_eq!(live_snapshot(&mut qa, &first)["status"], "completed");
    qa.ok("quit", json!({}));

    let incoming = format!("file:{}", first.display());
    let (b, mut qb) = start_vm(&d, "b", "2", &["--incoming", &incoming]);
    assert_eq!(wait_settled(&mut qb), "running");
    assert_guest_runs(&b);
    assert_eq!(live_snapshot(&mut qb, &second)["status"], "completed");
    assert_guest_runs(&b);
    qb.ok("quit", json!({}));

    // Restoring the same image again still works, and so does the second-generation one.
    for img in [&first, &second, &first] {
        let incoming = format!("file:{}", img.display());
        let (c, mut qc) = start_vm(&d, "c", "2", &["--incoming", &incoming]);
        assert_eq!(wait_settled(&mut qc), "running");
        assert_guest_runs(&c);
        qc.ok("quit", json!({}));
    }
}

#[test]
fn a_second_migrate_is_refused_while_one_runs() {
    let d = TempDir::new("busy");
    let (a, mut q) = big_vm(&d, "a");
    enable_background(&mut q);
    q.ok("migrate", file_uri(&d.path("one.snap")));
    let r = q.cmd("migrate", file_uri(&d.path("two.snap")));
    let m = q.ok("query-migrate", json!({}));
    eprintln!("second migrate: {r}, first: {}", m["status"]);
    if m["status"] == "active" || r.get("error").is_some() {
        assert_eq!(r["error"]["class"], "GenericError", "{r}");
        assert!(
            r["error"]["desc"].as_str().unwrap().contains("in progress"),
            "{r}"
        );
    }
    // Settings cannot change under a running job either.
    if q.ok("query-migrate", json!({}))["status"] == "active" {
        let r = q.cmd(
            "migrate-set-parameters",
            json!({"x-snapshot-method": "stop"}),
        );
        assert!(r.get("error").is_some(), "{r}");
    }
    assert_eq!(q.wait_migration(T)["status"], "completed");
    assert!(d.path("one.snap").exists());
    assert!(
        !d.path("two.snap").exists(),
        "the refused migrate wrote nothing"
    );
    assert_guest_runs(&a);
    // Once finished, a new one is accepted.
    q.ok("migrate", file_uri(&d.path("two.snap")));
    assert_eq!(q.wait_migration(T)["status"], "completed");
    q.ok("quit", json!({}));
}

#[test]
fn cancel_removes_the_partial_file_and_the_vm_keeps_running() {
    cancel_removes_the_partial_file("fork");
}

#[test]
fn cancel_of_a_write_protect_capture_removes_the_partial_file() {
    cancel_removes_the_partial_file("uffd");
}

fn cancel_removes_the_partial_file(method: &str) {
    let d = TempDir::new("cancel");
    let (a, mut q) = big_vm(&d, "a");
    enable_background(&mut q);
    q.ok(
        "migrate-set-parameters",
        json!({"x-snapshot-method": method}),
    );
    let image = d.path("vm.snap");
    q.ok("migrate", file_uri(&image));
    q.ok("migrate_cancel", json!({}));
    let m = q.wait_migration(T);
    eprintln!("cancel: {}", m["status"]);
    // A capture may win the race and complete before the cancel arrives; what
    // must never happen is a failure or a half-written file.
    match m["status"].as_str().unwrap() {
        "cancelled" => {
            assert!(!image.exists(), "no image after cancel");
            let names: Vec<_> = q
                .events
                .iter()
                .filter(|e| e["event"] == "MIGRATION")
                .map(|e| e["data"]["status"].as_str().unwrap().to_string())
                .collect();
            assert_eq!(names.last().map(String::as_str), Some("cancelled"));
        }
        "completed" => assert!(image.exists()),
        other => panic!("unexpected status {other}: {m}"),
    }
    assert!(
        entries(&d.0).iter().all(|n| !n.contains(".tmp")),
        "{:?}",
        entries(&d.0)
    );
    assert_eq!(q.ok("query-status", json!({}))["status"], "running");
    assert!(children(a.child.id()).is_empty(), "capture child reaped");
    assert_guest_runs(&a);
    q.ok("quit", json!({}));
}

#[test]
fn killed_capture_child_fails_the_snapshot_and_the_vm_keeps_running() {
    let d = TempDir::new("sigkill");
    let (a, mut q) = big_vm(&d, "a");
    enable_background(&mut q);
    // The capture child exists with the fork capture only.
    q.ok(
        "migrate-set-parameters",
        json!({"x-snapshot-method": "fork"}),
    );
    let image = d.path("vm.snap");
    q.ok("migrate", file_uri(&image));
    let mut killed = false;
    let end = Instant::now() + Duration::from_secs(5);
    while !killed && Instant::now() < end {
        for c in children(a.child.id()) {
            killed |= std::process::Command::new("kill")
                .args(["-9", &c.to_string()])
                .status()
                .unwrap()
                .success();
        }
    }
    let m = q.wait_migration(T);
    eprintln!("after SIGKILL: {m}");
    if m["status"] == "completed" {
        eprintln!("the capture finished before the child could be killed; nothing to check");
    } else {
        assert!(killed);
        assert_eq!(m["status"], "failed", "{m}");
        assert!(
            m["error-desc"].as_str().unwrap_or("").contains("child"),
            "the error names the cause: {m}"
        );
        assert!(!image.exists());
        assert!(entries(&d.0).iter().all(|n| !n.contains(".tmp")));
    }
    assert_eq!(q.ok("query-status", json!({}))["status"], "running");
    assert_guest_runs(&a);
    // And the next snapshot works.
    q.ok("migrate", file_uri(&image));
    assert_eq!(q.wait_migration(T)["status"], "completed");
    q.ok("quit", json!({}));
}

/// A small tmpfs, or None where mounting is not allowed.
struct SmallFs(PathBuf);

impl SmallFs {
    fn mount(dir: PathBuf, size: &str) -> Option<SmallFs> {
        std::fs::create_dir_all(&dir).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(SmallFs(dir))
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn full_disk_fails_the_snapshot_keeps_old_image_and_vm_running() {
    let d = TempDir::new("full");
    let Some(fs) = SmallFs::mount(d.path("small"), "48m") else {
        eprintln!("skipped: cannot mount a tmpfs here");
        return;
    };
    let (a, mut q) = start_vm(
        &d,
        "a",
        "1",
        &[
            "--mem",
            "256M",
            "--cmdline",
            "workload=memwrite region=128M",
        ],
    );
    a.wait_line("refguest: cpu=0 t=", T);
    // An earlier snapshot under the same name must survive the failed one.
    let image = fs.0.join("vm.snap");
    std::fs::write(&image, b"previous image").unwrap();
    for method in ["fork", "stop", "uffd"] {
        enable_background(&mut q);
        q.ok(
            "migrate-set-parameters",
            json!({"x-snapshot-method": method}),
        );
        let r = q.cmd("migrate", file_uri(&image));
        let m = q.wait_migration(T);
        assert_eq!(m["status"], "failed", "{method}: {r} {m}");
        let why = m["error-desc"].as_str().unwrap_or("");
        assert!(why.contains("No space left"), "{method}: {m}");
        assert_eq!(std::fs::read(&image).unwrap(), b"previous image");
        assert!(
            entries(&fs.0).iter().all(|n| !n.contains(".tmp")),
            "{:?}",
            entries(&fs.0)
        );
        assert_eq!(
            q.ok("query-status", json!({}))["status"],
            "running",
            "{method}"
        );
        assert_guest_runs(&a);
    }
    q.ok("quit", json!({}));
}

/// The RAM of two images, range by range.
fn ram_of(p: &Path) -> Vec<Vec<u8>> {
    let img = livesnap::Image::open(p).unwrap();
    (0..img.ranges().len())
        .map(|i| {
            let mut v = vec![0u8; img.ranges()[i].len as usize];
            img.read_ram_into(i, &mut v).unwrap();
            v
        })
        .collect()
}

#[test]
fn fork_image_is_ram_at_the_pause_instant_even_while_the_guest_writes() {
    live_image_is_ram_at_the_pause_instant("fork");
}

#[test]
fn write_protect_image_is_ram_at_the_pause_instant_even_while_the_guest_writes() {
    live_image_is_ram_at_the_pause_instant("uffd");
}

/// A live capture (`method`) and a stop-and-copy of the same paused instant
/// are the same image, though the guest rewrote its RAM during the live one.
fn live_image_is_ram_at_the_pause_instant(method: &str) {
    let d = TempDir::new("instant");
    let (a, mut q) = start_vm(
        &d,
        "a",
        "2",
        &[
            "--mem",
            "512M",
            "--cmdline",
            "workload=memwrite region=384M",
        ],
    );
    a.wait_line("refguest: cpu=1 t=", T);
    q.ok("stop", json!({}));
    enable_background(&mut q);
    // The same paused instant, captured twice: stop-and-copy, then fork.
    let (by_stop, by_fork) = (d.path("stop.snap"), d.path("fork.snap"));
    q.ok(
        "migrate-set-parameters",
        json!({"x-snapshot-method": "stop"}),
    );
    q.ok("migrate", file_uri(&by_stop));
    assert_eq!(q.wait_migration(T)["status"], "completed");
    q.ok(
        "migrate-set-parameters",
        json!({"x-snapshot-method": method}),
    );
    q.ok("migrate", file_uri(&by_fork));
    // Let the guest rewrite its whole region while the capture streams.
    q.ok("cont", json!({}));
    let m = q.wait_migration(T);
    assert_eq!(m["status"], "completed", "{m}");
    a.wait_line("refguest: cpu=0 t=", T);
    q.ok("quit", json!({}));

    let (s, f) = (ram_of(&by_stop), ram_of(&by_fork));
    assert_eq!(s.len(), f.len());
    for (i, (s, f)) in s.iter().zip(&f).enumerate() {
        if s != f {
            let page = s
                .chunks(4096)
                .zip(f.chunks(4096))
                .position(|(a, b)| a != b)
                .unwrap();
            panic!(
                "range {i}: images differ first at page {page}: a write after the cut leaked in ({method})"
            );
        }
    }
    assert!(
        s.iter().flatten().any(|b| *b != 0),
        "the images hold the guest's data"
    );
    // Both restore to the same instant: the guest continues without corruption.
    for img in [&by_stop, &by_fork] {
        let incoming = format!("file:{}", img.display());
        let (b, mut qb) = start_vm(&d, "b", "2", &["--incoming", &incoming]);
        assert_eq!(wait_settled(&mut qb), "running");
        assert_guest_runs(&b);
        qb.ok("quit", json!({}));
    }
}

#[test]
fn paused_restore_waits_for_cont() {
    let d = TempDir::new("paused");
    let image = d.path("vm.snap");
    let (a, mut qa) = start_vm(
        &d,
        "a",
        "1",
        &["--mem", "128M", "--cmdline", "workload=memwrite region=32M"],
    );
    a.wait_line("refguest: cpu=0 t=", T);
    assert_eq!(live_snapshot(&mut qa, &image)["status"], "completed");
    qa.ok("quit", json!({}));

    let incoming = format!("file:{}", image.display());
    let (b, mut qb) = start_vm(&d, "b", "1", &["--incoming", &incoming, "--paused"]);
    assert_eq!(wait_settled(&mut qb), "paused");
    assert!(
        b.lines.recv_timeout(Duration::from_millis(1500)).is_err(),
        "a paused guest prints nothing"
    );
    qb.ok("cont", json!({}));
    assert_eq!(qb.ok("query-status", json!({}))["status"], "running");
    assert_guest_runs(&b);
    assert!(qb.event_names().contains(&"RESUME".to_string()));
    qb.ok("quit", json!({}));
}

#[test]
fn damaged_or_foreign_images_are_refused_with_a_clear_error() {
    let d = TempDir::new("damaged");
    let image = d.path("vm.snap");
    snapshot_of_small_vm(&d, &image);
    let good = std::fs::read(&image).unwrap();
    let dev_at = livesnap::Image::open(&image).unwrap().device_state_len();
    assert!(dev_at > 0);

    let truncated = d.path("truncated.snap");
    std::fs::write(&truncated, &good[..good.len() / 2]).unwrap();
    let flipped = d.path("flipped.snap");
    let mut bad = good.clone();
    let n = bad.len();
    bad[n - 10] ^= 0x55; // inside the device state: its checksum no longer matches
    std::fs::write(&flipped, &bad).unwrap();
    let foreign = d.path("foreign.snap");
    std::fs::write(&foreign, vec![0x42u8; 8192]).unwrap();
    let empty = d.path("empty.snap");
    std::fs::write(&empty, b"").unwrap();
    for (p, what) in [
        (&truncated, "truncated"),
        (&flipped, "corrupted"),
        (&foreign, "foreign"),
        (&empty, "empty"),
        (&d.path("missing.snap"), "missing"),
    ] {
        let out = run_with_timeout(
            snapvmm(&["run", "--incoming", &format!("file:{}", p.display())]),
            T,
        );
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{what}: {err}");
        assert!(
            err.starts_with("snapvmm: error: cannot restore from"),
            "{what}: {err}"
        );
        assert!(err.contains(&p.display().to_string()), "{what}: {err}");
        assert_eq!(err.lines().count(), 1, "{what}: one line: {err}");
        assert!(!stdout(&out).contains("refguest"), "{what}: no guest ran");
    }
    // Options the image contradicts are refused, not ignored; what agrees is fine.
    let incoming = format!("file:{}", image.display());
    for (args, says) in [
        (["--mem", "128M"], "64 MiB of RAM, --mem says 128 MiB"),
        (["--cpus", "2"], "1 vCPU(s), --cpus says 2"),
    ] {
        let mut all = vec!["run", "--incoming", incoming.as_str()];
        all.extend_from_slice(&args);
        let out = run_with_timeout(snapvmm(&all), T);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
        assert!(!stdout(&out).contains("refguest"), "{args:?}: no guest ran");
    }
    // The intact image still restores (with --mem that agrees).
    let (b, mut qb) = start_vm(&d, "b", "1", &["--incoming", &incoming, "--mem", "64M"]);
    assert_eq!(wait_settled(&mut qb), "running");
    assert_guest_runs(&b);
    qb.ok("quit", json!({}));
}

#[test]
fn incoming_defer_waits_for_migrate_incoming() {
    let d = TempDir::new("defer");
    let image = d.path("vm.snap");
    let (a, mut qa) = start_vm(
        &d,
        "a",
        "2",
        &["--mem", "128M", "--cmdline", "workload=memwrite region=32M"],
    );
    a.wait_line("refguest: cpu=1 t=", T);
    assert_eq!(live_snapshot(&mut qa, &image)["status"], "completed");
    let r = qa.cmd("migrate-incoming", file_uri(&image));
    assert!(
        r["error"]["desc"]
            .as_str()
            .unwrap()
            .contains("--incoming defer"),
        "a running VM refuses migrate-incoming: {r}"
    );
    qa.ok("quit", json!({}));

    let (b, mut qb) = start_vm(&d, "b", "2", &["--incoming", "defer"]);
    assert_eq!(qb.ok("query-status", json!({}))["status"], "inmigrate");
    let r = qb.cmd("cont", json!({}));
    assert!(
        r["error"]["desc"]
            .as_str()
            .unwrap()
            .contains("migrate-incoming"),
        "{r}"
    );
    // Settings made while waiting stay for later snapshots.
    enable_background(&mut qb);
    let r = qb.cmd("migrate-incoming", json!({"uri": "rdma:localhost:4444"}));
    assert_eq!(r["error"]["class"], "GenericError", "{r}");
    let missing = d.path("missing.snap");
    let r = qb.cmd("migrate-incoming", file_uri(&missing));
    let why = r["error"]["desc"].as_str().unwrap();
    assert!(why.contains("cannot restore from"), "{r}");
    assert_eq!(qb.ok("query-status", json!({}))["status"], "inmigrate");
    qb.ok("migrate-incoming", file_uri(&image));
    assert_eq!(qb.ok("query-status", json!({}))["status"], "running");
    // Two vCPUs, as the image and the command line say (a disagreement is refused).
    assert_eq!(
        qb.ok("query-cpus-fast", json!({}))
            .as_array()
            .unwrap()
            .len(),
        2
    );
    assert_guest_runs(&b);
    let caps = qb.ok("query-migrate-capabilities", json!({}));
    assert!(caps
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["capability"] == "background-snapshot" && c["state"] == true));
    let r = qb.cmd("migrate-incoming", file_uri(&image));
    assert!(r.get("error").is_some(), "only once: {r}");
    qb.ok("quit", json!({}));

    // Paused (-S) with defer: loaded, then waits for cont.
    let (c, mut qc) = start_vm(&d, "c", "2", &["--incoming", "defer", "-S"]);
    qc.ok("migrate-incoming", file_uri(&image));
    assert_eq!(qc.ok("query-status", json!({}))["status"], "paused");
    qc.ok("cont", json!({}));
    assert_guest_runs(&c);
    qc.ok("quit", json!({}));

    // Quit while waiting.
    let (mut e, mut qe) = start_vm(&d, "e", "1", &["--incoming", "defer"]);
    qe.ok("quit", json!({}));
    assert!(e.wait(T).success());
}

#[test]
fn warm_restore_loads_into_the_vm_built_ahead() {
    let d = TempDir::new("warm");
    let image = d.path("vm.snap");
    let (a, mut qa) = start_vm(
        &d,
        "a",
        "2",
        &["--mem", "128M", "--cmdline", "workload=memwrite region=32M"],
    );
    a.wait_line("refguest: cpu=1 t=", T);
    assert_eq!(live_snapshot(&mut qa, &image)["status"], "completed");
    qa.ok("quit", json!({}));

    // --mem as the image's: the VM built ahead takes the state; RAM is
    // filled while the guest runs, and the guest goes on unharmed.
    let warm = ["--incoming", "defer", "--restore-mode", "uffd"];
    let (b, mut qb) = start_vm(&d, "b", "2", &[&warm[..], &["--mem", "128M"]].concat());
    assert_eq!(qb.ok("query-status", json!({}))["status"], "inmigrate");
    qb.ok("migrate-incoming", file_uri(&image));
    assert_eq!(qb.ok("query-status", json!({}))["status"], "running");
    let m = qb.ok("query-migrate", json!({}));
    assert_eq!(m["x-restore"]["warm"], true, "{m}");
    assert_eq!(m["x-restore"]["mode"], "uffd", "{m}");
    assert_guest_runs(&b);
    // The fill ends (a snapshot waits for it) and read the guest's data.
    let again = d.path("again.snap");
    assert_eq!(live_snapshot(&mut qb, &again)["status"], "completed");
    let m = qb.ok("query-migrate", json!({}));
    assert!(
        m["x-restore-fill"]["bytes-read"].as_u64().unwrap() >= 32 << 20,
        "{m}"
    );
    assert_guest_runs(&b);
    qb.ok("quit", json!({}));

    // A VM built ahead with other RAM: restored cold, as well.
    let (c, mut qc) = start_vm(&d, "c", "2", &[&warm[..], &["--mem", "64M"]].concat());
    let r = qc.cmd("migrate-incoming", file_uri(&image));
    assert!(
        r["error"]["desc"].as_str().unwrap().contains("128 MiB"),
        "--mem that disagrees with the image is refused: {r}"
    );
    qc.ok("quit", json!({}));
    drop(c);
    let (e, mut qe) = start_vm(&d, "e", "2", &warm);
    qe.ok("migrate-incoming", file_uri(&image));
    let m = qe.ok("query-migrate", json!({}));
    assert_eq!(m["x-restore"]["warm"], false, "{m}");
    assert_eq!(qe.ok("query-status", json!({}))["status"], "running");
    assert_guest_runs(&e);
    qe.ok("quit", json!({}));
}

#[test]
fn quit_during_a_capture_leaves_no_partial_file() {
    let d = TempDir::new("quitcap");
    let (mut a, mut q) = big_vm(&d, "a");
    enable_background(&mut q);
    q.ok("migrate", file_uri(&d.path("vm.snap")));
    q.ok("quit", json!({}));
    assert!(a.wait(T).success());
    let left: Vec<_> = entries(&d.0)
        .into_iter()
        .filter(|n| n.contains("vm.snap"))
        .collect();
    // Either the capture finished first (a complete image) or nothing is left.
    if !left.is_empty() {
        assert_eq!(left, ["vm.snap"], "no temp file");
        livesnap::Image::open(d.path("vm.snap")).expect("a complete image");
    }
}

#[test]
fn a_lazily_restored_vm_whose_image_is_truncated_ends_with_a_clear_error() {
    use std::os::fd::AsRawFd;
    let d = TempDir::new("truncated-under");
    let image = d.path("vm.snap");
    snapshot_of_small_vm(&d, &image);

    // Restored paused: RAM is the image mapped lazily, nothing touched yet.
    let sock = d.path("b.sock");
    let errlog = d.path("b.stderr");
    let mut b = snapvmm(&[
        "run",
        "--incoming",
        &format!("file:{}", image.display()),
        "--restore-mode",
        "lazy",
        "--paused",
        "--qmp",
        &format!("unix:{}", sock.display()),
    ]);
    b.stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&errlog).unwrap());
    let mut b = b.spawn().unwrap();
    let mut qb = Qmp::connect(&sock);
    assert_eq!(wait_settled(&mut qb), "paused");
    // The image is locked while it backs RAM.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&image)
        .unwrap();
    // SAFETY: flock on a file descriptor owned by `f`.
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    assert_eq!(r, -1, "the image is not locked while it backs RAM");
    // Truncated under the VM: the guest's next touches find no pages.
    f.set_len(4096).unwrap();
    // The VM may end before it answers.
    qb.send("cont", json!({}));
    let end = std::time::Instant::now() + T;
    let status = loop {
        if let Some(s) = b.try_wait().unwrap() {
            break s;
        }
        assert!(std::time::Instant::now() < end, "the VM kept running");
        std::thread::sleep(Duration::from_millis(20));
    };
    let err = std::fs::read_to_string(&errlog).unwrap();
    assert_eq!(status.code(), Some(1), "{status}: {err}");
    assert!(err.contains("snapshot image"), "{err}");
}

/// Rewrites `image` with its device state passed through `edit` (a valid image:
/// same RAM, new checksums).
fn with_edited_state(image: &Path, out: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let img = livesnap::Image::open(image).unwrap();
    let mut state: serde_json::Value =
        serde_json::from_slice(&img.device_state().unwrap()).unwrap();
    edit(&mut state);
    // Page-aligned RAM, as the engine requires.
    let mut ram = vmm::memory::GuestRam::anonymous(state["mem_bytes"].as_u64().unwrap()).unwrap();
    let mut ranges = Vec::new();
    for (i, r) in img.ranges().to_vec().iter().enumerate() {
        let dst = ram.region_bytes_mut(i);
        img.read_ram_into(i, dst).unwrap();
        // SAFETY: `dst` is a live mapping of r.len bytes that outlives the capture below.
        ranges.push(unsafe { livesnap::RamRange::new(r.gpa, dst.as_ptr(), r.len) });
    }
    livesnap::capture_stopped(&ranges, &serde_json::to_vec(&state).unwrap(), out).unwrap();
}

#[test]
fn state_versions_newer_minor_restores_newer_major_is_refused() {
    let d = TempDir::new("versions");
    let image = d.path("vm.snap");
    snapshot_of_small_vm(&d, &image);

    // A newer minor version with a field this snapvmm does not know: restores.
    let minor = d.path("minor.snap");
    with_edited_state(&image, &minor, |s| {
        s["minor"] = json!(99);
        s["a_device_from_the_future"] = json!({"registers": [1, 2, 3]});
    });
    let (b, mut qb) = start_vm(
        &d,
        "b",
        "1",
        &["--incoming", &format!("file:{}", minor.display())],
    );
    assert_eq!(wait_settled(&mut qb), "running");
    assert_guest_runs(&b);
    qb.ok("quit", json!({}));
    drop(b);

    // A newer major version, or a machine this snapvmm cannot run: one clear line.
    let major = d.path("major.snap");
    with_edited_state(&image, &major, |s| s["version"] = json!(2));
    let huge = d.path("huge.snap");
    with_edited_state(&image, &huge, |s| s["cpus"] = json!(64));
    for (p, says) in [
        (&major, "has version 2, this snapvmm reads version 1"),
        (&huge, "a machine with 64 vCPUs; snapvmm runs 1 to 32"),
    ] {
        let out = run_with_timeout(
            snapvmm(&["run", "--incoming", &format!("file:{}", p.display())]),
            T,
        );
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains(says), "{err}");
        assert!(
            !err.contains("--cpus"),
            "names the image, not an option: {err}"
        );
    }
}

/// A live snapshot, at `image`, of a small VM running memwrite (its process has
/// ended when this returns).
fn snapshot_of_small_vm(d: &TempDir, image: &Path) {
    let (a, mut qa) = start_vm(
        d,
        "a",
        "1",
        &["--mem", "64M", "--cmdline", "workload=memwrite region=16M"],
    );
    a.wait_line("refguest: cpu=0 t=", T);
    assert_eq!(live_snapshot(&mut qa, image)["status"], "completed");
    qa.ok("quit", json!({}));
}

#[test]
fn an_image_whose_guest_cannot_run_is_a_failed_restore() {
    let d = TempDir::new("crafted");
    let (a, mut qa) = start_vm(
        &d,
        "a",
        "1",
        &["--mem", "64M", "--cmdline", "workload=memwrite region=8M"],
    );
    // The guest runs its workload: the image holds a machine mid-run.
    a.wait_line("refguest: cpu=0 t=", T);
    let image = d.path("vm.snap");
    let m = live_snapshot(&mut qa, &image);
    assert_eq!(m["status"], "completed", "{m}");
    qa.ok("quit", json!({}));
    // Guest RAM zeroed: the header and device state keep valid checksums
    // (RAM has none), but nothing the vCPU runs is there any more.
    let ranges = livesnap::Image::open(&image).unwrap().ranges().to_vec();
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&image)
            .unwrap();
        for r in ranges {
            let zeros = vec![0u8; 1 << 20];
            let mut at = 0;
            while at < r.len {
                let n = (r.len - at).min(zeros.len() as u64) as usize;
                f.write_all_at(&zeros[..n], r.file_offset + at).unwrap();
                at += n as u64;
            }
        }
    }
    let uri = format!("file:{}", image.display());
    // From the command line, in every restore mode: exit 1, saying why.
    for mode in ["lazy", "copy", "uffd"] {
        let o = run_with_timeout(
            snapvmm(&["run", "--incoming", &uri, "--restore-mode", mode]),
            T,
        );
        assert_eq!(o.status.code(), Some(1), "{mode}: {}", stderr(&o));
        assert!(
            stderr(&o).contains("the restore failed") && stderr(&o).contains("triple-faulted"),
            "{mode}: {}",
            stderr(&o)
        );
    }
    // Through migrate-incoming into a waiting VM: the same.
    let (mut b, mut qb) = start_vm(&d, "b", "1", &["--incoming", "defer"]);
    qb.ok("migrate-incoming", json!({ "uri": uri }));
    let st = b.wait(T);
    assert_eq!(st.code(), Some(1), "{st:?}");
}

/// A guest that resets itself while a live snapshot is written reboots only
/// once the snapshot is done: the snapshot completes, then `RESET` comes and
/// the guest boots again; the image restores.
#[test]
fn a_guest_reset_during_a_snapshot_reboots_when_it_ends() {
    let d = TempDir::new("reset-during");
    let (vm, mut q) = start_vm(
        &d,
        "vm",
        "1",
        &["--mem", "64M", "-S", "--cmdline", "workload=reset"],
    );
    enable_background(&mut q);
    q.ok(
        "migrate-set-parameters",
        json!({"x-wp-stall-limit-ms": 10000}),
    );
    let img = d.path("reset.snap");
    // The destination reads nothing for a second: the capture outlasts the
    // guest's boot, which ends in a reset at once.
    q.ok(
        "migrate",
        json!({"uri": format!("exec:sleep 1; cat > {}", img.display())}),
    );
    q.ok("cont", json!({}));
    vm.wait_line("refguest: ready", T);
    let m = q.wait_migration(T);
    assert_eq!(m["status"], "completed", "{m}");
    // The reboot follows: the guest boots a second time.
    vm.wait_line("refguest: ready", T);
    let _ = q.ok("query-status", json!({}));
    let done = q
        .events
        .iter()
        .position(|e| e["event"] == "MIGRATION" && e["data"]["status"] == "completed")
        .expect("a MIGRATION completed event");
    let reset = q
        .events
        .iter()
        .position(|e| e["event"] == "RESET")
        .expect("a RESET event");
    assert!(
        done < reset,
        "the reboot waited for the snapshot: {:?}",
        q.event_names()
    );
    q.ok("quit", json!({}));
    let o = run_with_timeout(
        snapvmm(&[
            "run",
            "--incoming",
            &format!("file:{}", img.display()),
            "--no-reboot",
        ]),
        T,
    );
    // The image holds the guest before its reset: restored, it resets (and
    // with --no-reboot that ends the VM with 0).
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
}

/// The VM generation ID: one at boot, a new one for every restore of an
/// image (two clones of one image differ), as the guest reads it at its
/// fixed address; `--vmgenid off` has none.
#[test]
fn every_restore_gets_a_new_vm_generation_id() {
    let d = TempDir::new("vmgenid");
    let (a, mut q) = big_vm(&d, "a");
    let booted = q.ok("query-vm-generation-id", json!({}))["guid"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(booted.len(), 36, "{booted}");
    assert_eq!(&booted[14..15], "4", "a version-4 UUID: {booted}");
    let img = d.path("g.snap");
    enable_background(&mut q);
    let m = live_snapshot(&mut q, &img);
    assert_eq!(m["status"], "completed", "{m}");
    assert_eq!(
        q.ok("query-vm-generation-id", json!({}))["guid"],
        booted.as_str(),
        "a snapshot does not change the running VM's ID"
    );
    q.ok("quit", json!({}));
    drop(a);
    let mut ids = vec![booted];
    for name in ["c1", "c2"] {
        let (c, mut qc) = start_vm(
            &d,
            name,
            "1",
            &["--incoming", &format!("file:{}", img.display())],
        );
        assert_eq!(wait_settled(&mut qc), "running");
        assert_guest_runs(&c);
        let id = qc.ok("query-vm-generation-id", json!({}))["guid"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(!ids.contains(&id), "{id} seen before: {ids:?}");
        ids.push(id);
        qc.ok("quit", json!({}));
    }
    let (_o, mut qo) = start_vm(&d, "off", "1", &["--vmgenid", "off", "--mem", "64M"]);
    let r = qo.cmd("query-vm-generation-id", json!({}));
    assert!(
        r["error"]["desc"]
            .as_str()
            .unwrap_or("")
            .contains("--vmgenid off"),
        "{r}"
    );
    qo.ok("quit", json!({}));
}

/// A VM restored from a virtio-pci image reboots on virtio-pci (the image's
/// transport, not the default), whatever its own command line said: a
/// snapshot taken after the reboot is a virtio-pci image again, which a
/// restore asking for virtio-mmio refuses, naming both.
#[test]
fn a_restored_virtio_pci_vm_reboots_on_virtio_pci() {
    let d = TempDir::new("pci-reboot");
    let (vm, mut q) = start_vm(
        &d,
        "vm",
        "1",
        &["--mem", "64M", "--virtio-transport", "pci"],
    );
    vm.wait_line("refguest: ready", T);
    let first = d.path("first.snap");
    assert_eq!(live_snapshot(&mut q, &first)["status"], "completed");
    q.ok("quit", json!({}));
    drop(vm);
    let incoming = format!("file:{}", first.display());
    let (vm, mut q) = start_vm(&d, "restored", "1", &["--incoming", &incoming]);
    assert_eq!(wait_settled(&mut q), "running");
    q.ok("system_reset", json!({}));
    vm.wait_line("refguest: ready", T);
    let second = d.path("second.snap");
    assert_eq!(live_snapshot(&mut q, &second)["status"], "completed");
    q.ok("quit", json!({}));
    drop(vm);
    let o = run_with_timeout(
        snapvmm(&[
            "run",
            "--incoming",
            &format!("file:{}", second.display()),
            "--virtio-transport",
            "mmio",
        ]),
        T,
    );
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("the snapshot's devices are on virtio-pci, virtio-mmio was asked for"),
        "{}",
        stderr(&o)
    );
}
