//! Captures into a [`Sink`] and reading back through a [`Source`]: same
//! bytes as the file path, exactly one `finish` or `abort`, and the same
//! refusal of damaged images as `Image::open`.

mod common;

use std::io;
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use common::{fill_dense, fill_sparse, same_bytes_but_identity, Mem};
use livesnap::{
    capture_stopped, prepare_fork_capture, Capture, CaptureStatus, ForkOptions, Image,
    ImageSummary, RamRange, Sink, SnapError, Source, SourceImage, HEADER_SIZE, MAX_DEVICE_STATE,
};
use proptest::prelude::*;

const MIB: usize = 1 << 20;

/// What a [`VecSink`] saw.
#[derive(Default)]
struct Log {
    bytes: Vec<u8>,
    /// Every call, in order: "begin", "write", "finish", "abort".
    calls: Vec<&'static str>,
    begin_len: Option<u64>,
    /// Extents written, in call order.
    writes: Vec<(u64, u64)>,
    summary: Option<ImageSummary>,
}

impl Log {
    fn count(&self, call: &str) -> usize {
        self.calls.iter().filter(|c| **c == call).count()
    }
}

/// In-memory sink; optionally fails `write_at` once more than `fail_after`
/// bytes would have been written, or fails `finish`, or panics.
#[derive(Clone, Default)]
struct VecSink {
    log: Arc<Mutex<Log>>,
    fail_after: Option<u64>,
    fail_finish: bool,
    panic_on_write: bool,
    /// While set, writes wait: the capture cannot finish before the test lets it.
    hold: Option<Arc<std::sync::atomic::AtomicBool>>,
}

impl VecSink {
    /// Tolerates poisoning: a panicking `write_at` poisons the lock before
    /// the engine calls `abort`.
    fn log(&self) -> MutexGuard<'_, Log> {
        self.log.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Sink for VecSink {
    fn begin(&mut self, image_len: u64) -> io::Result<()> {
        let mut l = self.log();
        assert!(l.calls.is_empty(), "begin after {:?}", l.calls);
        l.calls.push("begin");
        l.begin_len = Some(image_len);
        Ok(())
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        while self
            .hold
            .as_ref()
            .is_some_and(|h| h.load(std::sync::atomic::Ordering::SeqCst))
        {
            std::thread::sleep(Duration::from_millis(1));
        }
        let mut l = self.log();
        assert_eq!(l.calls.first(), Some(&"begin"));
        assert!(!l.calls.contains(&"finish") && !l.calls.contains(&"abort"));
        assert!(!buf.is_empty());
        l.calls.push("write");
        if self.panic_on_write {
            panic!("sink exploded");
        }
        let so_far: u64 = l.writes.iter().map(|w| w.1).sum();
        if self
            .fail_after
            .is_some_and(|n| so_far + buf.len() as u64 > n)
        {
            return Err(io::Error::other("injected sink failure"));
        }
        let end = offset + buf.len() as u64;
        assert!(end <= l.begin_len.unwrap(), "write past the image end");
        for &(o, n) in &l.writes {
            assert!(end <= o || offset >= o + n, "overlapping writes");
        }
        l.writes.push((offset, buf.len() as u64));
        if l.bytes.len() < end as usize {
            l.bytes.resize(end as usize, 0);
        }
        l.bytes[offset as usize..end as usize].copy_from_slice(buf);
        Ok(())
    }

    fn finish(&mut self, summary: &ImageSummary) -> io::Result<()> {
        let mut l = self.log();
        assert!(!l.calls.contains(&"finish") && !l.calls.contains(&"abort"));
        l.calls.push("finish");
        if self.fail_finish {
            return Err(io::Error::other("injected finish failure"));
        }
        l.bytes.resize(summary.image_len as usize, 0);
        l.summary = Some(summary.clone());
        Ok(())
    }

    fn abort(&mut self) {
        let mut l = self.log();
        assert!(!l.calls.contains(&"finish") || self.fail_finish);
        l.calls.push("abort");
        l.bytes.clear();
    }
}

/// Strict in-memory source: panics if the reader asks for bytes past its
/// length, counts reads, can be made to fail.
struct StrictSource {
    bytes: Vec<u8>,
    fail: bool,
}

impl Source for StrictSource {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let end = offset as usize + buf.len();
        assert!(end <= self.bytes.len(), "read past the source length");
        if self.fail {
            return Err(io::Error::other("injected source failure"));
        }
        buf.copy_from_slice(&self.bytes[offset as usize..end]);
        Ok(())
    }

