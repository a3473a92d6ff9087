//! Moving a request's data between a descriptor (a file, a tap) and guest
//! memory with one vectored call: the kernel copies straight between the
//! page cache, the disk or the network stack and guest RAM, with no buffer
//! in between. Only raw pointers into guest memory are made (from
//! vm-memory's bounds-checked slices), never Rust references: the guest may
//! touch the same bytes meanwhile.

use std::fs::File;
use std::io;
use std::marker::PhantomData;
use std::os::fd::{AsRawFd, RawFd};

use vm_memory::volatile_memory::PtrGuardMut;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::queue::Desc;

/// Why a transfer did not happen.
#[derive(Debug)]
pub enum Error {
    /// A segment lies (partly) outside guest memory.
    Guest,
    Io(io::Error),
}

/// Most segments one call takes (Linux's `UIO_MAXIOV`).
pub const IOV_MAX: usize = 1024;

/// The bytes of some descriptors, in order, as one scatter/gather list.
/// Every entry points into guest memory, which stays mapped while the list
/// (a borrow of that memory) lives.
pub struct GuestIov<'m> {
    iov: Vec<libc::iovec>,
    _guards: Vec<PtrGuardMut>,
    _mem: PhantomData<&'m GuestMemoryMmap>,
}

impl<'m> GuestIov<'m> {
    /// The list for `segs`; `Err(Error::Guest)` if any byte is outside guest
    /// memory. A segment across two memory regions takes two entries.
    pub fn new(mem: &'m GuestMemoryMmap, segs: &[Desc]) -> Result<Self, Error> {
        let mut iov = Vec::with_capacity(segs.len());
        let mut guards = Vec::with_capacity(segs.len());
        for d in segs {
            for s in GuestMemoryBackend::get_slices(mem, GuestAddress(d.addr), d.len as usize) {
                let s = s.map_err(|_| Error::Guest)?;
                let g = s.ptr_guard_mut();
                iov.push(libc::iovec {
                    iov_base: g.as_ptr().cast(),
                    iov_len: s.len(),
                });
                guards.push(g);
            }
        }
        Ok(GuestIov {
            iov,
            _guards: guards,
            _mem: PhantomData,
        })
    }

    /// The entries, for `readv`/`writev` and their kin: each is valid guest
    /// memory for as long as `self` lives, and may be read and written.
    pub fn iovecs(&self) -> &[libc::iovec] {
        &self.iov
    }

