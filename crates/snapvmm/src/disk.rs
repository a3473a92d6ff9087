//! Disks: `--disk` parsing and the block backends the virtio-blk device uses
//! (a raw file, or a qcow2 image through the qcow2 crate).

use std::fs::OpenOptions;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};
use vm_memory::GuestMemoryMmap;
use vmm::devices::virtio::queue::Desc;
use vmm::devices::virtio::{vectored, BlockBackend, RawFile};

/// Image format of a disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Raw,
    Qcow2,
}

/// One `--disk PATH[,format=qcow2|raw][,id=NAME][,readonly=on]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    pub path: PathBuf,
    /// None: probed from the file's magic.
    pub format: Option<Format>,
    pub id: String,
    pub readonly: bool,
}

/// Parses `--disk` values; ids default to disk0, disk1, ... and must be unique.
pub fn parse_disks(values: &[String]) -> Result<Vec<DiskSpec>> {
    let mut out: Vec<DiskSpec> = Vec::new();
    for (i, v) in values.iter().enumerate() {
        let mut parts = v.split(',');
        let path = parts.next().unwrap_or_default();
        if path.is_empty() {
            bail!("invalid --disk '{v}': expected PATH[,format=qcow2|raw][,id=NAME][,readonly=on]");
        }
        let mut spec = DiskSpec {
            path: PathBuf::from(path),
            format: None,
            id: format!("disk{i}"),
            readonly: false,
        };
        for opt in parts {
            match opt.split_once('=') {
                Some(("format", "qcow2")) => spec.format = Some(Format::Qcow2),
                Some(("format", "raw")) => spec.format = Some(Format::Raw),
                Some(("id", id)) if valid_id(id) => spec.id = id.to_string(),
                Some(("readonly", "on" | "true" | "yes")) => spec.readonly = true,
                Some(("readonly", "off" | "false" | "no")) => spec.readonly = false,
                _ => bail!(
                    "invalid --disk option '{opt}' in '{v}': expected format=qcow2|raw, id=NAME (letters, digits, -_.) or readonly=on|off"
                ),
            }
        }
        if out.iter().any(|d| d.id == spec.id) {
            bail!("--disk id '{}' is used twice", spec.id);
        }
        out.push(spec);
    }
    if out.len() > vmm::devices::virtio::MAX_DEVICES {
        bail!("at most {} disks", vmm::devices::virtio::MAX_DEVICES);
    }
    Ok(out)
}

/// A device id (QMP node name): 1 to 32 letters, digits, `-`, `_` or `.`.
pub(crate) fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 32
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

/// The format of an existing file, from its first bytes.
pub fn probe(path: &Path) -> Result<Format> {
    use std::io::Read;
    let mut magic = [0u8; 4];
    let mut f = std::fs::File::open(path)
        .with_context(|| format!("cannot open disk {}", path.display()))?;
    let n = f.read(&mut magic).unwrap_or(0);
    Ok(if n == 4 && &magic == b"QFI\xfb" {
        Format::Qcow2
    } else {
        Format::Raw
    })
}

/// A qcow2 image, shared by its virtio-blk device (guest I/O, through
/// [`Qcow2Backend`]) and the snapshot layer, which reaches it by disk id
/// through [`Disks`]. Lock order: the device's lock, then the image's; the
/// snapshot layer takes only the image's.
#[derive(Clone)]
pub struct Qcow2Handle {
    image: Arc<Mutex<qcow2::Qcow2>>,
    /// Held for the image's lifetime: another snapvmm cannot open it for writing.
    lock: Arc<std::fs::File>,
    /// Where relative backing file names are resolved (the image's directory).
    dir: Option<std::path::PathBuf>,
}

