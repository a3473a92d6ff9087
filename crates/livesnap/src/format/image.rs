//! The on-disk snapshot image format (version 1) and its validating reader.
//!
//! See `FORMAT.md` next to `Cargo.toml` for the byte-by-byte description.
//! Summary: a 4 KiB header at offset 0, then the RAM of each range at a
//! page-aligned (2 MiB-aligned for ranges of 2 MiB or more) file offset,
//! zero pages left as holes, then the device-state blob.

use crate::CHUNK;
use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

use crate::error::{Result, SnapError};
use crate::format::source::{ImageBacking, Source};

/// Magic bytes at offset 0 of every image.
pub const MAGIC: [u8; 8] = *b"SNAPVMM\x00";
/// The format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Page size of the format (zero-page granularity and alignment unit).
pub use crate::kernel::PAGE_SIZE;
/// Size of the header at offset 0.
pub const HEADER_SIZE: u64 = 4096;
/// Alignment of the file offset of ranges of at least this size (huge pages).
pub const HUGE_ALIGN: u64 = 2 << 20;
/// Maximum number of RAM ranges in one image.
pub const MAX_RANGES: usize = 128;
/// Maximum size of the device-state section (checked before allocating).
pub const MAX_DEVICE_STATE: u64 = 64 << 20;

const OFF_VERSION: usize = 8;
const OFF_PAGE_SIZE: usize = 12;
const OFF_HEADER_SIZE: usize = 16;
const OFF_RANGE_COUNT: usize = 20;
const OFF_FILE_LEN: usize = 24;
const OFF_DEV_OFFSET: usize = 32;
const OFF_DEV_LEN: usize = 40;
const OFF_DEV_CRC: usize = 48;
const OFF_FLAGS: usize = 52;
const OFF_RAM_BYTES: usize = 56;
const OFF_RANGES: usize = 64;
const RANGE_ENTRY: usize = 24;
// After the largest range table (64 + 128 * 24 = 3136).
const OFF_ID: usize = 3200;
const OFF_PARENT_ID: usize = 3216;
const OFF_PARENT_DEV_CRC: usize = 3232;
const OFF_INCR_CRC: usize = 3236;
const OFF_INCR_OFFSET: usize = 3240;
const OFF_INCR_LEN: usize = 3248;

/// Flag: an incremental image (only the chunks written since its parent).
const FLAG_INCREMENTAL: u32 = 1;
/// Longest parent path an incremental image records.
const MAX_PARENT_PATH: usize = 4096;
const OFF_HEADER_CRC: usize = HEADER_SIZE as usize - 4;

/// One RAM range as stored in an image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageRange {
    /// Guest-physical address of the first byte.
    pub gpa: u64,
    /// Length in bytes (multiple of [`PAGE_SIZE`]).
    pub len: u64,
    /// Offset in the image file of the first byte (multiple of [`PAGE_SIZE`]).
    pub file_offset: u64,
}

/// Decoded header (everything except the checksum).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Header {
    pub ranges: Vec<ImageRange>,
    pub file_len: u64,
    pub dev_offset: u64,
    pub dev_len: u64,
    pub dev_crc: u32,
    /// Random identity given when the image is laid out (zero in images
    /// written before identities existed).
    pub id: [u8; 16],
    /// For an incremental image: its parent and where its own section lies.
    pub incr: Option<IncrHeader>,
}

/// What the header of an incremental image says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct IncrHeader {
    /// The parent's identity: its id and device-state checksum.
    pub parent_id: [u8; 16],
    pub parent_dev_crc: u32,
    /// The section with the chunk map and the parent's path (between RAM
    /// and the device state).
    pub offset: u64,
    pub len: u64,
    pub crc: u32,
}

/// The identity of an image: what an incremental image records of its parent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageId {
    pub id: [u8; 16],
    pub dev_crc: u32,
}

impl fmt::Display for ImageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.id {
            write!(f, "{b:02x}")?;
        }
        write!(f, "/{:08x}", self.dev_crc)
    }
}

/// The incremental section: which chunks the image holds and where its
/// parent was when it was written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct IncrSection {
    pub map: Vec<u8>,
    pub parent_path: String,
}

