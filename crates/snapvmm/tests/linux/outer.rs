//! Where this host's `/dev/kvm` cannot run Linux (PVM), the scenarios run one
//! level down: QEMU in pure emulation (`-accel tcg -cpu max`) exposes AMD SVM
//! with nested paging, Debian's kernel there loads `kvm-amd`, and this very test
//! binary runs the scenarios inside, next to the snapvmm binary. Results come
//! back on the serial console (`LINUX-SCENARIO` lines); disk images for the
//! host-side checks come back as a tar archive written to a raw virtio disk.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::inputs::{with_dependencies, Cpio, Inputs};
use super::Report;

/// Modules of the outer VM: KVM for AMD, and virtio-blk over PCI for the export disk.
const OUTER_MODULES: &[&str] = &[
    "irqbypass",
    "ccp",
    "kvm",
    "kvm-amd",
    "virtio",
    "virtio_ring",
    "virtio_pci",
    "virtio_blk",
    "tun",
];

/// How often the outer VM's init says it is alive (`OUTER-ALIVE`).
const HEARTBEAT_S: u64 = 10;
/// A TCG VM whose console stays silent this long (no heartbeat) has stopped:
/// QEMU's nested SVM now and then leaves its one vCPU inside the L2 guest for
/// good, and then nothing in the outer VM runs again. It is killed, and the
/// scenarios it did not finish run in a fresh one.
const SILENCE_LIMIT: Duration = Duration::from_secs(90);

const OUTER_INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mkdir -p /proc /sys /dev /tmp /export
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules/order); do insmod /modules/$m.ko || echo "OUTER-ERROR insmod $m"; done
[ -c /dev/kvm ] && echo "OUTER-UP /dev/kvm ready" || echo "OUTER-ERROR no /dev/kvm"
ifconfig lo 127.0.0.1 up
(while :; do sleep #HEARTBEAT; echo OUTER-ALIVE; done) &
#SELECT
export PATH=/bin SNAPVMM_BIN=/bin/snapvmm SNAPVMM_LINUX_INPUTS=/inputs SNAPVMM_LINUX_EXPORT=/export TMPDIR=/tmp
/linux_guests --test-threads=1 --nocapture
echo "OUTER-TESTS-DONE rc=$?"
cd /export && tar -cf /dev/vda . && sync && echo "OUTER-EXPORTED"
poweroff -f
"#;

/// The shared libraries `ldd` lists for `bin`.
fn libraries(bin: &Path) -> Result<Vec<PathBuf>, String> {
    let o = Command::new("ldd")
        .arg(bin)
        .output()
        .map_err(|e| format!("ldd: {e}"))?;
    let text = String::from_utf8_lossy(&o.stdout);
    Ok(text
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let p = match l.split_once(" => ") {
                Some((_, rest)) => rest.split_whitespace().next()?,
                None => l.split_whitespace().next()?,
            };
            p.starts_with('/').then(|| PathBuf::from(p))
        })
        .collect())
}

/// What QEMU needs in the TCG VM to boot a Linux guest with `-kernel` on its
/// PC machine (`-nodefaults`, no display): the BIOS and the kernel loader.
const QEMU_FIRMWARE: &[&str] = &[
    "/usr/share/seabios/bios-256k.bin",
    "/usr/share/qemu/linuxboot_dma.bin",
    "/usr/share/qemu/linuxboot.bin",
    "/usr/share/qemu/kvmvapic.bin",
];

/// The host's `qemu-system-x86_64`, for scenarios that run QEMU beside snapvmm.
fn qemu_binary() -> Result<PathBuf, String> {
    let o = Command::new("sh")
        .args(["-c", "command -v qemu-system-x86_64"])
        .output()
        .map_err(|e| e.to_string())?;
    let p = String::from_utf8_lossy(&o.stdout).trim().to_string();
    if p.is_empty() {
        return Err("qemu-system-x86_64 is not installed".into());
    }
    Ok(PathBuf::from(p))
}

