//! QEMU's migration URIs, both directions: `file:PATH`, `unix:PATH`,
//! `tcp:HOST:PORT`, `exec:COMMAND` and `fd:NAME`.
//!
//! `file:` is the random-access image (written in place, restored lazily);
//! every other URI carries the stream form (`livesnap::stream`). Nothing
//! here encrypts: a stream across an untrusted network goes through
//! `exec:ssh …` (or any tunnel the user trusts), as with QEMU without TLS.
//! A listener binds only the address the user gives.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Duration;

use livesnap::stream::StreamWrite;

/// How long a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the sender waits for the receiver to close after the end.
const CLOSE_WAIT: Duration = Duration::from_secs(60);

/// A parsed migration URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Uri {
    File(PathBuf),
    Unix(PathBuf),
    /// `HOST:PORT` (an IPv6 host in brackets).
    Tcp(String),
    /// A shell command line (`/bin/sh -c`).
    Exec(String),
    /// A descriptor named with QMP `getfd`.
    Fd(String),
}

impl Uri {
    /// Parses `uri`; the error is QMP's message.
    pub fn parse(uri: &str) -> Result<Uri, String> {
        let bad = |why: &str| format!("Invalid migration URI '{uri}': {why}");
        let (scheme, rest) = uri.split_once(':').ok_or_else(|| {
            bad("expected file:PATH, unix:PATH, tcp:HOST:PORT, exec:COMMAND or fd:NAME")
        })?;
        if rest.is_empty() {
            return Err(bad("nothing after the scheme"));
        }
        match scheme {
            "file" => match rest.split_once(',') {
                // QEMU's `file:PATH,offset=N`: refused rather than silently dropped.
                Some((_, opts)) => Err(bad(&format!("file: options ('{opts}') are not supported"))),
                None => Ok(Uri::File(PathBuf::from(rest))),
            },
            "unix" => Ok(Uri::Unix(PathBuf::from(rest))),
            "tcp" => {
                let (host, port) = rest
                    .rsplit_once(':')
                    .ok_or_else(|| bad("tcp: needs HOST:PORT"))?;
                if host.is_empty() || port.parse::<u16>().is_err() {
                    return Err(bad("tcp: needs HOST:PORT with a port number"));
                }
                Ok(Uri::Tcp(rest.to_string()))
            }
            "exec" => Ok(Uri::Exec(rest.to_string())),
            "fd" => Ok(Uri::Fd(rest.to_string())),
            other => Err(bad(&format!(
                "unknown transport '{other}' (snapvmm speaks file:, unix:, tcp:, exec: and fd:)"
            ))),
        }
    }

    /// Whether this URI carries the stream form (everything but `file:`).
    pub fn is_stream(&self) -> bool {
        !matches!(self, Uri::File(_))
    }
}

/// `HOST:PORT` with brackets around an IPv6 host removed for the resolver.
fn socket_addrs(hp: &str) -> io::Result<Vec<std::net::SocketAddr>> {
    let (h, p) = hp.rsplit_once(':').expect("checked by Uri::parse");
    let h = h.trim_start_matches('[').trim_end_matches(']');
    let port: u16 = p
        .parse()
        .map_err(|_| io::Error::other(format!("bad port '{p}'")))?;
    Ok((h, port).to_socket_addrs()?.collect())
}

/// Whether `uri` names a connection both ways (unix, tcp, or a passed
/// socket): what a live migration needs.
pub fn is_connection(uri: &Uri) -> bool {
    match uri {
        Uri::Unix(_) | Uri::Tcp(_) => true,
        Uri::Fd(name) => qmp::peek_fd(name, |fd| is_socket(fd.as_raw_fd())).unwrap_or(false),
        Uri::File(_) | Uri::Exec(_) => false,
    }
}

fn is_socket(fd: i32) -> bool {
    // SAFETY: fstat into a zeroed stat struct on a descriptor the caller holds.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        libc::fstat(fd, &mut st) == 0 && (st.st_mode & libc::S_IFMT) == libc::S_IFSOCK
    }
}

