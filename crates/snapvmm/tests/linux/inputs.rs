//! What the Linux scenarios need, prepared once and cached under the target
//! directory: Debian's stock kernel and its modules, busybox-static (both with
//! `apt-get download` + `dpkg-deb -x`, nothing installed), the static workload
//! program (`stress.c`, gcc), and the guest's initramfs.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Debian's kernel package used by the scenarios (override with
/// `SNAPVMM_LINUX_KERNEL_PACKAGE`); when the archive no longer has it, the one
/// `linux-image-amd64` depends on.
pub const KERNEL_PACKAGE: &str = "linux-image-6.1.0-50-amd64";

/// Modules the guest loads (with their dependencies, resolved from the modules' own
/// `depends=` field): virtio-mmio and virtio-blk, ext4 (for ext2), the ACPI button,
/// the NIC and vsock; virtio-pci for the same guest under QEMU (benchmarks).
const GUEST_MODULES: &[&str] = &[
    "virtio",
    "virtio_ring",
    "virtio_mmio",
    "virtio_pci",
    "virtio_blk",
    "crc16",
    "mbcache",
    "jbd2",
    "crc32c_generic",
    "ext4",
    "evdev",
    "button",
    "failover",
    "net_failover",
    "virtio_net",
    "vsock",
    "vmw_vsock_virtio_transport_common",
    "vmw_vsock_virtio_transport",
];

/// Prepared inputs.
pub struct Inputs {
    /// The kernel (bzImage).
    pub kernel: PathBuf,
    /// The guest's initramfs (newc cpio).
    pub initrd: PathBuf,
    /// `lib/modules/<version>/kernel` of the unpacked package.
    pub modules: PathBuf,
    /// busybox-static.
    pub busybox: PathBuf,
}

pub fn cache_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("linux-guest-cache")
}

fn run(cmd: &mut Command) -> Result<String, String> {
    let o = cmd
        .output()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    if !o.status.success() {
        return Err(format!(
            "{cmd:?} failed ({}): {}{}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

fn kernel_package() -> Result<String, String> {
    if let Ok(p) = std::env::var("SNAPVMM_LINUX_KERNEL_PACKAGE") {
        return Ok(p);
    }
    if run(Command::new("apt-cache").args(["show", KERNEL_PACKAGE])).is_ok() {
        return Ok(KERNEL_PACKAGE.into());
    }
    let deps = run(Command::new("apt-cache").args(["depends", "linux-image-amd64"]))?;
    deps.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with("linux-image-") && p.ends_with("-amd64"))
        .map(str::to_string)
        .ok_or_else(|| format!("no kernel package found (apt-cache depends said: {deps})"))
}

/// Downloads and unpacks `pkg` into `root` unless done before.
fn unpack(pkg: &str, dir: &Path, root: &Path) -> Result<(), String> {
    let marker = dir.join(format!("{pkg}.unpacked"));
    if marker.exists() {
        return Ok(());
    }
    let dl = dir.join("downloads");
    std::fs::create_dir_all(&dl).map_err(|e| e.to_string())?;
    if run(Command::new("apt-get")
        .arg("download")
        .arg(pkg)
        .current_dir(&dl))
    .is_err()
    {
        // A fresh machine may not have the package lists yet.
        run(Command::new("apt-get").args(["update", "-qq"]))?;
        run(Command::new("apt-get")
            .arg("download")
            .arg(pkg)
            .current_dir(&dl))?;
    }
    let deb = std::fs::read_dir(&dl)
        .map_err(|e| e.to_string())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(&format!("{pkg}_")))
        })
        .ok_or_else(|| format!("apt-get download {pkg} left no .deb"))?;
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(root))?;
    std::fs::write(&marker, b"").map_err(|e| e.to_string())
}

