//! The source side of a live migration (see the module above).

use super::*;

/// What happens to a live migration, as the source sees it.
#[derive(Debug, Clone)]
pub enum SourceEvent {
    /// The target runs the guest: from now on it is the VM.
    Switched,
    /// The connection broke before the switch: the target never ran the
    /// guest; the source may run it again.
    Failed(String),
    /// The connection broke after the switch: the target waits for RAM;
    /// [`PostcopySender::resume`] carries on.
    Paused(String),
    /// The target has every page.
    Completed,
}

/// Figures of the source side.
#[derive(Debug, Default)]
pub struct SendCounters {
    /// Chunks sent in order.
    pub chunks_pushed: AtomicU64,
    /// Chunks sent first because the target asked for them.
    pub chunks_requested: AtomicU64,
    /// Requests received.
    pub requests: AtomicU64,
    /// Pages sent ahead of their chunk because the target asked for them.
    pub pages_requested: AtomicU64,
    /// Bytes written to the connection(s).
    pub bytes_sent: AtomicU64,
    /// Chunks that were all zero (sent as a bitmap alone).
    pub zero_chunks: AtomicU64,
    /// Connections used (1 + recoveries).
    pub connections: AtomicU64,
    /// How far the push may run ahead of what the target took in, bytes,
    /// as last measured (see `Pacer`).
    pub push_limit: AtomicU64,
    /// The shortest round trip of a piece seen on this connection, µs.
    pub min_rtt_us: AtomicU64,
    /// The highest delivery rate seen on this connection, bytes per second.
    pub delivery_rate: AtomicU64,
    /// After a pre-copy pass: chunks it sent that the guest wrote since
    /// (sent again).
    pub chunks_rewritten: AtomicU64,
}

struct SendState {
    sent: Vec<bool>,
    next: usize,
    /// Chunks the target asked for, each with the page its pieces begin at.
    urgent: VecDeque<(usize, usize)>,
    /// Pages (image offsets) the target waits on: each goes before anything else.
    urgent_pages: VecDeque<u64>,
    /// The chunks going out piece by piece: one the target asked for, whose
    /// pieces go first, and one pushed in order.
    asked: Option<OnWay>,
    pushing: Option<OnWay>,
    /// Bytes of PIECE records written on this connection, and how many of
    /// them the target says it took in (CONSUMED).
    piece_bytes: u64,
    consumed: u64,
    /// How far pieces may run ahead of `consumed` on this connection.
    pacer: Pacer,
    /// The connection in use and its generation.
    conn: Option<(u64, OwnedFd)>,
    generation: u64,
    /// The head (state or resume record) of this generation still has to go.
    head_pending: bool,
    end_sent: bool,
    switched: bool,
    /// RUNNING came: GO is owed to the target.
    go_due: bool,
    /// Completed, failed before the switch, or stopped.
    ended: bool,
    /// A write on this connection failed: it is shut down, and its reader
    /// (which may still hold the target's DONE) decides what happened.
    broken: Option<String>,
}

/// A chunk going out piece by piece. Its pieces begin at `start` (a piece
/// boundary: the piece of the page a thread waits on, or the first) and
/// wrap around the chunk's end back to `start`: the pages next to the one
/// asked for, which the guest touches next, come first (stream flag
/// `rotated`).
#[derive(Clone, Copy, Debug, PartialEq)]
struct OnWay {
    k: usize,
    start: usize,
    next: usize,
    /// Pages still to go.
    left: usize,
}

impl OnWay {
    fn new(k: usize, start: usize, pages: usize) -> OnWay {
        OnWay {
            k,
            start,
            next: start,
            left: pages,
        }
    }

    /// The pages of the next piece (at most `PIECE_PAGES`, never across
    /// the chunk's end or back past `start`), and what is left after it.
    fn take(self, pages: usize) -> (std::ops::Range<usize>, Option<OnWay>) {
        let end = if self.next < self.start {
            self.start
        } else {
            pages
        };
        let to = (self.next + PIECE_PAGES).min(end);
        let left = self.left - (to - self.next);
        let next = if to == pages { 0 } else { to };
        let rest = (left > 0).then_some(OnWay { next, left, ..self });
        (self.next..to, rest)
    }
}

