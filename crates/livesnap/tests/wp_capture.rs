//! The write-protect capture: the image holds memory as of the protection
//! while another thread keeps writing it; a small pool makes the fault
//! handler write chunks itself; cancel leaves no file and nobody blocked.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{fill_dense, uffd_wp, Mem};
use livesnap::uffd::Uffd;
use livesnap::wp::{prepare_wp_capture, WpEngine, WpOptions};
use livesnap::CHUNK;
use livesnap::{Image, SnapError};

const LEN: usize = 32 << 20;

/// A thread that rewrites every word of `mem` (a different value each pass)
/// until told to stop; returns the passes it made.
fn mutator(mem: &Mem, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    let (ptr, len) = (mem.bytes().as_ptr() as usize, mem.bytes().len());
    std::thread::spawn(move || {
        let mut pass = 0u64;
        while !stop.load(Ordering::Relaxed) {
            pass += 1;
            // Chunks in a scattered order, so the fault handler and the writer race.
            for c in 0..len / CHUNK as usize {
                let c = (c * 7) % (len / CHUNK as usize);
                for w in (0..CHUNK as usize).step_by(4096) {
                    let p = (ptr + c * CHUNK as usize + w) as *mut u64;
                    // SAFETY: inside the test mapping, which outlives this
                    // thread (joined before the mapping is dropped).
                    unsafe { p.write_volatile(!pass) };
                }
            }
        }
        pass
    })
}

/// A capture of `engine`'s RAM into `dest` while a mutator rewrites `mem`;
/// what it counted.
/// The RAM an image at `path` holds.
fn ram_of(path: &std::path::Path) -> Vec<u8> {
    let mut back = vec![0u8; LEN];
    Image::open(path)
        .unwrap()
        .read_ram_into(0, &mut back)
        .unwrap();
    back
}

fn capture_while_mutating(
    engine: &WpEngine,
    mem: &Mem,
    dest: &std::path::Path,
    opts: WpOptions,
) -> Arc<livesnap::wp::WpCounters> {
    let prepared = prepare_wp_capture(engine, livesnap::Destination::file(dest), opts).unwrap();
    let (capture, sender, counters) = prepared.start_deferred().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let m = mutator(mem, stop.clone());
    sender.send(b"dev".to_vec());
    capture.wait().unwrap();
    stop.store(true, Ordering::Relaxed);
    m.join().unwrap();
    counters
}

fn run(pool_bytes: u64) {
    let Some(uffd) = uffd_wp() else { return };
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("wp.snap");
    let mut mem = Mem::new(LEN);
    fill_dense(mem.words_mut(), 42);
    mem.bytes_mut()[LEN - 8192..].fill(0); // two zero pages: holes
    let expected = mem.bytes().to_vec();
    let range = mem.range(0, LEN, 0);
    let engine = WpEngine::with_uffd(uffd.clone(), &[range]).unwrap();
    let prepared = prepare_wp_capture(
        &engine,
        livesnap::Destination::file(&dest),
        WpOptions {
            pool_bytes,
            ..WpOptions::default()
        },
    )
    .unwrap();
    let (capture, sender, counters) = prepared.start_deferred().unwrap();
    // From here on the memory changes under the capture.
    let stop = Arc::new(AtomicBool::new(false));
    let m = mutator(&mem, stop.clone());
    sender.send(b"device state".to_vec());
    let stats = capture.wait().unwrap();
    stop.store(true, Ordering::Relaxed);
    assert!(
        m.join().unwrap() > 0,
        "the writer thread was never blocked for good"
    );
    let image = Image::open(&dest).unwrap();
    assert_eq!(image.device_state().unwrap(), b"device state");
    let mut back = vec![0u8; LEN];
    image.read_ram_into(0, &mut back).unwrap();
    assert!(
        back == expected,
        "the image holds memory as of the protection"
    );
    assert_eq!(stats.zero_pages, 2);
    let faults = counters.faults.load(Ordering::Relaxed);
    let by_fault = counters.chunks_by_fault.load(Ordering::Relaxed);
    let by_writer = counters.chunks_by_writer.load(Ordering::Relaxed);
    assert_eq!(
        by_fault + by_writer,
        (LEN as u64) / CHUNK,
        "each chunk once"
    );
    assert!(counters.pool_high_water.load(Ordering::Relaxed) <= pool_bytes.max(CHUNK));
    eprintln!("faults {faults}, chunks: by fault {by_fault}, by writer {by_writer}");
    // A write after the capture is let through (and recorded as a change).
    mem.bytes_mut()[0] = 1;
    assert!(engine.dirty_bytes() >= CHUNK);
}

#[test]
fn the_image_holds_memory_as_of_the_protection_while_it_changes() {
    run(64 << 20);
}

#[test]
fn a_one_chunk_pool_still_makes_progress() {
    run(CHUNK);
}