fn outer_initrd(inputs: &Inputs, dir: &Path, scenarios: &[&str]) -> Result<PathBuf, String> {
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    let snapvmm = super::vm::bin();
    let qemu = if scenarios.iter().any(|s| super::scenarios::needs_qemu(s)) {
        Some(qemu_binary()?)
    } else {
        None
    };
    let mut c = Cpio::default();
    let mut dirs = std::collections::BTreeSet::new();
    for d in ["bin", "modules", "inputs", "lib64"] {
        dirs.insert(d.to_string());
    }
    let firmware: Vec<PathBuf> = match qemu {
        Some(_) => QEMU_FIRMWARE.iter().map(PathBuf::from).collect(),
        None => Vec::new(),
    };
    let mut libs = Vec::new();
    for b in [&me, &snapvmm].into_iter().chain(qemu.as_ref()) {
        for l in libraries(b)? {
            if !libs.contains(&l) {
                libs.push(l);
            }
        }
    }
    for l in libs.iter().chain(&firmware) {
        let mut p = l.parent();
        while let Some(d) = p {
            let s = d.to_string_lossy().trim_start_matches('/').to_string();
            if !s.is_empty() {
                dirs.insert(s);
            }
            p = d.parent();
        }
    }
    let mut dirs: Vec<_> = dirs.into_iter().collect();
    dirs.sort_by_key(|d| d.matches('/').count());
    for d in &dirs {
        c.dir(d);
    }
    c.file(
        "bin/busybox",
        &std::fs::read(&inputs.busybox).map_err(|e| e.to_string())?,
    );
    let mut select = format!("export SNAPVMM_LINUX_SCENARIOS={}\n", scenarios.join(","));
    // Which VMMs the benchmarks run (all when unset).
    if let Ok(v) = std::env::var("SNAPVMM_BENCH_VMMS") {
        if v.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == ',' || c == '-')
        {
            select.push_str(&format!("export SNAPVMM_BENCH_VMMS={v}\n"));
        }
    }
    // How many times the benchmarks go through their VMMs.
    if let Ok(v) = std::env::var("SNAPVMM_BENCH_PASSES") {
        if let Ok(n) = v.parse::<u32>() {
            select.push_str(&format!("export SNAPVMM_BENCH_PASSES={n}\n"));
        }
    }
    // A second build for a benchmark to run beside this one in the same
    // TCG VM (`SNAPVMM_BENCH_BASELINE=PATH`: the benchmark's `-base` VMMs).
    if let Some(base) = std::env::var_os("SNAPVMM_BENCH_BASELINE") {
        c.file_from("bin/snapvmm-base", Path::new(&base))?;
        select.push_str("export SNAPVMM_BASE_BIN=/bin/snapvmm-base\n");
    }
    let init = OUTER_INIT
        .replace("#SELECT\n", &select)
        .replace("#HEARTBEAT", &HEARTBEAT_S.to_string());
    c.file("init", init.as_bytes());
    c.file_from("linux_guests", &me)?;
    c.file_from("bin/snapvmm", &snapvmm)?;
    // Follow symlinks: the archive holds the files under the names ldd gave
    // (and QEMU's firmware where QEMU looks for it).
    for l in libs.iter().chain(&firmware) {
        c.file_from(l.to_string_lossy().trim_start_matches('/'), l)?;
    }
    if let Some(q) = &qemu {
        c.file_from("bin/qemu-system-x86_64", q)?;
    }
    let mods = with_dependencies(&inputs.modules, OUTER_MODULES)?;
    let order: Vec<&str> = mods.iter().map(|(n, _)| n.as_str()).collect();
    c.file(
        "modules/order",
        format!("{}\n", order.join("\n")).as_bytes(),
    );
    for (name, path) in &mods {
        c.file_from(&format!("modules/{name}.ko"), path)?;
    }
    c.file_from("inputs/vmlinuz", &inputs.kernel)?;
    c.file_from("inputs/guest-initrd.cpio", &inputs.initrd)?;
    let out = dir.join("outer-initrd.cpio");
    std::fs::write(&out, c.finish()).map_err(|e| e.to_string())?;
    Ok(out)
}