struct SendShared {
    chunks: Vec<(u64, u64)>,
    layout: Vec<ImageRange>,
    image_len: u64,
    id: [u8; 16],
    state: Vec<u8>,
    /// Pages sent with the state: image offset and host address.
    early: Vec<(u64, u64)>,
    /// After a pre-copy pass (whose chunks went over this connection, after
    /// its stream header): the chunks the target must drop (a bitmap).
    stale: Option<Vec<u8>>,
    st: Mutex<SendState>,
    cv: Condvar,
    events: Box<dyn Fn(SourceEvent) + Send + Sync>,
    counters: Arc<SendCounters>,
}

/// The source side of a live migration (see the module documentation).
pub struct PostcopySender {
    sh: Arc<SendShared>,
    pusher: Option<std::thread::JoinHandle<()>>,
}

impl PostcopySender {
    /// Starts sending `ranges` (guest RAM, which nobody writes from now on:
    /// the guest is paused for good) and `device_state` over `sock`.
    /// `events` hears every [`SourceEvent`], from the migration's threads.
    ///
    /// # Safety
    /// The memory of `ranges` must stay mapped and unwritten until this
    /// sender is dropped.
    ///
    /// `early` names guest-physical pages the target touches while it loads
    /// the state, before its guest runs (KVM maps the kvmclock, steal-time
    /// and async-PF pages when their MSRs are set), or first once it runs
    /// (the vCPUs' page tables, code and stacks): they go with the state,
    /// 4 KiB each, so the switch does not wait for their 2 MiB chunks —
    /// except those a pre-copy pass already gave the target.
    pub unsafe fn start(
        sock: OwnedFd,
        ranges: &[RamRange],
        device_state: Vec<u8>,
        early: &[u64],
        events: Box<dyn Fn(SourceEvent) + Send + Sync>,
    ) -> Result<PostcopySender> {
        // SAFETY: the caller's promise, passed on.
        unsafe { Self::begin(sock, ranges, device_state, early, events, None) }
    }

    /// Like [`PostcopySender::start`], after a pre-copy pass over the same
    /// `ranges` ([`crate::migrate::precopy::Precopy::finish`]): only the chunks the
    /// pass did not send, and those the guest wrote after it sent them
    /// (which the target is told to drop), are sent again.
    ///
    /// # Safety
    /// As [`PostcopySender::start`]; the guest is paused for good, so the
    /// pass's record of written chunks is final.
    pub unsafe fn after_precopy(
        pre: PrecopyDone,
        ranges: &[RamRange],
        device_state: Vec<u8>,
        early: &[u64],
        events: Box<dyn Fn(SourceEvent) + Send + Sync>,
    ) -> Result<PostcopySender> {
        let PrecopyDone { sock, sent, log } = pre;
        // SAFETY: the caller's promise, passed on.
        unsafe { Self::begin(sock, ranges, device_state, early, events, Some((sent, log))) }
    }

