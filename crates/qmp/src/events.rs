//! Event fan-out to connected clients, and the per-client outgoing queue.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use crate::json::event_line;
use crate::socket::Conn;

/// Messages a client may have queued before it is considered stuck and
/// disconnected.
pub const CLIENT_QUEUE_CAPACITY: usize = 1024;

/// State shared by a client's reader, writer and the bus.
#[derive(Debug)]
pub(crate) struct Shared {
    /// Lines queued but not yet written.
    pending: AtomicUsize,
    closed: AtomicBool,
    negotiated: AtomicBool,
    conn: Conn,
}

impl Shared {
    /// Marks the client dead and wakes its threads.
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.conn.shutdown();
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    fn flushed(&self) -> bool {
        self.is_closed() || self.pending.load(Ordering::SeqCst) == 0
    }

    /// Waits until every queued line is written (or the client is gone).
    pub(crate) fn wait_flushed(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while !self.flushed() {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }
}

/// The sending side of one client; owned by the bus and the reader.
#[derive(Debug)]
pub(crate) struct ClientHandle {
    pub(crate) id: u64,
    tx: SyncSender<Arc<str>>,
    pub(crate) shared: Arc<Shared>,
}

impl ClientHandle {
    /// Creates the handle and the receiving end for the writer thread.
    pub(crate) fn new(id: u64, conn: Conn) -> (ClientHandle, Receiver<Arc<str>>) {
        let (tx, rx) = std::sync::mpsc::sync_channel(CLIENT_QUEUE_CAPACITY);
        let shared = Arc::new(Shared {
            pending: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
            negotiated: AtomicBool::new(false),
            conn,
        });
        (ClientHandle { id, tx, shared }, rx)
    }

    /// Queues a reply, waiting for room (only the client's own reader
    /// calls this, so only that client is slowed down).
    pub(crate) fn send_reply(&self, line: String) -> Result<(), ()> {
        self.shared.pending.fetch_add(1, Ordering::SeqCst);
        self.tx.send(line.into()).map_err(|_| {
            self.shared.pending.fetch_sub(1, Ordering::SeqCst);
        })
    }

    /// Queues an event without blocking; false if the client must go.
    fn try_send_event(&self, line: &Arc<str>) -> bool {
        self.shared.pending.fetch_add(1, Ordering::SeqCst);
        match self.tx.try_send(line.clone()) {
            Ok(()) => true,
            Err(err) => {
                self.shared.pending.fetch_sub(1, Ordering::SeqCst);
                if let TrySendError::Full(_) = err {
                    tracing::warn!(
                        client = self.id,
                        "QMP client does not read its messages ({CLIENT_QUEUE_CAPACITY} queued); disconnecting it"
                    );
                }
                self.shared.close();
                false
            }
        }
    }
}

/// Writer thread body: writes queued lines until the queue closes.
pub(crate) fn write_loop(shared: Arc<Shared>, mut conn: Conn, rx: Receiver<Arc<str>>) {
    use std::io::Write;
    for line in rx {
        let result = conn.write_all(line.as_bytes());
        shared.pending.fetch_sub(1, Ordering::SeqCst);
        if let Err(e) = result {
            tracing::debug!("QMP client write failed: {e}");
            break;
        }
    }
    shared.close();
}

/// Broadcasts QMP events to every negotiated client. Cheap to clone;
/// never blocks on a client.
#[derive(Debug, Clone, Default)]
pub struct EventBus {
    clients: Arc<Mutex<Vec<Arc<ClientHandle>>>>,
}

impl EventBus {
    /// A bus with no clients yet (see [`crate::Server::start_with_events`]).
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Arc<ClientHandle>>> {
        self.clients.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends `{"timestamp": ..., "event": NAME, "data": DATA}` to every
    /// client that completed capabilities negotiation. Never blocks: a
    /// client whose queue is full is disconnected instead.
    pub fn emit(&self, name: &str, data: Option<Value>) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let secs = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);
        let line: Arc<str> =
            event_line(name, data.as_ref(), secs, i64::from(now.subsec_micros())).into();
        self.lock().retain(|c| {
            if c.shared.is_closed() {
                return false;
            }
            if !c.shared.negotiated.load(Ordering::SeqCst) {
                return true;
            }
            c.try_send_event(&line)
        });
    }

    /// Waits until everything queued for the connected clients has been
    /// written to their sockets, or `timeout` passes. Returns true if all
    /// was written. Use before exiting so that a final `SHUTDOWN` event
    /// reaches the clients.
    pub fn flush(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let clients: Vec<Arc<ClientHandle>> = self.lock().clone();
        clients.iter().all(|c| {
            c.shared
                .wait_flushed(deadline.saturating_duration_since(Instant::now()))
        })
    }

    /// Number of connected clients that completed negotiation.
    pub fn client_count(&self) -> usize {
        self.lock()
            .iter()
            .filter(|c| !c.shared.is_closed() && c.shared.negotiated.load(Ordering::SeqCst))
            .count()
    }

    /// Number of connections, negotiated or not.
    pub(crate) fn connection_count(&self) -> usize {
        self.lock().iter().filter(|c| !c.shared.is_closed()).count()
    }

    /// Closes the oldest connection that has not negotiated yet (to make room for
    /// a fresh client when the server is full); false if every one negotiated.
    pub(crate) fn evict_oldest_unnegotiated(&self) -> bool {
        let clients = self.lock();
        let victim = clients
            .iter()
            .find(|c| !c.shared.is_closed() && !c.shared.negotiated.load(Ordering::SeqCst));
        match victim {
            Some(c) => {
                c.shared.close();
                true
            }
            None => false,
        }
    }

    pub(crate) fn is_connected(&self, id: u64) -> bool {
        self.lock()
            .iter()
            .any(|c| c.id == id && !c.shared.is_closed())
    }

    /// Queues the reply that completes negotiation and enables events
    /// for the client, atomically with respect to [`EventBus::emit`], so
    /// that no event precedes the reply and none emitted after it is lost.
    pub(crate) fn send_negotiated_reply(
        &self,
        client: &ClientHandle,
        line: String,
    ) -> Result<(), ()> {
        let _clients = self.lock();
        client.shared.pending.fetch_add(1, Ordering::SeqCst);
        if client.tx.try_send(line.into()).is_err() {
            client.shared.pending.fetch_sub(1, Ordering::SeqCst);
            client.shared.close();
            return Err(());
        }
        client.shared.negotiated.store(true, Ordering::SeqCst);
        Ok(())
    }

    pub(crate) fn add(&self, client: Arc<ClientHandle>) {
        self.lock().push(client);
    }

    pub(crate) fn remove(&self, id: u64) {
        self.lock().retain(|c| c.id != id);
    }

    /// Disconnects the clients accepted by one server.
    pub(crate) fn close_clients(&self, ids: &[u64]) {
        self.lock().retain(|c| {
            if ids.contains(&c.id) {
                c.shared.close();
                false
            } else {
                true
            }
        });
    }
}
