//! Descriptors passed over a unix-socket connection (SCM_RIGHTS) and named
//! with `getfd`: QEMU's way for a manager (libvirt) to hand the VMM an open
//! socket or file, e.g. for `migrate fd:NAME`.
//!
//! The names are shared by every connection of the process; a VMM takes a
//! descriptor with [`take_fd`] (it is then no longer named).

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::{Mutex, OnceLock};

/// Most descriptors taken from one message; more are closed.
const MAX_FDS_PER_MESSAGE: usize = 8;
/// Most descriptors a connection holds before `getfd` names them.
pub(crate) const MAX_PENDING: usize = 16;

fn table() -> &'static Mutex<HashMap<String, OwnedFd>> {
    static T: OnceLock<Mutex<HashMap<String, OwnedFd>>> = OnceLock::new();
    T.get_or_init(Mutex::default)
}

fn lock() -> std::sync::MutexGuard<'static, HashMap<String, OwnedFd>> {
    table().lock().unwrap_or_else(|e| e.into_inner())
}

/// Takes the descriptor `getfd` named `name` (it is no longer named).
pub fn take_fd(name: &str) -> Option<OwnedFd> {
    lock().remove(name)
}

/// Calls `f` with the descriptor named `name`, leaving it named.
pub fn peek_fd<T>(name: &str, f: impl FnOnce(std::os::fd::BorrowedFd<'_>) -> T) -> Option<T> {
    use std::os::fd::AsFd;
    lock().get(name).map(|fd| f(fd.as_fd()))
}

/// Names `fd` (closing a descriptor of the same name).
pub(crate) fn put(name: String, fd: OwnedFd) {
    lock().insert(name, fd);
}

/// `closefd`: whether a descriptor of that name existed.
pub(crate) fn close(name: &str) -> bool {
    lock().remove(name).is_some()
}

/// `recv` that also takes descriptors passed with SCM_RIGHTS (appended to
/// `fds`, close-on-exec).
pub(crate) fn recv_with_fds(
    s: &UnixStream,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> io::Result<usize> {
    // u64 array: aligned for cmsghdr.
    let mut cbuf = [0u64; 32];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: a zeroed msghdr is a valid empty header; the pointers set
    // below point to `iov` and `cbuf`, which outlive the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&cbuf);
    // SAFETY: `msg` describes writable buffers of the lengths given.
    let n = unsafe { libc::recvmsg(s.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: walking the control messages the kernel wrote into `cbuf`,
    // with the libc macros, within msg_controllen.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c).cast::<i32>();
                let bytes = (*c).cmsg_len as usize - (data as usize - c as usize);
                for i in 0..bytes / 4 {
                    // Each descriptor is new in this process and owned by nobody else.
                    let fd = OwnedFd::from_raw_fd(data.add(i).read_unaligned());
                    if i < MAX_FDS_PER_MESSAGE && fds.len() < MAX_PENDING {
                        fds.push(fd);
                    }
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Ok(n as usize)
}