    /// # Safety
    /// As [`PostcopySender::start`].
    unsafe fn begin(
        sock: OwnedFd,
        ranges: &[RamRange],
        device_state: Vec<u8>,
        early: &[u64],
        events: Box<dyn Fn(SourceEvent) + Send + Sync>,
        pre: Option<(Vec<bool>, Arc<dyn WriteLog>)>,
    ) -> Result<PostcopySender> {
        if device_state.len() as u64 > MAX_DEVICE_STATE {
            return Err(SnapError::DeviceStateTooLarge {
                len: device_state.len() as u64,
                max: MAX_DEVICE_STATE,
            });
        }
        let (chunks, layout, image_len) = chunks_of(ranges)?;
        let n = chunks.len();
        // After a pre-copy: what it sent and the guest did not write since
        // is at the target; what the guest wrote, the target drops.
        let (sent, stale) = match &pre {
            None => (vec![false; n], None),
            Some((pre_sent, _)) if pre_sent.len() != n => {
                return Err(SnapError::InvalidInput(
                    "the pre-copy pass was over other RAM".into(),
                ))
            }
            Some((pre_sent, log)) => {
                let mut stale = vec![0u8; n.div_ceil(8)];
                let mut sent = pre_sent.clone();
                for (k, s) in sent.iter_mut().enumerate() {
                    if *s && log.written(chunks[k].0) {
                        *s = false;
                        stale[k / 8] |= 1 << (k % 8);
                    }
                }
                (sent, Some(stale))
            }
        };
        let mut pages = Vec::new();
        for &gpa in early.iter().take(MAX_EARLY_PAGES) {
            let page = gpa & !(PAGE_SIZE - 1);
            let found = ranges
                .iter()
                .zip(&layout)
                .find(|(r, _)| page >= r.gpa() && page < r.gpa() + r.len());
            if let Some((r, l)) = found {
                let at = (
                    l.file_offset + page - r.gpa(),
                    r.host() as u64 + page - r.gpa(),
                );
                // A page a pre-copy pass already gave the target (its chunk
                // not written since) is there: it would only lengthen the
                // switch.
                let there = chunk_at(&layout, at.0).is_some_and(|(k, _, _)| sent[k]);
                if !there && !pages.contains(&at) {
                    pages.push(at);
                }
            }
        }
        let counters = SendCounters::default();
        if let Some(st) = &stale {
            let n: u32 = st.iter().map(|b| b.count_ones()).sum();
            counters
                .chunks_rewritten
                .store(u64::from(n), Ordering::Relaxed);
        }
        let sh = Arc::new(SendShared {
            chunks,
            layout,
            image_len,
            id: random_id(),
            state: device_state,
            early: pages,
            stale,
            st: Mutex::new(SendState {
                sent,
                next: 0,
                urgent: VecDeque::new(),
                urgent_pages: VecDeque::new(),
                asked: None,
                pushing: None,
                piece_bytes: 0,
                pacer: Pacer::default(),
                consumed: 0,
                go_due: false,
                conn: None,
                generation: 0,
                head_pending: true,
                end_sent: false,
                switched: false,
                ended: false,
                broken: None,
            }),
            cv: Condvar::new(),
            events,
            counters: Arc::new(counters),
        });
        attach(&sh, sock, true)?;
        let s2 = sh.clone();
        let pusher = std::thread::Builder::new()
            .name("postcopy-push".into())
            .spawn(move || push(&s2));
        let pusher = match pusher {
            Ok(t) => t,
            Err(e) => {
                let mut st = lock(&sh.st);
                st.ended = true;
                if let Some((_, c)) = st.conn.take() {
                    shutdown(&c);
                }
                return Err(SnapError::io("start the post-copy sender", e));
            }
        };
        // The target must run the guest within SWITCH_TIMEOUT, or the source takes it back.
        let s3 = sh.clone();
        let _ = std::thread::Builder::new()
            .name("postcopy-switch".into())
            .spawn(move || {
                let st = lock(&s3.st);
                let (mut st, _) = s3
                    .cv
                    .wait_timeout_while(st, SWITCH_TIMEOUT, |st| !st.switched && !st.ended)
                    .unwrap_or_else(|e| e.into_inner());
                if !st.switched && !st.ended {
                    st.ended = true;
                    if let Some((_, c)) = st.conn.take() {
                        shutdown(&c);
                    }
                    s3.cv.notify_all();
                    drop(st);
                    (s3.events)(SourceEvent::Failed(format!(
                        "the target did not run the guest within {SWITCH_TIMEOUT:?}"
                    )));
                }
            });
        Ok(PostcopySender {
            sh,
            pusher: Some(pusher),
        })
    }

    /// The figures so far.
    pub fn counters(&self) -> Arc<SendCounters> {
        self.sh.counters.clone()
    }

    /// Whether every chunk has been sent at least once on some connection.
    pub fn progress(&self) -> (usize, usize) {
        let st = lock(&self.sh.st);
        (st.sent.iter().filter(|s| **s).count(), st.sent.len())
    }

    /// Carries on over a new connection after [`SourceEvent::Paused`].
    pub fn resume(&self, sock: OwnedFd) -> Result<()> {
        {
            let st = lock(&self.sh.st);
            if st.ended || !st.switched {
                return Err(broken("there is no paused post-copy migration to resume"));
            }
            if st.conn.is_some() {
                return Err(broken("the post-copy migration is not paused"));
            }
        }
        attach(&self.sh, sock, false)
    }

    /// Breaks the connection (QMP `migrate-pause`): after the switch the
    /// migration pauses ([`SourceEvent::Paused`]) until [`PostcopySender::resume`].
    pub fn break_connection(&self) -> bool {
        let st = lock(&self.sh.st);
        match &st.conn {
            Some((_, c)) if st.switched && !st.ended => {
                shutdown(c);
                true
            }
            _ => false,
        }
    }

    /// Cancels the migration if the target has not run the guest yet
    /// (true: the caller may run it again); after the switch, changes
    /// nothing and returns false.
    pub fn cancel(&self) -> bool {
        let mut st = lock(&self.sh.st);
        if st.switched || st.ended {
            return false;
        }
        st.ended = true;
        if let Some((_, c)) = st.conn.take() {
            shutdown(&c);
        }
        self.sh.cv.notify_all();
        true
    }

