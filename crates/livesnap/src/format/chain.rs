//! Chains of incremental images: an incremental image holds only the 2 MiB
//! chunks the guest wrote since its parent; its RAM is its own chunks over
//! its parent's RAM, and so on down to a full image. Opening a chain checks
//! that every parent is the very image its child was taken against.

use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::{Result, SnapError};
use crate::format::image::{Header, Image, HEADER_SIZE, PAGE_SIZE};
use crate::format::source::PageSource;

/// Most images in one chain.
pub const MAX_CHAIN: usize = 64;

/// An image and the parents it needs, newest first; the last is full.
pub struct Chain {
    layers: Vec<(PathBuf, Image)>,
}

/// Where a parent recorded as `recorded` is looked for: there, else (moved
/// together with its child) next to the child.
fn parent_path(child: &Path, recorded: &str) -> PathBuf {
    let p = PathBuf::from(recorded);
    if p.exists() {
        return p;
    }
    match (child.parent(), p.file_name()) {
        (Some(dir), Some(name)) => dir.join(name),
        _ => p,
    }
}

impl Chain {
    /// Opens the image at `path` and, for an incremental one, its parents,
    /// checking each against the identity its child recorded and that all
    /// describe the same RAM.
    pub fn open(path: &Path) -> Result<Chain> {
        let mut layers = vec![(path.to_path_buf(), Image::open(path)?)];
        loop {
            let (child_path, child) = layers.last().expect("one image at least");
            let Some((want, recorded)) = child.parent() else {
                break;
            };
            if layers.len() >= MAX_CHAIN {
                return Err(SnapError::ChainTooLong(MAX_CHAIN));
            }
            let p = parent_path(child_path, recorded);
            let parent = Image::open(&p).map_err(|e| SnapError::ParentMissing {
                path: p.clone(),
                source: Box::new(e),
            })?;
            if layers.iter().any(|(_, i)| i.id() == parent.id()) {
                return Err(SnapError::ChainLoop(p));
            }
            if parent.id() != want {
                return Err(SnapError::ParentChanged {
                    path: p,
                    expected: want.to_string(),
                    found: parent.id().to_string(),
                });
            }
            if parent.ranges() != child.ranges() {
                return Err(SnapError::InvalidLayout(format!(
                    "the parent image {} describes other RAM than its child",
                    p.display()
                )));
            }
            layers.push((p, parent));
        }
        Ok(Chain { layers })
    }

    /// The newest image: its device state is the chain's.
    pub fn top(&self) -> &Image {
        &self.layers[0].1
    }

    /// The images' paths, newest first.
    pub fn paths(&self) -> impl Iterator<Item = &Path> {
        self.layers.iter().map(|(p, _)| p.as_path())
    }

    /// The images, newest first.
    pub fn images(&self) -> impl Iterator<Item = &Image> {
        self.layers.iter().map(|(_, i)| i)
    }

    /// Number of images (1 for a full image).
    pub fn len(&self) -> usize {
        self.layers.len()
    }

    /// Whether the chain is a lone full image.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The image that holds incremental chunk `k` (the newest that has it).
    fn holder(&self, k: usize) -> &Image {
        self.layers
            .iter()
            .map(|(_, i)| i)
            .find(|i| i.has_chunk(k))
            .unwrap_or(&self.layers[self.layers.len() - 1].1)
    }

    /// Copies RAM range `index` into `dst`, which reads as zeros already
    /// (fresh anonymous memory): holes are not written.
    pub fn read_ram_into_zeroed(&self, index: usize, dst: &mut [u8]) -> Result<()> {
        if self.layers.len() == 1 {
            return self.top().read_ram_into_zeroed(index, dst);
        }
        let r = self.top().ranges()[index];
        if dst.len() as u64 != r.len {
            return Err(SnapError::InvalidInput(format!(
                "destination is {} bytes, range {index} is {}",
                dst.len(),
                r.len
            )));
        }
        let mut off = r.file_offset;
        while off < r.file_offset + r.len {
            let (_, start, len) = self.top().chunk_at(off).expect("inside the range");
            let d = &mut dst[(start - r.file_offset) as usize..][..len as usize];
            if !self.is_hole(start, len) {
                self.read_at(d, start)
                    .map_err(|e| SnapError::io(format!("read RAM range {index}"), e))?;
            }
            off = start + len;
        }
        Ok(())
    }