    /// All the bytes the list covers.
    pub fn len(&self) -> usize {
        self.iov.iter().map(|v| v.iov_len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The same list followed by `host` (a host buffer, for what does not
    /// fit in guest memory), for one call.
    pub fn then<'b>(&'b self, host: &'b mut [u8]) -> GuestIov<'b> {
        let mut iov = self.iov.clone();
        iov.push(libc::iovec {
            iov_base: host.as_mut_ptr().cast(),
            iov_len: host.len(),
        });
        GuestIov {
            iov,
            _guards: Vec::new(),
            _mem: PhantomData,
        }
    }
}

/// Bytes `skip..skip + len` of what the segments cover, in order, as
/// segments (shorter than asked where the segments end first).
pub fn sub_segs(segs: &[Desc], skip: u64, len: u64) -> Vec<Desc> {
    let mut out = Vec::new();
    let (mut pos, end) = (0u64, skip.saturating_add(len));
    for d in segs {
        let (a, b) = (pos, pos + u64::from(d.len));
        pos = b;
        let (from, to) = (a.max(skip), b.min(end));
        if from < to {
            out.push(Desc {
                addr: d.addr + (from - a),
                len: (to - from) as u32,
                write: d.write,
            });
        }
        if pos >= end {
            break;
        }
    }
    out
}

/// Writes zeroes over the segments.
pub fn zero(mem: &GuestMemoryMmap, segs: &[Desc]) -> Result<(), Error> {
    const ZEROES: [u8; 4096] = [0; 4096];
    for d in segs {
        let mut at = 0u64;
        while at < u64::from(d.len) {
            let n = (u64::from(d.len) - at).min(ZEROES.len() as u64) as usize;
            mem.write_slice(&ZEROES[..n], GuestAddress(d.addr + at))
                .map_err(|_| Error::Guest)?;
            at += n as u64;
        }
    }
    Ok(())
}

/// Copies `data` over the segments, in order, as far as both go.
pub fn copy_in(mem: &GuestMemoryMmap, segs: &[Desc], data: &[u8]) -> Result<(), Error> {
    let mut off = 0usize;
    for d in segs {
        let n = (d.len as usize).min(data.len() - off);
        mem.write_slice(&data[off..off + n], GuestAddress(d.addr))
            .map_err(|_| Error::Guest)?;
        off += n;
    }
    Ok(())
}

/// One `readv` from `fd` (a tap, a datagram socket: one frame) into `dst`.
pub fn read_into(fd: RawFd, dst: &GuestIov) -> io::Result<usize> {
    one_call(fd, dst, false)
}

/// One `writev` of `src` to `fd` (a tap, a datagram socket: one frame).
pub fn write_from(fd: RawFd, src: &GuestIov) -> io::Result<usize> {
    one_call(fd, src, true)
}

fn one_call(fd: RawFd, list: &GuestIov, write: bool) -> io::Result<usize> {
    let v = list.iovecs();
    // SAFETY: every entry is mapped guest memory the kernel may read and
    // write, valid while `list` lives (GuestIov's contract); `v.len()` entries.
    let n = unsafe {
        if write {
            libc::writev(fd, v.as_ptr(), v.len() as libc::c_int)
        } else {
            libc::readv(fd, v.as_ptr(), v.len() as libc::c_int)
        }
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Reads `file` from `offset` into the segments (or, with `write`, writes them
/// there), all of their bytes in order; a short transfer is continued, and
/// the end of the file before the last byte is an error.
pub fn transfer(
    file: &File,
    mem: &GuestMemoryMmap,
    segs: &[Desc],
    offset: u64,
    write: bool,
) -> Result<(), Error> {
    let list = GuestIov::new(mem, segs)?;
    let total = list.len();
    // A copy of the entries, advanced as the transfer goes on.
    let mut iov = list.iovecs().to_vec();
    let (mut done, mut first) = (0usize, 0usize);
    while done < total {
        let end = (first + IOV_MAX).min(iov.len());
        let pos = offset + done as u64;
        // SAFETY: every iovec points into guest memory that vm-memory
        // checked and keeps mapped (`list` lives until the end), with its
        // length; the kernel reads or writes only those bytes.
        let n = unsafe {
            if write {
                libc::pwritev(
                    file.as_raw_fd(),
                    iov[first..end].as_ptr(),
                    (end - first) as libc::c_int,
                    pos as libc::off_t,
                )
            } else {
                libc::preadv(
                    file.as_raw_fd(),
                    iov[first..end].as_ptr(),
                    (end - first) as libc::c_int,
                    pos as libc::off_t,
                )
            }
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(Error::Io(e));
        }
        if n == 0 {
            return Err(Error::Io(io::ErrorKind::UnexpectedEof.into()));
        }
        // Skip what was transferred: whole segments, then part of one.
        let mut n = n as usize;
        done += n;
        while n > 0 {
            let v = &mut iov[first];
            if n >= v.iov_len {
                n -= v.iov_len;
                first += 1;
            } else {
                // SAFETY: advancing within the same segment, by less than its length.
                v.iov_base = unsafe { v.iov_base.cast::<u8>().add(n) }.cast();
                v.iov_len -= n;
                n = 0;
            }
        }
    }
    drop(list);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;
    use vm_memory::Bytes;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x10000),
            (GuestAddress(0x10000), 0x10000),
        ])
        .unwrap()
    }

    /// An unnamed file in the temporary directory.
    fn scratch(tag: &str) -> File {
        let p = std::env::temp_dir().join(format!("snapvmm-vec-{tag}-{}", std::process::id()));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p)
            .unwrap();
        std::fs::remove_file(&p).unwrap();
        f
    }

    fn seg(addr: u64, len: u32) -> Desc {
        Desc {
            addr,
            len,
            write: true,
        }
    }

    #[test]
    fn scattered_segments_across_regions_read_and_write_in_order() {
        let m = mem();
        let f = scratch("order");
        let data: Vec<u8> = (0..12288u32).map(|i| (i * 7 % 251) as u8).collect();
        f.write_all_at(&data, 4096).unwrap();
        // The last segment straddles the two regions.
        let segs = [seg(0x3000, 4096), seg(0x100, 4096), seg(0xf800, 4096)];
        transfer(&f, &m, &segs, 4096, false).unwrap();
        let mut got = vec![0u8; 4096];
        for (i, s) in segs.iter().enumerate() {
            m.read_slice(&mut got, GuestAddress(s.addr)).unwrap();
            assert_eq!(got, data[i * 4096..(i + 1) * 4096], "segment {i}");
        }
        // And back: written to another place in the file, equal bytes.
        transfer(&f, &m, &segs, 65536, true).unwrap();
        let mut back = vec![0u8; 12288];
        f.read_exact_at(&mut back, 65536).unwrap();
        assert_eq!(back, data);
    }

    #[test]
    fn a_part_of_the_segments_is_cut_at_both_ends() {
        let segs = [seg(0x100, 100), seg(0x1000, 50), seg(0x2000, 200)];
        assert_eq!(
            sub_segs(&segs, 90, 70),
            vec![seg(0x100 + 90, 10), seg(0x1000, 50), seg(0x2000, 10)]
        );
        assert_eq!(sub_segs(&segs, 100, 50), vec![seg(0x1000, 50)]);
        assert_eq!(sub_segs(&segs, 340, 500), vec![seg(0x2000 + 190, 10)]);
        assert!(sub_segs(&segs, 350, 10).is_empty());
        let m = mem();
        m.write_slice(&[7u8; 300], GuestAddress(0x100)).unwrap();
        zero(&m, &sub_segs(&[seg(0x100, 300)], 10, 20)).unwrap();
        copy_in(&m, &[seg(0x200, 4)], &[1, 2, 3, 4, 5]).unwrap();
        let mut got = [0u8; 40];
        m.read_slice(&mut got, GuestAddress(0x100 + 5)).unwrap();
        assert_eq!(&got[..5], &[7; 5]);
        assert_eq!(&got[5..25], &[0; 20]);
        assert_eq!(&got[25..], &[7; 15]);
        let mut b = [0u8; 5];
        m.read_slice(&mut b, GuestAddress(0x200)).unwrap();
        assert_eq!(b, [1, 2, 3, 4, 7], "as far as the segments go");
    }

    #[test]
    fn outside_guest_memory_and_past_the_file_are_errors() {
        let m = mem();
        let f = scratch("errors");
        f.set_len(8192).unwrap();
        assert!(matches!(
            transfer(&f, &m, &[seg(0x1f000, 8192)], 0, false),
            Err(Error::Guest)
        ));
        match transfer(&f, &m, &[seg(0, 8192)], 4096, false) {
            Err(Error::Io(e)) => assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof),
            other => panic!("{other:?}"),
        }
    }
}