    /// Gives up (the caller's VM is going away): both ends close.
    pub fn stop(&self) {
        let mut st = lock(&self.sh.st);
        st.ended = true;
        if let Some((_, c)) = st.conn.take() {
            shutdown(&c);
        }
        self.sh.cv.notify_all();
    }
}

impl Drop for PostcopySender {
    fn drop(&mut self) {
        self.stop();
        if let Some(t) = self.pusher.take() {
            let _ = t.join();
        }
    }
}

/// Makes `sock` the connection in use and starts its reader.
fn attach(sh: &Arc<SendShared>, sock: OwnedFd, first: bool) -> Result<()> {
    let (r, _) = halves(&sock).map_err(|e| SnapError::io("post-copy connection", e))?;
    let g = {
        let mut st = lock(&sh.st);
        st.generation += 1;
        st.conn = Some((st.generation, sock));
        st.head_pending = true;
        st.end_sent = false;
        st.broken = None;
        // A chunk cut short on the old connection is among what the
        // target says it lacks: it goes again, whole.
        st.asked = None;
        st.pushing = None;
        st.piece_bytes = 0;
        st.consumed = 0;
        st.pacer = Pacer::default();
        sh.cv.notify_all();
        st.generation
    };
    sh.counters.connections.fetch_add(1, Ordering::Relaxed);
    let sh2 = sh.clone();
    std::thread::Builder::new()
        .name("postcopy-read".into())
        .spawn(move || source_reader(&sh2, r, g, first))
        .map_err(|e| SnapError::io("start the post-copy reader", e))?;
    Ok(())
}

/// The connection of generation `g` broke: pause (or fail before the switch).
fn lost(sh: &SendShared, g: u64, why: String) {
    let mut st = lock(&sh.st);
    if st.ended || !st.conn.as_ref().is_some_and(|(cg, _)| *cg == g) {
        return;
    }
    if let Some((_, c)) = st.conn.take() {
        shutdown(&c);
    }
    let why = st.broken.take().unwrap_or(why);
    let ev = if st.switched {
        SourceEvent::Paused(why)
    } else {
        st.ended = true;
        SourceEvent::Failed(why)
    };
    sh.cv.notify_all();
    drop(st);
    (sh.events)(ev);
}

fn source_reader(sh: &SendShared, r: File, g: u64, first: bool) {
    let mut r = BufReader::new(r);
    let mut need_first = !first;
    let why = loop {
        let rec = match read_record(&mut r, 1 << 20) {
            Ok(Some(rec)) => rec,
            Ok(None) => break "the target closed the connection".to_string(),
            Err(e) => break format!("{e}"),
        };
        let (kind, off, data) = rec;
        let mut st = lock(&sh.st);
        if need_first && kind != KIND_NEED {
            drop(st);
            break "the target did not say which pages it lacks".into();
        }
        match kind {
            KIND_RUNNING => {
                if !st.switched && !st.ended {
                    // From here the guest is the target's: GO tells it so.
                    crate::kernel::timeline::event("RUNNING came");
                    st.switched = true;
                    st.go_due = true;
                    sh.cv.notify_all();
                    drop(st);
                    (sh.events)(SourceEvent::Switched);
                }
            }
            KIND_REQ => {
                let k = off as usize;
                if k < st.sent.len() && !st.sent[k] {
                    st.urgent.push_back((k, 0));
                    sh.cv.notify_all();
                }
                sh.counters.requests.fetch_add(1, Ordering::Relaxed);
            }
            KIND_REQ_PAGE => {
                let Some((k, start, _)) =
                    chunk_at(&sh.layout, off).filter(|_| off % PAGE_SIZE == 0)
                else {
                    drop(st);
                    break format!(
                        "the target asked for a page at {off:#x}, which is none of RAM's"
                    );
                };
                st.urgent_pages.push_back(off);
                if !st.sent[k] {
                    // Its pieces begin with the one of that page.
                    let page = ((off - start) / PAGE_SIZE) as usize;
                    st.urgent.push_back((k, page - page % PIECE_PAGES));
                }
                sh.cv.notify_all();
                sh.counters.requests.fetch_add(1, Ordering::Relaxed);
            }
            KIND_CONSUMED => {
                if st.generation == g && off > st.consumed {
                    st.consumed = off;
                    st.pacer.consumed(off, Instant::now());
                    let c = &sh.counters;
                    c.push_limit.store(st.pacer.limit(), Ordering::Relaxed);
                    let rtt = st.pacer.min_rtt.unwrap_or_default().as_micros() as u64;
                    c.min_rtt_us.store(rtt, Ordering::Relaxed);
                    c.delivery_rate
                        .store(st.pacer.max_rate as u64, Ordering::Relaxed);
                    sh.cv.notify_all();
                }
            }
            KIND_NEED => {
                need_first = false;
                let n = st.sent.len();
                if data.len() != n.div_ceil(8) {
                    drop(st);
                    break "malformed list of missing pages".into();
                }
                // A chunk already going out in pieces on this connection
                // (the push went on before NEED came) is lacking, but on its
                // way whole: it is not sent again.
                let on_way = [st.asked, st.pushing].map(|c| c.map(|w| w.k));
                for k in 0..n {
                    if data[k / 8] & (1 << (k % 8)) != 0 && !on_way.contains(&Some(k)) {
                        st.sent[k] = false;
                    }
                }
                st.next = 0;
                st.end_sent = false;
                sh.cv.notify_all();
            }
            KIND_DONE if !st.switched => {
                drop(st);
                break "the target said it had every page before it ran the guest".into();
            }
            KIND_DONE => {
                st.ended = true;
                if let Some((_, c)) = st.conn.take() {
                    shutdown(&c);
                }
                sh.cv.notify_all();
                drop(st);
                (sh.events)(SourceEvent::Completed);
                return;
            }
            k => {
                drop(st);
                break format!("unexpected record of kind {k} from the target");
            }
        }
    };
    lost(sh, g, why);
}

