//! Boots a Linux bzImage to a shell. Linux cannot boot on PVM hosts (guest
//! ring 0 is emulated there and faults on some instructions), so this runs only
//! where `/proc/cpuinfo` shows `vmx` or `svm`, and otherwise says why it skipped.
//! The kernel comes from `SNAPVMM_LINUX_BZIMAGE` or `/boot/vmlinuz-*`; the
//! initramfs is built here from a static busybox (`/bin/busybox`).

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;

fn skip_reason() -> Option<String> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let flags = cpuinfo
        .lines()
        .find(|l| l.starts_with("flags"))
        .unwrap_or("");
    if !flags.split_whitespace().any(|f| f == "vmx" || f == "svm") {
        return Some("no vmx/svm in /proc/cpuinfo (PVM host: Linux cannot boot here)".into());
    }
    if find_kernel().is_none() {
        return Some("no bzImage (set SNAPVMM_LINUX_BZIMAGE or install a kernel in /boot)".into());
    }
    if !Path::new("/bin/busybox").exists() {
        return Some("no /bin/busybox for the initramfs (apt-get install busybox-static)".into());
    }
    None
}

fn find_kernel() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("SNAPVMM_LINUX_BZIMAGE") {
        return Some(PathBuf::from(p));
    }
    let mut v: Vec<_> = std::fs::read_dir("/boot")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .collect();
    v.sort();
    v.pop()
}

/// A newc cpio archive with /init (a shell script) and /bin/busybox.
fn initramfs() -> Vec<u8> {
    let busybox = std::fs::read("/bin/busybox").unwrap();
    let init = b"#!/bin/busybox sh\n/bin/busybox mkdir -p /proc\n/bin/busybox echo SNAPVMM-LINUX-SHELL\nexec /bin/busybox sh\n";
    let mut out = Vec::new();
    let mut ino = 1;
    let mut add = |name: &str, mode: u32, data: &[u8]| {
        let hdr = format!(
            "070701{ino:08x}{mode:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            0, 0, 1, 0, data.len(), 0, 0, 0, 0, name.len() + 1, 0
        );
        ino += 1;
        out.extend_from_slice(hdr.as_bytes());
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        while out.len() % 4 != 0 {
            out.push(0);
        }
        out.extend_from_slice(data);
        while out.len() % 4 != 0 {
            out.push(0);
        }
    };
    add("bin", 0o040755, b"");
    add("bin/busybox", 0o100755, &busybox);
    add("init", 0o100755, init);
    add("TRAILER!!!", 0, b"");
    out
}

#[test]
fn linux_bzimage_boots_to_a_shell() {
    if let Some(why) = skip_reason() {
        eprintln!("skipped: {why}");
        return;
    }
    let d = TempDir::new("linux");
    let rd = d.path("initramfs.cpio");
    std::fs::write(&rd, initramfs()).unwrap();
    let k = find_kernel().unwrap();
    let r = Running::spawn(snapvmm(&[
        "run",
        "--mem",
        "512M",
        "--cpus",
        "2",
        "--kernel",
        k.to_str().unwrap(),
        "--initrd",
        rd.to_str().unwrap(),
        "--cmdline",
        "console=ttyS0 panic=-1 rdinit=/init",
    ]));
    r.wait_line("SNAPVMM-LINUX-SHELL", Duration::from_secs(120));
}
