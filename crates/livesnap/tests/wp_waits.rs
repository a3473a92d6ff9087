//! The write-protect capture's fault path never writes to the destination:
//! a fault waits for a pool buffer (and the pool may grow), a destination
//! that stops reading abandons the capture instead of stopping the guest,
//! cancel ends it whatever the destination does, a destination that
//! resumes in time still gets a consistent image, and a file is written
//! with direct I/O up to its last, shorter chunk.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use common::{fill_dense, uffd_wp, Mem};
use livesnap::wp::{prepare_wp_capture, WpEngine, WpOptions};
use livesnap::CHUNK;
use livesnap::{Image, SnapError};

const LEN: usize = 32 << 20;

/// A write-protect capture of 32 MiB of test memory into a [`GatedSink`],
/// cut and under way (the device state not sent yet).
struct Run {
    capture: livesnap::Capture,
    sender: livesnap::StateSender,
    counters: Arc<livesnap::wp::WpCounters>,
    gate: Arc<Gate>,
    bytes: Arc<Mutex<Vec<u8>>>,
    finished: Arc<AtomicBool>,
    /// Memory as of the cut.
    expected: Vec<u8>,
    // Dropped after the capture, before the memory it registers.
    engine: WpEngine,
    mem: Mem,
}

/// Starts a [`Run`] over memory filled from `seed`, into a sink that is
/// `open` or not and takes `delay` per write; `None` without userfaultfd.
fn start(seed: u64, open: bool, delay: Duration, opts: WpOptions) -> Option<Run> {
    let uffd = uffd_wp()?;
    let mut mem = Mem::new(LEN);
    fill_dense(mem.words_mut(), seed);
    let expected = mem.bytes().to_vec();
    let engine = WpEngine::with_uffd(uffd, &[mem.range(0, LEN, 0)]).unwrap();
    let (sink, gate, bytes) = GatedSink::new(open, delay);
    let finished = sink.finished.clone();
    let prepared =
        prepare_wp_capture(&engine, livesnap::Destination::Sink(Box::new(sink)), opts).unwrap();
    let (capture, sender, counters) = prepared.start_deferred().unwrap();
    Some(Run {
        capture,
        sender,
        counters,
        gate,
        bytes,
        finished,
        expected,
        engine,
        mem,
    })
}

/// The image a [`GatedSink`] received holds memory as of the cut.
fn holds_memory_at_the_cut(bytes: &Mutex<Vec<u8>>, expected: &[u8]) {
    let image = Image::from_source(Box::new(bytes.lock().unwrap().clone())).unwrap();
    assert_eq!(image.device_state().unwrap(), b"state");
    let mut back = vec![0u8; expected.len()];
    image.read_ram_into(0, &mut back).unwrap();
    assert!(back == expected, "the image holds memory as of the cut");
}

/// A thread standing in for the guest: rewrites one word per page of the
/// first `chunks` chunks of `mem`, pass after pass, until told to stop.
struct Guest {
    stop: Arc<AtomicBool>,
    passes: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<Duration>>,
}

impl Drop for Guest {
    /// Never outlives the memory it writes, even when a test fails.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Guest {
    fn start(mem: &Mem, chunks: usize) -> Guest {
        let (ptr, len) = (mem.bytes().as_ptr() as usize, chunks * CHUNK as usize);
        let stop = Arc::new(AtomicBool::new(false));
        let passes = Arc::new(AtomicU64::new(0));
        let (s, p) = (stop.clone(), passes.clone());
        let thread = std::thread::spawn(move || {
            // The longest time between two page writes: what this guest felt.
            let mut longest = Duration::ZERO;
            let mut last = Instant::now();
            let mut pass = 0u64;
            while !s.load(Ordering::Relaxed) {
                pass += 1;
                for off in (0..len).step_by(4096) {
                    let q = (ptr + off) as *mut u64;
                    // SAFETY: inside the test mapping, which outlives this
                    // thread (joined before the mapping is dropped).
                    unsafe { q.write_volatile(!pass) };
                    let now = Instant::now();
                    longest = longest.max(now - last);
                    last = now;
                }
                p.store(pass, Ordering::Relaxed);
            }
            longest
        });
        Guest {
            stop,
            passes,
            thread: Some(thread),
        }
    }

    fn passes(&self) -> u64 {
        self.passes.load(Ordering::Relaxed)
    }

    /// Stops it; returns its longest gap between two page writes.
    fn stop(mut self) -> Duration {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap()
    }
}

