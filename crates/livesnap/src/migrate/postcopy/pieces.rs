//! A chunk's payload on the target: checking a CHUNK record, putting one
//! together from PIECE records, and the pages in either (see the module
//! above and `FORMAT.md`, "Live migration").

use super::*;

/// Chunks being put together from PIECE records. At most two at a time:
/// one the target asked for, whose pieces may overtake those of the one
/// being pushed.
#[derive(Default)]
pub(super) struct Partial {
    /// Pieces may begin mid-chunk and wrap around (stream flag `rotated`);
    /// without it a chunk's first piece begins at its first page.
    rotated: bool,
    building: Vec<Building>,
}

/// A chunk coming in pieces.
struct Building {
    k: usize,
    /// The page its first piece began at, the next page expected, and how
    /// many pages are in.
    start: usize,
    next: usize,
    got: usize,
    /// The CHUNK payload so far: the bitmap, then the non-zero pages from
    /// `start` to the chunk's end.
    whole: Vec<u8>,
    /// The non-zero pages before `start` (after the pieces wrapped).
    head: Vec<u8>,
}

/// Chunks a source may have on their way in pieces at once.
const MAX_PARTIAL: usize = 2;

/// A PIECE payload checked against its chunk of `pages` pages: the first
/// page, the page count, the bitmap of the pages that follow, and those
/// pages.
struct Piece<'a> {
    first: usize,
    count: usize,
    bitmap: &'a [u8],
    data: &'a [u8],
}