/// The least that may be ahead: two pieces, one being taken in while the
/// next travels. Also the limit until the path is measured: the path is
/// measured within the first ten milliseconds after the switch — just when
/// the guest touches its working set for the first time on the target, and
/// each page it asks for waits behind what is ahead (with 512 KiB there the
/// first faults after the switch waited 4–6 ms on a link without delay). A
/// distant link is slower to fill for those milliseconds and no more.
pub(super) const MIN_AHEAD: u64 = 2 * (PIECE_PAGES as u64 * PAGE_SIZE);
/// The most (a fast link with a long delay).
const MAX_AHEAD: u64 = 4 << 20;
/// What may wait in queues on the way beyond what the path itself holds:
/// a page asked for waits behind about this much pushed data.
const QUEUE_TARGET: Duration = Duration::from_millis(1);
/// Shortest span a delivery rate is measured over: long enough that a
/// burst (a relay or a rate limiter letting a few hundred KiB through at
/// once) does not pass for the link's rate.
const RATE_SPAN: Duration = Duration::from_millis(10);

/// Paces the push to the path: as much data ahead of what the target took
/// in as the path holds (its delivery rate times its shortest round trip)
/// plus [`QUEUE_TARGET`], so that a page the target asks for waits behind
/// about a millisecond of pushed data, on a fast local link as on a slow
/// distant one. Measured from the target's CONSUMED reports: a piece's
/// round trip is from its write to the report that covers it.
#[derive(Default)]
struct Pacer {
    /// Piece ends (bytes written on the connection) and when they were
    /// written, oldest first, not yet covered by a report.
    written: VecDeque<(u64, Instant)>,
    min_rtt: Option<Duration>,
    /// Highest delivery rate seen, bytes per second.
    max_rate: f64,
    /// Where the current rate span began: bytes taken in, and when.
    span: Option<(u64, Instant)>,
}

impl Pacer {
    /// A piece ending at `bytes` was written at `at`.
    fn wrote(&mut self, bytes: u64, at: Instant) {
        // Bounded: reports cover pieces in order; a target that never
        // reports keeps the push at the limit anyway.
        if self.written.len() < 4096 {
            self.written.push_back((bytes, at));
        }
    }

    /// The target says it took in `bytes` in all, at `at`.
    fn consumed(&mut self, bytes: u64, at: Instant) {
        while let Some(&(end, t)) = self.written.front() {
            if end > bytes {
                break;
            }
            self.written.pop_front();
            let rtt = at.saturating_duration_since(t);
            self.min_rtt = Some(self.min_rtt.map_or(rtt, |m| m.min(rtt)));
        }
        match self.span {
            Some((b0, t0)) => {
                let dt = at.saturating_duration_since(t0);
                if dt >= RATE_SPAN {
                    let rate = bytes.saturating_sub(b0) as f64 / dt.as_secs_f64();
                    self.max_rate = self.max_rate.max(rate);
                    self.span = Some((bytes, at));
                }
            }
            None => self.span = Some((bytes, at)),
        }
    }

