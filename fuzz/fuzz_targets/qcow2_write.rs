#![no_main]
//! Writes, snapshots and reads on an arbitrary qcow2 image: the input is
//! a script of operations, then the image. Whatever the
//! image holds, the library returns errors rather than panicking, what it
//! wrote reads back, and an image it accepted for writing stays free of
//! corruption by its own check.

use libfuzzer_sys::fuzz_target;
use qcow2::{Backend, MemBackend, Qcow2};

/// An in-memory file on a small disk: a hostile image may make the library
/// allocate at a huge offset (a sparse file on a real disk); here that is a
/// full disk, which the library must survive like any I/O error.
struct SmallDisk(MemBackend);

const DISK_LIMIT: u64 = 64 << 20;

fn full() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::StorageFull, "no space left (fuzz disk)")
}

impl Backend for SmallDisk {
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.0.read_at(buf, offset)
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        if offset.saturating_add(buf.len() as u64) > DISK_LIMIT {
            return Err(full());
        }
        self.0.write_at(buf, offset)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
    fn len(&mut self) -> std::io::Result<u64> {
        self.0.len()
    }
    fn set_len(&mut self, len: u64) -> std::io::Result<()> {
        if len > DISK_LIMIT {
            return Err(full());
        }
        self.0.set_len(len)
    }
}

fuzz_target!(|data: &[u8]| {
    // Byte 0: the number of 8-byte operations that follow; then the image.
    let Some((&ops, rest)) = data.split_first() else {
        return;
    };
    let (script, image) = rest.split_at((usize::from(ops) * 8).min(rest.len()));
    let disk = SmallDisk(MemBackend::new(image.to_vec()));
    let Ok(mut img) = Qcow2::open_with(Box::new(disk), true, None) else {
        return;
    };
    let size = img.size();
    if size == 0 || size > 1 << 40 {
        return;
    }
    let clean_before = img.check().is_ok_and(|r| r.is_clean());
    let mut names = 0u32;
    for op in script.chunks(8) {
        if op.len() < 8 {
            break;
        }
        let arg = u64::from_le_bytes([op[1], op[2], op[3], op[4], op[5], op[6], op[7], 0]);
        match op[0] % 6 {
            0 | 1 => {
                // Write a small pattern, read it back.
                let len = (1 + arg % 4096).min(size) as usize;
                let off = (arg >> 12) % (size - len as u64 + 1);
                let buf = vec![op[1] | 1; len];
                if img.write_at(&buf, off).is_ok() {
                    let mut back = vec![0u8; len];
                    img.read_at(&mut back, off)
                        .expect("read of what was just written");
                    assert_eq!(back, buf, "written bytes read back");
                }
            }
            2 => {
                names += 1;
                let _ = img.create_snapshot(&format!("s{names}"), arg, 0);
            }
            3 => {
                if let Some(s) = img.snapshots().first().map(|s| s.id.clone()) {
                    let _ = img.delete_snapshot(&s);
                }
            }
            4 => {
                if let Some(s) = img.snapshots().last().map(|s| s.id.clone()) {
                    let _ = img.apply_snapshot(&s);
                }
            }
            _ => {
                let _ = img.flush();
            }
        }
        if img.is_poisoned() {
            return;
        }
    }
    if let Ok(report) = img.check() {
        // Failed operations may leak clusters, never corrupt references.
        assert!(
            !clean_before || report.errors == 0,
            "a clean image got refcount errors: {:?}",
            report.messages
        );
    }
});