    /// Writes the chain's RAM and the newest device state as one full image
    /// at `dest` (atomically: a temp file renamed into place). Returns the
    /// bytes of RAM written (zero pages stay holes).
    ///
    /// Refused when `dest` is an image of this chain (the same file, through
    /// any symlink or hard link): replacing it would lose the images that
    /// depend on it.
    pub fn squash(&self, dest: &Path) -> Result<u64> {
        if let Ok(d) = std::fs::metadata(dest) {
            use std::os::unix::fs::MetadataExt;
            for p in self.paths() {
                if std::fs::metadata(p).is_ok_and(|m| (m.dev(), m.ino()) == (d.dev(), d.ino())) {
                    return Err(SnapError::InvalidInput(format!(
                        "{} is {}, an image of the chain being squashed: write the squashed image elsewhere",
                        dest.display(),
                        p.display()
                    )));
                }
            }
        }
        let top = self.top();
        let ranges: Vec<(u64, u64)> = top.ranges().iter().map(|r| (r.gpa, r.len)).collect();
        let dev = top.device_state()?;
        let mut header = Header::layout(&ranges, dev.len() as u64)?;
        header.dev_crc = crc32fast::hash(&dev);
        let tmp = crate::format::temp::TempImage::create(dest)?;
        tmp.size(header.file_len)?;
        let mut buf = vec![0u8; crate::CHUNK as usize];
        let mut written = 0u64;
        for k in 0..top.chunk_count() {
            let Some((_, start, len)) = chunk_start(top, k) else {
                continue;
            };
            if self.is_hole(start, len) {
                continue;
            }
            let b = &mut buf[..len as usize];
            self.read_at(b, start)
                .map_err(|e| SnapError::io("read RAM", e))?;
            for (i, page) in b.chunks(PAGE_SIZE as usize).enumerate() {
                if page.iter().any(|&x| x != 0) {
                    let at = start + (i as u64) * PAGE_SIZE;
                    tmp.file
                        .write_all_at(page, at)
                        .map_err(|e| SnapError::io("write squashed image", e))?;
                    written += PAGE_SIZE;
                }
            }
        }
        debug_assert!(header.dev_offset >= HEADER_SIZE);
        tmp.finish(&header, &dev, || false)?;
        Ok(written)
    }
}

/// The image offset and length of incremental chunk `k`.
fn chunk_start(img: &Image, k: usize) -> Option<(usize, u64, u64)> {
    let mut base = 0usize;
    for r in img.ranges() {
        let n = r.len.div_ceil(crate::CHUNK) as usize;
        if k < base + n {
            return img.chunk_at(r.file_offset + (k - base) as u64 * crate::CHUNK);
        }
        base += n;
    }
    None
}

impl PageSource for Chain {
    /// Reads are resolved chunk by chunk to the newest image holding each.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let off = offset + done as u64;
            let (k, start, len) = self
                .top()
                .chunk_at(off)
                .ok_or_else(|| io::Error::other(format!("offset {off:#x} is not RAM")))?;
            let n = ((start + len - off) as usize).min(buf.len() - done);
            self.holder(k).read_at(&mut buf[done..done + n], off)?;
            done += n;
        }
        Ok(())
    }

    fn is_hole(&self, offset: u64, len: u64) -> bool {
        let mut off = offset;
        while off < offset + len {
            let Some((k, start, clen)) = self.top().chunk_at(off) else {
                return false;
            };
            let end = (start + clen).min(offset + len);
            if !self.holder(k).is_hole(off, end - off) {
                return false;
            }
            off = end;
        }
        true
    }
}
