//! The stream form of a snapshot image: the same image, written front to
//! back with no seeking, so it can go through a pipe, a socket or a
//! compressor (`FORMAT.md`, "Stream form").
//!
//! * [`StreamSink`] is a [`Sink`]: any capture (fork, write-protect,
//!   stop-and-copy) writes through it unchanged. Its positioned writes
//!   become records, after a stream header that names the RAM layout.
//! * [`StreamReader`] reads one: the header first (a stream that does not
//!   start with the stream magic and version is refused before anything
//!   else is read), then every record straight into the caller's RAM, then
//!   the image header and device state, checked like a file's. A stream
//!   that ends early, a corrupt record, or one its sender abandoned is
//!   refused with one line; the caller's RAM is then garbage and must not
//!   run.

use std::io::{self, BufReader, BufWriter, Read, Write};

use crate::error::{Result, SnapError};
use crate::format::image::{
    Header, ImageId, ImageRange, HEADER_SIZE, MAX_DEVICE_STATE, MAX_RANGES,
};
use crate::format::record::{
    corrupt, fill, get32, get64, record_head, KIND_ABORT, KIND_DATA, KIND_END, RECORD_HEAD,
};
use crate::format::sink::{ImageSummary, Sink};

/// First bytes of every snapshot stream (an image file starts `SNAPVMM\0`).
pub const STREAM_MAGIC: [u8; 8] = *b"SNAPVMMS";
/// The stream version this build writes and reads.
pub const STREAM_VERSION: u32 = 1;
/// Largest payload of one record; longer writes are split.
pub const MAX_RECORD: usize = 4 << 20;

/// Stream flag: a live migration (post-copy: `crate::migrate::postcopy`), not an image.
pub(crate) const FLAG_LIVE: u32 = 1;
/// Stream flag: a live migration resumed on a new connection.
pub(crate) const FLAG_RESUME: u32 = 2;
/// Stream flag: a live migration whose RAM starts coming before the state
/// (a pre-copy pass: `crate::migrate::precopy`); readers without it refuse the header.
pub(crate) const FLAG_PRECOPY: u32 = 4;
/// Stream flag: a live migration's source that answers the target's RUNNING
/// with GO, the handover; the target runs the guest only after GO
/// (`crate::migrate::postcopy`). Readers without it refuse the header.
pub(crate) const FLAG_HANDOVER: u32 = 8;
/// Stream flag: a live migration's source that answers a page request
/// (REQ_PAGE) with that page at once, ahead of its chunk.
pub(crate) const FLAG_PAGES: u32 = 16;
/// Stream flag: a live migration's source that sends chunks after the
/// switch as PIECE records (a few pages each), so a page asked for never
/// waits behind a whole chunk on the link. Readers without it refuse it.
pub(crate) const FLAG_PIECES: u32 = 32;
/// Stream flag (with `pieces`): a chunk's pieces may begin at any piece —
/// the one of the page a thread waits on — and wrap around the chunk's end
/// back to it. Readers without it refuse it.
pub(crate) const FLAG_ROTATED: u32 = 64;
const FIXED_HEAD: usize = 32;
const RANGE_ENTRY: usize = 24;
/// Longest abort reason carried.
const MAX_REASON: usize = 4096;
/// Bytes after RAM (incremental section, device state) a reader buffers.
const MAX_TAIL: u64 = MAX_DEVICE_STATE + (1 << 20);

/// Whether `prefix` (at least 8 bytes) starts a snapshot stream.
pub fn is_stream(prefix: &[u8]) -> bool {
    prefix.len() >= 8 && prefix[..8] == STREAM_MAGIC
}

/// The byte pipe a [`StreamSink`] writes into: a socket, a pipe to a
/// command, a file.
pub trait StreamWrite: Write + Send + 'static {
    /// Everything is written: flush, close, and confirm the far end took
    /// it (e.g. wait for a command to exit 0). An error fails the capture.
    fn complete(&mut self) -> io::Result<()> {
        self.flush()
    }
    /// The capture failed or was cancelled: release the far end.
    fn abandon(&mut self) {}
    /// Makes a write blocked on the far end return, from another thread
    /// ([`crate::Sink::interrupter`]); `None` where writes end by themselves.
    fn interrupter(&self) -> Option<crate::Interrupter> {
        None
    }
}

impl StreamWrite for std::fs::File {
    fn complete(&mut self) -> io::Result<()> {
        self.sync_data()
    }
}

impl StreamWrite for Vec<u8> {}

/// A [`Sink`] that writes the stream form of the image into `W`.
pub struct StreamSink<W: StreamWrite> {
    out: BufWriter<W>,
    layout: Vec<ImageRange>,
    records: u64,
    bytes: u64,
}

