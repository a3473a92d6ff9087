//! `repair_leaks`: leaks left by updates that failed after every possible
//! number of writes (then `recover`ed) are reclaimed, the image is clean
//! afterwards (for this library and for `qemu-img check`), data and snapshots
//! are intact, and freed clusters are allocated again.

mod common;

use common::{base, pattern, read_all, read_snap, CrashBackend};
use qcow2::{MemBackend, Qcow2};

fn snap_names(img: &Qcow2) -> Vec<String> {
    img.snapshots().iter().map(|s| s.name.clone()).collect()
}

/// `qemu-img check` on `bytes` must exit 0 (skipped without qemu-img).
fn qemu_clean(what: &str, dir: &std::path::Path, bytes: &[u8]) {
    if !common::have("qemu-img") {
        return;
    }
    let path = dir.join("repair.qcow2");
    std::fs::write(&path, bytes).unwrap();
    let (c, out) = common::check(&path);
    assert_eq!(c, 0, "{what}: qemu-img check after repair:\n{out}");
    assert!(!out.contains("leaked"), "{what}:\n{out}");
}

/// Run `op` on a fresh handle of `base` with a write budget of `n`, for every
/// `n` until it succeeds. A failure poisons the handle: `repair_leaks` must
/// refuse, then `recover` + `repair_leaks` must leave a clean image (also
/// when the failed image is reopened instead, as after a crash). `verify`
/// checks data and snapshots; `after` runs on the repaired handle.
fn fail_loop(
    what: &str,
    base: &[u8],
    op: &dyn Fn(&mut Qcow2) -> qcow2::Result<()>,
    verify: &dyn Fn(&mut Qcow2, bool),
    after: &dyn Fn(&mut Qcow2, &CrashBackend, u64),
) {
    if !common::have("qemu-img") {
        eprintln!("note: qemu-img not found; repaired images are only checked by this library");
    }
    let dir = tempfile::tempdir().unwrap();
    let (mut repaired, mut total) = (0u64, 0u64);
    for n in 0u64.. {
        let w = format!("{what}: failure after {n} writes");
        let be = CrashBackend::new(base.to_vec(), None);
        let mut img = Qcow2::open_with(Box::new(be.clone()), true, None).unwrap();
        *be.budget.lock().unwrap() = Some(n);
        let res = op(&mut img);
        *be.budget.lock().unwrap() = None;
        let done = res.is_ok();
        if let Err(e) = &res {
            assert!(e.to_string().contains("simulated crash"), "{w}: {e}");
            assert!(img.is_poisoned(), "{w}");
            assert!(
                matches!(img.repair_leaks(), Err(qcow2::Error::Poisoned)),
                "{w}: repair on a poisoned handle"
            );
            img.recover().unwrap();
        }
        let crash_bytes = be.bytes();
        // Repair through the recovered handle.
        let leaks = img.check().unwrap();
        assert_eq!(leaks.errors, 0, "{w}: {:?}", leaks.messages);
        let fixed = img.repair_leaks().unwrap();
        assert_eq!(fixed, leaks.leaks, "{w}: repaired != reported leaks");
        if done {
            assert_eq!(fixed, 0, "{w}: completed operation leaked");
        }
        repaired += u64::from(fixed > 0);
        total += fixed;
        let rep = img.check().unwrap();
        assert!(rep.is_clean(), "{w}: {:?}", rep.messages);
        assert_eq!(img.repair_leaks().unwrap(), 0, "{w}: second repair");
        verify(&mut img, done);
        qemu_clean(&w, dir.path(), &be.bytes());
        after(&mut img, &be, fixed);
        let rep = img.check().unwrap();
        assert!(rep.is_clean(), "{w}: after reuse: {:?}", rep.messages);
        // Repair of the same state reopened from the bytes (as after a crash):
        // a dirty image (a live snapshot cut short) is repaired by the open itself.
        let dirty = crash_bytes[79] & 1 == 1;
        let mut img =
            Qcow2::open_with(Box::new(MemBackend::new(crash_bytes.clone())), true, None).unwrap();
        let fixed2 = img.repair_leaks().unwrap();
        let expect = if dirty { 0 } else { fixed };
        assert_eq!(fixed2, expect, "{w}: reopened image repairs the same leaks");
        assert!(img.check().unwrap().is_clean(), "{w}: reopened");
        verify(&mut img, done);
        if done {
            eprintln!(
                "{what}: {n} failure points, {repaired} with leaks ({total} clusters) repaired"
            );
            assert!(n > 3 && repaired > 0, "{what}: no leaks were produced");
            return;
        }
    }
}

