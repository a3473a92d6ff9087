//! The Linux guest scenarios, run where `/dev/kvm` can run Linux (a host with
//! vmx/svm, or the TCG VM with nested SVM that `outer.rs` boots). Each drives
//! snapvmm processes like a user would and checks what the guest itself prints
//! (`init.sh`, `stress.c`); disk images are then checked from the host side
//! (`host_check.rs`) with QEMU's and e2fsprogs' tools.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;

use super::vm::{Console, Vm};
use crate::common::Qmp;

/// Generous: nested under TCG, Linux takes ~10 s to boot and everything is ~30x slower.
pub const T: Duration = Duration::from_secs(240);

/// Names of the scenarios, in the order they run.
pub const ALL: &[&str] = &[
    "boot-1cpu-console-poweroff",
    "boot-2cpu-powerdown",
    "boot-args-of-other-vmms",
    "reboot-in-place-twice-then-snapshot",
    "virtio-blk-raw-qcow2",
    "virtio-pci-disks-snapshot-restore",
    "live-snapshot-restore",
    "write-protect-snapshot-restore",
    "ten-snapshots-restore-last",
    "savevm-loadvm-qcow2",
    "live-migration-and-streams",
    "disk-throughput",
];

/// Scenarios run only when named in `SNAPVMM_LINUX_SCENARIOS`: the
/// benchmarks (long, and they carry QEMU into the TCG VM).
pub const BY_NAME_ONLY: &[&str] = &["disk-throughput", "network-throughput"];

/// About how long a scenario takes in the TCG VM, in seconds (a slow day's
/// run), to split the scenarios between TCG VMs running side by side.
pub fn cost(name: &str) -> u32 {
    match name {
        "live-migration-and-streams" => 280,
        "ten-snapshots-restore-last" => 155,
        "write-protect-snapshot-restore" => 125,
        "boot-args-of-other-vmms" => 105,
        "network-tap-snapshot-restore" => 360,
        "vsock-host-guest-restore" => 100,
        "network-pci-clones-own-macs" => 90,
        "savevm-loadvm-qcow2" => 130,
        "reboot-in-place-twice-then-snapshot" => 85,
        "virtio-pci-disks-snapshot-restore" | "live-snapshot-restore" => 80,
        "virtio-blk-raw-qcow2" => 30,
        _ => 20,
    }
}

/// Benchmark scenarios that run the same guest under QEMU (`-accel kvm`,
/// its own userspace virtio devices) in the same TCG VM, for a side-by-side
/// figure: the TCG VM then carries QEMU, its libraries and its firmware.
pub fn needs_qemu(name: &str) -> bool {
    matches!(name, "disk-throughput" | "network-throughput")
}

pub struct Ctx {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// Scratch space (snapshot images, sockets).
    pub dir: PathBuf,
    /// Where disk images for the host-side checks go (`export/<scenario>/`).
    pub export: PathBuf,
    pub console: Console,
}

impl Ctx {
    pub fn linux(&self, name: &str, mem: &str, cpus: &str, mode: &str, extra: &[&str]) -> Vm {
        let cmdline = format!("console=ttyS0 panic=-1 quiet snaptest={mode}");
        self.linux_cmdline(name, mem, cpus, &cmdline, extra)
    }

    fn linux_cmdline(
        &self,
        name: &str,
        mem: &str,
        cpus: &str,
        cmdline: &str,
        extra: &[&str],
    ) -> Vm {
        let (k, i) = (
            self.kernel.display().to_string(),
            self.initrd.display().to_string(),
        );
        let mut args = vec![
            "--mem",
            mem,
            "--cpus",
            cpus,
            "--kernel",
            &k,
            "--initrd",
            &i,
            "--cmdline",
            cmdline,
        ];
        args.extend_from_slice(extra);
        // A `-base` VMM of a benchmark runs the baseline build.
        match (
            name.ends_with("-base"),
            std::env::var_os("SNAPVMM_BASE_BIN"),
        ) {
            (true, Some(b)) => Vm::start_bin(Path::new(&b), name, &self.dir, &self.console, &args),
            _ => Vm::start(name, &self.dir, &self.console, &args),
        }
    }

    /// The same guest under QEMU with KVM (PC machine, SeaBIOS, virtio over
    /// PCI, no vhost): `extra` adds its devices.
    pub fn qemu(&self, name: &str, mem: &str, cpus: &str, mode: &str, extra: &[&str]) -> Vm {
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-accel", "kvm", "-cpu", "host", "-machine", "pc"])
            .args(["-m", mem, "-smp", cpus])
            .args(["-nodefaults", "-no-user-config", "-display", "none"])
            .args(["-serial", "stdio", "-no-reboot", "-kernel"])
            .arg(&self.kernel)
            .arg("-initrd")
            .arg(&self.initrd)
            .arg("-append")
            .arg(format!("console=ttyS0 panic=-1 quiet snaptest={mode}"))
            .args(extra);
        Vm::spawn(
            name,
            cmd,
            self.dir.join(format!("{name}.none")),
            &self.console,
        )
    }

    pub fn vm(&self, name: &str, args: &[&str]) -> Vm {
        Vm::start(name, &self.dir, &self.console, args)
    }
}