impl<'a> Piece<'a> {
    fn parse(d: &'a [u8], pages: usize) -> Option<Piece<'a>> {
        if d.len() < 8 {
            return None;
        }
        let first = u32::from_le_bytes([d[0], d[1], d[2], d[3]]) as usize;
        let count = u32::from_le_bytes([d[4], d[5], d[6], d[7]]) as usize;
        let bm_len = count.div_ceil(8);
        if count == 0
            || !first.checked_add(count).is_some_and(|e| e <= pages)
            || d.len() < 8 + bm_len
        {
            return None;
        }
        let bitmap = &d[8..8 + bm_len];
        let p = Piece {
            first,
            count,
            bitmap,
            data: &d[8 + bm_len..],
        };
        let set = (0..count).filter(|&i| p.sent(i)).count();
        let beyond = (count..bm_len * 8).any(|i| p.sent(i));
        (!beyond && p.data.len() == set * PAGE_SIZE as usize).then_some(p)
    }

    /// Whether page `i` of the piece follows (else it is zero).
    fn sent(&self, i: usize) -> bool {
        self.bitmap[i / 8] & (1 << (i % 8)) != 0
    }

    /// Each page of the piece: its page number in the chunk and its bytes
    /// (`None`: zero).
    fn pages(&self) -> impl Iterator<Item = (usize, Option<&'a [u8]>)> + '_ {
        let mut at = 0;
        (0..self.count).map(move |i| {
            if !self.sent(i) {
                return (self.first + i, None);
            }
            at += PAGE_SIZE as usize;
            (
                self.first + i,
                Some(&self.data[at - PAGE_SIZE as usize..at]),
            )
        })
    }
}

impl Partial {
    pub(super) fn new(rotated: bool) -> Partial {
        Partial {
            rotated,
            building: Vec::new(),
        }
    }

    /// Adds a PIECE of chunk `k`; returns the chunk's CHUNK payload once its
    /// last piece is in. Pieces out of order, overlapping, past the chunk,
    /// of a third chunk at once, or with a payload that does not match their
    /// bitmap are refused; so is a chunk's first piece past its first page
    /// unless pieces are `rotated`.
    pub(super) fn add(
        &mut self,
        layout: &[ImageRange],
        k: usize,
        d: &[u8],
    ) -> std::result::Result<Option<(usize, Vec<u8>)>, String> {
        let bad = || format!("a piece of chunk {k} is malformed or out of order");
        let len = chunk_len(layout, k).ok_or_else(|| format!("chunk {k} is not in guest RAM"))?;
        let pages = (len / PAGE_SIZE) as usize;
        let p = Piece::parse(d, pages).ok_or_else(bad)?;
        let at = match self.building.iter().position(|b| b.k == k) {
            Some(at) => at,
            None if self.building.len() < MAX_PARTIAL && (p.first == 0 || self.rotated) => {
                self.building.push(Building {
                    k,
                    start: p.first,
                    next: p.first,
                    got: 0,
                    whole: vec![0u8; BITMAP],
                    head: Vec::new(),
                });
                self.building.len() - 1
            }
            None => return Err(bad()),
        };
        let b = &mut self.building[at];
        // In order from `start` to the chunk's end, then from its first
        // page back to `start`.
        let wrapped = p.first < b.start;
        if p.first != b.next || (wrapped && p.first + p.count > b.start) {
            return Err(bad());
        }
        for i in (0..p.count).filter(|&i| p.sent(i)) {
            b.whole[(p.first + i) / 8] |= 1 << ((p.first + i) % 8);
        }
        if wrapped {
            b.head.extend_from_slice(p.data);
        } else {
            b.whole.extend_from_slice(p.data);
        }
        b.got += p.count;
        b.next = if p.first + p.count == pages {
            0
        } else {
            p.first + p.count
        };
        if b.got < pages {
            return Ok(None);
        }
        let b = self.building.remove(at);
        if b.head.is_empty() {
            return Ok(Some((b.k, b.whole)));
        }
        let mut whole = Vec::with_capacity(b.whole.len() + b.head.len());
        whole.extend_from_slice(&b.whole[..BITMAP]);
        whole.extend_from_slice(&b.head);
        whole.extend_from_slice(&b.whole[BITMAP..]);
        Ok(Some((b.k, whole)))
    }
}

/// The pages of a PIECE of chunk `k` (checked by [`Partial::add`]), by image
/// offset: they serve faults while the chunk is still coming.
pub(super) fn pieces_pages(layout: &[ImageRange], k: usize, d: &[u8]) -> Vec<(u64, Vec<u8>)> {
    let (Some(start), Some(len)) = (chunk_offset(layout, k), chunk_len(layout, k)) else {
        return Vec::new();
    };
    let Some(p) = Piece::parse(d, (len / PAGE_SIZE) as usize) else {
        return Vec::new();
    };
    p.pages()
        .map(|(i, page)| {
            let bytes = page.map_or_else(|| vec![0; PAGE_SIZE as usize], <[u8]>::to_vec);
            (start + i as u64 * PAGE_SIZE, bytes)
        })
        .collect()
}

/// Page `i` of a CHUNK payload (bitmap, then the non-zero pages).
pub(super) fn page_of_chunk(d: &[u8], i: usize) -> Vec<u8> {
    if d[i / 8] & (1 << (i % 8)) == 0 {
        return vec![0; PAGE_SIZE as usize];
    }
    let before: usize = (0..i).filter(|&j| d[j / 8] & (1 << (j % 8)) != 0).count();
    let p = BITMAP + before * PAGE_SIZE as usize;
    d[p..p + PAGE_SIZE as usize].to_vec()
}

/// Checks a CHUNK payload: its bitmap names pages of chunk `k`, and the
/// payload holds exactly those pages.
pub(super) fn check_chunk(
    layout: &[ImageRange],
    k: usize,
    data: &[u8],
) -> std::result::Result<(), String> {
    let len = chunk_len(layout, k).ok_or_else(|| format!("chunk {k} is not in guest RAM"))?;
    if data.len() < BITMAP {
        return Err(format!("chunk {k} is malformed"));
    }
    let pages = (len / PAGE_SIZE) as usize;
    let bits: usize = data[..BITMAP].iter().map(|b| b.count_ones() as usize).sum();
    let beyond = (pages..CHUNK_PAGES).any(|i| data[i / 8] & (1 << (i % 8)) != 0);
    if beyond || data.len() != BITMAP + bits * PAGE_SIZE as usize {
        return Err(format!("chunk {k} is malformed"));
    }
    Ok(())
}

/// Image offset of chunk `k`.
pub(super) fn chunk_offset(layout: &[ImageRange], k: usize) -> Option<u64> {
    let mut base = 0usize;
    for r in layout {
        let n = r.len.div_ceil(CHUNK) as usize;
        if k < base + n {
            return Some(r.file_offset + (k - base) as u64 * CHUNK);
        }
        base += n;
    }
    None
}

pub(super) fn chunk_len(layout: &[ImageRange], k: usize) -> Option<u64> {
    let mut base = 0usize;
    for r in layout {
        let n = r.len.div_ceil(CHUNK) as usize;
        if k < base + n {
            let start = (k - base) as u64 * CHUNK;
            return Some((r.len - start).min(CHUNK));
        }
        base += n;
    }
    None
}