/// Connects to `uri` (unix, tcp) or takes its passed socket (fd): the
/// connection of a live migration.
pub fn connect_socket(uri: &Uri) -> io::Result<OwnedFd> {
    match uri {
        Uri::Unix(p) => Ok(OwnedFd::from(connect_unix(p)?)),
        Uri::Tcp(hp) => Ok(OwnedFd::from(connect_tcp(hp)?)),
        Uri::Fd(name) if is_connection(uri) => take_fd(name),
        _ => Err(io::Error::other(
            "live migration needs a connection both ways (unix:, tcp: or a socket passed with getfd)",
        )),
    }
}

fn connect_unix(p: &Path) -> io::Result<UnixStream> {
    UnixStream::connect(p)
        .map_err(|e| io::Error::new(e.kind(), format!("connect to {}: {e}", p.display())))
}

/// A dead peer or link is noticed within seconds, not TCP's default
/// quarter of an hour: data unacknowledged for [`USER_TIMEOUT_MS`], or no
/// answer to keepalives sent after 5 s of silence.
fn tune_tcp(s: &TcpStream) -> io::Result<()> {
    s.set_nodelay(true)?;
    let fd = s.as_raw_fd();
    for (level, opt, val) in [
        (libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1),
        (libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 5),
        (libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 1),
        (libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 5),
        (libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, USER_TIMEOUT_MS),
    ] {
        // SAFETY: setsockopt with a pointer to a live c_int and its size.
        let r = unsafe {
            libc::setsockopt(
                fd,
                level,
                opt,
                (&val as *const i32).cast(),
                std::mem::size_of::<i32>() as libc::socklen_t,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// TCP_USER_TIMEOUT of migration connections.
const USER_TIMEOUT_MS: i32 = 10_000;

fn connect_tcp(hp: &str) -> io::Result<TcpStream> {
    let mut last = io::Error::other(format!("{hp} resolves to no address"));
    for a in socket_addrs(hp)? {
        match TcpStream::connect_timeout(&a, CONNECT_TIMEOUT) {
            Ok(s) => {
                tune_tcp(&s)?;
                return Ok(s);
            }
            Err(e) => last = io::Error::new(e.kind(), format!("connect to {a}: {e}")),
        }
    }
    Err(last)
}

/// The sending end of a stream.
pub struct Outgoing {
    out: Out,
    /// `complete` or `abandon` ran: nothing left to release.
    settled: bool,
}

impl Drop for Outgoing {
    /// Never used (the capture failed before its sink began): release the
    /// far end as a failure, reaping a command.
    fn drop(&mut self) {
        if !self.settled {
            self.abandon();
        }
    }
}

enum Out {
    Unix(UnixStream),
    Tcp(TcpStream),
    Exec {
        child: Child,
        stdin: Option<ChildStdin>,
        cmd: String,
    },
    Fd(File),
}

impl Outgoing {
    /// Connects (socket), starts the command (exec) or takes the named
    /// descriptor (fd). Not for `file:`.
    pub fn connect(uri: &Uri) -> io::Result<Outgoing> {
        let out = match uri {
            Uri::File(_) => unreachable!("file: is written in place"),
            Uri::Unix(p) => Out::Unix(UnixStream::connect(p).map_err(|e| {
                io::Error::new(e.kind(), format!("connect to {}: {e}", p.display()))
            })?),
            Uri::Tcp(hp) => {
                let mut last = io::Error::other(format!("{hp} resolves to no address"));
                let mut got = None;
                for a in socket_addrs(hp)? {
                    match TcpStream::connect_timeout(&a, CONNECT_TIMEOUT) {
                        Ok(s) => {
                            got = Some(s);
                            break;
                        }
                        Err(e) => last = io::Error::new(e.kind(), format!("connect to {a}: {e}")),
                    }
                }
                let s = got.ok_or(last)?;
                s.set_nodelay(true)?;
                Out::Tcp(s)
            }
            Uri::Exec(cmd) => {
                let mut child = Command::new("/bin/sh")
                    .arg("-c")
                    .arg(cmd)
                    .stdin(Stdio::piped())
                    // Its own process group: a failure stops the whole pipeline.
                    .process_group(0)
                    .spawn()
                    .map_err(|e| io::Error::new(e.kind(), format!("cannot run /bin/sh: {e}")))?;
                let stdin = child.stdin.take();
                Out::Exec {
                    child,
                    stdin,
                    cmd: cmd.clone(),
                }
            }
            Uri::Fd(name) => Out::Fd(File::from(take_fd(name)?)),
        };
        Ok(Outgoing {
            out,
            settled: false,
        })
    }

    fn writer(&mut self) -> io::Result<&mut dyn Write> {
        Ok(match &mut self.out {
            Out::Unix(s) => s,
            Out::Tcp(s) => s,
            Out::Exec { stdin, .. } => match stdin.as_mut() {
                Some(s) => s,
                None => return Err(io::Error::new(io::ErrorKind::BrokenPipe, "stream closed")),
            },
            Out::Fd(f) => f,
        })
    }

    /// A write failed: for a command, say how it ended.
    fn explain(&mut self, e: io::Error) -> io::Error {
        if let Out::Exec { child, cmd, .. } = &mut self.out {
            // Give a dying command a moment to be reaped.
            for _ in 0..20 {
                if let Ok(Some(st)) = child.try_wait() {
                    return io::Error::new(e.kind(), format!("{e} (`{cmd}` {})", describe(st)));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        e
    }
}

fn describe(st: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (st.code(), st.signal()) {
        (Some(c), _) => format!("exited with status {c}"),
        (None, Some(s)) => format!("was killed by signal {s}"),
        _ => format!("ended: {st}"),
    }
}

fn take_fd(name: &str) -> io::Result<OwnedFd> {
    qmp::take_fd(name).ok_or_else(|| {
        io::Error::other(format!(
            "no file descriptor named '{name}' (pass one with getfd first)"
        ))
    })
}

impl Write for Outgoing {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self.writer()?.write(buf) {
            Ok(n) => Ok(n),
            Err(e) => Err(self.explain(e)),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self.writer()?.flush() {
            Ok(()) => Ok(()),
            Err(e) => Err(self.explain(e)),
        }
    }
}

/// Waits until the peer closes its end (it has read everything).
fn wait_closed(
    s: &mut dyn Read,
    set_timeout: impl FnOnce(Option<Duration>) -> io::Result<()>,
) -> io::Result<()> {
    set_timeout(Some(CLOSE_WAIT))?;
    let mut b = [0u8; 256];
    loop {
        match s.read(&mut b) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // A peer that reset the connection after reading is done too.
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(()),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(io::Error::new(
                    e.kind(),
                    format!("the receiver did not close the connection within {CLOSE_WAIT:?}"),
                ))
            }
            Err(e) => return Err(e),
        }
    }
}

impl StreamWrite for Outgoing {
    fn complete(&mut self) -> io::Result<()> {
        self.flush()?;
        self.settled = true;
        match &mut self.out {
            Out::Unix(s) => {
                s.shutdown(Shutdown::Write)?;
                let t = s.try_clone()?;
                wait_closed(s, |d| t.set_read_timeout(d))
            }
            Out::Tcp(s) => {
                s.shutdown(Shutdown::Write)?;
                let t = s.try_clone()?;
                wait_closed(s, |d| t.set_read_timeout(d))
            }
            Out::Exec { child, stdin, cmd } => {
                drop(stdin.take());
                let st = wait_exit(child, cmd)?;
                if st.success() {
                    Ok(())
                } else {
                    Err(io::Error::other(format!("`{cmd}` {}", describe(st))))
                }
            }
            Out::Fd(f) => {
                // A socket: tell the peer the stream ended. A file or pipe: nothing to do.
                // SAFETY: shutdown on a descriptor this File owns; ENOTSOCK is ignored.
                unsafe { libc::shutdown(f.as_raw_fd(), libc::SHUT_WR) };
                Ok(())
            }
        }
    }

    /// Shuts a socket down (a duplicate of its descriptor) or kills a
    /// command's process group, so that a write blocked on a receiver that
    /// stopped reading returns at once.
    fn interrupter(&self) -> Option<livesnap::Interrupter> {
        let fd = match &self.out {
            Out::Unix(s) => s.as_fd().try_clone_to_owned().ok()?,
            Out::Tcp(s) => s.as_fd().try_clone_to_owned().ok()?,
            // A pipe's writes cannot be interrupted (and a duplicate of it
            // would hold its reader's end-of-file back).
            Out::Fd(f) if is_socket(f.as_raw_fd()) => f.as_fd().try_clone_to_owned().ok()?,
            Out::Fd(_) => return None,
            Out::Exec { child, .. } => {
                let pgid = child.id() as libc::pid_t;
                return Some(Box::new(move || {
                    // SAFETY: kill(2) on the process group this module made
                    // for the command; it is reaped only after the capture
                    // (and so every call of this) ended.
                    unsafe { libc::kill(-pgid, libc::SIGKILL) };
                }));
            }
        };
        Some(Box::new(move || {
            // SAFETY: shutdown on a descriptor this closure owns (a pipe
            // is never given one).
            unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_RDWR) };
        }))
    }

    fn abandon(&mut self) {
        self.settled = true;
        match &mut self.out {
            Out::Unix(s) => {
                let _ = s.shutdown(Shutdown::Both);
            }
            Out::Tcp(s) => {
                let _ = s.shutdown(Shutdown::Both);
            }
            Out::Exec { child, stdin, .. } => {
                drop(stdin.take());
                kill_group(child);
            }
            Out::Fd(f) => {
                // SAFETY: as in complete().
                unsafe { libc::shutdown(f.as_raw_fd(), libc::SHUT_RDWR) };
            }
        }
    }
}

/// The receiving end, before a sender is there.
pub enum Listening {
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener),
    /// A command's output, a descriptor or a file: nothing to accept
    /// (`None` once taken).
    Ready(Option<Incoming>),
}

impl Listening {
    /// Binds the address given (unix, tcp), starts the command (exec), takes
    /// the descriptor (fd) or opens the file (file: in stream form).
    pub fn bind(uri: &Uri) -> io::Result<Listening> {
        Ok(match uri {
            Uri::File(p) => Listening::Ready(Some(Incoming {
                r: Box::new(livesnap::open_regular(p).map_err(|e| {
                    io::Error::new(e.kind(), format!("cannot open {}: {e}", p.display()))
                })?),
                sock: None,
                child: None,
                peer: p.display().to_string(),
            })),
            Uri::Unix(p) => {
                remove_stale_socket(p)?;
                let l = UnixListener::bind(p)
                    .map_err(|e| io::Error::new(e.kind(), format!("bind {}: {e}", p.display())))?;
                Listening::Unix(l, p.clone())
            }
            Uri::Tcp(hp) => {
                let addrs = socket_addrs(hp)?;
                let l = TcpListener::bind(&addrs[..])
                    .map_err(|e| io::Error::new(e.kind(), format!("bind {hp}: {e}")))?;
                Listening::Tcp(l)
            }
            Uri::Exec(cmd) => {
                let mut child = Command::new("/bin/sh")
                    .arg("-c")
                    .arg(cmd)
                    .stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .process_group(0)
                    .spawn()
                    .map_err(|e| io::Error::new(e.kind(), format!("cannot run /bin/sh: {e}")))?;
                let out: ChildStdout = child.stdout.take().expect("piped");
                Listening::Ready(Some(Incoming {
                    r: Box::new(TimedPipe {
                        out,
                        limit: EXEC_SILENCE_LIMIT,
                        what: format!("`{cmd}`"),
                    }),
                    sock: None,
                    child: Some((child, cmd.clone())),
                    peer: format!("`{cmd}`"),
                }))
            }
            Uri::Fd(name) => Listening::Ready(Some({
                let fd = take_fd(name)?;
                let sock = if is_socket(fd.as_raw_fd()) {
                    Some(fd.try_clone()?)
                } else {
                    None
                };
                Incoming {
                    r: Box::new(File::from(fd)),
                    sock,
                    child: None,
                    peer: format!("fd:{name}"),
                }
            })),
        })
    }

    /// The bound address (`tcp:IP:PORT` with the real port, `unix:PATH`).
    pub fn local_addr(&self) -> Option<String> {
        match self {
            Listening::Unix(_, p) => Some(format!("unix:{}", p.display())),
            Listening::Tcp(l) => l.local_addr().ok().map(|a| format!("tcp:{a}")),
            Listening::Ready(_) => None,
        }
    }

    /// Waits for the next sender (sockets); the stream to read.
    pub fn accept(&mut self) -> io::Result<Incoming> {
        match self {
            Listening::Unix(l, p) => {
                let (s, _) = l.accept()?;
                Ok(Incoming {
                    sock: Some(OwnedFd::from(s.try_clone()?)),
                    r: Box::new(s),
                    child: None,
                    peer: format!("unix:{}", p.display()),
                })
            }
            Listening::Tcp(l) => {
                let (s, a) = l.accept()?;
                tune_tcp(&s)?;
                Ok(Incoming {
                    sock: Some(OwnedFd::from(s.try_clone()?)),
                    r: Box::new(s),
                    child: None,
                    peer: format!("tcp:{a}"),
                })
            }
            Listening::Ready(i) => i
                .take()
                .ok_or_else(|| io::Error::other("the stream was read already")),
        }
    }
}

impl Drop for Listening {
    fn drop(&mut self) {
        if let Listening::Unix(_, p) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// A socket file left by an earlier listener is replaced; anything else at
/// that path is not touched.
fn remove_stale_socket(p: &Path) -> io::Result<()> {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(p),
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a socket", p.display()),
        )),
        Err(_) => Ok(()),
    }
}

/// The receiving end of a stream.
pub struct Incoming {
    r: Box<dyn Read + Send>,
    /// A second handle on it when it is a socket (live migration writes back).
    sock: Option<OwnedFd>,
    child: Option<(Child, String)>,
    /// Who sends (for messages).
    pub peer: String,
}

impl Read for Incoming {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.r.read(buf)
    }
}

