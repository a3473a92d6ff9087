//! Refcount table and refcount blocks: lookups, in-place updates, cluster
//! allocation and atomic "shadow" transactions.
//!
//! Two update mechanisms exist:
//!
//! * **In place** ([`Refcounts::apply_in_place`]): refcount entries are
//!   rewritten where they are. Callers order these writes against the
//!   references they protect (increment + flush before referencing,
//!   unreference + flush before decrementing), so a crash leaves at most
//!   leaked clusters.
//! * **Transactions** ([`Txn`]): every refcount block that changes is
//!   written to a *new* cluster, together with a new refcount table; nothing
//!   that the current header reaches is modified. A single header write then
//!   switches to the new refcount structure (and, for snapshot operations, to
//!   a new L1 table and snapshot table at the same time). A crash before the
//!   header write leaves the old, consistent image; after it, the new one.
//!   This is also how refcount blocks are created and the table is grown.

use std::collections::{BTreeMap, HashMap};

use crate::backend::Backend;
use crate::error::{corrupt, Error, Result};
use crate::header::{MAX_TABLE_BYTES, OFF_REFCOUNT_TABLE};

/// Mask of the offset bits in a refcount table entry.
const RT_OFFSET_MASK: u64 = !0x1ff;

/// Never look for free space beyond this cluster index.
const MAX_SCAN_CLUSTERS: u64 = 1 << 40;

/// In-memory view of the refcount structure (write-through cache).
#[derive(Debug)]
pub(crate) struct Refcounts {
    cluster_bits: u32,
    order: u32,
    /// Offset of the refcount table.
    pub table_offset: u64,
    /// Size of the refcount table in clusters.
    pub table_clusters: u32,
    /// Refcount block offsets, one per table entry (0 = no block).
    table: Vec<u64>,
    /// Cached refcount blocks (raw bytes), keyed by table index.
    blocks: HashMap<u64, Vec<u8>>,
    /// Clusters below this index are assumed to be in use.
    free_hint: u64,
}

/// A pending shadow update of the refcount structure, see the module docs.
#[derive(Debug)]
pub(crate) struct Txn {
    /// New contents of every refcount block touched, keyed by table index.
    blocks: BTreeMap<u64, Vec<u8>>,
    /// Where each new block will be written.
    new_loc: BTreeMap<u64, u64>,
    /// New refcount table (offset, clusters).
    table: Option<(u64, u32)>,
    old_table_released: bool,
    min_freed: u64,
    /// With `Some`, the structures this transaction replaces (old refcount
    /// blocks and table) are not released but collected here (cluster
    /// indices), so that the new state frees nothing the old header reaches.
    deferred: Option<Vec<u64>>,
}

impl Default for Txn {
    fn default() -> Self {
        Self {
            blocks: BTreeMap::new(),
            new_loc: BTreeMap::new(),
            table: None,
            old_table_released: false,
            min_freed: u64::MAX,
            deferred: None,
        }
    }
}

impl Txn {
    /// A transaction that frees nothing reachable from the current header:
    /// replaced refcount blocks/table are collected (see `Txn::take_deferred`)
    /// instead of released. Every cluster that is free in the new state is
    /// then free in the old one too, so the header switch needs no `fdatasync`
    /// of its own before the clusters are reused.
    pub(crate) fn deferring() -> Self {
        Self {
            deferred: Some(Vec::new()),
            ..Self::default()
        }
    }

    /// Record a cluster to be released later (only for deferring transactions).
    pub(crate) fn defer(&mut self, cluster: u64) {
        self.deferred
            .as_mut()
            .expect("deferring transaction")
            .push(cluster);
    }

    /// Clusters whose release was deferred.
    pub(crate) fn take_deferred(&mut self) -> Vec<u64> {
        self.deferred.take().unwrap_or_default()
    }
}

fn get_entry(block: &[u8], idx: usize, order: u32) -> u64 {
    if order >= 3 {
        let n = 1usize << (order - 3);
        let mut v = 0u64;
        for &b in &block[idx * n..idx * n + n] {
            v = (v << 8) | u64::from(b);
        }
        v
    } else {
        let bits = 1usize << order;
        let per = 8 / bits;
        let byte = block[idx / per];
        let shift = (idx % per) * bits;
        u64::from((byte >> shift) & ((1u8 << bits) - 1))
    }
}

