//! The listening server: one accept thread, and per client a reader
//! thread (parses and runs commands in order) and a writer thread
//! (drains the client's bounded queue to the socket).

use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::addr::ListenAddr;
use crate::error::QmpError;
use crate::events::{write_loop, ClientHandle, EventBus};
use crate::machine::Machine;
use crate::protocol::greeting_line;
use crate::session::Session;
use crate::socket::{bind, Conn, Listener, SocketFile};

/// Most simultaneous connections per server. When it is reached, a new client
/// takes the place of the oldest connection that never negotiated; when every
/// one has negotiated, the new one is refused (closed).
pub const MAX_CLIENTS: usize = 64;

/// A connection that has not completed `qmp_capabilities` by then is closed, so
/// idle connections cannot hold the server's slots.
pub const NEGOTIATION_TIMEOUT: Duration = Duration::from_secs(30);

/// How long `quit` waits for its reply to be written before calling
/// [`Machine::quit`].
const QUIT_FLUSH_TIMEOUT: Duration = Duration::from_secs(1);

static NEXT_CLIENT_ID: AtomicU64 = AtomicU64::new(1);

/// A running QMP server. Dropping it (or calling [`Server::shutdown`])
/// stops accepting, disconnects its clients and removes its unix socket.
pub struct Server {
    bus: EventBus,
    local_addr: String,
    wake: UnixStream,
    accept_thread: Option<JoinHandle<()>>,
    client_ids: Arc<Mutex<Vec<u64>>>,
    _socket_file: Option<SocketFile>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("local_addr", &self.local_addr)
            .finish()
    }
}

impl Server {
    /// Binds `addr` and starts serving with a new [`EventBus`].
    pub fn start(addr: &ListenAddr, machine: Arc<dyn Machine>) -> Result<Server, QmpError> {
        Self::start_with_events(addr, machine, EventBus::new())
    }

    /// Like [`Server::start`] but shares an existing bus, e.g. to serve
    /// the same events on several addresses.
    pub fn start_with_events(
        addr: &ListenAddr,
        machine: Arc<dyn Machine>,
        bus: EventBus,
    ) -> Result<Server, QmpError> {
        let (listener, local_addr, socket_file) = bind(addr)?;
        listener.set_nonblocking(true)?;
        let (wake, wake_rx) = UnixStream::pair()?;
        let client_ids = Arc::new(Mutex::new(Vec::new()));
        let ctx = AcceptCtx {
            bus: bus.clone(),
            machine,
            client_ids: client_ids.clone(),
        };
        let accept_thread = std::thread::Builder::new()
            .name("qmp-accept".into())
            .spawn(move || accept_loop(listener, wake_rx, ctx))?;
        tracing::info!("QMP server listening on {local_addr}");
        Ok(Server {
            bus,
            local_addr,
            wake,
            accept_thread: Some(accept_thread),
            client_ids,
            _socket_file: socket_file,
        })
    }

    /// The bus on which the VMM emits events.
    pub fn events(&self) -> EventBus {
        self.bus.clone()
    }

    /// The bound address, e.g. `unix:/run/qmp.sock` or
    /// `tcp:127.0.0.1:41234` (the real port when 0 was asked for).
    pub fn local_addr(&self) -> String {
        self.local_addr.clone()
    }

    /// Stops the server; same as dropping it.
    pub fn shutdown(self) {}
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.wake.shutdown(std::net::Shutdown::Both);
        if let Some(t) = self.accept_thread.take() {
            let _ = t.join();
        }
        let ids = self
            .client_ids
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        self.bus.close_clients(&ids);
    }
}

struct AcceptCtx {
    bus: EventBus,
    machine: Arc<dyn Machine>,
    client_ids: Arc<Mutex<Vec<u64>>>,
}