impl Incoming {
    /// A handle on the connection, when it is one both ways (a socket).
    pub fn socket(&self) -> Option<OwnedFd> {
        self.sock.as_ref().and_then(|s| s.try_clone().ok())
    }

    /// The stream was read to its end: a command must have exited 0.
    pub fn finish(mut self) -> io::Result<()> {
        if let Some((mut child, cmd)) = self.child.take() {
            // Our end closes first: a command with more to say gets EPIPE.
            drop(std::mem::replace(&mut self.r, Box::new(io::empty())));
            let st = wait_exit(&mut child, &cmd)?;
            if !st.success() {
                return Err(io::Error::other(format!("`{cmd}` {}", describe(st))));
            }
        }
        Ok(())
    }

    /// The stream failed: how its command ended, if it did within a moment
    /// (a failing command often is why); one still running is stopped.
    pub fn fail(mut self) -> Option<String> {
        let (mut child, cmd) = self.child.take()?;
        drop(std::mem::replace(&mut self.r, Box::new(io::empty())));
        let end = std::time::Instant::now() + Duration::from_secs(1);
        while std::time::Instant::now() < end {
            if let Ok(Some(st)) = child.try_wait() {
                return (!st.success()).then(|| format!("`{cmd}` {}", describe(st)));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        kill_group(&mut child);
        Some(format!("`{cmd}` was still running: killed"))
    }

    /// The stream is refused: stop a command that produces it.
    pub fn close(mut self) {
        if let Some((mut child, _)) = self.child.take() {
            kill_group(&mut child);
        }
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        if let Some((child, _)) = &mut self.child {
            kill_group(child);
        }
    }
}

/// How long an `exec:` command producing an incoming stream may write
/// nothing (before its first byte too) before the stream fails as timed
/// out: a socket's peer has the same limit once its stream began.
pub const EXEC_SILENCE_LIMIT: Duration = Duration::from_secs(60);

/// A command's output, read with a limit on its silence.
struct TimedPipe {
    out: ChildStdout,
    limit: Duration,
    /// The command, for the message.
    what: String,
}

impl Read for TimedPipe {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut p = libc::pollfd {
            fd: self.out.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = self.limit.as_millis().min(i32::MAX as u128) as i32;
        loop {
            // SAFETY: poll on one live descriptor, with a valid pollfd.
            let r = unsafe { libc::poll(&mut p, 1, ms) };
            match r {
                0 => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!(
                            "timed out: {} wrote nothing for {} s",
                            self.what,
                            self.limit.as_secs_f64()
                        ),
                    ))
                }
                r if r < 0 => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
                _ => return self.out.read(buf),
            }
        }
    }
}

