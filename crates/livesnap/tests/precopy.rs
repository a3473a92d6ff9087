//! Pre-copy then post-copy over a socket pair: a pass sends RAM while a
//! "guest" thread goes on writing it; after the cut the target drops what
//! was written since it was sent and gets it again; the target's RAM is
//! the source's at the cut. A guest that rewrites everything ends the pass
//! early; `switch_now` ends it at once; a target that goes away fails it.

mod common;

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use common::{fill_from, fill_sparse, socket_pair, uffd_missing_ok, Mem};
use livesnap::postcopy::{receive_switch, PostcopySender, SourceEvent, Switch};
use livesnap::precopy::{Precopy, PrecopyEnd, PrecopyEvent, WriteLog};

const MIB: usize = 1 << 20;
const CHUNK: usize = livesnap::CHUNK as usize;
const T: Duration = Duration::from_secs(60);

/// The record a write-protect engine keeps: a chunk is marked before the
/// write to it lands.
struct Log {
    base: u64,
    written: Vec<AtomicBool>,
    all: bool,
}

impl Log {
    fn new(mem: &Mem, all: bool) -> Arc<Log> {
        let n = mem.bytes().len() / CHUNK;
        Arc::new(Log {
            base: mem.bytes().as_ptr() as u64,
            written: (0..n).map(|_| AtomicBool::new(false)).collect(),
            all,
        })
    }
}

impl WriteLog for Log {
    fn written(&self, host: u64) -> bool {
        self.all || self.written[((host - self.base) as usize) / CHUNK].load(Ordering::SeqCst)
    }
}

/// A "guest" writing `chunks` of `mem` over and over (marking each in `log`
/// first) until `stop`; it has written each once when this returns.
fn guest(
    mem: &Mem,
    log: &Arc<Log>,
    chunks: Vec<usize>,
    stop: &Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    let (base, log, stop) = (mem.bytes().as_ptr() as usize, log.clone(), stop.clone());
    let (once_tx, once_rx) = mpsc::channel();
    let t = std::thread::spawn(move || {
        let mut round = 0u64;
        loop {
            for &k in &chunks {
                log.written[k].store(true, Ordering::SeqCst);
                for i in (0..CHUNK).step_by(4096 * 7) {
                    let p = (base + k * CHUNK + i) as *mut u64;
                    // SAFETY: inside the test's mapping, which outlives this
                    // thread (joined before the memory is dropped).
                    unsafe { p.write_volatile(round.wrapping_mul(31) + (k * CHUNK + i) as u64) };
                }
            }
            if round == 0 {
                let _ = once_tx.send(());
            }
            round += 1;
            if stop.load(Ordering::SeqCst) {
                return;
            }
        }
    });
    once_rx.recv_timeout(T).unwrap();
    t
}

fn channel<E: Send + 'static>() -> (Box<dyn Fn(E) + Send + Sync>, mpsc::Receiver<E>) {
    let (tx, rx) = mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    (
        Box::new(move |e| {
            let _ = tx.lock().unwrap().send(e);
        }),
        rx,
    )
}

fn start_pass(
    sock: OwnedFd,
    src: &Mem,
    log: &Arc<Log>,
    budget: u64,
) -> (Precopy, mpsc::Receiver<PrecopyEvent>) {
    let (events, rx) = channel();
    let len = src.bytes().len();
    // SAFETY: each test keeps `src` mapped until the pass and the sender
    // that follows are dropped.
    let p = unsafe { Precopy::start(sock, &[src.range(0, len, 0)], log.clone(), budget, events) };
    (p.unwrap(), rx)
}

type Target = std::thread::JoinHandle<livesnap::Result<Switch>>;

