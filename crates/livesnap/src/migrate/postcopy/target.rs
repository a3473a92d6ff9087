//! The target side of a live migration (see the module above).

use super::pieces::{check_chunk, chunk_len, chunk_offset, page_of_chunk, pieces_pages, Partial};
use super::*;

/// Who hears a target's [`TargetEvent`]s.
pub type TargetEvents = Box<dyn Fn(TargetEvent) + Send + Sync>;

/// What happens to a live migration, as the target sees it.
#[derive(Debug, Clone)]
pub enum TargetEvent {
    /// The connection broke: threads touching RAM not yet here wait.
    Paused(String),
    /// A new connection carries on ([`RemotePages::recover`]).
    Recovered,
}

enum Slot {
    Absent,
    Requested,
    Arrived(Vec<u8>),
    Zero,
    Taken,
}

struct RecvState {
    slots: Vec<Slot>,
    writer: Option<File>,
    generation: u64,
    /// The source gave up, or the migration was stopped: waiting is over.
    failed: Option<String>,
    /// Bytes received after the switch and not yet placed.
    staged: u64,
    /// Chunks that came by pre-copy (not counted in `staged`).
    precopied: Vec<bool>,
    /// RUNNING was sent: the source may be told DONE.
    running: bool,
    /// The source answered RUNNING with GO: the guest is ours.
    go: bool,
    /// Pages sent ahead of their chunk (image offset → 4 KiB), until taken.
    pages: std::collections::HashMap<u64, Vec<u8>>,
    received: u64,
    /// Every page is placed (DONE is owed to the source until `done_sent`).
    done: bool,
    done_sent: bool,
    /// Chunks in the order they arrived, for the prefetch.
    arrivals: VecDeque<usize>,
}

struct RecvShared {
    layout: Vec<ImageRange>,
    /// The source answers RUNNING with GO (header flag `handover`).
    handover: bool,
    /// The source sends a requested page ahead of its chunk (flag `pages`).
    pages_first: bool,
    /// A chunk's pieces may begin mid-chunk (flag `rotated`).
    rotated: bool,
    id: [u8; 16],
    precopy: PrecopyFigures,
    /// Pre-copied chunks dropped at the switch, freed once RAM is filled.
    garbage: Mutex<Vec<Slot>>,
    st: Mutex<RecvState>,
    cv: Condvar,
    events: Mutex<Option<TargetEvents>>,
    requests: AtomicU64,
    chunks_requested: AtomicU64,
    /// Connections used (the first and each recovery).
    connections: AtomicU64,
    /// Chunks asked for before the guest ran (they were in the downtime).
    requests_before_switch: AtomicU64,
    bytes: AtomicU64,
}

/// The target side of a live migration: RAM that comes from the source on
/// demand (see the module documentation).
pub struct RemotePages {
    sh: Arc<RecvShared>,
}

/// What [`receive_switch`] read: the layout, the device state, and the
/// pages still to come.
pub struct Switch {
    pub layout: StreamLayout,
    pub device_state: Vec<u8>,
    pub pages: Arc<RemotePages>,
    /// Pages sent with the state (image offset, 4 KiB): place them before
    /// loading the state ([`crate::fill::start_fill_with`]).
    pub early: Vec<(u64, Vec<u8>)>,
}

/// Reads a live stream up to the switch (header, device state) from `sock`.
/// The caller builds the VM with fresh RAM, starts a fill from the returned
/// pages, runs the guest and calls [`RemotePages::running`].
pub fn receive_switch(sock: OwnedFd) -> Result<Switch> {
    let (r, w) = halves(&sock).map_err(|e| SnapError::io("post-copy connection", e))?;
    let (reader, layout) = StreamReader::start(r)?;
    receive_switch_from(reader, layout, w)
}

