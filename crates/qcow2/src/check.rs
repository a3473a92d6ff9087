//! Consistency check (a subset of what `qemu-img check` verifies) and leak
//! repair (`qemu-img check -r leaks`).

use std::collections::HashMap;

use crate::error::{corrupt, Error, Result};
use crate::image::Qcow2;
use crate::refcount::Txn;
use crate::table::{decode_l2, l1_l2_offset, read_table, COPIED};

/// Result of [`Qcow2::check`].
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CheckReport {
    /// Clusters whose refcount is higher than the number of references.
    pub leaks: u64,
    /// Clusters whose refcount is too low, and wrong COPIED flags.
    pub errors: u64,
    /// Human-readable descriptions (at most 100).
    pub messages: Vec<String>,
}

impl CheckReport {
    /// No leaks and no errors.
    pub fn is_clean(&self) -> bool {
        self.leaks == 0 && self.errors == 0
    }

    fn note(&mut self, msg: String) {
        if self.messages.len() < 100 {
            self.messages.push(msg);
        }
    }
}

/// A cluster whose stored refcount differs from the number of references.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Mismatch {
    /// Host cluster index.
    pub cluster: u64,
    /// Stored refcount.
    pub refcount: u64,
    /// References found in the metadata.
    pub references: u64,
}

impl Qcow2 {
    /// Count the references to every host cluster (header, refcount table
    /// and blocks, snapshot table, active and snapshot L1/L2 tables and the
    /// data they map) and compare them with the stored refcounts. Covers every
    /// cluster inside the file plus referenced ones beyond its end. Shared by
    /// [`Qcow2::check`] and [`Qcow2::repair_leaks`].
    pub(crate) fn refcount_mismatches(&mut self) -> Result<Vec<Mismatch>> {
        let cb = self.cb;
        let cs = 1u64 << cb;
        let mut refs: HashMap<u64, u64> = HashMap::new();
        let add = |refs: &mut HashMap<u64, u64>, off: u64, len: u64| {
            if len == 0 {
                return;
            }
            for c in (off >> cb)..=((off + len - 1) >> cb) {
                *refs.entry(c).or_insert(0) += 1;
            }
        };
        add(&mut refs, 0, cs);
        add(
            &mut refs,
            self.rc.table_offset,
            u64::from(self.rc.table_clusters) << cb,
        );
        for b in self.rc.block_offsets() {
            add(&mut refs, b, cs);
        }
        if self.hdr.nb_snapshots > 0 {
            add(&mut refs, self.hdr.snapshots_offset, self.snap_table_len);
        }
        let mut l1s = vec![(self.hdr.l1_table_offset, self.l1.clone())];
        for s in &self.snaps {
            let t = if s.l1_size > 0 {
                read_table(&mut *self.io, s.l1_offset, s.l1_size as usize)?
            } else {
                Vec::new()
            };
            l1s.push((s.l1_offset, t));
        }
        for (off, l1) in &l1s {
            add(&mut refs, *off, l1.len() as u64 * 8);
            for &e in l1 {
                let t = l1_l2_offset(e, cb)?;
                if t == 0 {
                    continue;
                }
                add(&mut refs, t, cs);
                let table = self.l2.take(&mut *self.io, t, cb)?;
                for &x in &table {
                    if let Some(h) = decode_l2(x, cb)?.host() {
                        add(&mut refs, h, cs);
                    }
                }
                self.l2.put(t, table);
            }
        }
        let file_clusters = self.io.len()?.div_ceil(cs);
        // Every cluster inside the file, plus those beyond its end that are
        // referenced or have a refcount (an allocation that never got its
        // data written leaks clusters past the end; `qemu-img check` does not
        // see those, but they would never be allocated again). Reading more
        // refcount blocks than the file has clusters (or claiming more than
        // 2^22 clusters) beyond the end only happens with corrupt refcounts.
        let mut beyond: Vec<u64> = refs
            .keys()
            .copied()
            .filter(|&c| c >= file_clusters)
            .collect();
        beyond.extend(self.rc.used_from(
            &mut *self.io,
            file_clusters,
            file_clusters.saturating_add(16),
            1 << 22,
        )?);
        beyond.sort_unstable();
        beyond.dedup();
        let mut out = Vec::new();
        for c in (0..file_clusters).chain(beyond) {
            let have = self.rc.get(&mut *self.io, c)?;
            let want = refs.get(&c).copied().unwrap_or(0);
            if have != want {
                out.push(Mismatch {
                    cluster: c,
                    refcount: have,
                    references: want,
                });
            }
        }
        Ok(out)
    }

