//! Post-copy live migration over a socket pair: the target's RAM becomes
//! the source's, faulted chunks first; a connection broken after the switch
//! pauses both sides and a new one carries on; one broken before the switch
//! gives the guest back to the source.

mod common;

use std::os::fd::OwnedFd;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use common::{fill_dense, fill_from, fill_sparse, socket_pair, uffd_missing_ok, Mem};
use livesnap::postcopy::{receive_switch, PostcopySender, SourceEvent, TargetEvent};

const MIB: usize = 1 << 20;
const T: Duration = Duration::from_secs(60);

fn sender(sock: OwnedFd, src: &Mem, len: usize) -> (PostcopySender, mpsc::Receiver<SourceEvent>) {
    sender_of(sock, &[src.range(0, len, 0)], b"device state", &[])
}

/// A sender of `ranges` (memory the calling test keeps mapped and unwritten
/// while the sender lives) whose events arrive on the returned channel.
fn sender_of(
    sock: OwnedFd,
    ranges: &[livesnap::RamRange],
    state: &[u8],
    early: &[u64],
) -> (PostcopySender, mpsc::Receiver<SourceEvent>) {
    let (tx, rx) = mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    // SAFETY: the callers' memory outlives the sender and is not written
    // while it lives (each test's contract, above).
    let s = unsafe {
        PostcopySender::start(
            sock,
            ranges,
            state.to_vec(),
            early,
            Box::new(move |e| {
                let _ = tx.lock().unwrap().send(e);
            }),
        )
    }
    .unwrap();
    (s, rx)
}