/// Store `v` (already range checked) and return the byte index touched.
fn set_entry(block: &mut [u8], idx: usize, order: u32, v: u64) -> (usize, usize) {
    if order >= 3 {
        let n = 1usize << (order - 3);
        let bytes = v.to_be_bytes();
        block[idx * n..idx * n + n].copy_from_slice(&bytes[8 - n..]);
        (idx * n, idx * n + n)
    } else {
        let bits = 1usize << order;
        let per = 8 / bits;
        let shift = (idx % per) * bits;
        let mask = ((1u8 << bits) - 1) << shift;
        let b = &mut block[idx / per];
        *b = (*b & !mask) | (((v as u8) << shift) & mask);
        (idx / per, idx / per + 1)
    }
}

impl Refcounts {
    /// Load the refcount table from the image.
    pub(crate) fn load(
        io: &mut dyn Backend,
        cluster_bits: u32,
        order: u32,
        table_offset: u64,
        table_clusters: u32,
    ) -> Result<Self> {
        let bytes = u64::from(table_clusters) << cluster_bits;
        if bytes > MAX_TABLE_BYTES || table_clusters == 0 {
            return Err(corrupt(format!(
                "refcount table of {table_clusters} clusters out of range"
            )));
        }
        let mut raw = vec![0u8; bytes as usize];
        io.read_at(&mut raw, table_offset)?;
        let cmask = (1u64 << cluster_bits) - 1;
        let mut table = Vec::with_capacity(raw.len() / 8);
        for (i, c) in raw.chunks_exact(8).enumerate() {
            let e = u64::from_be_bytes(c.try_into().expect("8 bytes"));
            if e & cmask != 0 || e > (1u64 << 56) {
                return Err(corrupt(format!(
                    "refcount table entry {i} = {e:#x} is not a valid cluster offset"
                )));
            }
            table.push(e & RT_OFFSET_MASK);
        }
        Ok(Self {
            cluster_bits,
            order,
            table_offset,
            table_clusters,
            table,
            blocks: HashMap::new(),
            free_hint: 1,
        })
    }

    fn cs(&self) -> u64 {
        1u64 << self.cluster_bits
    }

    /// log2 of the number of refcount entries per block.
    fn epb_bits(&self) -> u32 {
        self.cluster_bits + 3 - self.order
    }

    /// Largest representable refcount.
    fn max_refcount(&self) -> u64 {
        if self.order == 6 {
            u64::MAX
        } else {
            (1u64 << (1u32 << self.order)) - 1
        }
    }

    fn block_offset(&self, rt_idx: u64) -> Option<u64> {
        usize::try_from(rt_idx)
            .ok()
            .and_then(|i| self.table.get(i))
            .copied()
            .filter(|&o| o != 0)
    }

    /// True if host cluster `cluster` holds a refcount block.
    pub(crate) fn is_block(&self, cluster: u64) -> bool {
        self.table
            .iter()
            .any(|&o| o != 0 && o >> self.cluster_bits == cluster)
    }

    /// Offsets of all refcount blocks.
    pub(crate) fn block_offsets(&self) -> Vec<u64> {
        self.table.iter().copied().filter(|&o| o != 0).collect()
    }

    /// Load (and cache) a refcount block; `None` if the table has no block there.
    fn block(&mut self, io: &mut dyn Backend, rt_idx: u64) -> Result<Option<&mut Vec<u8>>> {
        let Some(off) = self.block_offset(rt_idx) else {
            return Ok(None);
        };
        if !self.blocks.contains_key(&rt_idx) {
            let mut b = vec![0u8; self.cs() as usize];
            io.read_at(&mut b, off)?;
            self.blocks.insert(rt_idx, b);
        }
        Ok(self.blocks.get_mut(&rt_idx))
    }

    /// Current refcount of the host cluster with index `cluster`.
    pub(crate) fn get(&mut self, io: &mut dyn Backend, cluster: u64) -> Result<u64> {
        let eb = self.epb_bits();
        let order = self.order;
        let idx = (cluster & ((1u64 << eb) - 1)) as usize;
        Ok(match self.block(io, cluster >> eb)? {
            Some(b) => get_entry(b, idx, order),
            None => 0,
        })
    }

