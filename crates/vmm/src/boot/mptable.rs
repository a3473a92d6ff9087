//! The Intel MultiProcessor Specification 1.4 table that tells a guest how many
//! CPUs it has and how ISA interrupts reach the IOAPIC. Written at
//! [`layout::EBDA_START`], a range the e820 map reserves.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::BootError;
use crate::layout;

/// Largest number of vCPUs the table (1 KiB below 640 KiB) describes.
pub const MAX_CPUS: u8 = 32;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const ISA_IRQS: u8 = 16;
const CPU_FLAG_ENABLED: u8 = 1;
const CPU_FLAG_BSP: u8 = 2;

/// Builds the table bytes (floating pointer then configuration table) for `cpus`
/// CPUs, to be placed at guest address `base`.
pub fn build(cpus: u8, base: u64) -> Result<Vec<u8>, BootError> {
    if cpus == 0 || cpus > MAX_CPUS {
        return Err(BootError::MpTable(format!(
            "{cpus} CPUs (supported: 1..={MAX_CPUS})"
        )));
    }
    let ioapic_id = cpus;
    let mut entries = Vec::new();
    for id in 0..cpus {
        let flags = CPU_FLAG_ENABLED | if id == 0 { CPU_FLAG_BSP } else { 0 };
        entries.extend_from_slice(&[0, id, APIC_VERSION, flags]);
        entries.extend_from_slice(&0x600u32.to_le_bytes()); // signature: family 6
        entries.extend_from_slice(&0x201u32.to_le_bytes()); // features: FPU, APIC
        entries.extend_from_slice(&[0; 8]);
    }
    entries.extend_from_slice(&[1, 0, b'I', b'S', b'A', b' ', b' ', b' ']);
    entries.extend_from_slice(&[2, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(layout::IOAPIC_ADDR as u32).to_le_bytes());
    for irq in 0..ISA_IRQS {
        // Interrupt type INT (0), conforming polarity/trigger, ISA bus 0 -> IOAPIC pin irq.
        entries.extend_from_slice(&[3, 0, 0, 0, 0, irq, ioapic_id, irq]);
    }
    // LINT0: ExtINT (3), LINT1: NMI (1), to all local APICs.
    entries.extend_from_slice(&[4, 3, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[4, 1, 0, 0, 0, 0, 0xff, 1]);
    let entry_count = u16::from(cpus) + 1 + 1 + u16::from(ISA_IRQS) + 2;

    let mut cfg = Vec::with_capacity(44 + entries.len());
    cfg.extend_from_slice(b"PCMP");
    cfg.extend_from_slice(&((44 + entries.len()) as u16).to_le_bytes());
    cfg.push(4); // spec revision 1.4
    cfg.push(0); // checksum, below
    cfg.extend_from_slice(b"SNAPVMM ");
    cfg.extend_from_slice(b"000000000000");
    cfg.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    cfg.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    cfg.extend_from_slice(&entry_count.to_le_bytes());
    cfg.extend_from_slice(&(layout::LAPIC_ADDR as u32).to_le_bytes());
    cfg.extend_from_slice(&0u16.to_le_bytes()); // extended table length
    cfg.extend_from_slice(&[0, 0]); // extended checksum, reserved
    cfg.extend_from_slice(&entries);
    cfg[7] = checksum(&cfg);

    let mut fp = Vec::with_capacity(16);
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(&((base + 16) as u32).to_le_bytes());
    fp.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]); // length 1 (x16), rev 1.4, checksum, features
    fp[10] = checksum(&fp);

    let mut table = fp;
    table.extend_from_slice(&cfg);
    if base + table.len() as u64 > 0xa0000 {
        return Err(BootError::MpTable(
            "table does not fit below 640 KiB".into(),
        ));
    }
    Ok(table)
}

/// Writes the table for `cpus` CPUs into guest memory.
pub fn write(mem: &GuestMemoryMmap, cpus: u8) -> Result<(), BootError> {
    let table = build(cpus, layout::EBDA_START)?;
    mem.write_slice(&table, GuestAddress(layout::EBDA_START))
        .map_err(|e| BootError::GuestMemory(e.to_string()))
}

/// The value that makes the bytes sum to zero (mod 256).
fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn checksums_and_cpu_entries() {
        for cpus in [1u8, 2, 4, MAX_CPUS] {
            let t = build(cpus, layout::EBDA_START).unwrap();
            assert_eq!(&t[..4], b"_MP_");
            assert_eq!(sum(&t[..16]), 0, "floating pointer checksum");
            let cfg_addr = u32::from_le_bytes(t[4..8].try_into().unwrap()) as u64;
            let cfg = &t[(cfg_addr - layout::EBDA_START) as usize..];
            assert_eq!(&cfg[..4], b"PCMP");
            let len = u16::from_le_bytes([cfg[4], cfg[5]]) as usize;
            assert_eq!(len, cfg.len());
            assert_eq!(sum(&cfg[..len]), 0, "configuration table checksum");
            let count = u16::from_le_bytes([cfg[34], cfg[35]]) as usize;
            // Walk the entries: processors are 20 bytes, everything else 8.
            let (mut off, mut seen, mut procs, mut bsps) = (44, 0, Vec::new(), 0);
            while off < len {
                let size = if cfg[off] == 0 { 20 } else { 8 };
                if cfg[off] == 0 {
                    procs.push(cfg[off + 1]);
                    assert_ne!(cfg[off + 3] & CPU_FLAG_ENABLED, 0);
                    bsps += usize::from(cfg[off + 3] & CPU_FLAG_BSP != 0);
                }
                off += size;
                seen += 1;
            }
            assert_eq!(seen, count);
            assert_eq!(procs, (0..cpus).collect::<Vec<_>>());
            assert_eq!(bsps, 1);
        }
    }

    #[test]
    fn refuses_unsupported_cpu_counts() {
        assert!(build(0, layout::EBDA_START).is_err());
        assert!(build(MAX_CPUS + 1, layout::EBDA_START).is_err());
    }
}