#[test]
fn the_target_gets_every_page_faulted_chunks_first() {
    if !uffd_missing_ok() {
        return;
    }
    let len = 64 * MIB;
    let mut src = Mem::new(len);
    fill_sparse(src.bytes_mut(), 3, 5);
    fill_dense(&mut src.words_mut()[(8 * MIB) / 8..(16 * MIB) / 8], 9);
    let (a, b) = socket_pair();
    let (s, events) = sender(a, &src, len);
    let sw = receive_switch(b).unwrap();
    assert_eq!(sw.device_state, b"device state");
    assert_eq!(sw.layout.ram_bytes(), len as u64);
    let dst = Mem::new(len);
    let (mut fill, done_rx) = fill_from(&sw, &[dst.range(0, len, 0)]);
    sw.pages.running().unwrap();
    assert!(matches!(
        events.recv_timeout(T).unwrap(),
        SourceEvent::Switched
    ));
    // Touch a chunk near the end before the background fill starts: its
    // page is asked for and placed alone, ahead of the order; the rest of
    // its chunk follows and is placed around it.
    let far = 60 * MIB + 123;
    assert_eq!(dst.bytes()[far], src.bytes()[far]);
    fill.go();
    let st = done_rx.recv_timeout(T).unwrap().unwrap();
    assert!(st.pages_first >= 1, "the page came ahead: {st:?}");
    assert!(sw.pages.done());
    assert!(matches!(
        events.recv_timeout(T).unwrap(),
        SourceEvent::Completed
    ));
    assert!(
        dst.bytes() == src.bytes(),
        "the target's RAM is the source's"
    );
    let c = s.counters();
    assert!(
        c.chunks_requested
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
    assert!(c.pages_requested.load(std::sync::atomic::Ordering::Relaxed) >= 1);
    drop(fill);
}

/// Several pages of one chunk touched one after another, before the rest
/// arrives: each comes alone, the chunk is then completed around them, and
/// RAM ends up the source's.
#[test]
fn pages_of_one_chunk_come_ahead_and_the_chunk_around_them() {
    if !uffd_missing_ok() {
        return;
    }
    let len = 32 * MIB;
    let mut src = Mem::new(len);
    fill_dense(src.words_mut(), 21);
    let (a, b) = socket_pair();
    let (_s, events) = sender(a, &src, len);
    let sw = receive_switch(b).unwrap();
    let dst = Mem::new(len);
    let (mut fill, done_rx) = fill_from(&sw, &[dst.range(0, len, 0)]);
    sw.pages.running().unwrap();
    assert!(matches!(
        events.recv_timeout(T).unwrap(),
        SourceEvent::Switched
    ));
    let base = 20 * MIB;
    for page in [7usize, 300, 1, 511] {
        let at = base + page * 4096 + 40;
        assert_eq!(dst.bytes()[at], src.bytes()[at], "page {page}");
    }
    fill.go();
    let st = done_rx.recv_timeout(T).unwrap().unwrap();
    assert!(st.pages_first >= 1, "{st:?}");
    assert!(sw.pages.done());
    assert!(
        dst.bytes() == src.bytes(),
        "the target's RAM is the source's"
    );
    drop(fill);
}

#[test]
fn a_break_before_the_switch_gives_the_guest_back() {
    let len = 8 * MIB;
    let src = Mem::new(len);
    let (a, b) = socket_pair();
    let (_s, events) = sender(a, &src, len);
    let sw = receive_switch(b).unwrap();
    // The target dies before it runs the guest.
    drop(sw);
    match events.recv_timeout(T).unwrap() {
        SourceEvent::Failed(why) => assert!(why.contains("closed"), "{why}"),
        e => panic!("{e:?}"),
    }
}

#[test]
fn a_break_after_the_switch_pauses_and_a_new_connection_carries_on() {
    if !uffd_missing_ok() {
        return;
    }
    // More than the target stages: the source cannot finish before the break.
    let len = 512 * MIB;
    let mut src = Mem::new(len);
    fill_dense(src.words_mut(), 3);
    let (a, b) = socket_pair();
    let (s, events) = sender(a, &src, len);
    let b2 = b.try_clone().unwrap();
    let sw = receive_switch(b).unwrap();
    let (ttx, trx) = mpsc::channel();
    let ttx = std::sync::Mutex::new(ttx);
    sw.pages.on_event(Box::new(move |e| {
        let _ = ttx.lock().unwrap().send(e);
    }));
    let dst = Mem::new(len);
    let (mut fill, done_rx) = fill_from(&sw, &[dst.range(0, len, 0)]);
    sw.pages.running().unwrap();
    assert!(matches!(
        events.recv_timeout(T).unwrap(),
        SourceEvent::Switched
    ));
    // The link goes down.
    // SAFETY: shutdown on a descriptor this test owns.
    unsafe { libc::shutdown(std::os::fd::AsRawFd::as_raw_fd(&b2), libc::SHUT_RDWR) };
    assert!(matches!(
        events.recv_timeout(T).unwrap(),
        SourceEvent::Paused(_)
    ));
    assert!(matches!(
        trx.recv_timeout(T).unwrap(),
        TargetEvent::Paused(_)
    ));
    assert!(!sw.pages.connected());
    // A thread touching RAM not here yet waits (it is not given zeros).
    let (ptr, last) = (dst.bytes().as_ptr() as usize, len - 1);
    let (rtx, rrx) = mpsc::channel();
    std::thread::spawn(move || {
        // SAFETY: `dst` outlives the test's wait below for this thread.
        let v = unsafe { std::ptr::read_volatile((ptr + last) as *const u8) };
        let _ = rtx.send(v);
    });
    assert!(
        rrx.recv_timeout(Duration::from_millis(300)).is_err(),
        "read while paused"
    );
    fill.go();
    // Recovery on a new connection.
    let (a2, b2) = socket_pair();
    s.resume(a2).unwrap();
    sw.pages.recover(b2).unwrap();
    assert!(matches!(
        trx.recv_timeout(T).unwrap(),
        TargetEvent::Recovered
    ));
    assert_eq!(rrx.recv_timeout(T).unwrap(), src.bytes()[last]);
    done_rx.recv_timeout(T).unwrap().unwrap();
    assert!(sw.pages.done());
    assert!(matches!(
        events.recv_timeout(T).unwrap(),
        SourceEvent::Completed
    ));
    assert!(
        dst.bytes() == src.bytes(),
        "the target's RAM is the source's"
    );
    assert_eq!(sw.pages.figures().connections, 2);
    drop(fill);
}

#[test]
fn a_target_that_is_not_one_is_refused_at_the_switch() {
    let (a, b) = socket_pair();
    drop(a);
    assert!(receive_switch(b).is_err());
    let _ = Arc::new(0);
}

/// RAM in two ranges mapped separately (guest RAM above 3 GiB): the target's
/// mappings need not be in the order of the image's.
#[test]
fn two_ranges_in_any_host_order() {
    if !uffd_missing_ok() {
        return;
    }
    let (a1, a2) = (Mem::new(6 * MIB), Mem::new(4 * MIB));
    let (mut a1, mut a2) = (a1, a2);
    fill_dense(a1.words_mut(), 1);
    fill_sparse(a2.bytes_mut(), 2, 3);
    let (x, y) = socket_pair();
    let (_s, events) = sender_of(
        x,
        &[a1.range(0, 6 * MIB, 0), a2.range(0, 4 * MIB, 4 << 30)],
        b"st",
        &[],
    );
    let sw = receive_switch(y).unwrap();
    // The high range mapped below the low one: host order opposite to the
    // image's. One mapping, the high range in its first 4 MiB (two mappings
    // land in whatever order the kernel likes: other tests of this binary
    // map and unmap memory meanwhile).
    let d = Mem::new(10 * MIB);
    let (mut fill, done_rx) = fill_from(
        &sw,
        &[d.range(4 * MIB, 6 * MIB, 0), d.range(0, 4 * MIB, 4 << 30)],
    );
    sw.pages.running().unwrap();
    fill.go();
    done_rx.recv_timeout(T).unwrap().unwrap();
    assert!(sw.pages.done());
    assert!(matches!(
        events.recv_timeout(T).unwrap(),
        SourceEvent::Switched
    ));
    assert!(matches!(
        events.recv_timeout(T).unwrap(),
        SourceEvent::Completed
    ));
    assert!(d.bytes()[4 * MIB..] == *a1.bytes() && d.bytes()[..4 * MIB] == *a2.bytes());
    drop(fill);
}

/// Restoring a machine may touch guest RAM before its guest runs (KVM maps
/// the kvmclock page when its MSR is set): the source sends what is asked for
/// even before the switch.
#[test]
fn ram_touched_before_the_switch_arrives() {
    if !uffd_missing_ok() {
        return;
    }
    let len = 16 * MIB;
    let mut src = Mem::new(len);
    fill_dense(src.words_mut(), 4);
    let (a, b) = socket_pair();
    let (_s, events) = sender(a, &src, len);
    let sw = receive_switch(b).unwrap();
    let dst = Mem::new(len);
    let (mut fill, done_rx) = fill_from(&sw, &[dst.range(0, len, 0)]);
    let (ptr, at) = (dst.bytes().as_ptr() as usize, 9 * MIB + 5);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        // SAFETY: `dst` outlives this thread's read (the test waits for it).
        let _ = tx.send(unsafe { std::ptr::read_volatile((ptr + at) as *const u8) });
    });
    assert_eq!(
        rx.recv_timeout(T).expect("served before the switch"),
        src.bytes()[at]
    );
    sw.pages.running().unwrap();
    assert!(matches!(
        events.recv_timeout(T).unwrap(),
        SourceEvent::Switched
    ));
    fill.go();
    done_rx.recv_timeout(T).unwrap().unwrap();
    assert!(sw.pages.done());
    assert!(dst.bytes() == src.bytes());
    drop(fill);
}

