//! Image header and header extensions (parsing, validation, serialisation).

use crate::error::{corrupt, Error, Result};

/// `QFI\xfb`.
pub(crate) const MAGIC: u32 = 0x5146_49fb;
/// Length of a version 2 header.
pub(crate) const V2_HEADER_LEN: u32 = 72;
/// Header length we write for version 3 images (includes the compression type byte).
pub(crate) const V3_HEADER_LEN: u32 = 112;
/// Minimum length of a version 3 header.
const V3_MIN_HEADER_LEN: u32 = 104;

/// Header extension: end of the extension area.
const EXT_END: u32 = 0;
/// Header extension: backing file format name.
pub(crate) const EXT_BACKING_FORMAT: u32 = 0xE279_2ACA;
/// Header extension: feature name table.
pub(crate) const EXT_FEATURE_NAMES: u32 = 0x6803_f857;

/// Incompatible feature bits.
pub(crate) const INCOMPAT_DIRTY: u64 = 1 << 0;
pub(crate) const INCOMPAT_CORRUPT: u64 = 1 << 1;
pub(crate) const INCOMPAT_DATA_FILE: u64 = 1 << 2;
pub(crate) const INCOMPAT_COMPRESSION: u64 = 1 << 3;
pub(crate) const INCOMPAT_EXTL2: u64 = 1 << 4;
const INCOMPAT_KNOWN: u64 =
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;

/// Byte offsets of header fields that are updated in place.
pub(crate) const OFF_L1_SIZE: u64 = 36;
pub(crate) const OFF_REFCOUNT_TABLE: u64 = 48;
pub(crate) const OFF_AUTOCLEAR: u64 = 88;
/// Offset of the (version 3) incompatible feature bits.
pub(crate) const OFF_INCOMPATIBLE: u64 = 72;

/// Smallest and largest supported cluster_bits.
pub(crate) const MIN_CLUSTER_BITS: u32 = 9;
pub(crate) const MAX_CLUSTER_BITS: u32 = 21;
/// Upper bound for the L1 table and the refcount table (bytes).
pub(crate) const MAX_TABLE_BYTES: u64 = 32 << 20;
/// Upper bound for the number of internal snapshots.
pub(crate) const MAX_SNAPSHOTS: u32 = 65536;
/// Longest backing file name accepted (same as QEMU).
pub(crate) const MAX_BACKING_NAME: u32 = 1023;

/// Parsed header of a qcow2 image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Header {
    pub version: u32,
    pub backing_file_offset: u64,
    pub backing_file_size: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub crypt_method: u32,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible: u64,
    pub compatible: u64,
    pub autoclear: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    pub compression_type: u8,
    /// Backing file name, if any.
    pub backing_file: Option<String>,
    /// Backing format from the header extension, if present.
    pub backing_format: Option<String>,
}

pub(crate) fn be16(b: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([b[off], b[off + 1]])
}

pub(crate) fn be32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

pub(crate) fn be64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_be_bytes(a)
}

/// Number of L1 entries needed to map `size` bytes.
pub(crate) fn size_to_l1(size: u64, cluster_bits: u32) -> Result<u64> {
    let l2_bits = cluster_bits - 3;
    let shift = cluster_bits + l2_bits;
    let per = 1u64 << shift;
    Ok(size.div_ceil(per))
}

fn is_aligned(v: u64, cluster_bits: u32) -> bool {
    v & ((1u64 << cluster_bits) - 1) == 0
}

