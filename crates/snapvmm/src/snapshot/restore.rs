//! One decode path for every restore: `--incoming file:`, `migrate-incoming`
//! (a snapshot image file, RAM mapped lazily or copied) and `--loadvm`,
//! `snapshot-load` (the same image format read from a qcow2 snapshot's VM
//! state, RAM copied). Each checks the image, decodes the machine state and
//! checks the RAM layout in the same order, with the same errors.

use std::path::Path;
use std::time::Instant;

use std::sync::Arc;

use livesnap::chain::Chain;
use livesnap::fill::{Fill, FillDone};
use livesnap::{Image, ImageBacking, RamRange, SnapError};
use vmm::memory::GuestRam;
use vmm::snapshot::StateError;
use vmm::MachineState;

/// Why a snapshot cannot be restored (the image and machine are unchanged).
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The image itself: missing, truncated, corrupt, of another format.
    #[error(transparent)]
    Image(#[from] SnapError),
    /// The machine state inside it.
    #[error(transparent)]
    State(#[from] StateError),
    /// RAM ranges that are not those of the machine the state describes.
    #[error("its RAM layout does not match a {mib} MiB machine")]
    Layout { mib: u64 },
    /// Guest RAM could not be set up.
    #[error("cannot set up guest RAM: {0}")]
    Ram(String),
    /// Guest RAM could not be read from the image.
    #[error("cannot read RAM from it: {0}")]
    ReadRam(SnapError),
    /// The connection or command that carries a stream.
    #[error("{0}")]
    Transport(String),
    /// A lazily restored image is in use by another process.
    #[error("it is locked by another process: {0}")]
    Locked(std::io::Error),
}

/// How guest RAM comes from a snapshot image file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RamMode {
    /// Mapped from the image: pages are read when the guest touches them
    /// (`lazy` on the command line).
    Mapped,
    /// Read into fresh anonymous memory before the guest starts.
    Copy,
    /// Fresh anonymous memory filled while the guest runs (userfaultfd
    /// missing mode): a touched chunk first, the rest in the background
    /// (`uffd` on the command line).
    Fill,
}

impl RamMode {
    /// The `--restore-mode` value.
    pub fn name(self) -> &'static str {
        match self {
            RamMode::Mapped => "lazy",
            RamMode::Copy => "copy",
            RamMode::Fill => "uffd",
        }
    }
}

/// Guest RAM and machine state from an image, and for [`RamMode::Fill`] the
/// fill still under way (it must outlive the machine's vCPUs).
pub struct Restored {
    pub ram: GuestRam,
    pub state: MachineState,
    pub fill: Option<Fill>,
}

/// Checks an opened image and decodes its machine state.
pub fn decode<B: ImageBacking>(image: &Image<B>) -> Result<MachineState, RestoreError> {
    let bytes = image.device_state()?;
    let state = MachineState::from_bytes(&bytes)?;
    let layout = vmm::layout::ram_ranges(state.mem_bytes);
    let ranges = image.ranges();
    let matches = layout.len() == ranges.len()
        && layout
            .iter()
            .zip(ranges)
            .all(|(l, r)| l.0 == r.gpa && l.1 == r.len);
    if !matches {
        return Err(RestoreError::Layout {
            mib: state.mem_bytes >> 20,
        });
    }
    Ok(state)
}

/// Guest RAM read from a decoded image into anonymous memory (the image's
/// holes stay zero).
pub fn copy_ram<B: ImageBacking>(
    image: &Image<B>,
    state: &MachineState,
) -> Result<GuestRam, RestoreError> {
    let mut ram =
        GuestRam::anonymous(state.mem_bytes).map_err(|e| RestoreError::Ram(e.to_string()))?;
    for i in 0..image.ranges().len() {
        image
            .read_ram_into_zeroed(i, ram.region_bytes_mut(i))
            .map_err(RestoreError::ReadRam)?;
    }
    Ok(ram)
}

