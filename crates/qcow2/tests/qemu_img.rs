//! Interoperability tests against the real `qemu-img` / `qemu-io`.

mod common;

use std::path::Path;

use common::{assert_clean, info, pattern, run_ok, to_raw, Rng};
use qcow2::{BackingFormat, CreateOptions, Qcow2};

fn opts(cluster_bits: u32) -> CreateOptions {
    CreateOptions {
        cluster_bits,
        ..Default::default()
    }
}

/// Apply a list of writes to both the image and a model.
fn write_both(img: &mut Qcow2, model: &mut [u8], off: u64, data: &[u8]) {
    img.write_at(data, off).unwrap();
    model[off as usize..off as usize + data.len()].copy_from_slice(data);
}

fn check_content(img: &mut Qcow2, model: &[u8]) {
    let mut buf = vec![0u8; model.len()];
    img.read_at(&mut buf, 0).unwrap();
    assert!(buf == model, "content mismatch (our read)");
}

fn standard_writes(img: &mut Qcow2, model: &mut [u8], seed: u64) {
    let size = model.len() as u64;
    let cs = img.cluster_size();
    let w: Vec<(u64, usize)> = vec![
        (0, 512),
        (cs - 5, 10),                    // crosses a cluster boundary
        (3 * cs + 100, 2 * cs as usize), // partial + full + partial
        (1 << 20, 300_000),
        (size / 2 + 7, 65536 + 13),
        (size - 4096, 4096), // end of disk
        (cs - 2, 1),         // overwrite inside allocated cluster
        (3 * cs + 50, 20),
    ];
    for (i, (off, len)) in w.into_iter().enumerate() {
        let d = pattern(len, seed + i as u64);
        write_both(img, model, off, &d);
    }
}

#[test]
fn our_images_are_clean_and_readable_by_qemu() {
    require_qemu_img!();
    let dir = tempfile::tempdir().unwrap();
    for cb in [16u32, 12, 9, 21] {
        let p = dir.path().join(format!("a{cb}.qcow2"));
        let size = 32u64 << 20;
        let mut img = Qcow2::create(&p, size, opts(cb)).unwrap();
        let mut model = vec![0u8; size as usize];
        standard_writes(&mut img, &mut model, cb as u64);
        // Zero writes to unallocated space stay unallocated but read back as zero.
        write_both(&mut img, &mut model, 5 << 20, &vec![0u8; 100_000]);
        img.flush().unwrap();
        check_content(&mut img, &model);
        assert_clean(&p);
        assert!(
            to_raw(&p, None) == model,
            "qemu sees different content (cluster_bits {cb})"
        );
        drop(img);
        let mut img = Qcow2::open(&p, false).unwrap();
        check_content(&mut img, &model);
        assert!(img.write_at(b"x", 0).is_err());
        let mut b = [0u8; 2];
        assert!(matches!(
            img.read_at(&mut b, size - 1),
            Err(qcow2::Error::OutOfRange { .. })
        ));
    }
}

#[test]
fn qemu_created_images_written_by_us() {
    require_qemu_img!();
    let dir = tempfile::tempdir().unwrap();
    for extra in [
        None,
        Some("cluster_size=4096"),
        Some("cluster_size=512,refcount_bits=8"),
        Some("refcount_bits=1"),
        Some("refcount_bits=64"),
        Some("compat=0.10"),
    ] {
        let p = dir.path().join("q.qcow2");
        let ps = p.to_str().unwrap();
        let mut args = vec!["create", "-q", "-f", "qcow2"];
        if let Some(o) = extra {
            args.push("-o");
            args.push(o);
        }
        args.push(ps);
        args.push("16M");
        run_ok("qemu-img", &args);
        let mut model = vec![0u8; 16 << 20];
        if common::have("qemu-io") {
            run_ok("qemu-io", &["-f", "qcow2", "-c", "write -P 0xab 0 1M", ps]);
            model[..1 << 20].fill(0xab);
        }
        let mut img = Qcow2::open(&p, true).unwrap();
        check_content(&mut img, &model);
        standard_writes(&mut img, &mut model, 99);
        img.flush().unwrap();
        drop(img);
        assert_clean(&p);
        assert!(to_raw(&p, None) == model, "content mismatch for {extra:?}");
    }
}

