//! Reading a paused guest's own x86-64 page tables: which guest-physical
//! pages a vCPU goes through first when it runs again (the tables its MMU
//! walks for the instruction and the stack, and those two pages).
//!
//! Only 4-level long-mode paging is walked; with paging off the addresses
//! are taken as physical, and other modes (32-bit, PAE, 5-level) give the
//! top table alone. Entries are read as the guest wrote them: a walk stops
//! at a table outside RAM or an entry that is not present.

use vm_memory::{Bytes, GuestAddress, GuestMemory};

const PAGE: u64 = 4096;
/// Physical-address bits of a page-table entry (bits 12–51).
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
const PRESENT: u64 = 1;
/// A large page at this level (PDPT: 1 GiB, PD: 2 MiB).
const PAGE_SIZE_BIT: u64 = 1 << 7;

/// The paging mode, from the control registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Paging {
    /// CR0.PG clear: linear addresses are physical.
    Off,
    /// EFER.LMA with 4-level tables.
    Long4,
    /// Anything else (32-bit, PAE, 5-level): not walked.
    Other,
}

impl Paging {
    pub fn of(cr0: u64, cr4: u64, efer: u64) -> Paging {
        const CR0_PG: u64 = 1 << 31;
        const CR4_LA57: u64 = 1 << 12;
        const EFER_LMA: u64 = 1 << 10;
        if cr0 & CR0_PG == 0 {
            Paging::Off
        } else if efer & EFER_LMA != 0 && cr4 & CR4_LA57 == 0 {
            Paging::Long4
        } else {
            Paging::Other
        }
    }
}

/// The guest-physical pages a translation of `va` goes through — each
/// table, then the page `va` lies in — pushed to `out`; `va`'s physical
/// address when the walk got to it.
pub fn walk(
    mem: &impl GuestMemory,
    paging: Paging,
    cr3: u64,
    va: u64,
    out: &mut Vec<u64>,
) -> Option<u64> {
    match paging {
        Paging::Off => {
            out.push(va & !(PAGE - 1));
            Some(va)
        }
        Paging::Other => {
            out.push(cr3 & ADDR_MASK);
            None
        }
        Paging::Long4 => {
            let mut table = cr3 & ADDR_MASK;
            for (level, shift) in [39u32, 30, 21, 12].into_iter().enumerate() {
                out.push(table);
                let index = (va >> shift) & 0x1ff;
                let entry = mem.read_obj::<u64>(GuestAddress(table + index * 8)).ok()?;
                if entry & PRESENT == 0 {
                    return None;
                }
                let frame = entry & ADDR_MASK;
                // A 1 GiB or 2 MiB page ends the walk (at PDPT or PD).
                if (level == 1 || level == 2) && entry & PAGE_SIZE_BIT != 0 {
                    let size = 1u64 << shift;
                    let pa = (frame & !(size - 1)) + (va & (size - 1));
                    out.push(pa & !(PAGE - 1));
                    return Some(pa);
                }
                if level == 3 {
                    out.push(frame);
                    return Some(frame + (va & (PAGE - 1)));
                }
                table = frame;
            }
            None
        }
    }
}