/// How long a command may take to exit once its stream has ended.
const EXIT_WAIT: Duration = Duration::from_secs(60);

/// Waits for a command whose stream has ended; one that does not exit
/// within [`EXIT_WAIT`] is killed (with its pipeline) and that is an error.
fn wait_exit(child: &mut Child, cmd: &str) -> io::Result<std::process::ExitStatus> {
    let end = std::time::Instant::now() + EXIT_WAIT;
    loop {
        if let Some(st) = child.try_wait()? {
            return Ok(st);
        }
        if std::time::Instant::now() > end {
            kill_group(child);
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("`{cmd}` did not exit within {EXIT_WAIT:?} of the stream's end: killed"),
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Ends a command started in its own process group (the shell and every
/// command of its pipeline) and reaps the shell.
fn kill_group(child: &mut Child) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    // SAFETY: kill(2) on the process group this module created for the child.
    unsafe { libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL) };
    let _ = child.wait();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An `exec:` source that writes nothing fails the read as timed out
    /// (after the limit, not never), and its command is stopped.
    #[test]
    fn a_silent_command_times_out() {
        let mut child = Command::new("/bin/sh")
            .args(["-c", "sleep 30"])
            .stdout(Stdio::piped())
            .process_group(0)
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let mut inc = Incoming {
            r: Box::new(TimedPipe {
                out,
                limit: Duration::from_millis(200),
                what: "`sleep 30`".into(),
            }),
            sock: None,
            child: Some((child, "sleep 30".into())),
            peer: "test".into(),
        };
        let t = std::time::Instant::now();
        let e = inc.read(&mut [0u8; 16]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(
            e.to_string()
                .contains("timed out: `sleep 30` wrote nothing"),
            "{e}"
        );
        assert!(t.elapsed() >= Duration::from_millis(200));
        assert!(t.elapsed() < Duration::from_secs(10));
        let why = inc.fail().unwrap();
        assert!(why.contains("killed"), "{why}");
    }

    #[test]
    fn uris() {
        assert_eq!(Uri::parse("file:/x").unwrap(), Uri::File("/x".into()));
        assert_eq!(Uri::parse("unix:/s").unwrap(), Uri::Unix("/s".into()));
        assert_eq!(
            Uri::parse("tcp:[::1]:4444").unwrap(),
            Uri::Tcp("[::1]:4444".into())
        );
        assert_eq!(
            Uri::parse("exec:gzip -c > f").unwrap(),
            Uri::Exec("gzip -c > f".into())
        );
        assert_eq!(Uri::parse("fd:mig").unwrap(), Uri::Fd("mig".into()));
        for bad in [
            "file:",
            "file:/x,offset=4",
            "tcp:host",
            "tcp:host:port",
            "tcp::1",
            "rdma:1.2.3.4:5",
            "nothing",
            "exec:",
        ] {
            assert!(Uri::parse(bad).is_err(), "{bad}");
        }
        let e = Uri::parse("rdma:1:2").unwrap_err();
        assert!(e.contains("unknown transport 'rdma'"), "{e}");
    }

    #[test]
    fn a_unix_listener_replaces_only_a_stale_socket() {
        let d = std::env::temp_dir().join(format!("snapvmm-transport-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join("f");
        std::fs::write(&p, b"keep").unwrap();
        assert!(Listening::bind(&Uri::Unix(p.clone())).is_err());
        assert_eq!(std::fs::read(&p).unwrap(), b"keep");
        let s = d.join("s");
        drop(UnixListener::bind(&s).unwrap());
        let l = Listening::bind(&Uri::Unix(s.clone())).unwrap();
        assert_eq!(l.local_addr().unwrap(), format!("unix:{}", s.display()));
        drop(l);
        assert!(!s.exists(), "the listener removes its socket");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_command_that_fails_fails_the_stream() {
        let mut o = Outgoing::connect(&Uri::Exec("cat > /dev/null; exit 3".into())).unwrap();
        o.write_all(b"data").unwrap();
        let e = o.complete().unwrap_err();
        assert!(e.to_string().contains("exited with status 3"), "{e}");
        let mut i = Listening::bind(&Uri::Exec("echo hi; exit 5".into()))
            .unwrap()
            .accept()
            .unwrap();
        let mut s = String::new();
        i.read_to_string(&mut s).unwrap();
        assert_eq!(s, "hi\n");
        let e = i.finish().unwrap_err();
        assert!(e.to_string().contains("exited with status 5"), "{e}");
    }
}
