//! Two-phase ("live") snapshots: [`Qcow2::freeze`] captures the disk at the
//! cut, [`Qcow2::write_frozen_vmstate`] streams the VM state afterwards while
//! the guest keeps writing, [`Qcow2::commit_frozen`] publishes the snapshot
//! (or [`Qcow2::abort_frozen`] drops it).
//!
//! # Where things live while a snapshot is pending
//!
//! * **Frozen disk view**: `freeze` gives the active image fresh copies of
//!   its L2 tables (COPIED flags cleared, every mapped cluster's refcount +1)
//!   and a new L1 table, all switched in by one header write. The *old* L2
//!   tables become the frozen view. Its L1 table exists only in memory
//!   ([`FrozenState::l1`]); on disk the frozen tables and the extra
//!   references are unreferenced, i.e. *leaks* for `qemu-img check` (exit 3),
//!   never errors. Guest writes then copy-on-write every shared cluster
//!   (refcount 2), exactly as after a snapshot.
//! * **VM state**: written into the vmstate area of the frozen L1 (not the
//!   active image's): new L2 tables and data clusters whose only reference is
//!   the in-memory frozen L1 — leaks again if the process dies.
//! * **Commit**: one atomic header switch writes the frozen L1 to new clusters
//!   and a snapshot table naming it. Its refcounts are already right, so the
//!   active image is not touched.
//! * **Abort**: one atomic header switch drops the frozen references and
//!   fixes the COPIED flags of the active tables whose clusters are no longer
//!   shared (like deleting a snapshot).

use crate::error::{corrupt, Error, Result};
use crate::header::MAX_TABLE_BYTES;
use crate::image::{is_zero, Act, OldSrc, Qcow2};
use crate::refcount::Txn;
use crate::snapshot::{self, SnapEntry, SnapshotInfo};
use crate::table::{decode_l2, encode_table, l1_l2_offset, Mapping, COPIED};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Token ids, unique within the process (a token never matches another handle).
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Token of a pending snapshot made by [`Qcow2::freeze`]; pass it to
/// [`Qcow2::write_frozen_vmstate`] and finally to [`Qcow2::commit_frozen`] or
/// [`Qcow2::abort_frozen`]. Dropping it without either leaves the freeze
/// pending until the handle is closed (the image then has leaked clusters
/// only; `qemu-img check -r leaks` reclaims them).
#[derive(Debug, PartialEq, Eq)]
#[must_use = "a frozen snapshot must be committed or aborted"]
pub struct Frozen {
    id: u64,
    name: String,
}

impl Frozen {
    /// Tag the snapshot will get on commit.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// In-memory state of the pending snapshot.
#[derive(Debug)]
pub(crate) struct FrozenState {
    pub id: u64,
    pub name: String,
    /// L1 table of the frozen view: the disk part at the cut, then the VM state.
    pub l1: Vec<u64>,
    /// Cluster indices still counted (refcount 1) for structures the pre-freeze
    /// header reached (old active L1, replaced refcount blocks/table). They are
    /// released by the commit or abort switch.
    pub deferred: Vec<u64>,
    pub date: (u32, u32),
}

impl Qcow2 {
    /// At the cut (guest paused): freezes the current disk content for
    /// snapshot `name`, to be committed later with [`Qcow2::commit_frozen`].
    ///
    /// Errors before doing any work if the tag is taken (by a snapshot or
    /// another pending freeze), if a freeze is already pending, or if the
    /// image is read-only. Afterwards, guest writes through
    /// [`Qcow2::write_at`] never change what the frozen view sees (shared
    /// clusters are copied on write, as after a snapshot).
    ///
    /// Cost: metadata only — one new L1 table, one copy per allocated L2
    /// table (at most 8 for a 4 GiB disk with 64 KiB clusters) and the changed
    /// refcount blocks; no data is copied.
    ///
    /// Exactly **one `fdatasync`**: the new tables and refcount blocks must be
    /// durable before the header write that switches to them. The header
    /// write itself is not synced: the switch frees nothing that the old
    /// header reaches (the replaced structures stay counted until commit or
    /// abort), so until it becomes durable — with the next flush of any later
    /// operation, e.g. the first guest write — a crash simply yields the
    /// pre-freeze image with the same disk content and no snapshot pending.
    pub fn freeze(&mut self, name: &str) -> Result<Frozen> {
        if !self.writable {
            return Err(Error::ReadOnly);
        }
        if self.poisoned {
            return Err(Error::Poisoned);
        }
        if self.frozen.is_some() {
            return Err(Error::InvalidArgument(
                "a frozen snapshot is already pending".into(),
            ));
        }
        self.check_new_name(name)?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let (l1, deferred) = self.mutate(|s| s.freeze_inner())?;
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        self.frozen = Some(FrozenState {
            id,
            name: name.to_string(),
            l1,
            deferred,
            date: (now.as_secs() as u32, now.subsec_nanos()),
        });
        Ok(Frozen {
            id,
            name: name.to_string(),
        })
    }