/// Whether the destination takes data now, and whether its writes were
/// interrupted.
#[derive(Default)]
struct Gate {
    state: Mutex<(bool, bool)>, // (open, interrupted)
    cv: Condvar,
}

impl Gate {
    fn open(&self) {
        self.state.lock().unwrap().0 = true;
        self.cv.notify_all();
    }
    fn interrupted(&self) -> bool {
        self.state.lock().unwrap().1
    }
}

/// An image in memory behind a gate: writes block while it is closed, until
/// it opens or the capture interrupts them; each write may also take `delay`.
struct GatedSink {
    bytes: Arc<Mutex<Vec<u8>>>,
    gate: Arc<Gate>,
    delay: Duration,
    finished: Arc<AtomicBool>,
}

impl GatedSink {
    fn new(open: bool, delay: Duration) -> (GatedSink, Arc<Gate>, Arc<Mutex<Vec<u8>>>) {
        let gate = Arc::new(Gate::default());
        gate.state.lock().unwrap().0 = open;
        let bytes = Arc::new(Mutex::new(Vec::new()));
        let sink = GatedSink {
            bytes: bytes.clone(),
            gate: gate.clone(),
            delay,
            finished: Arc::new(AtomicBool::new(false)),
        };
        (sink, gate, bytes)
    }

    fn pass(&self) -> std::io::Result<()> {
        let mut st = self.gate.state.lock().unwrap();
        while !st.0 && !st.1 {
            st = self.gate.cv.wait(st).unwrap();
        }
        if st.1 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::BrokenPipe,
                "interrupted",
            ));
        }
        drop(st);
        std::thread::sleep(self.delay);
        Ok(())
    }
}

impl livesnap::Sink for GatedSink {
    fn begin(&mut self, len: u64) -> std::io::Result<()> {
        self.bytes.lock().unwrap().resize(len as usize, 0);
        Ok(())
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.pass()?;
        let mut v = self.bytes.lock().unwrap();
        v[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn finish(&mut self, _: &livesnap::ImageSummary) -> std::io::Result<()> {
        self.finished.store(true, Ordering::SeqCst);
        Ok(())
    }
    fn abort(&mut self) {}
    fn interrupter(&self) -> Option<livesnap::Interrupter> {
        let gate = self.gate.clone();
        Some(Box::new(move || {
            gate.state.lock().unwrap().1 = true;
            gate.cv.notify_all();
        }))
    }
}

#[test]
fn a_destination_that_stops_reading_never_stops_the_guest() {
    let opts = WpOptions {
        pool_bytes: 2 * CHUNK,
        pool_max_bytes: 4 * CHUNK,
        stall_limit: Duration::from_millis(300),
        ..WpOptions::default()
    };
    let Some(run) = start(3, false, Duration::ZERO, opts) else {
        return;
    };
    let (capture, counters, gate) = (run.capture, run.counters, run.gate);
    let guest = Guest::start(&run.mem, LEN / CHUNK as usize);
    run.sender.send(b"state".to_vec());
    let t = Instant::now();
    let r = capture.wait();
    assert!(
        matches!(r, Err(SnapError::DestinationStalled(_))),
        "the capture is abandoned: {r:?}"
    );
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "ended {:?} after the cut",
        t.elapsed()
    );
    assert!(gate.interrupted(), "the blocked write was interrupted");
    // The guest runs on, unprotected, and was never stopped for long.
    let before = guest.passes();
    std::thread::sleep(Duration::from_millis(200));
    assert!(guest.passes() > before, "the guest makes progress after");
    let longest = guest.stop();
    assert!(
        longest < Duration::from_secs(1),
        "longest gap the guest felt: {longest:?}"
    );
    let w = counters.waits.buffer.summary();
    assert!(w.count >= 1 && w.max_us >= 300_000, "{w:?}");
    assert_eq!(counters.pool_grown.load(Ordering::Relaxed), 2);
    // The record of changes is intact: the next capture is a full one, and works.
    let dir = tempfile::tempdir().unwrap();
    let prepared = prepare_wp_capture(
        &run.engine,
        livesnap::Destination::file(dir.path().join("next.snap")),
        WpOptions::default(),
    );
    let (capture, sender, _) = prepared.unwrap().start_deferred().unwrap();
    sender.send(b"state".to_vec());
    capture.wait().unwrap();
}

#[test]
fn cancel_ends_a_capture_whose_destination_stopped_reading() {
    let opts = WpOptions {
        pool_bytes: 2 * CHUNK,
        stall_limit: Duration::from_secs(600),
        ..WpOptions::default()
    };
    let Some(run) = start(4, false, Duration::ZERO, opts) else {
        return;
    };
    let (capture, counters, gate) = (run.capture, run.counters, run.gate);
    let guest = Guest::start(&run.mem, LEN / CHUNK as usize);
    run.sender.send(b"state".to_vec());
    // Wait until the guest waits for a buffer: the pool is full.
    let t = Instant::now();
    while counters.chunks_by_fault.load(Ordering::Relaxed) < 2 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the guest never faulted"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(100));
    let t = Instant::now();
    capture.cancel();
    let r = capture.wait();
    let took = t.elapsed();
    assert!(matches!(r, Err(SnapError::Cancelled)), "{r:?}");
    assert!(took < Duration::from_secs(1), "cancel took {took:?}");
    assert!(gate.interrupted(), "the blocked write was interrupted");
    let before = guest.passes();
    std::thread::sleep(Duration::from_millis(200));
    assert!(guest.passes() > before, "the guest makes progress after");
    guest.stop();
}

#[test]
fn a_destination_that_resumes_in_time_gets_a_consistent_image() {
    let opts = WpOptions {
        pool_bytes: 4 * CHUNK,
        stall_limit: Duration::from_secs(30),
        ..WpOptions::default()
    };
    let Some(run) = start(5, false, Duration::ZERO, opts) else {
        return;
    };
    let (capture, counters, gate) = (run.capture, run.counters, run.gate);
    // A hot set of two chunks: it fits in the pool, so the guest never waits.
    let guest = Guest::start(&run.mem, 2);
    run.sender.send(b"state".to_vec());
    std::thread::sleep(Duration::from_millis(300));
    let during = guest.passes();
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        guest.passes() > during,
        "the guest runs while the destination takes nothing"
    );
    gate.open();
    capture.wait().unwrap();
    guest.stop();
    assert!(run.finished.load(Ordering::SeqCst));
    assert_eq!(counters.chunks_by_fault.load(Ordering::Relaxed), 2);
    holds_memory_at_the_cut(&run.bytes, &run.expected);
}