impl IncrSection {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(8 + self.map.len() + self.parent_path.len());
        b.extend_from_slice(&(self.map.len() as u32).to_le_bytes());
        b.extend_from_slice(&(self.parent_path.len() as u32).to_le_bytes());
        b.extend_from_slice(&self.map);
        b.extend_from_slice(self.parent_path.as_bytes());
        b
    }

    fn decode(b: &[u8], chunks: usize) -> Result<IncrSection> {
        let bad = |why: &str| SnapError::InvalidLayout(format!("incremental section: {why}"));
        if b.len() < 8 {
            return Err(bad("too short"));
        }
        let map_len = get32(b, 0) as usize;
        let path_len = get32(b, 4) as usize;
        if map_len != chunks.div_ceil(8) || path_len > MAX_PARENT_PATH {
            return Err(bad("sizes do not match the RAM ranges"));
        }
        if b.len() != 8 + map_len + path_len {
            return Err(bad("length does not match its contents"));
        }
        let parent_path = std::str::from_utf8(&b[8 + map_len..])
            .map_err(|_| bad("parent path is not UTF-8"))?
            .to_string();
        Ok(IncrSection {
            map: b[8..8 + map_len].to_vec(),
            parent_path,
        })
    }
}

/// Number of incremental chunks of `ranges` (see [`CHUNK`]).
pub(crate) fn chunk_count(ranges: &[ImageRange]) -> usize {
    ranges.iter().map(|r| r.len.div_ceil(CHUNK) as usize).sum()
}

/// The incremental chunk holding image offset `off` (in a RAM range), with
/// the chunk's offset and length.
pub(crate) fn chunk_at(ranges: &[ImageRange], off: u64) -> Option<(usize, u64, u64)> {
    let mut base = 0usize;
    for r in ranges {
        if off >= r.file_offset && off < r.file_offset + r.len {
            let k = (off - r.file_offset) / CHUNK;
            let start = r.file_offset + k * CHUNK;
            let len = (r.file_offset + r.len - start).min(CHUNK);
            return Some((base + k as usize, start, len));
        }
        base += r.len.div_ceil(CHUNK) as usize;
    }
    None
}

/// The image ranges of `(gpa, len)` ranges (as any image of them lays them out).
pub(crate) fn ranges_of(ranges: &[(u64, u64)]) -> Result<Vec<ImageRange>> {
    Ok(Header::layout(ranges, 0)?.ranges)
}

/// A new image's (or stream's) identity: 16 random bytes.
pub(crate) fn random_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    // SAFETY: getrandom writes at most id.len() bytes into `id`.
    let n = unsafe { libc::getrandom(id.as_mut_ptr().cast(), id.len(), 0) };
    if n != id.len() as isize {
        // No entropy source: time and pid still tell images apart.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        id[..16].copy_from_slice(&(t ^ (u128::from(std::process::id()) << 96)).to_le_bytes());
    }
    id
}

fn align_up(v: u64, a: u64) -> Option<u64> {
    v.checked_add(a - 1).map(|x| x & !(a - 1))
}

impl Header {
    /// Computes the layout for the given `(gpa, len)` ranges and device-state length,
    /// validating it as the reader would. The device-state checksum is left 0.
    pub(crate) fn layout(ranges: &[(u64, u64)], dev_len: u64) -> Result<Header> {
        Header::layout_with(ranges, dev_len, None)
    }

    /// Like [`Header::layout`] for an incremental image whose section is
    /// `incr_len` bytes, child of `parent` (section checksum left 0).
    pub(crate) fn layout_with(
        ranges: &[(u64, u64)],
        dev_len: u64,
        incr: Option<(ImageId, u64)>,
    ) -> Result<Header> {
        if dev_len > MAX_DEVICE_STATE {
            return Err(SnapError::DeviceStateTooLarge {
                len: dev_len,
                max: MAX_DEVICE_STATE,
            });
        }
        let overflow = || SnapError::InvalidInput("RAM ranges too large".into());
        let mut pos = HEADER_SIZE;
        let mut out = Vec::with_capacity(ranges.len());
        for &(gpa, len) in ranges {
            let align = if len >= HUGE_ALIGN {
                HUGE_ALIGN
            } else {
                PAGE_SIZE
            };
            let file_offset = align_up(pos, align).ok_or_else(overflow)?;
            pos = file_offset.checked_add(len).ok_or_else(overflow)?;
            out.push(ImageRange {
                gpa,
                len,
                file_offset,
            });
        }
        let incr = match incr {
            Some((parent, len)) => {
                let offset = align_up(pos, PAGE_SIZE).ok_or_else(overflow)?;
                pos = offset.checked_add(len).ok_or_else(overflow)?;
                Some(IncrHeader {
                    parent_id: parent.id,
                    parent_dev_crc: parent.dev_crc,
                    offset,
                    len,
                    crc: 0,
                })
            }
            None => None,
        };
        let dev_offset = align_up(pos, PAGE_SIZE).ok_or_else(overflow)?;
        let file_len = dev_offset.checked_add(dev_len).ok_or_else(overflow)?;
        let h = Header {
            ranges: out,
            file_len,
            dev_offset,
            dev_len,
            dev_crc: 0,
            id: random_id(),
            incr,
        };
        h.validate()
            .map_err(|e| SnapError::InvalidInput(e.to_string()))?;
        Ok(h)
    }

