//! Guest-physical memory layout of a snapvmm machine (x86_64).
//!
//! ```text
//! 0x0000_0500  GDT for 64-bit Linux boot
//! 0x0000_6000  hvm_start_info + PVH memory map
//! 0x0000_7000  boot_params ("zero page") for the Linux boot protocol
//! 0x0000_9000  identity page tables for the Linux boot protocol (PML4, PDPT, PD)
//! 0x0002_0000  kernel command line (up to CMDLINE_MAX bytes)
//! 0x0009_fc00  MP table (end of base memory, reserved in e820)
//! 0x000e_0000  ACPI tables from the RSDP (reserved in e820, with the BIOS area)
//! 0x000e_f000  VM generation ID (16 bytes)
//! 0x000f_fff0  reset vector: a stub that resets the machine through the i8042
//! 0x0010_0000  kernel load address (1 MiB)
//! RAM up to MMIO_GAP_START, then the MMIO gap (virtio-pci BARs, virtio-mmio, IOAPIC, LAPIC), then RAM above 4 GiB.
//! ```

/// Address of the GDT used for the 64-bit Linux boot protocol.
pub const BOOT_GDT: u64 = 0x500;
/// Address of `hvm_start_info` for PVH boot.
pub const PVH_START_INFO: u64 = 0x6000;
/// Address of the PVH memory map (right after `hvm_start_info`).
pub const PVH_MEMMAP: u64 = 0x6040;
/// Address of `boot_params` for the Linux boot protocol.
pub const ZERO_PAGE: u64 = 0x7000;
/// Address of the identity page tables for the Linux 64-bit boot protocol.
pub const BOOT_PML4: u64 = 0x9000;
/// Where the command line is placed.
pub const CMDLINE: u64 = 0x20000;
/// Largest command line accepted, including the terminating NUL.
pub const CMDLINE_MAX: usize = 2048;
/// End of conventional memory; the MP table lives just below it.
pub const EBDA_START: u64 = 0x9fc00;
/// Start of the BIOS area reserved in the e820 map (the ACPI tables are in it).
pub const BIOS_START: u64 = 0xe0000;
/// The RSDP, then the other ACPI tables, up to [`ACPI_END`]; Linux also scans
/// 0xe0000-0xfffff for the RSDP.
pub const ACPI_START: u64 = 0xe0000;
/// End of the ACPI tables' area (the VM generation ID's page follows).
pub const ACPI_END: u64 = 0xef000;
/// The VM generation ID: 16 bytes the guest reads at this address (named by
/// the DSDT's `VGEN` device), in the reserved BIOS area.
pub const VMGENID_ADDR: u64 = 0xef000;
/// Where a CPU jumps after reset in real mode (`f000:fff0`), and where Linux
/// jumps for a "BIOS" reboot: a tiny stub there resets through the i8042.
pub const RESET_VECTOR: u64 = 0xffff0;
/// Where kernels are loaded.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the MMIO gap below 4 GiB.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the MMIO gap (RAM resumes here).
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// The PCI host bridge's memory window (the virtio-pci BARs), at the start
/// of the MMIO gap, up to the virtio-mmio windows.
pub const PCI_MMIO_START: u64 = MMIO_GAP_START;
pub const PCI_MMIO_END: u64 = 0xd000_0000;
/// IOAPIC base address.
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
/// Local APIC base address.
pub const LAPIC_ADDR: u64 = 0xfee0_0000;
/// Page size of guest RAM as snapvmm manages it.
pub const PAGE_SIZE: u64 = 4096;

/// The guest-physical RAM ranges `(start, len)` for `mem` bytes of RAM.
pub fn ram_ranges(mem: u64) -> Vec<(u64, u64)> {
    if mem <= MMIO_GAP_START {
        vec![(0, mem)]
    } else {
        vec![(0, MMIO_GAP_START), (MMIO_GAP_END, mem - MMIO_GAP_START)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_ram_is_one_range() {
        assert_eq!(ram_ranges(512 << 20), vec![(0, 512 << 20)]);
    }

    #[test]
    fn large_ram_skips_the_mmio_gap() {
        let r = ram_ranges(4 << 30);
        assert_eq!(
            r,
            vec![
                (0, MMIO_GAP_START),
                (MMIO_GAP_END, (4 << 30) - MMIO_GAP_START)
            ]
        );
        assert_eq!(r.iter().map(|x| x.1).sum::<u64>(), 4 << 30);
    }
}
