//! The stream form: what a capture writes through a `StreamSink` reads back
//! into RAM exactly; every damaged, cut or abandoned stream is refused.

mod common;

use std::io::{Read, Write};
use std::sync::{Arc, Mutex};

use common::{fill_dense, fill_sparse, Mem};
use livesnap::stream::{is_stream, StreamReader, StreamSink, StreamWrite, STREAM_MAGIC};
use livesnap::{capture_stopped, Image, Sink, SnapError};
use proptest::prelude::*;

const MIB: usize = 1 << 20;

/// Two ranges (the second not 2 MiB long), mostly zero pages.
fn guest() -> (Mem, Vec<(usize, usize, u64)>) {
    let mut mem = Mem::new(12 * MIB);
    fill_sparse(mem.bytes_mut(), 5, 7);
    fill_dense(&mut mem.words_mut()[..MIB / 8], 3);
    (
        mem,
        vec![(0, 8 * MIB, 0), (8 * MIB, 3 * MIB + 4096 * 3, 1 << 32)],
    )
}

fn stream_of(mem: &Mem, parts: &[(usize, usize, u64)], dev: &[u8]) -> Vec<u8> {
    let ranges: Vec<_> = parts.iter().map(|&(o, l, g)| mem.range(o, l, g)).collect();
    let pairs: Vec<_> = parts.iter().map(|&(_, l, g)| (g, l as u64)).collect();
    let mut sink = StreamSink::new(Vec::new(), &pairs).unwrap();
    capture_stopped(&ranges, dev, &mut sink).unwrap();
    sink.into_inner()
}

fn receive(stream: &[u8]) -> Result<(Vec<Vec<u8>>, Vec<u8>), SnapError> {
    let (r, layout) = StreamReader::start(stream)?;
    let mut ram: Vec<Vec<u8>> = layout
        .ranges
        .iter()
        .map(|r| vec![0u8; r.len as usize])
        .collect();
    let mut slices: Vec<&mut [u8]> = ram.iter_mut().map(|v| v.as_mut_slice()).collect();
    let got = r.receive(&mut slices)?;
    Ok((ram, got.device_state))
}

#[test]
fn a_stream_reads_back_as_the_memory_and_the_file_image_hold() {
    let (mem, parts) = guest();
    let dev = b"device state".repeat(1000);
    let s = stream_of(&mem, &parts, &dev);
    assert!(is_stream(&s) && !is_stream(&livesnap::MAGIC));
    let (ram, got_dev) = receive(&s).unwrap();
    assert_eq!(got_dev, dev);
    for (r, &(o, l, _)) in ram.iter().zip(&parts) {
        assert!(r == &mem.bytes()[o..o + l], "RAM differs");
    }
    // Zero pages are not sent: the stream is far smaller than RAM.
    let ram_len: usize = parts.iter().map(|p| p.1).sum();
    assert!(
        s.len() < ram_len / 2,
        "{} bytes for {ram_len} of RAM",
        s.len()
    );
    // The same memory as a file image: the same RAM.
    let dir = tempfile::tempdir().unwrap();
    let ranges: Vec<_> = parts.iter().map(|&(o, l, g)| mem.range(o, l, g)).collect();
    capture_stopped(&ranges, &dev, &dir.path().join("f")).unwrap();
    let img = Image::open(dir.path().join("f")).unwrap();
    assert_eq!(common::image_ram(&img), ram);
}

#[test]
fn every_cut_of_a_stream_is_refused_as_truncated() {
    let (mem, parts) = guest();
    let s = stream_of(&mem, &parts, b"dev");
    let cuts = [
        0,
        5,
        11,
        40,
        200,
        s.len() / 3,
        s.len() / 2,
        s.len() - 17,
        s.len() - 1,
    ];
    for cut in cuts {
        let e = receive(&s[..cut]).unwrap_err();
        assert!(e.to_string().contains("truncated"), "cut at {cut}: {e}");
    }
}

#[test]
fn a_foreign_stream_or_an_image_file_is_refused_by_its_first_bytes() {
    for junk in [
        &b"GET / HTTP/1.1\r\n\r\n"[..],
        &livesnap::MAGIC[..],
        &[0u8; 64][..],
    ] {
        let e = receive(junk).unwrap_err();
        assert!(e.to_string().contains("magic"), "{e}");
    }
    let mut v = STREAM_MAGIC.to_vec();
    v.extend_from_slice(&9u32.to_le_bytes());
    let e = receive(&v).unwrap_err();
    assert!(e.to_string().contains("stream version 9"), "{e}");
}

#[test]
fn stream_flags_are_checked_at_the_header() {
    let (mem, parts) = guest();
    let stream = stream_of(&mem, &parts, b"dev");
    // The same header with other flags (its checksum made right again).
    let with_flags = |flags: u32| {
        let mut b = stream.clone();
        b[12..16].copy_from_slice(&flags.to_le_bytes());
        let count = u32::from_le_bytes(b[24..28].try_into().unwrap()) as usize;
        let end = 32 + count * 24;
        let crc = crc32fast::hash(&b[..end]);
        b[end..end + 4].copy_from_slice(&crc.to_le_bytes());
        b
    };
    // Resume, pre-copy, handover, pages, pieces or rotated pieces without
    // live, or a bit nobody knows: refused at once.
    for f in [2, 4, 6, 8, 16, 32, 64, 1 | 128] {
        let e = StreamReader::start(&with_flags(f)[..]).err().unwrap();
        assert!(e.to_string().contains("unknown stream flags"), "{f}: {e}");
    }
    let (_, l) = StreamReader::start(&with_flags(1 | 4)[..]).unwrap();
    assert!(l.live && l.precopy && !l.resume && !l.handover && !l.pages);
    let (_, l) = StreamReader::start(&with_flags(1 | 8 | 16 | 32)[..]).unwrap();
    assert!(l.live && l.handover && l.pages && !l.precopy && !l.rotated);
    let (_, l) = StreamReader::start(&with_flags(1 | 32 | 64)[..]).unwrap();
    assert!(l.live && l.rotated);
    let (_, l) = StreamReader::start(&with_flags(0)[..]).unwrap();
    assert!(!l.live && !l.precopy);
}