/// Boots the TCG VM, runs `scenarios` inside, and collects their results and
/// exported disk images (under `dir/export`). The VM is killed after `limit`,
/// or once its console has been silent for [`SILENCE_LIMIT`].
pub fn run(
    inputs: &Inputs,
    dir: &Path,
    scenarios: &[&str],
    limit: Duration,
) -> Result<Report, String> {
    if Command::new("qemu-system-x86_64")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_err()
    {
        return Err(
            "qemu-system-x86_64 is not installed (this host's KVM cannot run Linux, so the \
             scenarios run inside a TCG VM): run .ci/install-qemu.sh"
                .into(),
        );
    }
    let initrd = outer_initrd(inputs, dir, scenarios)?;
    let export_img = dir.join("export.img");
    std::fs::File::create(&export_img)
        .and_then(|f| f.set_len(1 << 30))
        .map_err(|e| e.to_string())?;
    let log_path = dir.join("outer-console.log");
    let log = std::fs::File::create(&log_path).map_err(|e| e.to_string())?;
    let t0 = Instant::now();
    // One vCPU: with two (multi-threaded TCG), QEMU's nested SVM now and then
    // left a vCPU inside the L2 guest for good (RCU stalls in both kernels, a
    // scenario hanging); single-threaded TCG with two vCPUs crawled.
    // `SNAPVMM_OUTER_CPUS=2` asks for two anyway, for a benchmark figure that
    // needs a CPU per vCPU (the disk benchmark's vCPU computing beside I/O).
    let cpus = match std::env::var("SNAPVMM_OUTER_CPUS").as_deref() {
        Ok("2") => "2",
        _ => "1",
    };
    let accel = if cpus == "1" {
        "tcg"
    } else {
        "tcg,thread=multi"
    };
    let mut child = Command::new("qemu-system-x86_64")
        .args(["-accel", accel, "-cpu", "max", "-m", "4G", "-smp", cpus])
        .args(["-nographic", "-no-reboot", "-kernel"])
        .arg(&inputs.kernel)
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", "console=ttyS0 panic=-1 quiet"])
        .arg("-drive")
        .arg(format!(
            "file={},format=raw,if=virtio",
            export_img.display()
        ))
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log)
        .spawn()
        .map_err(|e| format!("cannot start qemu-system-x86_64: {e}"))?;
    let (mut heard, mut heard_at) = (0u64, Instant::now());
    let status = loop {
        if let Some(s) = child.try_wait().map_err(|e| e.to_string())? {
            break Ok(s);
        }
        let len = std::fs::metadata(&log_path).map(|m| m.len()).unwrap_or(0);
        if len != heard {
            (heard, heard_at) = (len, Instant::now());
        }
        let why = if t0.elapsed() > limit {
            Some(format!("killed after {limit:?}"))
        } else if heard_at.elapsed() > SILENCE_LIMIT {
            Some(format!(
                "killed: its console was silent for {SILENCE_LIMIT:?}"
            ))
        } else {
            None
        };
        if let Some(why) = why {
            let _ = child.kill();
            let _ = child.wait();
            break Err(why);
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let console = std::fs::read_to_string(&log_path).unwrap_or_default();
    let console = console.replace('\r', "");
    eprintln!(
        "TCG VM ran {:.0} s ({}); its console: {}",
        t0.elapsed().as_secs_f64(),
        match &status {
            Ok(s) => s.to_string(),
            Err(why) => why.clone(),
        },
        log_path.display()
    );
    let export = dir.join("export");
    std::fs::create_dir_all(&export).map_err(|e| e.to_string())?;
    if console.contains("OUTER-EXPORTED") {
        let st = Command::new("tar")
            .arg("-xf")
            .arg(&export_img)
            .arg("-C")
            .arg(&export)
            .status()
            .map_err(|e| e.to_string())?;
        if !st.success() {
            return Err(format!("cannot unpack the exported images ({st})"));
        }
    }
    let _ = std::fs::remove_file(&export_img);
    let mut report = parse(&console, export);
    if !console.contains("OUTER-EXPORTED") {
        // A scenario whose images never came back has not finished: it runs again.
        report
            .results
            .retain(|name, r| r.is_err() || !super::host_check::applies(name));
    }
    Ok(report)
}

/// Reads the `LINUX-SCENARIO` and `LINUX-CONSOLE` lines of the TCG VM's console.
pub fn parse(console: &str, export: PathBuf) -> Report {
    let mut results = BTreeMap::new();
    let mut logs: BTreeMap<String, String> = BTreeMap::new();
    let mut figures = Vec::new();
    for l in console.lines() {
        if let Some(rest) = l.strip_prefix("LINUX-FIGURE ") {
            figures.push(rest.to_string());
            continue;
        }
        if let Some(rest) = l.strip_prefix("LINUX-SCENARIO ") {
            let mut it = rest.splitn(3, ' ');
            let (Some(name), Some(verdict)) = (it.next(), it.next()) else {
                continue;
            };
            let r = if verdict == "PASS" {
                Ok(())
            } else {
                Err(it.next().unwrap_or("failed").to_string())
            };
            results.insert(name.to_string(), r);
        } else if let Some(rest) = l.strip_prefix("LINUX-CONSOLE ") {
            if let Some((name, line)) = rest.split_once(' ') {
                let e = logs.entry(name.to_string()).or_default();
                e.push_str(line);
                e.push('\n');
            }
        }
    }
    let tail: String = {
        let lines: Vec<&str> = console.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    };
    Report {
        results,
        logs,
        export: Some(export),
        missing_hint: tail,
        figures,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_and_logs_are_read_from_the_console() {
        let console = "noise\nLINUX-SCENARIO a PASS\nLINUX-CONSOLE b [vm] hello\nLINUX-FIGURE a vmm=x ms=3\nLINUX-SCENARIO b FAIL it broke | badly\n";
        let r = parse(console, PathBuf::from("/x"));
        assert_eq!(r.results["a"], Ok(()));
        assert_eq!(r.results["b"], Err("it broke | badly".into()));
        assert_eq!(r.logs["b"], "[vm] hello\n");
        assert!(!r.results.contains_key("c"));
        assert_eq!(r.figures, vec!["a vmm=x ms=3".to_string()]);
    }
}