/// [`receive_switch`] for a stream whose header was read already.
pub fn receive_switch_from<R: Read + Send + 'static>(
    reader: StreamReader<R>,
    layout: StreamLayout,
    w: File,
) -> Result<Switch> {
    if !layout.live || layout.resume {
        return Err(broken("it is not the start of a live migration"));
    }
    let mut r = reader.into_buffered();
    let mut state = Vec::new();
    let mut early: Vec<(u64, Vec<u8>)> = Vec::new();
    let n = crate::format::image::chunk_count(&layout.ranges);
    // Chunks of a pre-copy pass (sent with the guest running, before the state).
    let mut slots: Vec<Slot> = (0..n).map(|_| Slot::Absent).collect();
    let (mut pre_bytes, mut dropped) = (0u64, 0u64);
    // Dropped chunks are freed once RAM is filled, not now: unmapping them
    // holds the process's memory map lock for milliseconds, which the
    // switch (building the VM) and the fill's faults wait on.
    let mut garbage: Vec<Slot> = Vec::new();
    let id = loop {
        let (kind, off, data) = read_record(&mut r, MAX_RECORD)?
            .ok_or_else(|| broken("it ends before the switch: truncated"))?;
        match kind {
            KIND_STATE if off == state.len() as u64 => {
                if state.len() + data.len() > MAX_DEVICE_STATE as usize {
                    return Err(broken("its device state is too large"));
                }
                state.extend_from_slice(&data);
            }
            KIND_PAGE
                if data.len() == PAGE_SIZE as usize
                    && early.len() < MAX_EARLY_PAGES
                    && off % PAGE_SIZE == 0
                    && chunk_at(&layout.ranges, off).is_some() =>
            {
                early.push((off, data));
            }
            KIND_CHUNK if layout.precopy && state.is_empty() => {
                let k = off as usize;
                if k >= n {
                    return Err(broken(format!("chunk {k} is not in guest RAM")));
                }
                check_chunk(&layout.ranges, k, &data).map_err(broken)?;
                pre_bytes += data.len() as u64 + 24;
                slots[k] = if data[..BITMAP].iter().all(|b| *b == 0) {
                    Slot::Zero
                } else {
                    Slot::Arrived(data)
                };
            }
            KIND_STALE if data.len() == n.div_ceil(8) => {
                for (k, s) in slots.iter_mut().enumerate() {
                    if data[k / 8] & (1 << (k % 8)) != 0 && !matches!(s, Slot::Absent) {
                        garbage.push(std::mem::replace(s, Slot::Absent));
                        dropped += 1;
                    }
                }
            }
            KIND_SWITCH if data.len() == 28 => {
                let len = u64::from_le_bytes(data[16..24].try_into().expect("8 bytes"));
                let crc = u32::from_le_bytes(data[24..28].try_into().expect("4 bytes"));
                if len != state.len() as u64 || crc32fast::hash(&state) != crc {
                    return Err(broken("its device state is incomplete or corrupt"));
                }
                let mut id = [0u8; 16];
                id.copy_from_slice(&data[..16]);
                break id;
            }
            k => {
                return Err(broken(format!(
                    "unexpected record of kind {k} before the switch"
                )))
            }
        }
    };
    let arrivals: VecDeque<usize> = (0..n)
        .filter(|&k| !matches!(slots[k], Slot::Absent))
        .collect();
    // Pre-copied chunks wait to be placed too, but do not hold back what
    // comes after the switch (a thread may wait for it): they are not
    // `staged`. They take up to the guest's RAM until placed.
    let precopied: Vec<bool> = slots
        .iter()
        .map(|s| matches!(s, Slot::Arrived(_)))
        .collect();
    let sh = Arc::new(RecvShared {
        layout: layout.ranges.clone(),
        handover: layout.handover,
        pages_first: layout.pages,
        rotated: layout.rotated,
        id,
        garbage: Mutex::new(garbage),
        precopy: PrecopyFigures {
            chunks_kept: arrivals.len() as u64,
            chunks_dropped: dropped,
            bytes: pre_bytes,
        },
        st: Mutex::new(RecvState {
            slots,
            writer: Some(w),
            generation: 1,
            failed: None,
            staged: 0,
            precopied,
            running: false,
            go: false,
            pages: Default::default(),
            received: arrivals.len() as u64,
            done: false,
            done_sent: false,
            arrivals,
        }),
        cv: Condvar::new(),
        events: Mutex::new(None),
        requests: AtomicU64::new(0),
        chunks_requested: AtomicU64::new(0),
        connections: AtomicU64::new(1),
        requests_before_switch: AtomicU64::new(0),
        bytes: AtomicU64::new(0),
    });
    spawn_receiver(&sh, r, 1)?;
    Ok(Switch {
        layout,
        device_state: state,
        pages: Arc::new(RemotePages { sh }),
        early,
    })
}