#[test]
fn cancel_removes_the_file_and_blocks_nobody() {
    let Some(uffd) = uffd_wp() else { return };
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("wp.snap");
    let mut mem = Mem::new(LEN);
    fill_dense(mem.words_mut(), 7);
    let range = mem.range(0, LEN, 0);
    let engine = WpEngine::with_uffd(uffd.clone(), &[range]).unwrap();
    let prepared = prepare_wp_capture(
        &engine,
        livesnap::Destination::file(&dest),
        WpOptions::default(),
    )
    .unwrap();
    let (capture, sender, _) = prepared.start_deferred().unwrap();
    capture.cancel();
    let stop = Arc::new(AtomicBool::new(false));
    let m = mutator(&mem, stop.clone());
    // The state never comes: the cancel must not wait for it.
    drop(sender);
    let r = capture.wait();
    assert!(matches!(r, Err(SnapError::Cancelled)), "{r:?}");
    std::thread::sleep(Duration::from_millis(100));
    stop.store(true, Ordering::Relaxed);
    assert!(m.join().unwrap() > 0);
    assert!(!dest.exists());
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert!(left.is_empty(), "no temp file left: {left:?}");
}

/// An image in memory.
struct VecSink(Arc<std::sync::Mutex<Vec<u8>>>, Arc<AtomicBool>);

