//! Consistency check (a subset of what `qemu-img check` verifies).

use std::collections::HashMap;

use crate::error::Result;
use crate::image::Qcow2;
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

impl Qcow2 {
    /// Recompute all refcounts from the metadata and compare them with the
    /// stored ones; also verify the COPIED flags of the active tables.
    pub fn check(&mut self) -> Result<CheckReport> {
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
        let mut rep = CheckReport::default();
        let file_clusters = self.io.len()?.div_ceil(cs);
        // Every cluster inside the file, plus referenced ones beyond its end.
        let mut beyond: Vec<u64> = refs
            .keys()
            .copied()
            .filter(|&c| c >= file_clusters)
            .collect();
        beyond.sort_unstable();
        for c in (0..file_clusters).chain(beyond) {
            let have = self.rc.get(&mut *self.io, c)?;
            let want = refs.get(&c).copied().unwrap_or(0);
            if have > want {
                rep.leaks += 1;
                rep.note(format!(
                    "leaked cluster {c} refcount={have} references={want}"
                ));
            } else if have < want {
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
}