    /// How many bytes may be ahead of what the target took in.
    fn limit(&self) -> u64 {
        match self.min_rtt {
            Some(rtt) if self.max_rate > 0.0 => {
                let held = self.max_rate * (rtt + QUEUE_TARGET).as_secs_f64();
                (held as u64).clamp(MIN_AHEAD, MAX_AHEAD)
            }
            _ => MIN_AHEAD,
        }
    }
}

/// Whether pushing must wait for the target to take in more.
fn ahead(st: &SendState) -> bool {
    st.piece_bytes.saturating_sub(st.consumed) > st.pacer.limit()
}

/// What the pusher does next.
enum Job {
    Head(u64, File),
    Go(u64, File),
    Page(u64, File, u64),
    /// Pages of a chunk (whether the target asked for it, whether this is
    /// the chunk's first piece).
    Piece(u64, File, usize, std::ops::Range<usize>, bool, bool),
    End(u64, File),
}

fn next_job(sh: &SendShared) -> Option<Job> {
    let mut st = lock(&sh.st);
    loop {
        if st.ended {
            return None;
        }
        // After a failed write, nothing more on that connection.
        if let Some((g, c)) = st.conn.as_ref().filter(|_| st.broken.is_none()) {
            let (g, file) = (*g, c.try_clone().map(File::from));
            let Ok(file) = file else {
                drop(st);
                lost(sh, g, "cannot use the connection".into());
                st = lock(&sh.st);
                continue;
            };
            if st.head_pending {
                st.head_pending = false;
                return Some(Job::Head(g, file));
            }
            // The target waits for it to run the guest.
            if st.go_due {
                st.go_due = false;
                return Some(Job::Go(g, file));
            }
            // A page a thread waits on goes before anything else, then its
            // chunk.
            if let Some(off) = st.urgent_pages.pop_front() {
                return Some(Job::Page(g, file, off));
            }
            // A chunk the target asked for goes first, piece by piece —
            // paced like every piece (below): the page its thread waits on
            // went first, and a whole chunk at once would hold up the next
            // page asked for by 2 MiB. Its pieces overtake those of the
            // chunk being pushed.
            if st.asked.is_none() {
                if let Some((k, start)) = st.urgent.pop_front() {
                    if st.pushing.is_some_and(|w| w.k == k) {
                        // Being pushed already: it goes on, first.
                        st.asked = st.pushing.take();
                    } else if !st.sent[k] {
                        st.sent[k] = true;
                        // The order follows the guest: what comes after the
                        // chunk it touched is what it will touch next.
                        st.next = k + 1;
                        let pages = (sh.chunks[k].1 / PAGE_SIZE) as usize;
                        st.asked = Some(OnWay::new(k, start.min(pages - 1), pages));
                    }
                    continue;
                }
            }
            let on_way = st
                .asked
                .map(|a| (a, true))
                .or(st.pushing.map(|p| (p, false)));
            if let Some((w, urgent)) = on_way {
                if ahead(&st) {
                    st = sh.cv.wait(st).unwrap_or_else(|e| e.into_inner());
                    continue;
                }
                let (piece, left) = w.take((sh.chunks[w.k].1 / PAGE_SIZE) as usize);
                if urgent {
                    st.asked = left;
                } else {
                    st.pushing = left;
                }
                return Some(Job::Piece(g, file, w.k, piece, urgent, w.next == w.start));
            }
            // The rest goes once the target runs the guest: before, it would
            // only compete with the switch for the link and the CPUs.
            if !st.switched {
                st = sh.cv.wait(st).unwrap_or_else(|e| e.into_inner());
                continue;
            }
            // Pushed chunks wait while the target has not yet taken in all
            // but the pacer's limit of what was pushed: a page or chunk a thread
            // waits on then goes out behind at most that much (and the
            // piece being written), not behind everything queued on the way.
            if ahead(&st) {
                st = sh.cv.wait(st).unwrap_or_else(|e| e.into_inner());
                continue;
            }
            // In order from `next`, then from the start for what was skipped.
            let n = st.sent.len();
            let from = st.next.min(n);
            let found = (from..n).chain(0..from).find(|&k| !st.sent[k]);
            if let Some(k) = found {
                st.sent[k] = true;
                st.next = k + 1;
                st.pushing = Some(OnWay::new(k, 0, (sh.chunks[k].1 / PAGE_SIZE) as usize));
                continue;
            }
            if !st.end_sent {
                st.end_sent = true;
                return Some(Job::End(g, file));
            }
        }
        st = sh.cv.wait(st).unwrap_or_else(|e| e.into_inner());
    }
}

