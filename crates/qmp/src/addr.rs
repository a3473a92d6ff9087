//! Parsing of QMP listen addresses (`-qmp` style).

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use crate::error::QmpError;

/// Where the QMP server listens.
///
/// Accepted spellings (QEMU chardev style; `,,` stands for a literal
/// comma in a path):
///
/// * `unix:/path/qmp.sock`, optionally followed by `,server`,
///   `,server=on`, `,wait=off` or `,nowait` (a bare absolute path also
///   works);
/// * `tcp:HOST:PORT`, `tcp:[IPV6]:PORT`, `tcp::PORT` and `tcp:PORT`, with
///   the same options.
///
/// `wait=on` and `server=off` are refused: the server never waits for a
/// client and never connects out. **Difference from QEMU:** an empty host
/// (`tcp::4444`, `tcp:4444`) means `127.0.0.1`, not every interface; QMP
/// has no authentication, so listening on a public address must be asked
/// for explicitly (`tcp:0.0.0.0:4444`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// A unix socket path.
    Unix(PathBuf),
    /// A TCP host (name or address, without brackets) and port; port 0
    /// picks a free port, see [`crate::Server::local_addr`].
    Tcp {
        /// Host name or IP address.
        host: String,
        /// Port number.
        port: u16,
    },
}

/// Splits on `,` with `,,` meaning a literal comma.
fn split_options(s: &str) -> Vec<String> {
    let mut parts = vec![String::new()];
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                if let Some(p) = parts.last_mut() {
                    p.push(',');
                }
            } else {
                parts.push(String::new());
            }
        } else if let Some(p) = parts.last_mut() {
            p.push(c);
        }
    }
    parts
}

impl ListenAddr {
    /// Parses an address; see the type documentation for the syntax.
    pub fn parse(s: &str) -> Result<ListenAddr, QmpError> {
        let bad = |reason: &str| QmpError::InvalidAddress {
            addr: s.to_string(),
            reason: reason.to_string(),
        };
        let parts = split_options(s);
        let (target, options) = parts.split_first().ok_or_else(|| bad("empty address"))?;
        for opt in options {
            match opt.as_str() {
                "server" | "server=on" | "wait=off" | "nowait" => {}
                "wait" | "wait=on" => {
                    return Err(bad(
                        "wait=on is not supported: the VMM never waits for a QMP client \
                         before starting; use wait=off",
                    ))
                }
                "server=off" => return Err(bad("server=off is not supported: QMP only listens")),
                other => return Err(bad(&format!("unknown option '{other}'"))),
            }
        }
        if let Some(path) = target.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(bad("empty unix socket path"));
            }
            Ok(ListenAddr::Unix(PathBuf::from(path)))
        } else if let Some(rest) = target.strip_prefix("tcp:") {
            let (host, port) = match rest.rsplit_once(':') {
                Some((h, p)) => (h, p),
                None => ("", rest),
            };
            let port: u16 = port
                .parse()
                .map_err(|_| bad(&format!("invalid TCP port '{port}'")))?;
            let host = host
                .strip_prefix('[')
                .and_then(|h| h.strip_suffix(']'))
                .unwrap_or(host);
            let host = if host.is_empty() { "127.0.0.1" } else { host };
            Ok(ListenAddr::Tcp {
                host: host.to_string(),
                port,
            })
        } else if target.starts_with('/') {
            Ok(ListenAddr::Unix(PathBuf::from(target)))
        } else {
            Err(bad("expected unix:PATH or tcp:HOST:PORT"))
        }
    }
}

impl FromStr for ListenAddr {
    type Err = QmpError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ListenAddr::parse(s)
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
            ListenAddr::Tcp { host, port } if host.contains(':') => {
                write!(f, "tcp:[{host}]:{port}")
            }
            ListenAddr::Tcp { host, port } => write!(f, "tcp:{host}:{port}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(host: &str, port: u16) -> ListenAddr {
        ListenAddr::Tcp {
            host: host.into(),
            port,
        }
    }

    #[test]
    fn unix_spellings() {
        let want = ListenAddr::Unix("/run/qmp.sock".into());
        for s in [
            "unix:/run/qmp.sock",
            "unix:/run/qmp.sock,server=on,wait=off",
            "unix:/run/qmp.sock,server,nowait",
            "/run/qmp.sock",
        ] {
            assert_eq!(ListenAddr::parse(s).unwrap(), want, "{s}");
        }
        assert_eq!(
            ListenAddr::parse("unix:/a,,b,server").unwrap(),
            ListenAddr::Unix("/a,b".into())
        );
    }

    #[test]
    fn tcp_spellings() {
        assert_eq!(
            ListenAddr::parse("tcp:localhost:4444").unwrap(),
            tcp("localhost", 4444)
        );
        assert_eq!(
            ListenAddr::parse("tcp::4444,server=on,wait=off").unwrap(),
            tcp("127.0.0.1", 4444)
        );
        assert_eq!(
            ListenAddr::parse("tcp:4444").unwrap(),
            tcp("127.0.0.1", 4444)
        );
        assert_eq!(ListenAddr::parse("tcp:[::1]:0").unwrap(), tcp("::1", 0));
        assert_eq!(tcp("::1", 5).to_string(), "tcp:[::1]:5");
    }

    #[test]
    fn refused() {
        for s in [
            "unix:/x,wait=on",
            "unix:/x,wait",
            "unix:/x,server=off",
            "unix:/x,bogus",
            "unix:",
            "tcp:host:99999",
            "tcp:host:",
            "udp:1",
            "",
        ] {
            assert!(ListenAddr::parse(s).is_err(), "{s}");
        }
        let e = ListenAddr::parse("unix:/x,wait=on")
            .unwrap_err()
            .to_string();
        assert!(e.contains("wait=on"), "{e}");
    }
}
