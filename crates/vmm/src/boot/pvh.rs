//! PVH boot: `hvm_start_info` and its memory map.

use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::e820::E820Entry;
use super::BootError;
use crate::layout;

/// `hvm_start_info.magic`.
pub const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;

/// Builds the start info (version 1, with memory map) pointing at the command
/// line at [`layout::CMDLINE`], the ACPI RSDP and, if given, one module (the initrd).
pub fn start_info(
    e820: &[E820Entry],
    initrd: Option<(u64, u64)>,
    rsdp: u64,
) -> (hvm_start_info, Vec<hvm_memmap_table_entry>) {
    let memmap: Vec<_> = e820
        .iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
            reserved: 0,
        })
        .collect();
    let info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: layout::CMDLINE,
        rsdp_paddr: rsdp,
        memmap_paddr: layout::PVH_MEMMAP,
        memmap_entries: memmap.len() as u32,
        nr_modules: u32::from(initrd.is_some()),
        modlist_paddr: if initrd.is_some() {
            modlist_addr(memmap.len())
        } else {
            0
        },
        ..Default::default()
    };
    (info, memmap)
}

fn modlist_addr(memmap_entries: usize) -> u64 {
    layout::PVH_MEMMAP + (memmap_entries * std::mem::size_of::<hvm_memmap_table_entry>()) as u64
}

/// Writes start info, memory map and module list into guest memory.
pub fn write_start_info(
    mem: &GuestMemoryMmap,
    e820: &[E820Entry],
    initrd: Option<(u64, u64)>,
    rsdp: u64,
) -> Result<(), BootError> {
    let (info, memmap) = start_info(e820, initrd, rsdp);
    let mut params = BootParams::new(&info, GuestAddress(layout::PVH_START_INFO));
    params.set_sections(&memmap, GuestAddress(layout::PVH_MEMMAP));
    if let Some((addr, size)) = initrd {
        let m = hvm_modlist_entry {
            paddr: addr,
            size,
            ..Default::default()
        };
        params.set_modules(&[m], GuestAddress(modlist_addr(memmap.len())));
    }
    PvhBootConfigurator::write_bootparams(&params, mem)
        .map_err(|e| BootError::GuestMemory(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot::e820;
    use vm_memory::Bytes;

    #[test]
    fn start_info_is_written_where_the_guest_looks() {
        let ram = crate::memory::GuestRam::anonymous(128 << 20).unwrap();
        let map = e820::map(128 << 20);
        write_start_info(
            ram.memory(),
            &map,
            Some((0x400_0000, 0x1000)),
            layout::ACPI_START,
        )
        .unwrap();
        let info: hvm_start_info = ram
            .memory()
            .read_obj(GuestAddress(layout::PVH_START_INFO))
            .unwrap();
        assert_eq!(info.magic, XEN_HVM_START_MAGIC);
        assert_eq!(info.version, 1);
        assert_eq!(info.cmdline_paddr, layout::CMDLINE);
        assert_eq!(info.rsdp_paddr, layout::ACPI_START);
        assert_eq!(info.memmap_entries as usize, map.len());
        for (i, e) in map.iter().enumerate() {
            let got: hvm_memmap_table_entry = ram
                .memory()
                .read_obj(GuestAddress(info.memmap_paddr + 24 * i as u64))
                .unwrap();
            assert_eq!((got.addr, got.size, got.type_), (e.addr, e.size, e.kind));
        }
        assert_eq!(info.nr_modules, 1);
        let m: hvm_modlist_entry = ram
            .memory()
            .read_obj(GuestAddress(info.modlist_paddr))
            .unwrap();
        assert_eq!((m.paddr, m.size), (0x400_0000, 0x1000));
        // The start info must not overlap the memory map or the module list.
        assert!(
            layout::PVH_START_INFO + std::mem::size_of::<hvm_start_info>() as u64
                <= layout::PVH_MEMMAP
        );
    }
}
