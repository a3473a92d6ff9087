//! A TAP device as a network backend: frames with a 12-byte virtio-net header
//! (`IFF_VNET_HDR`), so the guest's checksum and segmentation offloads pass
//! through the host kernel untouched.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use super::super::vectored::{read_into, write_from, GuestIov};
use super::{NetBackend, HDR_LEN};

// From <linux/if_tun.h>.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNGETIFF: libc::c_ulong = 0x8004_54d2;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;

/// `struct ifreq` as far as the tun ioctls and SIOC[GS]IFFLAGS use it.
#[repr(C)]
#[derive(Clone, Copy)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl IfReq {
    fn named(name: &str) -> io::Result<IfReq> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('/') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "'{name}' is not an interface name (1 to {} characters)",
                    libc::IFNAMSIZ - 1
                ),
            ));
        }
        let mut r = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: 0,
            _pad: [0; 22],
        };
        r.name[..name.len()].copy_from_slice(name.as_bytes());
        Ok(r)
    }

    fn name(&self) -> String {
        let end = self
            .name
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(self.name.len());
        String::from_utf8_lossy(&self.name[..end]).into_owned()
    }
}

fn ioctl_ptr<T>(fd: RawFd, req: libc::c_ulong, arg: *mut T) -> io::Result<()> {
    // SAFETY: every caller passes a request whose argument is the pointed-to
    // type (an ifreq or an int), valid for the duration of the call.
    if unsafe { libc::ioctl(fd, req, arg) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// An open TAP interface.
pub struct Tap {
    file: File,
    name: String,
}

impl std::fmt::Debug for Tap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tap({})", self.name)
    }
}

impl Tap {
    /// Opens the TAP interface `name`, creating it when it does not exist (which
    /// needs CAP_NET_ADMIN, as with QEMU run as root); one snapvmm creates is up
    /// at once and goes away with the process.
    pub fn open(name: &str) -> io::Result<Tap> {
        let mut req = IfReq::named(name)?;
        let existed = std::path::Path::new("/sys/class/net").join(name).exists();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|e| io::Error::new(e.kind(), format!("cannot open /dev/net/tun: {e}")))?;
        req.flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
        ioctl_ptr(file.as_raw_fd(), TUNSETIFF, &mut req).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot attach to tap '{name}' (TUNSETIFF): {e}"),
            )
        })?;
        let tap = Tap::configure(file)?;
        if !existed {
            if let Err(e) = set_up(name) {
                tracing::warn!("tap '{name}' was created but cannot be brought up: {e}");
            }
        }
        Ok(tap)
    }

    /// Takes a TAP descriptor someone else opened (inherited, or passed over
    /// QMP): it must be a tap with `IFF_VNET_HDR`.
    pub fn from_fd(fd: OwnedFd) -> io::Result<Tap> {
        Tap::configure(File::from(fd))
    }

    fn configure(file: File) -> io::Result<Tap> {
        let fd = file.as_raw_fd();
        let mut req = IfReq::named("x")?;
        ioctl_ptr(fd, TUNGETIFF, &mut req)
            .map_err(|e| io::Error::new(e.kind(), format!("the descriptor is not a tap: {e}")))?;
        if req.flags & IFF_TAP == 0 || req.flags & IFF_VNET_HDR == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "'{}' must be a tap opened with IFF_TAP | IFF_VNET_HDR",
                    req.name()
                ),
            ));
        }
        let mut hdr = HDR_LEN as libc::c_int;
        ioctl_ptr(fd, TUNSETVNETHDRSZ, &mut hdr)?;
        // SAFETY: F_GETFL/F_SETFL on a descriptor this function owns.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        // SAFETY: as above.
        if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Tap {
            file,
            name: req.name(),
        })
    }
}

/// Sets IFF_UP on interface `name`.
fn set_up(name: &str) -> io::Result<()> {
    // SAFETY: a plain socket() call; the result is checked and owned below.
    let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if s < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `s` is a new descriptor nobody else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(s) };
    let mut req = IfReq::named(name)?;
    ioctl_ptr(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req)?;
    req.flags |= libc::IFF_UP as libc::c_short;
    ioctl_ptr(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &mut req)
}

impl NetBackend for Tap {
    fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        (&self.file).read(buf)
    }

    fn recv_into(&self, dst: &GuestIov) -> io::Result<usize> {
        read_into(self.file.as_raw_fd(), dst)
    }

    fn send(&self, frame: &[u8]) -> io::Result<usize> {
        (&self.file).write(frame)
    }

    fn send_from(&self, src: &GuestIov) -> io::Result<usize> {
        write_from(self.file.as_raw_fd(), src)
    }

    fn set_offloads(&self, flags: u32) -> io::Result<()> {
        // TUNSETOFFLOAD takes its argument by value.
        // SAFETY: an integer argument; the descriptor is this tap's.
        if unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                TUNSETOFFLOAD,
                libc::c_ulong::from(flags),
            )
        } < 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}
