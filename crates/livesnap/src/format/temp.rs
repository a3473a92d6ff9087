//! Writing an image file safely: a temporary file next to the destination,
//! renamed over it only once complete, so a failed or cancelled capture
//! never leaves a half-written image where a good one was.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use crate::error::{Result, SnapError};
use crate::format::image::{file_kind, Header};

static TMP_SEQ: AtomicU32 = AtomicU32::new(0);

/// The temp file next to the destination; removed on drop unless renamed.
pub(crate) struct TempImage {
    pub(crate) file: File,
    tmp: PathBuf,
    pub(crate) dest: PathBuf,
    dir: PathBuf,
    renamed: bool,
}

impl TempImage {
    /// Creates `<dest>.tmp-<pid>[-n]` (empty; [`TempImage::size`] sizes it).
    ///
    /// The image holds guest RAM (keys, passwords): it is created 0600, and when it
    /// replaces an existing file it keeps that file's owner and never gets a wider mode.
    /// A symlink is followed (the image replaces its target); a destination that is not
    /// a regular file (a device, a FIFO, a socket) is refused: renaming over it would
    /// replace the node.
    pub(crate) fn create(dest: &Path) -> Result<TempImage> {
        let dest = &resolve_destination(dest)?;
        let name = dest.file_name().ok_or_else(|| {
            SnapError::InvalidInput(format!("destination {} has no file name", dest.display()))
        })?;
        let existing = match std::fs::metadata(dest) {
            Ok(m) if m.is_dir() => {
                return Err(SnapError::InvalidInput(format!(
                    "destination {} is a directory",
                    dest.display()
                )))
            }
            Ok(m) if !m.is_file() => {
                return Err(SnapError::InvalidInput(format!(
                    "destination {} is not a regular file ({}): snapshot images are written to regular files only",
                    dest.display(),
                    file_kind(&m)
                )))
            }
            Ok(m) => Some(m),
            Err(_) => None,
        };
        let mode = existing.as_ref().map_or(0o600, |m| {
            std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o600
        });
        let dir = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        remove_stale_temp_files(&dir, name);
        let pid = std::process::id();
        let mut attempt = 0;
        let (file, tmp) = loop {
            let seq = TMP_SEQ.fetch_add(1, Ordering::Relaxed);
            let mut tmp_name = name.to_os_string();
            tmp_name.push(format!(".tmp-{pid}-{seq}"));
            let tmp = dir.join(tmp_name);
            match OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .custom_flags(libc::O_CLOEXEC)
                .open(&tmp)
            {
                Ok(f) => {
                    if let Some(m) = &existing {
                        use std::os::unix::fs::MetadataExt;
                        // Keep the replaced file's owner where we may (root); the umask
                        // may only have narrowed the mode, which is fine.
                        let _ = std::os::unix::fs::fchown(&f, Some(m.uid()), Some(m.gid()));
                    }
                    break (f, tmp);
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempt < 100 => {
                    attempt += 1;
                }
                Err(source) => return Err(SnapError::DestDir { dir, source }),
            }
        };
        Ok(TempImage {
            file,
            tmp,
            dest: dest.to_path_buf(),
            dir,
            renamed: false,
        })
    }

    /// A second descriptor of the temp file for direct I/O (`O_DIRECT`):
    /// writes then cost their device time and nothing more — no page cache
    /// to fill, no dirty-page throttling to sleep in. `None` where the file
    /// system refuses it (tmpfs).
    pub(crate) fn open_direct(&self) -> Option<File> {
        OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT | libc::O_CLOEXEC)
            .open(&self.tmp)
            .map_err(|e| tracing::debug!("no direct I/O to {}: {e}", self.tmp.display()))
            .ok()
    }

    /// Sizes the file to `len` (sparse).
    pub(crate) fn size(&self, len: u64) -> Result<()> {
        self.file
            .set_len(len)
            .map_err(|e| SnapError::io(format!("ftruncate {}", self.tmp.display()), e))
    }

    /// Writes device state and header, syncs, and renames over `dest`.
    pub(crate) fn finish(
        mut self,
        header: &Header,
        dev: &[u8],
        cancelled: impl Fn() -> bool,
    ) -> Result<()> {
        self.file
            .write_all_at(dev, header.dev_offset)
            .map_err(|e| SnapError::io("write device state", e))?;
        self.file
            .write_all_at(&header.encode(), 0)
            .map_err(|e| SnapError::io("write snapshot header", e))?;
        self.file
            .sync_data()
            .map_err(|e| SnapError::io("fdatasync snapshot", e))?;
        if cancelled() {
            return Err(SnapError::Cancelled);
        }
        std::fs::rename(&self.tmp, &self.dest).map_err(|e| {
            SnapError::io(
                format!("rename {} to {}", self.tmp.display(), self.dest.display()),
                e,
            )
        })?;
        self.renamed = true;
        if let Err(e) = File::open(&self.dir).and_then(|d| d.sync_all()) {
            tracing::warn!("fsync of directory {} failed: {e}", self.dir.display());
        }
        Ok(())
    }
}

/// Removes `<name>.tmp-<pid>-<n>` files left in `dir` by processes that no longer
/// exist (a capture killed with SIGKILL cannot clean up after itself). Files of
/// live processes, this one included, are left alone.
fn remove_stale_temp_files(dir: &Path, name: &std::ffi::OsStr) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let prefix = format!("{}.tmp-", name.to_string_lossy());
    for e in entries.flatten() {
        let file = e.file_name();
        let file = file.to_string_lossy();
        let Some(pid) = file
            .strip_prefix(&prefix)
            .and_then(|rest| rest.split_once('-'))
            .filter(|(_, seq)| seq.bytes().all(|b| b.is_ascii_digit()) && !seq.is_empty())
            .and_then(|(pid, _)| pid.parse::<i32>().ok())
        else {
            continue;
        };
        // SAFETY: signal 0 sends nothing; it only asks whether `pid` exists.
        let gone = pid > 0
            && unsafe { libc::kill(pid, 0) } != 0
            && io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
        if gone {
            match std::fs::remove_file(e.path()) {
                Ok(()) => tracing::warn!(
                    "removed {}, left by a capture that was killed",
                    e.path().display()
                ),
                Err(err) => tracing::warn!("cannot remove stale {}: {err}", e.path().display()),
            }
        }
    }
}

/// Follows symlinks to the path the image should replace or create.
fn resolve_destination(dest: &Path) -> Result<PathBuf> {
    let mut p = dest.to_path_buf();
    for _ in 0..40 {
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.file_type().is_symlink() => {
                let target = std::fs::read_link(&p)
                    .map_err(|e| SnapError::io(format!("readlink {}", p.display()), e))?;
                p = match p.parent() {
                    Some(dir) if target.is_relative() => dir.join(target),
                    _ => target,
                };
            }
            _ => return Ok(p),
        }
    }
    Err(SnapError::InvalidInput(format!(
        "destination {}: too many levels of symbolic links",
        dest.display()
    )))
}

impl Drop for TempImage {
    fn drop(&mut self) {
        if !self.renamed {
            if let Err(e) = std::fs::remove_file(&self.tmp) {
                tracing::warn!("cannot remove {}: {e}", self.tmp.display());
            }
        }
    }
}