fn push(sh: &SendShared) {
    while let Some(job) = next_job(sh) {
        let (g, r) = match job {
            Job::Head(g, f) => (g, send_head(sh, f, g)),
            Job::Go(g, mut f) => {
                let r = send(&mut f, KIND_GO, 0, &[]);
                crate::kernel::timeline::event("GO sent");
                (g, r)
            }
            Job::Page(g, f, off) => {
                sh.counters.pages_requested.fetch_add(1, Ordering::Relaxed);
                (g, send_page(sh, f, off))
            }
            Job::Piece(g, f, k, pages, urgent, first) => {
                if first {
                    let c = if urgent {
                        &sh.counters.chunks_requested
                    } else {
                        &sh.counters.chunks_pushed
                    };
                    c.fetch_add(1, Ordering::Relaxed);
                }
                let r = send_piece(sh, f, k, pages);
                if let Ok(n) = r {
                    let mut st = lock(&sh.st);
                    if st.generation == g {
                        st.piece_bytes += n as u64;
                        let end = st.piece_bytes;
                        st.pacer.wrote(end, Instant::now());
                    }
                }
                (g, r.map(|_| ()))
            }
            Job::End(g, mut f) => {
                let end = [0u8; 16];
                (g, send(&mut f, KIND_END, 0, &end))
            }
        };
        if let Err(e) = r {
            write_failed(sh, g, format!("cannot send to the target: {e}"));
        }
    }
}

/// A write on connection `g` failed. The target may have said DONE and
/// closed just before (its DONE then waits in our receive buffer): the
/// reader, woken by the shutdown, reads what is there and decides.
fn write_failed(sh: &SendShared, g: u64, why: String) {
    let mut st = lock(&sh.st);
    match &st.conn {
        Some((cg, c)) if *cg == g && !st.ended => {
            shutdown(c);
            st.broken = Some(why);
        }
        _ => {}
    }
}

fn send_head(sh: &SendShared, f: File, g: u64) -> io::Result<()> {
    let mut w = BufWriter::with_capacity(1 << 20, f);
    let first = g == 1;
    let flags = if first {
        FLAG_LIVE | FLAG_HANDOVER | FLAG_PAGES | FLAG_PIECES | FLAG_ROTATED
    } else {
        FLAG_LIVE | FLAG_RESUME | FLAG_HANDOVER | FLAG_PAGES | FLAG_PIECES | FLAG_ROTATED
    };
    if !first || sh.stale.is_none() {
        w.write_all(&encode_stream_header(sh.image_len, &sh.layout, flags))?;
    }
    if first {
        for (i, part) in sh.state.chunks(MAX_RECORD).enumerate() {
            w.write_all(&record_head(KIND_STATE, (i * MAX_RECORD) as u64, part))?;
            w.write_all(part)?;
        }
        for &(off, host) in &sh.early {
            // SAFETY: the page lies in a RamRange the caller of `start` keeps
            // mapped and unwritten while this sender lives.
            let page = unsafe { std::slice::from_raw_parts(host as *const u8, PAGE_SIZE as usize) };
            w.write_all(&record_head(KIND_PAGE, off, page))?;
            w.write_all(page)?;
        }
        if let Some(stale) = &sh.stale {
            w.write_all(&record_head(KIND_STALE, 0, stale))?;
            w.write_all(stale)?;
        }
        let mut sw = sh.id.to_vec();
        sw.extend_from_slice(&(sh.state.len() as u64).to_le_bytes());
        sw.extend_from_slice(&crc32fast::hash(&sh.state).to_le_bytes());
        w.write_all(&record_head(KIND_SWITCH, 0, &sw))?;
        w.write_all(&sw)?;
    } else {
        w.write_all(&record_head(KIND_RESUME, 0, &sh.id))?;
        w.write_all(&sh.id)?;
    }
    w.flush()?;
    sh.counters
        .bytes_sent
        .fetch_add(sh.state.len() as u64 + 4096, Ordering::Relaxed);
    Ok(())
}

