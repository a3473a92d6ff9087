//! Guest data never lands on metadata: an L2 entry that points at the L1 table,
//! the refcount table or a refcount block (a corrupt or hostile image) makes the
//! write fail, the image is marked corrupt, and the metadata is untouched.

mod common;

use std::path::Path;

use common::{have, run};
use qcow2::{CreateOptions, Qcow2};

const CLUSTER: u64 = 64 << 10;

fn be64(b: &[u8], off: usize) -> u64 {
    u64::from_be_bytes(b[off..off + 8].try_into().unwrap())
}

/// A 4 MiB image with guest cluster 0 allocated; returns its bytes.
fn image(path: &Path) -> Vec<u8> {
    let mut q = Qcow2::create(path, 4 << 20, CreateOptions::default()).unwrap();
    q.write_at(&[0x5a; 4096], 0).unwrap();
    q.flush().unwrap();
    drop(q);
    std::fs::read(path).unwrap()
}

/// Points guest cluster 0's L2 entry at host offset `target` (flag "copied", as a
/// refcount-1 cluster has).
fn aim_cluster_0_at(path: &Path, bytes: &[u8], target: u64) {
    let l1_off = be64(bytes, 40) as usize;
    let l2_off = (be64(bytes, l1_off) & 0x00ff_ffff_ffff_fe00) as usize;
    let mut b = bytes.to_vec();
    b[l2_off..l2_off + 8].copy_from_slice(&(target | 1 << 63).to_be_bytes());
    std::fs::write(path, b).unwrap();
}

#[test]
fn writes_aimed_at_metadata_are_refused_and_mark_the_image_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img.qcow2");
    let good = image(&path);
    let l1 = be64(&good, 40);
    let rct = be64(&good, 48);
    let rcb = be64(&good, rct as usize);
    for (target, what) in [
        (l1, "active L1 table"),
        (rct, "refcount table"),
        (rcb, "refcount block"),
    ] {
        assert_eq!(target % CLUSTER, 0);
        aim_cluster_0_at(&path, &good, target);
        let before = std::fs::read(&path).unwrap();
        let mut q = Qcow2::open(&path, true).unwrap();
        let e = q.write_at(&[0xee; 512], 0).unwrap_err().to_string();
        assert!(
            e.contains("overlaps the") && e.contains(what),
            "{what}: {e}"
        );
        drop(q);
        let after = std::fs::read(&path).unwrap();
        let t = target as usize;
        assert_eq!(
            after[t..t + CLUSTER as usize],
            before[t..t + CLUSTER as usize],
            "{what} untouched"
        );
        // The v3 corrupt bit is set: the image opens read-only only, like in QEMU.
        assert_ne!(be64(&after, 72) & 2, 0, "corrupt bit");
        let again = Qcow2::open(&path, true).unwrap_err().to_string();
        assert!(again.contains("marked corrupt"), "{again}");
        assert!(Qcow2::open(&path, false).is_ok());
        if have("qemu-img") {
            let (_, out) = run("qemu-img", &["info", path.to_str().unwrap()]);
            assert!(out.contains("corrupt: true"), "{out}");
        }
    }
    // A sound image is not affected: writes go where they belong.
    std::fs::write(&path, &good).unwrap();
    let mut q = Qcow2::open(&path, true).unwrap();
    q.write_at(&[0xee; 512], 0).unwrap();
    q.write_at(&[0xee; 512], 2 << 20).unwrap();
}

#[test]
fn a_free_looking_cluster_that_holds_metadata_is_not_allocated_over() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img.qcow2");
    let good = image(&path);
    // The refcount block says the L1 table's cluster is free (16-bit refcounts).
    let l1 = be64(&good, 40);
    let rcb = be64(&good, be64(&good, 48) as usize) as usize;
    let at = rcb + 2 * (l1 / CLUSTER) as usize;
    let mut b = good.clone();
    b[at..at + 2].copy_from_slice(&0u16.to_be_bytes());
    std::fs::write(&path, &b).unwrap();
    let mut q = Qcow2::open(&path, true).unwrap();
    // A write to a new guest cluster needs a new host cluster: the first
    // "free" one is the L1 table's.
    let e = q.write_at(&[0xee; 512], 1 << 20).unwrap_err().to_string();
    assert!(
        e.contains("overlaps the active L1 table") && e.contains("marked corrupt"),
        "{e}"
    );
    drop(q);
    let after = std::fs::read(&path).unwrap();
    let l1 = l1 as usize;
    assert_eq!(
        after[l1..l1 + CLUSTER as usize],
        b[l1..l1 + CLUSTER as usize],
        "L1 table untouched"
    );
    assert_ne!(be64(&after, 72) & 2, 0, "corrupt bit");
}