pub fn qmp(vm: &Vm) -> Qmp {
    Qmp::connect(&vm.qmp_path)
}

/// The first `KEY=NUMBER` word of a console line. A load can cut a line:
/// the guest had printed "FILES n=" when `snapshot-load` took it back to the
/// snapshot instant, and the line reads "FILES n=FILES n=5 entries=5 ok".
fn field(line: &str, key: &str) -> u64 {
    line.split_whitespace()
        .filter_map(|w| w.strip_prefix(key))
        .find_map(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in {line:?}"))
}

/// The word after `key` (up to the next space) in `line`.
pub fn field_text(line: &str, key: &str) -> String {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key} in {line:?}"))
        .to_string()
}

/// Whether a benchmark runs `vmm` (`snapvmm`, `snapvmm-pci`, `qemu`):
/// `SNAPVMM_BENCH_VMMS=snapvmm-pci,qemu` runs only those; unset, all.
/// A `-base` VMM (the same with the baseline build) runs only where a
/// baseline was given (`SNAPVMM_BENCH_BASELINE`) and named or all run.
pub fn bench_runs(vmm: &str) -> bool {
    if vmm.ends_with("-base") && std::env::var_os("SNAPVMM_BASE_BIN").is_none() {
        return false;
    }
    let only = std::env::var("SNAPVMM_BENCH_VMMS").unwrap_or_default();
    only.is_empty() || only.split(',').any(|o| o == vmm)
}

/// The benchmark's runs in order: `list`'s entries whose VMM runs
/// ([`bench_runs`]), each with its pass number; `SNAPVMM_BENCH_PASSES=N`
/// (default 1) goes through them N times, every other pass backwards, so
/// that the TCG VM's drift in speed falls on each VMM alike.
pub fn bench_order<T: Copy>(list: &[T], vmm: impl Fn(&T) -> &str) -> Vec<(usize, T)> {
    let passes = std::env::var("SNAPVMM_BENCH_PASSES")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(1)
        .max(1);
    let runs: Vec<T> = list
        .iter()
        .copied()
        .filter(|t| bench_runs(vmm(t)))
        .collect();
    (1..=passes)
        .flat_map(|p| {
            let mut r: Vec<(usize, T)> = runs.iter().map(|&t| (p, t)).collect();
            if p % 2 == 0 {
                r.reverse();
            }
            r
        })
        .collect()
}

/// A benchmark figure of `scenario`: printed where the scenario runs, and
/// from the TCG VM's console brought back to the host's test output.
pub fn figure(scenario: &str, text: &str) {
    println!("LINUX-FIGURE {scenario} {text}");
}

/// Runs `f`; a panic becomes Err with its message.
pub fn catch(f: impl FnOnce()) -> Result<(), String> {
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    r.map_err(|e| {
        e.downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panic".into())
    })
}

/// Runs one scenario; returns Err with the reason when it fails.
pub fn run(name: &str, ctx: &Ctx) -> Result<(), String> {
    catch(|| match name {
        "boot-1cpu-console-poweroff" => boot_console_poweroff(ctx),
        "boot-2cpu-powerdown" => boot_powerdown(ctx),
        "boot-args-of-other-vmms" => boot_args(ctx),
        "reboot-in-place-twice-then-snapshot" => reboot(ctx),
        "virtio-blk-raw-qcow2" => disks(ctx),
        "virtio-pci-disks-snapshot-restore" => pci_disks(ctx),
        "live-snapshot-restore" => live_snapshot(ctx),
        "write-protect-snapshot-restore" => write_protect_snapshot(ctx),
        "ten-snapshots-restore-last" => ten_snapshots(ctx),
        "savevm-loadvm-qcow2" => savevm(ctx),
        "live-migration-and-streams" => live_migration(ctx),
        "disk-throughput" => disk_throughput(ctx),
        other => panic!("unknown scenario {other}"),
    })
}

/// 1 vCPU: the stock kernel boots to userspace through ACPI, a command typed on
/// the serial console runs, `poweroff` ends the VM through ACPI S5.
fn boot_console_poweroff(ctx: &Ctx) {
    let mut vm = ctx.linux("vm", "256M", "1", "boot", &[]);
    let up = vm.wait("GUEST-UP", T);
    assert!(up.contains("nproc=1"), "{up}");
    vm.wait("GUEST-SHELL", T);
    // The shell may not have opened the console yet: type until it answers.
    let end = Instant::now() + T;
    loop {
        vm.type_line("echo typed-$((6*7))");
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            vm.wait("typed-42", Duration::from_secs(10))
        }))
        .is_ok()
        {
            break;
        }
        assert!(
            Instant::now() < end,
            "the console never ran the typed command"
        );
    }
    vm.type_line("exit");
    vm.wait("GUEST-POWEROFF", T);
    assert_eq!(
        vm.exit_code(T),
        Some(0),
        "poweroff through ACPI S5 ends the VM with 0"
    );
    let log = ctx.console.text();
    assert!(log.contains("reboot: Power down"), "Linux powered down");
}

