//! Snapshot table entries: parsing and serialisation.

use crate::backend::Backend;
use crate::error::{corrupt, Result};
use crate::header::{be16, be32, be64, MAX_TABLE_BYTES};

/// Upper bound for the snapshot table size (same as QEMU).
pub(crate) const MAX_SNAPSHOT_TABLE_BYTES: u64 = 64 << 20;
/// Upper bound for per-entry extra data (same as QEMU).
const MAX_EXTRA: u32 = 1024;
/// Size of the extra data we write: vm_state_size_large, disk_size, icount.
const OUR_EXTRA: usize = 24;

/// Public description of an internal snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// Unique numeric id string ("1", "2", ...).
    pub id: String,
    /// Tag given by the user.
    pub name: String,
    /// Creation time, seconds since the epoch.
    pub date_sec: u32,
    /// Creation time, nanoseconds part.
    pub date_nsec: u32,
    /// Guest clock when the snapshot was taken.
    pub vm_clock_nsec: u64,
    /// Size of the saved VM state in bytes (0 = disk-only snapshot).
    pub vm_state_size: u64,
    /// Virtual disk size at snapshot time.
    pub disk_size: u64,
    /// Instruction count for record/replay, if recorded.
    pub icount: Option<u64>,
}

/// Snapshot table entry with the on-disk details.
#[derive(Debug, Clone)]
pub(crate) struct SnapEntry {
    pub l1_offset: u64,
    pub l1_size: u32,
    /// Extra data bytes beyond the ones we interpret (preserved verbatim).
    pub extra_tail: Vec<u8>,
    /// Id and name exactly as stored (the `info` strings may be lossy).
    pub id_raw: Vec<u8>,
    pub name_raw: Vec<u8>,
    pub info: SnapshotInfo,
}

impl SnapEntry {
    /// Entry for a new snapshot.
    pub(crate) fn new(l1_offset: u64, l1_size: u32, info: SnapshotInfo) -> Self {
        Self {
            l1_offset,
            l1_size,
            extra_tail: Vec::new(),
            id_raw: info.id.as_bytes().to_vec(),
            name_raw: info.name.as_bytes().to_vec(),
            info,
        }
    }
}

/// Read `count` entries from the table at `offset`.
pub(crate) fn read_table(
    io: &mut dyn Backend,
    offset: u64,
    count: u32,
    cluster_bits: u32,
    image_size: u64,
) -> Result<(Vec<SnapEntry>, u64)> {
    let mut out = Vec::with_capacity(count.min(1024) as usize);
    let mut pos = 0u64;
    for i in 0..count {
        let at = offset
            .checked_add(pos)
            .ok_or_else(|| corrupt("snapshot table offset overflow"))?;
        let mut h = [0u8; 40];
        io.read_at(&mut h, at)?;
        let l1_offset = be64(&h, 0);
        let l1_size = be32(&h, 8);
        let id_len = be16(&h, 12);
        let name_len = be16(&h, 14);
        let extra_len = be32(&h, 36);
        if extra_len > MAX_EXTRA {
            return Err(corrupt(format!(
                "snapshot {i}: extra data size {extra_len} too large"
            )));
        }
        if l1_offset & ((1u64 << cluster_bits) - 1) != 0 || l1_offset > (1u64 << 56) {
            return Err(corrupt(format!(
                "snapshot {i}: L1 table offset {l1_offset:#x} invalid"
            )));
        }
        if u64::from(l1_size) * 8 > MAX_TABLE_BYTES {
            return Err(corrupt(format!(
                "snapshot {i}: l1_size {l1_size} too large"
            )));
        }
        let var_len = extra_len as usize + id_len as usize + name_len as usize;
        let entry_len = (40 + var_len as u64).div_ceil(8) * 8;
        if pos + entry_len > MAX_SNAPSHOT_TABLE_BYTES {
            return Err(corrupt(format!(
                "snapshot table exceeds {MAX_SNAPSHOT_TABLE_BYTES} bytes"
            )));
        }
        let mut var = vec![0u8; var_len];
        io.read_at(&mut var, at + 40)?;
        let (extra, rest) = var.split_at(extra_len as usize);
        let (id, name) = rest.split_at(id_len as usize);
        let mut vm_state_size = u64::from(be32(&h, 32));
        let mut disk_size = image_size;
        let mut icount = None;
        if extra.len() >= 8 {
            vm_state_size = be64(extra, 0);
        }
        if extra.len() >= 16 {
            disk_size = be64(extra, 8);
        }
        if extra.len() >= 24 {
            let v = be64(extra, 16);
            icount = (v != u64::MAX).then_some(v);
        }
        out.push(SnapEntry {
            l1_offset,
            l1_size,
            extra_tail: extra.get(OUR_EXTRA..).unwrap_or(&[]).to_vec(),
            id_raw: id.to_vec(),
            name_raw: name.to_vec(),
            info: SnapshotInfo {
                id: String::from_utf8_lossy(id).into_owned(),
                name: String::from_utf8_lossy(name).into_owned(),
                date_sec: be32(&h, 16),
                date_nsec: be32(&h, 20),
                vm_clock_nsec: be64(&h, 24),
                vm_state_size,
                disk_size,
                icount,
            },
        });
        pos += entry_len;
    }
    Ok((out, pos))
}

