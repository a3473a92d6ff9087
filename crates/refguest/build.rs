//! Builds the freestanding reference guest (guest/*.S, guest/*.c) with gcc.
//!
//! The x86_64-unknown-none target cannot be installed on our machines, and the
//! guest needs a 32-bit PVH entry and a 16-bit AP trampoline anyway, so it is
//! plain C and assembly, linked by a script at 1 MiB.

use std::path::PathBuf;
use std::process::Command;

const SOURCES: &[&str] = &[
    "entry.S",
    "kernel.c",
    "user.c",
    "diskwrite.c",
    "virtio_blk.c",
];
const HEADERS: &[&str] = &["guest.h", "layout.h", "link.ld", "virtio_blk.h"];

fn main() {
    let dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap()).join("guest");
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("refguest.elf");
    for f in SOURCES.iter().chain(HEADERS) {
        println!("cargo:rerun-if-changed=guest/{f}");
    }
    let cc = std::env::var("REFGUEST_CC").unwrap_or_else(|_| "gcc".into());
    let status = Command::new(&cc)
        .current_dir(&dir)
        .args([
            "-O2",
            "-g0",
            "-ffreestanding",
            "-fno-pie",
            "-no-pie",
            "-static",
            "-nostdlib",
            "-mno-red-zone",
            "-mgeneral-regs-only",
            "-fno-stack-protector",
            "-fno-asynchronous-unwind-tables",
            "-mcmodel=small",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-Tlink.ld",
            "-Wl,--build-id=none",
            "-Wl,-z,noexecstack",
            "-Wl,--no-warn-rwx-segments",
            "-o",
        ])
        .arg(&out)
        .args(SOURCES)
        .status()
        .unwrap_or_else(|e| panic!("cannot run {cc} to build the reference guest: {e}"));
    assert!(status.success(), "building the reference guest failed");
}
