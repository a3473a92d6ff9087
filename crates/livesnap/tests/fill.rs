//! Lazy restore into anonymous memory: threads touching RAM get the
//! source's bytes whether they fault first or the prefetch gets there first;
//! holes stay unread and read as zeros; a failing source is reported, never
//! papered over; any page source works.

mod common;

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use common::{fill_dense, uffd_missing_ok, Mem};
use livesnap::fill::{start_fill, FillStats};
use livesnap::ImageRange;
use livesnap::PageSource;
use livesnap::CHUNK;

const LEN: usize = 32 << 20;
/// Where RAM starts in the source file (as in an image, after its header).
const OFFSET: u64 = 2 << 20;

/// A source that is slow (so that threads touching RAM fault before the
/// prefetch reaches them) and counts its reads.
struct Slow<S> {
    inner: S,
    reads: AtomicU64,
    fail_at: Option<u64>,
}

impl<S: PageSource> PageSource for Slow<S> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.reads.fetch_add(1, Ordering::Relaxed);
        if self.fail_at == Some(offset) {
            return Err(io::Error::other("the disk went away"));
        }
        std::thread::sleep(Duration::from_millis(3));
        self.inner.read_at(buf, offset)
    }

    fn is_hole(&self, offset: u64, len: u64) -> bool {
        self.inner.is_hole(offset, len)
    }
}

/// The content of RAM: dense data except chunks 3 and 9 (holes of the
/// file) and the first half of chunk 5 (a partial hole).
fn expected() -> Vec<u8> {
    let mut m = vec![0u8; LEN];
    // SAFETY: u64 has no invalid bit patterns; align_to only reinterprets.
    let (_, words, _) = unsafe { m.align_to_mut::<u64>() };
    fill_dense(words, 7);
    let c = CHUNK as usize;
    m[3 * c..4 * c].fill(0);
    m[9 * c..10 * c].fill(0);
    m[5 * c..5 * c + c / 2].fill(0);
    m
}

/// A sparse file holding `content` at OFFSET, zero runs left as holes.
fn sparse_file(dir: &std::path::Path, content: &[u8]) -> File {
    let path = dir.join("ram");
    let f = File::options()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    for (i, page) in content.chunks(4096).enumerate() {
        if page.iter().any(|&b| b != 0) {
            f.write_all_at(page, OFFSET + (i * 4096) as u64).unwrap();
        }
    }
    f.set_len(OFFSET + content.len() as u64).unwrap();
    f
}

/// Test memory whose RAM (`ram()`) is 2 MiB-aligned, as guest RAM is.
struct Ram(Mem);

impl Ram {
    fn new() -> Ram {
        Ram(Mem::new(LEN + CHUNK as usize))
    }

    fn skip(&self) -> usize {
        let p = self.0.bytes().as_ptr() as usize;
        (CHUNK as usize - p % CHUNK as usize) % CHUNK as usize
    }

    fn bytes(&self) -> &[u8] {
        &self.0.bytes()[self.skip()..self.skip() + LEN]
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        let k = self.skip();
        &mut self.0.bytes_mut()[k..k + LEN]
    }
}

fn image_range(mem: &Ram) -> (livesnap::RamRange, ImageRange) {
    let r = mem.0.range(mem.skip(), LEN, 0x10_0000);
    (
        r,
        ImageRange {
            gpa: 0x10_0000,
            len: LEN as u64,
            file_offset: OFFSET,
        },
    )
}