/// 2 vCPUs: both online; QMP `system_powerdown` presses the ACPI power button,
/// the guest sees KEY_POWER and powers off; SHUTDOWN says the guest did it.
fn boot_powerdown(ctx: &Ctx) {
    let mut vm = ctx.linux("vm", "256M", "2", "powerdown", &[]);
    let up = vm.wait("GUEST-UP", T);
    assert!(up.contains("nproc=2"), "{up}");
    vm.wait("POWERKEY watching", T);
    let mut q = qmp(&vm);
    q.ok("system_powerdown", json!({}));
    vm.wait("POWERKEY pressed", T);
    vm.wait("GUEST-POWEROFF", T);
    assert_eq!(vm.exit_code(T), Some(0));
    assert!(q.event_names().contains(&"POWERDOWN".to_string()));
}

/// `reboot` in the guest (an ACPI reset) reboots it in place, twice, each
/// time with a `RESET` event; then the rebooted guest's live snapshot
/// restores in a new process.
fn reboot(ctx: &Ctx) {
    let mut vm = ctx.linux("vm", "256M", "1", "reboot", &[]);
    let mut q = qmp(&vm);
    for _ in 0..2 {
        vm.wait("GUEST-REBOOT-READY", T);
        vm.type_line("again");
        vm.wait("GUEST-REBOOT", T);
        vm.wait("reboot: Restarting system", T);
        let up = vm.wait("GUEST-UP", T);
        assert!(
            up.contains("mode=reboot"),
            "the same kernel boots again: {up}"
        );
    }
    vm.wait("GUEST-REBOOT-READY", T);
    vm.type_line("stay");
    let before = stress_lines(&mut vm, 2).pop().unwrap();
    let _ = q.ok("query-status", json!({}));
    let resets: Vec<_> = q.events.iter().filter(|e| e["event"] == "RESET").collect();
    assert_eq!(resets.len(), 2, "a RESET per reboot: {:?}", q.events);
    assert!(resets
        .iter()
        .all(|e| e["data"] == json!({"guest": true, "reason": "guest-reset"})));
    assert!(!q.event_names().contains(&"SHUTDOWN".to_string()));
    // Snapshots work after the reboots (the machine and its RAM are new).
    q.ok(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "background-snapshot", "state": true}]}),
    );
    let snap = ctx.dir.join("linux-rebooted.snap");
    snapshot_to(&mut q, &snap);
    q.ok("quit", json!({}));
    assert_eq!(vm.exit_code(T), Some(0));
    let mut dst = ctx.vm(
        "restored",
        &["--incoming", &format!("file:{}", snap.display())],
    );
    check_restored(&mut dst, &before);
    let mut q = qmp(&dst);
    q.ok("quit", json!({}));
    dst.exit_code(T);
}

/// The kernel arguments of other VMMs' guides each boot to userspace, the
/// serial console takes typed input (its interrupt arrives), and a disk
/// reads where the guest can see it. `noapic` (firecracker-containerd's)
/// runs the ISA interrupts through the 8259s (snapvmm gives that command
/// line a PC-compatible ACPI machine). `acpi=off` is not here: see
/// docs/LINUX.md. `--no-reboot`: a panic (`panic=1` reboots) ends the VM
/// and fails here at once.
fn boot_args(ctx: &Ctx) {
    let disk = ctx.dir.join("args.raw");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let d = format!("{},format=raw", disk.display());
    // (name, arguments, a disk attached, what takes COM1's interrupt, the VM powers off)
    let sets = [
        (
            "firecracker",
            "console=ttyS0 reboot=k panic=1 pci=off",
            false,
            "IO-APIC",
            true,
        ),
        (
            "firecracker-containerd",
            "console=ttyS0 noapic reboot=k panic=1 pci=off nomodules",
            true,
            "XT-PIC",
            true,
        ),
        ("qemu", "console=ttyS0 root=/dev/vda", true, "IO-APIC", true),
        (
            "acpi-off",
            "console=ttyS0 acpi=off",
            false,
            "IO-APIC",
            false,
        ),
    ];
    for (name, args, with_disk, irq_chip, powers_off) in sets {
        // Quiet: each console character is an exit from the guest, and the
        // TCG VM's nested SVM stopped for good now and then (about one run in
        // three) in the stream of exits a verbose boot makes. The checks below
        // come from the guest's init, not from the kernel's messages.
        let cmdline = format!("{args} quiet snaptest=args");
        let mut extra = vec!["--no-reboot"];
        if with_disk {
            extra.extend(["--disk", &d]);
        }
        let mut vm = ctx.linux_cmdline(name, "256M", "1", &cmdline, &extra);
        let irq = vm.wait("GUEST-SERIAL-IRQ", T);
        assert!(
            irq.contains(irq_chip) && irq.contains("ttyS0"),
            "{name}: the serial interrupt on {irq_chip}: {irq}"
        );
        if with_disk {
            let l = vm.wait_any(&["GUEST-VDA", "GUEST-ERROR"], T);
            assert!(l.contains("read ok"), "{name}: {l}");
        }
        vm.wait("GUEST-SHELL", T);
        type_until_echoed(&mut vm);
        if powers_off {
            vm.type_line("exit");
            vm.wait("GUEST-POWEROFF", T);
            assert_eq!(vm.exit_code(T), Some(0), "{name}: powered off");
        } else {
            // No ACPI: nothing to power off with; the host ends it.
            let mut q = qmp(&vm);
            q.ok("quit", json!({}));
            assert_eq!(vm.exit_code(T), Some(0), "{name}");
        }
    }
}

