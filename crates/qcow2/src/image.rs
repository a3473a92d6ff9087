//! The [`Qcow2`] image handle: open, create, guest reads and writes.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::path::Path;

use crate::backend::{Backend, FileBackend};
use crate::backing::{self, Backing, BackingFormat};
use crate::error::{corrupt, Error, Result};
use crate::header::{
    size_to_l1, Header, INCOMPAT_CORRUPT, INCOMPAT_DIRTY, MAX_CLUSTER_BITS, MAX_TABLE_BYTES,
    MIN_CLUSTER_BITS, OFF_AUTOCLEAR, OFF_INCOMPATIBLE, OFF_L1_SIZE, V3_HEADER_LEN,
};
use crate::refcount::Refcounts;
use crate::snapshot::{self, SnapEntry, SnapshotInfo};
use crate::table::{decode_l2, encode_table, l1_l2_offset, read_table, L2Cache, Mapping, COPIED};

/// Options for [`Qcow2::create`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateOptions {
    /// log2 of the cluster size (9..=21); default 16 (64 KiB).
    pub cluster_bits: u32,
    /// Backing file name (stored verbatim; relative names are resolved
    /// against the new image's directory).
    pub backing_file: Option<String>,
    /// Backing file format; probed from the file when `None`.
    pub backing_format: Option<BackingFormat>,
}

impl Default for CreateOptions {
    fn default() -> Self {
        Self {
            cluster_bits: 16,
            backing_file: None,
            backing_format: None,
        }
    }
}

/// An open qcow2 image.
///
/// All metadata updates are written through to the underlying storage in a
/// crash-safe order (see the crate documentation); [`Qcow2::flush`] makes
/// guest writes durable.
pub struct Qcow2 {
    pub(crate) io: Box<dyn Backend>,
    pub(crate) writable: bool,
    pub(crate) hdr: Header,
    pub(crate) cb: u32,
    pub(crate) l1: Vec<u64>,
    pub(crate) l2: L2Cache,
    pub(crate) rc: Refcounts,
    pub(crate) snaps: Vec<SnapEntry>,
    pub(crate) infos: Vec<SnapshotInfo>,
    /// On-disk size of the current snapshot table in bytes.
    pub(crate) snap_table_len: u64,
    pub(crate) backing: Option<Backing>,
    pub(crate) poisoned: bool,
    /// Pending two-phase snapshot, see [`Qcow2::freeze`].
    pub(crate) frozen: Option<crate::frozen::FrozenState>,
}

impl std::fmt::Debug for Qcow2 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2")
            .field("size", &self.hdr.size)
            .field("cluster_bits", &self.cb)
            .field("writable", &self.writable)
            .field("snapshots", &self.infos)
            .field("backing", &self.backing)
            .finish_non_exhaustive()
    }
}

/// Splits the guest range `start..end` at L2-table boundaries (`1 << l1_shift`
/// bytes each): `(l1 index, span start, span end)`.
pub(crate) fn l2_spans(
    start: u64,
    end: u64,
    l1_shift: u32,
) -> impl Iterator<Item = (usize, u64, u64)> {
    let mut pos = start;
    std::iter::from_fn(move || {
        if pos >= end {
            return None;
        }
        let l1_idx = pos >> l1_shift;
        let span_end = end.min((l1_idx + 1) << l1_shift);
        let span = (l1_idx as usize, pos, span_end);
        pos = span_end;
        Some(span)
    })
}

/// The metadata read from an image file: what opening and recovering share.
struct Meta {
    hdr: Header,
    l1: Vec<u64>,
    rc: Refcounts,
    snaps: Vec<SnapEntry>,
    snap_table_len: u64,
}

