//! Loading a kernel and building what its boot protocol expects.
//!
//! Two protocols: PVH (an ELF with a `XEN_ELFNOTE_PHYS32_ENTRY` note, entered in
//! 32-bit protected mode with `%ebx` = `hvm_start_info`) and the Linux 64-bit
//! boot protocol (bzImage, or an ELF `vmlinux` without a PVH note, entered in
//! long mode with `%rsi` = `boot_params`). Both get the same e820 map and an
//! MP table describing the vCPUs.

pub mod acpi;
pub mod e820;
pub mod linux;
pub mod mptable;
pub mod pvh;

use std::io::Cursor;

use linux_loader::loader::{self, KernelLoader};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::layout;

/// Errors from loading a kernel.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("kernel image is neither an ELF64 nor a bzImage")]
    UnknownFormat,
    #[error("cannot load the kernel: {0}")]
    Load(loader::Error),
    #[error("kernel command line is too long ({len} bytes, at most {max})")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("kernel command line contains a NUL or non-ASCII byte")]
    CmdlineInvalid,
    #[error("initrd of {size} bytes does not fit in guest RAM")]
    InitrdTooLarge { size: usize },
    #[error("writing boot data into guest memory failed: {0}")]
    GuestMemory(String),
    #[error("MP table: {0}")]
    MpTable(String),
    #[error("ACPI tables: {0}")]
    Acpi(String),
}

/// The code at the reset vector, in place of firmware: `mov al, 0xfe; out 0x64, al`
/// (i8042 pulse reset line), then `hlt` in a loop. Linux jumps here to reboot "through
/// the BIOS" when its other methods did not reset (on hardware-reduced ACPI it tries
/// EFI, then the BIOS); the VMM sees an ordinary reset request.
pub const RESET_STUB: [u8; 7] = [0xb0, 0xfe, 0xe6, 0x64, 0xf4, 0xeb, 0xfd];

/// How the boot vCPU must be set up to enter the loaded kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootEntry {
    /// 32-bit protected mode, paging off, `%ebx` = `start_info`.
    Pvh { entry: u64, start_info: u64 },
    /// 64-bit long mode with identity page tables, `%rsi` = `boot_params`.
    Linux64 { entry: u64, boot_params: u64 },
}

/// What to boot.
#[derive(Debug, Clone, Copy)]
pub struct BootSpec<'a> {
    pub kernel: &'a [u8],
    pub initrd: Option<&'a [u8]>,
    pub cmdline: &'a str,
    pub cpus: u8,
    /// virtio-mmio devices, described to the guest in the ACPI DSDT.
    pub virtio: &'a [acpi::MmioDevice],
    /// Describe a PCI host bridge (the virtio-pci devices are found on its
    /// bus), and the slots that can be re-plugged.
    pub pci: Option<acpi::PciSpec<'a>>,
    /// Describe the VM generation ID device (`VGEN`) in the DSDT.
    pub vmgenid: bool,
}

/// Loads the kernel (and initrd) into guest memory and writes the boot
/// protocol structures; returns how to enter it.
pub fn load_kernel(
    mem: &GuestMemoryMmap,
    ram_size: u64,
    spec: &BootSpec<'_>,
) -> Result<BootEntry, BootError> {
    let cmdline = check_cmdline(spec.cmdline)?;
    mptable::write(mem, spec.cpus)?;
    {
        use vm_memory::Bytes;
        mem.write_slice(&RESET_STUB, GuestAddress(layout::RESET_VECTOR))
            .map_err(|e| BootError::GuestMemory(e.to_string()))?;
    }
    let platform = acpi::Platform::for_cmdline(spec.cmdline);
    let rsdp = acpi::write(
        mem,
        spec.cpus,
        spec.virtio,
        spec.pci.as_ref(),
        spec.vmgenid,
        platform,
    )?;
    let e820 = e820::map(ram_size);
    let mut image = Cursor::new(spec.kernel);
    if spec.kernel.starts_with(b"\x7fELF") {
        let res = loader::Elf::load(
            mem,
            None,
            &mut image,
            Some(GuestAddress(layout::HIMEM_START)),
        )
        .map_err(BootError::Load)?;
        write_cmdline(mem, &cmdline)?;
        match res.pvh_boot_cap {
            loader::PvhBootCapability::PvhEntryPresent(entry) => {
                let initrd = load_initrd(mem, ram_size, spec.initrd, res.kernel_end)?;
                pvh::write_start_info(mem, &e820, initrd, rsdp)?;
                Ok(BootEntry::Pvh {
                    entry: entry.0,
                    start_info: layout::PVH_START_INFO,
                })
            }
            _ => {
                // A vmlinux without PVH note: 64-bit boot protocol at e_entry.
                let initrd = load_initrd(mem, ram_size, spec.initrd, res.kernel_end)?;
                let params = linux::boot_params(None, cmdline.len(), initrd, &e820, rsdp);
                linux::write_boot_data(mem, &params)?;
                let entry = elf_entry(spec.kernel).ok_or(BootError::UnknownFormat)?;
                Ok(BootEntry::Linux64 {
                    entry,
                    boot_params: layout::ZERO_PAGE,
                })
            }
        }
    } else if linux::is_bzimage(spec.kernel) {
        let res = loader::BzImage::load(
            mem,
            None,
            &mut image,
            Some(GuestAddress(layout::HIMEM_START)),
        )
        .map_err(BootError::Load)?;
        write_cmdline(mem, &cmdline)?;
        let initrd = load_initrd(mem, ram_size, spec.initrd, res.kernel_end)?;
        let params = linux::boot_params(res.setup_header, cmdline.len(), initrd, &e820, rsdp);
        linux::write_boot_data(mem, &params)?;
        Ok(BootEntry::Linux64 {
            entry: res.kernel_load.0 + 0x200,
            boot_params: layout::ZERO_PAGE,
        })
    } else {
        Err(BootError::UnknownFormat)
    }
}