impl Header {
    /// Parse and validate the header from the first cluster of the image.
    ///
    /// `cluster0` must hold at least the first `min(file length, 2 MiB)` bytes
    /// (zero padded); the caller re-reads once the cluster size is known.
    pub(crate) fn parse(cluster0: &[u8]) -> Result<Self> {
        if cluster0.len() < V2_HEADER_LEN as usize {
            return Err(corrupt(format!(
                "file too short for a header: {} bytes",
                cluster0.len()
            )));
        }
        let b = cluster0;
        let magic = be32(b, 0);
        if magic != MAGIC {
            return Err(Error::BadMagic(magic));
        }
        let version = be32(b, 4);
        if version != 2 && version != 3 {
            return Err(Error::UnsupportedVersion(version));
        }
        let cluster_bits = be32(b, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(Error::Unsupported(format!(
                "cluster_bits {cluster_bits} (supported range {MIN_CLUSTER_BITS}..={MAX_CLUSTER_BITS})"
            )));
        }
        let cs = 1usize << cluster_bits;
        let mut h = Header {
            version,
            backing_file_offset: be64(b, 8),
            backing_file_size: be32(b, 16),
            cluster_bits,
            size: be64(b, 24),
            crypt_method: be32(b, 32),
            l1_size: be32(b, 36),
            l1_table_offset: be64(b, 40),
            refcount_table_offset: be64(b, 48),
            refcount_table_clusters: be32(b, 56),
            nb_snapshots: be32(b, 60),
            snapshots_offset: be64(b, 64),
            incompatible: 0,
            compatible: 0,
            autoclear: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN,
            compression_type: 0,
            backing_file: None,
            backing_format: None,
        };
        if version == 3 {
            if b.len() < V3_MIN_HEADER_LEN as usize {
                return Err(corrupt("file too short for a version 3 header"));
            }
            h.incompatible = be64(b, 72);
            h.compatible = be64(b, 80);
            h.autoclear = be64(b, 88);
            h.refcount_order = be32(b, 96);
            h.header_length = be32(b, 100);
            if h.header_length < V3_MIN_HEADER_LEN || h.header_length as usize > cs {
                return Err(corrupt(format!(
                    "header_length {} out of range",
                    h.header_length
                )));
            }
            if h.header_length > 104 {
                h.compression_type = b[104];
            }
        }
        h.validate()?;
        h.parse_extensions(b)?;
        h.parse_backing_name(b)?;
        Ok(h)
    }

    fn validate(&self) -> Result<()> {
        let cb = self.cluster_bits;
        let unknown = self.incompatible & !INCOMPAT_KNOWN;
        if unknown != 0 {
            return Err(Error::Unsupported(format!(
                "unknown incompatible feature bits {unknown:#x}"
            )));
        }
        if self.incompatible & INCOMPAT_DATA_FILE != 0 {
            return Err(Error::Unsupported("external data file".into()));
        }
        if self.incompatible & INCOMPAT_COMPRESSION != 0 || self.compression_type != 0 {
            return Err(Error::Unsupported(format!(
                "compression type {} (compressed images)",
                self.compression_type
            )));
        }
        if self.incompatible & INCOMPAT_EXTL2 != 0 {
            return Err(Error::Unsupported(
                "extended L2 entries (subclusters)".into(),
            ));
        }
        if self.crypt_method != 0 {
            return Err(Error::Unsupported(format!(
                "encryption (crypt_method {})",
                self.crypt_method
            )));
        }
        if self.refcount_order > 6 {
            return Err(corrupt(format!(
                "refcount_order {} exceeds 6",
                self.refcount_order
            )));
        }
        // Bound the disk size so that offsets fit in the 56-bit host/guest space.
        if self.size > (1u64 << 56) {
            return Err(corrupt(format!("virtual size {} too large", self.size)));
        }
        let need_l1 = size_to_l1(self.size, cb)?;
        if u64::from(self.l1_size) < need_l1 {
            return Err(corrupt(format!(
                "l1_size {} too small for virtual size {} (needs {need_l1})",
                self.l1_size, self.size
            )));
        }
        if u64::from(self.l1_size) * 8 > MAX_TABLE_BYTES {
            return Err(corrupt(format!(
                "l1_size {} exceeds the supported maximum",
                self.l1_size
            )));
        }
        if self.l1_size > 0 && (self.l1_table_offset == 0 || !is_aligned(self.l1_table_offset, cb))
        {
            return Err(corrupt(format!(
                "L1 table offset {:#x} not cluster aligned",
                self.l1_table_offset
            )));
        }
        if self.l1_table_offset > (1u64 << 56) {
            return Err(corrupt(format!(
                "L1 table offset {:#x} out of range",
                self.l1_table_offset
            )));
        }
        if self.refcount_table_offset == 0
            || !is_aligned(self.refcount_table_offset, cb)
            || self.refcount_table_offset > (1u64 << 56)
        {
            return Err(corrupt(format!(
                "refcount table offset {:#x} invalid",
                self.refcount_table_offset
            )));
        }
        let rt_bytes = u64::from(self.refcount_table_clusters) << cb;
        if self.refcount_table_clusters == 0 || rt_bytes > MAX_TABLE_BYTES {
            return Err(corrupt(format!(
                "refcount_table_clusters {} out of range",
                self.refcount_table_clusters
            )));
        }
        if self.nb_snapshots > MAX_SNAPSHOTS {
            return Err(corrupt(format!(
                "nb_snapshots {} exceeds {MAX_SNAPSHOTS}",
                self.nb_snapshots
            )));
        }
        if self.nb_snapshots > 0
            && (!is_aligned(self.snapshots_offset, cb)
                || self.snapshots_offset == 0
                || self.snapshots_offset > (1u64 << 56))
        {
            return Err(corrupt(format!(
                "snapshot table offset {:#x} invalid",
                self.snapshots_offset
            )));
        }
        Ok(())
    }

