//! An incoming stream (`--incoming` / `migrate-incoming` with unix:, tcp:,
//! exec: or fd:): the listener is bound on the controller thread (so the
//! sender may connect as soon as the command returns), the stream is read
//! on a thread of its own, and the controller builds the machine from what
//! it delivers ([`AppEvent::Incoming`]). QMP keeps answering meanwhile.
//!
//! A connection that does not start with the stream magic (a port scanner,
//! a stray client) is closed at once and the listener waits for the next
//! one; anything else that goes wrong fails the incoming migration.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::mpsc;
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
            // stray client, one that says nothing): closed, the next one may be.
            Err((true, e)) if socket => {
                tracing::warn!("{peer}: not a snapvmm stream ({e}): connection closed");
            }
            Err((_, e)) => return Err(format!("incoming stream from {peer}: {e}")),
        }
    }
}

/// How long a connection may take to say what it is (the stream header and,
/// for a live migration, the device state), and an image stream to go on.
const HEADER_WAIT: Duration = Duration::from_secs(30);
const STREAM_WAIT: Duration = Duration::from_secs(60);

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
            // Say how a command that produced it ended, too.
            Err(e) => {
                return Err((
                    false,
                    match inc.finish() {
                        Err(why) => RestoreError::Transport(format!("{e} ({why})")),
                        Ok(()) => e,
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
    let body = |e: RestoreError| (false, e);
    set_timeout(&sock, Some(HEADER_WAIT));
    let read_half = sock.try_clone().map_err(|e| {
        (
            true,
            RestoreError::Transport(format!("incoming connection: {e}")),
        )
    })?;
    let (reader, layout) =
        StreamReader::start(std::fs::File::from(read_half)).map_err(|e| (true, e.into()))?;
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
    set_timeout(&sock, Some(STREAM_WAIT));
    let (restored, got) = restore::from_started_stream(reader, &layout).map_err(body)?;
    Ok(Received::Image {
        restored,
        bytes: got.stream_bytes,
        peer: peer.to_string(),
    })
}