/// After the cut: the post-copy phase; the target (reading since the pass
/// began) switches, fills its RAM and ends.
/// `early`: the source hears DONE once every chunk has arrived, before the
/// target placed them (checked by starting the placing only after it).
fn finish_migration(
    pass: Precopy,
    src: &Mem,
    target: Target,
    early: bool,
) -> (PostcopySender, Switch, Mem) {
    let len = src.bytes().len();
    let (events, rx) = channel();
    let done = pass.finish().unwrap();
    // SAFETY: `src` is no longer written (the guest thread was joined) and
    // outlives the sender.
    let s = unsafe {
        PostcopySender::after_precopy(
            done,
            &[src.range(0, len, 0)],
            b"state".to_vec(),
            &[],
            events,
        )
    }
    .unwrap();
    let sw = target.join().unwrap().unwrap();
    assert_eq!(sw.device_state, b"state");
    let dst = Mem::new(len);
    let (mut fill, done_rx) = fill_from(&sw, &[dst.range(0, len, 0)]);
    sw.pages.running().unwrap();
    assert!(matches!(rx.recv_timeout(T).unwrap(), SourceEvent::Switched));
    if early {
        assert!(matches!(
            rx.recv_timeout(T).unwrap(),
            SourceEvent::Completed
        ));
    }
    fill.go();
    done_rx.recv_timeout(T).unwrap().unwrap();
    assert!(sw.pages.done());
    if !early {
        assert!(matches!(
            rx.recv_timeout(T).unwrap(),
            SourceEvent::Completed
        ));
    }
    drop(fill);
    (s, sw, dst)
}

#[test]
fn chunks_written_after_they_were_sent_are_sent_again_and_nothing_else() {
    if !uffd_missing_ok() {
        return;
    }
    let len = 64 * MIB;
    let mut src = Mem::new(len);
    fill_sparse(src.bytes_mut(), 3, 5);
    let log = Log::new(&src, false);
    let stop = Arc::new(AtomicBool::new(false));
    let written = vec![3, 10, 31];
    let g = guest(&src, &log, written.clone(), &stop);
    let (a, b) = socket_pair();
    let target = std::thread::spawn(move || receive_switch(b));
    let (pass, events) = start_pass(a, &src, &log, len as u64);
    match events.recv_timeout(T).unwrap() {
        PrecopyEvent::Ready(end) => assert_eq!(end, PrecopyEnd::AllSent),
        e => panic!("{e:?}"),
    }
    let c = pass.counters();
    assert_eq!(c.chunks_sent.load(Ordering::Relaxed), (len / CHUNK) as u64);
    // The cut: the guest stops for good.
    stop.store(true, Ordering::SeqCst);
    g.join().unwrap();
    // The source lets go as soon as everything arrived, before the placing.
    let (s, sw, dst) = finish_migration(pass, &src, target, true);
    assert!(
        dst.bytes() == src.bytes(),
        "the target's RAM is the source's at the cut"
    );
    let f = sw.pages.figures();
    assert_eq!(f.precopy.chunks_dropped, written.len() as u64, "{f:?}");
    assert_eq!(f.precopy.chunks_kept, (len / CHUNK - written.len()) as u64);
    let c = s.counters();
    let again =
        c.chunks_pushed.load(Ordering::Relaxed) + c.chunks_requested.load(Ordering::Relaxed);
    assert_eq!(
        again,
        written.len() as u64,
        "only the written chunks travel twice"
    );
    assert_eq!(
        c.chunks_rewritten.load(Ordering::Relaxed),
        written.len() as u64
    );
}

#[test]
fn a_guest_that_rewrites_what_was_sent_ends_the_pass_early() {
    if !uffd_missing_ok() {
        return;
    }
    let len = 64 * MIB;
    let mut src = Mem::new(len);
    fill_sparse(src.bytes_mut(), 2, 9);
    let log = Log::new(&src, true);
    let (a, b) = socket_pair();
    let target = std::thread::spawn(move || receive_switch(b));
    let (pass, events) = start_pass(a, &src, &log, 4 * MIB as u64);
    match events.recv_timeout(T).unwrap() {
        PrecopyEvent::Ready(end) => assert_eq!(end, PrecopyEnd::Overtaken),
        e => panic!("{e:?}"),
    }
    let sent = pass.counters().chunks_sent.load(Ordering::Relaxed);
    assert!(
        sent < (len / CHUNK) as u64,
        "the pass stopped early: {sent}"
    );
    let (s, sw, dst) = finish_migration(pass, &src, target, false);
    assert!(dst.bytes() == src.bytes());
    assert_eq!(sw.pages.figures().precopy.chunks_kept, 0);
    assert_eq!(s.counters().chunks_rewritten.load(Ordering::Relaxed), sent);
}