/// The handlers of the interrupt table at `base` (`limit` as in IDTR):
/// each present 64-bit gate's target address, through `cr3`.
pub fn idt_handlers(
    mem: &impl GuestMemory,
    paging: Paging,
    cr3: u64,
    base: u64,
    limit: u16,
) -> Vec<u64> {
    let mut out = Vec::new();
    let mut scratch = Vec::new();
    for i in 0..(u64::from(limit) + 1) / 16 {
        let Some(pa) = walk(mem, paging, cr3, base + i * 16, &mut scratch) else {
            continue;
        };
        let mut g = [0u8; 16];
        if mem.read_slice(&mut g, GuestAddress(pa)).is_err() || g[5] & 0x80 == 0 {
            continue;
        }
        let lo = u64::from(u16::from_le_bytes([g[0], g[1]]));
        let mid = u64::from(u16::from_le_bytes([g[6], g[7]]));
        let hi = u64::from(u32::from_le_bytes([g[8], g[9], g[10], g[11]]));
        out.push(lo | mid << 16 | hi << 32);
    }
    out.sort_unstable();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap()
    }

    fn put(m: &GuestMemoryMmap, table: u64, index: u64, entry: u64) {
        m.write_obj(entry, GuestAddress(table + index * 8)).unwrap();
    }

    #[test]
    fn a_4k_page_goes_through_four_tables() {
        let m = mem();
        // va = 0xffff_8000_0040_3123: PML4[256] → PDPT[0] → PD[2] → PT[3].
        let va = 0xffff_8000_0040_3123u64;
        put(&m, 0x1000, 256, 0x2000 | 3);
        put(&m, 0x2000, 0, 0x3000 | 3);
        put(&m, 0x3000, 2, 0x4000 | 3);
        put(&m, 0x4000, 3, 0x55_5000 | 3);
        let mut out = Vec::new();
        let pa = walk(&m, Paging::Long4, 0x1000 | 0x18, va, &mut out);
        assert_eq!(out, [0x1000, 0x2000, 0x3000, 0x4000, 0x55_5000]);
        assert_eq!(pa, Some(0x55_5123));
    }

    #[test]
    fn a_large_page_ends_the_walk_at_the_4k_page_inside_it() {
        let m = mem();
        // 2 MiB page at PD[1] → 0x60_0000; va's offset in it is 0x1_2345.
        let va = 0x20_0000 + 0x1_2345;
        put(&m, 0x1000, 0, 0x2000 | 3);
        put(&m, 0x2000, 0, 0x3000 | 3);
        put(&m, 0x3000, 1, 0x60_0000 | PAGE_SIZE_BIT | 3);
        let mut out = Vec::new();
        let pa = walk(&m, Paging::Long4, 0x1000, va, &mut out);
        assert_eq!(out, [0x1000, 0x2000, 0x3000, 0x61_2000]);
        assert_eq!(pa, Some(0x61_2345));
    }

    #[test]
    fn a_walk_stops_at_a_missing_entry_or_outside_ram() {
        let m = mem();
        let mut out = Vec::new();
        assert_eq!(walk(&m, Paging::Long4, 0x1000, 0x40_0000, &mut out), None);
        assert_eq!(out, [0x1000], "PML4[0] not present");
        out.clear();
        put(&m, 0x1000, 0, 0x7fff_f000 | 3);
        walk(&m, Paging::Long4, 0x1000, 0x40_0000, &mut out);
        assert_eq!(out, [0x1000, 0x7fff_f000], "the PDPT is not in RAM");
        out.clear();
        walk(&m, Paging::Off, 0, 0x12_3456, &mut out);
        assert_eq!(out, [0x12_3000]);
        assert_eq!(Paging::of(1 << 31, 0, 1 << 10), Paging::Long4);
        assert_eq!(Paging::of(1 << 31, 1 << 12, 1 << 10), Paging::Other);
        assert_eq!(Paging::of(1, 0, 0), Paging::Off);
    }

    #[test]
    fn the_handlers_of_present_gates_are_read_through_the_tables() {
        let m = mem();
        // Identity: one 2 MiB page at 0 (PML4 0x1000, PDPT 0x2000, PD 0x3000).
        put(&m, 0x1000, 0, 0x2000 | 3);
        put(&m, 0x2000, 0, 0x3000 | 3);
        put(&m, 0x3000, 0, PAGE_SIZE_BIT | 3);
        // An IDT of 3 gates at 0x8000: gate 0 and 2 present, gate 1 not.
        let gate = |handler: u64, present: bool| {
            let mut g = [0u8; 16];
            g[0..2].copy_from_slice(&(handler as u16).to_le_bytes());
            g[2..4].copy_from_slice(&8u16.to_le_bytes());
            g[5] = if present { 0x8e } else { 0x0e };
            g[6..8].copy_from_slice(&((handler >> 16) as u16).to_le_bytes());
            g[8..12].copy_from_slice(&((handler >> 32) as u32).to_le_bytes());
            g
        };
        m.write_slice(&gate(0x10_00ae, true), GuestAddress(0x8000))
            .unwrap();
        m.write_slice(&gate(0x10_00b4, false), GuestAddress(0x8010))
            .unwrap();
        m.write_slice(&gate(0x12_0000, true), GuestAddress(0x8020))
            .unwrap();
        let h = idt_handlers(&m, Paging::Long4, 0x1000, 0x8000, 3 * 16 - 1);
        assert_eq!(h, [0x10_00ae, 0x12_0000]);
    }
}
