//! Internal snapshot operations and VM state access.
//!
//! Create, apply and delete are each one refcount [`Txn`]: new L1/L2 tables,
//! the new snapshot table and the new refcount blocks/table are written to
//! clusters that the current header does not reach, then one 36-byte header
//! write (l1_size .. snapshots_offset) switches everything at once.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::{Error, Result};
use crate::header::{size_to_l1, MAX_SNAPSHOTS, OFF_L1_SIZE};
use crate::image::Qcow2;
use crate::refcount::Txn;
use crate::snapshot::{self, SnapEntry, SnapshotInfo, MAX_SNAPSHOT_TABLE_BYTES};
use crate::table::{decode_l2, encode_table, l1_l2_offset, read_table, COPIED};

/// Buffer size used when streaming VM state.
const VMSTATE_CHUNK: usize = 32 << 20;

impl Qcow2 {
    /// A fresh copy of the L2 table behind `l1_entry` for the active image,
    /// its entries' COPIED flags cleared (their clusters are now shared, the
    /// copy's refcounts raised in `txn`). Returns the new L1 entry, or None
    /// for an unallocated one.
    pub(crate) fn shared_l2_copy(&mut self, l1_entry: u64, txn: &mut Txn) -> Result<Option<u64>> {
        let cb = self.cb;
        let t = l1_l2_offset(l1_entry, cb)?;
        if t == 0 {
            return Ok(None);
        }
        let mut copy = self.l2_snapshot_copy(t, txn, 1)?;
        for e in &mut copy {
            *e &= !COPIED;
        }
        let nt = self.rc.txn_alloc(&mut *self.io, txn, 1)?;
        self.io.write_at(&encode_table(&copy, 1usize << cb), nt)?;
        Ok(Some(nt | COPIED))
    }

    /// Internal snapshots, in table order.
    pub fn snapshots(&self) -> &[SnapshotInfo] {
        &self.infos
    }

    /// A snapshot by name (preferred) or id.
    pub fn find_snapshot(&self, name_or_id: &str) -> Option<&SnapshotInfo> {
        self.snap_index(name_or_id).ok().map(|i| &self.infos[i])
    }

    /// Guest clock (`vm_clock_nsec`) recorded in a snapshot, by name or id.
    pub fn snapshot_vm_clock(&self, name_or_id: &str) -> Option<u64> {
        self.find_snapshot(name_or_id).map(|s| s.vm_clock_nsec)
    }

    /// Index of a snapshot by name (preferred) or id.
    pub(crate) fn snap_index(&self, name_or_id: &str) -> Result<usize> {
        self.snaps
            .iter()
            .position(|s| s.info.name == name_or_id)
            .or_else(|| self.snaps.iter().position(|s| s.info.id == name_or_id))
            .ok_or_else(|| Error::SnapshotNotFound(name_or_id.to_string()))
    }

    fn load_snap_l1(&mut self, idx: usize) -> Result<Vec<u64>> {
        let (off, n) = (self.snaps[idx].l1_offset, self.snaps[idx].l1_size);
        if n == 0 {
            return Ok(Vec::new());
        }
        let t = read_table(&mut *self.io, off, n as usize)?;
        for &e in &t {
            l1_l2_offset(e, self.cb)?;
        }
        Ok(t)
    }

    /// Guest offset of the VM state of a snapshot taken at `disk_size`.
    fn vmstate_base(&self, disk_size: u64) -> Result<u64> {
        let shift = 2 * self.cb - 3;
        let idx = size_to_l1(disk_size, self.cb)?;
        idx.checked_shl(shift)
            .filter(|v| v >> shift == idx)
            .ok_or_else(|| {
                crate::error::corrupt(format!("snapshot disk size {disk_size} too large"))
            })
    }

