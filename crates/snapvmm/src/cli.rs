//! Command line: parsing and validation into a machine configuration.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};

/// snapvmm: a KVM micro-VMM with live snapshots.
#[derive(Parser, Debug)]
#[command(name = "snapvmm", version, about, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// The live-snapshot story in under a minute on the built-in guest: boot it writing
    /// memory, snapshot it live, restore the image in a second VM, check and print the figures.
    Demo(crate::demo::DemoArgs),
    /// Boot a VM (the built-in reference guest unless --kernel is given).
    Run(Box<RunArgs>),
    /// Write the built-in reference guest (a PVH ELF) to a file, e.g. to boot it under QEMU.
    ExportGuest {
        /// Where to write the ELF.
        path: PathBuf,
    },
    /// Write an incremental snapshot and the parents it needs as one full image.
    SquashImage {
        /// The incremental snapshot image (its parents are found as it records them).
        image: PathBuf,
        /// Where to write the full image (replaced atomically).
        output: PathBuf,
    },
}

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// Guest RAM, e.g. 512M, 1G (a plain number means MiB, as in QEMU) [default: 512M; a restore takes the image's].
    #[arg(long, short = 'm')]
    pub mem: Option<String>,
    /// Number of vCPUs [default: 1; a restore takes the image's].
    #[arg(long, visible_alias = "smp")]
    pub cpus: Option<String>,
    /// Kernel to boot: a PVH ELF, a Linux vmlinux or a Linux bzImage. Default: the built-in reference guest.
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk for the kernel.
    #[arg(long, requires = "kernel")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line. Default for the reference guest: "workload=memwrite".
    #[arg(long)]
    pub cmdline: Option<String>,
    /// Where the guest's serial port goes: stdio, file:PATH or none.
    #[arg(long, default_value = "stdio")]
    pub serial: String,
    /// QMP server: unix:PATH[,server=on,wait=off] or tcp:[HOST]:PORT (HOST defaults to 127.0.0.1).
    #[arg(long)]
    pub qmp: Option<String>,
    /// VM name reported by query-name.
    #[arg(long)]
    pub name: Option<String>,
    /// Start with the vCPUs paused (resume with QMP `cont`).
    #[arg(long, short = 'S')]
    pub paused: bool,
    /// When the guest powers off, keep the VM in the shutdown state instead of exiting.
    #[arg(long)]
    pub no_shutdown: bool,
    /// When the guest resets (reboots or triple-faults), end the VM (`SHUTDOWN` with reason
    /// `guest-reset`) instead of rebooting it in place (`RESET`), like QEMU's -no-reboot.
    #[arg(long)]
    pub no_reboot: bool,
    /// The ACPI VM generation ID device (Linux's vmgenid driver): a new 128-bit ID at every
    /// boot and every restore of an image or stream (not a live migration), announced to the
    /// guest so it reseeds its random number generator. `off`: no device.
    #[arg(long, default_value = "on", value_parser = ["on", "off"])]
    pub vmgenid: String,
    /// Restore from a snapshot (RAM size and vCPUs come from it): file:PATH (an image, or a
    /// stream written to a file), a stream from unix:PATH or tcp:HOST:PORT (listens there,
    /// only there), exec:COMMAND (reads its output) or fd:NAME; or defer: wait for QMP
    /// `migrate-incoming {"uri": ...}`.
    #[arg(long)]
    pub incoming: Option<String>,
    /// A virtio-blk disk: PATH[,format=qcow2|raw][,id=NAME][,readonly=on] (repeatable;
    /// ids default to disk0, disk1, ...; the format is probed when not given).
    #[arg(long = "disk", value_name = "PATH[,OPTS]")]
    pub disks: Vec<String>,
    /// A virtio-net NIC: tap=NAME (opened, or created as root), fd=N (an inherited tap
    /// descriptor) or fd=NAME (a tap passed with QMP getfd; needs --incoming defer: the
    /// NICs open at migrate-incoming), then [,mac=MAC][,id=NAME] (repeatable; ids default
    /// to net0, net1, ...; the MAC defaults to one derived from the id). On a restore,
    /// mac= replaces the image's MAC and the image must have as many NICs.
    #[arg(long = "net", value_name = "tap=NAME|fd=N|fd=NAME[,OPTS]")]
    pub nets: Vec<String>,
    /// A virtio-vsock device for guest CID N (3 or more), its host side on the unix socket
    /// PATH in Firecracker's convention: a host process connects to PATH and writes
    /// "CONNECT <port>\n"; a guest connection to host port P goes to PATH_P. On a restore,
    /// the CID and PATH are this process's.
    #[arg(long, value_name = "cid=N,path=PATH")]
    pub vsock: Option<String>,
    /// Start from the internal snapshot TAG of the qcow2 disks (disks reverted, RAM and
    /// devices loaded from the first disk's VM state), like QEMU's -loadvm.
    #[arg(long, value_name = "TAG")]
    pub loadvm: Option<String>,
    /// How a restore loads RAM: uffd (fresh anonymous memory filled while the guest runs:
    /// a touched 2 MiB chunk first, the rest in the background; the result is ordinary
    /// memory, as in a booted VM), lazy (map the image copy-on-write; pages load on first
    /// touch; clones of one image share its page cache) or copy (read it all before the
    /// guest runs).
    #[arg(long, default_value = "uffd", value_parser = ["uffd", "lazy", "copy"])]
    pub restore_mode: String,
    /// How the guest finds the virtio devices: mmio (virtio-mmio windows, in the ACPI DSDT and
    /// on the kernel command line; one interrupt line each; works with `pci=off`) or pci
    /// (virtio-pci on a PCI bus, with MSI-X: an interrupt vector per queue, and a disk queue per
    /// vCPU, as QEMU's virtio-*-pci devices) [default: mmio; a restore takes the image's].
    #[arg(long, value_parser = ["mmio", "pci"])]
    pub virtio_transport: Option<String>,
}