    /// Clusters at index `from` or above with a nonzero refcount (leaked by
    /// allocations whose data never reached the end of the file). Only
    /// existing refcount blocks are read, at most `max_blocks` of them, and
    /// at most `max_clusters` clusters are returned; beyond either limit the
    /// refcounts are treated as corrupt.
    pub(crate) fn used_from(
        &mut self,
        io: &mut dyn Backend,
        from: u64,
        max_blocks: u64,
        max_clusters: usize,
    ) -> Result<Vec<u64>> {
        let eb = self.epb_bits();
        let order = self.order;
        let too_many = || {
            corrupt(format!(
                "refcounts claim too many clusters beyond cluster {from} (the end of the file)"
            ))
        };
        let mut out = Vec::new();
        let mut read = 0u64;
        for r in (from >> eb)..self.table.len() as u64 {
            if self.block_offset(r).is_none() {
                continue;
            }
            read += 1;
            if read > max_blocks {
                return Err(too_many());
            }
            let b = self.block(io, r)?.expect("block exists");
            let first = if r == from >> eb {
                (from & ((1u64 << eb) - 1)) as usize
            } else {
                0
            };
            for i in first..1usize << eb {
                if get_entry(b, i, order) != 0 {
                    if out.len() >= max_clusters {
                        return Err(too_many());
                    }
                    out.push((r << eb) + i as u64);
                }
            }
        }
        Ok(out)
    }

    /// Refcount as it will be once `txn` is committed.
    pub(crate) fn txn_get(&mut self, io: &mut dyn Backend, txn: &Txn, cluster: u64) -> Result<u64> {
        let eb = self.epb_bits();
        match txn.blocks.get(&(cluster >> eb)) {
            Some(b) => Ok(get_entry(
                b,
                (cluster & ((1u64 << eb) - 1)) as usize,
                self.order,
            )),
            None => self.get(io, cluster),
        }
    }

    /// Find `n` consecutive clusters that are free now (and, with a
    /// transaction, also free in its new view). Returns the first index.
    fn find_free_run(&mut self, io: &mut dyn Backend, n: u64, txn: Option<&Txn>) -> Result<u64> {
        if n == 0 {
            return Err(Error::InvalidArgument("allocation of zero clusters".into()));
        }
        let eb = self.epb_bits();
        let start = self.free_hint.max(1);
        // Free space always exists past the end of the file, unless refcounts
        // (of a hostile image) claim clusters far beyond it.
        let file_clusters = io.len()?.div_ceil(self.cs());
        let limit = file_clusters
            .max(start)
            .saturating_add(n)
            .saturating_add(2u64 << eb)
            .min(MAX_SCAN_CLUSTERS);
        let mut c = start;
        let mut run_start = c;
        let mut run_len = 0u64;
        while run_len < n {
            if c > limit {
                return Err(corrupt(format!(
                    "no free clusters found below cluster {limit} (refcounts claim clusters beyond the end of the file)"
                )));
            }
            let rt_idx = c >> eb;
            let in_txn = txn.is_some_and(|t| t.blocks.contains_key(&rt_idx));
            if self.block_offset(rt_idx).is_none() && !in_txn {
                // Whole block range is free in both views.
                let block_end = (rt_idx + 1) << eb;
                let take = (block_end - c).min(n - run_len);
                run_len += take;
                c += take;
                continue;
            }
            let mut free = self.get(io, c)? == 0;
            if free {
                if let Some(t) = txn {
                    free = self.txn_get(io, t, c)? == 0;
                }
            }
            if free {
                run_len += 1;
            } else {
                run_len = 0;
                run_start = c + 1;
            }
            c += 1;
        }
        if run_start.saturating_add(n) >= 1u64 << (56 - self.cluster_bits) {
            return Err(Error::InvalidArgument(
                "image would exceed the maximum host offset".into(),
            ));
        }
        Ok(run_start)
    }

    /// Apply refcount changes in place (no flush). Returns `Ok(false)` without
    /// changing anything if a needed refcount block does not exist yet (only
    /// possible for increments; the caller then uses a transaction).
    pub(crate) fn apply_in_place(
        &mut self,
        io: &mut dyn Backend,
        deltas: &BTreeMap<u64, i64>,
    ) -> Result<bool> {
        let eb = self.epb_bits();
        let order = self.order;
        let max = self.max_refcount();
        // Validate first so that nothing is half applied in memory.
        for (&c, &d) in deltas {
            let Some(b) = self.block(io, c >> eb)? else {
                if d > 0 {
                    return Ok(false);
                }
                return Err(corrupt(format!(
                    "refcount of cluster at {:#x} would drop below zero",
                    c << self.cluster_bits
                )));
            };
            let v = get_entry(b, (c & ((1u64 << eb) - 1)) as usize, order);
            check_delta(v, d, max, c << self.cluster_bits)?;
        }
        let mut dirty: BTreeMap<u64, (usize, usize)> = BTreeMap::new();
        for (&c, &d) in deltas {
            let rt_idx = c >> eb;
            let b = self.block(io, rt_idx)?.expect("validated above");
            let i = (c & ((1u64 << eb) - 1)) as usize;
            let v = get_entry(b, i, order);
            let nv = check_delta(v, d, max, 0)?;
            let (s, e) = set_entry(b, i, order, nv);
            let span = dirty.entry(rt_idx).or_insert((s, e));
            span.0 = span.0.min(s);
            span.1 = span.1.max(e);
            if nv == 0 {
                self.free_hint = self.free_hint.min(c);
            }
        }
        for (rt_idx, (s, e)) in dirty {
            let off = self.block_offset(rt_idx).expect("block exists");
            let b = &self.blocks[&rt_idx];
            io.write_at(&b[s..e], off + s as u64)?;
        }
        Ok(true)
    }