#[test]
fn snapshot_with_vmstate_interop() {
    require_qemu_img!();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("s.qcow2");
    let size = 32u64 << 20;
    let mut img = Qcow2::create(&p, size, CreateOptions::default()).unwrap();
    let mut model = vec![0u8; size as usize];
    standard_writes(&mut img, &mut model, 1);
    // 5 MiB of VM state with some zero pages in it.
    let mut vm = pattern(5 << 20, 77);
    vm[1 << 20..(1 << 20) + 200_000].fill(0);
    let mut w = img.vmstate_writer().unwrap();
    for c in vm.chunks(300_000) {
        std::io::Write::write_all(&mut w, c).unwrap();
    }
    let n = w.finish().unwrap();
    assert_eq!(n, vm.len() as u64);
    let info_s1 = img.create_snapshot("s1", 123_456, n).unwrap();
    assert_eq!(info_s1.id, "1");
    assert!(matches!(
        img.create_snapshot("s1", 0, 0),
        Err(qcow2::Error::TagExists(_))
    ));
    let snap_model = model.clone();
    img.flush().unwrap();
    assert_clean(&p);
    let j = info(&p);
    let snaps = j["snapshots"].as_array().expect("snapshots listed");
    assert_eq!(snaps.len(), 1);
    assert_eq!(snaps[0]["name"], "s1");
    assert_eq!(snaps[0]["id"], "1");
    assert_eq!(snaps[0]["vm-state-size"].as_u64().unwrap(), vm.len() as u64);
    assert_eq!(snaps[0]["vm-clock-nsec"].as_u64().unwrap(), 123_456);
    let list = run_ok("qemu-img", &["snapshot", "-l", p.to_str().unwrap()]);
    assert!(list.contains("s1"), "{list}");

    // The active image no longer maps the VM state; the snapshot does.
    let mut back = vec![0u8; vm.len()];
    img.read_vmstate("s1", 0, &mut back).unwrap();
    assert!(back == vm);

    // More writes after the snapshot (COW of shared clusters and L2 tables).
    standard_writes(&mut img, &mut model, 50);
    write_both(&mut img, &mut model, 0, &pattern(3 << 20, 5));
    img.flush().unwrap();
    check_content(&mut img, &model);
    assert_clean(&p);
    assert!(to_raw(&p, None) == model);
    assert!(
        to_raw(&p, Some("s1")) == snap_model,
        "qemu convert -l of our snapshot differs"
    );
    let mut sbuf = vec![0u8; size as usize];
    img.read_snapshot_at("s1", &mut sbuf, 0).unwrap();
    assert!(sbuf == snap_model);

    // qemu-img applies our snapshot on a copy.
    let copy = dir.path().join("copy.qcow2");
    std::fs::copy(&p, &copy).unwrap();
    run_ok(
        "qemu-img",
        &["snapshot", "-a", "s1", copy.to_str().unwrap()],
    );
    assert_clean(&copy);
    assert!(
        to_raw(&copy, None) == snap_model,
        "qemu-img snapshot -a restored wrong content"
    );

    // A second snapshot, then we apply the first one ourselves.
    img.create_snapshot("s2", 1, 0).unwrap();
    let s2_model = model.clone();
    img.apply_snapshot("s1").unwrap();
    check_content(&mut img, &snap_model);
    img.flush().unwrap();
    assert_clean(&p);
    write_both(&mut img, &mut model, 4096, b"after apply");
    let mut m1 = snap_model.clone();
    m1[4096..4096 + 11].copy_from_slice(b"after apply");
    check_content(&mut img, &m1);
    assert_clean(&p);
    assert!(to_raw(&p, Some("s2")) == s2_model);

    // Reopen: everything persists.
    drop(img);
    let mut img = Qcow2::open(&p, true).unwrap();
    assert_eq!(img.snapshots().len(), 2);
    assert_eq!(img.snapshots()[0].vm_state_size, vm.len() as u64);
    let mut part = vec![0u8; 4096];
    img.read_vmstate("1", (1 << 20) + 1000, &mut part).unwrap();
    assert!(part.iter().all(|&b| b == 0));
    img.read_vmstate("s1", 4 << 20, &mut part).unwrap();
    assert!(part[..] == vm[4 << 20..(4 << 20) + 4096]);

    // Delete both; no leaks afterwards.
    img.delete_snapshot("s1").unwrap();
    assert_clean(&p);
    img.delete_snapshot("2").unwrap();
    assert!(img.snapshots().is_empty());
    assert_clean(&p);
    check_content(&mut img, &m1);
    assert!(to_raw(&p, None) == m1);
}