/// A snapshot image file: RAM mapped from it (lazy), copied, or filled
/// while the guest runs (`done` is told when the fill ends). An incremental
/// image is read with its parents; it cannot be mapped (its RAM lies in
/// several files), so `lazy` fills it instead.
pub fn from_file(
    path: &Path,
    mode: RamMode,
    done: Option<FillDone>,
) -> Result<Restored, RestoreError> {
    let t0 = Instant::now();
    if is_stream_file(path) {
        // Written front to back (`migrate exec:cat > FILE`): read like a stream.
        let f = livesnap::open_regular(path).map_err(|e| {
            RestoreError::Image(SnapError::Io {
                context: format!("open {}", path.display()),
                source: e,
            })
        })?;
        return from_stream(f).map(|(r, _)| r);
    }
    let (chain, state) = open(path)?;
    let mode = match mode {
        RamMode::Fill if !fill_available() => {
            // E.g. vm.unprivileged_userfaultfd=0 without CAP_SYS_PTRACE.
            let m = if chain.len() > 1 {
                RamMode::Copy
            } else {
                RamMode::Mapped
            };
            tracing::warn!(
                "userfaultfd is not available here: restoring with --restore-mode {}",
                m.name()
            );
            m
        }
        RamMode::Mapped if chain.len() > 1 => {
            let m = if fill_available() {
                RamMode::Fill
            } else {
                RamMode::Copy
            };
            tracing::info!(
                images = chain.len(),
                "an incremental snapshot cannot be mapped: restoring with --restore-mode {}",
                m.name()
            );
            m
        }
        m => m,
    };
    let (ram, fill) = match mode {
        RamMode::Copy => (copy_chain(&chain, &state)?, None),
        RamMode::Mapped => (map_ram(chain.top(), &state, path)?, None),
        RamMode::Fill => {
            let ram = GuestRam::anonymous(state.mem_bytes)
                .map_err(|e| RestoreError::Ram(e.to_string()))?;
            let fill = fill_ram(Arc::new(chain), &ram, done)?;
            (ram, Some(fill))
        }
    };
    tracing::info!(
        ms = t0.elapsed().as_secs_f64() * 1e3,
        ?mode,
        "snapshot opened"
    );
    Ok(Restored { ram, state, fill })
}

/// Whether `path` holds the stream form of an image.
pub fn is_stream_file(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 8];
    livesnap::open_regular(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok_and(|()| livesnap::stream::is_stream(&magic))
}

/// The stream form of an image (a socket, a command's output, a file
/// written as a stream): RAM read into fresh anonymous memory as it
/// arrives; the machine state and the layout are checked at its end.
pub fn from_stream(
    input: impl std::io::Read,
) -> Result<(Restored, livesnap::stream::Received), RestoreError> {
    let (reader, layout) = livesnap::stream::StreamReader::start(input)?;
    from_started_stream(reader, &layout)
}

/// [`from_stream`] once the stream header is read.
pub fn from_started_stream<R: std::io::Read>(
    reader: livesnap::stream::StreamReader<R>,
    layout: &livesnap::stream::StreamLayout,
) -> Result<(Restored, livesnap::stream::Received), RestoreError> {
    let mem = check_stream_layout(layout)?;
    let mut ram = GuestRam::anonymous(mem).map_err(|e| RestoreError::Ram(e.to_string()))?;
    let got = reader.receive(&mut ram.regions_bytes_mut())?;
    let state = state_for(&got.device_state, mem)?;
    Ok((
        Restored {
            ram,
            state,
            fill: None,
        },
        got,
    ))
}

/// The RAM size of a stream whose ranges are a machine's; else a layout error.
pub fn check_stream_layout(layout: &livesnap::stream::StreamLayout) -> Result<u64, RestoreError> {
    let mem = layout.ram_bytes();
    let same = vmm::layout::ram_ranges(mem)
        .iter()
        .copied()
        .eq(layout.ranges.iter().map(|r| (r.gpa, r.len)));
    if !same {
        return Err(RestoreError::Layout { mib: mem >> 20 });
    }
    // The size comes from the peer: nothing larger than this host is set up.
    // SAFETY: sysconf has no memory preconditions.
    let host = unsafe { libc::sysconf(libc::_SC_PHYS_PAGES) } as u64 * 4096;
    if host > 0 && mem > host {
        return Err(RestoreError::Ram(format!(
            "the stream is of a {} MiB machine, this host has {} MiB",
            mem >> 20,
            host >> 20
        )));
    }
    Ok(mem)
}

/// Decodes a streamed machine state and checks it is of a `mem`-byte machine.
pub fn state_for(bytes: &[u8], mem: u64) -> Result<MachineState, RestoreError> {
    let state = MachineState::from_bytes(bytes)?;
    if state.mem_bytes != mem {
        return Err(RestoreError::Layout {
            mib: state.mem_bytes >> 20,
        });
    }
    Ok(state)
}

/// Whether RAM can be filled through a userfaultfd here.
pub fn fill_available() -> bool {
    livesnap::uffd::Uffd::new_missing().is_ok()
}

/// Opens a snapshot image file (with its parents, for an incremental one)
/// and decodes its machine state (RAM untouched).
pub fn open(path: &Path) -> Result<(Chain, MachineState), RestoreError> {
    let chain = Chain::open(path)?;
    let state = decode(chain.top())?;
    Ok((chain, state))
}

/// Guest RAM read from a chain into anonymous memory.
fn copy_chain(chain: &Chain, state: &MachineState) -> Result<GuestRam, RestoreError> {
    if chain.len() == 1 {
        return copy_ram(chain.top(), state);
    }
    let mut ram =
        GuestRam::anonymous(state.mem_bytes).map_err(|e| RestoreError::Ram(e.to_string()))?;
    for i in 0..chain.top().ranges().len() {
        chain
            .read_ram_into_zeroed(i, ram.region_bytes_mut(i))
            .map_err(RestoreError::ReadRam)?;
    }
    Ok(ram)
}