impl Meta {
    /// Reads and validates header, active L1, refcount table and snapshot table.
    fn load(io: &mut dyn Backend) -> Result<Meta> {
        let mut first = [0u8; 512];
        io.read_at(&mut first, 0)?;
        let cb = u32::from_be_bytes([first[20], first[21], first[22], first[23]]);
        let hdr = if (MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cb) {
            let mut c0 = vec![0u8; 1usize << cb];
            io.read_at(&mut c0, 0)?;
            Header::parse(&c0)?
        } else {
            Header::parse(&first)?
        };
        let cb = hdr.cluster_bits;
        let l1 = if hdr.l1_size > 0 {
            read_table(io, hdr.l1_table_offset, hdr.l1_size as usize)?
        } else {
            Vec::new()
        };
        for &e in &l1 {
            l1_l2_offset(e, cb)?;
        }
        let rc = Refcounts::load(
            io,
            cb,
            hdr.refcount_order,
            hdr.refcount_table_offset,
            hdr.refcount_table_clusters,
        )?;
        let (snaps, snap_table_len) =
            snapshot::read_table(io, hdr.snapshots_offset, hdr.nb_snapshots, cb, hdr.size)?;
        Ok(Meta {
            hdr,
            l1,
            rc,
            snaps,
            snap_table_len,
        })
    }
}

/// Which bytes of a cluster a write covers and what the rest must contain.
#[derive(Debug, Clone, Copy)]
pub(crate) enum OldSrc {
    Zeros,
    Host(u64),
    Backing,
}

#[derive(Debug, Clone, Copy)]
pub(crate) enum Act {
    Keep,
    InPlace(u64),
    New(OldSrc),
}

pub(crate) fn is_zero(b: &[u8]) -> bool {
    let mut chunks = b.chunks_exact(64);
    for c in &mut chunks {
        if c.iter().fold(0u8, |a, &x| a | x) != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|&x| x == 0)
}

impl Qcow2 {
    /// Open an image file. Backing files are opened read-only, resolved
    /// relative to the image's directory.
    pub fn open(path: &Path, writable: bool) -> Result<Self> {
        let file = OpenOptions::new().read(true).write(writable).open(path)?;
        Self::open_inner(Box::new(FileBackend::new(file)), writable, path.parent(), 0)
    }

    /// Open an image living in an arbitrary [`Backend`]. Relative backing file
    /// names are resolved against `backing_dir` (or the working directory).
    pub fn open_with(
        backend: Box<dyn Backend>,
        writable: bool,
        backing_dir: Option<&Path>,
    ) -> Result<Self> {
        Self::open_inner(backend, writable, backing_dir, 0)
    }

    pub(crate) fn open_inner(
        mut io: Box<dyn Backend>,
        writable: bool,
        dir: Option<&Path>,
        depth: u32,
    ) -> Result<Self> {
        let Meta {
            hdr,
            l1,
            rc,
            snaps,
            snap_table_len,
        } = Meta::load(&mut *io)?;
        let cb = hdr.cluster_bits;
        if writable && hdr.incompatible & INCOMPAT_CORRUPT != 0 {
            return Err(corrupt(
                "image is marked corrupt; it can only be opened read-only",
            ));
        }
        let infos = snaps.iter().map(|s| s.info.clone()).collect();
        let backing = match &hdr.backing_file {
            Some(name) => Some(backing::open(
                name,
                hdr.backing_format.as_deref(),
                dir,
                depth,
            )?),
            None => None,
        };
        let mut img = Qcow2 {
            io,
            writable,
            cb,
            l1,
            l2: L2Cache::new(cb),
            rc,
            snaps,
            infos,
            snap_table_len,
            backing,
            poisoned: false,
            frozen: None,
            hdr,
        };
        if writable && img.hdr.version >= 3 && img.hdr.autoclear != 0 {
            // We do not maintain any autoclear feature (e.g. persistent bitmaps):
            // clear the bits before modifying the image, as the spec requires.
            img.io.write_at(&0u64.to_be_bytes(), OFF_AUTOCLEAR)?;
            img.io.flush()?;
            img.hdr.autoclear = 0;
        }
        if writable && img.hdr.incompatible & INCOMPAT_DIRTY != 0 {
            // A live snapshot was cut short (the process was killed): the clusters
            // it had taken are leaked. Reclaim them now, as QEMU does for a dirty
            // image; the repair clears the bit.
            img.repair_leaks()?;
        }
        Ok(img)
    }