/// Where serial output goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialTarget {
    Stdio,
    File(PathBuf),
    None,
}

/// A validated `run` configuration.
#[derive(Debug)]
pub struct RunConfig {
    pub mem_bytes: u64,
    pub cpus: u8,
    /// `--mem` / `--cpus` were given: a restored image must agree with them.
    pub mem_given: bool,
    pub cpus_given: bool,
    pub kernel: Vec<u8>,
    pub initrd: Option<Vec<u8>>,
    pub cmdline: String,
    pub serial: SerialTarget,
    pub qmp: Option<qmp::ListenAddr>,
    pub name: Option<String>,
    pub start_paused: bool,
    pub no_shutdown: bool,
    /// A guest reset ends the VM instead of rebooting it in place.
    pub no_reboot: bool,
    /// A VM generation ID device, with a new ID at boot and every restore.
    pub vmgenid: bool,
    pub incoming: Option<PathBuf>,
    /// `--incoming` with a stream URI (unix, tcp, exec, fd): received while QMP answers.
    pub incoming_stream: Option<crate::snapshot::transport::Uri>,
    /// `--incoming defer`: no machine until QMP `migrate-incoming`.
    pub defer_incoming: bool,
    pub restore_mode: crate::snapshot::restore::RamMode,
    pub disks: Vec<crate::disk::DiskSpec>,
    pub net_specs: Vec<crate::net::NetSpec>,
    /// The NICs' open backends ([`crate::net::open_all`] of `net_specs`,
    /// when the VM starts): every machine this process builds uses them.
    pub nets: Vec<vmm::NetConfig>,
    pub vsock: Option<vmm::VsockConfig>,
    pub loadvm: Option<String>,
    /// `--virtio-transport`: `Some(true)` virtio-pci, `Some(false)` virtio-mmio.
    pub virtio_pci: Option<bool>,
}

/// Guest RAM when `--mem` is not given.
const DEFAULT_MEM: &str = "512M";

