//! NICs on the reference guest (which has no network driver: these tests are
//! about the tap, the options and the saved state; Linux's driver is tested
//! in `linux_guests.rs`). They create taps, so they need root and
//! /dev/net/tun, as snapvmm itself does for `--net tap=`.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

/// A tap name unique to this test process (at most 15 characters).
fn tap(tag: &str) -> String {
    format!("snt{tag}{}", std::process::id() % 100_000)
}

fn exists(tap: &str) -> bool {
    std::path::Path::new("/sys/class/net").join(tap).exists()
}

/// A source VM with a NIC on `tap`, booted and working (a snapshot before
/// its ready line would restore a guest that still has to print it).
fn working_vm_on_tap(dir: &TempDir, tap: &str) -> (Running, Qmp) {
    let (vm, mut q) = start_vm(dir, "src", "1", &["--net", &format!("tap={tap}")]);
    assert_eq!(wait_settled(&mut q), "running");
    vm.wait_line("refguest: cpu=0 t=", T);
    (vm, q)
}

/// A live snapshot of `vm` to `net.snap` in `dir`, then the VM quits.
fn snapshot_then_quit(dir: &TempDir, vm: &mut Running, q: &mut Qmp) -> std::path::PathBuf {
    let snap = dir.path("net.snap");
    let m = live_snapshot(q, &snap);
    assert_eq!(m["status"], "completed", "{m}");
    q.ok("quit", json!({}));
    vm.wait(T);
    snap
}

#[test]
fn a_tap_snapvmm_creates_is_up_goes_with_the_process_and_a_restore_needs_as_many_nics() {
    let dir = TempDir::new("net-restore");
    let (t0, t1) = (tap("a"), tap("b"));
    let (mut vm, mut q) = working_vm_on_tap(&dir, &t0);
    let flags = std::fs::read_to_string(format!("/sys/class/net/{t0}/flags")).unwrap();
    let flags = u32::from_str_radix(flags.trim().trim_start_matches("0x"), 16).unwrap();
    assert_eq!(flags & 1, 1, "the tap snapvmm created is up");
    let snap = snapshot_then_quit(&dir, &mut vm, &mut q);
    assert!(!exists(&t0), "a tap snapvmm created goes away with it");

    // The image has one NIC: a restore without one is refused, naming both.
    let o = run_with_timeout(
        snapvmm(&["run", "--incoming", &format!("file:{}", snap.display())]),
        T,
    );
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("the snapshot has 1 NIC(s), 0 given"), "{e}");
    assert!(!e.contains("panicked"), "{e}");

    // With a NIC on another tap and another MAC, it runs on.
    let (b, mut q) = start_vm(
        &dir,
        "dst",
        "1",
        &[
            "--incoming",
            &format!("file:{}", snap.display()),
            "--net",
            &format!("tap={t1},mac=52:54:00:00:00:07"),
        ],
    );
    assert_eq!(wait_settled(&mut q), "running");
    assert!(exists(&t1));
    goes_on_without_corruption(&b, 1);
}