    /// Total RAM bytes described.
    pub(crate) fn ram_bytes(&self) -> u64 {
        self.ranges.iter().map(|r| r.len).sum()
    }

    /// Encodes the header into its 4 KiB on-disk form, checksum included.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_SIZE as usize];
        b[..8].copy_from_slice(&MAGIC);
        put32(&mut b, OFF_VERSION, FORMAT_VERSION);
        put32(&mut b, OFF_PAGE_SIZE, PAGE_SIZE as u32);
        put32(&mut b, OFF_HEADER_SIZE, HEADER_SIZE as u32);
        put32(&mut b, OFF_RANGE_COUNT, self.ranges.len() as u32);
        put64(&mut b, OFF_FILE_LEN, self.file_len);
        put64(&mut b, OFF_DEV_OFFSET, self.dev_offset);
        put64(&mut b, OFF_DEV_LEN, self.dev_len);
        put32(&mut b, OFF_DEV_CRC, self.dev_crc);
        put32(
            &mut b,
            OFF_FLAGS,
            if self.incr.is_some() {
                FLAG_INCREMENTAL
            } else {
                0
            },
        );
        b[OFF_ID..OFF_ID + 16].copy_from_slice(&self.id);
        if let Some(i) = &self.incr {
            b[OFF_PARENT_ID..OFF_PARENT_ID + 16].copy_from_slice(&i.parent_id);
            put32(&mut b, OFF_PARENT_DEV_CRC, i.parent_dev_crc);
            put32(&mut b, OFF_INCR_CRC, i.crc);
            put64(&mut b, OFF_INCR_OFFSET, i.offset);
            put64(&mut b, OFF_INCR_LEN, i.len);
        }
        put64(&mut b, OFF_RAM_BYTES, self.ram_bytes());
        for (i, r) in self.ranges.iter().enumerate() {
            let o = OFF_RANGES + i * RANGE_ENTRY;
            put64(&mut b, o, r.gpa);
            put64(&mut b, o + 8, r.len);
            put64(&mut b, o + 16, r.file_offset);
        }
        let crc = crc32fast::hash(&b[..OFF_HEADER_CRC]);
        put32(&mut b, OFF_HEADER_CRC, crc);
        b
    }

    /// Decodes and validates a 4 KiB header (not the file size).
    pub(crate) fn decode(b: &[u8]) -> Result<Header> {
        if b.len() < HEADER_SIZE as usize {
            return Err(SnapError::Truncated {
                expected: HEADER_SIZE,
                actual: b.len() as u64,
            });
        }
        if b[..8] != MAGIC {
            return Err(SnapError::BadMagic);
        }
        let version = get32(b, OFF_VERSION);
        if version != FORMAT_VERSION {
            return Err(SnapError::UnsupportedVersion {
                found: version,
                supported: FORMAT_VERSION,
            });
        }
        let stored = get32(b, OFF_HEADER_CRC);
        let computed = crc32fast::hash(&b[..OFF_HEADER_CRC]);
        if stored != computed {
            return Err(SnapError::HeaderChecksum { stored, computed });
        }
        let page_size = get32(b, OFF_PAGE_SIZE);
        if u64::from(page_size) != PAGE_SIZE {
            return Err(SnapError::UnsupportedPageSize(page_size));
        }
        let header_size = get32(b, OFF_HEADER_SIZE);
        if u64::from(header_size) != HEADER_SIZE {
            return Err(SnapError::InvalidLayout(format!(
                "header size {header_size}, expected {HEADER_SIZE}"
            )));
        }
        let flags = get32(b, OFF_FLAGS);
        if flags & !FLAG_INCREMENTAL != 0 {
            return Err(SnapError::InvalidLayout(format!(
                "unknown flags {flags:#x}"
            )));
        }
        let dev_len = get64(b, OFF_DEV_LEN);
        if dev_len > MAX_DEVICE_STATE {
            return Err(SnapError::DeviceStateTooLarge {
                len: dev_len,
                max: MAX_DEVICE_STATE,
            });
        }
        let count = get32(b, OFF_RANGE_COUNT) as usize;
        if count > MAX_RANGES {
            return Err(SnapError::InvalidLayout(format!(
                "{count} RAM ranges, at most {MAX_RANGES} allowed"
            )));
        }
        let ranges = (0..count)
            .map(|i| {
                let o = OFF_RANGES + i * RANGE_ENTRY;
                ImageRange {
                    gpa: get64(b, o),
                    len: get64(b, o + 8),
                    file_offset: get64(b, o + 16),
                }
            })
            .collect();
        let mut id = [0u8; 16];
        id.copy_from_slice(&b[OFF_ID..OFF_ID + 16]);
        let incr = (flags & FLAG_INCREMENTAL != 0).then(|| {
            let mut parent_id = [0u8; 16];
            parent_id.copy_from_slice(&b[OFF_PARENT_ID..OFF_PARENT_ID + 16]);
            IncrHeader {
                parent_id,
                parent_dev_crc: get32(b, OFF_PARENT_DEV_CRC),
                offset: get64(b, OFF_INCR_OFFSET),
                len: get64(b, OFF_INCR_LEN),
                crc: get32(b, OFF_INCR_CRC),
            }
        });
        let h = Header {
            ranges,
            file_len: get64(b, OFF_FILE_LEN),
            dev_offset: get64(b, OFF_DEV_OFFSET),
            dev_len,
            dev_crc: get32(b, OFF_DEV_CRC),
            id,
            incr,
        };
        h.validate()?;
        let ram_bytes = get64(b, OFF_RAM_BYTES);
        if ram_bytes != h.ram_bytes() {
            return Err(SnapError::InvalidLayout(format!(
                "RAM byte count {ram_bytes} does not match the ranges ({})",
                h.ram_bytes()
            )));
        }
        Ok(h)
    }

    /// Checks range sanity and section placement.
    fn validate(&self) -> Result<()> {
        let bad = |i: usize, why: &str| SnapError::InvalidLayout(format!("RAM range {i}: {why}"));
        if self.ranges.is_empty() {
            return Err(SnapError::InvalidLayout("no RAM ranges".into()));
        }
        if self.ranges.len() > MAX_RANGES {
            return Err(SnapError::InvalidLayout(format!(
                "{} RAM ranges, at most {MAX_RANGES} allowed",
                self.ranges.len()
            )));
        }
        let mut file_pos = HEADER_SIZE;
        for (i, r) in self.ranges.iter().enumerate() {
            if r.len == 0 {
                return Err(bad(i, "empty"));
            }
            if r.gpa % PAGE_SIZE != 0 || r.len % PAGE_SIZE != 0 || r.file_offset % PAGE_SIZE != 0 {
                return Err(bad(i, "not page-aligned"));
            }
            if r.len >= HUGE_ALIGN && r.file_offset % HUGE_ALIGN != 0 {
                // docs/FORMAT.md: what a restore maps with huge pages must sit on 2 MiB.
                return Err(bad(
                    i,
                    "2 MiB or longer but its file offset is not 2 MiB-aligned",
                ));
            }
            if r.gpa.checked_add(r.len).is_none() {
                return Err(bad(i, "guest address overflow"));
            }
            if r.file_offset < file_pos {
                return Err(bad(
                    i,
                    "file offset overlaps the header or a previous range",
                ));
            }
            file_pos = r
                .file_offset
                .checked_add(r.len)
                .ok_or_else(|| bad(i, "file offset overflow"))?;
        }
        let mut by_gpa: Vec<&ImageRange> = self.ranges.iter().collect();
        by_gpa.sort_by_key(|r| r.gpa);
        for w in by_gpa.windows(2) {
            if w[0].gpa + w[0].len > w[1].gpa {
                return Err(SnapError::InvalidLayout(format!(
                    "RAM ranges at gpa {:#x} and {:#x} overlap",
                    w[0].gpa, w[1].gpa
                )));
            }
        }
        if let Some(i) = &self.incr {
            let max = 8 + chunk_count(&self.ranges).div_ceil(8) as u64 + MAX_PARENT_PATH as u64;
            let end = i.offset.checked_add(i.len);
            if i.offset % PAGE_SIZE != 0
                || i.offset < file_pos
                || i.len < 8
                || i.len > max
                || !end.is_some_and(|e| e <= self.dev_offset)
            {
                return Err(SnapError::InvalidLayout(format!(
                    "incremental section at {:#x} ({} bytes) is misplaced",
                    i.offset, i.len
                )));
            }
            file_pos = i.offset + i.len;
        }
        if self.dev_offset % PAGE_SIZE != 0 || self.dev_offset < file_pos {
            return Err(SnapError::InvalidLayout(format!(
                "device state offset {:#x} is unaligned or overlaps RAM (RAM ends at {file_pos:#x})",
                self.dev_offset
            )));
        }
        if self.dev_offset.checked_add(self.dev_len) != Some(self.file_len) {
            return Err(SnapError::InvalidLayout(format!(
                "file length {} does not end at the device state ({} + {})",
                self.file_len, self.dev_offset, self.dev_len
            )));
        }
        Ok(())
    }
}