impl RunArgs {
    /// Validates every argument; errors are one clear line each.
    pub fn validate(&self) -> Result<RunConfig> {
        let mem_text = self.mem.as_deref().unwrap_or(DEFAULT_MEM);
        let cpus_text = self.cpus.as_deref().unwrap_or("1");
        let mem_bytes = parse_mem(mem_text)?;
        if mem_bytes < vmm::machine::MIN_MEM {
            bail!(
                "--mem {} is too small: snapvmm needs at least {} MiB",
                mem_text,
                vmm::machine::MIN_MEM >> 20
            );
        }
        if let Some(host) = host_mem_bytes() {
            if mem_bytes > host {
                bail!(
                    "--mem {} is more than this host can give ({} MiB of RAM in all)",
                    mem_text,
                    host >> 20
                );
            }
        }
        let cpus: u32 = cpus_text.parse().map_err(|_| {
            anyhow::anyhow!(
                "invalid --cpus '{}': expected a number from 1 to {}",
                cpus_text,
                vmm::machine::MAX_CPUS
            )
        })?;
        if cpus == 0 || cpus > u32::from(vmm::machine::MAX_CPUS) {
            bail!(
                "--cpus {} is out of range: snapvmm supports 1 to {} vCPUs",
                cpus,
                vmm::machine::MAX_CPUS
            );
        }
        let kernel = match &self.kernel {
            Some(p) => {
                let k = read_file(p, "kernel")?;
                if !k.starts_with(b"\x7fELF") && !vmm::boot::linux::is_bzimage(&k) {
                    bail!("kernel {} is not a kernel snapvmm can boot (expected an ELF64 with a PVH note, a vmlinux or a bzImage)", p.display());
                }
                k
            }
            None => refguest::ELF.to_vec(),
        };
        let initrd = self
            .initrd
            .as_ref()
            .map(|p| read_file(p, "initrd"))
            .transpose()?;
        let cmdline = match (&self.cmdline, &self.kernel) {
            (Some(c), _) => c.clone(),
            (None, None) => "workload=memwrite".to_string(),
            (None, Some(_)) => "console=ttyS0".to_string(),
        };
        let serial = match self.serial.as_str() {
            "stdio" => SerialTarget::Stdio,
            "none" => SerialTarget::None,
            s => match s.strip_prefix("file:") {
                Some(p) if !p.is_empty() => SerialTarget::File(PathBuf::from(p)),
                _ => bail!("invalid --serial '{s}': expected stdio, file:PATH or none"),
            },
        };
        let qmp = self
            .qmp
            .as_deref()
            .map(|a| {
                qmp::ListenAddr::parse(a).map_err(|e| anyhow::anyhow!("invalid --qmp '{a}': {e}"))
            })
            .transpose()?;
        let disks = crate::disk::parse_disks(&self.disks)?;
        let net_specs = crate::net::parse_nets(&self.nets)?;
        if crate::net::any_named(&net_specs)
            && (self.incoming.as_deref() != Some("defer") || self.qmp.is_none())
        {
            bail!(
                "--net fd=NAME takes a tap passed with QMP getfd: it needs --qmp and \
                 --incoming defer (the NICs are opened at migrate-incoming)"
            );
        }
        let vsock = self
            .vsock
            .as_deref()
            .map(crate::net::parse_vsock)
            .transpose()?;
        let devices = disks.len() + net_specs.len() + usize::from(vsock.is_some());
        if devices > vmm::devices::virtio::MAX_DEVICES {
            bail!(
                "at most {} virtio devices: {} --disk, {} --net and {} --vsock given",
                vmm::devices::virtio::MAX_DEVICES,
                disks.len(),
                net_specs.len(),
                usize::from(vsock.is_some())
            );
        }
        // The devices' virtio_mmio.device= entries are appended to the command
        // line; check the total now (a restored VM only boots its kernel on reset).
        let total = cmdline.len()
            + (0..devices)
                .map(|i| vmm::devices::virtio::cmdline_entry(i).len() + 1)
                .sum::<usize>();
        if total >= vmm::layout::CMDLINE_MAX {
            let with = if devices == 0 {
                ""
            } else {
                " (with the devices' virtio_mmio.device= entries)"
            };
            bail!(
                "the kernel command line is too long{with}: {total} bytes, at most {}",
                vmm::layout::CMDLINE_MAX - 1
            );
        }
        if self.loadvm.is_some() && self.incoming.is_some() {
            bail!("--loadvm and --incoming cannot be used together");
        }
        if self.loadvm.is_some() && self.disks.is_empty() {
            bail!("--loadvm needs the qcow2 --disk that holds the snapshot");
        }
        if self.incoming.as_deref() == Some("defer") && qmp.is_none() {
            bail!("--incoming defer waits for QMP migrate-incoming: it needs --qmp");
        }
        use crate::snapshot::transport::Uri;
        let incoming = match self.incoming.as_deref() {
            None | Some("defer") => None,
            Some(s) => Some(parse_incoming(s)?),
        };
        Ok(RunConfig {
            mem_bytes,
            cpus: cpus as u8,
            mem_given: self.mem.is_some(),
            cpus_given: self.cpus.is_some(),
            kernel,
            initrd,
            cmdline,
            serial,
            qmp,
            name: self.name.clone(),
            start_paused: self.paused,
            no_shutdown: self.no_shutdown,
            no_reboot: self.no_reboot,
            vmgenid: self.vmgenid == "on",
            incoming: match incoming.clone() {
                Some(Uri::File(p)) => Some(p),
                _ => None,
            },
            incoming_stream: incoming.filter(Uri::is_stream),
            defer_incoming: self.incoming.as_deref() == Some("defer"),
            restore_mode: match self.restore_mode.as_str() {
                "copy" => crate::snapshot::restore::RamMode::Copy,
                "uffd" => crate::snapshot::restore::RamMode::Fill,
                _ => crate::snapshot::restore::RamMode::Mapped,
            },
            disks,
            net_specs,
            nets: Vec::new(),
            vsock,
            loadvm: self.loadvm.clone(),
            virtio_pci: self.virtio_transport.as_deref().map(|t| t == "pci"),
        })
    }
}

