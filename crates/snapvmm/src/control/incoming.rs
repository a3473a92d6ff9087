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

/// What a complete incoming stream delivered.
#[derive(Debug)]
pub struct Received {
    pub restored: restore::Restored,
    /// Stream bytes read.
    pub bytes: u64,
    /// Who sent it.
    pub peer: String,
}

impl std::fmt::Debug for restore::Restored {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Restored")
            .field("mem_bytes", &self.state.mem_bytes)
            .finish()
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
        let mut inc = l.accept().map_err(|e| format!("cannot accept: {e}"))?;
        let peer = inc.peer.clone();
        let socket = !matches!(l, Listening::Ready(_));
        let mut counted = Counting(&mut inc, 0);
        match restore::from_stream(&mut counted) {
            Ok((restored, _)) => {
                let bytes = counted.1;
                inc.finish()
                    .map_err(|e| format!("incoming stream from {peer}: {e}"))?;
                return Ok(Received {
                    restored,
                    bytes,
                    peer,
                });
            }
            Err(RestoreError::Image(livesnap::SnapError::NotAStream)) if socket => {
                tracing::warn!("{peer} did not send a snapvmm stream: connection closed");
                inc.close();
            }
            Err(e) => {
                inc.close();
                return Err(format!("incoming stream from {peer}: {e}"));
            }
        }
    }
}

/// Counts the bytes read through it.
struct Counting<'a, R>(&'a mut R, u64);

impl<R: std::io::Read> std::io::Read for Counting<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.0.read(buf)?;
        self.1 += n as u64;
        Ok(n)
    }
}