fn put32(b: &mut [u8], o: usize, v: u32) {
    b[o..o + 4].copy_from_slice(&v.to_le_bytes());
}
fn put64(b: &mut [u8], o: usize, v: u64) {
    b[o..o + 8].copy_from_slice(&v.to_le_bytes());
}
fn get32(b: &[u8], o: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[o..o + 4]);
    u32::from_le_bytes(a)
}
fn get64(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(a)
}

/// A validated snapshot image opened for restore.
///
/// Opening checks magic, version, page size, header checksum, range sanity,
/// section placement against the real length of the store, the
/// device-state size cap and the device-state checksum. RAM is not
/// checksummed (see FORMAT.md).
///
/// `B` is where the bytes come from: a [`File`] ([`Image::open`],
/// [`Image::from_file`]; the default, which alone offers [`Image::file`] for
/// mapping RAM straight from the image) or a `Box<dyn Source>`
/// ([`Image::from_source`], see [`SourceImage`]).
pub struct Image<B = File> {
    backing: B,
    header: Header,
    incr: Option<IncrSection>,
}

/// An image read through a [`Source`] (see [`Image::from_source`]).
pub type SourceImage = Image<Box<dyn Source>>;

impl<B> fmt::Debug for Image<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Image")
            .field("header", &self.header)
            .finish_non_exhaustive()
    }
}

