//! Crash-consistency tests: run an operation against a backend that stops
//! accepting writes after N writes, for every N, and check that the result
//! is consistent (`qemu-img check` exit 0 or 3 — leaks only) and that all
//! previously committed data is intact.

mod common;

use common::{pattern, CrashBackend};
use qcow2::{CreateOptions, MemBackend, Qcow2};

const SIZE: u64 = 4 << 20;

struct Base {
    bytes: Vec<u8>,
    model: Vec<u8>,
    snap_model: Vec<u8>,
}

/// Image with data, one snapshot "old" (with VM state) and more data after it.
fn base(cluster_bits: u32) -> Base {
    let be = CrashBackend::new(Vec::new(), None);
    let mut img = Qcow2::create_with(
        Box::new(be.clone()),
        SIZE,
        CreateOptions {
            cluster_bits,
            ..Default::default()
        },
        None,
    )
    .unwrap();
    let mut model = vec![0u8; SIZE as usize];
    let d = pattern(1 << 20, 1);
    img.write_at(&d, 100_000).unwrap();
    model[100_000..100_000 + d.len()].copy_from_slice(&d);
    img.write_vmstate(0, &pattern(200_000, 2)).unwrap();
    img.create_snapshot("old", 1, 200_000).unwrap();
    let snap_model = model.clone();
    let d = pattern(300_000, 3);
    img.write_at(&d, 3 << 20).unwrap();
    model[3 << 20..(3 << 20) + d.len()].copy_from_slice(&d);
    img.flush().unwrap();
    drop(img);
    Base {
        bytes: be.bytes(),
        model,
        snap_model,
    }
}

fn read_all(img: &mut Qcow2) -> Vec<u8> {
    let mut b = vec![0u8; img.size() as usize];
    img.read_at(&mut b, 0).unwrap();
    b
}

fn read_snap(img: &mut Qcow2, name: &str) -> Vec<u8> {
    let mut b = vec![0u8; img.size() as usize];
    img.read_snapshot_at(name, &mut b, 0).unwrap();
    b
}