#[test]
fn snapshots_made_by_qemu() {
    require_qemu_img!();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("q.qcow2");
    let ps = p.to_str().unwrap();
    run_ok("qemu-img", &["create", "-q", "-f", "qcow2", ps, "8M"]);
    let mut model = vec![0u8; 8 << 20];
    if common::have("qemu-io") {
        run_ok("qemu-io", &["-f", "qcow2", "-c", "write -P 0xab 0 1M", ps]);
        model[..1 << 20].fill(0xab);
    } else {
        let mut img = Qcow2::open(&p, true).unwrap();
        write_both(&mut img, &mut model, 0, &[0xab; 1 << 20]);
    }
    run_ok("qemu-img", &["snapshot", "-c", "qs1", ps]);
    let snap_model = model.clone();
    let mut img = Qcow2::open(&p, true).unwrap();
    assert_eq!(img.snapshots().len(), 1);
    assert_eq!(img.snapshots()[0].name, "qs1");
    assert_eq!(img.snapshots()[0].vm_state_size, 0);
    write_both(&mut img, &mut model, 512 << 10, &[0xcd; 1 << 20]);
    img.flush().unwrap();
    assert_clean(&p);
    let mut s = vec![0u8; 8 << 20];
    img.read_snapshot_at("qs1", &mut s, 0).unwrap();
    assert!(s == snap_model);
    drop(img);
    run_ok("qemu-img", &["snapshot", "-c", "qs2", ps]);
    let qs2_model = model.clone();
    let mut img = Qcow2::open(&p, true).unwrap();
    assert_eq!(img.snapshots()[1].id, "2");
    img.apply_snapshot("qs1").unwrap();
    check_content(&mut img, &snap_model);
    assert_clean(&p);
    img.write_at(&[1; 100], 0).unwrap();
    assert_clean(&p);
    img.delete_snapshot("qs1").unwrap();
    assert_clean(&p);
    img.apply_snapshot("qs2").unwrap();
    check_content(&mut img, &qs2_model);
    assert_clean(&p);
    img.delete_snapshot("qs2").unwrap();
    assert_clean(&p);
    check_content(&mut img, &qs2_model);
    let c = img.create_snapshot("ours", 0, 0).unwrap();
    assert_eq!(c.id, "1");
    drop(img);
    assert_clean(&p);
    run_ok("qemu-img", &["snapshot", "-d", "ours", ps]);
    assert_clean(&p);
}

#[test]
fn many_snapshots_deleted_in_various_orders() {
    require_qemu_img!();
    let dir = tempfile::tempdir().unwrap();
    for (order_seed, cb) in [(1u64, 16u32), (2, 12), (3, 9)] {
        let p = dir.path().join(format!("m{cb}.qcow2"));
        let size = 4u64 << 20;
        let mut img = Qcow2::create(&p, size, opts(cb)).unwrap();
        let mut model = vec![0u8; size as usize];
        let mut rng = Rng(order_seed * 7919);
        let mut saved = Vec::new();
        for s in 0..6 {
            for _ in 0..8 {
                let off = rng.below(size - 70_000);
                let len = 1 + rng.below(70_000) as usize;
                write_both(&mut img, &mut model, off, &pattern(len, rng.next()));
            }
            let vm = pattern(100_000 * s + 1, s as u64);
            img.write_vmstate(0, &vm).unwrap();
            img.create_snapshot(&format!("t{s}"), s as u64, vm.len() as u64)
                .unwrap();
            saved.push((format!("t{s}"), model.clone(), vm));
        }
        assert_clean(&p);
        let mut names: Vec<usize> = (0..saved.len()).collect();
        for i in (1..names.len()).rev() {
            names.swap(i, rng.below(i as u64 + 1) as usize);
        }
        for (k, &i) in names.iter().enumerate() {
            let (name, m, vm) = &saved[i];
            assert!(to_raw(&p, Some(name)) == *m);
            let mut v = vec![0u8; vm.len()];
            img.read_vmstate(name, 0, &mut v).unwrap();
            assert!(v == *vm);
            if k % 2 == 0 {
                img.apply_snapshot(name).unwrap();
                model = m.clone();
                write_both(&mut img, &mut model, 100, b"post");
            }
            img.delete_snapshot(name).unwrap();
            assert_clean(&p);
            check_content(&mut img, &model);
        }
        assert!(to_raw(&p, None) == model);
    }
}