    /// Sets or clears the v3 dirty bit ("refcounts may be too high": a live
    /// snapshot is in progress). Not synced: setting it rides on the sync that
    /// makes the snapshot's first allocations durable, clearing it on the next one.
    pub(crate) fn set_dirty(&mut self, on: bool) -> Result<()> {
        if self.hdr.version < 3 {
            return Ok(());
        }
        let v = if on {
            self.hdr.incompatible | INCOMPAT_DIRTY
        } else {
            self.hdr.incompatible & !INCOMPAT_DIRTY
        };
        if v != self.hdr.incompatible {
            self.io.write_at(&v.to_be_bytes(), OFF_INCOMPATIBLE)?;
            self.hdr.incompatible = v;
        }
        Ok(())
    }

    /// True while the image carries the dirty bit.
    pub fn is_dirty(&self) -> bool {
        self.hdr.incompatible & INCOMPAT_DIRTY != 0
    }

    /// Create (or truncate) an image file of `size` bytes (multiple of 512).
    pub fn create(path: &Path, size: u64, opts: CreateOptions) -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        Self::create_with(Box::new(FileBackend::new(file)), size, opts, path.parent())
    }

    /// Create an image inside an arbitrary (empty) [`Backend`].
    pub fn create_with(
        mut io: Box<dyn Backend>,
        size: u64,
        opts: CreateOptions,
        backing_dir: Option<&Path>,
    ) -> Result<Self> {
        let cb = opts.cluster_bits;
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cb) {
            return Err(Error::InvalidArgument(format!(
                "cluster_bits {cb} outside {MIN_CLUSTER_BITS}..={MAX_CLUSTER_BITS}"
            )));
        }
        if size % 512 != 0 || size > (1u64 << 56) {
            return Err(Error::InvalidArgument(format!(
                "disk size {size} must be a multiple of 512 and at most 2^56"
            )));
        }
        let cs = 1u64 << cb;
        let l1_size = size_to_l1(size, cb)?;
        if l1_size * 8 > MAX_TABLE_BYTES {
            return Err(Error::InvalidArgument(format!(
                "disk size {size} too large for cluster_bits {cb}"
            )));
        }
        let mut backing_format = opts.backing_format.map(|f| f.as_str().to_string());
        if let Some(name) = &opts.backing_file {
            // Validate the backing file now (and probe its format if needed).
            let b = backing::open(name, backing_format.as_deref(), backing_dir, 0)?;
            if backing_format.is_none() {
                backing_format = Some(match b {
                    Backing::Qcow2(_) => "qcow2".into(),
                    Backing::Raw { .. } => "raw".into(),
                });
            }
        }
        let l1_clusters = (l1_size * 8).div_ceil(cs);
        let epb = cs * 8 / 16;
        let (mut rt_clusters, mut blocks) = (1u64, 1u64);
        loop {
            let total = 1 + rt_clusters + blocks + l1_clusters;
            let nb = total.div_ceil(epb);
            let nr = (nb * 8).div_ceil(cs);
            if nb == blocks && nr == rt_clusters {
                break;
            }
            blocks = nb;
            rt_clusters = nr;
        }
        let total = 1 + rt_clusters + blocks + l1_clusters;
        let hdr = Header {
            version: 3,
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits: cb,
            size,
            crypt_method: 0,
            l1_size: l1_size as u32,
            l1_table_offset: if l1_size > 0 {
                (1 + rt_clusters + blocks) << cb
            } else {
                0
            },
            refcount_table_offset: cs,
            refcount_table_clusters: rt_clusters as u32,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible: 0,
            compatible: 0,
            autoclear: 0,
            refcount_order: 4,
            header_length: V3_HEADER_LEN,
            compression_type: 0,
            backing_file: opts.backing_file.clone(),
            backing_format,
        };
        let c0 = hdr.serialize_cluster0()?;
        let table: Vec<u64> = (0..blocks).map(|b| (1 + rt_clusters + b) << cb).collect();
        let mut rb = vec![0u8; (blocks * cs) as usize];
        for c in 0..total as usize {
            rb[c * 2..c * 2 + 2].copy_from_slice(&1u16.to_be_bytes());
        }
        io.set_len(0)?;
        io.write_at(&encode_table(&table, (rt_clusters * cs) as usize), cs)?;
        io.write_at(&rb, (1 + rt_clusters) * cs)?;
        if l1_clusters > 0 {
            io.write_at(&vec![0u8; (l1_clusters * cs) as usize], hdr.l1_table_offset)?;
        }
        io.write_at(&c0, 0)?;
        io.flush()?;
        Self::open_inner(io, true, backing_dir, 0)
    }

    /// Virtual disk size in bytes.
    pub fn size(&self) -> u64 {
        self.hdr.size
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1u64 << self.cb
    }

    /// Backing file name recorded in the image, if any.
    pub fn backing_file(&self) -> Option<&str> {
        self.hdr.backing_file.as_deref()
    }

    /// Whether the image was opened for writing.
    pub fn is_writable(&self) -> bool {
        self.writable
    }

    /// Bytes of guest address space mapped by one L1 entry.
    pub(crate) fn l1_span(&self) -> u64 {
        1u64 << (2 * self.cb - 3)
    }

    /// Number of L1 entries covering the virtual disk (the VM state starts at
    /// this L1 index).
    pub(crate) fn vm_index(&self) -> u64 {
        self.hdr.size.div_ceil(self.l1_span())
    }

    /// Guest offset at which VM state is stored.
    pub fn vmstate_offset(&self) -> u64 {
        self.vm_index() << (2 * self.cb - 3)
    }

    pub(crate) fn check_range(&self, offset: u64, len: usize) -> Result<()> {
        match offset.checked_add(len as u64) {
            Some(e) if e <= self.hdr.size => Ok(()),
            _ => Err(Error::OutOfRange {
                offset,
                len: len as u64,
                size: self.hdr.size,
            }),
        }
    }

    /// After a failed update poisoned the handle: reloads every piece of
    /// metadata from the file, which the update order keeps consistent at all
    /// times (at worst with leaked clusters — the same state a crash at that
    /// point would leave). A pending [`Qcow2::freeze`] is dropped (its
    /// clusters leak). The backing file is kept. On error the handle stays
    /// poisoned.
    pub fn recover(&mut self) -> Result<()> {
        if !self.poisoned {
            return Ok(());
        }
        let Meta {
            hdr,
            l1,
            rc,
            snaps,
            snap_table_len,
        } = Meta::load(&mut *self.io)?;
        let cb = hdr.cluster_bits;
        if cb != self.cb {
            return Err(corrupt("cluster size changed under the handle"));
        }
        self.infos = snaps.iter().map(|s| s.info.clone()).collect();
        self.snaps = snaps;
        self.snap_table_len = snap_table_len;
        self.l1 = l1;
        self.l2 = L2Cache::new(cb);
        self.rc = rc;
        self.hdr = hdr;
        self.frozen = None;
        self.poisoned = false;
        Ok(())
    }

    /// Whether a failed update left the handle unusable until [`Qcow2::recover`].
    pub fn is_poisoned(&self) -> bool {
        self.poisoned
    }

    /// Run a mutating operation; any failure poisons the handle because the
    /// in-memory metadata may no longer match the file.
    pub(crate) fn mutate<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        if !self.writable {
            return Err(Error::ReadOnly);
        }
        if self.poisoned {
            return Err(Error::Poisoned);
        }
        let r = f(self);
        if r.is_err() {
            self.poisoned = true;
        }
        r
    }

    /// Read guest data. Unallocated areas read from the backing file or as zeros.
    pub fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check_range(offset, buf.len())?;
        self.read_mapped(None, offset, buf)
    }

    /// The image file, where [`crate::Extent::File`] runs lie (`None` for an image
    /// not in a file).
    pub fn file(&self) -> Option<&std::fs::File> {
        self.io.file()
    }

    /// Write guest data, allocating clusters and copying shared ones.
    pub fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_range(offset, buf.len())?;
        self.mutate(|s| s.write_mapped(offset, buf))
    }

    /// Make everything written so far durable (`fdatasync`).
    pub fn flush(&mut self) -> Result<()> {
        Ok(self.io.flush()?)
    }

    /// Read through an L1 table (`None` = the active one) at guest offset `voff`
    /// (which may lie in the VM state area).
    pub(crate) fn read_mapped(
        &mut self,
        snap_l1: Option<&[u64]>,
        voff: u64,
        buf: &mut [u8],
    ) -> Result<()> {
        let cb = self.cb;
        let end = voff
            .checked_add(buf.len() as u64)
            .ok_or_else(|| Error::InvalidArgument("read range overflows".into()))?;
        let l1_shift = 2 * cb - 3;
        let mut pos = voff;
        while pos < end {
            let l1_idx = pos >> l1_shift;
            let chunk_end = end.min((l1_idx + 1) << l1_shift);
            let l1 = snap_l1.unwrap_or(&self.l1);
            let e = usize::try_from(l1_idx)
                .ok()
                .and_then(|i| l1.get(i))
                .copied()
                .unwrap_or(0);
            let l2_off = l1_l2_offset(e, cb)?;
            let b = &mut buf[(pos - voff) as usize..(chunk_end - voff) as usize];
            if l2_off == 0 {
                self.read_unallocated(b, pos)?;
            } else {
                let table = self.l2.take(&mut *self.io, l2_off, cb)?;
                let r = self.read_with_table(&table, pos, b);
                self.l2.put(l2_off, table);
                r?;
            }
            pos = chunk_end;
        }
        Ok(())
    }

    fn read_with_table(&mut self, table: &[u64], start: u64, buf: &mut [u8]) -> Result<()> {
        let cb = self.cb;
        let cs = 1u64 << cb;
        let mask = (1u64 << (cb - 3)) - 1;
        let end = start + buf.len() as u64;
        // Pending contiguous host read: (host offset, buffer offset, length).
        let mut run: Option<(u64, usize, usize)> = None;
        let mut pos = start;
        while pos < end {
            let intra = pos & (cs - 1);
            let n = (cs - intra).min(end - pos) as usize;
            let bo = (pos - start) as usize;
            let m = decode_l2(table[((pos >> cb) & mask) as usize], cb)?;
            if let Mapping::Data(h) = m {
                let host = h + intra;
                match &mut run {
                    Some((hs, _, len)) if *hs + *len as u64 == host => *len += n,
                    _ => {
                        if let Some((hs, b0, len)) = run.take() {
                            self.io.read_at(&mut buf[b0..b0 + len], hs)?;
                        }
                        run = Some((host, bo, n));
                    }
                }
            } else {
                if let Some((hs, b0, len)) = run.take() {
                    self.io.read_at(&mut buf[b0..b0 + len], hs)?;
                }
                match m {
                    Mapping::Zero { .. } => buf[bo..bo + n].fill(0),
                    _ => self.read_unallocated(&mut buf[bo..bo + n], pos)?,
                }
            }
            pos += n as u64;
        }
        if let Some((hs, b0, len)) = run {
            self.io.read_at(&mut buf[b0..b0 + len], hs)?;
        }
        Ok(())
    }

    /// Contents of unallocated guest space: backing file inside the disk, zeros beyond.
    fn read_unallocated(&mut self, buf: &mut [u8], voff: u64) -> Result<()> {
        let size = self.hdr.size;
        let inside = size.saturating_sub(voff).min(buf.len() as u64) as usize;
        buf[inside..].fill(0);
        match &mut self.backing {
            Some(b) if inside > 0 => b.read(&mut buf[..inside], voff),
            _ => {
                buf[..inside].fill(0);
                Ok(())
            }
        }
    }

    /// Write through the active L1 at guest offset `voff` (may be VM state).
    pub(crate) fn write_mapped(&mut self, voff: u64, data: &[u8]) -> Result<()> {
        let l1_shift = 2 * self.cb - 3;
        let end = voff
            .checked_add(data.len() as u64)
            .filter(|&e| e <= 1u64 << 56)
            .ok_or_else(|| Error::InvalidArgument("write range too large".into()))?;
        if end > voff {
            self.grow_l1((end - 1) >> l1_shift)?;
        }
        for (l1_idx, pos, chunk_end) in l2_spans(voff, end, l1_shift) {
            self.write_chunk(
                l1_idx,
                pos,
                &data[(pos - voff) as usize..(chunk_end - voff) as usize],
            )?;
        }
        Ok(())
    }

    /// Make sure the active L1 table has an entry for `l1_idx`.
    pub(crate) fn grow_l1(&mut self, l1_idx: u64) -> Result<()> {
        let n = l1_idx + 1;
        let old_len = self.l1.len() as u64;
        if n <= old_len {
            return Ok(());
        }
        if n * 8 > MAX_TABLE_BYTES {
            return Err(Error::InvalidArgument(format!(
                "L1 table of {n} entries is too large"
            )));
        }
        let cs = 1u64 << self.cb;
        let old_clusters = (old_len * 8).div_ceil(cs);
        if old_len > 0 && n * 8 <= old_clusters * cs {
            // Fits in the clusters already allocated: zero the new entries first.
            let zeros = vec![0u8; ((n - old_len) * 8) as usize];
            self.io
                .write_at(&zeros, self.hdr.l1_table_offset + old_len * 8)?;
            self.io.flush()?;
            self.io.write_at(&(n as u32).to_be_bytes(), OFF_L1_SIZE)?;
            self.io.flush()?;
        } else {
            let clusters = (n * 8).div_ceil(cs);
            let off = self.rc.alloc(&mut *self.io, clusters)?;
            let mut t = self.l1.clone();
            t.resize(n as usize, 0);
            self.io
                .write_at(&encode_table(&t, (clusters * cs) as usize), off)?;
            self.io.flush()?;
            let mut h = [0u8; 12];
            h[..4].copy_from_slice(&(n as u32).to_be_bytes());
            h[4..].copy_from_slice(&off.to_be_bytes());
            self.io.write_at(&h, OFF_L1_SIZE)?;
            self.io.flush()?;
            let old_off = self.hdr.l1_table_offset;
            self.hdr.l1_table_offset = off;
            if old_len > 0 {
                let deltas = (0..old_clusters)
                    .map(|k| ((old_off >> self.cb) + k, -1))
                    .collect();
                self.rc.apply_in_place(&mut *self.io, &deltas)?;
            }
        }
        self.l1.resize(n as usize, 0);
        self.hdr.l1_size = n as u32;
        Ok(())
    }

    /// What metadata, if any, lives in the host cluster holding `host`: QEMU's
    /// "cached" overlap checks (header, active L1 and L2 tables, refcount table and
    /// blocks, snapshot table, the snapshots' L1 tables). Guest data must never be
    /// written there: an L2 entry pointing at metadata is a corrupt image.
    pub(crate) fn metadata_at(&self, host: u64) -> Option<&'static str> {
        let cb = self.cb;
        let c = host >> cb;
        let within = |off: u64, bytes: u64| {
            bytes > 0 && c >= off >> cb && c <= off.saturating_add(bytes - 1) >> cb
        };
        if c == 0 {
            Some("image header")
        } else if within(self.hdr.l1_table_offset, u64::from(self.hdr.l1_size) * 8) {
            Some("active L1 table")
        } else if within(
            self.rc.table_offset,
            u64::from(self.rc.table_clusters) << cb,
        ) {
            Some("refcount table")
        } else if self.rc.is_block(c) {
            Some("refcount block")
        } else if self
            .l1
            .iter()
            .any(|&e| l1_l2_offset(e, cb).is_ok_and(|o| o != 0 && o >> cb == c))
        {
            Some("active L2 table")
        } else if within(self.hdr.snapshots_offset, self.snap_table_len) {
            Some("snapshot table")
        } else if self
            .snaps
            .iter()
            .any(|s| within(s.l1_offset, u64::from(s.l1_size) * 8))
        {
            Some("inactive L1 table")
        } else {
            None
        }
    }

    /// Sets the corrupt bit (version 3: the image then opens read-only only, as in
    /// QEMU) and returns the error describing why.
    pub(crate) fn mark_corrupt(&mut self, why: String) -> Error {
        if self.hdr.version >= 3 {
            self.hdr.incompatible |= INCOMPAT_CORRUPT;
            let _ = self
                .io
                .write_at(&self.hdr.incompatible.to_be_bytes(), OFF_INCOMPATIBLE)
                .and_then(|()| self.io.flush());
        }
        corrupt(format!("{why}; the image is marked corrupt"))
    }

    /// Write `data` at guest offset `start`, all within the L2 table of `l1_idx`.
    fn write_chunk(&mut self, l1_idx: usize, start: u64, data: &[u8]) -> Result<()> {
        let cb = self.cb;
        let cs = 1u64 << cb;
        let end = start + data.len() as u64;
        let old_l2 = l1_l2_offset(self.l1[l1_idx], cb)?;
        // None: no table yet; Some(false): exclusively owned; Some(true): shared.
        let (mut table, shared) = if old_l2 == 0 {
            (vec![0u64; 1usize << (cb - 3)], None)
        } else {
            let rc = self.rc.get(&mut *self.io, old_l2 >> cb)?;
            if rc == 0 {
                return Err(corrupt(format!(
                    "L2 table at {old_l2:#x} is in use but has refcount 0"
                )));
            }
            (self.l2.take(&mut *self.io, old_l2, cb)?, Some(rc > 1))
        };
        let table_shared = shared == Some(true);
        let mask = (1u64 << (cb - 3)) - 1;
        let first_cluster = start >> cb;
        let last_cluster = (end - 1) >> cb;
        let mut acts = Vec::with_capacity((last_cluster - first_cluster + 1) as usize);
        let mut decs: BTreeMap<u64, i64> = BTreeMap::new();
        let size = self.hdr.size;
        for gc in first_cluster..=last_cluster {
            let cv = gc << cb;
            let (cs0, ce0) = (start.max(cv) - start, end.min(cv + cs) - start);
            let piece = &data[cs0 as usize..ce0 as usize];
            let idx = (gc & mask) as usize;
            let act = match decode_l2(table[idx], cb)? {
                Mapping::Data(h) => {
                    let rc = self.rc.get(&mut *self.io, h >> cb)?;
                    if rc == 0 {
                        return Err(corrupt(format!(
                            "data cluster at {h:#x} is in use but has refcount 0"
                        )));
                    }
                    if rc == 1 && !table_shared {
                        if let Some(what) = self.metadata_at(h) {
                            return Err(self.mark_corrupt(format!(
                                "preventing an invalid write of guest data at host offset {h:#x}: it overlaps the {what}"
                            )));
                        }
                        Act::InPlace(h)
                    } else {
                        *decs.entry(h >> cb).or_insert(0) -= 1;
                        Act::New(OldSrc::Host(h))
                    }
                }
                Mapping::Zero { prealloc } => {
                    if is_zero(piece) {
                        Act::Keep
                    } else {
                        if prealloc != 0 {
                            *decs.entry(prealloc >> cb).or_insert(0) -= 1;
                        }
                        Act::New(OldSrc::Zeros)
                    }
                }
                Mapping::Unallocated => {
                    let backed = self.backing.is_some() && cv < size;
                    if !backed && is_zero(piece) {
                        Act::Keep
                    } else if backed {
                        Act::New(OldSrc::Backing)
                    } else {
                        Act::New(OldSrc::Zeros)
                    }
                }
            };
            acts.push(act);
        }
        let n_new = acts.iter().filter(|a| matches!(a, Act::New(_))).count() as u64;
        // In-place data writes (coalesced).
        let mut k = 0;
        while k < acts.len() {
            if let Act::InPlace(h) = acts[k] {
                let gc0 = first_cluster + k as u64;
                let off0 = start.max(gc0 << cb);
                let mut j = k + 1;
                while j < acts.len()
                    && matches!(acts[j], Act::InPlace(h2) if h2 == h + ((j - k) as u64) * cs)
                {
                    j += 1;
                }
                let off1 = end.min((first_cluster + j as u64) << cb);
                let host = h + (off0 & (cs - 1));
                self.io.write_at(
                    &data[(off0 - start) as usize..(off1 - start) as usize],
                    host,
                )?;
                k = j;
            } else {
                k += 1;
            }
        }
        if n_new == 0 {
            if old_l2 != 0 {
                self.l2.put(old_l2, table);
            }
            return Ok(());
        }
        let need_l2 = shared != Some(false);
        let base = self.rc.alloc(&mut *self.io, n_new + u64::from(need_l2))?;
        // Clusters the refcounts call free may still hold metadata (a corrupt
        // or hostile image): never write data or a table over it.
        for i in 0..n_new + u64::from(need_l2) {
            if let Some(what) = self.metadata_at(base + i * cs) {
                return Err(self.mark_corrupt(format!(
                    "preventing an invalid write at host offset {:#x} (a cluster the refcounts call free): it overlaps the {what}",
                    base + i * cs
                )));
            }
        }
        let data_base = if need_l2 { base + cs } else { base };
        // New clusters: consecutive guest clusters get consecutive host clusters.
        let mut next = data_base;
        let mut k = 0;
        while k < acts.len() {
            let Act::New(_) = acts[k] else {
                k += 1;
                continue;
            };
            let mut j = k;
            while j < acts.len() && matches!(acts[j], Act::New(_)) {
                j += 1;
            }
            self.write_new_run(&acts[k..j], first_cluster + k as u64, start, data, next)?;
            next += (j - k) as u64 * cs;
            k = j;
        }
        if table_shared {
            for e in table.iter_mut() {
                *e &= !COPIED;
            }
        }
        let (mut lo, mut hi) = (usize::MAX, 0usize);
        let mut host = data_base;
        for (k, a) in acts.iter().enumerate() {
            if let Act::New(_) = a {
                let idx = ((first_cluster + k as u64) & mask) as usize;
                table[idx] = host | COPIED;
                host += cs;
                lo = lo.min(idx);
                hi = hi.max(idx);
            }
        }
        let new_l2 = if need_l2 {
            self.io.write_at(&encode_table(&table, cs as usize), base)?;
            base
        } else {
            old_l2
        };
        // Refcounts, data and any new L2 table must be durable before they are referenced.
        self.io.flush()?;
        if need_l2 {
            let e = new_l2 | COPIED;
            self.io.write_at(
                &e.to_be_bytes(),
                self.hdr.l1_table_offset + l1_idx as u64 * 8,
            )?;
            self.l1[l1_idx] = e;
            if old_l2 != 0 {
                *decs.entry(old_l2 >> cb).or_insert(0) -= 1;
            }
        } else {
            let raw = encode_table(&table[lo..=hi], 0);
            self.io.write_at(&raw, old_l2 + lo as u64 * 8)?;
        }
        self.l2.put(new_l2, table);
        if !decs.is_empty() {
            // References are gone for good before the old clusters are released.
            self.io.flush()?;
            self.rc.apply_in_place(&mut *self.io, &decs)?;
        }
        Ok(())
    }

    /// Write freshly allocated clusters for guest clusters `gc0..` (`acts` are all `New`).
    pub(crate) fn write_new_run(
        &mut self,
        acts: &[Act],
        gc0: u64,
        start: u64,
        data: &[u8],
        host0: u64,
    ) -> Result<()> {
        let cb = self.cb;
        let cs = 1u64 << cb;
        let end = start + data.len() as u64;
        let mut k = 0;
        while k < acts.len() {
            let cv = (gc0 + k as u64) << cb;
            let full = cv >= start && cv + cs <= end;
            if full {
                let mut j = k + 1;
                while j < acts.len() && ((gc0 + j as u64) << cb) + cs <= end {
                    j += 1;
                }
                let b0 = (cv - start) as usize;
                let b1 = b0 + (j - k) * cs as usize;
                self.io.write_at(&data[b0..b1], host0 + k as u64 * cs)?;
                k = j;
                continue;
            }
            let mut buf = vec![0u8; cs as usize];
            match acts[k] {
                Act::New(OldSrc::Host(h)) => self.io.read_at(&mut buf, h)?,
                Act::New(OldSrc::Backing) => self.read_unallocated(&mut buf, cv)?,
                _ => {}
            }
            let s = start.max(cv);
            let e = end.min(cv + cs);
            buf[(s - cv) as usize..(e - cv) as usize]
                .copy_from_slice(&data[(s - start) as usize..(e - start) as usize]);
            self.io.write_at(&buf, host0 + k as u64 * cs)?;
            k += 1;
        }
        Ok(())
    }
}
