//! The fork/vmsplice/splice machinery of live capture.
//!
//! Protocol on the pipe (child → parent, native endianness, same host):
//! a sequence of records, each a 24-byte header
//! `{file_offset: u64, len: u64, zero_pages_so_far: u64}` followed by `len`
//! bytes of page data (vmspliced by the child). The end record has
//! `file_offset == u64::MAX`, `len == 0` and the total zero-page count.
//! EOF before the end record means the child failed.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::kernel::scan::{for_each_run, ScanRange};

/// Size of a record header on the pipe.
pub(crate) const RECORD_LEN: usize = 24;
/// `file_offset` of the end record.
pub(crate) const END_MARK: u64 = u64::MAX;
/// Largest run the child sends in one record.
pub(crate) const MAX_CHILD_RUN: u64 = 256 << 10;

/// Child exit codes.
const EXIT_WRITE: i32 = 101;
const EXIT_VMSPLICE: i32 = 102;

/// One record header read from the pipe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Record {
    pub file_offset: u64,
    pub len: u64,
    pub zero_pages: u64,
}

/// Creates the capture pipe `(read, write)`, both `O_CLOEXEC`, grown to
/// `size` bytes if the system allows it.
pub(crate) fn make_pipe(size: usize) -> io::Result<(File, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: fds is a valid array of two ints for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded, so both fds are open and owned by nobody else.
    let (r, w) = unsafe { (File::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    if size > 0 {
        // SAFETY: F_SETPIPE_SZ on a valid pipe fd; failure (EPERM above
        // pipe-max-size) only leaves the default size, which still works.
        let rc = unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, size as libc::c_int) };
        if rc < 0 {
            tracing::debug!(
                "F_SETPIPE_SZ({size}) failed: {}",
                io::Error::last_os_error()
            );
        }
    }
    Ok((r, w))
}

/// Forks the capture child. The child streams `ranges` into `pipe_w` and
/// `_exit`s; the parent gets the child's pid and returns at once.
///
/// Everything the child touches (`ranges`, the fds) is prepared by the caller.
///
/// # Safety
/// Each range's host memory must be page-aligned, a whole number of pages,
/// mapped and readable for the whole life of the process (the child reads
/// its copy-on-write snapshot of it). `pipe_w`/`pipe_r` must be the two ends
/// of the capture pipe.
pub(crate) unsafe fn fork_child(
    ranges: &[ScanRange],
    pipe_r: RawFd,
    pipe_w: RawFd,
) -> io::Result<libc::pid_t> {
    // SAFETY: fork has no memory-safety preconditions by itself; the child
    // branch below only performs async-signal-safe syscalls on memory that was
    // fully prepared before the fork, never allocates, locks, unwinds or
    // returns, and leaves with _exit.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        // SAFETY: we are the freshly forked child; the caller's contract on
        // `ranges` and the fds carries over.
        unsafe { child_main(ranges, pipe_r, pipe_w) }
    }
    Ok(pid)
}

/// Body of the capture child. Never returns.
///
/// # Safety
/// Must only be called in the forked child, with the contract of [`fork_child`].
#[inline(never)]
unsafe fn child_main(ranges: &[ScanRange], pipe_r: RawFd, pipe_w: RawFd) -> ! {
    // SAFETY: sigset_t is plain data; sigfillset initializes it fully.
    let mut all: libc::sigset_t = unsafe { core::mem::zeroed() };
    // SAFETY: `all` is a valid sigset_t; blocking every signal means no
    // inherited handler can run in the child. SIGKILL still kills it, and a
    // vanished reader yields EPIPE (SIGPIPE blocked) which ends it.
    unsafe {
        libc::sigfillset(&mut all);
        libc::sigprocmask(libc::SIG_SETMASK, &all, core::ptr::null_mut());
    }
    // Close every fd but the write end, so that (a) our parent's death or its
    // closing of the read end gives us EPIPE instead of a hang, and (b) we do
    // not keep other pipes (e.g. of a concurrent capture) open. Errors are
    // harmless (old kernels): fall back to closing the read end alone.
    // SAFETY: close_range/close only drop this process's fd table entries.
    unsafe {
        libc::close(pipe_r);
        if pipe_w > 0 {
            libc::syscall(libc::SYS_close_range, 0u32, (pipe_w - 1) as u32, 0u32);
        }
        libc::syscall(libc::SYS_close_range, (pipe_w + 1) as u32, u32::MAX, 0u32);
    }
    let mut zero_pages: u64 = 0;
    for r in ranges {
        // SAFETY: ranges were validated page-aligned, readable for the process
        // lifetime; the child's copy-on-write view is never written.
        let res = unsafe {
            for_each_run(r, MAX_CHILD_RUN, &mut zero_pages, |fo, p, len, zeros| {
                child_send(pipe_w, fo, p, len, zeros)
            })
        };
        if let Err(code) = res {
            // SAFETY: _exit is async-signal-safe and skips atexit/stdio flushing.
            unsafe { libc::_exit(code) }
        }
    }
    let end = encode_record(END_MARK, 0, zero_pages);
    let code = match write_all(pipe_w, &end) {
        Ok(()) => 0,
        Err(c) => c,
    };
    // SAFETY: as above.
    unsafe { libc::_exit(code) }
}

fn encode_record(file_offset: u64, len: u64, zero_pages: u64) -> [u8; RECORD_LEN] {
    let mut b = [0u8; RECORD_LEN];
    let (a, rest) = b.split_at_mut(8);
    let (c, d) = rest.split_at_mut(8);
    a.copy_from_slice(&file_offset.to_ne_bytes());
    c.copy_from_slice(&len.to_ne_bytes());
    d.copy_from_slice(&zero_pages.to_ne_bytes());
    b
}

