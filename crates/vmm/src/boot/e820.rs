//! The e820 memory map shared by both boot protocols.

use crate::layout;

/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type of reserved memory.
pub const E820_RESERVED: u32 = 2;

/// One e820 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// The memory map for `ram_size` bytes of RAM: base memory below the MP table,
/// the MP table and BIOS area reserved, RAM from 1 MiB (split around the MMIO gap).
pub fn map(ram_size: u64) -> Vec<E820Entry> {
    let mut v = vec![
        E820Entry {
            addr: 0,
            size: layout::EBDA_START,
            kind: E820_RAM,
        },
        E820Entry {
            addr: layout::EBDA_START,
            size: 0xa0000 - layout::EBDA_START,
            kind: E820_RESERVED,
        },
        E820Entry {
            addr: layout::BIOS_START,
            size: layout::HIMEM_START - layout::BIOS_START,
            kind: E820_RESERVED,
        },
    ];
    for (start, len) in layout::ram_ranges(ram_size) {
        let s = start.max(layout::HIMEM_START);
        let e = start + len;
        if e > s {
            v.push(E820Entry {
                addr: s,
                size: e - s,
                kind: E820_RAM,
            });
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_covers_ram_and_reserves_low_areas() {
        let m = map(1 << 30);
        assert_eq!(
            m[0],
            E820Entry {
                addr: 0,
                size: 0x9fc00,
                kind: E820_RAM
            }
        );
        assert_eq!(m[1].kind, E820_RESERVED);
        assert_eq!(
            m.last().unwrap(),
            &E820Entry {
                addr: 0x10_0000,
                size: (1 << 30) - 0x10_0000,
                kind: E820_RAM
            }
        );
        // No overlaps, sorted.
        for w in m.windows(2) {
            assert!(w[0].addr + w[0].size <= w[1].addr);
        }
    }

    #[test]
    fn map_splits_around_the_mmio_gap() {
        let m = map(6 << 30);
        let high = m.last().unwrap();
        assert_eq!(high.addr, layout::MMIO_GAP_END);
        let ram: u64 = m
            .iter()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| e.size)
            .sum();
        assert_eq!(ram, (6 << 30) - (layout::HIMEM_START - layout::EBDA_START));
    }
}