    /// Allocate `n` contiguous clusters with refcount 1 and return the host
    /// offset of the first. The refcount update is written (in place or via a
    /// committed transaction) but not flushed; the caller flushes before
    /// referencing the clusters.
    pub(crate) fn alloc(&mut self, io: &mut dyn Backend, n: u64) -> Result<u64> {
        let start = self.find_free_run(io, n, None)?;
        let deltas: BTreeMap<u64, i64> = (start..start + n).map(|c| (c, 1)).collect();
        if !self.apply_in_place(io, &deltas)? {
            let mut txn = Txn::default();
            for c in start..start + n {
                self.txn_delta(io, &mut txn, c, 1)?;
            }
            let (off, clusters) = self.txn_finish(io, &mut txn)?;
            io.flush()?;
            let mut h = [0u8; 12];
            h[..8].copy_from_slice(&off.to_be_bytes());
            h[8..].copy_from_slice(&clusters.to_be_bytes());
            io.write_at(&h, OFF_REFCOUNT_TABLE)?;
            io.flush()?;
            self.txn_apply(txn, off, clusters);
        }
        self.free_hint = start + n;
        Ok(start << self.cluster_bits)
    }

    /// Record a refcount change in a transaction.
    pub(crate) fn txn_delta(
        &mut self,
        io: &mut dyn Backend,
        txn: &mut Txn,
        cluster: u64,
        delta: i64,
    ) -> Result<()> {
        let eb = self.epb_bits();
        let rt_idx = cluster >> eb;
        if rt_idx >= MAX_TABLE_BYTES / 8 {
            return Err(Error::InvalidArgument(format!(
                "host cluster {cluster:#x} beyond what a refcount table can describe"
            )));
        }
        if let std::collections::btree_map::Entry::Vacant(v) = txn.blocks.entry(rt_idx) {
            let cs = 1usize << self.cluster_bits;
            let content = match self.block(io, rt_idx)? {
                Some(b) => b.clone(),
                None => vec![0u8; cs],
            };
            v.insert(content);
        }
        let max = self.max_refcount();
        let b = txn.blocks.get_mut(&rt_idx).expect("inserted");
        let i = (cluster & ((1u64 << eb) - 1)) as usize;
        let v = get_entry(b, i, self.order);
        let nv = check_delta(v, delta, max, cluster << self.cluster_bits)?;
        set_entry(b, i, self.order, nv);
        if nv == 0 {
            txn.min_freed = txn.min_freed.min(cluster);
        }
        Ok(())
    }

    /// Release a cluster of the old state, or defer that (see [`Txn::deferring`]).
    fn txn_release(&mut self, io: &mut dyn Backend, txn: &mut Txn, cluster: u64) -> Result<()> {
        match &mut txn.deferred {
            Some(d) => {
                d.push(cluster);
                Ok(())
            }
            None => self.txn_delta(io, txn, cluster, -1),
        }
    }

    /// Allocate `n` clusters inside a transaction (free in both views).
    pub(crate) fn txn_alloc(&mut self, io: &mut dyn Backend, txn: &mut Txn, n: u64) -> Result<u64> {
        let start = self.find_free_run(io, n, Some(txn))?;
        for c in start..start + n {
            self.txn_delta(io, txn, c, 1)?;
        }
        if n == 1 {
            // Every cluster below is used in the current or the new view; those
            // the transaction frees are covered by `min_freed` when it is applied.
            self.free_hint = start + 1;
        }
        Ok(start << self.cluster_bits)
    }