impl Image<File> {
    /// Opens and validates the image at `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Image> {
        let path = path.as_ref();
        let file =
            open_regular(path).map_err(|e| SnapError::io(format!("open {}", path.display()), e))?;
        Self::from_file(file)
    }

    /// Validates an already opened image file.
    pub fn from_file(file: File) -> Result<Image> {
        Self::validate(file)
    }

    /// The open image file: map range `i` with
    /// `mmap(.., MAP_PRIVATE, fd, ranges()[i].file_offset)`.
    pub fn file(&self) -> &File {
        &self.backing
    }

    /// Gives back the file (e.g. to keep it open while the RAM stays mapped).
    pub fn into_file(self) -> File {
        self.backing
    }
}

impl Image<Box<dyn Source>> {
    /// Validates an image stored in `source`, with exactly the checks of
    /// [`Image::open`] (the source's [`Source::len`] plays the part of the
    /// file length). Nothing is allocated from header values before they
    /// have been checked against the format's caps.
    pub fn from_source(source: Box<dyn Source>) -> Result<SourceImage> {
        Self::validate(source)
    }

    /// Gives back the source.
    pub fn into_source(self) -> Box<dyn Source> {
        self.backing
    }
}

impl<B: ImageBacking> Image<B> {
    fn validate(backing: B) -> Result<Image<B>> {
        let actual = backing.byte_len()?;
        let mut buf = vec![0u8; HEADER_SIZE as usize];
        let n = backing
            .fetch_prefix(&mut buf, 0)
            .map_err(|e| SnapError::io("read snapshot header", e))?;
        if n >= MAGIC.len() && buf[..MAGIC.len()] != MAGIC {
            return Err(SnapError::BadMagic);
        }
        if n < buf.len() {
            return Err(SnapError::Truncated {
                expected: HEADER_SIZE,
                actual,
            });
        }
        let header = Header::decode(&buf)?;
        if actual < header.file_len {
            return Err(SnapError::Truncated {
                expected: header.file_len,
                actual,
            });
        }
        if actual > header.file_len {
            return Err(SnapError::TrailingData {
                expected: header.file_len,
                actual,
            });
        }
        let incr = match &header.incr {
            Some(i) => {
                let mut b = vec![0u8; i.len as usize];
                backing
                    .fetch_exact(&mut b, i.offset)
                    .map_err(|e| SnapError::io("read incremental section", e))?;
                let computed = crc32fast::hash(&b);
                if computed != i.crc {
                    return Err(SnapError::InvalidLayout(format!(
                        "incremental section checksum {computed:#x}, header says {:#x}",
                        i.crc
                    )));
                }
                Some(IncrSection::decode(&b, chunk_count(&header.ranges))?)
            }
            None => None,
        };
        let img = Image {
            backing,
            header,
            incr,
        };
        img.check_device_state_crc()?;
        Ok(img)
    }

