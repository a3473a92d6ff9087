//! Disks: `--disk` parsing and the block backends the virtio-blk device uses
//! (a raw file, or a qcow2 image through the qcow2 crate).

use std::any::Any;
use std::fs::OpenOptions;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use vmm::devices::virtio::{BlockBackend, RawFile};

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

fn valid_id(id: &str) -> bool {
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

/// A qcow2 image as a block device.
pub struct Qcow2Disk {
    pub image: qcow2::Qcow2,
    /// Held for the image's lifetime: another snapvmm cannot open it for writing.
    lock: std::fs::File,
    /// Where relative backing file names are resolved (the image's directory).
    dir: Option<std::path::PathBuf>,
}

impl Qcow2Disk {
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

impl BlockBackend for Qcow2Disk {
    fn size(&self) -> u64 {
        self.image.size()
    }
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.image.read_at(buf, offset).map_err(io_err)
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        // A handle an earlier failure left unusable (e.g. a failed save) first
        // reloads its metadata: the guest's write should not inherit that error.
        heal(&mut self.image);
        self.image.write_at(buf, offset).map_err(|e| {
            heal(&mut self.image);
            io_err(e)
        })
    }
    fn flush(&mut self) -> io::Result<()> {
        heal(&mut self.image);
        self.image.flush().map_err(|e| {
            heal(&mut self.image);
            io_err(e)
        })
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
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

/// Opens a disk for the VMM.
pub fn open(spec: &DiskSpec) -> Result<vmm::DiskConfig> {
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
    let backend: Box<dyn BlockBackend> = match format {
        Format::Raw => {
            let raw =
                RawFile::new(file).with_context(|| format!("cannot open disk {}", p.display()))?;
            if raw.size() == 0 {
                bail!("disk {} is empty", p.display());
            }
            Box::new(raw)
        }
        Format::Qcow2 => {
            let image = qcow2::Qcow2::open(p, !spec.readonly)
                .with_context(|| format!("cannot open qcow2 disk {}", p.display()))?;
            Box::new(Qcow2Disk {
                image,
                lock: file,
                dir: p.parent().map(|d| d.to_path_buf()),
            })
        }
    };
    Ok(vmm::DiskConfig {
        id: spec.id.clone(),
        backend,
        readonly: spec.readonly,
    })
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
}