/// Pages sent with the state are in place before the fill begins; their
/// chunks are later filled around them.
#[test]
fn early_pages_are_there_before_the_switch_and_their_chunks_around_them() {
    if !uffd_missing_ok() {
        return;
    }
    let len = 8 * MIB;
    let mut src = Mem::new(len);
    fill_dense(src.words_mut(), 8);
    // One early page in a chunk of data, one in a chunk of zeros.
    src.bytes_mut()[4 * MIB..6 * MIB].fill(0);
    src.bytes_mut()[5 * MIB + 8192] = 0x5a;
    src.bytes_mut()[6 * MIB..].fill(0);
    let early = [
        (MIB + 12288) as u64,
        (5 * MIB + 8192) as u64,
        (7 * MIB + 4096) as u64,
    ];
    let (a, b) = socket_pair();
    let (_s, events) = sender_of(a, &[src.range(0, len, 0)], b"s", &early);
    let sw = receive_switch(b).unwrap();
    assert_eq!(sw.early.len(), 3);
    let dst = Mem::new(len);
    let (done_tx, done_rx) = mpsc::channel();
    let mut fill = livesnap::fill::start_fill_with(
        &[dst.range(0, len, 0)],
        &sw.layout.ranges,
        sw.pages.clone(),
        Some(Box::new(move |r| {
            let _ = done_tx.send(r);
        })),
        &sw.early,
    )
    .unwrap();
    // Read without any request: the pages are there already.
    for &g in &early {
        assert_eq!(
            dst.bytes()[g as usize..g as usize + 4096],
            src.bytes()[g as usize..g as usize + 4096]
        );
    }
    assert_eq!(sw.pages.figures().requests, 0);
    sw.pages.running().unwrap();
    assert!(matches!(
        events.recv_timeout(T).unwrap(),
        SourceEvent::Switched
    ));
    // A fault in the all-zero chunk that holds an early page: zero around it.
    assert_eq!(dst.bytes()[7 * MIB + 100], 0);
    fill.go();
    done_rx.recv_timeout(T).unwrap().unwrap();
    assert!(sw.pages.done());
    assert!(dst.bytes() == src.bytes(), "RAM around the early pages");
    assert_eq!(sw.pages.figures().requests_before_switch, 0);
    drop(fill);
}