fn backing_case(dir: &Path, fmt: BackingFormat) {
    let size = 4u64 << 20;
    let base_data = pattern(size as usize, 3);
    let base = dir.join(format!("base.{}", fmt.as_str()));
    match fmt {
        BackingFormat::Raw => std::fs::write(&base, &base_data).unwrap(),
        BackingFormat::Qcow2 => {
            let mut b = Qcow2::create(&base, size, opts(12)).unwrap();
            b.write_at(&base_data, 0).unwrap();
            b.flush().unwrap();
        }
        _ => unreachable!(),
    }
    let ov = dir.join(format!("overlay-{}.qcow2", fmt.as_str()));
    run_ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            base.file_name().unwrap().to_str().unwrap(),
            "-F",
            fmt.as_str(),
            ov.to_str().unwrap(),
            "8M",
        ],
    );
    let mut model = vec![0u8; 8 << 20];
    model[..size as usize].copy_from_slice(&base_data);
    let mut img = Qcow2::open(&ov, true).unwrap();
    assert!(img.backing_file().is_some());
    check_content(&mut img, &model);
    // Partial-cluster writes must merge with backing data.
    write_both(&mut img, &mut model, 1000, b"hello overlay");
    write_both(&mut img, &mut model, size - 10, &[7u8; 20]);
    write_both(&mut img, &mut model, 100_000, &vec![0u8; 5000]);
    img.flush().unwrap();
    check_content(&mut img, &model);
    assert_clean(&ov);
    assert!(to_raw(&ov, None) == model);
    // Snapshot + apply on the overlay.
    img.create_snapshot("b", 0, 0).unwrap();
    let snap = model.clone();
    write_both(&mut img, &mut model, 2000, b"later");
    img.apply_snapshot("b").unwrap();
    check_content(&mut img, &snap);
    assert_clean(&ov);

    // Our own create with a backing file.
    let ours = dir.join(format!("ours-{}.qcow2", fmt.as_str()));
    let mut o = Qcow2::create(
        &ours,
        size,
        CreateOptions {
            backing_file: Some(base.file_name().unwrap().to_str().unwrap().into()),
            backing_format: Some(fmt),
            ..Default::default()
        },
    )
    .unwrap();
    o.write_at(b"abc", 65530).unwrap();
    o.flush().unwrap();
    let mut m = base_data.clone();
    m[65530..65533].copy_from_slice(b"abc");
    assert_clean(&ours);
    assert!(to_raw(&ours, None) == m);
    let j = info(&ours);
    assert_eq!(j["backing-filename-format"], fmt.as_str());
}

#[test]
fn backing_files() {
    require_qemu_img!();
    let dir = tempfile::tempdir().unwrap();
    backing_case(dir.path(), BackingFormat::Raw);
    backing_case(dir.path(), BackingFormat::Qcow2);
}

#[test]
fn refcount_table_growth_small_clusters() {
    require_qemu_img!();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("g.qcow2");
    let size = 64u64 << 20;
    let mut img = Qcow2::create(&p, size, opts(9)).unwrap();
    let mut model = vec![0u8; size as usize];
    let mut rng = Rng(42);
    for i in 0..60 {
        let off = rng.below(size - 200_000);
        let len = 1 + rng.below(150_000) as usize;
        write_both(&mut img, &mut model, off, &pattern(len, i));
    }
    img.write_vmstate(0, &pattern(2 << 20, 9)).unwrap();
    img.create_snapshot("g", 0, 2 << 20).unwrap();
    for i in 0..20 {
        let off = rng.below(size - 100_000);
        write_both(&mut img, &mut model, off, &pattern(100_000, 100 + i));
    }
    img.flush().unwrap();
    check_content(&mut img, &model);
    assert_clean(&p);
    assert!(to_raw(&p, None) == model);
    let j = info(&p);
    assert!(j["actual-size"].as_u64().unwrap() > 4 << 20);
    img.delete_snapshot("g").unwrap();
    assert_clean(&p);
}

