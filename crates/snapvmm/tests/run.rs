//! `snapvmm run` end to end: the built-in guest, its workloads, external
//! kernels, serial targets, signals, and every bad input's message.

mod common;

use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(60);

#[test]
fn builtin_guest_boots_and_exits_zero() {
    let o = run_with_timeout(snapvmm(&["run", "--cmdline", "workload=exit"]), T);
    assert_eq!(o.status.code(), Some(0), "stderr: {}", stderr(&o));
    assert!(
        stdout(&o).contains("refguest: ready cpus=1 ram_mib=511 workload=exit"),
        "{}",
        stdout(&o)
    );
}

#[test]
fn guest_reads_the_tsc_frequency_from_the_hypervisor_leaf() {
    let o = run_with_timeout(
        snapvmm(&["run", "--mem", "64M", "--cmdline", "workload=exit"]),
        T,
    );
    let out = stdout(&o);
    let ready = out
        .lines()
        .find(|l| l.starts_with("refguest: ready"))
        .unwrap_or_else(|| panic!("no ready line: {out}"));
    assert!(!ready.contains("guessed"), "{ready}");
    // This host's TSC frequency, as KVM reports it (sysfs has no such file on
    // every host; the guest's figure must at least be a plausible CPU clock).
    let khz: u64 = ready
        .split_whitespace()
        .find_map(|w| w.strip_prefix("tsc_khz="))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no tsc_khz in {ready}"));
    assert!((500_000..10_000_000).contains(&khz), "{ready}");
}

#[test]
fn system_powerdown_is_ignored_by_a_guest_without_acpi() {
    let dir = TempDir::new("powerdown-noacpi");
    let (mut vm, mut q) = start_vm(&dir, "vm", "1", &[]);
    q.ok("system_powerdown", serde_json::json!({}));
    // The reference guest has no ACPI: like QEMU, nothing happens, it keeps running.
    let t0 = std::time::Instant::now();
    let before = vm.wait_line("refguest: cpu=0 t=", T);
    let after = loop {
        let l = vm.wait_line("refguest: cpu=0 t=", T);
        if l != before {
            break l;
        }
        assert!(t0.elapsed() < T, "the guest stopped reporting");
    };
    assert_ne!(before, after);
    assert!(q.event_names().contains(&"POWERDOWN".to_string()));
    let st = q.ok("query-status", serde_json::json!({}));
    assert_eq!(st["status"], "running", "{st}");
    q.ok("quit", serde_json::json!({}));
    vm.wait(T);
}

#[test]
fn guest_exit_code_becomes_the_process_status() {
    let o = run_with_timeout(
        snapvmm(&["run", "--mem", "64M", "--cmdline", "workload=exit exit=7"]),
        T,
    );
    assert_eq!(o.status.code(), Some(7));
}

#[test]
fn i8042_reset_ends_the_vm_with_no_reboot() {
    let o = run_with_timeout(
        snapvmm(&[
            "run",
            "--mem",
            "64M",
            "--no-reboot",
            "--cmdline",
            "workload=reset",
        ]),
        T,
    );
    assert_eq!(o.status.code(), Some(0), "stderr: {}", stderr(&o));
    assert!(stdout(&o).contains("workload=reset"));
}

/// Without `--no-reboot` a guest reset reboots it in place, as QEMU: the
/// guest boots again (and again: this one resets as soon as it is up), each
/// time with a `RESET` event, and the VM runs until asked to quit.
#[test]
fn a_guest_reset_reboots_in_place() {
    let dir = TempDir::new("reboot");
    let (mut vm, mut q) = start_vm(
        &dir,
        "vm",
        "1",
        &["--mem", "64M", "--cmdline", "workload=reset"],
    );
    for _ in 0..3 {
        vm.wait_line("refguest: ready", T);
    }
    let _ = q.ok("query-status", serde_json::json!({}));
    let resets: Vec<_> = q.events.iter().filter(|e| e["event"] == "RESET").collect();
    assert!(
        resets.len() >= 2,
        "a RESET event per reboot: {:?}",
        q.events
    );
    assert_eq!(resets[0]["data"]["guest"], true);
    assert_eq!(resets[0]["data"]["reason"], "guest-reset");
    assert!(
        !q.event_names().contains(&"SHUTDOWN".to_string()),
        "a reboot is not a shutdown: {:?}",
        q.events
    );
    q.ok("quit", serde_json::json!({}));
    assert!(vm.wait(T).success());
}