fn create_disks(dir: &Path) -> (PathBuf, PathBuf) {
    std::fs::create_dir_all(dir).unwrap();
    let raw = dir.join("disk.raw");
    std::fs::File::create(&raw)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let q = dir.join("disk.qcow2");
    qcow2::Qcow2::create(&q, 64 << 20, qcow2::CreateOptions::default()).unwrap();
    (raw, q)
}

/// Linux's own virtio-mmio (found in the DSDT) and virtio-blk drivers: a file
/// system made, written, read back on a raw and on a qcow2 disk.
fn disks(ctx: &Ctx) {
    let out = ctx.export.join("virtio-blk-raw-qcow2");
    let (raw, q) = create_disks(&out);
    let d0 = format!("{},format=raw", raw.display());
    let d1 = format!("{},format=qcow2", q.display());
    let mut vm = ctx.linux("vm", "256M", "1", "disk", &["--disk", &d0, "--disk", &d1]);
    let acpi = vm.wait("GUEST-ACPI", T);
    assert!(acpi.ends_with(": 2"), "{acpi}");
    let mut sums = String::new();
    for _ in 0..8 {
        let l = vm.wait_any(&["GUEST-SUM", "GUEST-ERROR"], T);
        assert!(!l.contains("GUEST-ERROR"), "{l}");
        sums.push_str(&l);
        sums.push('\n');
    }
    vm.wait("GUEST-POWEROFF", T);
    assert_eq!(vm.exit_code(T), Some(0));
    // Write-zeroes, discard and fstrim went through Linux's driver on both.
    let text = ctx.console.text();
    for d in ["vda", "vdb"] {
        for what in ["GUEST-ZEROED", "GUEST-DISCARDED", "GUEST-TRIMMED"] {
            assert!(text.contains(&format!("{what} {d}")), "no {what} {d}");
        }
    }
    std::fs::write(out.join("guest-sums.txt"), sums).unwrap();
}

/// The disks on virtio-pci (`--virtio-transport pci`), 2 vCPUs: Linux's own
/// virtio_pci driver finds them on the PCI bus (no virtio-mmio device is
/// described), takes a request queue per vCPU and MSI-X vectors; a file
/// system is made, written and read back on a raw and a qcow2 disk. Then a
/// live snapshot restores in a new process (the transport from the image,
/// the MSI-X routes set again) and a disk still completes requests there.
/// On the host: `qemu-img check` and `e2fsck -fn` clean, the files intact.
fn pci_disks(ctx: &Ctx) {
    let out = ctx.export.join("virtio-pci-disks-snapshot-restore");
    let (raw, q) = create_disks(&out);
    let d0 = format!("{},format=raw", raw.display());
    let d1 = format!("{},format=qcow2", q.display());
    let disks = ["--disk", &d0, "--disk", &d1];
    let mut args = vec!["--virtio-transport", "pci"];
    args.extend(disks);
    let mut vm = ctx.linux("vm", "256M", "2", "pci", &args);
    let l = vm.wait_any(&["GUEST-PCI", "GUEST-ERROR"], T);
    // The host bridge and the two disks; a queue per vCPU; config and
    // queue vectors of both disks; nothing on virtio-mmio.
    assert!(l.contains("functions=3 "), "{l}");
    assert!(l.contains("vda_queues=2 "), "{l}");
    assert!(field(&l, "msi_vectors=") >= 4, "{l}");
    assert!(l.contains("mmio=0"), "{l}");
    for d in ["vda", "vdb"] {
        for _ in 0..2 {
            let s = vm.wait_any(&["GUEST-SUM", "GUEST-ERROR"], T);
            assert!(s.contains(&format!("GUEST-SUM {d} ")), "{s}");
        }
    }
    vm.wait("GUEST-SHELL", T);
    let before = stress_lines(&mut vm, 2).pop().unwrap();
    let mut qm = qmp(&vm);
    let snap = ctx.dir.join("linux-pci.snap");
    live_snapshot_to(&mut qm, &snap);
    qm.ok("quit", json!({}));
    assert_eq!(vm.exit_code(T), Some(0));
    let incoming = format!("file:{}", snap.display());
    let mut args = vec!["--incoming", incoming.as_str()];
    args.extend(disks);
    let mut dst = ctx.vm("restored", &args);
    check_restored(&mut dst, &before);
    type_until_echoed(&mut dst);
    dst.type_line(
        "dd if=/dev/vdb of=/dev/null bs=4k count=256 iflag=direct && echo pci-read-$((6*7))",
    );
    dst.wait("pci-read-42", T);
    let mut qm = qmp(&dst);
    qm.ok("quit", json!({}));
    assert_eq!(dst.exit_code(T), Some(0));
}

