//! NICs and the vsock device: `--net` parsing and opening their taps,
//! `--vsock` parsing.
//!
//! `--net tap=NAME[,mac=MAC][,id=ID]` opens (or, as root, creates) the tap
//! NAME; `--net fd=N[,mac=MAC][,id=ID]` takes an inherited tap descriptor,
//! and `--net fd=NAME` one passed later with QMP `getfd` (with `--incoming
//! defer`: the NICs are then opened at `migrate-incoming`), for callers that
//! create taps themselves and run snapvmm without privileges. The backends
//! come from each process's own options: a restored or migrated VM gets the
//! taps its own command line names.

use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::Arc;

use anyhow::{bail, Result};

use crate::disk::valid_id;
use vmm::devices::virtio::net::tap::Tap;

/// Where a NIC's frames go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetBackendSpec {
    Tap(String),
    Fd(i32),
    /// A descriptor QMP `getfd` names so.
    Named(String),
}

/// One `--net`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetSpec {
    pub backend: NetBackendSpec,
    pub mac: Option<[u8; 6]>,
    pub id: String,
}

const USAGE: &str =
    "expected tap=NAME or fd=N (a number, or a name given with getfd), then optionally \
     ,mac=52:54:00:12:34:56 and ,id=NAME";

/// Parses `--net` values; ids default to net0, net1, ... and must be unique.
pub fn parse_nets(values: &[String]) -> Result<Vec<NetSpec>> {
    let mut out: Vec<NetSpec> = Vec::new();
    for (i, v) in values.iter().enumerate() {
        let mut backend = None;
        let mut mac = None;
        let mut id = format!("net{i}");
        for opt in v.split(',') {
            match opt.split_once('=') {
                Some(("tap", name)) if backend.is_none() && valid_ifname(name) => {
                    backend = Some(NetBackendSpec::Tap(name.to_string()))
                }
                Some(("fd", n)) if backend.is_none() => match n.parse::<i32>() {
                    Ok(fd) if fd > 2 => backend = Some(NetBackendSpec::Fd(fd)),
                    Err(_) if valid_id(n) && !n.starts_with(|c: char| c.is_ascii_digit()) => {
                        backend = Some(NetBackendSpec::Named(n.to_string()))
                    }
                    _ => bail!(
                        "invalid --net '{v}': fd={n} is neither a descriptor number above 2 \
                         nor a name given with getfd"
                    ),
                },
                Some(("mac", m)) => match parse_mac(m) {
                    Some(m) => mac = Some(m),
                    None => bail!(
                        "invalid --net '{v}': mac={m} is not a unicast MAC like 52:54:00:12:34:56"
                    ),
                },
                Some(("id", n)) if valid_id(n) => id = n.to_string(),
                _ => bail!("invalid --net option '{opt}' in '{v}': {USAGE}"),
            }
        }
        let Some(backend) = backend else {
            bail!("invalid --net '{v}': {USAGE}");
        };
        if out.iter().any(|n| n.id == id) {
            bail!("--net id '{id}' is used twice");
        }
        out.push(NetSpec { backend, mac, id });
    }
    Ok(out)
}

/// An interface name: an id short enough for the kernel (IFNAMSIZ).
fn valid_ifname(n: &str) -> bool {
    n.len() < 16 && valid_id(n)
}

/// Parses `--vsock cid=N,path=PATH`.
pub fn parse_vsock(v: &str) -> Result<vmm::VsockConfig> {
    let usage = "expected cid=N,path=PATH (N from 3 to 4294967294)";
    let (mut cid, mut path) = (None, None);
    for opt in v.split(',') {
        match opt.split_once('=') {
            Some(("cid", n)) => match n.parse::<u64>() {
                Ok(c) if (3..u64::from(u32::MAX)).contains(&c) => cid = Some(c),
                _ => bail!("invalid --vsock '{v}': cid={n} is not a guest CID ({usage})"),
            },
            Some(("path", p)) if !p.is_empty() => path = Some(std::path::PathBuf::from(p)),
            _ => bail!("invalid --vsock option '{opt}' in '{v}': {usage}"),
        }
    }
    match (cid, path) {
        (Some(cid), Some(path)) => Ok(vmm::VsockConfig { cid, path }),
        _ => bail!("invalid --vsock '{v}': {usage}"),
    }
}

/// `aa:bb:cc:dd:ee:ff` (or with `-`), unicast.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let parts: Vec<&str> = s.split([':', '-']).collect();
    if parts.len() != 6 {
        return None;
    }
    let mut m = [0u8; 6];
    for (b, p) in m.iter_mut().zip(&parts) {
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    (m[0] & 1 == 0).then_some(m)
}

/// Whether a NIC's tap is to come through QMP `getfd` (`fd=NAME`).
pub fn any_named(specs: &[NetSpec]) -> bool {
    specs
        .iter()
        .any(|s| matches!(s.backend, NetBackendSpec::Named(_)))
}

