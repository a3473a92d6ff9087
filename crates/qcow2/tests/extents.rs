//! `Qcow2::extents`: reading the image file at the runs it names, zeroes where
//! it says zeroes, and `read_at` for the rest gives exactly what `read_at`
//! gives for the whole range.

mod common;

use std::os::unix::fs::FileExt;

use common::pattern;
use qcow2::{CreateOptions, Extent, Qcow2};

const SIZE: u64 = 4 << 20;

/// `offset..offset + len` read piece by piece as `extents` describes it.
fn read_by_extents(img: &mut Qcow2, offset: u64, len: u64) -> Vec<u8> {
    let pieces = img.extents(offset, len).unwrap();
    assert_eq!(pieces.iter().map(Extent::len).sum::<u64>(), len);
    let mut out = vec![0u8; len as usize];
    let mut at = 0usize;
    for p in pieces {
        let n = p.len() as usize;
        let b = &mut out[at..at + n];
        match p {
            Extent::File { at: host, .. } => {
                img.file().unwrap().read_exact_at(b, host).unwrap();
            }
            Extent::Zero { .. } => b.fill(0),
            Extent::Other { .. } => img.read_at(b, offset + at as u64).unwrap(),
        }
        at += n;
    }
    out
}

fn assert_same(img: &mut Qcow2, ranges: &[(u64, u64)]) {
    for &(off, len) in ranges {
        let mut want = vec![0u8; len as usize];
        img.read_at(&mut want, off).unwrap();
        assert!(
            read_by_extents(img, off, len) == want,
            "bytes {off}..{} differ",
            off + len
        );
    }
}

#[test]
fn extents_name_where_every_byte_is() {
    let dir = tempfile::tempdir().unwrap();
    for cb in [9u32, 12, 16] {
        let path = dir.path().join(format!("a{cb}.qcow2"));
        let opts = CreateOptions {
            cluster_bits: cb,
            ..Default::default()
        };
        let mut img = Qcow2::create(&path, SIZE, opts).unwrap();
        // A sequential 1 MiB, a write across an L2 table's reach, scattered
        // small writes, and holes between them.
        img.write_at(&pattern(1 << 20, 1), 0).unwrap();
        img.write_at(&pattern(300_000, 2), (2 << 20) - 150_000)
            .unwrap();
        for i in 0..20u64 {
            img.write_at(&pattern(700, 3 + i), (3 << 20) + i * 37_000)
                .unwrap();
        }
        // With 64 KiB clusters one L2 table maps 512 MiB: a sequential
        // write is one run of the file (smaller clusters put L2 tables
        // between the data).
        let pieces = img.extents(0, 1 << 20).unwrap();
        assert!(
            cb < 16 || matches!(pieces[..], [Extent::File { len, .. }] if len == 1 << 20),
            "a sequential write is one run of the file: {pieces:?}"
        );
        assert!(pieces.iter().all(|p| matches!(p, Extent::File { .. })));
        assert_eq!(
            img.extents(SIZE - 65536, 65536).unwrap(),
            vec![Extent::Zero { len: 65536 }],
            "never written: zeroes"
        );
        assert_same(
            &mut img,
            &[
                (0, SIZE),
                (4095, 1 << 20),
                ((2 << 20) - 200_000, 400_000),
                (3 << 20, 1 << 20),
                (12_345, 1),
            ],
        );
        assert!(img.extents(SIZE - 10, 11).is_err(), "past the end");
    }
}

#[test]
fn a_backing_files_bytes_are_left_to_read_at() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let mut b = Qcow2::create(&base, SIZE, CreateOptions::default()).unwrap();
    b.write_at(&pattern(SIZE as usize, 9), 0).unwrap();
    b.flush().unwrap();
    drop(b);
    let top = dir.path().join("top.qcow2");
    let opts = CreateOptions {
        backing_file: Some("base.qcow2".into()),
        ..Default::default()
    };
    let mut img = Qcow2::create(&top, SIZE, opts).unwrap();
    img.write_at(&pattern(100_000, 10), 1 << 20).unwrap();
    let pieces = img.extents(0, 2 << 20).unwrap();
    assert!(matches!(pieces[0], Extent::Other { .. }), "{pieces:?}");
    assert!(
        pieces.iter().any(|p| matches!(p, Extent::File { .. })),
        "{pieces:?}"
    );
    assert_same(&mut img, &[(0, SIZE), (1_000_000, 200_000)]);
}
