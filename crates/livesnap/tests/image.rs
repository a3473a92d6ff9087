//! The image reader refuses truncated, corrupted and foreign files with
//! distinct typed errors, and never panics.

mod common;

use std::path::{Path, PathBuf};

use common::{fill_sparse, Mem};
use livesnap::{capture_stopped, Image, SnapError, HEADER_SIZE, MAX_DEVICE_STATE};
use proptest::prelude::*;

const OFF_DEV_OFFSET: usize = 32;
const OFF_DEV_LEN: usize = 40;
const OFF_RANGES: usize = 64;
const OFF_CRC: usize = 4092;

/// A small valid image: two ranges (16 KiB, 8 KiB) and 5000 bytes of device state.
fn valid_image(dir: &Path) -> Vec<u8> {
    let mut mem = Mem::new(1 << 20);
    fill_sparse(mem.bytes_mut(), 2, 0x42);
    let ranges = [
        mem.range(0, 16 << 10, 0),
        mem.range(64 << 10, 8 << 10, 1 << 30),
    ];
    let dev: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
    let p = dir.join("valid.img");
    capture_stopped(&ranges, &dev, &p).unwrap();
    let img = Image::open(&p).unwrap();
    assert_eq!(img.device_state().unwrap(), dev);
    std::fs::read(&p).unwrap()
}

fn open_bytes(dir: &Path, bytes: &[u8]) -> Result<Image, SnapError> {
    let p: PathBuf = dir.join("case.img");
    std::fs::write(&p, bytes).unwrap();
    Image::open(&p)
}

fn get_u64(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}

fn put_u64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

fn reseal(b: &mut [u8]) {
    let crc = crc32fast::hash(&b[..OFF_CRC]);
    b[OFF_CRC..OFF_CRC + 4].copy_from_slice(&crc.to_le_bytes());
}

#[test]
fn truncated_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let good = valid_image(dir.path());
    for len in [good.len() - 1, good.len() - 5000, 4096, 100, 0] {
        let e = open_bytes(dir.path(), &good[..len]).unwrap_err();
        assert!(matches!(e, SnapError::Truncated { .. }), "len {len}: {e:?}");
    }
    let mut longer = good.clone();
    longer.push(0);
    let e = open_bytes(dir.path(), &longer).unwrap_err();
    assert!(matches!(e, SnapError::TrailingData { .. }), "{e:?}");
}

#[test]
fn corrupted_header_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let good = valid_image(dir.path());
    for off in [20usize, 30, OFF_RANGES + 3, 2000, OFF_CRC + 1] {
        let mut b = good.clone();
        b[off] ^= 0x04;
        let e = open_bytes(dir.path(), &b).unwrap_err();
        assert!(
            matches!(e, SnapError::HeaderChecksum { .. }),
            "off {off}: {e:?}"
        );
    }
}

#[test]
fn corrupted_device_state_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = valid_image(dir.path());
    let n = b.len();
    b[n - 10] ^= 0xff;
    let e = open_bytes(dir.path(), &b).unwrap_err();
    assert!(matches!(e, SnapError::DeviceStateChecksum { .. }), "{e:?}");
}

#[test]
fn foreign_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = valid_image(dir.path());
    b[0] = b'X';
    assert!(matches!(
        open_bytes(dir.path(), &b),
        Err(SnapError::BadMagic)
    ));
    let elf = std::fs::read("/proc/self/exe").unwrap();
    assert!(matches!(
        open_bytes(dir.path(), &elf),
        Err(SnapError::BadMagic)
    ));
    assert!(matches!(
        open_bytes(dir.path(), b"hello world\n"),
        Err(SnapError::BadMagic)
    ));
    let e = Image::open(dir.path().join("missing.img")).unwrap_err();
    assert!(matches!(e, SnapError::Io { .. }), "{e:?}");
}

#[test]
fn unsupported_version_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = valid_image(dir.path());
    b[8] = 2;
    reseal(&mut b);
    let e = open_bytes(dir.path(), &b).unwrap_err();
    assert!(
        matches!(
            e,
            SnapError::UnsupportedVersion {
                found: 2,
                supported: 1
            }
        ),
        "{e:?}"
    );
}

#[test]
fn absurd_device_state_length_is_refused_before_allocating() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = valid_image(dir.path());
    put_u64(&mut b, OFF_DEV_LEN, 1 << 50);
    reseal(&mut b);
    let e = open_bytes(dir.path(), &b).unwrap_err();
    assert!(
        matches!(e, SnapError::DeviceStateTooLarge { len, max } if len == 1 << 50 && max == MAX_DEVICE_STATE),
        "{e:?}"
    );
}

#[test]
fn impossible_layouts_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let good = valid_image(dir.path());
    let patches: Vec<(usize, u64)> = vec![
        (OFF_RANGES + 24, 0),               // range 1 gpa overlaps range 0
        (OFF_RANGES + 16, 0),               // range 0 file offset inside the header
        (OFF_RANGES + 8, 4096 + 1),         // unaligned length
        (OFF_RANGES + 24 + 16, 1 << 40),    // range 1 beyond the device state
        (OFF_DEV_OFFSET, HEADER_SIZE),      // device state over RAM
        (OFF_RANGES + 24, u64::MAX - 4095), // gpa overflow
    ];
    for (off, v) in patches {
        let mut b = good.clone();
        put_u64(&mut b, off, v);
        reseal(&mut b);
        let e = open_bytes(dir.path(), &b).unwrap_err();
        assert!(
            matches!(e, SnapError::InvalidLayout(_)),
            "patch {off}={v:#x}: {e:?}"
        );
    }
}

