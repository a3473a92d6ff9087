//! Incremental write-protect captures: after a capture the engine records
//! which 2 MiB chunks the program writes; a capture with a parent writes only
//! those, and the chain (child over parent) reads as the memory at the
//! child's cut. Broken chains are refused; a failed capture loses no record.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::{fill_dense, Mem};
use livesnap::chain::Chain;
use livesnap::uffd::Uffd;
use livesnap::wp::{prepare_wp_capture, WpEngine, WpOptions};
use livesnap::PageSource;
use livesnap::CHUNK;
use livesnap::{Image, SnapError};

const LEN: usize = 32 << 20;

fn engine(mem: &Mem) -> Option<WpEngine> {
    let uffd = match Uffd::new_wp() {
        Ok(u) => Arc::new(u),
        Err(e) => {
            eprintln!("skipped: no userfaultfd write-protect here: {e}");
            return None;
        }
    };
    Some(WpEngine::with_uffd(uffd, &[mem.range(0, LEN, 0)]).unwrap())
}

/// A capture of the engine's memory into `dest` (incremental to `parent`).
fn capture(
    engine: &WpEngine,
    dest: &Path,
    parent: Option<&Path>,
) -> livesnap::Result<(livesnap::CaptureStats, u64)> {
    let prepared = prepare_wp_capture(
        engine,
        livesnap::Destination::file(dest),
        WpOptions {
            parent: parent.map(Path::to_path_buf),
            ..WpOptions::default()
        },
    )?;
    let (cap, state, counters) = prepared.start_deferred()?;
    state.send(b"dev".to_vec());
    let stats = cap.wait()?;
    Ok((
        stats,
        counters
            .chunks_unchanged
            .load(std::sync::atomic::Ordering::Relaxed),
    ))
}

/// Memory filled from `seed`, a full capture of it (`full.snap`), chunk 1
/// set to `v`, and a capture incremental to the first (`inc.snap`).
#[allow(clippy::type_complexity)]
fn full_then_incremental(
    seed: u64,
    v: u8,
) -> Option<(Mem, WpEngine, tempfile::TempDir, PathBuf, PathBuf)> {
    let mut mem = Mem::new(LEN);
    fill_dense(mem.words_mut(), seed);
    let engine = engine(&mem)?;
    let dir = tempfile::tempdir().unwrap();
    let (full, inc) = (dir.path().join("full.snap"), dir.path().join("inc.snap"));
    capture(&engine, &full, None).unwrap();
    touch(&mut mem, &[1], v);
    capture(&engine, &inc, Some(&full)).unwrap();
    Some((mem, engine, dir, full, inc))
}

/// The RAM a chain reads as.
fn chain_ram(path: &Path) -> Vec<u8> {
    let chain = Chain::open(path).unwrap();
    let mut v = vec![0u8; LEN];
    chain.read_ram_into_zeroed(0, &mut v).unwrap();
    v
}

fn touch(mem: &mut Mem, chunks: &[usize], v: u8) {
    for &c in chunks {
        mem.bytes_mut()[c * CHUNK as usize + 4096 * c] = v;
    }
}

#[test]
fn a_chain_reads_as_memory_at_the_last_cut_and_holds_only_what_changed() {
    let mut mem = Mem::new(LEN);
    fill_dense(mem.words_mut(), 1);
    let Some(engine) = engine(&mem) else { return };
    let dir = tempfile::tempdir().unwrap();
    let (full, inc1, inc2) = (
        dir.path().join("full.snap"),
        dir.path().join("inc1.snap"),
        dir.path().join("inc2.snap"),
    );
    capture(&engine, &full, None).unwrap();
    assert_eq!(engine.base(), Some(Image::open(&full).unwrap().id()));
    // Two chunks of sixteen change.
    touch(&mut mem, &[3, 11], 0xaa);
    let at_inc1 = mem.bytes().to_vec();
    let (stats, unchanged) = capture(&engine, &inc1, Some(&full)).unwrap();
    assert_eq!(unchanged, (LEN as u64 / CHUNK) - 2);
    assert!(
        stats.bytes_written <= 2 * CHUNK,
        "only the changed chunks: {stats:?}"
    );
    // Written after the cut: not in the image.
    touch(&mut mem, &[5], 0xbb);
    assert!(chain_ram(&inc1) == at_inc1);
    let img = Image::open(&inc1).unwrap();
    assert_eq!(img.parent().unwrap().0, Image::open(&full).unwrap().id());
    assert!(img.has_chunk(3) && img.has_chunk(11) && !img.has_chunk(0));
    assert!(
        std::fs::metadata(&inc1).unwrap().len() >= LEN as u64,
        "same layout as a full image (sparse)"
    );

    // A second level: chunk 5 (written after inc1's cut) and 11 again.
    touch(&mut mem, &[11], 0xcc);
    let at_inc2 = mem.bytes().to_vec();
    let (_, unchanged) = capture(&engine, &inc2, Some(&inc1)).unwrap();
    assert_eq!(unchanged, (LEN as u64 / CHUNK) - 2);
    let chain = Chain::open(&inc2).unwrap();
    assert_eq!(chain.len(), 3);
    assert!(chain_ram(&inc2) == at_inc2);
    assert_eq!(chain.top().device_state().unwrap(), b"dev");

    // Squashed into one full image: the same RAM, no parent.
    let squashed = dir.path().join("squashed.snap");
    chain.squash(&squashed).unwrap();
    let img = Image::open(&squashed).unwrap();
    assert!(img.parent().is_none());
    let mut v = vec![0u8; LEN];
    img.read_ram_into(0, &mut v).unwrap();
    assert!(v == at_inc2);
    assert_eq!(img.device_state().unwrap(), b"dev");

    // Squashing over an image of its own chain is refused (by name, through
    // a symlink, through a hard link), and nothing of the chain is lost.
    let link = dir.path().join("link-to-full.snap");
    std::os::unix::fs::symlink(&full, &link).unwrap();
    let hard = dir.path().join("hard-inc1.snap");
    std::fs::hard_link(&inc1, &hard).unwrap();
    for dest in [&full, &inc1, &inc2, &link, &hard] {
        let r = chain.squash(dest);
        assert!(
            matches!(&r, Err(SnapError::InvalidInput(m)) if m.contains("an image of the chain")),
            "{}: {r:?}",
            dest.display()
        );
    }
    assert!(chain_ram(&inc2) == at_inc2, "the chain is intact");
    assert!(chain_ram(&inc1) == at_inc1, "the chain is intact");

    // The chain as a page source (what a lazy restore reads).
    let mut b = vec![0u8; CHUNK as usize];
    let off = img.ranges()[0].file_offset + 11 * CHUNK;
    PageSource::read_at(&chain, &mut b, off).unwrap();
    assert!(b[..] == at_inc2[11 * CHUNK as usize..12 * CHUNK as usize]);
}

