//! Deterministic fuzzing: byte-wise mutations of valid images must never
//! panic (or allocate without bound) when opened, read, listed, checked or
//! even modified.

mod common;

use common::{pattern, Rng};
use qcow2::{Backend, CreateOptions, MemBackend, Qcow2};

/// In-memory backend that refuses to grow beyond 64 MiB.
struct Capped(Vec<u8>);

impl Backend for Capped {
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        buf.fill(0);
        if let Ok(s) = usize::try_from(offset) {
            if s < self.0.len() {
                let e = s.saturating_add(buf.len()).min(self.0.len());
                buf[..e - s].copy_from_slice(&self.0[s..e]);
            }
        }
        Ok(())
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= 64 << 20);
        let Some(end) = end else {
            return Err(std::io::Error::other("capped"));
        };
        if self.0.len() < end as usize {
            self.0.resize(end as usize, 0);
        }
        self.0[offset as usize..end as usize].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
    fn len(&mut self) -> std::io::Result<u64> {
        Ok(self.0.len() as u64)
    }
    fn set_len(&mut self, len: u64) -> std::io::Result<()> {
        if len > 64 << 20 {
            return Err(std::io::Error::other("capped"));
        }
        self.0.resize(len as usize, 0);
        Ok(())
    }
}

fn exercise(bytes: Vec<u8>, rng: &mut Rng) {
    if let Ok(mut img) = Qcow2::open_with(Box::new(MemBackend::new(bytes.clone())), false, None) {
        let size = img.size();
        let mut buf = vec![0u8; size.min(64 << 10) as usize];
        let _ = img.read_at(&mut buf, 0);
        if size > 0 {
            let off = rng.below(size);
            let mut b = vec![0u8; (size - off).min(4096) as usize];
            let _ = img.read_at(&mut b, off);
        }
        let snaps: Vec<_> = img.snapshots().iter().take(3).cloned().collect();
        for s in snaps {
            let mut b = vec![0u8; s.disk_size.min(size).min(8192) as usize];
            let _ = img.read_snapshot_at(&s.id, &mut b, 0);
            let mut v = vec![0u8; s.vm_state_size.min(8192) as usize];
            let _ = img.read_vmstate(&s.name, 0, &mut v);
        }
        let _ = img.check();
    }
    if let Ok(mut img) = Qcow2::open_with(Box::new(Capped(bytes)), true, None) {
        let size = img.size();
        if size > 0 {
            let off = rng.below(size);
            let _ = img.write_at(&[0x5a; 3000][..(size - off).min(3000) as usize], off);
        }
        let _ = img.write_vmstate(0, &[1u8; 1000]);
        let _ = img.create_snapshot("fuzz", 0, 1000);
        if let Some(s) = img.snapshots().first().cloned() {
            let _ = img.apply_snapshot(&s.id);
            let _ = img.delete_snapshot(&s.id);
        }
        // Two-phase snapshot: commit one, abort another.
        for commit in [true, false] {
            if let Ok(f) = img.freeze(if commit { "live" } else { "gone" }) {
                let _ = img.write_frozen_vmstate(&f, 100, &[3u8; 2000]);
                if size > 0 {
                    let _ = img.write_at(&[0x6b; 700][..size.min(700) as usize], 0);
                }
                let _ = if commit {
                    img.commit_frozen(f, 0, 2100).map(|_| ())
                } else {
                    img.abort_frozen(f)
                };
            }
        }
        let _ = img.check();
    }
}

fn mutate(seed: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut b = seed.to_vec();
    let n = 1 + rng.below(6);
    for _ in 0..n {
        // Half of the mutations hit the header/first clusters, where most metadata lives.
        let limit = if rng.below(2) == 0 {
            4096.min(b.len())
        } else {
            b.len()
        };
        let pos = rng.below(limit as u64) as usize;
        match rng.below(5) {
            0 => b[pos] = rng.next() as u8,
            1 => b[pos] ^= 1 << rng.below(8),
            2 => {
                let p = pos & !7;
                let v: u64 = [0, u64::MAX, 1 << 63, 0x1_0000_0000, (rng.next() >> 20) << 9]
                    [rng.below(5) as usize];
                if p + 8 <= b.len() {
                    b[p..p + 8].copy_from_slice(&v.to_be_bytes());
                }
            }
            3 => {
                let p = pos & !3;
                let v: u32 = [0, u32::MAX, 0x8000_0000, 65537, 22][rng.below(5) as usize];
                if p + 4 <= b.len() {
                    b[p..p + 4].copy_from_slice(&v.to_be_bytes());
                }
            }
            _ => {
                let new_len = rng.below(b.len() as u64 + 1) as usize;
                b.truncate(new_len.max(8));
            }
        }
    }
    b
}

#[test]
fn mutated_images_never_panic() {
    let seeds = seeds();
    let mut rng = Rng(0x5EED_1234_ABCD);
    let iterations = std::env::var("QCOW2_FUZZ_ITERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1500);
    for i in 0..iterations {
        let s = &seeds[i % seeds.len()];
        let m = mutate(s, &mut rng);
        exercise(m, &mut rng);
    }
    // The unmodified seeds are valid.
    for s in &seeds {
        let mut img = Qcow2::open_with(Box::new(MemBackend::new(s.clone())), false, None).unwrap();
        assert_eq!(img.snapshots().len(), 2);
        assert!(img.check().unwrap().is_clean());
    }
}

/// Valid seed images: several cluster sizes, with snapshots and VM state.
fn seeds() -> Vec<Vec<u8>> {
    [9u32, 12, 16]
        .iter()
        .enumerate()
        .map(|(i, &cb)| {
            let be = common::CrashBackend::new(Vec::new(), None);
            let mut img = Qcow2::create_with(
                Box::new(be.clone()),
                256 << 10,
                CreateOptions {
                    cluster_bits: cb,
                    ..Default::default()
                },
                None,
            )
            .unwrap();
            let seed = i as u64 * 10;
            img.write_at(&pattern(20_000, seed), 1000).unwrap();
            img.write_vmstate(0, &pattern(3000, seed + 1)).unwrap();
            img.create_snapshot("one", 7, 3000).unwrap();
            img.write_at(&pattern(5000, seed + 2), 100_000).unwrap();
            img.create_snapshot("two", 8, 0).unwrap();
            img.write_at(&pattern(700, seed + 3), 2000).unwrap();
            drop(img);
            be.bytes()
        })
        .collect()
}