fn spawn_receiver<R: Read + Send + 'static>(
    sh: &Arc<RecvShared>,
    r: BufReader<R>,
    g: u64,
) -> Result<()> {
    let sh2 = sh.clone();
    std::thread::Builder::new()
        .name("postcopy-recv".into())
        .spawn(move || target_reader(&sh2, r, g))
        .map(|_| ())
        .map_err(|e| SnapError::io("start the post-copy receiver", e))
}

fn target_reader<R: Read>(sh: &RecvShared, mut r: BufReader<R>, g: u64) {
    // A chunk coming in pieces on this connection (lost with it), and the
    // bytes of pieces taken in so far (told to the source).
    let mut partial = Partial::new(sh.rotated);
    let mut consumed = 0u64;
    let why = loop {
        let (kind, off, data) = match read_record(&mut r, BITMAP + CHUNK_PAGES * PAGE_SIZE as usize)
        {
            Ok(Some(rec)) => rec,
            Ok(None) => break "the source closed the connection".to_string(),
            Err(e) => break format!("{e}"),
        };
        sh.bytes
            .fetch_add(data.len() as u64 + 24, Ordering::Relaxed);
        match kind {
            KIND_CHUNK => match chunk_arrived(sh, g, off as usize, data) {
                Flow::Go => {}
                Flow::Stop => return,
                Flow::Break(why) => break why,
            },
            KIND_PIECE => {
                let n = data.len() as u64 + RECORD_HEAD as u64;
                match partial.add(&sh.layout, off as usize, &data) {
                    Err(why) => break why,
                    Ok(None) => {
                        // A chunk a thread waits on: its pages serve the
                        // faults that come before the rest of it.
                        let k = off as usize;
                        let mut st = lock(&sh.st);
                        if st.generation != g {
                            return;
                        }
                        if matches!(st.slots[k], Slot::Requested) {
                            for (o, page) in pieces_pages(&sh.layout, k, &data) {
                                st.pages.entry(o).or_insert(page);
                            }
                            sh.cv.notify_all();
                        }
                    }
                    Ok(Some((k, whole))) => match chunk_arrived(sh, g, k, whole) {
                        Flow::Go => {}
                        Flow::Stop => return,
                        Flow::Break(why) => break why,
                    },
                }
                // Taken in: the source may push that much more.
                consumed += n;
                let mut st = lock(&sh.st);
                if st.generation != g {
                    return;
                }
                if let Some(w) = st.writer.as_mut() {
                    if send(w, KIND_CONSUMED, consumed, &[]).is_err() {
                        if let Some(w) = st.writer.take() {
                            shutdown(&w);
                        }
                    }
                }
            }
            KIND_END => {}
            KIND_PAGE => {
                let ok = data.len() == PAGE_SIZE as usize && off % PAGE_SIZE == 0;
                let Some((k, _, _)) = chunk_at(&sh.layout, off).filter(|_| ok) else {
                    break format!("a page at {off:#x} that is none of RAM's");
                };
                let mut st = lock(&sh.st);
                if st.generation != g {
                    return;
                }
                // Kept only while its chunk is still on its way.
                if matches!(st.slots[k], Slot::Absent | Slot::Requested) {
                    st.pages.insert(off, data);
                    sh.cv.notify_all();
                }
            }
            KIND_GO => {
                let mut st = lock(&sh.st);
                if st.generation != g {
                    return;
                }
                st.go = true;
                crate::kernel::timeline::event("GO came");
                sh.cv.notify_all();
            }
            k => break format!("unexpected record of kind {k} from the source"),
        }
    };
    let mut st = lock(&sh.st);
    if st.generation != g || st.failed.is_some() {
        return;
    }
    if let Some(w) = st.writer.take() {
        shutdown(&w);
    }
    sh.cv.notify_all();
    let complete = st
        .slots
        .iter()
        .all(|s| !matches!(s, Slot::Absent | Slot::Requested));
    let told = st.done_sent;
    drop(st);
    // Paused until a recovery: for the pages still missing, or to tell
    // the source it may let go.
    if !complete || !told {
        if let Some(ev) = lock(&sh.events).as_ref() {
            ev(TargetEvent::Paused(why));
        }
    }
}