    fn freeze_inner(&mut self) -> Result<(Vec<u64>, Vec<u64>)> {
        // Until commit or abort, a kill leaves the clusters taken here and by
        // the VM state leaked: the dirty bit makes the next open reclaim them.
        // It is written before the tables, and made durable by the same sync.
        self.set_dirty(true)?;
        let cb = self.cb;
        let cs = 1u64 << cb;
        let vi = self.vm_index() as usize;
        let disk_entries = vi.min(self.l1.len());
        let mut txn = Txn::deferring();
        // The active image keeps any VM state of its own (same tables); the
        // disk part gets copies; the old disk tables become the frozen view.
        let mut new_l1 = self.l1.clone();
        let mut frozen_l1 = vec![0u64; vi];
        let mut copied = 0;
        for i in 0..disk_entries {
            let Some(entry) = self.shared_l2_copy(self.l1[i], &mut txn)? else {
                continue;
            };
            new_l1[i] = entry;
            frozen_l1[i] = self.l1[i];
            copied += 1;
        }
        if copied == 0 {
            // Nothing allocated on the disk: the frozen view is all zeros (or
            // all backing file) and the image needs no change at all.
            return Ok((frozen_l1, Vec::new()));
        }
        for k in 0..(self.l1.len() as u64 * 8).div_ceil(cs) {
            txn.defer((self.hdr.l1_table_offset >> cb) + k);
        }
        let new_l1_off = self.write_l1_txn(&mut txn, &new_l1)?;
        let deferred = self.commit(txn, new_l1, new_l1_off, None, false)?;
        Ok((frozen_l1, deferred))
    }

    fn frozen_check(&self, f: &Frozen) -> Result<()> {
        match &self.frozen {
            Some(st) if st.id == f.id => Ok(()),
            _ => Err(Error::InvalidArgument(
                "this frozen snapshot is not pending on this image".into(),
            )),
        }
    }

    /// Whether a [`Qcow2::freeze`] is pending (not yet committed or aborted).
    pub fn is_frozen(&self) -> bool {
        self.frozen.is_some()
    }

    /// Writes VM state for the pending snapshot at `offset` (from 0). May be
    /// called any number of times, in any order, interleaved with guest
    /// writes. All-zero clusters that were never written are skipped and read
    /// back as zeros. The data goes to clusters owned by the pending snapshot
    /// only (the active image is not touched); no `fdatasync` is issued — the
    /// commit syncs everything once.
    pub fn write_frozen_vmstate(&mut self, f: &Frozen, offset: u64, buf: &[u8]) -> Result<()> {
        self.frozen_check(f)?;
        let voff = self
            .vmstate_offset()
            .checked_add(offset)
            .filter(|&v| {
                v.checked_add(buf.len() as u64)
                    .is_some_and(|e| e <= 1 << 56)
            })
            .ok_or_else(|| Error::InvalidArgument(format!("vmstate offset {offset} too large")))?;
        if buf.is_empty() {
            return Ok(());
        }
        let entries = ((voff + buf.len() as u64 - 1) >> (2 * self.cb - 3)) + 1;
        if entries * 8 > MAX_TABLE_BYTES {
            return Err(Error::InvalidArgument(format!(
                "vmstate range {offset}+{} needs an L1 table of {entries} entries",
                buf.len()
            )));
        }
        self.mutate(|s| s.frozen_write(voff, buf))
    }