fn memwrite(cpus: &str) {
    let o = run_with_timeout(
        snapvmm(&[
            "run",
            "--mem",
            "1G",
            "--cpus",
            cpus,
            "--cmdline",
            "workload=memwrite region=768M passes=3 exit=5",
        ]),
        T,
    );
    let out = stdout(&o);
    assert_eq!(
        o.status.code(),
        Some(5),
        "the exit= status after finite passes; stdout: {out}"
    );
    assert!(
        out.contains(&format!("refguest: ready cpus={cpus} ")),
        "{out}"
    );
    assert!(
        out.contains(&format!("refguest: done cpus={cpus} passes=3 corrupt=0")),
        "{out}"
    );
    assert!(!out.contains("CORRUPT"), "{out}");
}

#[test]
fn memwrite_one_vcpu_completes_its_passes() {
    memwrite("1");
}

#[test]
fn memwrite_four_vcpus_completes_its_passes() {
    memwrite("4");
}

#[test]
fn memwrite_hot_rewrites_a_tenth_and_still_verifies_the_rest() {
    // hot=10: after pass 1 each CPU rewrites the first tenth of its slice and
    // reads the cold rest back against pass 1's values; 200 passes sweep the
    // cold part several times over (once per 36 hot passes).
    let o = run_with_timeout(
        snapvmm(&[
            "run",
            "--mem",
            "256M",
            "--cpus",
            "2",
            "--cmdline",
            "workload=memwrite region=200M hot=10 passes=200 exit=5",
        ]),
        T,
    );
    let out = stdout(&o);
    assert_eq!(o.status.code(), Some(5), "stdout: {out}");
    assert!(out.contains(" region_mib=200 hot=10 "), "{out}");
    assert!(
        out.contains("refguest: done cpus=2 passes=200 corrupt=0"),
        "{out}"
    );
    assert!(!out.contains("CORRUPT"), "{out}");
}

#[test]
fn memwrite_reports_once_a_second_until_ctrl_c() {
    let mut r = Running::spawn(snapvmm(&[
        "run",
        "--mem",
        "256M",
        "--cmdline",
        "workload=memwrite region=64M",
    ]));
    r.wait_line("refguest: ready cpus=1", T);
    let line = r.wait_line("refguest: cpu=0 t=", T);
    for key in ["pages=", "maxgap_us=", "passes="] {
        assert!(line.contains(key), "{line}");
    }
    // When the longest gap ended, as time before the line: inside the
    // second the line covers.
    let ago: u64 = line
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("gap_ago_us="))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no gap_ago_us in {line}"));
    assert!(ago <= 1_000_000, "{line}");
    r.signal("INT");
    let st = r.wait(Duration::from_secs(10));
    assert_eq!(st.code(), Some(0));
}

#[test]
fn sigterm_shuts_down_cleanly() {
    let mut r = Running::spawn(snapvmm(&[
        "run",
        "--mem",
        "128M",
        "--cmdline",
        "workload=idle",
    ]));
    r.wait_line("refguest: ready", T);
    r.signal("TERM");
    assert_eq!(r.wait(Duration::from_secs(10)).code(), Some(0));
}