/// What a finished capture leaves: its counters, what the destination holds
/// and memory as of the cut.
type Finished = (Arc<livesnap::wp::WpCounters>, Arc<Mutex<Vec<u8>>>, Vec<u8>);

/// A capture with `opts` into a destination that takes `write_ms` a write,
/// run to its end while a guest writes over all of RAM; its counters, what
/// the destination holds and memory as of the cut (`None` without
/// userfaultfd write-protect).
fn through_a_writing_guest(seed: u64, write_ms: u64, opts: WpOptions) -> Option<Finished> {
    let run = start(seed, true, Duration::from_millis(write_ms), opts)?;
    let guest = Guest::start(&run.mem, LEN / CHUNK as usize);
    run.sender.send(b"state".to_vec());
    run.capture.wait().unwrap();
    guest.stop();
    Some((run.counters, run.bytes, run.expected))
}

#[test]
fn a_fault_waits_for_a_buffer_and_the_pool_grows_toward_its_cap() {
    let opts = WpOptions {
        pool_bytes: CHUNK,
        pool_max_bytes: 3 * CHUNK,
        stall_limit: Duration::from_secs(30),
        ..WpOptions::default()
    };
    // A destination slower than the guest: 5 ms a write.
    let Some((counters, bytes, expected)) = through_a_writing_guest(6, 5, opts) else {
        return;
    };
    let buffer = counters.waits.buffer.summary();
    let all = counters.waits.all.summary();
    assert!(buffer.count >= 1, "a fault waited for a buffer: {buffer:?}");
    assert_eq!(
        all.count,
        counters.faults.load(Ordering::Relaxed),
        "{all:?}"
    );
    assert!(all.max_us >= buffer.max_us);
    assert_eq!(
        counters.pool_grown.load(Ordering::Relaxed),
        2,
        "grown to its cap, not beyond"
    );
    assert!(counters.pool_high_water.load(Ordering::Relaxed) <= 3 * CHUNK);
    holds_memory_at_the_cut(&bytes, &expected);
}

/// Whether files in `dir` can be opened for direct I/O.
fn direct_io_in(dir: &std::path::Path) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(dir.join("probe"))
        .and_then(|_| std::fs::remove_file(dir.join("probe")))
        .is_ok()
}