    /// Make sure the frozen L1 has an entry for every L1 index below `n`.
    fn frozen_grow(&mut self, n: u64) -> Result<()> {
        if n * 8 > MAX_TABLE_BYTES {
            return Err(Error::InvalidArgument(format!(
                "L1 table of {n} entries is too large"
            )));
        }
        let st = self.frozen.as_mut().expect("frozen");
        if (st.l1.len() as u64) < n {
            st.l1.resize(n as usize, 0);
        }
        Ok(())
    }

    fn frozen_write(&mut self, voff: u64, data: &[u8]) -> Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        let l1_shift = 2 * self.cb - 3;
        let end = voff + data.len() as u64;
        self.frozen_grow(((end - 1) >> l1_shift) + 1)?;
        for (l1_idx, pos, chunk_end) in crate::image::l2_spans(voff, end, l1_shift) {
            self.frozen_write_chunk(
                l1_idx,
                pos,
                &data[(pos - voff) as usize..(chunk_end - voff) as usize],
            )?;
        }
        Ok(())
    }

    /// Write within one L2 table of the frozen view's VM state. Every table
    /// and data cluster there was allocated by us for this snapshot alone, so
    /// existing clusters are overwritten in place and new ones need no
    /// ordering: nothing on disk references them before the commit.
    fn frozen_write_chunk(&mut self, l1_idx: usize, start: u64, data: &[u8]) -> Result<()> {
        let cb = self.cb;
        let cs = 1u64 << cb;
        let end = start + data.len() as u64;
        let old_l2 = l1_l2_offset(self.frozen.as_ref().expect("frozen").l1[l1_idx], cb)?;
        let mut table = if old_l2 == 0 {
            vec![0u64; 1usize << (cb - 3)]
        } else {
            self.l2.take(&mut *self.io, old_l2, cb)?
        };
        let mask = (1u64 << (cb - 3)) - 1;
        let first = start >> cb;
        let last = (end - 1) >> cb;
        let mut acts = Vec::with_capacity((last - first + 1) as usize);
        for gc in first..=last {
            let cv = gc << cb;
            let piece =
                &data[(start.max(cv) - start) as usize..(end.min(cv + cs) - start) as usize];
            acts.push(match decode_l2(table[(gc & mask) as usize], cb)? {
                Mapping::Data(h) => Act::InPlace(h),
                Mapping::Unallocated if is_zero(piece) => Act::Keep,
                Mapping::Unallocated => Act::New(OldSrc::Zeros),
                Mapping::Zero { .. } => {
                    return Err(corrupt("unexpected zero cluster in pending VM state"));
                }
            });
        }
        for (k, a) in acts.iter().enumerate() {
            if let Act::InPlace(h) = *a {
                let cv = (first + k as u64) << cb;
                let (s, e) = (start.max(cv), end.min(cv + cs));
                self.io.write_at(
                    &data[(s - start) as usize..(e - start) as usize],
                    h + (s - cv),
                )?;
            }
        }
        let n_new = acts.iter().filter(|a| matches!(a, Act::New(_))).count() as u64;
        if n_new == 0 {
            if old_l2 != 0 {
                self.l2.put(old_l2, table);
            }
            return Ok(());
        }
        let need_l2 = old_l2 == 0;
        let base = self.rc.alloc(&mut *self.io, n_new + u64::from(need_l2))?;
        let mut next = if need_l2 { base + cs } else { base };
        let (mut lo, mut hi) = (usize::MAX, 0usize);
        let mut k = 0;
        while k < acts.len() {
            if !matches!(acts[k], Act::New(_)) {
                k += 1;
                continue;
            }
            let mut j = k;
            while j < acts.len() && matches!(acts[j], Act::New(_)) {
                let idx = ((first + j as u64) & mask) as usize;
                table[idx] = (next + (j - k) as u64 * cs) | COPIED;
                lo = lo.min(idx);
                hi = hi.max(idx);
                j += 1;
            }
            self.write_new_run(&acts[k..j], first + k as u64, start, data, next)?;
            next += (j - k) as u64 * cs;
            k = j;
        }
        let l2 = if need_l2 {
            self.io.write_at(&encode_table(&table, cs as usize), base)?;
            self.frozen.as_mut().expect("frozen").l1[l1_idx] = base | COPIED;
            base
        } else {
            self.io
                .write_at(&encode_table(&table[lo..=hi], 0), old_l2 + lo as u64 * 8)?;
            old_l2
        };
        self.l2.put(l2, table);
        Ok(())
    }