#[test]
fn a_large_range_off_its_2_mib_alignment_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mem = Mem::new(4 << 20);
    let p = dir.path().join("big.img");
    capture_stopped(&[mem.range(0, 4 << 20, 0)], b"dev", &p).unwrap();
    let good = std::fs::read(&p).unwrap();
    let off = get_u64(&good, OFF_RANGES + 16);
    assert_eq!(off % (2 << 20), 0, "the writer aligns it");
    // Moved by one page: still page-aligned and inside the file, but off the rule.
    let mut b = good.clone();
    put_u64(&mut b, OFF_RANGES + 16, off + 4096);
    reseal(&mut b);
    let e = open_bytes(dir.path(), &b).unwrap_err();
    assert!(
        matches!(&e, SnapError::InvalidLayout(m) if m.contains("2 MiB")),
        "{e:?}"
    );
}

#[test]
fn read_ram_into_checks_its_arguments() {
    let dir = tempfile::tempdir().unwrap();
    valid_image(dir.path());
    let img = Image::open(dir.path().join("valid.img")).unwrap();
    let mut small = vec![0u8; 4096];
    assert!(matches!(
        img.read_ram_into(0, &mut small),
        Err(SnapError::InvalidInput(_))
    ));
    assert!(matches!(
        img.read_ram_into(9, &mut small),
        Err(SnapError::InvalidInput(_))
    ));
}

#[test]
fn reading_into_fresh_memory_leaves_the_holes_untouched() {
    const LEN: usize = 16 << 20;
    let dir = tempfile::tempdir().unwrap();
    let mut mem = Mem::new(LEN);
    // Data in the first and the last MiB only: the rest is a hole in the file.
    mem.bytes_mut()[..1 << 20].fill(0x11);
    mem.bytes_mut()[LEN - (1 << 20)..].fill(0x22);
    let p = dir.path().join("sparse.img");
    capture_stopped(&[mem.range(0, LEN, 0)], b"dev", &p).unwrap();
    let img = Image::open(&p).unwrap();
    // Fresh anonymous memory (page-aligned, reads as zeros, nothing resident yet).
    let mut fresh = Mem::new(LEN);
    img.read_ram_into_zeroed(0, fresh.bytes_mut()).unwrap();
    // Before anything reads the holes (which would map the zero page there).
    let mut resident = vec![0u8; LEN / 4096];
    // SAFETY: the pointer and length are those of `fresh`'s mapping; `resident`
    // has one byte per page.
    let r = unsafe {
        libc::mincore(
            fresh.bytes_mut().as_mut_ptr().cast(),
            LEN,
            resident.as_mut_ptr(),
        )
    };
    assert_eq!(r, 0);
    let touched = resident.iter().filter(|r| *r & 1 == 1).count();
    assert!(fresh.bytes() == mem.bytes(), "same bytes as the source");
    // The two data MiB, each perhaps in huge pages (4 x 2 MiB at worst), of 16 MiB.
    assert!(
        touched <= 4 * 512,
        "{touched} of {} pages resident: holes were written",
        LEN / 4096
    );
}

/// Opening must never panic; whatever opens must also read without panicking.
fn exercise(dir: &Path, bytes: &[u8]) -> Result<(), SnapError> {
    let img = open_bytes(dir, bytes)?;
    img.device_state()?;
    for (i, r) in img.ranges().to_vec().iter().enumerate() {
        let mut v = vec![0u8; r.len as usize];
        img.read_ram_into(i, &mut v)?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(mut bytes in proptest::collection::vec(any::<u8>(), 0..9000),
                                   magic in any::<bool>()) {
        if magic && bytes.len() >= 8 {
            bytes[..8].copy_from_slice(b"SNAPVMM\0");
        }
        let dir = tempfile::tempdir().unwrap();
        let _ = exercise(dir.path(), &bytes);
    }

    #[test]
    fn corrupted_images_never_panic(
        flips in proptest::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 0..4),
        cut in proptest::option::of(any::<prop::sample::Index>()),
        reseal_header in any::<bool>(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let mut b = valid_image(dir.path());
        for (i, x) in &flips {
            let at = i.index(b.len());
            b[at] ^= x;
        }
        if reseal_header {
            reseal(&mut b);
        }
        if let Some(c) = cut {
            let n = c.index(b.len());
            b.truncate(n);
        }
        let res = exercise(dir.path(), &b);
        // A single flip inside the header or the device state is always detected.
        if flips.len() == 1 && !reseal_header && cut.is_none() {
            let at = flips[0].0.index(b.len());
            if at < HEADER_SIZE as usize || at >= b.len() - 5000 {
                prop_assert!(res.is_err(), "flip at {} not detected", at);
            }
        }
    }
}