/// Run `op` with every possible write budget; call `verify` on each result.
fn crash_loop(
    what: &str,
    base: &[u8],
    op: &dyn Fn(&mut Qcow2) -> qcow2::Result<()>,
    verify: &dyn Fn(&mut Qcow2, bool),
) {
    let have_qemu = common::have("qemu-img");
    if !have_qemu {
        eprintln!("note: qemu-img not found; crash images are only checked by this library");
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("crash.qcow2");
    let mut leaks = 0;
    for n in 0u64.. {
        let be = CrashBackend::new(base.to_vec(), Some(n));
        let res =
            Qcow2::open_with(Box::new(be.clone()), true, None).and_then(|mut img| op(&mut img));
        let bytes = be.bytes();
        if have_qemu {
            std::fs::write(&path, &bytes).unwrap();
            let (c, out) = common::check(&path);
            assert!(
                c == 0 || c == 3,
                "{what}: crash after {n} writes corrupted the image (exit {c}):\n{out}"
            );
            if c == 3 {
                leaks += 1;
            }
            if res.is_ok() {
                assert_eq!(c, 0, "{what}: completed operation left leaks:\n{out}");
            }
        }
        let mut img = Qcow2::open_with(Box::new(MemBackend::new(bytes)), false, None)
            .unwrap_or_else(|e| panic!("{what}: reopen after crash at {n} failed: {e}"));
        verify(&mut img, res.is_ok());
        if let Err(e) = &res {
            assert!(
                e.to_string().contains("simulated crash"),
                "{what}: unexpected error {e}"
            );
        } else {
            eprintln!("{what}: {n} crash points checked ({leaks} with leaked clusters only)");
            assert!(n > 3);
            return;
        }
    }
}

#[test]
fn crash_during_snapshot_create_with_vmstate() {
    for cb in [16, 9] {
        let b = base(cb);
        let vm = pattern(300_000, 9);
        let (model, snap_model) = (b.model.clone(), b.snap_model.clone());
        crash_loop(
            &format!("snapshot create (cluster_bits {cb})"),
            &b.bytes,
            &|img| {
                img.write_vmstate(0, &vm)?;
                img.create_snapshot("new", 5, vm.len() as u64)?;
                Ok(())
            },
            &|img, done| {
                assert!(read_all(img) == model);
                assert!(read_snap(img, "old") == snap_model);
                let names: Vec<_> = img.snapshots().iter().map(|s| s.name.clone()).collect();
                assert!(names == ["old"] || names == ["old", "new"], "{names:?}");
                if done {
                    assert_eq!(names.len(), 2);
                }
                if names.len() == 2 {
                    assert!(read_snap(img, "new") == model);
                    let mut v = vec![0u8; vm.len()];
                    img.read_vmstate("new", 0, &mut v).unwrap();
                    assert!(v == vm);
                }
            },
        );
    }
}

#[test]
fn crash_during_cow_write() {
    for cb in [16, 12, 9] {
        let b = base(cb);
        // Overwrites data shared with the snapshot (COW of L2 tables and data),
        // partially covering clusters at both ends.
        let (woff, wlen) = (90_000u64, 400_000usize);
        let data = pattern(wlen, 11);
        let (model, snap_model) = (b.model.clone(), b.snap_model.clone());
        let mut new_model = model.clone();
        new_model[woff as usize..woff as usize + wlen].copy_from_slice(&data);
        crash_loop(
            &format!("COW write (cluster_bits {cb})"),
            &b.bytes,
            &|img| img.write_at(&data, woff),
            &|img, done| {
                let cur = read_all(img);
                assert!(cur[..woff as usize] == model[..woff as usize]);
                assert!(cur[woff as usize + wlen..] == model[woff as usize + wlen..]);
                // Inside the written range every byte is either old or new.
                for (i, &c) in cur[woff as usize..woff as usize + wlen].iter().enumerate() {
                    let j = woff as usize + i;
                    assert!(c == model[j] || c == new_model[j], "byte {j}");
                }
                if done {
                    assert!(cur == new_model);
                }
                assert!(read_snap(img, "old") == snap_model);
            },
        );
    }
}

#[test]
fn crash_during_apply_and_delete() {
    let b = base(12);
    let (model, snap_model) = (b.model.clone(), b.snap_model.clone());
    crash_loop(
        "apply",
        &b.bytes,
        &|img| img.apply_snapshot("old"),
        &|img, done| {
            let cur = read_all(img);
            assert!(cur == model || cur == snap_model);
            if done {
                assert!(cur == snap_model);
            }
            assert!(read_snap(img, "old") == snap_model);
        },
    );
    crash_loop(
        "delete",
        &b.bytes,
        &|img| img.delete_snapshot("old"),
        &|img, done| {
            assert!(read_all(img) == model);
            let n = img.snapshots().len();
            assert!(n == 1 || n == 0);
            if done {
                assert_eq!(n, 0);
            }
        },
    );
}

#[test]
fn crash_during_refcount_growth() {
    // 512-byte clusters: one refcount block covers only 128 KiB, so this
    // write needs new refcount blocks and a bigger refcount table.
    let b = base(9);
    let data = pattern(2 << 20, 21);
    let model = b.model.clone();
    let mut new_model = model.clone();
    new_model[(1 << 20)..(3 << 20)].copy_from_slice(&data);
    crash_loop(
        "growth",
        &b.bytes,
        &|img| {
            for (i, c) in data.chunks(256 << 10).enumerate() {
                img.write_at(c, (1 << 20) + (i as u64) * (256 << 10))?;
            }
            Ok(())
        },
        &|img, done| {
            let cur = read_all(img);
            assert!(cur[..1 << 20] == model[..1 << 20]);
            if done {
                assert!(cur == new_model);
            }
        },
    );
}