    /// Write VM state bytes at `offset` of the VM state area of the active
    /// image (used before [`Qcow2::create_snapshot`]). All-zero clusters are
    /// left unallocated. Large buffers are written with few system calls.
    pub fn write_vmstate(&mut self, offset: u64, buf: &[u8]) -> Result<()> {
        let voff = self
            .vmstate_offset()
            .checked_add(offset)
            .ok_or_else(|| Error::InvalidArgument(format!("vmstate offset {offset} too large")))?;
        self.mutate(|s| s.write_mapped(voff, buf))
    }

    /// Drop any VM state from the active image (it stays in snapshots).
    pub fn discard_vmstate(&mut self) -> Result<()> {
        self.mutate(|s| s.drop_active_vmstate())
    }

    fn drop_active_vmstate(&mut self) -> Result<()> {
        let cb = self.cb;
        let vi = self.vm_index() as usize;
        if self.l1.len() <= vi {
            return Ok(());
        }
        let mut tables = Vec::new();
        for i in vi..self.l1.len() {
            let t = l1_l2_offset(self.l1[i], cb)?;
            if t != 0 {
                tables.push(t);
            }
        }
        if tables.is_empty() {
            return Ok(());
        }
        let mut deltas: BTreeMap<u64, i64> = BTreeMap::new();
        for &t in &tables {
            let table = self.l2.take(&mut *self.io, t, cb)?;
            for &e in &table {
                if let Some(h) = decode_l2(e, cb)?.host() {
                    *deltas.entry(h >> cb).or_insert(0) -= 1;
                }
            }
            *deltas.entry(t >> cb).or_insert(0) -= 1;
        }
        // Unreference first, then release.
        let zeros = vec![0u8; (self.l1.len() - vi) * 8];
        self.io
            .write_at(&zeros, self.hdr.l1_table_offset + vi as u64 * 8)?;
        self.io.flush()?;
        for e in &mut self.l1[vi..] {
            *e = 0;
        }
        self.rc.apply_in_place(&mut *self.io, &deltas)?;
        Ok(())
    }

