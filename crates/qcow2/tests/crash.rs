//! Crash-consistency tests: run an operation against a backend that stops
//! accepting writes after N writes, for every N, and check that the result
//! is consistent (`qemu-img check` exit 0 or 3 — leaks only) and that all
//! previously committed data is intact.

mod common;

use common::{base, pattern, read_all, read_snap, CrashBackend};
use qcow2::{MemBackend, Qcow2};

/// Check one crash image: `qemu-img check` (if available) must exit 0 or 3
/// (0 if `done`), and `verify` must accept it. Returns whether it leaked.
fn check_image(
    what: &str,
    path: &std::path::Path,
    bytes: Vec<u8>,
    done: bool,
    verify: &dyn Fn(&mut Qcow2, bool),
) -> bool {
    let mut leaked = false;
    if common::have("qemu-img") {
        std::fs::write(path, &bytes).unwrap();
        let (c, out) = common::check(path);
        assert!(
            c == 0 || c == 3,
            "{what}: corrupted the image (exit {c}):\n{out}"
        );
        leaked = c == 3;
        if done {
            assert_eq!(c, 0, "{what}: completed operation left leaks:\n{out}");
        }
    }
    let mut img = Qcow2::open_with(Box::new(MemBackend::new(bytes)), false, None)
        .unwrap_or_else(|e| panic!("{what}: reopen failed: {e}"));
    verify(&mut img, done);
    leaked
}

/// Run `op` with every possible write budget; call `verify` on each result.
fn crash_loop(
    what: &str,
    base: &[u8],
    op: &dyn Fn(&mut Qcow2) -> qcow2::Result<()>,
    verify: &dyn Fn(&mut Qcow2, bool),
) {
    crash_loop_ex(what, base, false, op, verify)
}