#[test]
fn repair_after_failed_cow_write() {
    for cb in [16, 12, 9] {
        let b = base(cb);
        // Overwrites data shared with the snapshot, partial clusters at both ends.
        let (woff, wlen) = (90_000usize, 400_000usize);
        let data = pattern(wlen, 11);
        let (model, snap_model) = (b.model.clone(), b.snap_model.clone());
        let mut new_model = model.clone();
        new_model[woff..woff + wlen].copy_from_slice(&data);
        fail_loop(
            &format!("COW write (cluster_bits {cb})"),
            &b.bytes,
            &|img| img.write_at(&data, woff as u64),
            &|img, done| {
                let cur = read_all(img);
                assert!(cur[..woff] == model[..woff]);
                assert!(cur[woff + wlen..] == model[woff + wlen..]);
                for j in woff..woff + wlen {
                    assert!(cur[j] == model[j] || cur[j] == new_model[j], "byte {j}");
                }
                if done {
                    assert!(cur == new_model);
                }
                assert!(read_snap(img, "old") == snap_model);
                assert_eq!(snap_names(img), ["old"]);
            },
            &|img, _, _| {
                // The image keeps working: the write can be redone.
                img.write_at(&data, woff as u64).unwrap();
                let mut back = vec![0u8; wlen];
                img.read_at(&mut back, woff as u64).unwrap();
                assert!(back == data);
                assert!(read_snap(img, "old") == snap_model);
            },
        );
    }
}

#[test]
fn repair_after_failed_freeze_and_vmstate() {
    for cb in [16, 9] {
        let b = base(cb);
        let vm = pattern(300_000, 7);
        let (model, snap_model) = (b.model.clone(), b.snap_model.clone());
        fail_loop(
            &format!("freeze + vmstate (cluster_bits {cb})"),
            &b.bytes,
            &|img| {
                let f = img.freeze("new")?;
                img.write_frozen_vmstate(&f, 0, &vm)?;
                // Completed: the freeze is pending, its refcounts are intentional.
                let before = img.check()?;
                assert!(before.leaks > 0);
                assert!(img.repair_leaks().is_err(), "repair with a pending freeze");
                assert_eq!(img.check()?, before, "refused repair changed nothing");
                assert!(!img.is_poisoned());
                img.commit_frozen(f, 3, vm.len() as u64)?;
                Ok(())
            },
            &|img, done| {
                assert!(read_all(img) == model);
                assert!(read_snap(img, "old") == snap_model);
                let names = snap_names(img);
                if done {
                    assert_eq!(names, ["old", "new"]);
                    assert!(read_snap(img, "new") == model);
                    let mut v = vec![0u8; vm.len()];
                    img.read_vmstate("new", 0, &mut v).unwrap();
                    assert!(v == vm);
                } else {
                    // The commit switch is the last write: a failure before
                    // it leaves no snapshot, a failed flush after it a complete one.
                    assert!(names == ["old"] || names == ["old", "new"], "{names:?}");
                    if names.len() == 2 {
                        assert!(read_snap(img, "new") == model);
                    }
                }
            },
            &|img, _, _| {
                let f = img.freeze("again").unwrap();
                img.write_frozen_vmstate(&f, 0, &vm[..50_000]).unwrap();
                img.commit_frozen(f, 4, 50_000).unwrap();
                assert!(read_snap(img, "again") == model);
            },
        );
    }
}