    /// Read guest data of the pending snapshot's disk view (content at the cut).
    pub fn read_frozen_at(&mut self, f: &Frozen, buf: &mut [u8], offset: u64) -> Result<()> {
        self.frozen_check(f)?;
        if offset
            .checked_add(buf.len() as u64)
            .map_or(true, |e| e > self.hdr.size)
        {
            return Err(Error::OutOfRange {
                offset,
                len: buf.len() as u64,
                size: self.hdr.size,
            });
        }
        let l1 = self.frozen.as_ref().expect("frozen").l1.clone();
        self.read_mapped(Some(&l1), offset, buf)
    }

    /// Makes the pending snapshot visible (one atomic header switch, two
    /// `fdatasync`s): disk = content at [`Qcow2::freeze`], VM state = what was
    /// written with [`Qcow2::write_frozen_vmstate`] (`vm_state_size` bytes;
    /// unwritten parts read as zeros). The snapshot gets the tag given to
    /// `freeze` and the time of the freeze as its date.
    pub fn commit_frozen(
        &mut self,
        f: Frozen,
        vm_clock_nsec: u64,
        vm_state_size: u64,
    ) -> Result<SnapshotInfo> {
        self.frozen_check(&f)?;
        // Let the snapshot's L1 table cover the whole VM state when it can;
        // entries past its end read as zeros anyway (here and in QEMU).
        let need = self
            .vm_index()
            .saturating_add(vm_state_size.div_ceil(self.l1_span()))
            .min(MAX_TABLE_BYTES / 8);
        self.mutate(|s| {
            s.frozen_grow(need)?;
            s.commit_frozen_inner(vm_clock_nsec, vm_state_size)
        })
    }

    fn commit_frozen_inner(
        &mut self,
        vm_clock_nsec: u64,
        vm_state_size: u64,
    ) -> Result<SnapshotInfo> {
        let st = self.frozen.take().expect("frozen");
        let mut txn = Txn::default();
        for &c in &st.deferred {
            self.rc.txn_delta(&mut *self.io, &mut txn, c, -1)?;
        }
        let l1_off = self.write_l1_txn(&mut txn, &st.l1)?;
        let info = SnapshotInfo {
            id: snapshot::next_id(&self.snaps),
            name: st.name,
            date_sec: st.date.0,
            date_nsec: st.date.1,
            vm_clock_nsec,
            vm_state_size,
            disk_size: self.hdr.size,
            icount: None,
        };
        let mut snaps = self.snaps.clone();
        snaps.push(SnapEntry::new(l1_off, st.l1.len() as u32, info.clone()));
        // The active image is unchanged: same L1 table.
        let (l1, l1_off) = (self.l1.clone(), self.hdr.l1_table_offset);
        self.commit(txn, l1, l1_off, Some(snaps), true)?;
        self.set_dirty(false)?;
        Ok(info)
    }

    /// Gives up the pending snapshot: releases everything [`Qcow2::freeze`]
    /// and [`Qcow2::write_frozen_vmstate`] took, in one atomic header switch
    /// (two `fdatasync`s). Active tables whose clusters are no longer shared
    /// get their COPIED flags back in the same switch.
    pub fn abort_frozen(&mut self, f: Frozen) -> Result<()> {
        self.frozen_check(&f)?;
        self.mutate(|s| s.abort_frozen_inner())
    }

    fn abort_frozen_inner(&mut self) -> Result<()> {
        let st = self.frozen.take().expect("frozen");
        let cb = self.cb;
        let mut txn = Txn::default();
        for &c in &st.deferred {
            self.rc.txn_delta(&mut *self.io, &mut txn, c, -1)?;
        }
        for &e in &st.l1 {
            let t = l1_l2_offset(e, cb)?;
            if t != 0 {
                self.l2_snapshot_copy(t, &mut txn, -1)?;
                self.rc.txn_delta(&mut *self.io, &mut txn, t >> cb, -1)?;
            }
        }
        let (new_l1, new_l1_off) = self.fix_active_copied(&mut txn)?;
        self.commit(txn, new_l1, new_l1_off, None, true)?;
        self.set_dirty(false)?;
        Ok(())
    }
}