/// Opens every NIC's backend. A descriptor named with `getfd` is taken (it
/// is no longer named) only once every one the NICs need is there: a
/// missing one leaves them all named, for a second try.
pub fn open_all(specs: &[NetSpec]) -> Result<Vec<vmm::NetConfig>> {
    for s in specs {
        if let NetBackendSpec::Named(name) = &s.backend {
            if qmp::peek_fd(name, |_| ()).is_none() {
                bail!(
                    "--net {}: no descriptor named '{name}' (pass the tap with QMP getfd \
                     before migrate-incoming)",
                    s.id
                );
            }
        }
    }
    let mut out = Vec::new();
    for s in specs {
        let tap = match &s.backend {
            NetBackendSpec::Tap(name) => {
                Tap::open(name).map_err(|e| anyhow::anyhow!("--net {}: {e}", s.id))?
            }
            NetBackendSpec::Fd(fd) => {
                // SAFETY: F_GETFD only asks whether the number is an open descriptor.
                if unsafe { libc::fcntl(*fd, libc::F_GETFD) } < 0 {
                    bail!("--net {}: fd={fd} is not an open descriptor", s.id);
                }
                // SAFETY: the caller handed this descriptor to snapvmm for this NIC;
                // nothing else in the process uses it.
                let owned = unsafe { OwnedFd::from_raw_fd(*fd) };
                Tap::from_fd(owned).map_err(|e| anyhow::anyhow!("--net {}: fd={fd}: {e}", s.id))?
            }
            NetBackendSpec::Named(name) => {
                let Some(fd) = qmp::take_fd(name) else {
                    bail!("--net {}: the descriptor named '{name}' went away", s.id);
                };
                Tap::from_fd(fd).map_err(|e| anyhow::anyhow!("--net {}: fd={name}: {e}", s.id))?
            }
        };
        out.push(vmm::NetConfig {
            id: s.id.clone(),
            mac: s.mac,
            backend: Arc::new(tap),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn net_options_are_parsed_with_defaults() {
        let n = parse_nets(&v(&["tap=tap0", "fd=5,mac=52:54:00:aa:bb:cc,id=uplink"])).unwrap();
        assert_eq!(n[0].backend, NetBackendSpec::Tap("tap0".into()));
        assert_eq!(n[0].id, "net0");
        assert_eq!(n[0].mac, None);
        assert_eq!(n[1].backend, NetBackendSpec::Fd(5));
        assert_eq!(n[1].id, "uplink");
        assert_eq!(n[1].mac, Some([0x52, 0x54, 0, 0xaa, 0xbb, 0xcc]));
    }

    /// `fd=NAME`: a descriptor to come with `getfd`; the NICs open only
    /// once it is there (then it is taken), and a missing one is named.
    #[test]
    fn a_named_descriptor_is_waited_for_and_named_when_missing() {
        let n = parse_nets(&v(&["fd=uplink0", "fd=7"])).unwrap();
        assert_eq!(n[0].backend, NetBackendSpec::Named("uplink0".into()));
        assert!(any_named(&n));
        assert!(!any_named(&n[1..]));
        let e = open_all(&n[..1]).unwrap_err().to_string();
        assert!(
            e.contains("no descriptor named 'uplink0'") && e.contains("getfd"),
            "{e}"
        );
        assert!(parse_nets(&v(&["fd=9lives"])).is_err());
    }

    #[test]
    fn bad_net_options_name_what_is_wrong() {
        for (arg, says) in [
            ("tap=tap0,mac=01:00:00:00:00:01", "unicast"),
            ("tap=tap0,mac=zz", "mac=zz"),
            ("fd=1", "fd=1"),
            ("id=x", "tap=NAME or fd=N"),
            ("tap=tap0,tap=tap1", "tap=tap1"),
            ("tap=a/b", "tap=a/b"),
            ("tap=tap0,speed=10", "speed=10"),
        ] {
            let e = parse_nets(&v(&[arg])).unwrap_err().to_string();
            assert!(e.contains(says), "{arg}: {e}");
        }
        let e = parse_nets(&v(&["tap=a,id=x", "tap=b,id=x"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("used twice"), "{e}");
    }

    #[test]
    fn vsock_options_are_parsed_and_bad_ones_named() {
        let v = parse_vsock("cid=3,path=/tmp/v.sock").unwrap();
        assert_eq!(v.cid, 3);
        assert_eq!(v.path, std::path::PathBuf::from("/tmp/v.sock"));
        for (arg, says) in [
            ("cid=2,path=/x", "cid=2"),
            ("cid=x,path=/x", "cid=x"),
            ("cid=5", "expected cid=N,path=PATH"),
            ("cid=5,path=/x,port=1", "port=1"),
        ] {
            let e = parse_vsock(arg).unwrap_err().to_string();
            assert!(e.contains(says), "{arg}: {e}");
        }
    }

    #[test]
    fn a_descriptor_that_is_not_a_tap_is_refused() {
        let f = std::fs::File::open("/dev/null").unwrap();
        let fd = std::os::fd::IntoRawFd::into_raw_fd(f);
        let specs = parse_nets(&[format!("fd={fd}")]).unwrap();
        let e = open_all(&specs).unwrap_err().to_string();
        assert!(e.contains("not a tap"), "{e}");
    }
}
