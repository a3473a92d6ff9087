//! The Linux x86 64-bit boot protocol: `boot_params`, a boot GDT and identity
//! page tables (Documentation/arch/x86/boot.rst).

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_params, setup_header};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::e820::E820Entry;
use super::BootError;
use crate::layout;

/// "HdrS", the setup header signature.
pub const HDRS_MAGIC: u32 = 0x5372_6448;
/// Boot loader type "undefined" (0xff), as VMMs report themselves.
pub const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// `loadflags`: the kernel may use the heap up to `heap_end_ptr`.
pub const CAN_USE_HEAP: u8 = 0x80;
/// Number of GiB the boot page tables identity-map.
pub const IDENTITY_GIB: u64 = 4;
/// Boot GDT selectors the kernel expects (`__BOOT_CS`, `__BOOT_DS`).
pub const BOOT_CS: u16 = 0x10;
pub const BOOT_DS: u16 = 0x18;
/// The boot GDT: null, null, code64 (0x10), data (0x18).
pub const BOOT_GDT: [u64; 4] = [0, 0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff];

/// True if `image` carries a bzImage setup header.
pub fn is_bzimage(image: &[u8]) -> bool {
    image.len() > 0x206 && u32::from_le_bytes(image[0x202..0x206].try_into().unwrap()) == HDRS_MAGIC
}

/// Builds `boot_params`: the setup header from the image (if any), the command
/// line at [`layout::CMDLINE`], the initrd, the e820 map and the ACPI RSDP.
pub fn boot_params(
    header: Option<setup_header>,
    cmdline_len: usize,
    initrd: Option<(u64, u64)>,
    e820: &[E820Entry],
    rsdp: u64,
) -> boot_params {
    let mut p = boot_params {
        acpi_rsdp_addr: rsdp,
        ..Default::default()
    };
    if let Some(h) = header {
        p.hdr = h;
    } else {
        p.hdr.header = HDRS_MAGIC;
        p.hdr.boot_flag = 0xaa55;
        p.hdr.kernel_alignment = 0x0100_0000;
    }
    p.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    p.hdr.loadflags |= CAN_USE_HEAP;
    p.hdr.heap_end_ptr = 0xfe00;
    p.hdr.cmd_line_ptr = layout::CMDLINE as u32;
    p.hdr.cmdline_size = cmdline_len as u32;
    if let Some((addr, size)) = initrd {
        p.hdr.ramdisk_image = addr as u32;
        p.hdr.ramdisk_size = size as u32;
    }
    for (slot, e) in p.e820_table.iter_mut().zip(e820) {
        slot.addr = e.addr;
        slot.size = e.size;
        slot.r#type = e.kind;
    }
    p.e820_entries = e820.len().min(p.e820_table.len()) as u8;
    p
}

/// Writes `boot_params`, the boot GDT and the identity page tables.
pub fn write_boot_data(mem: &GuestMemoryMmap, params: &boot_params) -> Result<(), BootError> {
    let gm = |e: vm_memory::GuestMemoryError| BootError::GuestMemory(e.to_string());
    let bp = BootParams::new(params, GuestAddress(layout::ZERO_PAGE));
    LinuxBootConfigurator::write_bootparams(&bp, mem)
        .map_err(|e| BootError::GuestMemory(e.to_string()))?;
    for (i, d) in BOOT_GDT.iter().enumerate() {
        mem.write_obj(*d, GuestAddress(layout::BOOT_GDT + 8 * i as u64))
            .map_err(gm)?;
    }
    for (addr, entry) in page_tables() {
        mem.write_obj(entry, GuestAddress(addr)).map_err(gm)?;
    }
    Ok(())
}

/// Address of the PDPT and first PD (the PML4 is at [`layout::BOOT_PML4`]).
pub const BOOT_PDPT: u64 = layout::BOOT_PML4 + 0x1000;
pub const BOOT_PD: u64 = layout::BOOT_PML4 + 0x2000;