    fn parse_extensions(&mut self, b: &[u8]) -> Result<()> {
        let cs = 1usize << self.cluster_bits;
        let end = cs.min(b.len());
        let mut pos = self.header_length as usize;
        if self.version == 2 {
            // Version 2 images may carry extensions right after the 72-byte header.
            pos = V2_HEADER_LEN as usize;
        }
        let backing_start = if self.backing_file_offset != 0 {
            usize::try_from(self.backing_file_offset).unwrap_or(usize::MAX)
        } else {
            usize::MAX
        };
        loop {
            if pos + 8 > end || pos >= backing_start {
                // Running into the end of the cluster (or the backing name) ends the list.
                return Ok(());
            }
            let ty = be32(b, pos);
            let len = be32(b, pos + 4) as usize;
            if ty == EXT_END {
                return Ok(());
            }
            let data_start = pos + 8;
            let data_end = data_start
                .checked_add(len)
                .filter(|&e| e <= end)
                .ok_or_else(|| {
                    corrupt(format!(
                        "header extension {ty:#x} length {len} overruns cluster 0"
                    ))
                })?;
            let data = &b[data_start..data_end];
            if ty == EXT_BACKING_FORMAT {
                let s = std::str::from_utf8(data)
                    .map_err(|_| corrupt("backing format extension is not UTF-8"))?;
                self.backing_format = Some(s.trim_end_matches('\0').to_string());
            }
            // Unknown extensions (feature names, bitmaps, ...) are skipped.
            pos = data_start + len.div_ceil(8) * 8;
        }
    }

    fn parse_backing_name(&mut self, b: &[u8]) -> Result<()> {
        if self.backing_file_offset == 0 {
            return Ok(());
        }
        if self.backing_file_size == 0 || self.backing_file_size > MAX_BACKING_NAME {
            return Err(corrupt(format!(
                "backing file name length {} invalid",
                self.backing_file_size
            )));
        }
        let cs = 1u64 << self.cluster_bits;
        let end = self
            .backing_file_offset
            .checked_add(u64::from(self.backing_file_size))
            .filter(|&e| e <= cs && e <= b.len() as u64)
            .ok_or_else(|| {
                corrupt(format!(
                    "backing file name at {:#x} (+{}) is outside the first cluster",
                    self.backing_file_offset, self.backing_file_size
                ))
            })?;
        let name = &b[self.backing_file_offset as usize..end as usize];
        let s = std::str::from_utf8(name).map_err(|_| corrupt("backing file name is not UTF-8"))?;
        self.backing_file = Some(s.to_string());
        Ok(())
    }