/// Issue 23's table (a benchmark, run by name): 1 MiB and 4 KiB direct reads
/// and writes on a raw and a qcow2 disk with 1 vCPU; with 2 vCPUs 4 KiB reads
/// from either vCPU and a vCPU computing beside one that reads; in snapvmm
/// (virtio-mmio, and virtio-pci) and in QEMU (`-drive if=virtio`, its defaults) on fresh images in the same
/// TCG VM (the raw one written whole first). Figures: [`figure`] lines.
fn disk_throughput(ctx: &Ctx) {
    let dir = ctx.dir.join("diskbench");
    std::fs::create_dir_all(&dir).unwrap();
    let raw = dir.join("disk.raw");
    let q = dir.join("disk.qcow2");
    let fresh = || {
        let _ = std::fs::remove_file(&raw);
        let _ = std::fs::remove_file(&q);
        // Written whole, not sparse: a VMM's first write then measures its
        // own path, not the TCG VM finding pages for the file (which was
        // slowest for whichever VMM ran after another).
        std::fs::write(&raw, vec![0u8; 128 << 20]).unwrap();
        qcow2::Qcow2::create(&q, 128 << 20, qcow2::CreateOptions::default()).unwrap();
    };
    let runs = [
        ("snapvmm", "1"),
        ("snapvmm-pci", "1"),
        ("snapvmm-pci-base", "1"),
        ("qemu", "1"),
        ("snapvmm", "2"),
        ("snapvmm-pci", "2"),
        ("qemu", "2"),
    ];
    for (pass, (vmm, cpus)) in bench_order(&runs, |r| r.0) {
        fresh();
        let mut vm = if vmm.starts_with("snapvmm") {
            let d0 = format!("{},format=raw", raw.display());
            let d1 = format!("{},format=qcow2", q.display());
            let mut args = vec!["--disk", &d0, "--disk", &d1];
            if vmm.starts_with("snapvmm-pci") {
                args.extend(["--virtio-transport", "pci"]);
            }
            ctx.linux(vmm, "256M", cpus, "diskbench", &args)
        } else {
            let d0 = format!("file={},format=raw,if=virtio", raw.display());
            let d1 = format!("file={},format=qcow2,if=virtio", q.display());
            ctx.qemu(
                vmm,
                "256M",
                cpus,
                "diskbench",
                &["-drive", &d0, "-drive", &d1],
            )
        };
        loop {
            let l = vm.wait_any(&["DISKBENCH", "GUEST-ERROR"], T);
            assert!(!l.contains("GUEST-ERROR"), "{vmm}: {l}");
            figure(
                "disk-throughput",
                &format!("vmm={vmm} vcpus={cpus} pass={pass} {l}"),
            );
            if l.contains("DISKBENCH-DONE") {
                break;
            }
        }
        vm.wait("GUEST-POWEROFF", T);
        let _ = vm.exit_code(T);
    }
}

fn stress_lines(vm: &mut Vm, n: usize) -> Vec<String> {
    (0..n)
        .map(|_| {
            let l = vm.wait_any(&["STRESS pass=", "CORRUPT"], T);
            assert!(!l.contains("CORRUPT"), "{l}");
            assert!(l.ends_with("corrupt=0"), "{l}");
            l
        })
        .collect()
}

/// Checks a restored guest: the stress process continues at (or after) the
/// pass it was in, its monotonic clock does not go back, timers fire about once
/// a second, nothing is corrupt.
fn check_restored(vm: &mut Vm, before: &str) {
    let after = stress_lines(vm, 3);
    assert!(
        field(&after[0], "pass=") >= field(before, "pass="),
        "the guest went back in time: {before} -> {}",
        after[0]
    );
    assert!(
        field(&after[0], "mono_ms=") >= field(before, "mono_ms="),
        "monotonic time went backwards: {before} -> {}",
        after[0]
    );
    for _ in 0..2 {
        let t = vm.wait("TIMER slept_ms=", T);
        let ms = field(&t, "slept_ms=");
        assert!((900..6000).contains(&ms), "sleep 1 took {ms} ms: {t}");
    }
    // The program prints from inside its page loop (every 1024 pages, once a second):
    // lines with a later monotonic time are progress, however slow a pass is here.
    for w in after.windows(2) {
        assert!(
            field(&w[1], "mono_ms=") > field(&w[0], "mono_ms="),
            "the guest makes progress: {after:?}"
        );
    }
    type_until_echoed(vm);
}

/// Types a command on the serial console until the guest's shell has run it.
fn type_until_echoed(vm: &mut Vm) {
    let end = Instant::now() + T;
    loop {
        vm.type_line("echo typed-$((6*7))");
        match vm.poll(&["typed-42"], Duration::from_secs(10)) {
            Ok(_) => return,
            Err(e) if e.contains("exited") => panic!("{e}"),
            Err(_) => {}
        }
        assert!(
            Instant::now() < end,
            "the console never ran the typed command"
        );
    }
}

/// How many of the guest kernel's messages contain `text`, asked on its
/// console (the marker is computed by the shell, so the echo of the typed
/// line does not match it).
fn kernel_messages(vm: &mut Vm, text: &str) -> u64 {
    let end = Instant::now() + T;
    loop {
        vm.type_line(&format!("echo KMSG$((2+2))=$(dmesg | grep -c '{text}')"));
        match vm.poll(&["KMSG4="], Duration::from_secs(10)) {
            Ok(l) => return field(&l, "KMSG4="),
            Err(e) if e.contains("exited") => panic!("{e}"),
            Err(_) => {}
        }
        assert!(Instant::now() < end, "the console never answered");
    }
}