/// `(guest address, entry)` pairs of the identity map of the low
/// [`IDENTITY_GIB`] GiB with 2 MiB pages: one PML4 entry, one PDPT entry per GiB.
pub fn page_tables() -> Vec<(u64, u64)> {
    const PRESENT_RW: u64 = 0x3;
    const HUGE: u64 = 0x80;
    let mut v = vec![(layout::BOOT_PML4, BOOT_PDPT | PRESENT_RW)];
    for g in 0..IDENTITY_GIB {
        let pd = BOOT_PD + g * 0x1000;
        v.push((BOOT_PDPT + g * 8, pd | PRESENT_RW));
        for i in 0..512u64 {
            v.push((pd + i * 8, ((g << 30) + (i << 21)) | PRESENT_RW | HUGE));
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot::e820;

    fn fake_bzimage() -> Vec<u8> {
        let mut img = vec![0u8; 0x4000];
        img[0x1f1] = 3; // setup_sects
        img[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
        img[0x202..0x206].copy_from_slice(&HDRS_MAGIC.to_le_bytes());
        img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes()); // protocol 2.15
        img[0x211] = 0x01; // LOADED_HIGH
        img[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
        img
    }

    #[test]
    fn bzimage_is_recognised_by_its_header() {
        assert!(is_bzimage(&fake_bzimage()));
        assert!(!is_bzimage(b"\x7fELF...."));
    }

    #[test]
    fn boot_params_follow_the_protocol() {
        let map = e820::map(1 << 30);
        let p = boot_params(
            None,
            20,
            Some((0x3000_0000, 0x1234)),
            &map,
            layout::ACPI_START,
        );
        assert_eq!({ p.hdr.header }, HDRS_MAGIC);
        assert_eq!({ p.acpi_rsdp_addr }, layout::ACPI_START);
        assert_eq!({ p.hdr.boot_flag }, 0xaa55);
        assert_eq!({ p.hdr.type_of_loader }, 0xff);
        assert_ne!(p.hdr.loadflags & CAN_USE_HEAP, 0);
        assert_eq!({ p.hdr.cmd_line_ptr }, layout::CMDLINE as u32);
        assert_eq!({ p.hdr.cmdline_size }, 20);
        assert_eq!(
            ({ p.hdr.ramdisk_image }, { p.hdr.ramdisk_size }),
            (0x3000_0000, 0x1234)
        );
        assert_eq!(p.e820_entries as usize, map.len());
        for (i, e) in map.iter().enumerate() {
            let t = p.e820_table[i];
            assert_eq!(
                ({ t.addr }, { t.size }, { t.r#type }),
                (e.addr, e.size, e.kind)
            );
        }
    }

    #[test]
    fn bzimage_boot_writes_zero_page_gdt_and_page_tables() {
        let ram = crate::memory::GuestRam::anonymous(256 << 20).unwrap();
        let img = fake_bzimage();
        let spec = crate::boot::BootSpec {
            kernel: &img,
            initrd: Some(b"initrd!"),
            cmdline: "console=ttyS0",
            cpus: 2,
            virtio: &[],
            pci: None,
            vmgenid: true,
        };
        let entry = crate::boot::load_kernel(ram.memory(), 256 << 20, &spec).unwrap();
        assert_eq!(
            entry,
            crate::boot::BootEntry::Linux64 {
                entry: layout::HIMEM_START + 0x200,
                boot_params: layout::ZERO_PAGE
            }
        );
        let mem = ram.memory();
        // The reset vector holds the stub that resets through the i8042 (0xfe to port 0x64).
        let mut stub = [0u8; 7];
        mem.read_slice(&mut stub, GuestAddress(layout::RESET_VECTOR))
            .unwrap();
        assert_eq!(stub, crate::boot::RESET_STUB);
        assert_eq!(
            (stub[1], u16::from(stub[3])),
            (0xfe, crate::devices::i8042::COMMAND)
        );
        let p: boot_params = mem.read_obj(GuestAddress(layout::ZERO_PAGE)).unwrap();
        assert_eq!({ p.hdr.header }, HDRS_MAGIC);
        assert_eq!(
            { p.hdr.version },
            0x020f,
            "setup header copied from the image"
        );
        let mut cmd = [0u8; 14];
        mem.read_slice(&mut cmd, GuestAddress(u64::from(p.hdr.cmd_line_ptr)))
            .unwrap();
        assert_eq!(&cmd, b"console=ttyS0\0");
        let mut rd = [0u8; 7];
        mem.read_slice(&mut rd, GuestAddress(u64::from(p.hdr.ramdisk_image)))
            .unwrap();
        assert_eq!(&rd, b"initrd!");
        assert_eq!(u64::from(p.hdr.ramdisk_image) % layout::PAGE_SIZE, 0);
        let cs: u64 = mem
            .read_obj(GuestAddress(layout::BOOT_GDT + u64::from(BOOT_CS)))
            .unwrap();
        assert_eq!(
            cs & (1 << 53),
            1 << 53,
            "__BOOT_CS is a 64-bit code segment"
        );
        // Walk the page tables for an address in the third GiB.
        let va = 0x8765_4321u64;
        let pml4e: u64 = mem.read_obj(GuestAddress(layout::BOOT_PML4)).unwrap();
        let pdpte: u64 = mem
            .read_obj(GuestAddress((pml4e & !0xfff) + 8 * (va >> 30)))
            .unwrap();
        let pde: u64 = mem
            .read_obj(GuestAddress((pdpte & !0xfff) + 8 * ((va >> 21) & 511)))
            .unwrap();
        assert_eq!(pde & 0x81, 0x81, "present 2 MiB page");
        assert_eq!(
            (pde & !0x1f_ffff & !0xfff) | (va & 0x1f_ffff),
            va,
            "identity mapped"
        );
    }
}