#[test]
fn threads_touching_ram_see_the_source_whoever_fills_it() {
    if !uffd_missing_ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let want = expected();
    let source = Arc::new(Slow {
        inner: sparse_file(dir.path(), &want),
        reads: AtomicU64::new(0),
        fail_at: None,
    });
    let mem = Ram::new();
    let (range, ir) = image_range(&mem);
    let (tx, rx) = mpsc::channel();
    let mut fill = start_fill(
        &[range],
        &[ir],
        source.clone(),
        Some(Box::new(move |r| tx.send(r).unwrap())),
    )
    .unwrap();
    fill.go();
    // Touch chunks from the end, where the prefetch arrives last: reads see
    // the source, a write into a hole and one into data land and stay.
    let base = mem.bytes().as_ptr() as usize;
    let toucher = std::thread::spawn(move || {
        let c = CHUNK as usize;
        let mut seen = Vec::new();
        for k in (0..LEN / c).rev() {
            let p = (base + k * c + 8) as *const u64;
            // SAFETY: inside the test mapping, which outlives this thread.
            seen.push((k, unsafe { p.read_volatile() }));
        }
        // SAFETY: as above; one word in a hole chunk and one in a data chunk.
        unsafe {
            ((base + 9 * c + 16) as *mut u64).write_volatile(0xabcd);
            ((base + 14 * c + 16) as *mut u64).write_volatile(0xef01);
        }
        seen
    });
    let seen = toucher.join().unwrap();
    let stats: FillStats = rx.recv_timeout(Duration::from_secs(60)).unwrap().unwrap();
    assert_eq!(fill.wait(), Ok(stats));
    let c = CHUNK as usize;
    for (k, v) in seen {
        let w = u64::from_ne_bytes(want[k * c + 8..k * c + 16].try_into().unwrap());
        assert_eq!(v, w, "chunk {k} as first read");
    }
    let mut want = want;
    want[9 * c + 16..9 * c + 24].copy_from_slice(&0xabcdu64.to_ne_bytes());
    want[14 * c + 16..14 * c + 24].copy_from_slice(&0xef01u64.to_ne_bytes());
    assert!(mem.bytes() == &want[..], "RAM differs from the source");
    assert!(stats.faults > 0 && stats.chunks_by_fault > 0, "{stats:?}");
    assert!(stats.chunks_by_prefetch > 0, "{stats:?}");
    // The two hole chunks were never read: the touches got the zero page.
    assert_eq!(stats.zero_chunks, 2, "{stats:?}");
    assert_eq!(stats.bytes_read, (LEN - 2 * c) as u64, "{stats:?}");
    assert_eq!(source.reads.load(Ordering::Relaxed), (LEN / c - 2) as u64);
    // RAM is ordinary memory now: touching it faults nowhere.
    assert!(fill.is_finished());
}

#[test]
fn a_source_that_fails_is_reported() {
    if !uffd_missing_ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let want = expected();
    let source = Arc::new(Slow {
        inner: sparse_file(dir.path(), &want),
        reads: AtomicU64::new(0),
        fail_at: Some(OFFSET + 6 * CHUNK),
    });
    let mem = Ram::new();
    let (range, ir) = image_range(&mem);
    let (tx, rx) = mpsc::channel();
    let mut fill = start_fill(
        &[range],
        &[ir],
        source,
        Some(Box::new(move |r| tx.send(r).unwrap())),
    )
    .unwrap();
    fill.go();
    let e = rx
        .recv_timeout(Duration::from_secs(60))
        .unwrap()
        .unwrap_err();
    assert!(e.contains("the disk went away"), "{e}");
    assert_eq!(fill.wait().unwrap_err(), e);
    // The chunks with data before the failing one are in place; the rest
    // (holes included) stays missing for good: touching it would wait for
    // ever, so the VMM ends the VM, and this test touches chunks 0-2 only.
    assert_eq!(
        &mem.bytes()[..3 * CHUNK as usize],
        &want[..3 * CHUNK as usize]
    );
}

/// A page source that is not a file: RAM computed on demand.
struct Generated;

impl PageSource for Generated {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        for (i, w) in buf.chunks_mut(8).enumerate() {
            let v = (offset + 8 * i as u64) ^ 0x5a5a_5a5a;
            w.copy_from_slice(&v.to_ne_bytes());
        }
        Ok(())
    }
}

#[test]
fn any_page_source_serves_a_restore() {
    if !uffd_missing_ok() {
        return;
    }
    let mem = Ram::new();
    let (range, ir) = image_range(&mem);
    let mut fill = start_fill(&[range], &[ir], Arc::new(Generated), None).unwrap();
    // Read in the middle before the prefetch can get there.
    let probe = 12 * CHUNK as usize + 4096;
    let v = u64::from_ne_bytes(mem.bytes()[probe..probe + 8].try_into().unwrap());
    assert_eq!(v, (OFFSET + probe as u64) ^ 0x5a5a_5a5a);
    let stats = fill.wait().unwrap();
    assert_eq!(stats.bytes_read, LEN as u64);
    for (i, w) in mem.bytes().chunks(8).enumerate().step_by(4099) {
        let v = u64::from_ne_bytes(w.try_into().unwrap());
        assert_eq!(v, (OFFSET + 8 * i as u64) ^ 0x5a5a_5a5a, "word {i}");
    }
}

#[test]
fn memory_touched_before_the_restore_is_an_error_not_a_silent_mix() {
    if !uffd_missing_ok() {
        return;
    }
    let mut mem = Ram::new();
    mem.bytes_mut()[4 * CHUNK as usize] = 1;
    let (range, ir) = image_range(&mem);
    let mut fill = start_fill(&[range], &[ir], Arc::new(Generated), None).unwrap();
    let e = fill.wait().unwrap_err();
    assert!(e.contains("touched before it was restored"), "{e}");
}