/// 16 bytes from the guest's RNG (`/dev/urandom`), as hex.
fn guest_random(vm: &mut Vm) -> String {
    let end = Instant::now() + T;
    loop {
        vm.type_line("echo RND$((1+1))=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n')");
        match vm.poll(&["RND2="], Duration::from_secs(10)) {
            Ok(l) => {
                let hex = field_text(&l, "RND2=");
                assert_eq!(hex.len(), 32, "16 random bytes: {l}");
                return hex;
            }
            Err(e) if e.contains("exited") => panic!("{e}"),
            Err(_) => {}
        }
        assert!(Instant::now() < end, "the console never answered");
    }
}

/// What Linux logs when the VM generation ID changes (vmgenid driver →
/// add_vmfork_randomness).
const VMFORK: &str = "crng reseeded due to virtual machine fork";

fn generation_id(q: &mut Qmp) -> String {
    let g = q.ok("query-vm-generation-id", json!({}));
    g["guid"].as_str().expect("a guid").to_string()
}

/// Waits until a live migration's source and target both say `completed`.
pub fn migration_completed(sides: [&mut Qmp; 2]) {
    let end = Instant::now() + T;
    for q in sides {
        loop {
            let m = q.ok("query-migrate", json!({}));
            if m["status"] == "completed" {
                break;
            }
            assert!(
                Instant::now() < end,
                "the live migration did not complete: {m}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// A live snapshot (`background-snapshot`) of the running guest to `path`.
pub fn live_snapshot_to(q: &mut Qmp, path: &Path) {
    q.ok(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "background-snapshot", "state": true}]}),
    );
    snapshot_to(q, path);
}

fn snapshot_to(q: &mut Qmp, path: &Path) {
    let r = q.ok(
        "migrate",
        json!({"uri": format!("file:{}", path.display())}),
    );
    assert_eq!(r, json!({}));
    let m = q.wait_migration(T);
    assert_eq!(m["status"], "completed", "{m}");
}

/// A live snapshot of a Linux guest rewriting 64 MiB as fast as it can, restored
/// in a new process (`--incoming file:`) and with `--incoming defer` +
/// `migrate-incoming`.
fn live_snapshot(ctx: &Ctx) {
    live(ctx, "fork", true);
}

/// The write-protect capture (`x-snapshot-method: uffd`) of the same guest,
/// restored in a new process; then an incremental snapshot over it, restored
/// as a chain with RAM filled while the guest runs (`--restore-mode uffd`),
/// and the full one restored warm (`--incoming defer` into a VM built ahead).
fn write_protect_snapshot(ctx: &Ctx) {
    live(ctx, "uffd", false);
    let full = ctx.dir.join("linux-uffd-full.snap");
    let inc = ctx.dir.join("linux-uffd-inc.snap");
    let mut src = ctx.linux("src2", "256M", "2", "mem", &[]);
    let mut q = qmp(&src);
    q.ok(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "background-snapshot", "state": true}]}),
    );
    q.ok(
        "migrate-set-parameters",
        json!({"x-snapshot-method": "uffd"}),
    );
    let at_full = stress_lines(&mut src, 2).pop().unwrap();
    snapshot_to(&mut q, &full);
    q.ok(
        "migrate-set-parameters",
        json!({"x-parent": format!("file:{}", full.display())}),
    );
    let at_inc = stress_lines(&mut src, 2).pop().unwrap();
    snapshot_to(&mut q, &inc);
    let m = q.ok("query-migrate", json!({}));
    let written = m["x-incremental"]["ram-bytes-written"].as_u64().unwrap();
    assert!(written < 256 << 20, "only what changed: {m}");
    q.ok("quit", json!({}));
    src.exit_code(T);

    let mut dst = ctx.vm(
        "chain",
        &[
            "--incoming",
            &format!("file:{}", inc.display()),
            "--restore-mode",
            "uffd",
        ],
    );
    check_restored(&mut dst, &at_inc);
    let mut q = qmp(&dst);
    q.ok("quit", json!({}));
    dst.exit_code(T);

    let mut warm = ctx.vm(
        "warm",
        &[
            "--mem",
            "256M",
            "--cpus",
            "2",
            "--incoming",
            "defer",
            "--restore-mode",
            "uffd",
        ],
    );
    let mut q = qmp(&warm);
    q.ok(
        "migrate-incoming",
        json!({"uri": format!("file:{}", full.display())}),
    );
    let m = q.ok("query-migrate", json!({}));
    assert_eq!(m["x-restore"]["warm"], true, "{m}");
    check_restored(&mut warm, &at_full);
    q.ok("quit", json!({}));
    warm.exit_code(T);
}