impl Qcow2Handle {
    /// Runs `f` on the image (under its lock).
    pub fn with<R>(&self, f: impl FnOnce(&mut qcow2::Qcow2) -> R) -> R {
        f(&mut self.image.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// A second, read-only handle on the same open file (for reading a snapshot's
    /// VM state piece by piece while this one stays attached).
    pub fn reader(&self) -> Result<qcow2::Qcow2, qcow2::Error> {
        let file = self.lock.try_clone()?;
        qcow2::Qcow2::open_with(
            Box::new(qcow2::FileBackend::new(file)),
            false,
            self.dir.as_deref(),
        )
    }
}

/// One attached disk as the snapshot layer sees it.
#[derive(Clone)]
pub struct DiskEntry {
    pub id: String,
    pub readonly: bool,
    /// The image, for a qcow2 disk (the only kind with internal snapshots).
    pub qcow2: Option<Qcow2Handle>,
}

/// The VM's disks, in device order, found by id.
#[derive(Clone, Default)]
pub struct Disks(Vec<DiskEntry>);

impl Disks {
    pub fn ids(&self) -> Vec<String> {
        self.0.iter().map(|d| d.id.clone()).collect()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Position of disk `id` in device order.
    pub fn index(&self, id: &str) -> Option<usize> {
        self.0.iter().position(|d| d.id == id)
    }

    pub fn get(&self, i: usize) -> Option<&DiskEntry> {
        self.0.get(i)
    }

    pub fn iter(&self) -> impl Iterator<Item = &DiskEntry> {
        self.0.iter()
    }

    /// Runs `f` on disk `i`'s qcow2 image; None for a raw disk.
    pub fn with_qcow2<R>(&self, i: usize, f: impl FnOnce(&mut qcow2::Qcow2) -> R) -> Option<R> {
        self.0.get(i)?.qcow2.as_ref().map(|h| h.with(f))
    }

    pub fn is_qcow2(&self, i: usize) -> bool {
        self.0.get(i).is_some_and(|d| d.qcow2.is_some())
    }
}

fn io_err(e: qcow2::Error) -> io::Error {
    io::Error::other(e.to_string())
}

/// After a failed update (e.g. the host file system is full) the image's
/// metadata is reloaded from the file, so later requests work again: the
/// failed request gets its I/O error and nothing more is lost.
pub fn heal(q: &mut qcow2::Qcow2) {
    if !q.is_poisoned() {
        return;
    }
    if let Err(e) = q.recover() {
        tracing::error!("qcow2 image cannot recover: {e}");
        return;
    }
    // The failed update may have left clusters allocated but unused: give them back.
    match q.repair_leaks() {
        Ok(n) => tracing::warn!(leaked = n, "qcow2 image recovered after a failed update"),
        Err(e) => tracing::warn!("qcow2 image recovered; its leaks stay: {e}"),
    }
}

/// The block backend of a qcow2 disk: guest I/O on the shared image.
struct Qcow2Backend(Qcow2Handle);

impl BlockBackend for Qcow2Backend {
    fn size(&self) -> u64 {
        self.0.with(|q| q.size())
    }
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.0.with(|q| q.read_at(buf, offset)).map_err(io_err)
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.0.with(|q| {
            // A handle an earlier failure left unusable (e.g. a failed save) first
            // reloads its metadata: the guest's write should not inherit that error.
            heal(q);
            q.write_at(buf, offset).map_err(|e| {
                heal(q);
                io_err(e)
            })
        })
    }
    fn read_into(
        &mut self,
        mem: &GuestMemoryMmap,
        segs: &[Desc],
        offset: u64,
    ) -> Option<Result<(), vectored::Error>> {
        self.0.with(|q| {
            q.file()?;
            Some(read_extents(q, mem, segs, offset))
        })
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.with(|q| {
            heal(q);
            q.flush().map_err(|e| {
                heal(q);
                io_err(e)
            })
        })
    }
}

/// Reads a guest request's segments from a qcow2 image at `offset`, piece by
/// piece as the image maps it: runs of its file straight into guest memory,
/// zeroes written in place, backing-file bytes through a buffer.
fn read_extents(
    q: &mut qcow2::Qcow2,
    mem: &GuestMemoryMmap,
    segs: &[Desc],
    offset: u64,
) -> Result<(), vectored::Error> {
    let failed = |e: qcow2::Error| vectored::Error::Io(io_err(e));
    let total = segs.iter().map(|d| u64::from(d.len)).sum();
    let mut at = 0u64;
    for x in q.extents(offset, total).map_err(failed)? {
        let part = vectored::sub_segs(segs, at, x.len());
        match x {
            qcow2::Extent::File { at: host, .. } => match q.file() {
                Some(file) => vectored::transfer(file, mem, &part, host, false)?,
                None => {
                    return Err(vectored::Error::Io(io::Error::other(
                        "image without a file",
                    )))
                }
            },
            qcow2::Extent::Zero { .. } => vectored::zero(mem, &part)?,
            qcow2::Extent::Other { len } => {
                let mut b = vec![0u8; len as usize];
                q.read_at(&mut b, offset + at).map_err(failed)?;
                vectored::copy_in(mem, &part, &b)?;
            }
        }
        at += x.len();
    }
    Ok(())
}

/// Takes an advisory lock on `f` (held while it stays open) so two VMMs
/// never write one image: shared for read-only use, exclusive otherwise.
fn lock(f: &std::fs::File, path: &Path, readonly: bool) -> Result<()> {
    let op = if readonly {
        libc::LOCK_SH
    } else {
        libc::LOCK_EX
    };
    // SAFETY: flock on a file descriptor we own; no memory is involved.
    if unsafe { libc::flock(f.as_raw_fd(), op | libc::LOCK_NB) } != 0 {
        bail!(
            "disk {} is in use by another process (it holds a lock on it)",
            path.display()
        );
    }
    Ok(())
}

/// Opens every `--disk`: the devices' backends and their registry.
pub fn open_all(specs: &[DiskSpec]) -> Result<(Vec<vmm::DiskConfig>, Disks)> {
    let mut configs = Vec::new();
    let mut disks = Disks::default();
    for spec in specs {
        let (c, d) = open(spec)?;
        configs.push(c);
        disks.0.push(d);
    }
    Ok((configs, disks))
}

/// Opens a disk for the VMM.
pub fn open(spec: &DiskSpec) -> Result<(vmm::DiskConfig, DiskEntry)> {
    let format = match spec.format {
        Some(f) => f,
        None => probe(&spec.path)?,
    };
    let p = &spec.path;
    let file = OpenOptions::new()
        .read(true)
        .write(!spec.readonly)
        .open(p)
        .with_context(|| format!("cannot open disk {}", p.display()))?;
    lock(&file, p, spec.readonly)?;
    let (backend, qcow2): (Box<dyn BlockBackend>, _) = match format {
        Format::Raw => {
            let raw =
                RawFile::new(file).with_context(|| format!("cannot open disk {}", p.display()))?;
            if raw.size() == 0 {
                bail!("disk {} is empty", p.display());
            }
            (Box::new(raw), None)
        }
        Format::Qcow2 => {
            let image = qcow2::Qcow2::open(p, !spec.readonly)
                .with_context(|| format!("cannot open qcow2 disk {}", p.display()))?;
            let h = Qcow2Handle {
                image: Arc::new(Mutex::new(image)),
                lock: Arc::new(file),
                dir: p.parent().map(|d| d.to_path_buf()),
            };
            (Box::new(Qcow2Backend(h.clone())), Some(h))
        }
    };
    let config = vmm::DiskConfig {
        id: spec.id.clone(),
        backend,
        readonly: spec.readonly,
    };
    let entry = DiskEntry {
        id: spec.id.clone(),
        readonly: spec.readonly,
        qcow2,
    };
    Ok((config, entry))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_options() {
        let d = parse_disks(&[
            "a.qcow2".into(),
            "b.img,format=raw,id=data,readonly=on".into(),
        ])
        .unwrap();
        assert_eq!(d[0].id, "disk0");
        assert_eq!(d[0].format, None);
        assert_eq!(d[1].id, "data");
        assert_eq!(d[1].format, Some(Format::Raw));
        assert!(d[1].readonly);
        for bad in [
            vec![",format=raw".to_string()],
            vec!["a,format=vmdk".into()],
            vec!["a,id=".into()],
            vec!["a,id=x y".into()],
            vec!["a,bogus=1".into()],
            vec!["a,id=x".into(), "b,id=x".into()],
        ] {
            assert!(parse_disks(&bad).is_err(), "{bad:?}");
        }
    }

    /// A request's segments read from a qcow2 image straight into guest
    /// memory hold what `read_at` reads: file runs, holes, backing bytes.
    #[test]
    fn a_qcow2_read_lands_in_guest_memory_as_read_at_reads_it() {
        use vm_memory::{Bytes, GuestAddress};
        let dir = std::env::temp_dir().join(format!("snapvmm-qread-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let size = 4u64 << 20;
        let bytes = |n: usize, seed: u8| -> Vec<u8> {
            (0..n).map(|i| (i as u8).wrapping_mul(13) ^ seed).collect()
        };
        let base = dir.join("base.qcow2");
        let mut b = qcow2::Qcow2::create(&base, size, Default::default()).unwrap();
        b.write_at(&bytes(size as usize, 1), 0).unwrap();
        drop(b);
        let opts = qcow2::CreateOptions {
            backing_file: Some("base.qcow2".into()),
            ..Default::default()
        };
        let mut q = qcow2::Qcow2::create(&dir.join("top.qcow2"), size, opts).unwrap();
        q.write_at(&bytes(300_000, 2), 1 << 20).unwrap();
        q.write_at(&bytes(5000, 3), (2 << 20) + 4096).unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        // Scattered, odd-sized segments, over file runs and backing bytes.
        let segs = [
            (0x1000u64, 4096u32),
            (0x30_0000, 512),
            (0x20_0000, 900_000),
            (0x10, 3584),
        ];
        let segs: Vec<Desc> = segs
            .iter()
            .map(|&(addr, len)| Desc {
                addr,
                len,
                write: true,
            })
            .collect();
        let total: usize = segs.iter().map(|d| d.len as usize).sum();
        for offset in [0u64, (1 << 20) - 4096, (2 << 20) - 8192] {
            let mut want = vec![0u8; total];
            q.read_at(&mut want, offset).unwrap();
            read_extents(&mut q, &mem, &segs, offset).unwrap();
            let mut got = Vec::new();
            for d in &segs {
                let mut part = vec![0u8; d.len as usize];
                mem.read_slice(&mut part, GuestAddress(d.addr)).unwrap();
                got.extend(part);
            }
            assert!(got == want, "bytes at {offset} differ");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