/// Parses a migration URI (`--incoming`, `migrate-incoming`).
pub fn parse_incoming(s: &str) -> Result<crate::snapshot::transport::Uri> {
    crate::snapshot::transport::Uri::parse(s).map_err(|e| anyhow::anyhow!("--incoming: {e}"))
}

fn read_file(p: &PathBuf, what: &str) -> Result<Vec<u8>> {
    let data = std::fs::read(p).with_context(|| format!("cannot read {what} {}", p.display()))?;
    if data.is_empty() {
        bail!("{what} {} is empty", p.display());
    }
    Ok(data)
}

/// Parses a size: a number with an optional K/M/G/T suffix (binary units);
/// a plain number means MiB, as QEMU's `-m` does.
pub fn parse_mem(s: &str) -> Result<u64> {
    let bad = || anyhow::anyhow!("invalid --mem '{s}': expected a size like 512M or 2G");
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (num, shift) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(bad()),
            };
            (&t[..i], shift)
        }
        _ => (t, 20),
    };
    let n: u64 = num.parse().map_err(|_| bad())?;
    n.checked_mul(1 << shift).filter(|b| *b > 0).ok_or_else(bad)
}

fn host_mem_bytes() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_mem("512M").unwrap(), 512 << 20);
        assert_eq!(parse_mem("1G").unwrap(), 1 << 30);
        assert_eq!(parse_mem("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_mem("256").unwrap(), 256 << 20);
        assert_eq!(parse_mem("4096k").unwrap(), 4 << 20);
        for bad in ["", "M", "1X", "-1G", "0", "99999999999999T", "1.5G"] {
            assert!(parse_mem(bad).is_err(), "{bad}");
        }
    }
}