fn live(ctx: &Ctx, method: &str, with_defer: bool) {
    let snap = ctx.dir.join(format!("linux-{method}.snap"));
    let mut src = ctx.linux("src", "256M", "2", "mem", &[]);
    let mut q = qmp(&src);
    q.ok(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "background-snapshot", "state": true}]}),
    );
    q.ok(
        "migrate-set-parameters",
        json!({"x-snapshot-method": method}),
    );
    let before = stress_lines(&mut src, 2).pop().unwrap();
    let src_id = generation_id(&mut q);
    snapshot_to(&mut q, &snap);
    let m = q.ok("query-migrate", json!({}));
    assert_eq!(m["x-snapshot-method"], method, "{m}");
    // The source kept running.
    stress_lines(&mut src, 2);
    assert_eq!(q.ok("query-status", json!({}))["status"], "running");
    q.ok("quit", json!({}));
    src.exit_code(T);

    let incoming = format!("file:{}", snap.display());
    let mut dst = ctx.vm(
        "restored",
        &["--mem", "256M", "--cpus", "2", "--incoming", &incoming],
    );
    // The console still works after a restore (the serial device's state came along).
    check_restored(&mut dst, &before);
    // A restored guest is a new generation: a new ID, and Linux's vmgenid
    // driver reseeded its random number generator (the booted one had not).
    let mut q = qmp(&dst);
    let dst_id = generation_id(&mut q);
    assert_ne!(dst_id, src_id, "a restore gets a new VM generation ID");
    assert!(
        kernel_messages(&mut dst, VMFORK) >= 1,
        "the restored guest reseeded its RNG"
    );
    let dst_random = guest_random(&mut dst);
    q.ok("quit", json!({}));
    dst.exit_code(T);
    if !with_defer {
        return;
    }
    let mut late = ctx.vm(
        "deferred",
        &["--mem", "256M", "--cpus", "2", "--incoming", "defer"],
    );
    let mut q = qmp(&late);
    q.ok("migrate-incoming", json!({"uri": incoming}));
    check_restored(&mut late, &before);
    let late_id = generation_id(&mut q);
    assert!(
        late_id != src_id && late_id != dst_id,
        "two clones, two IDs"
    );
    // The same commands after the same restore: with one RNG state the two
    // clones would draw the same bytes.
    let late_random = guest_random(&mut late);
    assert_ne!(
        dst_random, late_random,
        "two clones of one image drew the same random bytes"
    );
    q.ok("quit", json!({}));
    late.exit_code(T);
}

/// A Linux guest rewriting memory live-migrates (a pre-copy pass, then
/// post-copy, over a unix socket) to a target waiting with `--incoming
/// defer`: it goes on there, the source ends `postmigrate`. Then the target streams a live snapshot through
/// `gzip` (`exec:`), restored from `gzip -dc` in a third process.
fn live_migration(ctx: &Ctx) {
    let mut src = ctx.linux("src", "256M", "2", "mem", &[]);
    let mut qs = qmp(&src);
    let mut dst = ctx.vm("dst", &["--incoming", "defer"]);
    let mut qd = qmp(&dst);
    let sock = ctx.dir.join("mig.sock");
    let uri = format!("unix:{}", sock.display());
    qd.ok("migrate-incoming", json!({ "uri": uri }));
    let before = stress_lines(&mut src, 2).pop().unwrap();
    assert_eq!(kernel_messages(&mut src, VMFORK), 0, "a booted guest");
    let src_id = generation_id(&mut qs);
    qs.ok("migrate", json!({ "uri": uri }));
    check_restored(&mut dst, &before);
    // A live migration moves the one VM: same generation, no reseed.
    assert_eq!(generation_id(&mut qd), src_id);
    assert_eq!(kernel_messages(&mut dst, VMFORK), 0, "a migrated guest");
    migration_completed([&mut qs, &mut qd]);
    assert_eq!(qs.ok("query-status", json!({}))["status"], "postmigrate");
    // Loading a Linux guest's state touches its kvmclock, steal-time and
    // async-PF pages: they came with the state, nothing was fetched in the pause.
    let m = qd.ok("query-migrate", json!({}));
    assert_eq!(m["x-postcopy-target"]["requests-before-switch"], 0, "{m}");
    // A pre-copy pass (the default) went first, with the guest running: the
    // target kept what the guest did not write since, and the source sent
    // again exactly the rest.
    let ms = qs.ok("query-migrate", json!({}));
    let (pre, t) = (&ms["x-precopy"], &m["x-postcopy-target"]);
    let n = |v: &serde_json::Value| v.as_u64().unwrap_or_else(|| panic!("{ms} {m}"));
    let (kept, dropped) = (
        n(&t["precopy-chunks-kept"]),
        n(&t["precopy-chunks-dropped"]),
    );
    assert!(n(&pre["chunks-sent"]) > 0, "{ms}");
    assert_eq!(kept + dropped, n(&pre["chunks-sent"]), "{ms} {m}");
    assert_eq!(dropped, n(&pre["chunks-rewritten"]), "{ms} {m}");
    let pc = &ms["x-postcopy"];
    assert_eq!(
        n(&pc["chunks-pushed"]) + n(&pc["chunks-requested"]),
        n(&pc["chunks"]) - kept,
        "{ms}"
    );
    qs.ok("quit", json!({}));
    src.exit_code(T);

    let gz = ctx.dir.join("linux.snap.gz");
    qd.ok(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "background-snapshot", "state": true}]}),
    );
    let at = stress_lines(&mut dst, 1).pop().unwrap();
    qd.ok(
        "migrate",
        json!({"uri": format!("exec:gzip -1 > {}", gz.display())}),
    );
    let m = qd.wait_migration(T);
    assert_eq!(m["status"], "completed", "{m}");
    qd.ok("quit", json!({}));
    dst.exit_code(T);
    let mut back = ctx.vm(
        "back",
        &["--incoming", &format!("exec:gzip -dc {}", gz.display())],
    );
    check_restored(&mut back, &at);
    qmp(&back).ok("quit", json!({}));
    back.exit_code(T);
}