/// Like [`crash_loop`]; with `lossy`, every crash image is also checked in
/// variants where some of the writes issued since the last flush are lost
/// (all of them, every other one, only the first one): a disk cache may
/// persist unflushed writes in any order.
fn crash_loop_ex(
    what: &str,
    base: &[u8],
    lossy: bool,
    op: &dyn Fn(&mut Qcow2) -> qcow2::Result<()>,
    verify: &dyn Fn(&mut Qcow2, bool),
) {
    if !common::have("qemu-img") {
        eprintln!("note: qemu-img not found; crash images are only checked by this library");
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("crash.qcow2");
    let (mut leaks, mut variants) = (0, 0);
    for n in 0u64.. {
        let be = CrashBackend::new(base.to_vec(), Some(n));
        let res =
            Qcow2::open_with(Box::new(be.clone()), true, None).and_then(|mut img| op(&mut img));
        let done = res.is_ok();
        if let Err(e) = &res {
            assert!(
                e.to_string().contains("simulated crash"),
                "{what}: unexpected error {e}"
            );
        }
        let w = format!("{what}: crash after {n} writes");
        if check_image(&w, &path, be.bytes(), done, verify) {
            leaks += 1;
        }
        if lossy && !done && be.unflushed() > 0 {
            let keeps: [&dyn Fn(usize) -> bool; 4] =
                [&|_| false, &|k| k % 2 == 0, &|k| k % 2 == 1, &|k| k != 0];
            for (v, keep) in keeps.iter().enumerate() {
                let w = format!("{w} (lossy variant {v}, {} unflushed)", be.unflushed());
                check_image(&w, &path, be.bytes_lossy(keep), false, verify);
                variants += 1;
            }
        }
        if done {
            eprintln!(
                "{what}: {n} crash points checked ({leaks} with leaked clusters only, \
                 {variants} lossy variants)"
            );
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

/// Guest writes issued while a snapshot is frozen: (offset, length, seed).
/// They overwrite clusters shared with "old" and the frozen view, allocate
/// new clusters, overwrite clusters shared with the frozen view only, and
/// finally rewrite (in place) clusters allocated after the freeze. The first
/// two need single clusters, which could land in structures a careless
/// freeze would free (old refcount blocks) before its header write is durable.
const LIVE_WRITES: [(u64, usize, u64); 6] = [
    (1_500_000, 300, 29),
    (200_000, 100, 30),
    (90_000, 200_000, 31),
    (2 << 20, 150_000, 32),
    ((3 << 20) + 1000, 100_000, 33),
    ((2 << 20) + 5000, 20_000, 34),
];

/// VM state with a zero range that is never written.
fn live_vmstate() -> Vec<u8> {
    let mut vm = pattern(400_000, 41);
    vm[150_000..260_000].fill(0);
    vm
}

/// freeze → vmstate (second part first) → guest writes interleaved with the
/// remaining vmstate → commit (or abort).
fn live_op(img: &mut Qcow2, vm: &[u8], commit: bool) -> qcow2::Result<()> {
    let f = img.freeze("new")?;
    for (i, &(off, len, seed)) in LIVE_WRITES.iter().enumerate() {
        img.write_at(&pattern(len, seed), off)?;
        if i == 1 {
            img.write_frozen_vmstate(&f, 260_000, &vm[260_000..])?;
        }
        if i == 3 {
            img.write_frozen_vmstate(&f, 0, &vm[..100_000])?;
        }
    }
    // Zero range skipped; the rest of the first part, with an overlap.
    img.write_frozen_vmstate(&f, 90_000, &vm[90_000..150_000])?;
    if commit {
        img.commit_frozen(f, 5, vm.len() as u64)?;
    } else {
        img.abort_frozen(f)?;
    }
    Ok(())
}

/// Disk models after each live write (index 0 = at the freeze).
fn live_models(model: &[u8]) -> Vec<Vec<u8>> {
    let mut ms = vec![model.to_vec()];
    for &(off, len, seed) in &LIVE_WRITES {
        let mut m = ms.last().unwrap().clone();
        m[off as usize..off as usize + len].copy_from_slice(&pattern(len, seed));
        ms.push(m);
    }
    ms
}

/// Every byte of the active disk must come from one of the stages.
fn check_active_live(img: &mut Qcow2, ms: &[Vec<u8>], done: bool) {
    let cur = read_all(img);
    if done {
        assert!(cur == *ms.last().unwrap());
        return;
    }
    let mut touched = vec![false; cur.len()];
    for &(off, len, _) in &LIVE_WRITES {
        touched[off as usize..off as usize + len].fill(true);
    }
    for (j, &c) in cur.iter().enumerate() {
        if touched[j] {
            assert!(ms.iter().any(|m| m[j] == c), "byte {j}");
        } else {
            assert!(c == ms[0][j], "untouched byte {j} changed");
        }
    }
}

#[test]
fn crash_during_live_snapshot_commit() {
    for cb in [16, 12] {
        let b = base(cb);
        let vm = live_vmstate();
        let ms = live_models(&b.model);
        let snap_model = b.snap_model.clone();
        crash_loop_ex(
            &format!("live snapshot commit (cluster_bits {cb})"),
            &b.bytes,
            true,
            &|img| live_op(img, &vm, true),
            &|img, done| {
                assert!(read_snap(img, "old") == snap_model);
                let names: Vec<_> = img.snapshots().iter().map(|s| s.name.clone()).collect();
                assert!(names == ["old"] || names == ["old", "new"], "{names:?}");
                if done {
                    assert_eq!(names.len(), 2);
                }
                if names.len() == 2 {
                    // Complete: disk at the freeze, full VM state, metadata.
                    assert!(read_snap(img, "new") == ms[0]);
                    let info = img.find_snapshot("new").unwrap().clone();
                    assert_eq!(info.vm_state_size, vm.len() as u64);
                    assert_eq!(img.snapshot_vm_clock("new"), Some(5));
                    let mut v = vec![0u8; vm.len()];
                    img.read_vmstate("new", 0, &mut v).unwrap();
                    assert!(v == vm);
                }
                check_active_live(img, &ms, done);
            },
        );
    }
}

#[test]
fn crash_during_live_snapshot_abort() {
    let b = base(12);
    let vm = live_vmstate();
    let ms = live_models(&b.model);
    let snap_model = b.snap_model.clone();
    crash_loop_ex(
        "live snapshot abort",
        &b.bytes,
        true,
        &|img| live_op(img, &vm, false),
        &|img, done| {
            assert!(read_snap(img, "old") == snap_model);
            assert_eq!(img.snapshots().len(), 1);
            check_active_live(img, &ms, done);
        },
    );
}

#[test]
fn crash_during_freeze_with_refcount_growth() {
    // 512-byte clusters: freeze and the VM state need new refcount blocks.
    let b = base(9);
    let vm = pattern(100_000, 5);
    let model = b.model.clone();
    crash_loop_ex(
        "freeze (cluster_bits 9)",
        &b.bytes,
        true,
        &|img| {
            let f = img.freeze("new")?;
            img.write_frozen_vmstate(&f, 0, &vm)?;
            img.write_at(&[7u8; 3000], 100_000)?;
            img.commit_frozen(f, 1, vm.len() as u64)?;
            Ok(())
        },
        &|img, done| {
            let n = img.snapshots().len();
            assert!(n == 1 || n == 2);
            if done {
                assert_eq!(n, 2);
            }
            if n == 2 {
                assert!(read_snap(img, "new") == model);
                let mut v = vec![0u8; vm.len()];
                img.read_vmstate("new", 0, &mut v).unwrap();
                assert!(v == vm);
            }
        },
    );
}

/// An I/O error (e.g. a full disk) in the middle of an update poisons the
/// handle; `recover` reloads the metadata from the file and the image goes on
/// working — committed data intact, new writes possible, at most leaks.
#[test]
fn recover_after_a_failed_write_at_every_point() {
    let b = base(12);
    for n in 0..40u64 {
        let be = CrashBackend::new(b.bytes.clone(), None);
        let mut img = Qcow2::open_with(Box::new(be.clone()), true, None).unwrap();
        // A live snapshot is pending and a guest write needs copy-on-write.
        let f = img.freeze("pending").unwrap();
        *be.budget.lock().unwrap() = Some(n);
        let d = pattern(70_000, 9 + n);
        let failed = img
            .write_frozen_vmstate(&f, 0, &pattern(50_000, 5))
            .is_err()
            || img.write_at(&d, 90_000).is_err();
        *be.budget.lock().unwrap() = None;
        if !failed {
            continue;
        }
        assert!(img.is_poisoned(), "n={n}");
        assert!(
            img.write_at(&d, 90_000).is_err(),
            "poisoned until recovered"
        );
        img.recover().unwrap();
        assert!(!img.is_poisoned());
        assert!(!img.is_frozen(), "the pending snapshot is dropped");
        assert!(img.find_snapshot("pending").is_none());
        // Committed data is intact, except where the failed write may have landed.
        let now = read_all(&mut img);
        for (i, (x, y)) in now.iter().zip(&b.model).enumerate() {
            if !(90_000..160_000).contains(&i) {
                assert_eq!(x, y, "n={n}: byte {i} changed");
            }
        }
        assert_eq!(read_snap(&mut img, "old"), b.snap_model, "n={n}");
        // The image works again.
        img.write_at(&d, 90_000).unwrap();
        let mut back = vec![0u8; d.len()];
        img.read_at(&mut back, 90_000).unwrap();
        assert_eq!(back, d);
        let f = img.freeze("again").unwrap();
        img.write_frozen_vmstate(&f, 0, &pattern(4096, 1)).unwrap();
        img.commit_frozen(f, 2, 4096).unwrap();
        let report = img.check().unwrap();
        assert_eq!(report.errors, 0, "n={n}: {:?}", report.messages);
    }
}

/// Crash images of the live-snapshot test that leaked (`qemu-img check`
/// exit 3) carry the dirty bit, and a writable open repairs them: `qemu-img
/// check` then exits 0 and the data and snapshots are unchanged.
#[test]
fn crashed_live_snapshot_images_repaired() {
    let b = base(12);
    let vm = live_vmstate();
    let ms = live_models(&b.model);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("crash.qcow2");
    let qemu = common::have("qemu-img");
    let mut repaired = 0;
    for n in 0u64.. {
        let be = CrashBackend::new(b.bytes.clone(), Some(n));
        let done = Qcow2::open_with(Box::new(be.clone()), true, None)
            .and_then(|mut img| live_op(&mut img, &vm, true))
            .is_ok();
        let w = format!("live snapshot commit: crash after {n} writes");
        let bytes = be.bytes();
        if qemu {
            std::fs::write(&path, &bytes).unwrap();
            let (c, out) = common::check(&path);
            assert!(c == 0 || c == 3, "{w}:\n{out}");
            if c == 0 {
                if done {
                    break;
                }
                continue;
            }
        }
        // What the crash left, seen read-only: leaks at most, never errors.
        let mut ro = Qcow2::open_with(
            Box::new(CrashBackend::new(bytes.clone(), None)),
            false,
            None,
        )
        .unwrap();
        let before = ro.check().unwrap();
        assert_eq!(before.errors, 0, "{w}: {:?}", before.messages);
        let dirty = ro.is_dirty();
        let names: Vec<_> = ro.snapshots().iter().map(|s| s.name.clone()).collect();
        let active = read_all(&mut ro);
        let snaps: Vec<_> = names.iter().map(|s| read_snap(&mut ro, s)).collect();
        drop(ro);
        assert!(
            before.leaks == 0 || dirty,
            "{w}: {} leaked clusters without the dirty bit",
            before.leaks
        );
        // A writable open of a dirty image repairs it (as QEMU's does).
        let rbe = CrashBackend::new(bytes, None);
        let mut img = Qcow2::open_with(Box::new(rbe.clone()), true, None).unwrap();
        assert!(!img.is_dirty(), "{w}");
        assert!(img.check().unwrap().is_clean(), "{w}");
        assert_eq!(
            img.repair_leaks().unwrap(),
            0,
            "{w}: nothing left to repair"
        );
        assert!(read_all(&mut img) == active, "{w}");
        for (s, d) in names.iter().zip(&snaps) {
            assert!(read_snap(&mut img, s) == *d, "{w}: snapshot {s}");
        }
        check_active_live(&mut img, &ms, done);
        if before.leaks > 0 {
            repaired += 1;
        }
        drop(img);
        if qemu {
            std::fs::write(&path, rbe.bytes()).unwrap();
            let (c, out) = common::check(&path);
            assert_eq!(c, 0, "{w}: after repair_leaks:\n{out}");
        }
        if done {
            break;
        }
    }
    eprintln!("{repaired} leaked crash images repaired");
    assert!(repaired > 0);
}