#[test]
fn external_pvh_elf_boots() {
    let d = TempDir::new("pvh");
    let k = d.path("refguest.elf");
    std::fs::write(&k, refguest::ELF).unwrap();
    let o = run_with_timeout(
        snapvmm(&[
            "run",
            "--mem",
            "128M",
            "--kernel",
            k.to_str().unwrap(),
            "--cmdline",
            "workload=exit exit=9",
        ]),
        T,
    );
    assert_eq!(o.status.code(), Some(9), "stderr: {}", stderr(&o));
    assert!(stdout(&o).contains("refguest: ready"));
}

#[test]
fn serial_to_file_and_none() {
    let d = TempDir::new("serial");
    let f = d.path("console.log");
    let target = format!("file:{}", f.display());
    let o = run_with_timeout(
        snapvmm(&[
            "run",
            "--mem",
            "64M",
            "--serial",
            &target,
            "--cmdline",
            "workload=exit",
        ]),
        T,
    );
    assert_eq!(o.status.code(), Some(0));
    assert!(stdout(&o).is_empty());
    assert!(std::fs::read_to_string(&f)
        .unwrap()
        .contains("refguest: ready"));
    let o = run_with_timeout(
        snapvmm(&[
            "run",
            "--mem",
            "64M",
            "--serial",
            "none",
            "--cmdline",
            "workload=exit",
        ]),
        T,
    );
    assert_eq!(o.status.code(), Some(0));
    assert!(stdout(&o).is_empty());
}

/// Runs with bad input: exit status 1, exactly one line on stderr containing `needle`, no panic.
fn refused(args: &[&str], env: Option<(&str, &str)>, needle: &str) {
    let mut c = snapvmm(args);
    if let Some((k, v)) = env {
        c.env(k, v);
    }
    let o = run_with_timeout(c, T);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "args {args:?}: stderr {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    assert!(err.starts_with("snapvmm: error: "), "{err}");
    assert!(err.contains(needle), "expected {needle:?} in {err}");
    assert!(
        !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
        "{err}"
    );
}

#[test]
fn missing_kernel_file() {
    refused(
        &["run", "--kernel", "/nonexistent/vmlinux"],
        None,
        "cannot read kernel /nonexistent/vmlinux",
    );
}

#[test]
fn malformed_kernel_file() {
    let d = TempDir::new("badkernel");
    let k = d.path("junk");
    std::fs::write(&k, vec![0x42u8; 8192]).unwrap();
    refused(
        &["run", "--kernel", k.to_str().unwrap()],
        None,
        "is not a kernel snapvmm can boot",
    );
    // An ELF header that lies about its program headers.
    let mut elf = refguest::ELF[..64].to_vec();
    elf[32..40].copy_from_slice(&0xffff_ffffu64.to_le_bytes()); // e_phoff far past the end
    std::fs::write(&k, &elf).unwrap();
    refused(
        &["run", "--kernel", k.to_str().unwrap()],
        None,
        "cannot load the kernel",
    );
    std::fs::write(&k, b"").unwrap();
    refused(&["run", "--kernel", k.to_str().unwrap()], None, "is empty");
}

#[test]
fn bad_mem_values() {
    refused(&["run", "--mem", "1M"], None, "too small");
    refused(&["run", "--mem", "lots"], None, "invalid --mem 'lots'");
    refused(
        &["run", "--mem", "64T"],
        None,
        "more than this host can give",
    );
}

#[test]
fn qemu_spellings_of_mem_and_cpus_work() {
    let o = run_with_timeout(
        snapvmm(&[
            "run",
            "-m",
            "96M",
            "--smp",
            "2",
            "--cmdline",
            "workload=memwrite passes=1 region=8M",
        ]),
        T,
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("refguest: ready cpus=2 ram_mib=95"),
        "{}",
        stdout(&o)
    );
}

#[test]
fn file_uri_options_are_refused_not_ignored() {
    refused(
        &["run", "--incoming", "file:/tmp/x.snap,offset=4096"],
        None,
        "file: options ('offset=4096') are not supported",
    );
}