    /// Recompute all refcounts from the metadata and compare them with the
    /// stored ones; also verify the COPIED flags of the active tables.
    pub fn check(&mut self) -> Result<CheckReport> {
        let cb = self.cb;
        let mut rep = CheckReport::default();
        for m in self.refcount_mismatches()? {
            let (c, have, want) = (m.cluster, m.refcount, m.references);
            if have > want {
                rep.leaks += 1;
                rep.note(format!(
                    "leaked cluster {c} refcount={have} references={want}"
                ));
            } else {
                rep.errors += 1;
                rep.note(format!(
                    "ERROR cluster {c} refcount={have} references={want}"
                ));
            }
        }
        for i in 0..self.l1.len() {
            let e = self.l1[i];
            let t = l1_l2_offset(e, cb)?;
            if t == 0 {
                continue;
            }
            let rc = self.rc.get(&mut *self.io, t >> cb)?;
            if (rc == 1) != (e & COPIED != 0) {
                rep.errors += 1;
                rep.note(format!(
                    "ERROR COPIED flag of L1 entry {i} ({e:#x}) with refcount {rc}"
                ));
            }
            let table = self.l2.take(&mut *self.io, t, cb)?;
            for (j, &x) in table.iter().enumerate() {
                if let Some(h) = decode_l2(x, cb)?.host() {
                    let rc = self.rc.get(&mut *self.io, h >> cb)?;
                    if (rc == 1) != (x & COPIED != 0) {
                        rep.errors += 1;
                        rep.note(format!(
                            "ERROR COPIED flag of L2 entry {i}/{j} ({x:#x}) with refcount {rc}"
                        ));
                    }
                }
            }
            self.l2.put(t, table);
        }
        Ok(rep)
    }

    /// Lowers every refcount that is higher than the number of references to
    /// it (leaked clusters, e.g. left by a crash or by an update that failed
    /// with ENOSPC and was then [`Qcow2::recover`]ed) — what
    /// `qemu-img check -r leaks` does. Returns how many clusters were fixed.
    ///
    /// Refcounts are only ever decreased, and only down to the number of
    /// references found by the same counting as [`Qcow2::check`]; clusters
    /// whose refcount is too low (errors) are left alone. The changes are made
    /// by one atomic header switch (new copies of the changed refcount blocks
    /// and table; active L2/L1 tables rewritten where a cluster stops being
    /// shared and its COPIED flag must be set), so a crash leaves either the
    /// leaks or the repaired image. The freed clusters can be allocated
    /// again. The file is not truncated. An image without leaks is not
    /// written at all, except to clear its dirty bit. A successful repair
    /// clears the dirty bit ([`Qcow2::freeze`] sets it).
    ///
    /// Refuses while a [`Qcow2::freeze`] is pending (its raised refcounts are
    /// intentional), on a read-only or poisoned handle.
    pub fn repair_leaks(&mut self) -> Result<u64> {
        if !self.writable {
            return Err(Error::ReadOnly);
        }
        if self.poisoned {
            return Err(Error::Poisoned);
        }
        if self.frozen.is_some() {
            return Err(Error::InvalidArgument(
                "cannot repair leaks while a frozen snapshot is pending".into(),
            ));
        }
        self.mutate(|s| {
            let mismatches = s.refcount_mismatches()?;
            let leaks: Vec<(u64, u64)> = mismatches
                .iter()
                .filter(|m| m.refcount > m.references)
                .map(|m| (m.cluster, m.refcount - m.references))
                .collect();
            if leaks.is_empty() {
                if s.is_dirty() {
                    s.set_dirty(false)?;
                    s.io.flush()?;
                }
                return Ok(0);
            }
            // Clusters nothing references at all hold garbage: release their
            // storage first, so that the repair below finds room on a full
            // file system (a crash after this still leaves only leaks).
            let cs = 1u64 << s.cb;
            let mut run: Option<(u64, u64)> = None;
            let unreferenced = mismatches
                .iter()
                .filter(|m| m.references == 0 && m.refcount > 0)
                .map(|m| m.cluster);
            for c in unreferenced.chain(std::iter::once(u64::MAX)) {
                match run {
                    Some((start, n)) if c != u64::MAX && c == start + n => {
                        run = Some((start, n + 1))
                    }
                    _ => {
                        if let Some((start, n)) = run {
                            s.io.discard(start * cs, n * cs)?;
                        }
                        run = (c != u64::MAX).then_some((c, 1));
                    }
                }
            }
            // One atomic header switch, like a snapshot deletion: the lowered
            // refcounts go to new refcount blocks, and active tables whose
            // clusters are no longer shared (refcount now 1) get their COPIED
            // flags in the same switch — lowering the refcounts in place
            // would leave a window with wrong COPIED flags (an error for
            // `qemu-img check`). A crash before the switch leaves the leaks.
            let mut txn = Txn::default();
            for &(c, excess) in &leaks {
                let d = i64::try_from(excess)
                    .map_err(|_| corrupt(format!("refcount of cluster {c} out of range")))?;
                s.rc.txn_delta(&mut *s.io, &mut txn, c, -d)?;
            }
            let (new_l1, new_l1_off) = s.fix_active_copied(&mut txn)?;
            s.commit(txn, new_l1, new_l1_off, None, true)?;
            s.set_dirty(false)?;
            s.io.flush()?;
            Ok(leaks.len() as u64)
        })
    }
}