/// One page of RAM (image offset `off`, checked by the reader) as a PAGE record.
fn send_page(sh: &SendShared, mut f: File, off: u64) -> io::Result<()> {
    let Some((k, start, _)) = chunk_at(&sh.layout, off) else {
        return Ok(());
    };
    let host = sh.chunks[k].0 + (off - start);
    // SAFETY: the page lies in a RamRange the caller of `start` keeps mapped
    // and unwritten while this sender lives.
    let page = unsafe { std::slice::from_raw_parts(host as *const u8, PAGE_SIZE as usize) };
    send(&mut f, KIND_PAGE, off, page)?;
    sh.counters
        .bytes_sent
        .fetch_add(PAGE_SIZE + 24, Ordering::Relaxed);
    Ok(())
}

/// Pages `pages` of chunk `k` as a PIECE record.
fn send_piece(
    sh: &SendShared,
    f: File,
    k: usize,
    pages: std::ops::Range<usize>,
) -> io::Result<usize> {
    let (host, len) = sh.chunks[k];
    let page = PAGE_SIZE as usize;
    let end = (pages.end * page).min(len as usize);
    // SAFETY: the pages lie in a chunk of a RamRange the caller of `start`
    // keeps mapped and unwritten while this sender lives.
    let mem = unsafe {
        std::slice::from_raw_parts(
            (host as usize + pages.start * page) as *const u8,
            end - pages.start * page,
        )
    };
    let mut prefix = (pages.start as u32).to_le_bytes().to_vec();
    prefix.extend_from_slice(&(pages.len() as u32).to_le_bytes());
    let (plen, zero) = write_pages(f, KIND_PIECE, k, &prefix, pages.len().div_ceil(8), mem)?;
    if zero && pages.start == 0 && end == len as usize {
        sh.counters.zero_chunks.fetch_add(1, Ordering::Relaxed);
    }
    sh.counters
        .bytes_sent
        .fetch_add(plen as u64, Ordering::Relaxed);
    Ok(plen)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PIECE: u64 = PIECE_PAGES as u64 * PAGE_SIZE;

    /// A piece written every `every`, each reported taken in `lag` after
    /// its write; returns the limit after `n` pieces.
    fn paced(n: u64, every: Duration, lag: Duration) -> u64 {
        let t0 = Instant::now();
        let mut p = Pacer::default();
        let mut reports = Vec::new();
        for i in 1..=n {
            let at = t0 + every * i as u32;
            p.wrote(i * PIECE, at);
            reports.push((i * PIECE, at + lag));
        }
        for (bytes, at) in reports {
            p.consumed(bytes, at);
        }
        p.limit()
    }

    #[test]
    fn before_any_report_the_push_may_run_the_default_ahead() {
        // The least a measured path allows: the guest's first faults after
        // the switch come before any measurement.
        assert_eq!(Pacer::default().limit(), MIN_AHEAD);
        // One report gives a round trip but no rate yet.
        let mut p = Pacer::default();
        let t0 = Instant::now();
        p.wrote(PIECE, t0);
        p.consumed(PIECE, t0 + Duration::from_millis(1));
        assert_eq!(p.limit(), MIN_AHEAD);
    }

    #[test]
    fn the_limit_is_what_the_path_holds_plus_a_millisecond() {
        // 128 KiB a millisecond (about 1 Gbit/s).
        let ms = Duration::from_millis(1);
        // A local link: a piece is taken in a millisecond after its write.
        let near = paced(64, ms, ms);
        // 131 KB/ms over 1 ms of path and 1 ms of queue: 262 KB.
        assert!((250_000..280_000).contains(&near), "{near}");
        // Three milliseconds away: 131 KB/ms over 4 ms.
        let far = paced(64, ms, 3 * ms);
        assert!((500_000..560_000).contains(&far), "{far}");
        // Never less than two pieces, never more than MAX_AHEAD.
        assert_eq!(paced(64, 10 * ms, Duration::ZERO), MIN_AHEAD);
        assert_eq!(paced(400, Duration::from_micros(50), 100 * ms), MAX_AHEAD);
    }

    #[test]
    fn the_shortest_round_trip_is_kept_when_queues_grow() {
        let t0 = Instant::now();
        let ms = Duration::from_millis(1);
        let mut p = Pacer::default();
        for i in 1..=32u32 {
            p.wrote(i as u64 * PIECE, t0 + ms * i);
        }
        // The first piece came back in 1 ms, later ones queued longer.
        for i in 1..=32u32 {
            p.consumed(i as u64 * PIECE, t0 + ms * i + ms * i.min(8));
        }
        assert_eq!(p.min_rtt, Some(ms));
    }
}
