//! Behaviour of fork and stop-and-copy capture.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{dir_names, fill_dense, fill_sparse, image_ram, same_but_identity, Mem};
use livesnap::{
    capture_stopped, start_fork_capture, Capture, CaptureStatus, ForkOptions, Image, RamRange,
    SnapError, MAX_DEVICE_STATE,
};

const MIB: usize = 1 << 20;

fn fork_capture(ranges: &[RamRange], dev: &[u8], dest: &Path) -> Capture {
    start_fork_capture(
        ranges,
        dev.to_vec(),
        livesnap::Destination::file(dest),
        ForkOptions::default(),
    )
    .unwrap()
}

/// Waits until the capture has moved at least one record (or ended).
fn wait_for_progress(cap: &Capture) {
    let t = Instant::now();
    while cap.progress().bytes_written == 0 && !cap.is_finished() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "capture made no progress"
        );
        std::thread::sleep(Duration::from_micros(200));
    }
}

fn process_gone(pid: i32) -> bool {
    // SAFETY: signal 0 only checks for existence.
    let r = unsafe { libc::kill(pid, 0) };
    r != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
}

#[test]
fn fork_round_trip_with_gaps_and_sparse_file() {
    let mut mem = Mem::new(16 * MIB);
    fill_sparse(mem.bytes_mut(), 37, 0x5a);
    let ranges = [
        mem.range(0, 6 * MIB, 0),
        mem.range(8 * MIB, 64 << 10, 0x1000_0000),
        mem.range(10 * MIB, 6 * MIB, 0x1_0000_0000),
    ];
    let dev: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("snap.img");
    let (tx, rx) = mpsc::channel();
    let opts = ForkOptions {
        on_done: Some(Box::new(move |r| {
            tx.send(
                r.as_ref()
                    .map(|s| s.bytes_written)
                    .map_err(|e| e.to_string()),
            )
            .unwrap();
        })),
        ..Default::default()
    };
    let cap = start_fork_capture(
        &ranges,
        dev.clone(),
        livesnap::Destination::file(&dest),
        opts,
    )
    .unwrap();
    assert!(cap.child_pid() > 0);
    let pid = cap.child_pid();
    let progress_total = cap.progress().total_bytes;
    let stats_check = cap.wait().unwrap();
    assert!(process_gone(pid), "child not reaped");
    assert_eq!(rx.recv().unwrap(), Ok(stats_check.bytes_written));
    assert_eq!(progress_total, (12 * MIB + (64 << 10)) as u64);
    assert_eq!(stats_check.ram_bytes, progress_total);
    assert_eq!(
        (stats_check.zero_pages + stats_check.normal_pages) * 4096,
        stats_check.ram_bytes
    );
    assert!(stats_check.normal_pages > 0 && stats_check.zero_pages > stats_check.normal_pages);

    let img = Image::open(&dest).unwrap();
    let got: Vec<(u64, u64)> = img.ranges().iter().map(|r| (r.gpa, r.len)).collect();
    assert_eq!(
        got,
        vec![
            (0, 6 * MIB as u64),
            (0x1000_0000, 64 << 10),
            (0x1_0000_0000, 6 * MIB as u64)
        ]
    );
    for r in img.ranges() {
        if r.len >= 2 * MIB as u64 {
            assert_eq!(r.file_offset % (2 * MIB as u64), 0);
        }
    }
    let ram = image_ram(&img);
    assert!(ram[0] == mem.bytes()[..6 * MIB]);
    assert!(ram[1] == mem.bytes()[8 * MIB..8 * MIB + (64 << 10)]);
    assert!(ram[2] == mem.bytes()[10 * MIB..]);
    assert_eq!(img.device_state().unwrap(), dev);

    // The restore path: map a range MAP_PRIVATE straight from the file.
    let r = img.ranges()[2];
    // SAFETY: maps r.len bytes of the open image read-only at a page-aligned offset.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            r.len as usize,
            libc::PROT_READ,
            libc::MAP_PRIVATE,
            std::os::fd::AsRawFd::as_raw_fd(img.file()),
            r.file_offset as libc::off_t,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    // SAFETY: p is a live mapping of r.len bytes.
    let mapped = unsafe { std::slice::from_raw_parts(p.cast::<u8>(), r.len as usize) };
    assert!(mapped == &mem.bytes()[10 * MIB..]);
    // SAFETY: unmaps the mapping created above; `mapped` is not used afterwards.
    unsafe { libc::munmap(p, r.len as usize) };

    // Sparse: far fewer blocks than the apparent size.
    let md = std::fs::metadata(&dest).unwrap();
    assert_eq!(md.len(), img.file_len());
    let allocated = md.blocks() * 512;
    assert!(
        allocated < md.len() / 4,
        "not sparse: {allocated} of {}",
        md.len()
    );
    assert_eq!(dir_names(dir.path()), vec!["snap.img".to_string()]);
}