#[test]
fn bad_cpu_counts() {
    refused(&["run", "--cpus", "0"], None, "--cpus 0 is out of range");
    refused(&["run", "--cpus", "33"], None, "--cpus 33 is out of range");
    refused(&["run", "--cpus", "two"], None, "invalid --cpus 'two'");
}

#[test]
fn kvm_device_missing_or_not_kvm() {
    refused(
        &["run"],
        Some(("SNAPVMM_KVM_DEVICE", "/nonexistent/kvm")),
        "does not exist: this host has no KVM",
    );
    refused(
        &["run"],
        Some(("SNAPVMM_KVM_DEVICE", "/dev/null")),
        "is not a usable KVM device",
    );
}

#[test]
fn kvm_device_permission_denied_names_the_fix() {
    // Root bypasses file permissions, so drop to an unprivileged user if we are root.
    let is_root = std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false);
    if !is_root {
        eprintln!("skipped: needs root to run snapvmm as an unprivileged user");
        return;
    }
    let o = run_with_timeout(
        {
            let mut c = std::process::Command::new("setpriv");
            c.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
                .arg(bin())
                .args(["run"]);
            c.env("SNAPVMM_KVM_DEVICE", "/dev/kvm");
            c
        },
        T,
    );
    let err = stderr(&o);
    if err.contains("setpriv") {
        eprintln!("skipped: setpriv unavailable: {err}");
        return;
    }
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("permission denied opening /dev/kvm"), "{err}");
    assert!(err.contains("usermod -aG kvm"), "{err}");
}

#[test]
fn cmdline_too_long_is_refused() {
    let long = "x".repeat(4096);
    refused(
        &["run", "--cmdline", &long],
        None,
        "command line is too long",
    );
}

#[test]
fn bad_incoming_values() {
    refused(&["run", "--incoming", "defer"], None, "needs --qmp");
    refused(
        &["run", "--incoming", "rdma:1.2.3.4:4444"],
        None,
        "unknown transport 'rdma'",
    );
    refused(
        &["run", "--incoming", "tcp:localhost"],
        None,
        "tcp: needs HOST:PORT",
    );
    refused(
        &["run", "--incoming", "file:"],
        None,
        "nothing after the scheme",
    );
    refused(
        &["run", "--incoming", "fd:nothing"],
        None,
        "no file descriptor named 'nothing'",
    );
    refused(
        &["run", "--incoming", "exec:exit 4"],
        None,
        "`exit 4` exited with status 4",
    );
}

#[test]
fn bad_disks_are_refused_with_one_line() {
    let d = TempDir::new("baddisk");
    refused(
        &["run", "--disk", "/nonexistent/disk.qcow2"],
        None,
        "cannot open disk /nonexistent/disk.qcow2",
    );
    refused(
        &["run", "--disk", "x.img,format=vmdk"],
        None,
        "invalid --disk option",
    );
    let fake = d.path("fake.qcow2");
    let mut bytes = b"QFI\xfb".to_vec();
    bytes.extend_from_slice(&[0xff; 4092]);
    std::fs::write(&fake, &bytes).unwrap();
    refused(
        &["run", "--disk", fake.to_str().unwrap()],
        None,
        "cannot open qcow2 disk",
    );
    let empty = d.path("empty.img");
    std::fs::write(&empty, b"").unwrap();
    refused(
        &["run", "--disk", empty.to_str().unwrap()],
        None,
        "is empty",
    );
    refused(&["run", "--loadvm", "x"], None, "--loadvm needs");
}

#[test]
fn a_disk_in_use_by_another_snapvmm_is_refused() {
    let d = TempDir::new("lockdisk");
    let disk = d.path("disk.raw");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let arg = format!("{},format=raw", disk.display());
    let first = Running::spawn(snapvmm(&[
        "run",
        "--disk",
        &arg,
        "--cmdline",
        "workload=idle",
    ]));
    first.wait_line("refguest: ready", T);
    refused(&["run", "--disk", &arg], None, "in use by another process");
    drop(first);
}
