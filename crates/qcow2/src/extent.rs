//! Where guest data lies in an image: [`Qcow2::extents`], for a caller that
//! reads the image file itself.

use crate::error::Result;
use crate::image::Qcow2;
use crate::table::{decode_l2, l1_l2_offset, Mapping};

/// A piece of guest data as [`Qcow2::extents`] finds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Extent {
    /// `len` bytes at `at` in the image file.
    File { at: u64, len: u64 },
    /// `len` bytes that read as zeroes.
    Zero { len: u64 },
    /// `len` bytes that only [`Qcow2::read_at`] reads (from the backing file).
    Other { len: u64 },
}

impl Extent {
    pub fn len(&self) -> u64 {
        match *self {
            Extent::File { len, .. } | Extent::Zero { len } | Extent::Other { len } => len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends `x` to `out`, merged with the last piece where it continues it.
    fn push(out: &mut Vec<Extent>, x: Extent) {
        let merged = match (out.last_mut(), x) {
            (Some(Extent::File { at, len }), Extent::File { at: a, len: n }) if *at + *len == a => {
                *len += n;
                true
            }
            (Some(Extent::Zero { len }), Extent::Zero { len: n })
            | (Some(Extent::Other { len }), Extent::Other { len: n }) => {
                *len += n;
                true
            }
            _ => false,
        };
        if !merged {
            out.push(x);
        }
    }
}

impl Qcow2 {
    /// Where the guest bytes `offset..offset + len` are, in order, for a
    /// caller that reads the image file ([`Qcow2::file`]) itself: runs of
    /// that file, zeroes, and bytes only [`Qcow2::read_at`] can read (the
    /// backing file's). Adjacent pieces of one kind are merged. Checked as
    /// `read_at` is. The runs stay valid until the next write or snapshot
    /// operation on this handle.
    pub fn extents(&mut self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.check_range(offset, usize::try_from(len).unwrap_or(usize::MAX))?;
        let cb = self.cb;
        let cs = 1u64 << cb;
        let mask = (1u64 << (cb - 3)) - 1;
        let l1_shift = 2 * cb - 3;
        let end = offset + len;
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < end {
            let l1_idx = pos >> l1_shift;
            let span_end = end.min((l1_idx + 1) << l1_shift);
            let e = usize::try_from(l1_idx)
                .ok()
                .and_then(|i| self.l1.get(i))
                .copied()
                .unwrap_or(0);
            let l2_off = l1_l2_offset(e, cb)?;
            if l2_off == 0 {
                Extent::push(&mut out, self.unallocated(span_end - pos));
                pos = span_end;
                continue;
            }
            let table = self.l2.take(&mut *self.io, l2_off, cb)?;
            let mut res = Ok(());
            while pos < span_end {
                let n = (cs - (pos & (cs - 1))).min(span_end - pos);
                let x = match decode_l2(table[((pos >> cb) & mask) as usize], cb) {
                    Ok(Mapping::Data(h)) => Extent::File {
                        at: h + (pos & (cs - 1)),
                        len: n,
                    },
                    Ok(Mapping::Zero { .. }) => Extent::Zero { len: n },
                    Ok(Mapping::Unallocated) => self.unallocated(n),
                    Err(e) => {
                        res = Err(e);
                        break;
                    }
                };
                Extent::push(&mut out, x);
                pos += n;
            }
            self.l2.put(l2_off, table);
            res?;
        }
        Ok(out)
    }

    /// What `len` unallocated bytes read as: the backing file's, or zeroes.
    fn unallocated(&self, len: u64) -> Extent {
        if self.backing.is_some() {
            Extent::Other { len }
        } else {
            Extent::Zero { len }
        }
    }
}
