//! Host-side checks of the disk images some scenarios export: run on the
//! host even when the scenarios ran in the TCG VM, with QEMU's and
//! e2fsprogs' tools.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Scenarios whose disk images are checked from the host afterwards.
pub fn applies(name: &str) -> bool {
    matches!(
        name,
        "virtio-blk-raw-qcow2" | "savevm-loadvm-qcow2" | "virtio-pci-disks-snapshot-restore"
    )
}

fn tool(cmd: &mut Command) -> Result<String, String> {
    let o = cmd
        .output()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    if o.status.success() {
        Ok(text)
    } else {
        Err(format!("{cmd:?}: {}: {text}", o.status))
    }
}

/// What `stress content I` prints: the file contents the guest writes.
fn content(i: u64) -> Vec<u8> {
    let mut s = String::new();
    for l in 0..64 + i * 16 {
        s.push_str(&format!("snapvmm file {i} line {l}\n"));
    }
    s.into_bytes()
}

/// `e2fsck -fn` is clean and the root directory holds exactly `f0..f(n-1)`,
/// each with its content.
fn check_filesystem(img: &Path, n: u64) -> Result<(), String> {
    tool(Command::new("e2fsck").arg("-fn").arg(img))?;
    let ls = tool(Command::new("debugfs").arg("-R").arg("ls -l /").arg(img))?;
    let mut names: Vec<String> = ls
        .split_whitespace()
        .filter(|w| w.starts_with('f') && w[1..].chars().all(|c| c.is_ascii_digit()) && w.len() > 1)
        .map(str::to_string)
        .collect();
    names.sort();
    let mut want: Vec<String> = (0..n).map(|i| format!("f{i}")).collect();
    want.sort();
    if names != want {
        return Err(format!(
            "{}: files {names:?}, expected {want:?}",
            img.display()
        ));
    }
    for i in 0..n {
        let out = Command::new("debugfs")
            .arg("-R")
            .arg(format!("cat /f{i}"))
            .arg(img)
            .output()
            .map_err(|e| e.to_string())?;
        if out.stdout != content(i) {
            return Err(format!(
                "{}: /f{i} does not hold what the guest wrote",
                img.display()
            ));
        }
    }
    Ok(())
}

fn qcow2_check_and_convert(q: &Path) -> Result<PathBuf, String> {
    let check = tool(Command::new("qemu-img").arg("check").arg(q))?;
    if !check.contains("No errors were found") {
        return Err(format!("qemu-img check {}: {check}", q.display()));
    }
    let raw = q.with_extension("converted.raw");
    tool(
        Command::new("qemu-img")
            .args(["convert", "-O", "raw"])
            .arg(q)
            .arg(&raw),
    )?;
    Ok(raw)
}

/// Host-side checks of a scenario's disk images under `export`.
pub fn run(name: &str, export: &Path) -> Result<(), String> {
    let dir = export.join(name);
    match name {
        "virtio-blk-raw-qcow2" => {
            let converted = qcow2_check_and_convert(&dir.join("disk.qcow2"))?;
            let sums =
                std::fs::read_to_string(dir.join("guest-sums.txt")).map_err(|e| e.to_string())?;
            for (dev, img) in [("vda", dir.join("disk.raw")), ("vdb", converted)] {
                check_filesystem(&img, 4)?;
                for i in 0..4u64 {
                    let path = dir.join(format!("expected-f{i}"));
                    std::fs::write(&path, content(i)).map_err(|e| e.to_string())?;
                    let sum = tool(Command::new("sha256sum").arg(&path))?;
                    let sum = sum.split_whitespace().next().unwrap_or("");
                    let line = format!("GUEST-SUM {dev} {sum}  f{i}");
                    if !sums.lines().any(|l| l == line) {
                        return Err(format!(
                            "the guest read back something else: no {line:?} in\n{sums}"
                        ));
                    }
                }
            }
            Ok(())
        }
        "virtio-pci-disks-snapshot-restore" => {
            let converted = qcow2_check_and_convert(&dir.join("disk.qcow2"))?;
            check_filesystem(&dir.join("disk.raw"), 2)?;
            check_filesystem(&converted, 2)
        }
        "savevm-loadvm-qcow2" => {
            let q = dir.join("disk.qcow2");
            let list = tool(Command::new("qemu-img").args(["snapshot", "-l"]).arg(&q))?;
            if !list.contains("t1") {
                return Err(format!("qemu-img snapshot -l does not list t1: {list}"));
            }
            let converted = qcow2_check_and_convert(&q)?;
            check_filesystem(&converted, 60)
        }
        _ => Ok(()),
    }
}