impl<W: StreamWrite> StreamSink<W> {
    /// A sink for a capture of the RAM `ranges` (`(gpa, len)`, as given to
    /// the capture), writing into `out`.
    pub fn new(out: W, ranges: &[(u64, u64)]) -> Result<Self> {
        Ok(StreamSink {
            out: BufWriter::with_capacity(256 << 10, out),
            layout: Header::layout(ranges, 0)?.ranges,
            records: 0,
            bytes: 0,
        })
    }

    /// The writer (what was written is flushed by `finish`, not here).
    pub fn into_inner(self) -> W {
        self.out.into_parts().0
    }

    fn record(&mut self, kind: u32, offset: u64, data: &[u8]) -> io::Result<()> {
        let head = record_head(kind, offset, data);
        self.out.write_all(&head)?;
        self.out.write_all(data)
    }
}

/// The stream header: magic, version, flags, image length, RAM layout.
pub(crate) fn encode_stream_header(image_len: u64, layout: &[ImageRange], flags: u32) -> Vec<u8> {
    let mut b = Vec::with_capacity(FIXED_HEAD + layout.len() * RANGE_ENTRY + 4);
    b.extend_from_slice(&STREAM_MAGIC);
    b.extend_from_slice(&STREAM_VERSION.to_le_bytes());
    b.extend_from_slice(&flags.to_le_bytes());
    b.extend_from_slice(&image_len.to_le_bytes());
    b.extend_from_slice(&(layout.len() as u32).to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    for r in layout {
        b.extend_from_slice(&r.gpa.to_le_bytes());
        b.extend_from_slice(&r.len.to_le_bytes());
        b.extend_from_slice(&r.file_offset.to_le_bytes());
    }
    let c = crc32fast::hash(&b);
    b.extend_from_slice(&c.to_le_bytes());
    b
}

impl<W: StreamWrite> Sink for StreamSink<W> {
    fn begin(&mut self, image_len: u64) -> io::Result<()> {
        let h = encode_stream_header(image_len, &self.layout, 0);
        self.out.write_all(&h)
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut off = offset;
        for part in buf.chunks(MAX_RECORD) {
            self.record(KIND_DATA, off, part)?;
            off += part.len() as u64;
            self.records += 1;
            self.bytes += part.len() as u64;
        }
        Ok(())
    }

    fn finish(&mut self, _summary: &ImageSummary) -> io::Result<()> {
        let mut end = [0u8; 16];
        end[..8].copy_from_slice(&self.records.to_le_bytes());
        end[8..].copy_from_slice(&self.bytes.to_le_bytes());
        self.record(KIND_END, 0, &end)?;
        self.out.flush()?;
        self.out.get_mut().complete()
    }

    fn abort(&mut self) {
        // Best effort: the reader then says the sender gave up, rather than
        // that the stream was cut short.
        let why = b"the sender abandoned the snapshot";
        if self.record(KIND_ABORT, 0, why).is_ok() {
            let _ = self.out.flush();
        }
        self.out.get_mut().abandon();
    }

    fn interrupter(&self) -> Option<crate::Interrupter> {
        self.out.get_ref().interrupter()
    }
}

/// What a stream says about the image before its records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamLayout {
    /// RAM ranges, in stream order (record targets).
    pub ranges: Vec<ImageRange>,
    /// Length of the image the stream carries.
    pub image_len: u64,
    /// A live migration: its RAM comes on demand ([`crate::migrate::postcopy`]).
    pub live: bool,
    /// A live migration continuing on a new connection.
    pub resume: bool,
    /// A live migration that starts with a pre-copy pass.
    pub precopy: bool,
    /// A live migration whose source hands the guest over explicitly (GO).
    pub handover: bool,
    /// A live migration whose source sends a requested page ahead of its chunk.
    pub pages: bool,
    /// A live migration whose chunks' pieces may begin mid-chunk and wrap.
    pub rotated: bool,
}

impl StreamLayout {
    /// Sum of the range lengths.
    pub fn ram_bytes(&self) -> u64 {
        self.ranges.iter().map(|r| r.len).sum()
    }
}

/// What a complete stream held besides RAM.
#[derive(Debug, Clone)]
pub struct Received {
    /// The device state (checked against the image header's CRC).
    pub device_state: Vec<u8>,
    /// The image's identity.
    pub id: ImageId,
    /// RAM bytes received (non-zero pages).
    pub ram_bytes_received: u64,
    /// Total stream bytes read.
    pub stream_bytes: u64,
}

/// Reads a snapshot stream (see the module documentation).
pub struct StreamReader<R: Read> {
    input: BufReader<R>,
    layout: StreamLayout,
    read: u64,
}

