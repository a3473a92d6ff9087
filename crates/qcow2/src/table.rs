//! L1/L2 table entry encoding and a small L2 table cache.

use std::collections::HashMap;

use crate::backend::Backend;
use crate::error::{corrupt, Error, Result};

/// Offset bits of L1 and standard L2 entries.
pub(crate) const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// "Refcount is exactly one" flag of L1 and L2 entries.
pub(crate) const COPIED: u64 = 1 << 63;
/// Compressed-cluster flag of L2 entries.
pub(crate) const COMPRESSED: u64 = 1 << 62;
/// "Reads as zero" flag of L2 entries (version 3).
pub(crate) const ZERO: u64 = 1;

/// What a guest cluster maps to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mapping {
    /// Not allocated: read from the backing file or as zeros.
    Unallocated,
    /// Reads as zeros; `prealloc` is a host cluster still owned by the entry (or 0).
    Zero { prealloc: u64 },
    /// Data at this host offset.
    Data(u64),
}

impl Mapping {
    /// Host cluster referenced by the entry, if any (counts towards refcounts).
    pub(crate) fn host(self) -> Option<u64> {
        match self {
            Mapping::Data(h) => Some(h),
            Mapping::Zero { prealloc } if prealloc != 0 => Some(prealloc),
            _ => None,
        }
    }
}

/// Decode an L2 entry, rejecting unsupported or malformed ones.
pub(crate) fn decode_l2(e: u64, cluster_bits: u32) -> Result<Mapping> {
    if e & COMPRESSED != 0 {
        return Err(Error::Unsupported(format!(
            "compressed cluster (L2 entry {e:#018x})"
        )));
    }
    let off = e & OFFSET_MASK;
    if off & ((1u64 << cluster_bits) - 1) != 0 {
        return Err(corrupt(format!(
            "L2 entry {e:#018x} has an unaligned cluster offset"
        )));
    }
    Ok(if e & ZERO != 0 {
        Mapping::Zero { prealloc: off }
    } else if off == 0 {
        Mapping::Unallocated
    } else {
        Mapping::Data(off)
    })
}

/// Extract and validate the L2 table offset of an L1 entry (0 = none).
pub(crate) fn l1_l2_offset(e: u64, cluster_bits: u32) -> Result<u64> {
    let off = e & OFFSET_MASK;
    if off & ((1u64 << cluster_bits) - 1) != 0 {
        return Err(corrupt(format!(
            "L1 entry {e:#018x} has an unaligned L2 table offset"
        )));
    }
    Ok(off)
}

/// Read a table of `n` big-endian u64 entries.
pub(crate) fn read_table(io: &mut dyn Backend, offset: u64, n: usize) -> Result<Vec<u64>> {
    let mut raw = vec![0u8; n * 8];
    io.read_at(&mut raw, offset)?;
    Ok(raw
        .chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes")))
        .collect())
}

/// Serialise entries big-endian, padded with zeros to `pad_to` bytes.
pub(crate) fn encode_table(t: &[u64], pad_to: usize) -> Vec<u8> {
    let mut raw = Vec::with_capacity(pad_to.max(t.len() * 8));
    for e in t {
        raw.extend_from_slice(&e.to_be_bytes());
    }
    if raw.len() < pad_to {
        raw.resize(pad_to, 0);
    }
    raw
}

/// Write-through cache of L2 tables keyed by host offset.
#[derive(Debug)]
pub(crate) struct L2Cache {
    tables: HashMap<u64, Vec<u64>>,
    max_tables: usize,
}

impl L2Cache {
    pub(crate) fn new(cluster_bits: u32) -> Self {
        // Keep roughly 32 MiB of tables at most.
        let max_tables = ((32usize << 20) >> cluster_bits).max(16);
        Self {
            tables: HashMap::new(),
            max_tables,
        }
    }

    /// Take a table out of the cache (reading it on a miss).
    pub(crate) fn take(
        &mut self,
        io: &mut dyn Backend,
        off: u64,
        cluster_bits: u32,
    ) -> Result<Vec<u64>> {
        if let Some(t) = self.tables.remove(&off) {
            return Ok(t);
        }
        read_table(io, off, 1usize << (cluster_bits - 3))
    }

    /// Return a table (with its current on-disk content) to the cache.
    pub(crate) fn put(&mut self, off: u64, t: Vec<u64>) {
        if self.tables.len() >= self.max_tables {
            self.tables.clear();
        }
        self.tables.insert(off, t);
    }

    pub(crate) fn clear(&mut self) {
        self.tables.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode() {
        assert_eq!(decode_l2(0, 16).unwrap(), Mapping::Unallocated);
        assert_eq!(
            decode_l2(COPIED | 0x50000, 16).unwrap(),
            Mapping::Data(0x50000)
        );
        assert_eq!(decode_l2(1, 16).unwrap(), Mapping::Zero { prealloc: 0 });
        assert_eq!(
            decode_l2(0x70001, 16).unwrap(),
            Mapping::Zero { prealloc: 0x70000 }
        );
        assert!(decode_l2(0x50200, 16).is_err());
        assert!(matches!(
            decode_l2(COMPRESSED | 5, 16),
            Err(Error::Unsupported(_))
        ));
        assert!(l1_l2_offset(0x10200, 16).is_err());
        assert_eq!(l1_l2_offset(COPIED | 0x30000, 16).unwrap(), 0x30000);
        assert_eq!(encode_table(&[1, 2], 32).len(), 32);
    }
}