/// What the reader does after a record.
enum Flow {
    Go,
    /// This connection's generation is over: leave quietly.
    Stop,
    Break(String),
}

/// Chunk `k` arrived whole (`data`: a CHUNK payload) on connection `g`.
fn chunk_arrived(sh: &RecvShared, g: u64, k: usize, data: Vec<u8>) -> Flow {
    let mut st = lock(&sh.st);
    if st.generation != g {
        return Flow::Stop;
    }
    if k >= st.slots.len() {
        return Flow::Break(format!("chunk {k} is not in guest RAM"));
    }
    if let Err(e) = check_chunk(&sh.layout, k, &data) {
        return Flow::Break(e);
    }
    // Hold back while too much waits to be placed (never a chunk
    // a thread waits for).
    while st.staged > MAX_STAGED
        && !matches!(st.slots[k], Slot::Requested)
        && st.failed.is_none()
        && st.generation == g
    {
        st = sh.cv.wait(st).unwrap_or_else(|e| e.into_inner());
    }
    if st.generation != g || st.failed.is_some() {
        return Flow::Stop;
    }
    if matches!(st.slots[k], Slot::Absent | Slot::Requested) {
        // Pages that came ahead of it are served from the chunk now.
        if !st.pages.is_empty() {
            if let (Some(start), Some(len)) =
                (chunk_offset(&sh.layout, k), chunk_len(&sh.layout, k))
            {
                for o in (start..start + len).step_by(PAGE_SIZE as usize) {
                    st.pages.remove(&o);
                }
            }
        }
        st.received += 1;
        st.arrivals.push_back(k);
        if data[..BITMAP].iter().all(|b| *b == 0) {
            st.slots[k] = Slot::Zero;
        } else {
            st.staged += data.len() as u64;
            st.slots[k] = Slot::Arrived(data);
        }
        sh.cv.notify_all();
        // Every chunk is here (some still to be placed): the
        // source may let go now rather than after the placing —
        // once it knows the guest runs here.
        if st.received == st.slots.len() as u64 && st.running {
            if tell_done(&mut st) {
                return Flow::Stop;
            }
            return Flow::Break("cannot tell the source every page is here".into());
        }
    }
    Flow::Go
}

/// What a target received before the switch, from a pre-copy pass.
#[derive(Debug, Clone, Copy, Default)]
pub struct PrecopyFigures {
    /// Chunks kept (the guest did not write them after they were sent).
    pub chunks_kept: u64,
    /// Chunks dropped at the switch (written after they were sent).
    pub chunks_dropped: u64,
    /// Bytes of the pass.
    pub bytes: u64,
}

/// Figures of the target side.
#[derive(Debug, Clone, Copy, Default)]
pub struct RecvFigures {
    /// What came before the switch, by pre-copy.
    pub precopy: PrecopyFigures,
    /// Requests sent because a thread touched RAM not here yet (a page, or
    /// a chunk where the source does not send pages first).
    pub requests: u64,
    /// Chunks a thread touched before they were here (each asked for one
    /// or more times).
    pub chunks_requested: u64,
    /// Of those, asked for before the guest ran (their transfer was part of
    /// the downtime).
    pub requests_before_switch: u64,
    /// Chunks received.
    pub chunks_received: u64,
    /// Bytes read from the connection(s) after the switch.
    pub bytes: u64,
    /// Connections used.
    pub connections: u64,
}

impl RemotePages {
    /// Who hears a broken connection and a recovery.
    pub fn on_event(&self, f: TargetEvents) {
        *lock(&self.sh.events) = Some(f);
    }