impl<R: Read> StreamReader<R> {
    /// Reads and checks the stream header. Nothing past it is read; a
    /// stream that does not start with [`STREAM_MAGIC`] and
    /// [`STREAM_VERSION`] is refused after its first 8 or 12 bytes.
    pub fn start(input: R) -> Result<(StreamReader<R>, StreamLayout)> {
        let mut input = BufReader::with_capacity(1 << 20, input);
        let mut fixed = [0u8; FIXED_HEAD];
        fill(&mut input, &mut fixed[..8], "the stream header")?;
        if fixed[..8] != STREAM_MAGIC {
            return Err(SnapError::NotAStream);
        }
        fill(&mut input, &mut fixed[8..12], "the stream header")?;
        let version = get32(&fixed, 8);
        if version != STREAM_VERSION {
            return Err(corrupt(format!(
                "stream version {version}, this build reads version {STREAM_VERSION}"
            )));
        }
        fill(&mut input, &mut fixed[12..], "the stream header")?;
        let flags = get32(&fixed, 12);
        let known = FLAG_LIVE
            | FLAG_RESUME
            | FLAG_PRECOPY
            | FLAG_HANDOVER
            | FLAG_PAGES
            | FLAG_PIECES
            | FLAG_ROTATED;
        if flags & !known != 0 || (flags & FLAG_LIVE == 0 && flags != 0) {
            return Err(corrupt(format!("unknown stream flags {flags:#x}")));
        }
        let image_len = get64(&fixed, 16);
        let count = get32(&fixed, 24) as usize;
        if count == 0 || count > MAX_RANGES {
            return Err(corrupt(format!("{count} RAM ranges in the stream header")));
        }
        let mut rest = vec![0u8; count * RANGE_ENTRY + 4];
        fill(&mut input, &mut rest, "the stream header")?;
        let mut whole = fixed.to_vec();
        whole.extend_from_slice(&rest[..count * RANGE_ENTRY]);
        let stored = get32(&rest, count * RANGE_ENTRY);
        if crc32fast::hash(&whole) != stored {
            return Err(corrupt("the stream header is corrupt (checksum mismatch)"));
        }
        let ranges: Vec<ImageRange> = (0..count)
            .map(|i| {
                let o = i * RANGE_ENTRY;
                ImageRange {
                    gpa: get64(&rest, o),
                    len: get64(&rest, o + 8),
                    file_offset: get64(&rest, o + 16),
                }
            })
            .collect();
        // The layout must be the one a writer computes for these ranges.
        let pairs: Vec<(u64, u64)> = ranges.iter().map(|r| (r.gpa, r.len)).collect();
        let expect = Header::layout(&pairs, 0)
            .map_err(|e| corrupt(format!("its RAM layout is invalid: {e}")))?;
        if expect.ranges != ranges {
            return Err(corrupt("its RAM layout is not a snapvmm image's"));
        }
        let ram_end = ranges.last().map_or(HEADER_SIZE, |r| r.file_offset + r.len);
        if image_len < ram_end || image_len - ram_end > MAX_TAIL {
            return Err(corrupt(format!(
                "image length {image_len} does not fit its RAM layout"
            )));
        }
        let read = whole.len() as u64 + 4;
        let layout = StreamLayout {
            ranges,
            image_len,
            live: flags & FLAG_LIVE != 0,
            resume: flags & FLAG_RESUME != 0,
            precopy: flags & FLAG_PRECOPY != 0,
            handover: flags & FLAG_HANDOVER != 0,
            pages: flags & FLAG_PAGES != 0,
            rotated: flags & FLAG_ROTATED != 0,
        };
        Ok((
            StreamReader {
                input,
                layout: layout.clone(),
                read,
            },
            layout,
        ))
    }