#[test]
fn repair_after_failed_snapshot_create() {
    for cb in [16, 9] {
        let b = base(cb);
        let vm = pattern(300_000, 9);
        let (model, snap_model) = (b.model.clone(), b.snap_model.clone());
        fail_loop(
            &format!("snapshot create with vmstate (cluster_bits {cb})"),
            &b.bytes,
            &|img| {
                img.write_vmstate(0, &vm)?;
                img.create_snapshot("new", 5, vm.len() as u64)?;
                Ok(())
            },
            &|img, done| {
                assert!(read_all(img) == model);
                assert!(read_snap(img, "old") == snap_model);
                let names = snap_names(img);
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
            &|img, _, _| {
                img.write_vmstate(0, &vm[..70_000]).unwrap();
                img.create_snapshot("again", 6, 70_000).unwrap();
                let mut v = vec![0u8; 70_000];
                img.read_vmstate("again", 0, &mut v).unwrap();
                assert!(v == vm[..70_000]);
            },
        );
    }
}

#[test]
fn repair_refused_while_frozen() {
    let b = base(12);
    let be = CrashBackend::new(b.bytes.clone(), None);
    let mut img = Qcow2::open_with(Box::new(be.clone()), true, None).unwrap();
    let f = img.freeze("pending").unwrap();
    img.write_frozen_vmstate(&f, 0, &pattern(100_000, 3))
        .unwrap();
    img.write_at(&pattern(50_000, 4), 200_000).unwrap();
    let report = img.check().unwrap();
    assert!(report.leaks > 0 && report.errors == 0, "{report:?}");
    let bytes = be.bytes();
    let writes = *be.writes.lock().unwrap();
    let err = img.repair_leaks().unwrap_err();
    assert!(err.to_string().contains("frozen"), "{err}");
    assert_eq!(*be.writes.lock().unwrap(), writes, "refused repair wrote");
    assert!(be.bytes() == bytes);
    assert!(!img.is_poisoned(), "a refused repair does not poison");
    assert_eq!(img.check().unwrap(), report);
    // The freeze is unaffected and can be committed; then nothing leaks.
    let info = img.commit_frozen(f, 1, 100_000).unwrap();
    assert_eq!(info.name, "pending");
    assert!(read_snap(&mut img, "pending") == b.model);
    assert!(img.check().unwrap().is_clean());
    assert_eq!(img.repair_leaks().unwrap(), 0);
    // Read-only handles refuse too.
    let mut ro = Qcow2::open_with(Box::new(MemBackend::new(b.bytes)), false, None).unwrap();
    assert!(matches!(ro.repair_leaks(), Err(qcow2::Error::ReadOnly)));
}

#[test]
fn repair_of_clean_image_writes_nothing() {
    for cb in [16, 9] {
        let b = base(cb);
        let be = CrashBackend::new(b.bytes.clone(), None);
        let mut img = Qcow2::open_with(Box::new(be.clone()), true, None).unwrap();
        assert!(img.check().unwrap().is_clean());
        let (writes, flushes) = (*be.writes.lock().unwrap(), *be.flushes.lock().unwrap());
        assert_eq!(img.repair_leaks().unwrap(), 0);
        assert_eq!(*be.writes.lock().unwrap(), writes, "clean repair wrote");
        assert_eq!(*be.flushes.lock().unwrap(), flushes, "clean repair flushed");
        assert!(be.bytes() == b.bytes);
    }
}

/// Freed clusters are allocated again: a write that keeps failing at the same
/// point leaks clusters each time; with `recover` + `repair_leaks` after each
/// failure the file stops growing, without the repair it keeps growing.
#[test]
fn freed_clusters_are_reused() {
    let b = base(16);
    let data = pattern(300_000, 13);
    let mut lens = [Vec::new(), Vec::new()];
    for (repair, lens) in [true, false].into_iter().zip(&mut lens) {
        let be = CrashBackend::new(b.bytes.clone(), None);
        let mut img = Qcow2::open_with(Box::new(be.clone()), true, None).unwrap();
        for i in 0..10u64 {
            // Fails after the refcounts and the data are written, before the
            // L2 table is: the data clusters leak.
            *be.budget.lock().unwrap() = Some(4);
            assert!(img.write_at(&data, 1_300_000 + i * 70_000).is_err());
            *be.budget.lock().unwrap() = None;
            img.recover().unwrap();
            if repair {
                assert!(img.repair_leaks().unwrap() > 0);
                assert!(img.check().unwrap().is_clean());
            }
            lens.push(be.data.lock().unwrap().len());
        }
        assert!(read_all(&mut img) == b.model);
    }
    let [with, without] = lens;
    assert!(with[9] <= with[1], "file grew despite repair: {with:?}");
    assert!(without[9] > without[1], "no leaks produced: {without:?}");
}

#[test]
fn a_live_snapshot_cut_short_is_repaired_by_the_next_open() {
    use qcow2::CreateOptions;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.qcow2");
    let dirty = |p: &std::path::Path| std::fs::read(p).unwrap()[79] & 1 == 1;
    let mut q = Qcow2::create(&path, 8 << 20, CreateOptions::default()).unwrap();
    let data = pattern(1 << 20, 1);
    q.write_at(&data, 0).unwrap();
    let f = q.freeze("cut").unwrap();
    q.write_frozen_vmstate(&f, 0, &pattern(2 << 20, 2)).unwrap();
    q.flush().unwrap();
    // Killed here: neither commit nor abort.
    drop(q);
    assert!(dirty(&path), "a save in progress leaves the dirty bit");
    if common::have("qemu-img") {
        let (c, out) = common::check(&path);
        assert_eq!(c, 3, "the cut-short save leaked clusters:\n{out}");
    }
    // The next writable open reclaims them and clears the bit.
    let mut q = Qcow2::open(&path, true).unwrap();
    assert!(!q.is_dirty());
    assert!(q.snapshots().is_empty());
    let mut back = vec![0u8; data.len()];
    q.read_at(&mut back, 0).unwrap();
    assert_eq!(back, data);
    // A save that completes clears the bit itself.
    let f = q.freeze("done").unwrap();
    q.write_frozen_vmstate(&f, 0, &pattern(1 << 20, 3)).unwrap();
    q.commit_frozen(f, 0, 1 << 20).unwrap();
    q.flush().unwrap();
    drop(q);
    assert!(!dirty(&path));
    if common::have("qemu-img") {
        let (c, out) = common::check(&path);
        assert_eq!(c, 0, "{out}");
        assert!(!out.contains("leaked"), "{out}");
    }
    // Read-only opens of a dirty image work (and change nothing).
    let mut q = Qcow2::open(&path, true).unwrap();
    let f = q.freeze("again").unwrap();
    q.write_frozen_vmstate(&f, 0, &pattern(4096, 4)).unwrap();
    q.flush().unwrap();
    drop(q);
    let before = std::fs::read(&path).unwrap();
    let ro = Qcow2::open(&path, false).unwrap();
    assert!(ro.is_dirty());
    drop(ro);
    assert_eq!(std::fs::read(&path).unwrap(), before);
}