/// Serialise a complete snapshot table.
pub(crate) fn encode_table(entries: &[SnapEntry]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in entries {
        let start = out.len();
        let extra_len = OUR_EXTRA + e.extra_tail.len();
        out.extend_from_slice(&e.l1_offset.to_be_bytes());
        out.extend_from_slice(&e.l1_size.to_be_bytes());
        out.extend_from_slice(&(e.id_raw.len() as u16).to_be_bytes());
        out.extend_from_slice(&(e.name_raw.len() as u16).to_be_bytes());
        out.extend_from_slice(&e.info.date_sec.to_be_bytes());
        out.extend_from_slice(&e.info.date_nsec.to_be_bytes());
        out.extend_from_slice(&e.info.vm_clock_nsec.to_be_bytes());
        let small = u32::try_from(e.info.vm_state_size).unwrap_or(u32::MAX);
        out.extend_from_slice(&small.to_be_bytes());
        out.extend_from_slice(&(extra_len as u32).to_be_bytes());
        out.extend_from_slice(&e.info.vm_state_size.to_be_bytes());
        out.extend_from_slice(&e.info.disk_size.to_be_bytes());
        out.extend_from_slice(&e.info.icount.unwrap_or(u64::MAX).to_be_bytes());
        out.extend_from_slice(&e.extra_tail);
        out.extend_from_slice(&e.id_raw);
        out.extend_from_slice(&e.name_raw);
        let len = out.len() - start;
        out.resize(start + len.div_ceil(8) * 8, 0);
    }
    out
}

/// Next free numeric id: one more than the largest numeric id in use.
pub(crate) fn next_id(entries: &[SnapEntry]) -> String {
    let max = entries
        .iter()
        .filter_map(|e| e.info.id.parse::<u64>().ok())
        .max()
        .unwrap_or(0);
    (max + 1).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::MemBackend;

    fn entry(id: &str, name: &str) -> SnapEntry {
        SnapEntry::new(
            0x30000,
            3,
            SnapshotInfo {
                id: id.into(),
                name: name.into(),
                date_sec: 5,
                date_nsec: 6,
                vm_clock_nsec: 7,
                vm_state_size: 5 << 30,
                disk_size: 1 << 20,
                icount: None,
            },
        )
    }

    #[test]
    fn roundtrip() {
        let es = vec![entry("1", "a"), entry("7", "second one")];
        let raw = encode_table(&es);
        assert_eq!(raw.len() % 8, 0);
        let mut io = MemBackend::new(raw);
        let (back, len) = read_table(&mut io, 0, 2, 16, 99).unwrap();
        assert_eq!(len as usize, encode_table(&es).len());
        assert_eq!(back.len(), 2);
        assert_eq!(back[0].info, es[0].info);
        assert_eq!(back[1].info, es[1].info);
        assert_eq!(back[1].l1_offset, 0x30000);
        assert_eq!(next_id(&back), "8");
        assert_eq!(next_id(&[]), "1");
    }

    #[test]
    fn rejects_bad_entries() {
        let mut raw = encode_table(&[entry("1", "a")]);
        raw[7] = 1; // unaligned L1
        assert!(read_table(&mut MemBackend::new(raw.clone()), 0, 1, 16, 0).is_err());
        raw[7] = 0;
        raw[36..40].copy_from_slice(&5000u32.to_be_bytes());
        assert!(read_table(&mut MemBackend::new(raw), 0, 1, 16, 0).is_err());
    }
}