/// Ten live snapshots in a row of the same running guest; the last one restores.
fn ten_snapshots(ctx: &Ctx) {
    let mut src = ctx.linux("src", "256M", "1", "mem", &[]);
    let mut q = qmp(&src);
    q.ok(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "background-snapshot", "state": true}]}),
    );
    let mut before = stress_lines(&mut src, 1).pop().unwrap();
    let mut last = PathBuf::new();
    for i in 0..10 {
        let next = ctx.dir.join(format!("ten-{i}.snap"));
        before = stress_lines(&mut src, 1).pop().unwrap();
        snapshot_to(&mut q, &next);
        // Only the last image is restored: keep the scratch space (a tmpfs in the TCG VM) small.
        let _ = std::fs::remove_file(&last);
        last = next;
    }
    q.ok("quit", json!({}));
    src.exit_code(T);
    let incoming = format!("file:{}", last.display());
    let mut dst = ctx.vm(
        "restored",
        &["--mem", "256M", "--cpus", "1", "--incoming", &incoming],
    );
    check_restored(&mut dst, &before);
    qmp(&dst).ok("quit", json!({}));
    dst.exit_code(T);
}

fn wait_job(q: &mut Qmp, id: &str) {
    let end = Instant::now() + T;
    loop {
        let jobs = q.ok("query-jobs", json!({}));
        let job = jobs
            .as_array()
            .and_then(|a| a.iter().find(|j| j["id"] == id))
            .cloned()
            .unwrap_or_else(|| panic!("job {id} not in {jobs}"));
        if job["status"] == "concluded" {
            assert!(job.get("error").is_none(), "job {id} failed: {job}");
            q.ok("job-dismiss", json!({"id": id}));
            return;
        }
        assert!(Instant::now() < end, "job {id} still {job}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The first files line of the guest as loaded: the snapshot instant, no later
/// than the line after the save ended (`at_end`), and consistent. Lines the
/// guest printed before the load took effect (`n >= skip_from`) are skipped.
fn files_after_load(vm: &mut Vm, at_end: u64, skip_from: u64) -> u64 {
    loop {
        let l = vm.wait_any(&["FILES n=", "FILES done", "CORRUPT"], T);
        assert!(!l.contains("CORRUPT") && !l.contains("done"), "{l}");
        assert!(l.ends_with(" ok"), "{l}");
        let n = field(&l, "n=");
        if n >= skip_from {
            continue;
        }
        assert!(n <= at_end + 1, "{l}: the snapshot ended at n={at_end}");
        return n;
    }
}

/// savevm/loadvm of a Linux guest writing files on its qcow2 disk: after
/// `snapshot-load` (and `--loadvm` in a new process) the guest finds exactly
/// the files of the snapshot instant, finishes, and unmounts cleanly.
fn savevm(ctx: &Ctx) {
    let out = ctx.export.join("savevm-loadvm-qcow2");
    let (_, q2) = create_disks(&out);
    let disk = format!("{},format=qcow2,id=disk0", q2.display());
    let mut vm = ctx.linux("vm", "256M", "1", "files", &["--disk", &disk]);
    let first = vm.wait("FILES n=4 ", T);
    assert!(first.ends_with(" ok"), "{first}");
    let mut q = qmp(&vm);
    q.ok(
        "snapshot-save",
        json!({"job-id": "save", "tag": "t1", "vmstate": "disk0", "devices": ["disk0"]}),
    );
    wait_job(&mut q, "save");
    let at_end = field(&vm.wait("FILES n=", T), "n=");
    // More files after the snapshot, which the load must take back.
    let skip_from = at_end + 3;
    vm.wait(&format!("FILES n={skip_from} "), T);
    q.ok(
        "snapshot-load",
        json!({"job-id": "load", "tag": "t1", "vmstate": "disk0", "devices": ["disk0"]}),
    );
    wait_job(&mut q, "load");
    let k = files_after_load(&mut vm, at_end, skip_from);
    assert!(k >= 4, "loaded n={k}, the save began at n=4");
    vm.wait("FILES done n=60", T);
    vm.wait("GUEST-UMOUNTED", T);
    vm.wait("GUEST-POWEROFF", T);
    assert_eq!(vm.exit_code(T), Some(0));

    // A new process from the same snapshot.
    let mut again = ctx.vm(
        "loadvm",
        &[
            "--mem", "256M", "--cpus", "1", "--disk", &disk, "--loadvm", "t1",
        ],
    );
    assert_eq!(files_after_load(&mut again, at_end, u64::MAX), k);
    again.wait("FILES done n=60", T);
    again.wait("GUEST-UMOUNTED", T);
    again.wait("GUEST-POWEROFF", T);
    assert_eq!(again.exit_code(T), Some(0));
}

/// Scenario report lines, as printed where the scenarios run and parsed by the host.
pub fn report_line(name: &str, r: &Result<(), String>) -> String {
    match r {
        Ok(()) => format!("LINUX-SCENARIO {name} PASS"),
        Err(e) => format!("LINUX-SCENARIO {name} FAIL {}", e.replace('\n', " | ")),
    }
}