    fn len(&self) -> u64 {
        self.bytes.len() as u64
    }
}

fn from_bytes(bytes: &[u8]) -> Result<SourceImage, SnapError> {
    Image::from_source(Box::new(StrictSource {
        bytes: bytes.to_vec(),
        fail: false,
    }))
}

fn source_ram(img: &SourceImage) -> Vec<Vec<u8>> {
    (0..img.ranges().len())
        .map(|i| {
            let mut v = vec![0xAAu8; img.ranges()[i].len as usize];
            img.read_ram_into(i, &mut v).unwrap();
            v
        })
        .collect()
}

fn start_to(ranges: &[RamRange], dev: &[u8], sink: &VecSink, opts: ForkOptions) -> Capture {
    prepare_fork_capture(
        ranges,
        livesnap::Destination::Sink(Box::new(sink.clone())),
        opts,
    )
    .unwrap()
    .start(dev.to_vec())
    .unwrap()
}

fn wait_finished(cap: &Capture) {
    let t = Instant::now();
    while !cap.is_finished() {
        assert!(t.elapsed() < Duration::from_secs(60), "capture never ended");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn wait_for_progress(cap: &Capture) {
    let t = Instant::now();
    while cap.progress().bytes_written == 0 && !cap.is_finished() {
        assert!(t.elapsed() < Duration::from_secs(30), "no progress");
        std::thread::sleep(Duration::from_micros(200));
    }
}

fn process_gone(pid: i32) -> bool {
    // SAFETY: signal 0 only checks for existence.
    let r = unsafe { libc::kill(pid, 0) };
    r != 0 && io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
}

#[test]
fn fork_into_sink_holds_memory_as_of_start() {
    let len = 256 * MIB;
    let mut mem = Mem::new(len);
    fill_sparse(&mut mem.bytes_mut()[..64 * MIB], 5, 0x21);
    fill_dense(&mut mem.words_mut()[64 * MIB / 8..], 0xfeed);
    let ranges = [
        mem.range(0, 6 * MIB, 0),
        mem.range(8 * MIB, 64 << 10, 0x1000_0000),
        mem.range(10 * MIB, len - 10 * MIB, 0x1_0000_0000),
    ];
    let dev: Vec<u8> = (0..10_000u32).map(|i| (i * 13) as u8).collect();
    let want = mem.bytes().to_vec();
    // The file path on the same memory, for a byte-for-byte comparison.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ref.img");
    capture_stopped(&ranges, &dev, &file).unwrap();

    // The sink holds every write until the overwrite below is done, so the
    // capture is certainly still running while the "guest" rewrites its RAM.
    let hold = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sink = VecSink {
        hold: Some(hold.clone()),
        ..Default::default()
    };
    let (tx, rx) = mpsc::channel();
    let opts = ForkOptions {
        on_done: Some(Box::new(move |r| {
            tx.send(r.as_ref().map(|s| s.file_len).map_err(|e| e.to_string()))
                .unwrap();
        })),
        ..Default::default()
    };
    let cap = start_to(&ranges, &dev, &sink, opts);
    let pid = cap.child_pid();
    // The guest "resumes" and rewrites all of its RAM at once.
    mem.bytes_mut().fill(0xEE);
    assert!(
        !cap.is_finished(),
        "capture ended before the overwrite: test proves nothing"
    );
    hold.store(false, std::sync::atomic::Ordering::SeqCst);
    let stats = cap.wait().unwrap();
    assert!(process_gone(pid), "child not reaped");
    assert_eq!(rx.recv().unwrap(), Ok(stats.file_len));

    let log = sink.log();
    assert_eq!(log.count("begin"), 1);
    assert_eq!(log.count("finish"), 1);
    assert_eq!(log.count("abort"), 0);
    assert_eq!(log.calls.last(), Some(&"finish"));
    assert_eq!(log.begin_len, Some(stats.file_len));
    // Header last, zero pages never written.
    assert_eq!(log.writes.last(), Some(&(0, HEADER_SIZE)));
    let total: u64 = log.writes.iter().map(|w| w.1).sum();
    assert_eq!(
        total,
        stats.bytes_written + stats.device_state_bytes + HEADER_SIZE
    );
    assert!(stats.zero_pages > 0 && stats.normal_pages > 0);
    let s = log.summary.clone().unwrap();
    assert_eq!(
        (
            s.image_len,
            s.ram_bytes,
            s.bytes_written,
            s.zero_pages,
            s.normal_pages,
            s.device_state_bytes
        ),
        (
            stats.file_len,
            stats.ram_bytes,
            stats.bytes_written,
            stats.zero_pages,
            stats.normal_pages,
            stats.device_state_bytes
        )
    );
    assert_eq!(s.fork_time, stats.fork_time);
    assert_eq!(s.child_cpu_time, stats.child_cpu_time);
    assert!(
        same_bytes_but_identity(&log.bytes, &std::fs::read(&file).unwrap()),
        "sink and file images differ"
    );

    let img = Image::from_source(Box::new(log.bytes.clone())).unwrap();
    let ram = source_ram(&img);
    assert!(ram[0] == want[..6 * MIB]);
    assert!(ram[1] == want[8 * MIB..8 * MIB + (64 << 10)]);
    assert!(ram[2] == want[10 * MIB..], "image holds post-start writes");
    assert_eq!(img.device_state().unwrap(), dev);
    let got: Vec<(u64, u64)> = img.ranges().iter().map(|r| (r.gpa, r.len)).collect();
    let want_ranges: Vec<(u64, u64)> = ranges.iter().map(|r| (r.gpa(), r.len())).collect();
    assert_eq!(got, want_ranges);
}

#[test]
fn stopped_into_sink_matches_the_file() {
    let mut mem = Mem::new(32 * MIB);
    fill_sparse(mem.bytes_mut(), 3, 0x11);
    fill_dense(&mut mem.words_mut()[(4 * MIB / 8)..(9 * MIB / 8)], 77);
    let ranges = [
        mem.range(0, 20 * MIB, 0),
        mem.range(20 * MIB, 12 * MIB, 1 << 32),
    ];
    let dev = vec![3u8; 4097];
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("stopped.img");
    let sf = capture_stopped(&ranges, &dev, &file).unwrap();

    let mut sink = VecSink::default();
    let ss = capture_stopped(&ranges, &dev, &mut sink).unwrap();
    assert_eq!(
        (ss.bytes_written, ss.zero_pages, ss.file_len, ss.ram_bytes),
        (sf.bytes_written, sf.zero_pages, sf.file_len, sf.ram_bytes)
    );
    let log = sink.log();
    assert_eq!(
        log.calls
            .iter()
            .filter(|c| **c != "write")
            .collect::<Vec<_>>(),
        vec![&"begin", &"finish"]
    );
    assert_eq!(log.writes.last(), Some(&(0, HEADER_SIZE)));
    assert!(same_bytes_but_identity(
        &log.bytes,
        &std::fs::read(&file).unwrap()
    ));
    assert_eq!(
        log.summary.as_ref().unwrap().bytes_written,
        ss.bytes_written
    );

    let img = from_bytes(&log.bytes).unwrap();
    let ram = source_ram(&img);
    assert!(ram[0] == mem.bytes()[..20 * MIB]);
    assert!(ram[1] == mem.bytes()[20 * MIB..]);
    assert_eq!(img.device_state().unwrap(), dev);
    assert_eq!(img.file_len(), ss.file_len);
    assert_eq!(img.device_state_len(), dev.len() as u64);
    // The file reader sees the same.
    let fimg = Image::open(&file).unwrap();
    assert_eq!(fimg.ranges(), img.ranges());
}

#[test]
fn failing_write_fails_the_fork_capture_and_aborts_once() {
    let len = 64 * MIB;
    let mut mem = Mem::new(len);
    fill_dense(mem.words_mut(), 3);
    let sink = VecSink {
        fail_after: Some(3 * MIB as u64),
        ..Default::default()
    };
    let (tx, rx) = mpsc::channel();
    let opts = ForkOptions {
        on_done: Some(Box::new(move |r| {
            tx.send(r.as_ref().map(|_| ()).map_err(|e| e.to_string()))
                .unwrap();
        })),
        ..Default::default()
    };
    let cap = start_to(&[mem.range(0, len, 0)], b"dev", &sink, opts);
    let pid = cap.child_pid();
    wait_finished(&cap);
    // abort precedes the status change.
    assert_eq!(sink.log().count("abort"), 1);
    match cap.status() {
        CaptureStatus::Failed(m) => assert!(m.contains("injected sink failure"), "{m}"),
        s => panic!("unexpected status {s:?}"),
    }
    let err = cap.wait().unwrap_err();
    assert!(err.to_string().contains("injected sink failure"), "{err}");
    assert!(rx
        .recv()
        .unwrap()
        .unwrap_err()
        .contains("injected sink failure"));
    assert!(process_gone(pid), "child not reaped");
    let log = sink.log();
    assert_eq!(log.count("abort"), 1);
    assert_eq!(log.count("finish"), 0);
    assert_eq!(log.calls.last(), Some(&"abort"));
}

#[test]
fn failing_write_fails_stop_and_copy_and_aborts_once() {
    let mut mem = Mem::new(8 * MIB);
    fill_dense(mem.words_mut(), 8);
    let mut sink = VecSink {
        fail_after: Some(MIB as u64),
        ..Default::default()
    };
    let err = capture_stopped(&[mem.range(0, 8 * MIB, 0)], b"d", &mut sink).unwrap_err();
    assert!(err.to_string().contains("injected sink failure"), "{err}");
    let log = sink.log();
    assert_eq!((log.count("abort"), log.count("finish")), (1, 0));
}

#[test]
fn failing_finish_fails_the_capture_then_aborts() {
    let mut mem = Mem::new(4 * MIB);
    fill_sparse(mem.bytes_mut(), 2, 5);
    let ranges = [mem.range(0, 4 * MIB, 0)];
    let sink = VecSink {
        fail_finish: true,
        ..Default::default()
    };
    let cap = start_to(&ranges, b"dev", &sink, ForkOptions::default());
    let err = cap.wait().unwrap_err();
    assert!(err.to_string().contains("injected finish failure"), "{err}");
    assert_eq!(
        sink.log().calls.iter().rev().take(2).collect::<Vec<_>>(),
        vec![&"abort", &"finish"]
    );

    let mut sink = VecSink {
        fail_finish: true,
        ..Default::default()
    };
    let err = capture_stopped(&ranges, b"dev", &mut sink).unwrap_err();
    assert!(err.to_string().contains("injected finish failure"), "{err}");
    let log = sink.log();
    assert_eq!((log.count("finish"), log.count("abort")), (1, 1));
}

#[test]
fn cancel_aborts_the_sink() {
    let len = 256 * MIB;
    let mut mem = Mem::new(len);
    fill_dense(mem.words_mut(), 9);
    let sink = VecSink::default();
    let cap = start_to(&[mem.range(0, len, 0)], b"x", &sink, ForkOptions::default());
    let pid = cap.child_pid();
    wait_for_progress(&cap);
    cap.cancel();
    wait_finished(&cap);
    assert_eq!(cap.status(), CaptureStatus::Cancelled);
    assert!(matches!(cap.wait(), Err(SnapError::Cancelled)));
    assert!(process_gone(pid), "child not reaped");
    let log = sink.log();
    assert_eq!((log.count("abort"), log.count("finish")), (1, 0));
    assert_eq!(log.calls.last(), Some(&"abort"));
}

#[test]
fn killed_child_fails_and_aborts_the_sink() {
    let len = 256 * MIB;
    let mut mem = Mem::new(len);
    fill_dense(mem.words_mut(), 5);
    let sink = VecSink::default();
    let cap = start_to(
        &[mem.range(0, len, 0)],
        b"new",
        &sink,
        ForkOptions::default(),
    );
    wait_for_progress(&cap);
    // SAFETY: sends SIGKILL to our own, not yet reaped, capture child.
    assert_eq!(unsafe { libc::kill(cap.child_pid(), libc::SIGKILL) }, 0);
    wait_finished(&cap);
    assert!(
        matches!(cap.status(), CaptureStatus::Failed(m) if m.contains("signal 9")),
        "{:?}",
        cap.status()
    );
    assert!(matches!(cap.wait(), Err(SnapError::ChildFailed(_))));
    let log = sink.log();
    assert_eq!((log.count("abort"), log.count("finish")), (1, 0));
}

#[test]
fn panicking_sink_fails_the_capture_and_aborts() {
    let mut mem = Mem::new(4 * MIB);
    fill_dense(mem.words_mut(), 1);
    let sink = VecSink {
        panic_on_write: true,
        ..Default::default()
    };
    let cap = start_to(
        &[mem.range(0, 4 * MIB, 0)],
        b"",
        &sink,
        ForkOptions::default(),
    );
    let pid = cap.child_pid();
    wait_finished(&cap);
    assert!(matches!(cap.status(), CaptureStatus::Failed(m) if m.contains("panicked")));
    assert!(cap.wait().is_err());
    assert!(process_gone(pid), "child not reaped");
    assert_eq!(sink.log().count("abort"), 1);
}

#[test]
fn unstarted_or_refused_captures_abort_the_sink() {
    let mem = Mem::new(MIB);
    // Prepared, never started.
    let sink = VecSink::default();
    let p = prepare_fork_capture(
        &[mem.range(0, MIB, 0)],
        livesnap::Destination::Sink(Box::new(sink.clone())),
        ForkOptions::default(),
    )
    .unwrap();
    drop(p);
    assert_eq!(sink.log().calls, vec!["abort"]);
    // Invalid ranges.
    let sink = VecSink::default();
    let e = prepare_fork_capture(
        &[mem.range(0, 100, 0)],
        livesnap::Destination::Sink(Box::new(sink.clone())),
        ForkOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(e, SnapError::InvalidInput(_)), "{e:?}");
    assert_eq!(sink.log().calls, vec!["abort"]);
    // Device state too large: refused by start().
    let sink = VecSink::default();
    let p = prepare_fork_capture(
        &[mem.range(0, MIB, 0)],
        livesnap::Destination::Sink(Box::new(sink.clone())),
        ForkOptions::default(),
    )
    .unwrap();
    let e = p.start(vec![0; MAX_DEVICE_STATE as usize + 1]).unwrap_err();
    assert!(matches!(e, SnapError::DeviceStateTooLarge { .. }), "{e:?}");
    assert_eq!(sink.log().calls, vec!["abort"]);
    // Stop-and-copy with invalid ranges.
    let mut sink = VecSink::default();
    let e = capture_stopped(&[], b"", &mut sink).unwrap_err();
    assert!(matches!(e, SnapError::InvalidInput(_)), "{e:?}");
    assert_eq!(sink.log().calls, vec!["abort"]);
}

// ---- Reading through a Source ----

const OFF_DEV_OFFSET: usize = 32;
const OFF_DEV_LEN: usize = 40;
const OFF_RANGES: usize = 64;
const OFF_CRC: usize = 4092;

/// A small valid image (two ranges, 5000 bytes of device state), via a sink.
fn valid_image() -> Vec<u8> {
    let mut mem = Mem::new(MIB);
    fill_sparse(mem.bytes_mut(), 2, 0x42);
    let ranges = [
        mem.range(0, 16 << 10, 0),
        mem.range(64 << 10, 8 << 10, 1 << 30),
    ];
    let dev: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
    let mut sink = VecSink::default();
    capture_stopped(&ranges, &dev, &mut sink).unwrap();
    let bytes = sink.log().bytes.clone();
    assert_eq!(from_bytes(&bytes).unwrap().device_state().unwrap(), dev);
    bytes
}

fn put_u64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

fn reseal(b: &mut [u8]) {
    let crc = crc32fast::hash(&b[..OFF_CRC]);
    b[OFF_CRC..OFF_CRC + 4].copy_from_slice(&crc.to_le_bytes());
}

#[test]
fn source_truncated_and_trailing_are_refused() {
    let good = valid_image();
    for len in [good.len() - 1, good.len() - 5000, 4096, 4095, 100, 7, 0] {
        let e = from_bytes(&good[..len]).unwrap_err();
        assert!(matches!(e, SnapError::Truncated { .. }), "len {len}: {e:?}");
    }
    let mut longer = good.clone();
    longer.push(0);
    let e = from_bytes(&longer).unwrap_err();
    assert!(matches!(e, SnapError::TrailingData { .. }), "{e:?}");
}

#[test]
fn source_flipped_bytes_are_refused() {
    let good = valid_image();
    for off in [20usize, 30, OFF_RANGES + 3, 2000, OFF_CRC + 1] {
        let mut b = good.clone();
        b[off] ^= 0x04;
        let e = from_bytes(&b).unwrap_err();
        assert!(
            matches!(e, SnapError::HeaderChecksum { .. }),
            "off {off}: {e:?}"
        );
    }
    let mut b = good.clone();
    let n = b.len();
    b[n - 10] ^= 0xff;
    let e = from_bytes(&b).unwrap_err();
    assert!(matches!(e, SnapError::DeviceStateChecksum { .. }), "{e:?}");
}

#[test]
fn source_foreign_bytes_are_refused() {
    let mut b = valid_image();
    b[0] = b'X';
    assert!(matches!(from_bytes(&b), Err(SnapError::BadMagic)));
    let elf = std::fs::read("/proc/self/exe").unwrap();
    assert!(matches!(from_bytes(&elf), Err(SnapError::BadMagic)));
    assert!(matches!(
        from_bytes(b"hello world\n"),
        Err(SnapError::BadMagic)
    ));
}

#[test]
fn source_bad_headers_are_refused() {
    let good = valid_image();
    let mut b = good.clone();
    b[8] = 2;
    reseal(&mut b);
    assert!(matches!(
        from_bytes(&b),
        Err(SnapError::UnsupportedVersion {
            found: 2,
            supported: 1
        })
    ),);
    let mut b = good.clone();
    put_u64(&mut b, OFF_DEV_LEN, 1 << 50);
    reseal(&mut b);
    let e = from_bytes(&b).unwrap_err();
    assert!(
        matches!(e, SnapError::DeviceStateTooLarge { len, max } if len == 1 << 50 && max == MAX_DEVICE_STATE),
        "{e:?}"
    );
    let patches: Vec<(usize, u64)> = vec![
        (OFF_RANGES + 24, 0),
        (OFF_RANGES + 16, 0),
        (OFF_RANGES + 8, 4096 + 1),
        (OFF_RANGES + 24 + 16, 1 << 40),
        (OFF_DEV_OFFSET, HEADER_SIZE),
        (OFF_RANGES + 24, u64::MAX - 4095),
    ];
    for (off, v) in patches {
        let mut b = good.clone();
        put_u64(&mut b, off, v);
        reseal(&mut b);
        let e = from_bytes(&b).unwrap_err();
        assert!(
            matches!(e, SnapError::InvalidLayout(_)),
            "patch {off}={v:#x}: {e:?}"
        );
    }
}

#[test]
fn source_read_errors_are_reported() {
    let e = Image::from_source(Box::new(StrictSource {
        bytes: valid_image(),
        fail: true,
    }))
    .unwrap_err();
    assert!(
        matches!(&e, SnapError::Io { source, .. } if source.to_string().contains("injected source failure")),
        "{e:?}"
    );
}

#[test]
fn source_read_ram_into_checks_its_arguments() {
    let img = from_bytes(&valid_image()).unwrap();
    let mut small = vec![0u8; 4096];
    assert!(matches!(
        img.read_ram_into(0, &mut small),
        Err(SnapError::InvalidInput(_))
    ));
    assert!(matches!(
        img.read_ram_into(9, &mut small),
        Err(SnapError::InvalidInput(_))
    ));
    let src = img.into_source();
    assert_eq!(src.len(), valid_image().len() as u64);
}

/// Opening must never panic; whatever opens must also read without panicking.
fn exercise(bytes: &[u8]) -> Result<(), SnapError> {
    let img = from_bytes(bytes)?;
    img.device_state()?;
    source_ram(&img);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn source_arbitrary_bytes_never_panic(mut bytes in proptest::collection::vec(any::<u8>(), 0..9000),
                                          magic in any::<bool>()) {
        if magic && bytes.len() >= 8 {
            bytes[..8].copy_from_slice(b"SNAPVMM\0");
        }
        let _ = exercise(&bytes);
    }

    #[test]
    fn source_corrupted_images_never_panic(
        flips in proptest::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 0..4),
        cut in proptest::option::of(any::<prop::sample::Index>()),
        reseal_header in any::<bool>(),
    ) {
        let mut b = valid_image();
        for (i, x) in &flips {
            let at = i.index(b.len());
            b[at] ^= x;
        }
        if reseal_header {
            reseal(&mut b);
        }
        if let Some(c) = cut {
            let n = c.index(b.len());
            b.truncate(n);
        }
        let res = exercise(&b);
        if flips.len() == 1 && !reseal_header && cut.is_none() {
            let at = flips[0].0.index(b.len());
            if at < HEADER_SIZE as usize || at >= b.len() - 5000 {
                prop_assert!(res.is_err(), "flip at {} not detected", at);
            }
        }
    }
}