#[test]
fn direct_io_to_a_file_up_to_a_short_last_chunk() {
    let Some(uffd) = uffd_wp() else { return };
    // Three whole chunks and three pages: the last chunk is short, and the
    // device state after it has an odd length.
    let len = 3 * CHUNK as usize + 3 * 4096;
    let mut mem = Mem::new(4 * CHUNK as usize);
    fill_dense(mem.words_mut(), 8);
    mem.bytes_mut()[4096..8192].fill(0); // a hole
    let expected = mem.bytes()[..len].to_vec();
    let engine = WpEngine::with_uffd(uffd, &[mem.range(0, len, 0x4000_0000)]).unwrap();
    // Next to the test binary: on the build's disk, not a tmpfs.
    let base = std::env::current_exe().unwrap();
    let dir = tempfile::tempdir_in(base.parent().unwrap()).unwrap();
    let dest = dir.path().join("tail.snap");
    let prepared = prepare_wp_capture(
        &engine,
        livesnap::Destination::file(&dest),
        WpOptions::default(),
    )
    .unwrap();
    let (capture, sender, counters) = prepared.start_deferred().unwrap();
    let guest = Guest::start(&mem, 1);
    sender.send(b"odd-length state".to_vec());
    let stats = capture.wait().unwrap();
    guest.stop();
    assert_eq!(
        counters.direct_io.load(Ordering::Relaxed),
        direct_io_in(dir.path()),
        "direct I/O wherever the file system allows it"
    );
    assert_eq!(stats.zero_pages, 1);
    let image = Image::open(&dest).unwrap();
    assert_eq!(image.device_state().unwrap(), b"odd-length state");
    let mut back = vec![0u8; len];
    image.read_ram_into(0, &mut back).unwrap();
    assert!(back == expected, "the image holds memory as of the cut");
}

#[test]
fn a_failing_destination_fails_the_capture_and_blocks_nobody() {
    let Some(uffd) = uffd_wp() else { return };
    let mut mem = Mem::new(LEN);
    fill_dense(mem.words_mut(), 10);
    let engine = WpEngine::with_uffd(uffd, &[mem.range(0, LEN, 0)]).unwrap();
    // The destination breaks after some writes, with the handler's buffers
    // and the writer's own chunks both under way.
    struct Failing(u32);
    impl livesnap::Sink for Failing {
        fn write_at(&mut self, _: &[u8], _: u64) -> std::io::Result<()> {
            self.0 += 1;
            std::thread::sleep(Duration::from_millis(1));
            if self.0 > 6 {
                return Err(std::io::Error::other("disk on fire"));
            }
            Ok(())
        }
        fn finish(&mut self, _: &livesnap::ImageSummary) -> std::io::Result<()> {
            Ok(())
        }
        fn abort(&mut self) {}
    }
    let opts = WpOptions {
        pool_bytes: 2 * CHUNK,
        ..WpOptions::default()
    };
    let prepared = prepare_wp_capture(
        &engine,
        livesnap::Destination::Sink(Box::new(Failing(0))),
        opts,
    )
    .unwrap();
    let (capture, sender, _) = prepared.start_deferred().unwrap();
    let guest = Guest::start(&mem, LEN / CHUNK as usize);
    sender.send(b"state".to_vec());
    let r = capture.wait();
    assert!(
        matches!(&r, Err(e) if e.to_string().contains("disk on fire")),
        "{r:?}"
    );
    let before = guest.passes();
    std::thread::sleep(Duration::from_millis(200));
    assert!(guest.passes() > before, "the guest makes progress after");
    guest.stop();
}

#[test]
fn the_pool_grows_ahead_of_a_guest_faster_than_its_destination_while_memory_allows() {
    // keep_free_percent 100: the host has no memory to spare, no growth;
    // 0: the pool grows toward the cap (the whole RAM) as the guest writes.
    for keep_free in [100u8, 0] {
        let opts = WpOptions {
            pool_bytes: CHUNK,
            pool_max_bytes: LEN as u64,
            pool_keep_free_percent: keep_free,
            stall_limit: Duration::from_secs(30),
            ..WpOptions::default()
        };
        // A destination far slower than the guest: 20 ms a write.
        let Some((counters, bytes, expected)) = through_a_writing_guest(7, 20, opts) else {
            return;
        };
        let grown = counters.pool_grown.load(Ordering::Relaxed);
        let high = counters.pool_high_water.load(Ordering::Relaxed);
        if keep_free == 100 {
            assert_eq!(grown, 0, "no memory to spare");
            assert!(high <= CHUNK, "{high}");
        } else {
            assert!(grown >= 1, "grown ahead of the faults");
            assert!(high > CHUNK, "the faults took grown buffers: {high}");
            assert!(
                grown < (LEN as u64 / CHUNK),
                "never beyond the cap: {grown}"
            );
        }
        holds_memory_at_the_cut(&bytes, &expected);
    }
}