/// Starts filling `ram` (fresh, never touched, laid out as the image's
/// ranges: checked by [`decode`]) from the chain while the guest runs. Its
/// images stay open, with a shared lock, until the fill is dropped.
pub fn fill_ram(
    chain: Arc<Chain>,
    ram: &GuestRam,
    done: Option<FillDone>,
) -> Result<Fill, RestoreError> {
    for image in chain.images() {
        lock_shared(image.file())?;
    }
    let ranges: Vec<RamRange> = ram
        .regions()
        .iter()
        // SAFETY: the regions are `ram`'s mappings; the fill only names them
        // in userfaultfd ioctls (it never dereferences them), and whoever owns
        // `ram` drops the fill before `ram` or with it.
        .map(|r| unsafe { RamRange::new(r.gpa, r.host, r.len) })
        .collect();
    let image_ranges = chain.top().ranges().to_vec();
    livesnap::fill::start_fill(&ranges, &image_ranges, chain, done)
        .map_err(|e| RestoreError::Ram(e.to_string()))
}

/// A shared `flock` on the image for as long as `file` is open: tools that
/// honour locks see it is in use.
fn lock_shared(file: &std::fs::File) -> Result<(), RestoreError> {
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a descriptor `file` owns; no memory involved.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) } != 0 {
        return Err(RestoreError::Locked(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// A VM state stored elsewhere (a qcow2 snapshot's), read through `source`.
pub fn from_source(
    source: Box<dyn livesnap::Source>,
) -> Result<(GuestRam, MachineState), RestoreError> {
    let (image, state) = open_source(source)?;
    let ram = copy_ram(&image, &state)?;
    Ok((ram, state))
}

/// Like [`copy_ram`] for a source that cannot tell its holes (the VM state
/// of a qcow2 disk): read 2 MiB at a time through a buffer, and only the
/// pages that are not all zeros written to RAM, so that the new RAM holds
/// what the guest had written and no more.
pub fn copy_ram_sparse<B: ImageBacking>(
    image: &Image<B>,
    state: &MachineState,
) -> Result<GuestRam, RestoreError> {
    let mut ram =
        GuestRam::anonymous(state.mem_bytes).map_err(|e| RestoreError::Ram(e.to_string()))?;
    let mut buf = vec![0u8; 2 << 20];
    let page = livesnap::PAGE_SIZE as usize;
    for (i, r) in image.ranges().to_vec().into_iter().enumerate() {
        let dst = ram.region_bytes_mut(i);
        let mut off = 0usize;
        while off < dst.len() {
            let n = (dst.len() - off).min(buf.len());
            read_range(image, &mut buf[..n], r.file_offset + off as u64, i)?;
            for (p, src) in buf[..n].chunks(page).enumerate() {
                if src.iter().any(|b| *b != 0) {
                    let at = off + p * page;
                    dst[at..at + src.len()].copy_from_slice(src);
                }
            }
            off += n;
        }
    }
    Ok(ram)
}

/// Reads `buf.len()` bytes of RAM range `i` at image offset `offset`.
fn read_range<B: ImageBacking>(
    image: &Image<B>,
    buf: &mut [u8],
    offset: u64,
    i: usize,
) -> Result<(), RestoreError> {
    image.read_at(buf, offset).map_err(|source| {
        RestoreError::ReadRam(livesnap::SnapError::Io {
            context: format!("read RAM range {i}"),
            source,
        })
    })
}

/// The image a source holds and its machine state, checked; RAM not read.
pub fn open_source(
    source: Box<dyn livesnap::Source>,
) -> Result<(livesnap::SourceImage, MachineState), RestoreError> {
    let image = Image::from_source(source)?;
    let state = decode(&image)?;
    Ok((image, state))
}

/// Reads all of an image's RAM once, 2 MiB at a time, keeping nothing:
/// what a restore from it would read can be read (no I/O error, no damaged
/// metadata in the way) — before anything that cannot be undone.
pub fn verify_ram<B: ImageBacking>(image: &Image<B>) -> Result<(), RestoreError> {
    let mut buf = vec![0u8; 2 << 20];
    for (i, r) in image.ranges().iter().enumerate() {
        let mut off = 0;
        while off < r.len {
            let n = (r.len - off).min(buf.len() as u64) as usize;
            read_range(image, &mut buf[..n], r.file_offset + off, i)?;
            off += n as u64;
        }
    }
    Ok(())
}

fn map_ram(image: &Image, state: &MachineState, path: &Path) -> Result<GuestRam, RestoreError> {
    use std::os::fd::AsFd;
    let ranges = image.ranges();
    let fd = image.file().as_fd();
    let mut ram = GuestRam::from_file(state.mem_bytes, |i| {
        Some(vmm::memory::FileBacking {
            fd,
            offset: ranges[i].file_offset,
        })
    })
    .map_err(|e| RestoreError::Ram(e.to_string()))?;
    // The image backs RAM from now on: lock it (shared) for as long as it does,
    // and turn a SIGBUS (the file truncated under the VM) into a clear error.
    let held = image
        .file()
        .try_clone()
        .map_err(|e| RestoreError::Ram(e.to_string()))?;
    let needed = ranges
        .iter()
        .map(|r| r.file_offset + r.len)
        .max()
        .unwrap_or(0);
    let name = format!("the snapshot image {}", path.display());
    ram.hold_backing(held, needed, name)
        .map_err(RestoreError::Locked)?;
    crate::sigbus::explain_for(path);
    Ok(ram)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A snapshot image in memory: `ranges` of RAM and `state` as device state.
    fn image(ranges: &[(u64, u64)], state: &[u8]) -> Image<Box<dyn livesnap::Source>> {
        struct Sink(Vec<u8>);
        impl livesnap::Sink for Sink {
            fn write_at(&mut self, buf: &[u8], offset: u64) -> std::io::Result<()> {
                let end = offset as usize + buf.len();
                if self.0.len() < end {
                    self.0.resize(end, 0);
                }
                self.0[offset as usize..end].copy_from_slice(buf);
                Ok(())
            }
            fn finish(&mut self, s: &livesnap::ImageSummary) -> std::io::Result<()> {
                self.0.resize(s.image_len as usize, 0);
                Ok(())
            }
            fn abort(&mut self) {}
        }
        // Page-aligned host memory for each range, filled with 7s.
        let mem: Vec<Vec<u8>> = ranges
            .iter()
            .map(|r| vec![7u8; r.1 as usize + 4096])
            .collect();
        let rr: Vec<livesnap::RamRange> = ranges
            .iter()
            .zip(&mem)
            // SAFETY: `mem` outlives the stopped capture made from these ranges.
            .map(|(r, m)| unsafe {
                livesnap::RamRange::new(r.0, m[m.as_ptr().align_offset(4096)..].as_ptr(), r.1)
            })
            .collect();
        let mut sink = Sink(Vec::new());
        livesnap::capture_stopped(&rr, state, &mut sink).unwrap();
        Image::from_source(Box::new(sink.0)).unwrap()
    }

    fn err<T>(r: Result<T, RestoreError>) -> RestoreError {
        match r {
            Err(e) => e,
            Ok(_) => panic!("expected an error"),
        }
    }

    #[test]
    fn decode_errors_name_what_is_wrong() {
        // Not a machine state at all.
        let e = err(decode(&image(&[(0, 4096)], b"not json")));
        assert!(
            matches!(e, RestoreError::State(StateError::Decode(_))),
            "{e}"
        );
        assert!(e.to_string().contains("not readable"), "{e}");
        // A machine state of another version.
        let e = err(decode(&image(&[(0, 4096)], br#"{"version": 999}"#)));
        assert!(
            matches!(
                e,
                RestoreError::State(StateError::Version { found: 999, .. })
            ),
            "{e}"
        );
        // An image that does not open.
        let e = err(from_source(Box::new(vec![0u8; 100])));
        assert!(matches!(e, RestoreError::Image(_)), "{e}");
        let e = err(from_file(Path::new("/nonexistent/snap"), RamMode::Copy, None).map(|_| ()));
        assert!(matches!(e, RestoreError::Image(_)), "{e}");
    }

    /// A real machine's state (32 MiB, 1 vCPU), as saved by snapvmm.
    const STATE_32M: &[u8] = include_bytes!("../../../../fuzz/seeds/machine_state/1cpu");

    #[test]
    fn the_ram_layout_must_be_the_machines() {
        let state = MachineState::from_bytes(STATE_32M).unwrap();
        assert_eq!(state.mem_bytes, 32 << 20);
        let e = err(decode(&image(&[(0, 4096)], STATE_32M)));
        assert!(matches!(e, RestoreError::Layout { mib: 32 }), "{e}");
        assert_eq!(
            e.to_string(),
            "its RAM layout does not match a 32 MiB machine"
        );
        // The right layout decodes, and its RAM is the image's.
        let layout = vmm::layout::ram_ranges(32 << 20);
        let img = image(&layout, STATE_32M);
        let state = decode(&img).unwrap();
        let ram = copy_ram(&img, &state).unwrap();
        assert!(ram.regions().iter().all(|r| r.len > 0));
        let mut ram = ram;
        assert!(ram.region_bytes_mut(0).iter().all(|&b| b == 7));
    }
}
