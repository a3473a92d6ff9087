//! An incoming stream (`--incoming` / `migrate-incoming` with unix:, tcp:,
//! exec: or fd:): the listener is bound on the controller thread (so the
//! sender may connect as soon as the command returns), the stream is read
//! on a thread of its own, and the controller builds the machine from what
//! it delivers ([`AppEvent::Incoming`]). QMP keeps answering meanwhile.
//!
//! A connection that does not start with the stream magic (a port scanner,
//! a stray client), or that sends nothing past its stream header within
//! [`FIRST_WAIT`] (it stalled or closed), is closed and the listener waits
//! for the next one; a stream that began, then failed, fails the incoming
//! migration.

use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use super::event::AppEvent;
use crate::snapshot::restore::{self, RestoreError};
use crate::snapshot::transport::{Listening, Uri};

/// What an incoming stream delivered.
pub enum Received {
    /// A whole image: RAM is here.
    Image {
        restored: restore::Restored,
        /// Stream bytes read.
        bytes: u64,
        /// Who sent it.
        peer: String,
    },
    /// A live migration at its switch: RAM comes on demand.
    Live {
        switch: livesnap::postcopy::Switch,
        state: vmm::MachineState,
        peer: String,
    },
}

impl std::fmt::Debug for Received {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Received::Image { peer, bytes, .. } => write!(f, "image of {bytes} bytes from {peer}"),
            Received::Live { peer, .. } => write!(f, "live migration from {peer}"),
        }
    }
}

/// Binds / starts the source of `uri` and reads it on a new thread; returns
/// the bound address (`tcp:IP:PORT`, for a port 0 the real one).
pub(super) fn start(uri: &Uri, tx: &mpsc::Sender<AppEvent>) -> Result<Option<String>, String> {
    let mut l = Listening::bind(uri).map_err(|e| e.to_string())?;
    let addr = l.local_addr();
    if let Some(a) = &addr {
        tracing::info!("waiting for an incoming stream on {a}");
    }
    let tx = tx.clone();
    std::thread::Builder::new()
        .name("incoming".into())
        .spawn(move || {
            let r = receive(&mut l);
            let _ = tx.send(AppEvent::Incoming(r.map(Box::new)));
        })
        .map_err(|e| format!("cannot start the incoming thread: {e}"))?;
    Ok(addr)
}

fn receive(l: &mut Listening) -> Result<Received, String> {
    loop {
        let inc = l.accept().map_err(|e| format!("cannot accept: {e}"))?;
        let peer = inc.peer.clone();
        let socket = !matches!(l, Listening::Ready(_));
        match receive_one(inc, &peer) {
            Ok(r) => return Ok(r),
            // A connection that never became a snapvmm stream (a scanner, a
            // stray client, one that says nothing, or stops or closes right
            // after its header): closed, the next one may be.
            Err((true, e)) if socket => {
                tracing::warn!(
                    "{peer}: dropped, no stream began ({e}); waiting for the next sender"
                );
            }
            Err((_, e)) => return Err(format!("incoming stream from {peer}: {e}")),
        }
    }
}

/// How long a new connection may take to send its stream header and the
/// first bytes after it: a peer slower than that is dropped, and the
/// listener serves the next one.
const FIRST_WAIT: Duration = Duration::from_secs(5);
/// How long a stream that began may then be silent: the rest of a live
/// migration's device state, an image stream's records.
const STREAM_WAIT: Duration = Duration::from_secs(60);

/// The read half of an incoming connection: counts what it read, gives the
/// connection `then` as its timeout once a byte past `header` bytes came,
/// and says "timed out" when a read times out.
struct Watched {
    file: std::fs::File,
    sock: OwnedFd,
    read: Arc<AtomicU64>,
    header: Arc<AtomicU64>,
    then: Duration,
    limit: Duration,
}

impl Read for Watched {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        // Past the header already (read ahead with it): the stream began.
        self.began();
        match self.file.read(buf) {
            Ok(n) => {
                self.read.fetch_add(n as u64, Ordering::Relaxed);
                self.began();
                Ok(n)
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "timed out: the peer sent nothing for {} s",
                        self.limit.as_secs()
                    ),
                ))
            }
            Err(e) => Err(e),
        }
    }
}