#[test]
fn an_abandoned_capture_says_so() {
    let (mem, parts) = guest();
    let pairs: Vec<_> = parts.iter().map(|&(_, l, g)| (g, l as u64)).collect();
    let mut sink = StreamSink::new(Vec::new(), &pairs).unwrap();
    sink.begin(14 << 20).unwrap();
    sink.write_at(&mem.bytes()[..8192], 4096 * 512).unwrap();
    sink.abort();
    let e = receive(&sink.into_inner()).unwrap_err();
    assert!(e.to_string().contains("gave up"), "{e}");
}

/// A writer that fails after `limit` bytes, as a peer that goes away.
struct Breaks(usize);
impl Write for Breaks {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if self.0 < b.len() {
            return Err(std::io::ErrorKind::BrokenPipe.into());
        }
        self.0 -= b.len();
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
impl StreamWrite for Breaks {}

#[test]
fn a_failing_stream_fails_the_capture() {
    let (mem, parts) = guest();
    let ranges: Vec<_> = parts.iter().map(|&(o, l, g)| mem.range(o, l, g)).collect();
    let pairs: Vec<_> = parts.iter().map(|&(_, l, g)| (g, l as u64)).collect();
    let mut sink = StreamSink::new(Breaks(3 * MIB), &pairs).unwrap();
    let e = capture_stopped(&ranges, b"dev", &mut sink).unwrap_err();
    assert!(e.to_string().to_lowercase().contains("broken pipe"), "{e}");
}

/// Shared in-memory stream, for a capture that owns its sink.
#[derive(Clone, Default)]
struct Shared(Arc<Mutex<Vec<u8>>>);
impl Write for Shared {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
impl StreamWrite for Shared {}

#[test]
fn a_write_protect_capture_streams_while_memory_changes() {
    let mut mem = Mem::new(16 * MIB);
    fill_dense(mem.words_mut(), 11);
    mem.bytes_mut()[4 * MIB..8 * MIB].fill(0);
    let before = mem.bytes().to_vec();
    let range = mem.range(0, 16 * MIB, 0);
    let engine = match livesnap::wp::WpEngine::new(&[range]) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("skipped: no userfaultfd write-protect here: {e}");
            return;
        }
    };
    let out = Shared::default();
    let sink = StreamSink::new(out.clone(), &[(0, 16 * MIB as u64)]).unwrap();
    let opts = livesnap::wp::WpOptions {
        pool_bytes: 2 * MIB as u64,
        ..Default::default()
    };
    let p = livesnap::wp::prepare_wp_capture(
        &engine,
        livesnap::Destination::Sink(Box::new(sink)),
        opts,
    )
    .unwrap();
    let (cap, sender, _) = p.start_deferred().unwrap();
    // The state comes from the VMM's thread (here, before this thread
    // writes: a writer may have to wait for the sink, which waits for it).
    sender.send(b"state".to_vec());
    // Written after the cut: the stream holds memory as of the cut.
    fill_dense(mem.words_mut(), 99);
    cap.wait().unwrap();
    let s = out.0.lock().unwrap().clone();
    let (ram, dev) = receive(&s).unwrap();
    assert_eq!(dev, b"state");
    assert!(ram[0] == before, "the stream is not memory as of the cut");
}

#[test]
fn reading_from_a_pipe_needs_no_seeking() {
    let (mem, parts) = guest();
    let s = stream_of(&mem, &parts, b"dev");
    // Through a real pipe (cat), in small writes.
    let mut child = std::process::Command::new("cat")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let feeder = std::thread::spawn(move || {
        for c in s.chunks(4097) {
            stdin.write_all(c).unwrap();
        }
    });
    let mut out = child.stdout.take().unwrap();
    let (r, layout) = StreamReader::start(&mut out as &mut dyn Read).unwrap();
    let mut ram: Vec<Vec<u8>> = layout
        .ranges
        .iter()
        .map(|r| vec![0; r.len as usize])
        .collect();
    let mut slices: Vec<&mut [u8]> = ram.iter_mut().map(|v| v.as_mut_slice()).collect();
    r.receive(&mut slices).unwrap();
    feeder.join().unwrap();
    child.wait().unwrap();
    assert!(ram[1] == mem.bytes()[parts[1].0..parts[1].0 + parts[1].1]);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    /// Every byte of a stream is covered by a checksum: flipping any bit is refused.
    #[test]
    fn any_flipped_bit_is_refused(pos in 0usize..1_000_000, bit in 0u8..8) {
        let mut mem = Mem::new(4 * MIB);
        fill_sparse(mem.bytes_mut(), 9, 1);
        let parts = [(0, 2 * MIB, 0u64), (2 * MIB, 2 * MIB, 8 * MIB as u64)];
        let mut s = stream_of(&mem, &parts, b"some device state");
        let pos = pos % s.len();
        s[pos] ^= 1 << bit;
        prop_assert!(receive(&s).is_err(), "flip at {} accepted", pos);
    }
}