    /// Place all changed refcount blocks and a new refcount table, and write
    /// them. Returns the new table's (offset, clusters). Nothing reachable from
    /// the current header is modified; the caller flushes and then switches the
    /// header, then calls [`Refcounts::txn_apply`].
    pub(crate) fn txn_finish(&mut self, io: &mut dyn Backend, txn: &mut Txn) -> Result<(u64, u32)> {
        let cb = self.cluster_bits;
        let entries_per_cluster = self.cs() / 8;
        loop {
            let pending: Vec<u64> = txn
                .blocks
                .keys()
                .copied()
                .filter(|r| !txn.new_loc.contains_key(r))
                .collect();
            if !pending.is_empty() {
                for r in pending {
                    let off = self.txn_alloc(io, txn, 1)?;
                    txn.new_loc.insert(r, off);
                    if let Some(old) = self.block_offset(r) {
                        self.txn_release(io, txn, old >> cb)?;
                    }
                }
                continue;
            }
            let max_r = txn.blocks.keys().next_back().copied().unwrap_or(0);
            let needed = (self.table.len() as u64).max(max_r + 1);
            if let Some((_, cl)) = txn.table {
                if u64::from(cl) * entries_per_cluster >= needed {
                    break;
                }
            }
            if let Some((off, cl)) = txn.table.take() {
                for k in 0..u64::from(cl) {
                    self.txn_delta(io, txn, (off >> cb) + k, -1)?;
                }
            }
            let mut clusters = needed.div_ceil(entries_per_cluster);
            if needed > self.table.len() as u64 {
                clusters += clusters / 2 + 1;
            }
            if clusters << cb > MAX_TABLE_BYTES {
                return Err(Error::InvalidArgument(
                    "refcount table would exceed its maximum size".into(),
                ));
            }
            if !txn.old_table_released {
                for k in 0..u64::from(self.table_clusters) {
                    self.txn_release(io, txn, (self.table_offset >> cb) + k)?;
                }
                txn.old_table_released = true;
            }
            let off = self.txn_alloc(io, txn, clusters)?;
            txn.table = Some((off, clusters as u32));
        }
        for (r, content) in &txn.blocks {
            io.write_at(content, txn.new_loc[r])?;
        }
        let (off, cl) = txn.table.expect("table allocated");
        let mut raw = vec![0u8; (u64::from(cl) << cb) as usize];
        for (i, chunk) in raw.chunks_exact_mut(8).enumerate() {
            let e = txn
                .new_loc
                .get(&(i as u64))
                .copied()
                .or_else(|| self.table.get(i).copied())
                .unwrap_or(0);
            chunk.copy_from_slice(&e.to_be_bytes());
        }
        io.write_at(&raw, off)?;
        Ok((off, cl))
    }

    /// Adopt a transaction after the header has been switched to it.
    pub(crate) fn txn_apply(&mut self, txn: Txn, table_offset: u64, table_clusters: u32) {
        let entries = ((u64::from(table_clusters) << self.cluster_bits) / 8) as usize;
        self.table.resize(entries.max(self.table.len()), 0);
        for (r, off) in &txn.new_loc {
            self.table[*r as usize] = *off;
        }
        self.table.truncate(entries);
        for (r, content) in txn.blocks {
            self.blocks.insert(r, content);
        }
        self.table_offset = table_offset;
        self.table_clusters = table_clusters;
        self.free_hint = self.free_hint.min(txn.min_freed).max(1);
    }
}

fn check_delta(v: u64, d: i64, max: u64, host_off: u64) -> Result<u64> {
    if d >= 0 {
        v.checked_add(d as u64)
            .filter(|&nv| nv <= max)
            .ok_or(Error::RefcountOverflow(host_off))
    } else {
        v.checked_sub(d.unsigned_abs()).ok_or_else(|| {
            corrupt(format!(
                "refcount of cluster at {host_off:#x} would drop below zero (is {v})"
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_widths() {
        for order in 0..=6u32 {
            let mut b = vec![0u8; 512];
            let bits = 1u32 << order;
            let max = if bits == 64 {
                u64::MAX
            } else {
                (1u64 << bits) - 1
            };
            let n = 512 * 8 / bits as usize;
            for i in 0..n {
                set_entry(&mut b, i, order, (i as u64 * 7) & max);
            }
            for i in 0..n {
                assert_eq!(
                    get_entry(&b, i, order),
                    (i as u64 * 7) & max,
                    "order {order} idx {i}"
                );
            }
        }
        // 16-bit entries are big-endian.
        let mut b = vec![0u8; 8];
        set_entry(&mut b, 1, 4, 0x1234);
        assert_eq!(&b[2..4], &[0x12, 0x34]);
        // Sub-byte entries are LSB first.
        let mut b = vec![0u8; 1];
        set_entry(&mut b, 0, 0, 1);
        assert_eq!(b[0], 1);
    }

    #[test]
    fn delta_bounds() {
        assert!(check_delta(0, -1, 65535, 0).is_err());
        assert!(matches!(
            check_delta(65535, 1, 65535, 0x10000),
            Err(Error::RefcountOverflow(0x10000))
        ));
        assert_eq!(check_delta(1, 1, 65535, 0).unwrap(), 2);
    }
}