#[test]
fn a_broken_chain_is_refused() {
    let Some((_mem, engine, dir, full, inc)) = full_then_incremental(2, 9) else {
        return;
    };
    // Moved together: found next to the child.
    let moved = dir.path().join("moved");
    std::fs::create_dir(&moved).unwrap();
    std::fs::rename(&full, moved.join("full.snap")).unwrap();
    std::fs::rename(&inc, moved.join("inc.snap")).unwrap();
    Chain::open(&moved.join("inc.snap")).unwrap();
    // Parent gone.
    std::fs::remove_file(moved.join("full.snap")).unwrap();
    let e = Chain::open(&moved.join("inc.snap")).err().unwrap();
    assert!(matches!(e, SnapError::ParentMissing { .. }), "{e}");
    // Parent replaced by another snapshot (of the same memory, even).
    capture(&engine, &moved.join("full.snap"), None).unwrap();
    let e = Chain::open(&moved.join("inc.snap")).err().unwrap();
    assert!(matches!(e, SnapError::ParentChanged { .. }), "{e}");
    assert!(e.to_string().contains("changed since"), "{e}");
}

#[test]
fn only_the_latest_snapshot_can_be_a_parent() {
    let mut mem = Mem::new(LEN);
    fill_dense(mem.words_mut(), 3);
    let Some(engine) = engine(&mem) else { return };
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c) = (
        dir.path().join("a.snap"),
        dir.path().join("b.snap"),
        dir.path().join("c.snap"),
    );
    let e = capture(&engine, &c, Some(&a)).err().unwrap();
    assert!(e.to_string().contains("missing"), "{e}");
    capture(&engine, &a, None).unwrap();
    capture(&engine, &b, None).unwrap();
    touch(&mut mem, &[2], 1);
    let e = capture(&engine, &c, Some(&a)).err().unwrap();
    assert!(e.to_string().contains("not this VM's latest"), "{e}");
    assert!(!c.exists());
    let e = capture(&engine, &b, Some(&b)).err().unwrap();
    assert!(e.to_string().contains("its own parent"), "{e}");
    capture(&engine, &c, Some(&b)).unwrap();
    assert!(chain_ram(&c) == mem.bytes());
    // Over an older image of its own chain (b, c's parent): refused, the
    // chain intact.
    touch(&mut mem, &[3], 2);
    let e = capture(&engine, &b, Some(&c)).err().unwrap();
    assert!(e.to_string().contains("older image of its chain"), "{e}");
    assert!(chain_ram(&c).len() == LEN);
}

#[test]
fn a_failed_capture_keeps_the_record_of_changes() {
    let mut mem = Mem::new(LEN);
    fill_dense(mem.words_mut(), 4);
    let Some(engine) = engine(&mem) else { return };
    let dir = tempfile::tempdir().unwrap();
    let (full, inc) = (dir.path().join("full.snap"), dir.path().join("inc.snap"));
    capture(&engine, &full, None).unwrap();
    touch(&mut mem, &[4, 9], 7);
    // Cut, then cancelled: chunks 4 and 9 were taken out of the record.
    let prepared = prepare_wp_capture(
        &engine,
        livesnap::Destination::file(&inc),
        WpOptions {
            parent: Some(full.clone()),
            ..WpOptions::default()
        },
    )
    .unwrap();
    let (cap, state, _) = prepared.start_deferred().unwrap();
    cap.cancel();
    drop(state);
    assert!(cap.wait().is_err());
    touch(&mut mem, &[12], 8);
    // They count as changed again: the next incremental has them.
    let (_, unchanged) = capture(&engine, &inc, Some(&full)).unwrap();
    assert_eq!(unchanged, (LEN as u64 / CHUNK) - 3);
    assert!(chain_ram(&inc) == mem.bytes());
}

#[test]
fn a_chain_that_loops_is_reported_as_a_loop() {
    let Some((_mem, _engine, _dir, full, inc)) = full_then_incremental(4, 0x11) else {
        return;
    };
    // The incremental image made its own parent (valid checksums), and put
    // where its parent was: it now names itself as its parent.
    let mut b = std::fs::read(&inc).unwrap();
    b.copy_within(3200..3216, 3216); // parent_id = image_id
    b.copy_within(48..52, 3232); // parent_dev_crc32 = dev_crc32
    let crc = crc32fast::hash(&b[..4092]);
    b[4092..4096].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(&full, &b).unwrap();
    let e = Chain::open(&full).err().unwrap();
    assert!(matches!(&e, SnapError::ChainLoop(p) if p == &full), "{e}");
    assert!(e.to_string().contains("loop"), "{e}");
}