#[test]
fn writes_after_fork_never_reach_the_image() {
    let len = 256 * MIB;
    let mut mem = Mem::new(len);
    fill_dense(mem.words_mut(), 0x1234);
    let ranges = [mem.range(0, len, 0)];
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("live.img");
    let cap = fork_capture(&ranges, b"dev", &dest);
    // The guest "resumes" and rewrites its RAM: the last MiB first (the capture
    // streams in order, so that MiB cannot have been copied within the ~1 ms this
    // takes), then everything.
    mem.bytes_mut()[len - MIB..].fill(0xEE);
    assert!(
        !cap.is_finished(),
        "capture ended before the overwrite: test proves nothing"
    );
    mem.bytes_mut().fill(0xEE);
    let pause = cap.pause_time();
    let stats = cap.wait().unwrap();
    eprintln!("256 MiB fork capture: pause {pause:?}, {stats:?}");
    assert_eq!(stats.bytes_written, len as u64);
    let img = Image::open(&dest).unwrap();
    let mut got = vec![0u8; len];
    img.read_ram_into(0, &mut got).unwrap();
    let mut want = vec![0u64; len / 8];
    fill_dense(&mut want, 0x1234);
    let got_words = got
        .chunks_exact(8)
        .map(|c| u64::from_ne_bytes(c.try_into().unwrap()));
    assert!(
        got_words.eq(want.iter().copied()),
        "image holds post-fork writes"
    );
}

#[test]
fn fork_and_stop_and_copy_produce_identical_images() {
    let mut mem = Mem::new(32 * MIB);
    fill_sparse(mem.bytes_mut(), 3, 0x11);
    fill_dense(&mut mem.words_mut()[(4 * MIB / 8)..(9 * MIB / 8)], 77);
    let ranges = [
        mem.range(0, 20 * MIB, 0),
        mem.range(20 * MIB, 12 * MIB, 1 << 32),
    ];
    let dev = vec![3u8; 4097];
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("stopped.img"), dir.path().join("fork.img"));
    let sa = capture_stopped(&ranges, &dev, &a).unwrap();
    let sb = fork_capture(&ranges, &dev, &b).wait().unwrap();
    assert_eq!(
        (sa.bytes_written, sa.zero_pages),
        (sb.bytes_written, sb.zero_pages)
    );
    let ram_a = image_ram(&Image::open(&a).unwrap());
    let ram_b = image_ram(&Image::open(&b).unwrap());
    assert!(ram_a == ram_b);
    assert!(ram_a[0] == mem.bytes()[..20 * MIB]);
    // Same layout, same holes: the files are byte-identical.
    assert!(same_but_identity(&a, &b));
}