    /// Reads every record: RAM into `ram` (one slice per range of the
    /// layout, in order, zero where the stream has no data: fresh anonymous
    /// memory), the rest into memory; then checks the image header and the
    /// device state. On error `ram` holds part of the image and must not
    /// be used.
    pub fn receive(mut self, ram: &mut [&mut [u8]]) -> Result<Received> {
        let l = &self.layout;
        if l.live {
            return Err(corrupt(
                "it is a live migration, which needs a connection both ways",
            ));
        }
        if ram.len() != l.ranges.len()
            || ram
                .iter()
                .zip(&l.ranges)
                .any(|(s, r)| s.len() as u64 != r.len)
        {
            return Err(SnapError::InvalidInput(
                "RAM given to the stream reader does not match its layout".into(),
            ));
        }
        let ram_end = l
            .ranges
            .last()
            .map_or(HEADER_SIZE, |r| r.file_offset + r.len);
        let mut tail = vec![0u8; (l.image_len - ram_end) as usize];
        let mut header: Option<Vec<u8>> = None;
        let (mut records, mut bytes) = (0u64, 0u64);
        let mut head = [0u8; RECORD_HEAD];
        loop {
            fill(&mut self.input, &mut head, "a record header")?;
            self.read += RECORD_HEAD as u64;
            if crc32fast::hash(&head[..20]) != get32(&head, 20) {
                return Err(corrupt(format!(
                    "record {records} is corrupt (header checksum mismatch, stream byte {})",
                    self.read - RECORD_HEAD as u64
                )));
            }
            let (kind, len, off, crc) = (
                get32(&head, 0),
                get32(&head, 4) as usize,
                get64(&head, 8),
                get32(&head, 16),
            );
            if len > MAX_RECORD {
                return Err(corrupt(format!("record {records} is {len} bytes long")));
            }
            match kind {
                KIND_DATA => {}
                KIND_END => {
                    let mut end = [0u8; 16];
                    if len != 16 {
                        return Err(corrupt("malformed end record"));
                    }
                    fill(&mut self.input, &mut end, "the end record")?;
                    self.read += 16;
                    if crc32fast::hash(&end) != crc {
                        return Err(corrupt("the end record is corrupt"));
                    }
                    if get64(&end, 0) != records || get64(&end, 8) != bytes {
                        return Err(corrupt(format!(
                            "records are missing: the sender wrote {} records ({} bytes), {records} ({bytes} bytes) arrived",
                            get64(&end, 0),
                            get64(&end, 8)
                        )));
                    }
                    break;
                }
                KIND_ABORT => {
                    let mut why = vec![0u8; len.min(MAX_REASON)];
                    let _ = self.input.read_exact(&mut why);
                    return Err(corrupt(format!(
                        "the sender gave up: {}",
                        String::from_utf8_lossy(&why)
                    )));
                }
                k => return Err(corrupt(format!("record {records} has unknown kind {k}"))),
            }
            // Where the payload goes: the image header, a RAM range, or the tail.
            let end = off
                .checked_add(len as u64)
                .ok_or_else(|| corrupt("record offset overflows"))?;
            let dst: &mut [u8] = if off == 0 && len as u64 == HEADER_SIZE {
                header.insert(vec![0u8; len])
            } else if off >= ram_end && end <= l.image_len {
                let o = (off - ram_end) as usize;
                &mut tail[o..o + len]
            } else if let Some(i) = l
                .ranges
                .iter()
                .position(|r| off >= r.file_offset && end <= r.file_offset + r.len)
            {
                let o = (off - l.ranges[i].file_offset) as usize;
                &mut ram[i][o..o + len]
            } else {
                return Err(corrupt(format!(
                    "record {records} ({len} bytes at image offset {off}) lies outside the image"
                )));
            };
            fill(&mut self.input, dst, "a record")?;
            self.read += len as u64;
            if crc32fast::hash(dst) != crc {
                return Err(corrupt(format!(
                    "record {records} ({len} bytes at image offset {off}) is corrupt (checksum mismatch)"
                )));
            }
            records += 1;
            bytes += len as u64;
        }
        let header = header.ok_or_else(|| corrupt("it has no image header"))?;
        let h = Header::decode(&header)?;
        if h.ranges != l.ranges || h.file_len != l.image_len {
            return Err(corrupt("its image header does not match its stream header"));
        }
        if h.incr.is_some() {
            return Err(corrupt(
                "it holds an incremental image (stream a full one: snapvmm squash-image)",
            ));
        }
        let o = (h.dev_offset - ram_end) as usize;
        let dev = tail[o..o + h.dev_len as usize].to_vec();
        let computed = crc32fast::hash(&dev);
        if computed != h.dev_crc {
            return Err(SnapError::DeviceStateChecksum {
                stored: h.dev_crc,
                computed,
            });
        }
        let ram_bytes_received = bytes.saturating_sub(HEADER_SIZE + h.dev_len);
        Ok(Received {
            device_state: dev,
            id: ImageId {
                id: h.id,
                dev_crc: h.dev_crc,
            },
            ram_bytes_received,
            stream_bytes: self.read,
        })
    }

    /// The input, e.g. to wait for the command that produced it.
    pub fn into_inner(self) -> R {
        self.input.into_inner()
    }

    /// The buffered input, positioned after the stream header.
    /// Bytes of the stream header (what [`StreamReader::start`] parsed;
    /// its input may have been read further ahead).
    pub fn header_len(&self) -> u64 {
        self.read
    }

    pub(crate) fn into_buffered(self) -> BufReader<R> {
        self.input
    }
}