impl Watched {
    /// Once a byte past the header came (the header's length is known once
    /// parsed), the connection's timeout becomes `then`.
    fn began(&mut self) {
        let h = self.header.load(Ordering::Relaxed);
        if h > 0 && self.limit != self.then && self.read.load(Ordering::Relaxed) > h {
            set_timeout(&self.sock, Some(self.then));
            self.limit = self.then;
        }
    }
}

fn set_timeout(sock: &OwnedFd, t: Option<Duration>) {
    let tv = t.map_or(
        libc::timeval {
            tv_sec: 0,
            tv_usec: 0,
        },
        |t| libc::timeval {
            tv_sec: t.as_secs() as libc::time_t,
            tv_usec: 0,
        },
    );
    // SAFETY: setsockopt with a pointer to a live timeval and its size.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
}

/// Reads one incoming stream; an error says whether it came before the
/// stream header was read (true).
fn receive_one(
    mut inc: crate::snapshot::transport::Incoming,
    peer: &str,
) -> Result<Received, (bool, RestoreError)> {
    use livesnap::stream::StreamReader;
    let Some(sock) = inc.socket() else {
        // A command's output, a file: an image stream only.
        let (restored, got) = match restore::from_stream(&mut inc) {
            Ok(r) => r,
            // Say how a command that produced it ended, too (one still
            // running, e.g. silent past the limit, is stopped).
            Err(e) => {
                return Err((
                    false,
                    match inc.fail() {
                        Some(why) => RestoreError::Transport(format!("{e} ({why})")),
                        None => e,
                    },
                ))
            }
        };
        inc.finish()
            .map_err(|e| (false, RestoreError::Transport(e.to_string())))?;
        return Ok(Received::Image {
            restored,
            bytes: got.stream_bytes,
            peer: peer.to_string(),
        });
    };
    set_timeout(&sock, Some(FIRST_WAIT));
    let dup = |s: &OwnedFd| {
        s.try_clone().map_err(|e| {
            (
                true,
                RestoreError::Transport(format!("incoming connection: {e}")),
            )
        })
    };
    let (read, header) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let watched = Watched {
        file: std::fs::File::from(dup(&sock)?),
        sock: dup(&sock)?,
        read: read.clone(),
        header: header.clone(),
        then: STREAM_WAIT,
        limit: FIRST_WAIT,
    };
    let (reader, layout) = StreamReader::start(watched).map_err(|e| (true, e.into()))?;
    // Nothing past the header yet: a failure now is a bad peer, not a
    // stream that began (the listener goes on). The header's own length,
    // not what was read with it: the reader reads ahead.
    let at_header = reader.header_len();
    header.store(at_header, Ordering::Relaxed);
    if read.load(Ordering::Relaxed) > at_header {
        set_timeout(&sock, Some(STREAM_WAIT));
    }
    let body = |e: RestoreError| (read.load(Ordering::Relaxed) <= at_header, e);
    if layout.live {
        let t0 = std::time::Instant::now();
        let mem = restore::check_stream_layout(&layout).map_err(body)?;
        let switch =
            livesnap::postcopy::receive_switch_from(
                reader,
                layout,
                std::fs::File::from(sock.try_clone().map_err(|e| {
                    body(RestoreError::Transport(format!("incoming connection: {e}")))
                })?),
            )
            .map_err(|e| body(e.into()))?;
        // From here the source may be silent for long (everything sent).
        set_timeout(&sock, None);
        let t1 = t0.elapsed();
        let state = restore::state_for(&switch.device_state, mem).map_err(body)?;
        tracing::debug!(
            receive_us = t1.as_micros() as u64,
            decode_us = (t0.elapsed() - t1).as_micros() as u64,
            bytes = switch.device_state.len(),
            "live migration: device state in"
        );
        return Ok(Received::Live {
            switch,
            state,
            peer: peer.to_string(),
        });
    }
    // The connection's timeout becomes STREAM_WAIT with the first bytes
    // past the header (Watched).
    let (restored, got) = restore::from_started_stream(reader, &layout).map_err(body)?;
    Ok(Received::Image {
        restored,
        bytes: got.stream_bytes,
        peer: peer.to_string(),
    })
}