fn errno() -> i32 {
    // SAFETY: __errno_location returns the calling thread's valid errno slot.
    unsafe { *libc::__errno_location() }
}

/// Child side: write a record header, then vmsplice the run into the pipe.
fn child_send(fd: RawFd, fo: u64, p: *const u8, len: u64, zeros: u64) -> Result<(), i32> {
    write_all(fd, &encode_record(fo, len, zeros))?;
    let mut p = p;
    let mut left = len as usize;
    while left > 0 {
        let iov = libc::iovec {
            iov_base: p as *mut libc::c_void,
            iov_len: left,
        };
        // SAFETY: iov points into readable range memory (contract of
        // for_each_run); without SPLICE_F_GIFT the kernel only takes page
        // references, and the parent's later writes copy-on-write away from them.
        let n = unsafe { libc::vmsplice(fd, &iov, 1, 0) };
        if n < 0 {
            if errno() == libc::EINTR {
                continue;
            }
            return Err(EXIT_VMSPLICE);
        }
        let n = n as usize;
        if n == 0 || n > left {
            return Err(EXIT_VMSPLICE);
        }
        left -= n;
        // SAFETY: n <= left, so p stays within the run.
        p = unsafe { p.add(n) };
    }
    Ok(())
}

/// Child side: write(2) all of `buf` (24 bytes < PIPE_BUF, so normally one call).
fn write_all(fd: RawFd, buf: &[u8]) -> Result<(), i32> {
    let mut done = 0usize;
    while done < buf.len() {
        let rest = buf.get(done..).unwrap_or(&[]);
        // SAFETY: rest is a valid readable slice for its length.
        let n = unsafe { libc::write(fd, rest.as_ptr().cast(), rest.len()) };
        if n < 0 {
            if errno() == libc::EINTR {
                continue;
            }
            return Err(EXIT_WRITE);
        }
        if n == 0 {
            return Err(EXIT_WRITE);
        }
        done += n as usize;
    }
    Ok(())
}

/// Parent side: reads one record header. EOF (child gone) is an
/// `UnexpectedEof` error.
pub(crate) fn read_record(pipe: &mut File) -> io::Result<Record> {
    let mut b = [0u8; RECORD_LEN];
    pipe.read_exact(&mut b)?;
    let get = |o: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[o..o + 8]);
        u64::from_ne_bytes(a)
    };
    Ok(Record {
        file_offset: get(0),
        len: get(8),
        zero_pages: get(16),
    })
}

/// Parent side: splices exactly `len` bytes from `pipe` into `file` at
/// `offset`, adding progress to `counter`.
pub(crate) fn splice_into(
    pipe: &File,
    file: &File,
    offset: u64,
    len: u64,
    counter: &AtomicU64,
) -> io::Result<()> {
    let mut off = offset as libc::loff_t;
    let mut left = len as usize;
    while left > 0 {
        // SAFETY: both fds are open for the call's duration; `off` is a valid
        // loff_t the kernel updates; a NULL in-offset is required for a pipe.
        let n = unsafe {
            libc::splice(
                pipe.as_raw_fd(),
                core::ptr::null_mut(),
                file.as_raw_fd(),
                &mut off,
                left,
                libc::SPLICE_F_MOVE,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "pipe closed in the middle of a record",
            ));
        }
        left -= n as usize;
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
    Ok(())
}

/// Sends SIGKILL to `pid` (which must be our unreaped child).
pub(crate) fn kill(pid: libc::pid_t) {
    // SAFETY: kill has no memory preconditions; pid is our unreaped child, so
    // it cannot have been recycled for another process.
    unsafe { libc::kill(pid, libc::SIGKILL) };
}

/// How a reaped child ended.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ChildExit {
    pub status: libc::c_int,
    pub cpu_time: Duration,
}

impl ChildExit {
    pub fn success(&self) -> bool {
        libc::WIFEXITED(self.status) && libc::WEXITSTATUS(self.status) == 0
    }

    pub fn describe(&self) -> String {
        let s = self.status;
        if libc::WIFEXITED(s) {
            match libc::WEXITSTATUS(s) {
                EXIT_WRITE => "child exited: write to pipe failed".into(),
                EXIT_VMSPLICE => "child exited: vmsplice failed".into(),
                c => format!("child exited with status {c}"),
            }
        } else if libc::WIFSIGNALED(s) {
            format!("child killed by signal {}", libc::WTERMSIG(s))
        } else {
            format!("child ended with wait status {s:#x}")
        }
    }
}

/// Waits for `pid` (blocking) and collects its status and CPU time.
pub(crate) fn reap(pid: libc::pid_t) -> io::Result<ChildExit> {
    let mut status: libc::c_int = 0;
    // SAFETY: rusage is plain data, fully written by wait4 on success.
    let mut ru: libc::rusage = unsafe { core::mem::zeroed() };
    loop {
        // SAFETY: status and ru are valid out-pointers; pid is our child.
        let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
        if r == pid {
            break;
        }
        let e = io::Error::last_os_error();
        if r < 0 && e.kind() == io::ErrorKind::Interrupted {
            continue;
        }
        return Err(e);
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, (t.tv_usec as u32) * 1000);
    Ok(ChildExit {
        status,
        cpu_time: tv(ru.ru_utime) + tv(ru.ru_stime),
    })
}
