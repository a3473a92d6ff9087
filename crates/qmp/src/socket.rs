//! Listening sockets and connections (unix or TCP).

use std::fs;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::addr::ListenAddr;
use crate::error::QmpError;

/// A listening socket.
pub(crate) enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

impl Listener {
    pub(crate) fn accept(&self) -> io::Result<Conn> {
        match self {
            Listener::Unix(l) => l.accept().map(|(s, _)| Conn::Unix(s)),
            Listener::Tcp(l) => l.accept().map(|(s, _)| Conn::Tcp(s)),
        }
    }

    pub(crate) fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        match self {
            Listener::Unix(l) => l.set_nonblocking(on),
            Listener::Tcp(l) => l.set_nonblocking(on),
        }
    }
}

impl AsRawFd for Listener {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Listener::Unix(l) => l.as_raw_fd(),
            Listener::Tcp(l) => l.as_raw_fd(),
        }
    }
}

/// A client connection.
#[derive(Debug)]
pub(crate) enum Conn {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Conn {
    pub(crate) fn try_clone(&self) -> io::Result<Conn> {
        Ok(match self {
            Conn::Unix(s) => Conn::Unix(s.try_clone()?),
            Conn::Tcp(s) => Conn::Tcp(s.try_clone()?),
        })
    }

    pub(crate) fn set_read_timeout(&self, t: Option<std::time::Duration>) -> io::Result<()> {
        match self {
            Conn::Unix(s) => s.set_read_timeout(t),
            Conn::Tcp(s) => s.set_read_timeout(t),
        }
    }

    /// Shuts both directions down, waking any thread blocked on it.
    pub(crate) fn shutdown(&self) {
        let _ = match self {
            Conn::Unix(s) => s.shutdown(Shutdown::Both),
            Conn::Tcp(s) => s.shutdown(Shutdown::Both),
        };
    }

    pub(crate) fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        match self {
            Conn::Unix(s) => s.set_nonblocking(on),
            Conn::Tcp(s) => s.set_nonblocking(on),
        }
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Unix(s) => s.read(buf),
            Conn::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Unix(s) => s.write(buf),
            Conn::Tcp(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The socket file we created; removed on drop if it is still ours.
#[derive(Debug)]
pub(crate) struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Ok(meta) = fs::symlink_metadata(&self.path) {
            if meta.dev() == self.dev && meta.ino() == self.ino {
                let _ = fs::remove_file(&self.path);
            }
        }
    }
}

/// Binds `addr`; returns the listener, its printable address and, for
/// unix sockets, the file to remove on shutdown.
pub(crate) fn bind(addr: &ListenAddr) -> Result<(Listener, String, Option<SocketFile>), QmpError> {
    match addr {
        ListenAddr::Unix(path) => {
            let (listener, file) = bind_unix(path)?;
            Ok((Listener::Unix(listener), addr.to_string(), Some(file)))
        }
        ListenAddr::Tcp { host, port } => {
            let listener =
                TcpListener::bind((host.as_str(), *port)).map_err(|source| QmpError::Bind {
                    addr: addr.to_string(),
                    source,
                })?;
            let local = listener.local_addr()?;
            let printable = ListenAddr::Tcp {
                host: local.ip().to_string(),
                port: local.port(),
            }
            .to_string();
            Ok((Listener::Tcp(listener), printable, None))
        }
    }
}

/// Refuses live sockets and non-sockets; a stale socket is fine (it will
/// be replaced).
fn check_existing(path: &Path) -> Result<(), QmpError> {
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(QmpError::Io(e)),
        Ok(meta) if !meta.file_type().is_socket() => Err(QmpError::NotASocket {
            path: path.to_path_buf(),
        }),
        Ok(_) => match UnixStream::connect(path) {
            Ok(_) => Err(QmpError::SocketInUse {
                path: path.to_path_buf(),
            }),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                tracing::info!("replacing stale QMP socket {}", path.display());
                Ok(())
            }
            Err(source) => Err(QmpError::Bind {
                addr: format!("unix:{}", path.display()),
                source,
            }),
        },
    }
}

/// Creates the socket with mode 0600 without ever exposing it with wider
/// permissions: it is bound inside a fresh 0700 directory next to the
/// target, chmod'ed, then renamed into place (which also atomically
/// replaces a stale socket). This avoids changing the process-wide umask.
fn bind_unix(path: &Path) -> Result<(UnixListener, SocketFile), QmpError> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    check_existing(path)?;
    let bind_err = |source| QmpError::Bind {
        addr: format!("unix:{}", path.display()),
        source,
    };
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let tmp_dir = parent.join(format!(".qmp-{}-{n}", std::process::id()));
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&tmp_dir)
        .map_err(bind_err)?;
    let tmp_sock = tmp_dir.join("s");
    let result = (|| {
        let listener = UnixListener::bind(&tmp_sock)?;
        fs::set_permissions(&tmp_sock, fs::Permissions::from_mode(0o600))?;
        fs::rename(&tmp_sock, path)?;
        Ok(listener)
    })();
    let _ = fs::remove_file(&tmp_sock);
    let _ = fs::remove_dir(&tmp_dir);
    let listener = result.map_err(bind_err)?;
    let meta = fs::symlink_metadata(path)?;
    Ok((
        listener,
        SocketFile {
            path: path.to_path_buf(),
            dev: meta.dev(),
            ino: meta.ino(),
        },
    ))
}