    /// Serialise a fresh header (plus extensions and backing name) into the
    /// first cluster. Used when creating images.
    pub(crate) fn serialize_cluster0(&self) -> Result<Vec<u8>> {
        let cs = 1usize << self.cluster_bits;
        let mut b = vec![0u8; cs];
        b[0..4].copy_from_slice(&MAGIC.to_be_bytes());
        b[4..8].copy_from_slice(&self.version.to_be_bytes());
        b[20..24].copy_from_slice(&self.cluster_bits.to_be_bytes());
        b[24..32].copy_from_slice(&self.size.to_be_bytes());
        b[32..36].copy_from_slice(&self.crypt_method.to_be_bytes());
        b[36..40].copy_from_slice(&self.l1_size.to_be_bytes());
        b[40..48].copy_from_slice(&self.l1_table_offset.to_be_bytes());
        b[48..56].copy_from_slice(&self.refcount_table_offset.to_be_bytes());
        b[56..60].copy_from_slice(&self.refcount_table_clusters.to_be_bytes());
        b[60..64].copy_from_slice(&self.nb_snapshots.to_be_bytes());
        b[64..72].copy_from_slice(&self.snapshots_offset.to_be_bytes());
        let mut pos = V2_HEADER_LEN as usize;
        if self.version >= 3 {
            b[72..80].copy_from_slice(&self.incompatible.to_be_bytes());
            b[80..88].copy_from_slice(&self.compatible.to_be_bytes());
            b[88..96].copy_from_slice(&self.autoclear.to_be_bytes());
            b[96..100].copy_from_slice(&self.refcount_order.to_be_bytes());
            b[100..104].copy_from_slice(&V3_HEADER_LEN.to_be_bytes());
            b[104] = self.compression_type;
            pos = V3_HEADER_LEN as usize;
        }
        let push_ext = |b: &mut Vec<u8>, pos: &mut usize, ty: u32, data: &[u8]| -> Result<()> {
            let padded = data.len().div_ceil(8) * 8;
            if *pos + 8 + padded + 8 > cs {
                return Err(Error::InvalidArgument(
                    "header extensions do not fit in cluster 0".into(),
                ));
            }
            b[*pos..*pos + 4].copy_from_slice(&ty.to_be_bytes());
            b[*pos + 4..*pos + 8].copy_from_slice(&(data.len() as u32).to_be_bytes());
            b[*pos + 8..*pos + 8 + data.len()].copy_from_slice(data);
            *pos += 8 + padded;
            Ok(())
        };
        if let Some(fmt) = &self.backing_format {
            push_ext(&mut b, &mut pos, EXT_BACKING_FORMAT, fmt.as_bytes())?;
        }
        if self.version >= 3 && cs >= 4096 {
            let mut t = Vec::new();
            for (ty, bit, name) in [
                (0u8, 0u8, "dirty bit"),
                (0, 1, "corrupt bit"),
                (0, 2, "external data file"),
                (0, 3, "compression type"),
                (0, 4, "extended L2 entries"),
                (1, 0, "lazy refcounts"),
                (2, 0, "bitmaps"),
                (2, 1, "raw external data"),
            ] {
                let mut e = [0u8; 48];
                e[0] = ty;
                e[1] = bit;
                e[2..2 + name.len()].copy_from_slice(name.as_bytes());
                t.extend_from_slice(&e);
            }
            push_ext(&mut b, &mut pos, EXT_FEATURE_NAMES, &t)?;
        }
        // End marker (already zero) occupies 8 bytes.
        pos += 8;
        if let Some(name) = &self.backing_file {
            let n = name.len();
            if n == 0 || n as u32 > MAX_BACKING_NAME || pos + n > cs {
                return Err(Error::InvalidArgument(format!(
                    "backing file name length {n} invalid"
                )));
            }
            b[pos..pos + n].copy_from_slice(name.as_bytes());
            b[8..16].copy_from_slice(&(pos as u64).to_be_bytes());
            b[16..20].copy_from_slice(&(n as u32).to_be_bytes());
        }
        Ok(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        Header {
            version: 3,
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits: 16,
            size: 1 << 30,
            crypt_method: 0,
            l1_size: 2,
            l1_table_offset: 3 << 16,
            refcount_table_offset: 1 << 16,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible: 0,
            compatible: 0,
            autoclear: 0,
            refcount_order: 4,
            header_length: V3_HEADER_LEN,
            compression_type: 0,
            backing_file: Some("base.img".into()),
            backing_format: Some("raw".into()),
        }
    }

    #[test]
    fn roundtrip() {
        let h = sample();
        let b = h.serialize_cluster0().unwrap();
        let mut p = Header::parse(&b).unwrap();
        assert_eq!(p.backing_file.as_deref(), Some("base.img"));
        assert_eq!(p.backing_format.as_deref(), Some("raw"));
        p.backing_file_offset = 0;
        p.backing_file_size = 0;
        assert_eq!(p, h);
    }

    #[test]
    fn rejects_bad_fields() {
        let b = sample().serialize_cluster0().unwrap();
        let mut x = b.clone();
        x[0] = 0;
        assert!(matches!(Header::parse(&x), Err(Error::BadMagic(_))));
        let mut x = b.clone();
        x[23] = 22;
        assert!(matches!(Header::parse(&x), Err(Error::Unsupported(_))));
        let mut x = b.clone();
        x[79] = 1; // dirty: readable (a writable open repairs it)
        assert_eq!(Header::parse(&x).unwrap().incompatible & INCOMPAT_DIRTY, 1);
        let mut x = b.clone();
        x[79] = 0x20; // unknown bit
        assert!(Header::parse(&x)
            .unwrap_err()
            .to_string()
            .contains("unsupported"));
        let mut x = b.clone();
        x[35] = 1; // encryption
        assert!(Header::parse(&x)
            .unwrap_err()
            .to_string()
            .contains("encryption"));
        let mut x = b.clone();
        x[39] = 1; // l1 too small
        assert!(matches!(Header::parse(&x), Err(Error::Corrupt(_))));
        let mut x = b.clone();
        x[47] = 1; // misaligned l1
        assert!(matches!(Header::parse(&x), Err(Error::Corrupt(_))));
        let mut x = b;
        x[63] = 1; // snapshot without offset
        assert!(matches!(Header::parse(&x), Err(Error::Corrupt(_))));
    }
}