#[test]
fn switch_now_ends_the_pass_and_a_lost_target_fails_it() {
    if !uffd_missing_ok() {
        return;
    }
    let len = 64 * MIB;
    let mut src = Mem::new(len);
    fill_sparse(src.bytes_mut(), 1, 3);
    let log = Log::new(&src, false);
    let (a, b) = socket_pair();
    // Nobody reads yet: the pass blocks on a full socket, then is told to end.
    let (pass, events) = start_pass(a, &src, &log, len as u64);
    std::thread::sleep(Duration::from_millis(100));
    pass.switch_now();
    let target = std::thread::spawn(move || receive_switch(b));
    match events.recv_timeout(T).unwrap() {
        PrecopyEvent::Ready(end) => assert_eq!(end, PrecopyEnd::Asked),
        e => panic!("{e:?}"),
    }
    let (sent, all) = pass.progress();
    assert!(sent < all, "{sent} of {all}");
    let (_s, sw, dst) = finish_migration(pass, &src, target, false);
    assert!(dst.bytes() == src.bytes());
    assert_eq!(sw.pages.figures().precopy.chunks_kept, sent);

    // A target that goes away mid-pass: the pass reports it failed.
    let (a, b) = socket_pair();
    let (pass, events) = start_pass(a, &src, &log, len as u64);
    drop(b);
    match events.recv_timeout(T).unwrap() {
        PrecopyEvent::Failed(why) => assert!(why.contains("cannot send"), "{why}"),
        e => panic!("{e:?}"),
    }
    drop(pass);
    // Dropped (cancelled) mid-pass: it ends without a word.
    let (a, _b) = socket_pair();
    let (pass, events) = start_pass(a, &src, &log, len as u64);
    drop(pass);
    assert!(events.recv_timeout(Duration::from_millis(500)).is_err());
}

#[test]
fn the_write_protect_engine_records_writes_since_its_mark() {
    let mut mem = Mem::new(16 * MIB);
    // Chunks 0-3 hold data; 4-7 were never touched (no pages behind them).
    fill_sparse(&mut mem.bytes_mut()[..8 * MIB], 1, 7);
    let engine = match livesnap::wp::WpEngine::new(&[mem.range(0, 16 * MIB, 0)]) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("skipped: no userfaultfd write-protect here: {e}");
            return;
        }
    };
    let base = mem.bytes().as_ptr() as u64;
    // Before any mark every chunk counts as written (nothing is known).
    assert!(engine.written(base));
    engine.mark().unwrap();
    assert!((0..8).all(|k| !engine.written(base + (k * CHUNK) as u64)));
    // First writes since the mark, recorded before they land (the fault
    // handler lets them through): to data, to a never-touched page, and to
    // a never-touched page read first (the zero page mapped).
    mem.bytes_mut()[CHUNK + 17] ^= 0xff;
    mem.bytes_mut()[5 * CHUNK + 4096 * 3] = 1;
    assert_eq!(mem.bytes()[7 * CHUNK + 64], 0);
    mem.bytes_mut()[7 * CHUNK + 64] = 2;
    for k in 0..8 {
        let w = engine.written(base + (k * CHUNK + 4096) as u64);
        assert_eq!(w, [1, 5, 7].contains(&k), "chunk {k}");
    }
    // Outside guest RAM errs towards written.
    assert!(engine.written(base + 64 * MIB as u64));
    // A new mark starts over.
    engine.mark().unwrap();
    assert!(!engine.written(base + (5 * CHUNK) as u64));
    mem.bytes_mut()[6 * CHUNK + 9] = 3;
    assert!(engine.written(base + (6 * CHUNK) as u64));
    assert!(!engine.written(base + (2 * CHUNK) as u64));
}
