//! The snapvmm reference guest, embedded.
//!
//! A freestanding PVH ELF (see `guest/`): minimal ring-0 setup, then all work at
//! ring 3. It boots on snapvmm and on `qemu-system-x86_64 -kernel`. Parameters
//! come from the boot command line: `workload=memwrite|idle|exit|reset`,
//! `region=SIZE`, `passes=N`, `rate=PAGES_PER_SECOND`, `hot=PERCENT`, `exit=CODE`,
//! `tsc_khz=N`. `hot=PERCENT` (1..100, default 100): memwrite's first pass fills
//! the whole region, later passes rewrite only the first PERCENT % of each CPU's
//! slice; the cold rest keeps its pass-1 values and is still verified (one cold
//! page read per 4 hot page writes). See docs/REFGUEST.md.

/// The guest image, an ELF64 with a `XEN_ELFNOTE_PHYS32_ENTRY` note.
pub static ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/refguest.elf"));

/// Status the guest powers off with when a `memwrite` pass finds a page that
/// does not hold the value its sequence implies.
pub const EXIT_CORRUPT: i32 = 2;
/// Status the guest powers off with on an unexpected CPU exception.
pub const EXIT_FAULT: i32 = 3;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_is_an_elf64_with_a_pvh_note() {
        assert_eq!(&ELF[..4], b"\x7fELF");
        assert_eq!(ELF[4], 2, "ELFCLASS64");
        // The PVH note: namesz 4, descsz 4, type 18, "Xen\0".
        let note = [4u8, 0, 0, 0, 4, 0, 0, 0, 18, 0, 0, 0, b'X', b'e', b'n', 0];
        assert!(ELF.windows(note.len()).any(|w| w == note));
    }
}