impl livesnap::Sink for VecSink {
    fn begin(&mut self, len: u64) -> std::io::Result<()> {
        self.0.lock().unwrap().resize(len as usize, 0);
        Ok(())
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        let mut v = self.0.lock().unwrap();
        assert!(
            offset as usize + buf.len() <= v.len(),
            "write past the announced length"
        );
        v[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn finish(&mut self, _: &livesnap::ImageSummary) -> std::io::Result<()> {
        self.1.store(true, Ordering::SeqCst);
        Ok(())
    }
    fn abort(&mut self) {}
}

#[test]
fn into_a_sink_with_a_small_pool_while_memory_changes() {
    let Some(uffd) = uffd_wp() else { return };
    let mut mem = Mem::new(LEN);
    fill_dense(mem.words_mut(), 9);
    let expected = mem.bytes().to_vec();
    let range = mem.range(0, LEN, 0x10_0000);
    let engine = WpEngine::with_uffd(uffd.clone(), &[range]).unwrap();
    let (bytes, finished) = (Arc::default(), Arc::new(AtomicBool::new(false)));
    let sink = VecSink(Arc::clone(&bytes), finished.clone());
    let opts = WpOptions {
        pool_bytes: 2 * CHUNK,
        ..WpOptions::default()
    };
    let prepared = livesnap::wp::prepare_wp_capture(
        &engine,
        livesnap::Destination::Sink(Box::new(sink)),
        opts,
    )
    .unwrap();
    let (capture, sender, counters) = prepared.start_deferred().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let m = mutator(&mem, stop.clone());
    // The state comes a little later: the sink cannot begin before it.
    std::thread::sleep(Duration::from_millis(30));
    sender.send(b"state".to_vec());
    capture.wait().unwrap();
    stop.store(true, Ordering::Relaxed);
    m.join().unwrap();
    assert!(finished.load(Ordering::SeqCst));
    let image = Image::from_source(Box::new(bytes.lock().unwrap().clone())).unwrap();
    assert_eq!(image.device_state().unwrap(), b"state");
    let mut back = vec![0u8; LEN];
    image.read_ram_into(0, &mut back).unwrap();
    assert!(
        back == expected,
        "the image holds memory as of the protection"
    );
    let c = &counters;
    let total =
        c.chunks_by_fault.load(Ordering::Relaxed) + c.chunks_by_writer.load(Ordering::Relaxed);
    assert_eq!(total, LEN as u64 / CHUNK);
}

#[test]
fn a_prepared_capture_dropped_before_the_cut_leaves_nothing() {
    let Some(uffd) = uffd_wp() else { return };
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("wp.snap");
    let mem = Mem::new(4 * CHUNK as usize);
    let range = mem.range(0, 4 * CHUNK as usize, 0);
    let engine = WpEngine::with_uffd(uffd.clone(), &[range]).unwrap();
    let called = Arc::new(AtomicBool::new(false));
    let c = called.clone();
    let opts = WpOptions {
        pool_bytes: CHUNK,
        on_done: Some(Box::new(move |_| c.store(true, Ordering::SeqCst))),
        ..WpOptions::default()
    };
    let prepared = prepare_wp_capture(&engine, livesnap::Destination::file(&dest), opts).unwrap();
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        1,
        "the temp file"
    );
    drop(prepared);
    let gone = (0..200).any(|_| {
        std::thread::sleep(Duration::from_millis(10));
        std::fs::read_dir(dir.path()).unwrap().count() == 0
    });
    assert!(gone, "the temp file is removed");
    assert!(
        !called.load(Ordering::SeqCst),
        "no completion for a capture never started"
    );
}

/// Memory the program never touched before the cut is written after it:
/// the image must hold zeros (the engine populates such pages before the
/// protection, or the kernel protects them itself).
fn untouched_memory(kernel_protects_them: bool, always_populate: bool) {
    let uffd = if kernel_protects_them {
        match Uffd::new_wp_unpopulated() {
            Ok(u) => Arc::new(u),
            Err(e) => {
                eprintln!("skipped: {e}");
                return;
            }
        }
    } else {
        let Some(u) = uffd_wp() else { return };
        u
    };
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("wp.snap");
    let mem = Mem::new(LEN);
    let range = mem.range(0, LEN, 0);
    let engine = WpEngine::with_uffd(uffd.clone(), &[range]).unwrap();
    let opts = WpOptions {
        pool_bytes: 4 * CHUNK,
        always_populate,
        ..WpOptions::default()
    };
    let prepared = prepare_wp_capture(&engine, livesnap::Destination::file(&dest), opts).unwrap();
    let (capture, sender, _) = prepared.start_deferred().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let m = mutator(&mem, stop.clone());
    // Let the mutator get ahead of the writer.
    std::thread::sleep(Duration::from_millis(20));
    sender.send(Vec::new());
    let stats = capture.wait().unwrap();
    stop.store(true, Ordering::Relaxed);
    m.join().unwrap();
    assert_eq!(
        stats.zero_pages,
        (LEN / 4096) as u64,
        "every page was zero at the cut"
    );
    let image = Image::open(&dest).unwrap();
    let mut back = vec![1u8; LEN];
    image.read_ram_into(0, &mut back).unwrap();
    assert!(back.iter().all(|&b| b == 0));
}

#[test]
fn memory_never_touched_before_the_cut_is_captured_as_it_was() {
    // Populated by the engine before the protection.
    untouched_memory(false, false);
}

#[test]
fn the_kernel_protecting_untouched_pages_gives_the_same_image() {
    untouched_memory(true, false);
    untouched_memory(true, true);
}

/// The pool's buffers outlive a capture: the next one starts with them (no
/// buffer to map while the guest waits), bounded by the pool's size, and the
/// images stay exact; `keep_pool: false` frees them.
#[test]
fn the_next_capture_starts_with_the_pool_kept_from_the_last() {
    let Some(uffd) = uffd_wp() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut mem = Mem::new(LEN);
    fill_dense(mem.words_mut(), 7);
    let range = mem.range(0, LEN, 0);
    let engine = WpEngine::with_uffd(uffd.clone(), &[range]).unwrap();
    assert_eq!(engine.kept_pool_bytes(), 0);
    let pool_bytes = 8 << 20;
    let mut kept_at_start = Vec::new();
    for (round, keep) in [(0, true), (1, true), (2, false)] {
        let dest = dir.path().join(format!("wp{round}.snap"));
        let expected = mem.bytes().to_vec();
        let opts = WpOptions {
            pool_bytes,
            keep_pool: keep,
            ..WpOptions::default()
        };
        let counters = capture_while_mutating(&engine, &mem, &dest, opts);
        kept_at_start.push(counters.pool_kept.load(Ordering::Relaxed));
        assert!(
            ram_of(&dest) == expected,
            "round {round}: the image is exact"
        );
        let kept = engine.kept_pool_bytes();
        if keep {
            assert!(kept > 0, "round {round}: buffers kept");
            assert!(
                kept <= pool_bytes + 2 * CHUNK,
                "round {round}: {kept} bytes kept, more than the pool and the writers' own"
            );
        } else {
            assert_eq!(kept, 0, "round {round}: keep_pool false frees them");
        }
    }
    assert_eq!(kept_at_start[0], 0, "nothing kept before the first capture");
    assert!(
        kept_at_start[1] > 0,
        "the second capture began with kept buffers"
    );
    assert!(kept_at_start[1] <= pool_bytes / CHUNK);
    engine.release_pool();
    assert_eq!(engine.kept_pool_bytes(), 0);
}

/// The pool made ahead of the first capture: that capture starts with the
/// whole pool kept (its faults never wait for a buffer to be mapped), the
/// writers' own buffers are made too, a second call makes nothing more, and
/// the image is exact.
#[test]
fn a_pool_prepared_ahead_serves_the_first_capture() {
    let Some(uffd) = uffd_wp() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut mem = Mem::new(LEN);
    fill_dense(mem.words_mut(), 11);
    let engine = WpEngine::with_uffd(uffd.clone(), &[mem.range(0, LEN, 0)]).unwrap();
    let pool_bytes = 4 << 20;
    let kept = livesnap::wp::prepare_pool(&engine, pool_bytes);
    assert_eq!(
        kept,
        pool_bytes + 2 * CHUNK,
        "the pool and the writers' own"
    );
    assert_eq!(livesnap::wp::prepare_pool(&engine, pool_bytes), kept);
    assert_eq!(engine.kept_pool_bytes(), kept);
    let dest = dir.path().join("first.snap");
    let expected = mem.bytes().to_vec();
    let opts = WpOptions {
        pool_bytes,
        ..WpOptions::default()
    };
    let counters = capture_while_mutating(&engine, &mem, &dest, opts);
    assert_eq!(
        counters.pool_kept.load(Ordering::Relaxed),
        pool_bytes / CHUNK,
        "the first capture began with the whole pool"
    );
    assert!(ram_of(&dest) == expected, "the image is exact");
}