    /// A buffered [`Write`]r for streaming VM state into the active image;
    /// discards stale VM state first. Call [`VmStateWriter::finish`], then
    /// [`Qcow2::create_snapshot`] with the returned size.
    pub fn vmstate_writer(&mut self) -> Result<VmStateWriter<'_>> {
        self.discard_vmstate()?;
        Ok(VmStateWriter {
            img: self,
            buf: Vec::new(),
            written: 0,
        })
    }

    /// Stream VM state from `vmstate` and create snapshot `name` holding it.
    pub fn save_snapshot(
        &mut self,
        name: &str,
        vm_clock_nsec: u64,
        vmstate: &mut dyn Read,
    ) -> Result<SnapshotInfo> {
        self.check_new_name(name)?;
        self.discard_vmstate()?;
        let mut buf = vec![0u8; VMSTATE_CHUNK];
        let mut off = 0u64;
        loop {
            let mut n = 0;
            while n < buf.len() {
                match vmstate.read(&mut buf[n..]) {
                    Ok(0) => break,
                    Ok(k) => n += k,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e.into()),
                }
            }
            if n == 0 {
                break;
            }
            self.write_vmstate(off, &buf[..n])?;
            off += n as u64;
            if n < buf.len() {
                break;
            }
        }
        self.create_snapshot(name, vm_clock_nsec, off)
    }

    pub(crate) fn check_new_name(&self, name: &str) -> Result<()> {
        if name.is_empty() || name.len() > 1024 {
            return Err(Error::InvalidArgument(format!(
                "snapshot name length {} not in 1..=1024",
                name.len()
            )));
        }
        if self.snaps.iter().any(|s| s.info.name == name)
            || self.frozen.as_ref().is_some_and(|f| f.name == name)
        {
            return Err(Error::TagExists(name.to_string()));
        }
        if self.snaps.len() + usize::from(self.frozen.is_some()) >= MAX_SNAPSHOTS as usize {
            return Err(Error::InvalidArgument(format!(
                "too many snapshots ({})",
                self.snaps.len()
            )));
        }
        Ok(())
    }

    /// Create snapshot `name` of the current disk. VM state previously written
    /// with [`Qcow2::write_vmstate`] (`vm_state_size` bytes) moves into the
    /// snapshot and is no longer referenced by the active image.
    pub fn create_snapshot(
        &mut self,
        name: &str,
        vm_clock_nsec: u64,
        vm_state_size: u64,
    ) -> Result<SnapshotInfo> {
        self.check_new_name(name)?;
        if !self.writable {
            return Err(Error::ReadOnly);
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let info = SnapshotInfo {
            id: snapshot::next_id(&self.snaps),
            name: name.to_string(),
            date_sec: now.as_secs() as u32,
            date_nsec: now.subsec_nanos(),
            vm_clock_nsec,
            vm_state_size,
            disk_size: self.hdr.size,
            icount: None,
        };
        self.mutate(|s| s.create_snapshot_inner(info))
    }

    fn create_snapshot_inner(&mut self, info: SnapshotInfo) -> Result<SnapshotInfo> {
        let vi = self.vm_index();
        if info.vm_state_size > 0 {
            let last = vi
                .checked_add((info.vm_state_size - 1) / self.l1_span())
                .ok_or_else(|| Error::InvalidArgument("vm_state_size too large".into()))?;
            self.grow_l1(last)?;
        }
        let l1_len = self.l1.len();
        let mut txn = Txn::default();
        // The current active L1 (with its L2 tables) becomes the snapshot's;
        // the active image gets fresh copies of the disk part, without VM state.
        let mut new_l1 = vec![0u64; l1_len];
        for (i, slot) in new_l1.iter_mut().enumerate().take(vi as usize) {
            let Some(entry) = self.shared_l2_copy(self.l1[i], &mut txn)? else {
                continue;
            };
            *slot = entry;
        }
        let new_l1_off = self.write_l1_txn(&mut txn, &new_l1)?;
        let l1_off = if l1_len > 0 {
            self.hdr.l1_table_offset
        } else {
            0
        };
        let entry = SnapEntry::new(l1_off, l1_len as u32, info.clone());
        let mut snaps = self.snaps.clone();
        snaps.push(entry);
        self.commit(txn, new_l1, new_l1_off, Some(snaps), true)?;
        Ok(info)
    }

    /// Read an L2 table and add `delta` to the refcount of every host cluster it maps.
    pub(crate) fn l2_snapshot_copy(
        &mut self,
        t: u64,
        txn: &mut Txn,
        delta: i64,
    ) -> Result<Vec<u64>> {
        let cb = self.cb;
        let table = self.l2.take(&mut *self.io, t, cb)?;
        let copy = table.clone();
        self.l2.put(t, table);
        for &e in &copy {
            if let Some(h) = decode_l2(e, cb)?.host() {
                self.rc.txn_delta(&mut *self.io, txn, h >> cb, delta)?;
            }
        }
        Ok(copy)
    }

    /// Allocate and write a new L1 table inside a transaction.
    pub(crate) fn write_l1_txn(&mut self, txn: &mut Txn, l1: &[u64]) -> Result<u64> {
        if l1.is_empty() {
            return Ok(0);
        }
        let cs = 1u64 << self.cb;
        let clusters = (l1.len() as u64 * 8).div_ceil(cs);
        let off = self.rc.txn_alloc(&mut *self.io, txn, clusters)?;
        self.io
            .write_at(&encode_table(l1, (clusters * cs) as usize), off)?;
        Ok(off)
    }

    /// Release the clusters of an L1 table of `n` entries at `off` in a transaction.
    fn release_l1_txn(&mut self, txn: &mut Txn, off: u64, n: u64) -> Result<()> {
        let clusters = (n * 8).div_ceil(1u64 << self.cb);
        for k in 0..clusters {
            self.rc
                .txn_delta(&mut *self.io, txn, (off >> self.cb) + k, -1)?;
        }
        Ok(())
    }

    /// Write the new snapshot table (`None`: keep the current one), release
    /// the old one, flush, switch the header and adopt the new state in
    /// memory. With `sync_after`, the header write is flushed too (needed
    /// whenever the transaction frees clusters the old header reaches, as
    /// they may be reused right away). Returns the clusters whose release a
    /// deferring transaction postponed.
    pub(crate) fn commit(
        &mut self,
        mut txn: Txn,
        new_l1: Vec<u64>,
        new_l1_off: u64,
        snaps: Option<Vec<SnapEntry>>,
        sync_after: bool,
    ) -> Result<Vec<u64>> {
        let cb = self.cb;
        let cs = 1u64 << cb;
        let keep_table = snaps.is_none();
        let snaps = snaps.unwrap_or_else(|| self.snaps.clone());
        if keep_table {
            // Unchanged snapshot table: nothing to write or release.
        } else if self.hdr.nb_snapshots > 0 {
            for k in 0..self.snap_table_len.div_ceil(cs) {
                self.rc.txn_delta(
                    &mut *self.io,
                    &mut txn,
                    (self.hdr.snapshots_offset >> cb) + k,
                    -1,
                )?;
            }
        }
        let raw = snapshot::encode_table(&snaps);
        if raw.len() as u64 > MAX_SNAPSHOT_TABLE_BYTES {
            return Err(Error::InvalidArgument(
                "snapshot table would become too large".into(),
            ));
        }
        let snap_off = if keep_table {
            self.hdr.snapshots_offset
        } else if snaps.is_empty() {
            0
        } else {
            let clusters = (raw.len() as u64).div_ceil(cs);
            let off = self.rc.txn_alloc(&mut *self.io, &mut txn, clusters)?;
            let mut padded = raw.clone();
            padded.resize((clusters * cs) as usize, 0);
            self.io.write_at(&padded, off)?;
            off
        };
        let (rt_off, rt_clusters) = self.rc.txn_finish(&mut *self.io, &mut txn)?;
        self.io.flush()?;
        let mut h = [0u8; 36];
        h[0..4].copy_from_slice(&(new_l1.len() as u32).to_be_bytes());
        h[4..12].copy_from_slice(&new_l1_off.to_be_bytes());
        h[12..20].copy_from_slice(&rt_off.to_be_bytes());
        h[20..24].copy_from_slice(&rt_clusters.to_be_bytes());
        h[24..28].copy_from_slice(&(snaps.len() as u32).to_be_bytes());
        h[28..36].copy_from_slice(&snap_off.to_be_bytes());
        self.io.write_at(&h, OFF_L1_SIZE)?;
        if sync_after {
            self.io.flush()?;
        }
        let deferred = txn.take_deferred();
        self.rc.txn_apply(txn, rt_off, rt_clusters);
        self.hdr.l1_size = new_l1.len() as u32;
        self.hdr.l1_table_offset = new_l1_off;
        self.hdr.refcount_table_offset = rt_off;
        self.hdr.refcount_table_clusters = rt_clusters;
        self.hdr.nb_snapshots = snaps.len() as u32;
        self.hdr.snapshots_offset = snap_off;
        self.l1 = new_l1;
        self.snap_table_len = raw.len() as u64;
        self.infos = snaps.iter().map(|s| s.info.clone()).collect();
        self.snaps = snaps;
        self.l2.clear();
        Ok(deferred)
    }

    /// Revert the active disk to a snapshot. The VM state of the snapshot is
    /// not mapped into the active image; read it with [`Qcow2::read_vmstate`].
    pub fn apply_snapshot(&mut self, name_or_id: &str) -> Result<()> {
        let idx = self.snap_index(name_or_id)?;
        let ds = self.snaps[idx].info.disk_size;
        if ds != self.hdr.size {
            return Err(Error::Unsupported(format!(
                "applying a snapshot with disk size {ds} to an image of size {}",
                self.hdr.size
            )));
        }
        self.mutate(|s| s.apply_inner(idx))
    }

    fn apply_inner(&mut self, idx: usize) -> Result<()> {
        let cb = self.cb;
        let snap_l1 = self.load_snap_l1(idx)?;
        let vi = self.vm_index() as usize;
        let l1_len = self.l1.len().max(vi);
        let mut txn = Txn::default();
        let mut new_l1 = vec![0u64; l1_len];
        for i in 0..vi.min(snap_l1.len()) {
            let Some(entry) = self.shared_l2_copy(snap_l1[i], &mut txn)? else {
                continue;
            };
            new_l1[i] = entry;
        }
        for i in 0..self.l1.len() {
            let t = l1_l2_offset(self.l1[i], cb)?;
            if t != 0 {
                self.l2_snapshot_copy(t, &mut txn, -1)?;
                self.rc.txn_delta(&mut *self.io, &mut txn, t >> cb, -1)?;
            }
        }
        let (old_off, old_len) = (self.hdr.l1_table_offset, self.l1.len() as u64);
        if old_len > 0 {
            self.release_l1_txn(&mut txn, old_off, old_len)?;
        }
        let new_l1_off = self.write_l1_txn(&mut txn, &new_l1)?;
        self.commit(txn, new_l1, new_l1_off, None, true)?;
        Ok(())
    }

    /// Delete a snapshot, releasing the clusters only it referenced.
    pub fn delete_snapshot(&mut self, name_or_id: &str) -> Result<()> {
        let idx = self.snap_index(name_or_id)?;
        self.mutate(|s| s.delete_inner(idx))
    }

    fn delete_inner(&mut self, idx: usize) -> Result<()> {
        let cb = self.cb;
        let snap_l1 = self.load_snap_l1(idx)?;
        let mut txn = Txn::default();
        let (sn_off, sn_len) = (
            self.snaps[idx].l1_offset,
            u64::from(self.snaps[idx].l1_size),
        );
        if sn_len > 0 {
            self.release_l1_txn(&mut txn, sn_off, sn_len)?;
        }
        for &e in &snap_l1 {
            let t = l1_l2_offset(e, cb)?;
            if t != 0 {
                self.l2_snapshot_copy(t, &mut txn, -1)?;
                self.rc.txn_delta(&mut *self.io, &mut txn, t >> cb, -1)?;
            }
        }
        let (new_l1, new_l1_off) = self.fix_active_copied(&mut txn)?;
        let mut snaps = self.snaps.clone();
        snaps.remove(idx);
        self.commit(txn, new_l1, new_l1_off, Some(snaps), true)?;
        Ok(())
    }

    /// After `txn` dropped references: refcounts of clusters still used by
    /// the active image may have dropped to one, so their COPIED flags must
    /// be set in the same atomic switch. Affected active tables are rewritten
    /// to new clusters; returns the active L1 (and its offset) to switch to.
    pub(crate) fn fix_active_copied(&mut self, txn: &mut Txn) -> Result<(Vec<u64>, u64)> {
        let cb = self.cb;
        let cs = 1u64 << cb;
        let mut new_l1 = self.l1.clone();
        let mut l1_changed = false;
        for (i, &e) in self.l1.clone().iter().enumerate() {
            let t = l1_l2_offset(e, cb)?;
            if t == 0 {
                continue;
            }
            if self.rc.txn_get(&mut *self.io, txn, t >> cb)? == 1 {
                let table = self.l2.take(&mut *self.io, t, cb)?;
                let mut fixed = table.clone();
                self.l2.put(t, table);
                let mut changed = false;
                for fe in &mut fixed {
                    if let Some(h) = decode_l2(*fe, cb)?.host() {
                        let want = self.rc.txn_get(&mut *self.io, txn, h >> cb)? == 1;
                        if want != (*fe & COPIED != 0) {
                            *fe ^= COPIED;
                            changed = true;
                        }
                    }
                }
                if changed {
                    let nt = self.rc.txn_alloc(&mut *self.io, txn, 1)?;
                    self.io.write_at(&encode_table(&fixed, cs as usize), nt)?;
                    self.rc.txn_delta(&mut *self.io, txn, t >> cb, -1)?;
                    new_l1[i] = nt | COPIED;
                    l1_changed = true;
                } else if e & COPIED == 0 {
                    new_l1[i] = e | COPIED;
                    l1_changed = true;
                }
            } else if e & COPIED != 0 {
                new_l1[i] = e & !COPIED;
                l1_changed = true;
            }
        }
        let new_l1_off = if l1_changed {
            let (old_off, old_len) = (self.hdr.l1_table_offset, self.l1.len() as u64);
            self.release_l1_txn(txn, old_off, old_len)?;
            self.write_l1_txn(txn, &new_l1)?
        } else {
            self.hdr.l1_table_offset
        };
        Ok((new_l1, new_l1_off))
    }

    /// Read `buf.len()` bytes of a snapshot's VM state starting at `offset`.
    pub fn read_vmstate(&mut self, name_or_id: &str, offset: u64, buf: &mut [u8]) -> Result<()> {
        let idx = self.snap_index(name_or_id)?;
        let info = &self.snaps[idx].info;
        let size = info.vm_state_size;
        if offset
            .checked_add(buf.len() as u64)
            .map_or(true, |e| e > size)
        {
            return Err(Error::OutOfRange {
                offset,
                len: buf.len() as u64,
                size,
            });
        }
        let base = self.vmstate_base(info.disk_size)?;
        let l1 = self.load_snap_l1(idx)?;
        let voff = base
            .checked_add(offset)
            .ok_or_else(|| Error::InvalidArgument("vmstate offset overflow".into()))?;
        self.read_mapped(Some(&l1), voff, buf)
    }

    /// Read guest data as it was when a snapshot was taken.
    pub fn read_snapshot_at(
        &mut self,
        name_or_id: &str,
        buf: &mut [u8],
        offset: u64,
    ) -> Result<()> {
        let idx = self.snap_index(name_or_id)?;
        let size = self.snaps[idx].info.disk_size.min(self.hdr.size);
        if offset
            .checked_add(buf.len() as u64)
            .map_or(true, |e| e > size)
        {
            return Err(Error::OutOfRange {
                offset,
                len: buf.len() as u64,
                size,
            });
        }
        let l1 = self.load_snap_l1(idx)?;
        self.read_mapped(Some(&l1), offset, buf)
    }
}

/// Buffered streaming writer for VM state, see [`Qcow2::vmstate_writer`].
pub struct VmStateWriter<'a> {
    img: &'a mut Qcow2,
    buf: Vec<u8>,
    written: u64,
}

impl std::fmt::Debug for VmStateWriter<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmStateWriter")
            .field("written", &self.written)
            .field("buffered", &self.buf.len())
            .finish()
    }
}

impl VmStateWriter<'_> {
    fn flush_buf(&mut self) -> Result<()> {
        if !self.buf.is_empty() {
            self.img.write_vmstate(self.written, &self.buf)?;
            self.written += self.buf.len() as u64;
            self.buf.clear();
        }
        Ok(())
    }

    /// Write out buffered data and return the total VM state size.
    pub fn finish(mut self) -> Result<u64> {
        self.flush_buf()?;
        Ok(self.written)
    }
}

impl Write for VmStateWriter<'_> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.buf.capacity() == 0 {
            self.buf.reserve_exact(VMSTATE_CHUNK);
        }
        let n = data.len().min(VMSTATE_CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == VMSTATE_CHUNK {
            self.flush_buf().map_err(io::Error::other)?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.flush_buf().map_err(io::Error::other)
    }
}