fn accept_loop(listener: Listener, wake: UnixStream, ctx: AcceptCtx) {
    loop {
        let mut fds = [
            libc::pollfd {
                fd: listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid, writable array of two pollfd structs
        // that outlives the call, and its length is passed correctly.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if r < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            tracing::error!("QMP accept loop: poll failed: {err}");
            return;
        }
        if fds[1].revents != 0 {
            return;
        }
        if fds[0].revents == 0 {
            continue;
        }
        match listener.accept() {
            Ok(conn) => {
                ctx.client_ids
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .retain(|id| ctx.bus.is_connected(*id));
                if ctx.bus.connection_count() >= MAX_CLIENTS {
                    if !ctx.bus.evict_oldest_unnegotiated() {
                        tracing::warn!(
                            "QMP: too many clients ({MAX_CLIENTS}), refusing a connection"
                        );
                        continue;
                    }
                    tracing::warn!(
                        "QMP: {MAX_CLIENTS} connections; closed the oldest that never negotiated"
                    );
                }
                if let Err(e) = spawn_client(conn, &ctx) {
                    tracing::warn!("QMP: cannot serve new client: {e}");
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                // e.g. EMFILE: do not spin.
                tracing::warn!("QMP accept failed: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

fn spawn_client(conn: Conn, ctx: &AcceptCtx) -> io::Result<()> {
    conn.set_nonblocking(false)?;
    let id = NEXT_CLIENT_ID.fetch_add(1, Ordering::Relaxed);
    let reader_conn = conn.try_clone()?;
    let writer_conn = conn.try_clone()?;
    let (handle, rx) = ClientHandle::new(id, conn);
    let handle = Arc::new(handle);
    let shared = handle.shared.clone();
    std::thread::Builder::new()
        .name(format!("qmp-writer-{id}"))
        .spawn(move || write_loop(shared, writer_conn, rx))?;
    ctx.bus.add(handle.clone());
    ctx.client_ids
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(id);
    let bus = ctx.bus.clone();
    let machine = ctx.machine.clone();
    let spawned = std::thread::Builder::new()
        .name(format!("qmp-reader-{id}"))
        .spawn({
            let handle = handle.clone();
            move || read_loop(reader_conn, handle, bus, machine)
        });
    if let Err(e) = spawned {
        ctx.bus.remove(id);
        handle.shared.close();
        return Err(e);
    }
    tracing::debug!(client = id, "QMP client connected");
    Ok(())
}

fn read_loop(mut conn: Conn, handle: Arc<ClientHandle>, bus: EventBus, machine: Arc<dyn Machine>) {
    let mut session = Session::new(machine.clone());
    let mut buf = vec![0u8; 16 * 1024];
    let mut negotiated = conn.set_read_timeout(Some(NEGOTIATION_TIMEOUT)).is_err();
    if handle.send_reply(greeting_line()).is_ok() {
        'outer: loop {
            let mut fds = Vec::new();
            let got = match &conn {
                Conn::Unix(s) => crate::fds::recv_with_fds(s, &mut buf, &mut fds),
                Conn::Tcp(_) => conn.read(&mut buf),
            };
            session.add_fds(fds);
            let n = match got {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e)
                    if !negotiated
                        && matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                        ) =>
                {
                    tracing::warn!(
                        client = handle.id,
                        "QMP client did not negotiate within {NEGOTIATION_TIMEOUT:?}; disconnecting it"
                    );
                    break;
                }
                Err(_) => break,
            };
            for reply in session.feed(&buf[..n]) {
                let sent = if reply.negotiated {
                    negotiated = true;
                    let _ = conn.set_read_timeout(None);
                    bus.send_negotiated_reply(&handle, reply.line)
                } else {
                    handle.send_reply(reply.line)
                };
                if sent.is_err() {
                    break 'outer;
                }
                if reply.quit {
                    handle.shared.wait_flushed(QUIT_FLUSH_TIMEOUT);
                    let _ = machine.request(crate::machine::Request::Quit);
                }
            }
        }
    }
    tracing::debug!(client = handle.id, "QMP client disconnected");
    // Dropping the last senders lets the writer drain the queue and close.
    bus.remove(handle.id);
}