#[test]
fn large_vmstate_is_fast() {
    require_qemu_img!();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("big.qcow2");
    let mut img = Qcow2::create(&p, 1 << 30, CreateOptions::default()).unwrap();
    let chunk = pattern(8 << 20, 1);
    let t = std::time::Instant::now();
    let total = 1u64 << 30;
    let mut off = 0;
    while off < total {
        img.write_vmstate(off, &chunk).unwrap();
        off += chunk.len() as u64;
    }
    img.create_snapshot("big", 0, total).unwrap();
    img.flush().unwrap();
    let el = t.elapsed();
    eprintln!("1 GiB vmstate saved in {el:?}");
    assert!(el.as_secs() < 60, "too slow: {el:?}");
    let mut b = vec![0u8; 8 << 20];
    img.read_vmstate("big", 512 << 20, &mut b).unwrap();
    assert!(b == chunk);
    assert_clean(&p);
    assert_eq!(
        info(&p)["snapshots"][0]["vm-state-size"].as_u64().unwrap(),
        total
    );
}

/// Write VM state for a pending snapshot in shuffled 300 kB pieces, leaving
/// all-zero pieces out, interleaved with `guest` writes (called between pieces).
fn write_vmstate_live(
    img: &mut Qcow2,
    f: &qcow2::Frozen,
    vm: &[u8],
    mut guest: impl FnMut(&mut Qcow2, usize),
) {
    let pieces: Vec<(usize, &[u8])> = vm.chunks(300_000).enumerate().collect();
    let mut order: Vec<usize> = (0..pieces.len()).collect();
    let mut rng = Rng(5);
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i as u64 + 1) as usize);
    }
    for (step, &k) in order.iter().enumerate() {
        let (i, piece) = pieces[k];
        if piece.iter().any(|&b| b != 0) {
            img.write_frozen_vmstate(f, i as u64 * 300_000, piece)
                .unwrap();
        }
        guest(img, step);
    }
}

#[test]
fn live_snapshot_interop() {
    require_qemu_img!();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("live.qcow2");
    let size = 32u64 << 20;
    let mut img = Qcow2::create(&p, size, CreateOptions::default()).unwrap();
    let mut model = vec![0u8; size as usize];
    standard_writes(&mut img, &mut model, 1);
    // An older snapshot, then data written after it.
    let old_vm = pattern(1 << 20, 3);
    img.write_vmstate(0, &old_vm).unwrap();
    img.create_snapshot("s0", 1, old_vm.len() as u64).unwrap();
    let s0_model = model.clone();
    write_both(&mut img, &mut model, 8 << 20, &pattern(2 << 20, 4));
    // Stale VM state in the active image must not leak into the new snapshot.
    img.write_vmstate(0, &pattern(6 << 20, 6)).unwrap();

    assert!(matches!(img.freeze("s0"), Err(qcow2::Error::TagExists(_))));
    let f = img.freeze("live").unwrap();
    assert_eq!(f.name(), "live");
    assert!(img.is_frozen());
    assert!(img.freeze("other").is_err(), "only one freeze at a time");
    assert!(matches!(
        img.create_snapshot("live", 0, 0),
        Err(qcow2::Error::TagExists(_))
    ));
    let frozen_model = model.clone();

    let mut vm = pattern(5 << 20, 77);
    vm[1 << 20..(2 << 20) + 100_000].fill(0);
    let cs = img.cluster_size();
    write_vmstate_live(&mut img, &f, &vm, |img, step| {
        let (off, len) = match step % 6 {
            0 => (cs * 2 + 17, 3 * cs as usize), // shared with s0 and the cut
            1 => ((8 << 20) + 1000, 200_000),    // written after s0: shared with the cut only
            2 => ((20 << 20) + step as u64 * cs, 70_000), // new clusters
            3 => (size - 5000, 5000),            // end of the disk
            4 => ((8 << 20) + 1000, 100),        // in place (copied earlier)
            _ => (cs - 3, 6),                    // across a cluster boundary
        };
        write_both(img, &mut model, off, &pattern(len, 1000 + step as u64));
    });
    let mut fr = vec![0u8; size as usize];
    img.read_frozen_at(&f, &mut fr, 0).unwrap();
    assert!(fr == frozen_model, "frozen view changed by guest writes");
    check_content(&mut img, &model);

    let info_live = img.commit_frozen(f, 777, vm.len() as u64).unwrap();
    assert!(!img.is_frozen());
    assert_eq!(info_live.name, "live");
    assert_eq!(info_live.vm_state_size, vm.len() as u64);
    assert_eq!(img.find_snapshot("live"), Some(&info_live));
    assert_eq!(img.find_snapshot(&info_live.id), Some(&info_live));
    assert_eq!(img.snapshot_vm_clock("live"), Some(777));
    assert_eq!(img.find_snapshot("nope"), None);
    img.flush().unwrap();
    assert_clean(&p);

    let j = info(&p);
    let snaps = j["snapshots"].as_array().expect("snapshots listed");
    assert_eq!(snaps.len(), 2);
    assert_eq!(snaps[1]["name"], "live");
    assert_eq!(snaps[1]["vm-state-size"].as_u64().unwrap(), vm.len() as u64);
    assert_eq!(snaps[1]["vm-clock-nsec"].as_u64().unwrap(), 777);
    let list = run_ok("qemu-img", &["snapshot", "-l", p.to_str().unwrap()]);
    assert!(list.contains("live"), "{list}");

    let mut back = vec![0u8; vm.len()];
    img.read_vmstate("live", 0, &mut back).unwrap();
    assert!(back == vm, "VM state differs");
    assert!(
        to_raw(&p, Some("live")) == frozen_model,
        "convert -l differs"
    );
    assert!(to_raw(&p, Some("s0")) == s0_model);
    assert!(to_raw(&p, None) == model);

    let copy = dir.path().join("copy.qcow2");
    std::fs::copy(&p, &copy).unwrap();
    run_ok(
        "qemu-img",
        &["snapshot", "-a", "live", copy.to_str().unwrap()],
    );
    assert_clean(&copy);
    assert!(
        to_raw(&copy, None) == frozen_model,
        "qemu-img snapshot -a restored wrong content"
    );

    // Our own apply, then the VM state is still readable; delete keeps it clean.
    img.apply_snapshot("live").unwrap();
    check_content(&mut img, &frozen_model);
    img.read_vmstate("live", 0, &mut back).unwrap();
    assert!(back == vm);
    img.flush().unwrap();
    assert_clean(&p);
    img.delete_snapshot("s0").unwrap();
    assert_clean(&p);
    drop(img);
    let mut img = Qcow2::open(&p, true).unwrap();
    img.read_vmstate("live", 0, &mut back).unwrap();
    assert!(back == vm);
    img.delete_snapshot("live").unwrap();
    assert_clean(&p);
    check_content(&mut img, &frozen_model);
}

