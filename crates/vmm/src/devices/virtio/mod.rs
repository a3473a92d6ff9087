//! virtio devices on the virtio-mmio transport: block ([`block`]) and
//! network ([`net`]) devices.
//!
//! Each device gets a 4 KiB register window at [`mmio_base`]`(i)` and an
//! IOAPIC line [`irq`]`(i)`; guests find them through the Linux command-line
//! syntax `virtio_mmio.device=4K@BASE:IRQ` ([`cmdline_entry`]).

pub mod block;
pub mod net;
pub mod pci;
pub mod queue;
pub mod transport;
pub mod vectored;
pub mod vsock;

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use vm_memory::GuestMemoryMmap;

pub use block::{BlockStats, VirtioBlk, VirtioBlkState};

/// First virtio-mmio window, inside the MMIO gap below 4 GiB.
pub const MMIO_BASE: u64 = 0xd000_0000;
/// Size of each device's window.
pub const MMIO_SIZE: u64 = 0x1000;
/// Most virtio-mmio devices a machine gets.
pub const MAX_DEVICES: usize = 16;
/// IOAPIC lines for the devices: the free ISA lines first (0, 1, 4, 8 and 12
/// are taken or reserved), then the IOAPIC's upper eight (which a guest booted
/// with `noapic` cannot use).
const IRQS: [u32; MAX_DEVICES] = [5, 6, 7, 9, 10, 11, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23];

/// Register window of device `i`.
pub fn mmio_base(i: usize) -> u64 {
    MMIO_BASE + MMIO_SIZE * i as u64
}

/// Interrupt line of device `i`.
pub fn irq(i: usize) -> u32 {
    IRQS[i]
}

/// `virtio_mmio.device=4K@0x...:N` for device `i`.
pub fn cmdline_entry(i: usize) -> String {
    format!("virtio_mmio.device=4K@{:#x}:{}", mmio_base(i), irq(i))
}

/// A disk image as the block device sees it: byte-addressed, fixed size.
pub trait BlockBackend: Send {
    /// Size in bytes.
    fn size(&self) -> u64;
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()>;
    fn flush(&mut self) -> io::Result<()>;
    /// The file that holds the disk's bytes at their own offsets (a raw
    /// image), for reads and writes straight between it and guest memory;
    /// other backends go through a buffer and `read_at`/`write_at`.
    fn plain_file(&self) -> Option<&File> {
        None
    }
    /// Reads the guest segments `segs` (in order) from `offset` with no
    /// buffer in between, where the backend knows where its bytes lie (a
    /// qcow2 image in a file); `None` where it does not: the device then
    /// reads through a buffer and `read_at`.
    fn read_into(
        &mut self,
        mem: &GuestMemoryMmap,
        segs: &[queue::Desc],
        offset: u64,
    ) -> Option<Result<(), vectored::Error>> {
        let _ = (mem, segs, offset);
        None
    }
    /// The guest no longer needs these bytes (their content is then
    /// unspecified). By default the request is honoured by doing nothing.
    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        let _ = (offset, len);
        Ok(())
    }
    /// These bytes read as zeroes from now on. By default zeroes are written.
    fn write_zeroes(&mut self, offset: u64, len: u64) -> io::Result<()> {
        let zeroes = vec![0u8; len.min(1 << 20) as usize];
        let mut at = 0;
        while at < len {
            let n = (len - at).min(zeroes.len() as u64) as usize;
            self.write_at(&zeroes[..n], offset + at)?;
            at += n as u64;
        }
        Ok(())
    }
}

/// A disk held in memory (a RAM disk): for tests and fuzz targets, which
/// drive the block device without files. Reads and writes past its end
/// fail (the device checks requests against [`BlockBackend::size`] first).
pub struct MemDisk(pub Vec<u8>);

impl BlockBackend for MemDisk {
    fn size(&self) -> u64 {
        self.0.len() as u64
    }
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let src = usize::try_from(offset)
            .ok()
            .and_then(|o| self.0.get(o..o.checked_add(buf.len())?))
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        buf.copy_from_slice(src);
        Ok(())
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        let dst = usize::try_from(offset)
            .ok()
            .and_then(|o| self.0.get_mut(o..o.checked_add(buf.len())?))
            .ok_or_else(|| io::Error::from(io::ErrorKind::WriteZero))?;
        dst.copy_from_slice(buf);
        Ok(())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// `fallocate(mode)` over a range of `file`; false where the file system
/// does not support it.
fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<bool> {
    use std::os::fd::AsRawFd;
    // SAFETY: fallocate on a descriptor this file owns; no memory is involved.
    let r = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset as i64, len as i64) };
    if r == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL) => Ok(false),
        _ => Err(e),
    }
}

/// A raw image file.
pub struct RawFile {
    file: File,
    size: u64,
}

impl RawFile {
    pub fn new(file: File) -> io::Result<RawFile> {
        let size = file.metadata()?.len();
        Ok(RawFile { file, size })
    }
}

impl BlockBackend for RawFile {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }
    fn plain_file(&self) -> Option<&File> {
        Some(&self.file)
    }
    /// Punches a hole: the file gives the space back.
    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        fallocate(
            &self.file,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )
        .map(|_| ())
    }
    /// A hole reads as zeroes; where holes cannot be punched, zeroes are written.
    fn write_zeroes(&mut self, offset: u64, len: u64) -> io::Result<()> {
        let punched = fallocate(
            &self.file,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )?;
        if punched {
            return Ok(());
        }
        let zeroes = vec![0u8; len.min(1 << 20) as usize];
        let mut at = 0;
        while at < len {
            let n = (len - at).min(zeroes.len() as u64) as usize;
            self.file.write_all_at(&zeroes[..n], offset + at)?;
            at += n as u64;
        }
        Ok(())
    }
}