#[test]
fn a_tap_that_vanishes_under_a_running_vm_is_reported_and_the_vm_runs_on() {
    let dir = TempDir::new("net-vanish");
    let t = tap("v");
    let sock = dir.path("vm.sock");
    let err = dir.path("stderr.txt");
    let mut cmd = snapvmm(&[
        "run",
        "--qmp",
        &format!("unix:{}", sock.display()),
        "--net",
        &format!("tap={t}"),
    ]);
    cmd.stdout(Stdio::null())
        .stderr(std::fs::File::create(&err).unwrap());
    let mut child = cmd.spawn().unwrap();
    let mut q = Qmp::connect(&sock);
    assert_eq!(wait_settled(&mut q), "running");
    let st = std::process::Command::new("ip")
        .args(["link", "del", &t])
        .status()
        .unwrap();
    assert!(st.success());
    let end = Instant::now() + T;
    let said = loop {
        let s = std::fs::read_to_string(&err).unwrap_or_default();
        if s.contains(&format!("tap '{t}' failed")) {
            break s;
        }
        assert!(Instant::now() < end, "nothing said about the tap: {s}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(said.contains("the VM keeps running"), "{said}");
    assert_eq!(q.ok("query-status", json!({}))["status"], "running");
    // And it still takes a snapshot.
    let m = live_snapshot(&mut q, &dir.path("after.snap"));
    assert_eq!(m["status"], "completed", "{m}");
    q.ok("quit", json!({}));
    let _ = child.wait();
}

#[test]
fn a_bad_net_option_is_a_usage_error_naming_it() {
    for (arg, says) in [
        ("tap=x,mac=nope", "mac=nope"),
        ("vhost=on", "vhost=on"),
        ("fd=99", "fd=99 is not an open descriptor"),
        ("fd=uplink", "needs --qmp and --incoming defer"),
    ] {
        let o = run_with_timeout(snapvmm(&["run", "--net", arg]), T);
        assert!(!o.status.success(), "{arg}");
        let e = stderr(&o);
        assert!(e.contains(says), "{arg}: {e}");
        assert!(!e.contains("panicked"), "{arg}: {e}");
    }
}

/// Opens (creating it) the tap `name` as a caller that runs snapvmm without
/// privileges would: no packet information, a virtio-net header.
fn open_tap(name: &str) -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd;
    // SAFETY: open(2) of a path literal; the result is checked.
    let fd = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    assert!(fd >= 0, "/dev/net/tun: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` was just opened and is owned here alone.
    let owned = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    // struct ifreq: the name (16 bytes), then the flags (a short).
    let mut ifr = [0u8; 40];
    ifr[..name.len()].copy_from_slice(name.as_bytes());
    let flags: u16 = 0x0002 | 0x1000 | 0x4000; // IFF_TAP | IFF_NO_PI | IFF_VNET_HDR
    ifr[16..18].copy_from_slice(&flags.to_ne_bytes());
    // SAFETY: TUNSETIFF reads and writes an ifreq, which `ifr` is large
    // enough for; `fd` is open.
    let r = unsafe { libc::ioctl(fd, 0x4004_54ca, ifr.as_mut_ptr()) };
    assert_eq!(
        r,
        0,
        "TUNSETIFF {name}: {}",
        std::io::Error::last_os_error()
    );
    owned
}

/// `--net fd=NAME` with `--incoming defer`: the NIC's tap comes with QMP
/// `getfd`, as from a caller without privileges. `migrate-incoming` before
/// it names the missing descriptor and the VM still waits; after it the
/// image restores onto that tap, which snapvmm then holds alone.
#[test]
fn a_tap_passed_with_getfd_backs_the_nic_of_a_restore() {
    let dir = TempDir::new("net-getfd");
    let (t0, t1) = (tap("g"), tap("h"));
    let (mut vm, mut q) = working_vm_on_tap(&dir, &t0);
    let snap = snapshot_then_quit(&dir, &mut vm, &mut q);

    let (b, mut q) = start_vm(
        &dir,
        "dst",
        "1",
        &[
            "--incoming",
            "defer",
            "--net",
            "fd=uplink,mac=52:54:00:00:00:09",
        ],
    );
    let uri = format!("file:{}", snap.display());
    let r = q.cmd("migrate-incoming", json!({ "uri": uri }));
    let e = r["error"]["desc"].as_str().unwrap_or_default().to_string();
    assert!(e.contains("no descriptor named 'uplink'"), "{r}");
    assert_eq!(q.ok("query-status", json!({}))["status"], "inmigrate");

    let fd = open_tap(&t1);
    let r = q.cmd_with_fd("getfd", json!({"fdname": "uplink"}), {
        use std::os::fd::AsRawFd;
        fd.as_raw_fd()
    });
    assert!(r.get("return").is_some(), "{r}");
    drop(fd);
    q.ok("migrate-incoming", json!({ "uri": uri }));
    assert_eq!(wait_settled(&mut q), "running");
    goes_on_without_corruption(&b, 1);
    // The tap lives on only through the descriptor snapvmm took.
    assert!(exists(&t1));
    q.ok("quit", json!({}));
    let mut b = b;
    b.wait(T);
    let end = Instant::now() + T;
    while exists(&t1) {
        assert!(Instant::now() < end, "the tap outlived the VM that held it");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The scheduling policy of each thread of `pid`, by name (`/proc`'s `stat`
/// field 41: 0 normal, 3 batch).
fn thread_policies(pid: u32) -> Vec<(String, u32)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let dir = e.unwrap().path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        let stat = std::fs::read_to_string(dir.join("stat")).unwrap_or_default();
        // Fields after the ")" that closes the name start at field 3.
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let policy = rest
            .split_whitespace()
            .nth(41 - 3)
            .unwrap()
            .parse()
            .unwrap();
        out.push((comm.trim().to_string(), policy));
    }
    out
}

#[test]
fn disks_and_nics_get_their_own_io_threads_and_only_the_nics_yield_to_vcpus() {
    let dir = TempDir::new("net-threads");
    let t0 = tap("t");
    let disk = dir.path("d.raw");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let (mut vm, mut q) = start_vm(
        &dir,
        "src",
        "1",
        &[
            "--net",
            &format!("tap={t0}"),
            "--disk",
            disk.to_str().unwrap(),
        ],
    );
    assert_eq!(wait_settled(&mut q), "running");
    let policy = |threads: &[(String, u32)], name: &str| {
        threads
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("no thread {name} in {threads:?}"))
            .1
    };
    // The NIC thread takes its policy as it starts: wait until it has run.
    let end = Instant::now() + T;
    let threads = loop {
        let threads = thread_policies(vm.child.id());
        if policy(&threads, "snapvmm-io-net") == 3 || Instant::now() > end {
            break threads;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let policy = |name: &str| policy(&threads, name);
    assert_eq!(policy("snapvmm-io-net"), 3, "SCHED_BATCH: {threads:?}");
    assert_eq!(policy("snapvmm-io-disk"), 0, "SCHED_OTHER: {threads:?}");
    q.ok("quit", json!({}));
    vm.wait(T);
}