    /// Format version of the image.
    pub fn version(&self) -> u32 {
        FORMAT_VERSION
    }

    /// The image's identity (what a child records of its parent).
    pub fn id(&self) -> ImageId {
        ImageId {
            id: self.header.id,
            dev_crc: self.header.dev_crc,
        }
    }

    /// For an incremental image: its parent's identity and the path the
    /// parent had when this image was written.
    pub fn parent(&self) -> Option<(ImageId, &str)> {
        let h = self.header.incr.as_ref()?;
        let s = self.incr.as_ref()?;
        Some((
            ImageId {
                id: h.parent_id,
                dev_crc: h.parent_dev_crc,
            },
            &s.parent_path,
        ))
    }

    /// Whether the image holds incremental chunk `k` (a full image holds all).
    pub fn has_chunk(&self, k: usize) -> bool {
        match &self.incr {
            Some(s) => s.map.get(k / 8).is_some_and(|b| b & (1 << (k % 8)) != 0),
            None => k < chunk_count(&self.header.ranges),
        }
    }

    /// Number of incremental chunks of this image's RAM ([`CHUNK`]).
    pub fn chunk_count(&self) -> usize {
        chunk_count(&self.header.ranges)
    }

    /// The chunk holding image offset `off` of RAM: (index, offset, length).
    pub fn chunk_at(&self, off: u64) -> Option<(usize, u64, u64)> {
        chunk_at(&self.header.ranges, off)
    }

