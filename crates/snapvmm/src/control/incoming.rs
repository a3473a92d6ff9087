//! An incoming stream (`--incoming` / `migrate-incoming` with unix:, tcp:,
//! exec: or fd:): the listener is bound on the controller thread (so the
//! sender may connect as soon as the command returns), the stream is read
//! on a thread of its own, and the controller builds the machine from what
//! it delivers ([`AppEvent::Incoming`]). QMP keeps answering meanwhile.
//!
//! A connection that does not start with the stream magic (a port scanner,
//! a stray client) is closed at once and the listener waits for the next
//! one; anything else that goes wrong fails the incoming migration.

use std::sync::mpsc;

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
            Err(RestoreError::Image(livesnap::SnapError::NotAStream)) if socket => {
                tracing::warn!("{peer} did not send a snapvmm stream: connection closed");
            }
            Err(e) => return Err(format!("incoming stream from {peer}: {e}")),
        }
    }
}

fn receive_one(
    mut inc: crate::snapshot::transport::Incoming,
    peer: &str,
) -> Result<Received, RestoreError> {
    use livesnap::stream::StreamReader;
    let Some(sock) = inc.socket() else {
        // A command's output, a file: an image stream only.
        let (restored, got) = match restore::from_stream(&mut inc) {
            Ok(r) => r,
            // Say how a command that produced it ended, too.
            Err(e) => {
                return Err(match inc.finish() {
                    Err(why) => RestoreError::Transport(format!("{e} ({why})")),
                    Ok(()) => e,
                })
            }
        };
        inc.finish()
            .map_err(|e| RestoreError::Transport(e.to_string()))?;
        return Ok(Received::Image {
            restored,
            bytes: got.stream_bytes,
            peer: peer.to_string(),
        });
    };
    let (reader, layout) =
        StreamReader::start(std::fs::File::from(sock.try_clone().map_err(|e| {
            RestoreError::Transport(format!("incoming connection: {e}"))
        })?))?;
    if layout.live {
        let t0 = std::time::Instant::now();
        let mem = restore::check_stream_layout(&layout)?;
        let switch =
            livesnap::postcopy::receive_switch_from(reader, layout, std::fs::File::from(sock))?;
        let t1 = t0.elapsed();
        let state = restore::state_for(&switch.device_state, mem)?;
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
    let (restored, got) = restore::from_started_stream(reader, &layout)?;
    Ok(Received::Image {
        restored,
        bytes: got.stream_bytes,
        peer: peer.to_string(),
    })
}