    /// The guest is about to run here: tells the source, which must not run
    /// it again, and (with a source that hands over) waits for its GO. An
    /// error means the guest must not run here: the source did not let go
    /// (a RUNNING lost on the way makes it run its guest on).
    pub fn running(&self) -> io::Result<()> {
        let before = self.sh.requests.load(Ordering::Relaxed);
        self.sh
            .requests_before_switch
            .store(before, Ordering::Relaxed);
        crate::kernel::timeline::event("RUNNING sent");
        self.say(KIND_RUNNING, 0, &[])?;
        let mut st = lock(&self.sh.st);
        if self.sh.handover {
            let end = Instant::now() + SWITCH_TIMEOUT;
            while !st.go {
                if let Some(why) = &st.failed {
                    return Err(io::Error::other(why.clone()));
                }
                if st.writer.is_none() {
                    return Err(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        "the connection broke before the source handed the guest over",
                    ));
                }
                let left = end.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "timed out: the source did not hand the guest over",
                    ));
                }
                st = self
                    .sh
                    .cv
                    .wait_timeout(st, left)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
        }
        st.running = true;
        // Everything may be here already (a pre-copy pass, chunks asked for
        // while the state loaded): the source may let go.
        if st.received == st.slots.len() as u64 {
            tell_done(&mut st);
        }
        Ok(())
    }

    /// Every page is here: the source may let go. Returns whether the
    /// source was told; if not, the connection is down ([`TargetEvent::Paused`]
    /// follows) and a recovery tells it.
    pub fn done(&self) -> bool {
        let garbage = std::mem::take(&mut *lock(&self.sh.garbage));
        drop(garbage);
        let mut st = lock(&self.sh.st);
        st.done = true;
        tell_done(&mut st)
    }

    /// Whether the source has been told every page is here.
    pub fn source_told(&self) -> bool {
        lock(&self.sh.st).done_sent
    }

    /// Gives up: threads waiting for a page get an error (the VM must end).
    pub fn fail(&self, why: &str) {
        let mut st = lock(&self.sh.st);
        st.failed = Some(why.to_string());
        if let Some(w) = st.writer.take() {
            shutdown(&w);
        }
        self.sh.cv.notify_all();
    }

    /// Breaks the connection (QMP `migrate-pause`): threads touching RAM
    /// not here wait ([`TargetEvent::Paused`]) until [`RemotePages::recover`].
    pub fn break_connection(&self) -> bool {
        let st = lock(&self.sh.st);
        match &st.writer {
            Some(w) if st.failed.is_none() => {
                shutdown(w);
                true
            }
            _ => false,
        }
    }

    /// Whether the connection is up.
    pub fn connected(&self) -> bool {
        lock(&self.sh.st).writer.is_some()
    }

    /// The figures so far.
    pub fn figures(&self) -> RecvFigures {
        let st = lock(&self.sh.st);
        RecvFigures {
            precopy: self.sh.precopy,
            requests: self.sh.requests.load(Ordering::Relaxed),
            chunks_requested: self.sh.chunks_requested.load(Ordering::Relaxed),
            requests_before_switch: self.sh.requests_before_switch.load(Ordering::Relaxed),
            chunks_received: st.received,
            bytes: self.sh.bytes.load(Ordering::Relaxed),
            connections: self.sh.connections.load(Ordering::Relaxed),
        }
    }

    fn say(&self, kind: u32, off: u64, data: &[u8]) -> io::Result<()> {
        let mut st = lock(&self.sh.st);
        let w = st.writer.as_mut().ok_or_else(|| {
            io::Error::new(io::ErrorKind::NotConnected, "no connection to the source")
        })?;
        let r = send(w, kind, off, data);
        if r.is_err() {
            if let Some(w) = st.writer.take() {
                shutdown(&w);
            }
        }
        r
    }

    /// Carries on over a new connection from the source (after
    /// [`TargetEvent::Paused`]): checks it is the same migration, says which
    /// chunks are still missing, asks again for those threads wait on.
    pub fn recover(&self, sock: OwnedFd) -> Result<()> {
        let (r, w) = halves(&sock).map_err(|e| SnapError::io("post-copy connection", e))?;
        let (reader, layout) = StreamReader::start(r)?;
        if !layout.live || !layout.resume || layout.ranges != self.sh.layout {
            return Err(broken("it is not this live migration resuming"));
        }
        let mut r = reader.into_buffered();
        match read_record(&mut r, 64)? {
            Some((KIND_RESUME, _, id)) if id == self.sh.id => {}
            Some((KIND_RESUME, _, _)) => return Err(broken("it resumes another migration")),
            _ => return Err(broken("it is not this live migration resuming")),
        }
        let mut st = lock(&self.sh.st);
        if st.failed.is_some() {
            return Err(broken("the migration was given up"));
        }
        if let Some(old) = st.writer.take() {
            shutdown(&old);
        }
        st.generation += 1;
        let g = st.generation;
        let n = st.slots.len();
        let mut need = vec![0u8; n.div_ceil(8)];
        let mut waiting = Vec::new();
        for (k, s) in st.slots.iter().enumerate() {
            match s {
                Slot::Absent => need[k / 8] |= 1 << (k % 8),
                Slot::Requested => {
                    need[k / 8] |= 1 << (k % 8);
                    waiting.push(k);
                }
                _ => {}
            }
        }
        let mut w = w;
        send(&mut w, KIND_NEED, 0, &need).map_err(|e| SnapError::io("post-copy recovery", e))?;
        for k in waiting {
            send(&mut w, KIND_REQ, k as u64, &[])
                .map_err(|e| SnapError::io("post-copy recovery", e))?;
        }
        st.writer = Some(w);
        self.sh.connections.fetch_add(1, Ordering::Relaxed);
        self.sh.cv.notify_all();
        // Everything came before the link broke: only DONE was owed.
        let all_here = st.running && (st.done || st.received == n as u64);
        if all_here && !tell_done(&mut st) {
            return Err(broken("cannot tell the source every page is here"));
        }
        drop(st);
        if !all_here {
            spawn_receiver(&self.sh, r, g)?;
        }
        if let Some(ev) = lock(&self.sh.events).as_ref() {
            ev(TargetEvent::Recovered);
        }
        Ok(())
    }

    /// Waits until chunk `k` is here (asking for it once); what it holds.
    fn wait_for(&self, k: usize) -> io::Result<Option<Vec<u8>>> {
        let mut st = lock(&self.sh.st);
        loop {
            if let Some(why) = &st.failed {
                return Err(io::Error::other(why.clone()));
            }
            match std::mem::replace(&mut st.slots[k], Slot::Taken) {
                Slot::Arrived(d) => {
                    if !std::mem::take(&mut st.precopied[k]) {
                        st.staged -= d.len() as u64;
                    }
                    self.sh.cv.notify_all();
                    return Ok(Some(d));
                }
                Slot::Zero => {
                    st.slots[k] = Slot::Zero;
                    return Ok(None);
                }
                Slot::Taken => return Err(io::Error::other(format!("chunk {k} was placed twice"))),
                // On its way in order, or asked for by `want`.
                other @ (Slot::Absent | Slot::Requested) => st.slots[k] = other,
            }
            st = self.sh.cv.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn chunk_index(&self, offset: u64, len: u64) -> io::Result<usize> {
        match chunk_at(&self.sh.layout, offset) {
            Some((k, start, l)) if start == offset && l == len => Ok(k),
            _ => Err(io::Error::other(format!(
                "{len} bytes at {offset:#x} are not one chunk of guest RAM"
            ))),
        }
    }
}

/// Tells the source every page is here (once): it may let go. The
/// connection then closes. False if it cannot be told now (the connection
/// is down: a recovery tells it).
fn tell_done(st: &mut RecvState) -> bool {
    if st.done_sent {
        return true;
    }
    let Some(w) = st.writer.as_mut() else {
        return false;
    };
    let r = send(w, KIND_DONE, 0, &[]);
    if r.is_ok() {
        st.done_sent = true;
        st.generation += 1;
    }
    if let Some(w) = st.writer.take() {
        shutdown(&w);
    }
    r.is_ok()
}

impl Drop for RemotePages {
    /// The migration goes away with its pages: the connection closes.
    fn drop(&mut self) {
        self.fail("the live migration was stopped");
    }
}

impl PageSource for RemotePages {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let k = self.chunk_index(offset, buf.len() as u64)?;
        match self.wait_for(k)? {
            None => buf.fill(0),
            Some(d) => {
                let mut p = BITMAP;
                for (i, page) in buf.chunks_mut(PAGE_SIZE as usize).enumerate() {
                    if d[i / 8] & (1 << (i % 8)) != 0 {
                        page.copy_from_slice(&d[p..p + PAGE_SIZE as usize]);
                        p += PAGE_SIZE as usize;
                    } else {
                        page.fill(0);
                    }
                }
            }
        }
        Ok(())
    }

    /// Waits for the chunk: an all-zero one is a hole (the zero page).
    fn is_hole(&self, offset: u64, len: u64) -> bool {
        let Ok(k) = self.chunk_index(offset, len) else {
            return false;
        };
        let mut st = lock(&self.sh.st);
        loop {
            match &st.slots[k] {
                Slot::Zero => return true,
                Slot::Arrived(_) | Slot::Taken => return false,
                _ if st.failed.is_some() => return false,
                Slot::Absent | Slot::Requested => {}
            }
            st = self.sh.cv.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn cancel(&self) {
        self.fail("the live migration was stopped");
    }

    fn pushes(&self) -> bool {
        true
    }

    fn next_arrived(&self) -> Option<u64> {
        let mut st = lock(&self.sh.st);
        loop {
            if st.failed.is_some() {
                return None;
            }
            while let Some(k) = st.arrivals.pop_front() {
                if matches!(st.slots[k], Slot::Arrived(_) | Slot::Zero) {
                    return chunk_offset(&self.sh.layout, k);
                }
            }
            if st.received == st.slots.len() as u64 {
                return None;
            }
            st = self.sh.cv.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// The page at `offset` alone, asked for ahead of its chunk: `None`
    /// once the chunk is here (fill it whole), or from a source that does
    /// not send pages ahead.
    fn page_first(&self, offset: u64) -> Option<io::Result<Vec<u8>>> {
        if !self.sh.pages_first {
            return None;
        }
        let (k, _, _) = chunk_at(&self.sh.layout, offset)?;
        let mut st = lock(&self.sh.st);
        let mut asked = false;
        loop {
            if let Some(why) = &st.failed {
                return Some(Err(io::Error::other(why.clone())));
            }
            match &st.slots[k] {
                // Here but not placed yet: the page alone, from it.
                Slot::Arrived(d) => {
                    let start = chunk_offset(&self.sh.layout, k)?;
                    let page = page_of_chunk(d, ((offset - start) / PAGE_SIZE) as usize);
                    st.pages.remove(&offset);
                    return Some(Ok(page));
                }
                Slot::Zero | Slot::Taken => {
                    st.pages.remove(&offset);
                    return None;
                }
                Slot::Absent | Slot::Requested => {}
            }
            if let Some(p) = st.pages.remove(&offset) {
                return Some(Ok(p));
            }
            if !asked {
                asked = true;
                // Without a connection, `recover` asks again for the chunk
                // (Requested): the page then comes with it.
                if matches!(st.slots[k], Slot::Absent) {
                    self.sh.chunks_requested.fetch_add(1, Ordering::Relaxed);
                }
                st.slots[k] = Slot::Requested;
                self.sh.requests.fetch_add(1, Ordering::Relaxed);
                if let Some(w) = st.writer.as_mut() {
                    if send(w, KIND_REQ_PAGE, offset, &[]).is_err() {
                        if let Some(w) = st.writer.take() {
                            shutdown(&w);
                        }
                    }
                }
            }
            st = self.sh.cv.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn arrived(&self, offset: u64, len: u64) -> bool {
        let Ok(k) = self.chunk_index(offset, len) else {
            return false;
        };
        !matches!(lock(&self.sh.st).slots[k], Slot::Absent | Slot::Requested)
    }

    /// Asks the source for a chunk a thread waits on, ahead of the order.
    fn want(&self, offset: u64, len: u64) {
        let Ok(k) = self.chunk_index(offset, len) else {
            return;
        };
        let mut st = lock(&self.sh.st);
        if matches!(st.slots[k], Slot::Absent) {
            tracing::debug!(
                chunk = k,
                offset,
                "post-copy: asking for a chunk a thread waits on"
            );
            // Without a connection, `recover` asks again for what is Requested.
            st.slots[k] = Slot::Requested;
            self.sh.requests.fetch_add(1, Ordering::Relaxed);
            self.sh.chunks_requested.fetch_add(1, Ordering::Relaxed);
            if let Some(w) = st.writer.as_mut() {
                if send(w, KIND_REQ, k as u64, &[]).is_err() {
                    if let Some(w) = st.writer.take() {
                        shutdown(&w);
                    }
                }
            }
        }
    }
}