    /// Reads `buf.len()` bytes at `offset` (holes read as zeros).
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.backing.fetch_exact(buf, offset)
    }

    /// Whether `len` bytes at `offset` are a hole (known zero without reading).
    pub fn is_hole(&self, offset: u64, len: u64) -> bool {
        match self.backing.data_extent(offset, offset + len) {
            None => true,
            Some((data, _)) => data >= offset + len,
        }
    }

    /// Page size of the image (zero pages are holes of this granularity).
    pub fn page_size(&self) -> u64 {
        PAGE_SIZE
    }

    /// RAM ranges in file order.
    pub fn ranges(&self) -> &[ImageRange] {
        &self.header.ranges
    }

    /// Sum of the lengths of all RAM ranges.
    pub fn ram_bytes(&self) -> u64 {
        self.header.ram_bytes()
    }

    /// Total image length.
    pub fn file_len(&self) -> u64 {
        self.header.file_len
    }

    /// Length of the device-state section.
    pub fn device_state_len(&self) -> u64 {
        self.header.dev_len
    }

    /// Reads and checksum-verifies the device-state section.
    pub fn device_state(&self) -> Result<Vec<u8>> {
        // dev_len <= MAX_DEVICE_STATE: checked by Header::decode.
        let mut v = vec![0u8; self.header.dev_len as usize];
        self.backing
            .fetch_exact(&mut v, self.header.dev_offset)
            .map_err(|e| SnapError::io("read device state", e))?;
        let computed = crc32fast::hash(&v);
        if computed != self.header.dev_crc {
            return Err(SnapError::DeviceStateChecksum {
                stored: self.header.dev_crc,
                computed,
            });
        }
        Ok(v)
    }

    fn check_device_state_crc(&self) -> Result<()> {
        let mut h = crc32fast::Hasher::new();
        let mut buf = vec![0u8; 64 << 10];
        let (mut off, end) = (self.header.dev_offset, self.header.file_len);
        while off < end {
            let n = (end - off).min(buf.len() as u64) as usize;
            self.backing
                .fetch_exact(&mut buf[..n], off)
                .map_err(|e| SnapError::io("read device state", e))?;
            h.update(&buf[..n]);
            off += n as u64;
        }
        let computed = h.finalize();
        if computed != self.header.dev_crc {
            return Err(SnapError::DeviceStateChecksum {
                stored: self.header.dev_crc,
                computed,
            });
        }
        Ok(())
    }

    /// Copies RAM range `index` into `dst` (eager "copy" restore).
    /// `dst.len()` must equal the range length. Holes of a file are filled
    /// with zeros without reading them.
    pub fn read_ram_into(&self, index: usize, dst: &mut [u8]) -> Result<()> {
        self.read_ram(index, dst, true)
    }

    /// Like [`Image::read_ram_into`] for a destination that already reads as
    /// zeros (fresh anonymous memory): holes (zero pages) are not written, so
    /// they cost no memory.
    pub fn read_ram_into_zeroed(&self, index: usize, dst: &mut [u8]) -> Result<()> {
        self.read_ram(index, dst, false)
    }

    fn read_ram(&self, index: usize, dst: &mut [u8], fill_holes: bool) -> Result<()> {
        let r = *self.header.ranges.get(index).ok_or_else(|| {
            SnapError::InvalidInput(format!(
                "range index {index} out of {}",
                self.header.ranges.len()
            ))
        })?;
        if dst.len() as u64 != r.len {
            return Err(SnapError::InvalidInput(format!(
                "destination is {} bytes, range {index} is {}",
                dst.len(),
                r.len
            )));
        }
        let (start, end) = (r.file_offset, r.file_offset + r.len);
        let mut pos = start;
        while pos < end {
            let Some((data, hole)) = self.backing.data_extent(pos, end) else {
                if fill_holes {
                    dst[(pos - start) as usize..].fill(0);
                }
                break;
            };
            if fill_holes {
                dst[(pos - start) as usize..(data - start) as usize].fill(0);
            }
            self.backing
                .fetch_exact(
                    &mut dst[(data - start) as usize..(hole - start) as usize],
                    data,
                )
                .map_err(|e| SnapError::io(format!("read RAM range {index}"), e))?;
            pos = hole;
        }
        Ok(())
    }
}

/// What kind of file `m` describes, in words (for errors about files that
/// are not regular).
pub(crate) fn file_kind(m: &std::fs::Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let t = m.file_type();
    if t.is_dir() {
        "a directory"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    }
}

/// Opens `path` for reading if it is a regular file; anything else (a FIFO,
/// a device, a socket, a directory) is refused at once — a FIFO without a
/// writer would otherwise block the open, and its reader, for ever.
pub fn open_regular(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)?;
    let m = f.metadata()?;
    if !m.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "not a regular file ({}): images are read from regular files only",
                file_kind(&m)
            ),
        ));
    }
    // Back to blocking reads (a regular file ignores the flag anyway).
    // SAFETY: fcntl on a descriptor this function owns; no memory is involved.
    unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETFL, 0) };
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_alignment_and_roundtrip() {
        let h = Header::layout(
            &[(0, 8 << 20), (1 << 32, 16 << 10), (0x1000_0000, 4 << 20)],
            100,
        )
        .unwrap();
        assert_eq!(h.ranges[0].file_offset, HUGE_ALIGN);
        assert_eq!(h.ranges[1].file_offset, HUGE_ALIGN + (8 << 20));
        assert_eq!(h.ranges[2].file_offset % HUGE_ALIGN, 0);
        assert_eq!(h.dev_offset % PAGE_SIZE, 0);
        assert_eq!(h.file_len, h.dev_offset + 100);
        let enc = h.encode();
        assert_eq!(enc.len() as u64, HEADER_SIZE);
        assert_eq!(Header::decode(&enc).unwrap(), h);
    }

    #[test]
    fn layout_rejects_bad_input() {
        assert!(Header::layout(&[], 0).is_err());
        assert!(Header::layout(&[(0, 100)], 0).is_err());
        assert!(Header::layout(&[(0x800, 4096)], 0).is_err());
        assert!(Header::layout(&[(0, 8192), (4096, 4096)], 0).is_err());
        assert!(Header::layout(&[(0, 4096)], MAX_DEVICE_STATE + 1).is_err());
        assert!(Header::layout(&[(u64::MAX - 4095, 8192)], 0).is_err());
    }
}