#[test]
fn cancel_leaves_nothing() {
    let len = 256 * MIB;
    let mut mem = Mem::new(len);
    fill_dense(mem.words_mut(), 9);
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("c.img");
    let cap = fork_capture(&[mem.range(0, len, 0)], b"x", &dest);
    let pid = cap.child_pid();
    wait_for_progress(&cap);
    cap.cancel();
    let t = Instant::now();
    while !cap.is_finished() {
        assert!(t.elapsed() < Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(cap.status(), CaptureStatus::Cancelled);
    assert!(matches!(cap.wait(), Err(SnapError::Cancelled)));
    assert!(process_gone(pid), "child not reaped");
    assert!(
        dir_names(dir.path()).is_empty(),
        "{:?}",
        dir_names(dir.path())
    );
}

#[test]
fn killed_child_fails_and_keeps_previous_image() {
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("k.img");
    let mut small = Mem::new(MIB);
    fill_sparse(small.bytes_mut(), 2, 1);
    capture_stopped(&[small.range(0, MIB, 0)], b"old", &dest).unwrap();
    let before = std::fs::read(&dest).unwrap();

    let len = 256 * MIB;
    let mut mem = Mem::new(len);
    fill_dense(mem.words_mut(), 5);
    let cap = fork_capture(&[mem.range(0, len, 0)], b"new", &dest);
    wait_for_progress(&cap);
    // SAFETY: sends SIGKILL to our own, not yet reaped, capture child.
    assert_eq!(unsafe { libc::kill(cap.child_pid(), libc::SIGKILL) }, 0);
    let err = loop {
        if cap.is_finished() {
            break cap.wait().unwrap_err();
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    match &err {
        SnapError::ChildFailed(m) => assert!(m.contains("signal 9"), "{m}"),
        e => panic!("unexpected error {e:?}"),
    }
    assert_eq!(dir_names(dir.path()), vec!["k.img".to_string()]);
    assert!(std::fs::read(&dest).unwrap() == before);
    assert_eq!(Image::open(&dest).unwrap().device_state().unwrap(), b"old");
}

#[test]
fn killed_child_status_is_failed() {
    let len = 64 * MIB;
    let mut mem = Mem::new(len);
    fill_dense(mem.words_mut(), 6);
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("f.img");
    let cap = fork_capture(&[mem.range(0, len, 0)], b"", &dest);
    // SAFETY: sends SIGKILL to our own, not yet reaped, capture child.
    unsafe { libc::kill(cap.child_pid(), libc::SIGKILL) };
    while !cap.is_finished() {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(matches!(cap.status(), CaptureStatus::Failed(m) if m.contains("signal 9")));
    assert!(cap.wait().is_err());
    assert!(dir_names(dir.path()).is_empty());
}

#[test]
fn unusable_destination_fails_at_start() {
    let mem = Mem::new(MIB);
    let ranges = [mem.range(0, MIB, 0)];
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no/such/dir/x.img");
    let e = start_fork_capture(
        &ranges,
        vec![],
        livesnap::Destination::file(&missing),
        ForkOptions::default(),
    )
    .unwrap_err();
    assert!(
        matches!(&e, SnapError::DestDir { source, .. } if source.raw_os_error() == Some(libc::ENOENT)),
        "{e:?}"
    );
    let e = capture_stopped(&ranges, &[], &missing).unwrap_err();
    assert!(matches!(e, SnapError::DestDir { .. }), "{e:?}");
    let e = capture_stopped(&ranges, &[], dir.path()).unwrap_err();
    assert!(matches!(e, SnapError::InvalidInput(_)), "{e:?}");
    assert!(dir_names(dir.path()).is_empty());
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().mode() & 0o7777
}

#[test]
fn images_hold_guest_ram_so_only_the_owner_reads_them() {
    let mem = Mem::new(MIB);
    let ranges = [mem.range(0, MIB, 0)];
    let dir = tempfile::tempdir().unwrap();
    let fresh = dir.path().join("fresh.img");
    capture_stopped(&ranges, b"dev", &fresh).unwrap();
    assert_eq!(mode(&fresh), 0o600);
    fork_capture(&ranges, b"dev", &fresh).wait().unwrap();
    assert_eq!(mode(&fresh), 0o600);
    // Replacing a file: never a wider mode than it had.
    let narrow = dir.path().join("narrow.img");
    std::fs::write(&narrow, b"old").unwrap();
    std::fs::set_permissions(&narrow, std::os::unix::fs::PermissionsExt::from_mode(0o400)).unwrap();
    capture_stopped(&ranges, b"dev", &narrow).unwrap();
    assert_eq!(mode(&narrow), 0o400);
    let wide = dir.path().join("wide.img");
    std::fs::write(&wide, b"old").unwrap();
    std::fs::set_permissions(&wide, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    fork_capture(&ranges, b"dev", &wide).wait().unwrap();
    assert_eq!(mode(&wide), 0o600, "guest RAM is not made world-readable");
}

#[test]
fn destinations_that_are_not_regular_files_are_refused_and_left_alone() {
    let mem = Mem::new(MIB);
    let ranges = [mem.range(0, MIB, 0)];
    for dev in ["/dev/null", "/dev/full"] {
        let before = std::fs::metadata(dev).unwrap();
        let e = start_fork_capture(
            &ranges,
            vec![],
            livesnap::Destination::file(Path::new(dev)),
            ForkOptions::default(),
        )
        .unwrap_err();
        assert!(
            matches!(&e, SnapError::InvalidInput(m) if m.contains("character device")),
            "{e:?}"
        );
        let e = capture_stopped(&ranges, &[], Path::new(dev)).unwrap_err();
        assert!(matches!(e, SnapError::InvalidInput(_)), "{e:?}");
        let after = std::fs::metadata(dev).unwrap();
        assert!(std::os::unix::fs::FileTypeExt::is_char_device(
            &after.file_type()
        ));
        assert_eq!(before.ino(), after.ino(), "{dev} replaced");
    }
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: c is a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let e = capture_stopped(&ranges, &[], &fifo).unwrap_err();
    assert!(
        matches!(&e, SnapError::InvalidInput(m) if m.contains("FIFO")),
        "{e:?}"
    );
    assert_eq!(
        dir_names(dir.path()),
        vec!["fifo".to_string()],
        "nothing left behind"
    );
}

#[test]
fn temp_files_of_killed_captures_are_removed_by_the_next_capture() {
    let mem = Mem::new(MIB);
    let ranges = [mem.range(0, MIB, 0)];
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("vm.snap");
    // A process that has exited: its pid names no process now.
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let stale = dir.path().join(format!("vm.snap.tmp-{dead}-3"));
    let live = dir
        .path()
        .join(format!("vm.snap.tmp-{}-999", std::process::id()));
    let other = dir.path().join(format!("other.snap.tmp-{dead}-0"));
    for f in [&stale, &live, &other] {
        std::fs::write(f, b"partial").unwrap();
    }
    capture_stopped(&ranges, b"dev", &dest).unwrap();
    let mut names = dir_names(dir.path());
    names.sort();
    let mut want = vec![
        "other.snap.tmp-".to_string() + &dead.to_string() + "-0",
        "vm.snap".to_string(),
        format!("vm.snap.tmp-{}-999", std::process::id()),
    ];
    want.sort();
    assert_eq!(
        names, want,
        "only the dead process's temp file of this image went"
    );
}

#[test]
fn a_symlink_destination_is_written_through() {
    let mem = Mem::new(MIB);
    let ranges = [mem.range(0, MIB, 0)];
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("real.img");
    let link = dir.path().join("link.img");
    std::os::unix::fs::symlink("real.img", &link).unwrap();
    fork_capture(&ranges, b"dev", &link).wait().unwrap();
    assert!(
        std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink(),
        "the link stays"
    );
    assert!(
        Image::open(&target).is_ok(),
        "the image is at the link's target"
    );
    assert_eq!(mode(&target), 0o600);
}

/// A 1 MiB tmpfs mounted on a temp dir (needs root; unmounted on drop).
struct TinyFs(tempfile::TempDir);

impl TinyFs {
    fn mount() -> Option<TinyFs> {
        let d = tempfile::tempdir().unwrap();
        let st = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
            .arg(d.path())
            .status()
            .ok()?;
        st.success().then_some(TinyFs(d))
    }
}

impl Drop for TinyFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.0.path())
            .status();
    }
}

#[test]
fn disk_full_fails_cleanly() {
    let Some(fs) = TinyFs::mount() else {
        eprintln!("SKIP disk_full_fails_cleanly: cannot mount a tmpfs (not root?)");
        return;
    };
    let len = 8 * MIB;
    let mut mem = Mem::new(len);
    fill_dense(mem.words_mut(), 4);
    let ranges = [mem.range(0, len, 0)];
    let dest = fs.0.path().join("full.img");

    let cap = fork_capture(&ranges, b"d", &dest);
    let err = cap.wait().unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err:?}");
    assert!(dir_names(fs.0.path()).is_empty());

    let err = capture_stopped(&ranges, b"d", &dest).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err:?}");
    assert!(dir_names(fs.0.path()).is_empty());
}

#[test]
fn ten_captures_in_a_row() {
    let len = 32 * MIB;
    let mut mem = Mem::new(len);
    fill_sparse(mem.bytes_mut(), 2, 9);
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("r.img");
    for i in 0..10u8 {
        mem.bytes_mut()[i as usize * 4096 * 3 + 1] = i + 1;
        let ranges = [mem.range(0, len, 0)];
        let stats = fork_capture(&ranges, &[i], &dest).wait().unwrap();
        assert_eq!(stats.ram_bytes, len as u64);
        let img = Image::open(&dest).unwrap();
        assert_eq!(img.device_state().unwrap(), vec![i]);
        assert!(image_ram(&img)[0] == mem.bytes());
    }
    assert_eq!(dir_names(dir.path()), vec!["r.img".to_string()]);
}

#[test]
fn invalid_input_is_refused() {
    let mem = Mem::new(2 * MIB);
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("i.img");
    // SAFETY: 1 byte into a 2 MiB mapping that outlives the (refused) capture.
    let unaligned = unsafe { RamRange::new(0, mem.bytes().as_ptr().add(1), 4096) };
    let cases: Vec<Vec<RamRange>> = vec![
        vec![],
        vec![unaligned],
        vec![mem.range(0, 100, 0)],
        vec![mem.range(0, 8192, 0x800)],
        vec![mem.range(0, 8192, 0), mem.range(8192, 8192, 4096)],
    ];
    for c in &cases {
        let e = capture_stopped(c, &[], &dest).unwrap_err();
        assert!(matches!(e, SnapError::InvalidInput(_)), "{e:?}");
        let e = start_fork_capture(
            c,
            vec![],
            livesnap::Destination::file(&dest),
            ForkOptions::default(),
        )
        .unwrap_err();
        assert!(matches!(e, SnapError::InvalidInput(_)), "{e:?}");
    }
    let big = vec![0u8; MAX_DEVICE_STATE as usize + 1];
    let e = capture_stopped(&[mem.range(0, 4096, 0)], &big, &dest).unwrap_err();
    assert!(matches!(e, SnapError::DeviceStateTooLarge { .. }), "{e:?}");
    assert!(dir_names(dir.path()).is_empty());
}

/// The device state may arrive after the fork (the VMM forks while its vCPU
/// threads still save registers); the image is the same as with `start`.
#[test]
fn deferred_device_state_makes_the_same_image() {
    let mut mem = Mem::new(4 * MIB);
    fill_sparse(mem.bytes_mut(), 11, 0x33);
    let ranges = [mem.range(0, 4 * MIB, 0)];
    let dev: Vec<u8> = (0..5000u32).map(|i| (i * 3) as u8).collect();
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.img"), dir.path().join("b.img"));
    fork_capture(&ranges, &dev, &a).wait().unwrap();
    let (cap, state) = livesnap::prepare_fork_capture(
        &ranges,
        livesnap::Destination::file(&b),
        ForkOptions::default(),
    )
    .unwrap()
    .start_deferred()
    .unwrap();
    // Memory changes after the fork do not reach the image.
    let snapshot = mem.bytes_mut().to_vec();
    mem.bytes_mut().fill(0x77);
    std::thread::sleep(Duration::from_millis(20));
    state.send(dev.clone());
    let stats = cap.wait().unwrap();
    assert_eq!(stats.device_state_bytes, dev.len() as u64);
    assert!(same_but_identity(&a, &b));
    let img = Image::open(&b).unwrap();
    assert_eq!(img.device_state().unwrap(), dev);
    assert_eq!(image_ram(&img), vec![snapshot]);
}

#[test]
fn deferred_device_state_that_never_comes_fails_the_capture() {
    let mut mem = Mem::new(2 * MIB);
    fill_dense(mem.words_mut(), 5);
    let ranges = [mem.range(0, 2 * MIB, 0)];
    let dir = tempfile::tempdir().unwrap();
    for give_up in [true, false] {
        let dest = dir.path().join("x.img");
        let (cap, state) = livesnap::prepare_fork_capture(
            &ranges,
            livesnap::Destination::file(&dest),
            ForkOptions::default(),
        )
        .unwrap()
        .start_deferred()
        .unwrap();
        let pid = cap.child_pid();
        if give_up {
            state.fail("KVM_GET_REGS: EIO".into());
        } else {
            drop(state);
        }
        let err = cap.wait().unwrap_err().to_string();
        let want = if give_up {
            "KVM_GET_REGS: EIO"
        } else {
            "never provided"
        };
        assert!(err.contains(want), "{err}");
        assert!(process_gone(pid), "child reaped");
        assert!(
            dir_names(dir.path()).is_empty(),
            "{:?}",
            dir_names(dir.path())
        );
    }
}