fn check_cmdline(cmdline: &str) -> Result<Vec<u8>, BootError> {
    if cmdline.bytes().any(|b| b == 0 || !b.is_ascii()) {
        return Err(BootError::CmdlineInvalid);
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    if bytes.len() > layout::CMDLINE_MAX {
        return Err(BootError::CmdlineTooLong {
            len: cmdline.len(),
            max: layout::CMDLINE_MAX - 1,
        });
    }
    Ok(bytes)
}

fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &[u8]) -> Result<(), BootError> {
    use vm_memory::Bytes;
    mem.write_slice(cmdline, GuestAddress(layout::CMDLINE))
        .map_err(|e| BootError::GuestMemory(e.to_string()))
}

/// Places the initrd page-aligned at the top of low RAM (below the MMIO gap and
/// below 896 MiB, where old kernels expect it), above the kernel.
fn load_initrd(
    mem: &GuestMemoryMmap,
    ram_size: u64,
    initrd: Option<&[u8]>,
    kernel_end: u64,
) -> Result<Option<(u64, u64)>, BootError> {
    use vm_memory::Bytes;
    let Some(data) = initrd else { return Ok(None) };
    let top = ram_size.min(layout::MMIO_GAP_START).min(0x3800_0000);
    let size = data.len() as u64;
    let addr = top.checked_sub(size).map(|a| a & !(layout::PAGE_SIZE - 1));
    match addr {
        Some(a) if a >= kernel_end.max(layout::HIMEM_START) => {
            mem.write_slice(data, GuestAddress(a))
                .map_err(|e| BootError::GuestMemory(e.to_string()))?;
            Ok(Some((a, size)))
        }
        _ => Err(BootError::InitrdTooLarge { size: data.len() }),
    }
}

fn elf_entry(image: &[u8]) -> Option<u64> {
    image
        .get(24..32)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_limits() {
        assert!(check_cmdline("console=ttyS0").is_ok());
        assert!(matches!(
            check_cmdline(&"x".repeat(5000)),
            Err(BootError::CmdlineTooLong { .. })
        ));
        assert!(matches!(
            check_cmdline("a\0b"),
            Err(BootError::CmdlineInvalid)
        ));
    }

    #[test]
    fn garbage_is_refused() {
        let ram = crate::memory::GuestRam::anonymous(64 << 20).unwrap();
        let spec = BootSpec {
            kernel: b"definitely not a kernel",
            initrd: None,
            cmdline: "",
            cpus: 1,
            virtio: &[],
            pci: None,
            vmgenid: false,
        };
        assert!(matches!(
            load_kernel(ram.memory(), 64 << 20, &spec),
            Err(BootError::UnknownFormat)
        ));
        let truncated = BootSpec {
            kernel: b"\x7fELF\x02\x01\x01",
            ..spec
        };
        assert!(matches!(
            load_kernel(ram.memory(), 64 << 20, &truncated),
            Err(BootError::Load(_))
        ));
    }
}