/// The `depends=` field of a kernel module's `.modinfo`.
pub fn module_depends(ko: &[u8]) -> Vec<String> {
    let key = b"depends=";
    ko.windows(key.len())
        .position(|w| w == key)
        .map(|i| {
            let rest = &ko[i + key.len()..];
            let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
            String::from_utf8_lossy(&rest[..end])
                .split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// Finds `name.ko` under `modules`.
pub fn find_module(modules: &Path, name: &str) -> Option<PathBuf> {
    let want = format!("{name}.ko");
    let mut stack = vec![modules.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).ok()?.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.file_name().is_some_and(|n| n.to_string_lossy() == want) {
                return Some(p);
            }
        }
    }
    None
}

/// `names` and everything they depend on, dependencies first.
pub fn with_dependencies(modules: &Path, names: &[&str]) -> Result<Vec<(String, PathBuf)>, String> {
    fn visit(modules: &Path, name: &str, out: &mut Vec<(String, PathBuf)>) -> Result<(), String> {
        if out.iter().any(|(n, _)| n == name) {
            return Ok(());
        }
        let path = find_module(modules, name)
            .ok_or_else(|| format!("module {name} not found under {}", modules.display()))?;
        let bytes = std::fs::read(&path).map_err(|e| e.to_string())?;
        for dep in module_depends(&bytes) {
            visit(modules, &dep, out)?;
        }
        if !out.iter().any(|(n, _)| n == name) {
            out.push((name.to_string(), path));
        }
        Ok(())
    }
    let mut out = Vec::new();
    for n in names {
        visit(modules, n, &mut out)?;
    }
    Ok(out)
}

/// A newc cpio archive, built in memory.
#[derive(Default)]
pub struct Cpio {
    out: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.ino += 1;
        let hdr = format!(
            "070701{:08x}{mode:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.ino,
            0,
            0,
            1,
            0,
            data.len(),
            0,
            0,
            0,
            0,
            name.len() + 1,
            0
        );
        self.out.extend_from_slice(hdr.as_bytes());
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    pub fn dir(&mut self, name: &str) {
        self.entry(name, 0o040755, b"");
    }

    pub fn file(&mut self, name: &str, data: &[u8]) {
        self.entry(name, 0o100755, data);
    }

    pub fn file_from(&mut self, name: &str, src: &Path) -> Result<(), String> {
        let data = std::fs::read(src).map_err(|e| format!("{}: {e}", src.display()))?;
        self.file(name, &data);
        Ok(())
    }

    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, b"");
        self.out
    }
}

fn build_stress(dir: &Path) -> Result<PathBuf, String> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/linux/stress.c");
    let out = dir.join("stress");
    let fresh = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    if fresh(&out) < fresh(&src) || !out.exists() {
        run(Command::new("gcc")
            .args(["-O2", "-static", "-pthread", "-Wall", "-o"])
            .arg(&out)
            .arg(&src))?;
    }
    Ok(out)
}

/// Prepares (or finds in the cache) everything the guest needs.
pub fn prepare() -> Result<Inputs, String> {
    let dir = cache_dir();
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let kpkg = kernel_package()?;
    let root = dir.join("root");
    unpack(&kpkg, &dir, &root)?;
    unpack("busybox-static", &dir, &root)?;
    let version = kpkg
        .strip_prefix("linux-image-")
        .ok_or_else(|| format!("odd kernel package name {kpkg}"))?;
    let kernel = root.join(format!("boot/vmlinuz-{version}"));
    let modules = root.join(format!("lib/modules/{version}/kernel"));
    let busybox = root.join("bin/busybox");
    for p in [&kernel, &modules, &busybox] {
        if !p.exists() {
            return Err(format!("{} missing after unpacking", p.display()));
        }
    }
    let stress = build_stress(&dir)?;
    let mut c = Cpio::default();
    for d in ["bin", "modules", "dev", "proc", "sys", "mnt"] {
        c.dir(d);
    }
    c.file_from("bin/busybox", &busybox)?;
    c.file_from("stress", &stress)?;
    c.file_from(
        "init",
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/linux/init.sh"),
    )?;
    for (name, path) in with_dependencies(&modules, GUEST_MODULES)? {
        c.file_from(&format!("modules/{name}.ko"), &path)?;
    }
    let initrd = dir.join("guest-initrd.cpio");
    std::fs::write(&initrd, c.finish()).map_err(|e| e.to_string())?;
    Ok(Inputs {
        kernel,
        initrd,
        modules,
        busybox,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modinfo_depends_is_parsed() {
        let ko = b"\x7fELF junk\0license=GPL\0depends=virtio,virtio_ring\0vermagic=6.1\0";
        assert_eq!(module_depends(ko), vec!["virtio", "virtio_ring"]);
        assert!(module_depends(b"\0depends=\0").is_empty());
        assert!(module_depends(b"nothing").is_empty());
    }

    #[test]
    fn cpio_entries_are_aligned_and_terminated() {
        let mut c = Cpio::default();
        c.dir("bin");
        c.file("bin/x", b"hello");
        let out = c.finish();
        assert_eq!(out.len() % 4, 0);
        assert!(out.starts_with(b"070701"));
        assert!(out.windows(10).any(|w| w == b"TRAILER!!!"));
        assert!(out.windows(5).any(|w| w == b"hello"));
    }
}