#[test]
fn live_snapshot_abort_and_retry() {
    require_qemu_img!();
    let dir = tempfile::tempdir().unwrap();
    for cb in [16u32, 12] {
        let p = dir.path().join(format!("abort{cb}.qcow2"));
        let size = 16u64 << 20;
        let mut img = Qcow2::create(&p, size, opts(cb)).unwrap();
        // Empty disk: nothing to copy at the freeze.
        let f = img.freeze("empty").unwrap();
        img.write_frozen_vmstate(&f, 0, &pattern(100_000, 1))
            .unwrap();
        img.commit_frozen(f, 1, 100_000).unwrap();
        assert_clean(&p);
        assert!(to_raw(&p, Some("empty")) == vec![0u8; size as usize]);
        img.delete_snapshot("empty").unwrap();

        let mut model = vec![0u8; size as usize];
        standard_writes(&mut img, &mut model, 9);
        write_both(&mut img, &mut model, 0, &pattern(3 << 20, 2));
        img.flush().unwrap();
        assert_clean(&p);
        let f = img.freeze("a").unwrap();
        let vm = pattern(2 << 20, 8);
        write_vmstate_live(&mut img, &f, &vm, |img, step| {
            let off = (step as u64 * 400_000) % (size - 100_000);
            write_both(img, &mut model, off, &pattern(50_000, step as u64));
        });
        img.abort_frozen(f).unwrap();
        assert!(img.snapshots().is_empty());
        img.flush().unwrap();
        assert_clean(&p);
        check_content(&mut img, &model);
        assert!(to_raw(&p, None) == model);
        // The tag is free again, and a new freeze works.
        let f = img.freeze("a").unwrap();
        let at_cut = model.clone();
        write_both(&mut img, &mut model, 100, b"after the cut");
        img.write_frozen_vmstate(&f, 0, &vm).unwrap();
        img.commit_frozen(f, 2, vm.len() as u64).unwrap();
        assert_clean(&p);
        assert!(to_raw(&p, Some("a")) == at_cut);
        assert!(to_raw(&p, None) == model);
        let mut back = vec![0u8; vm.len()];
        img.read_vmstate("a", 0, &mut back).unwrap();
        assert!(back == vm);
    }
}
