#![no_main]
//! Open arbitrary bytes as a qcow2 image and exercise the read-only paths.

use libfuzzer_sys::fuzz_target;
use qcow2::{MemBackend, Qcow2};

fuzz_target!(|data: &[u8]| {
    let Ok(mut img) = Qcow2::open_with(Box::new(MemBackend::new(data.to_vec())), false, None)
    else {
        return;
    };
    let mut buf = vec![0u8; img.size().min(1 << 16) as usize];
    let _ = img.read_at(&mut buf, 0);
    for s in img.snapshots().to_vec() {
        let mut v = vec![0u8; s.vm_state_size.min(4096) as usize];
        let _ = img.read_vmstate(&s.id, 0, &mut v);
        let mut d = vec![0u8; s.disk_size.min(img.size()).min(4096) as usize];
        let _ = img.read_snapshot_at(&s.id, &mut d, 0);
    }
    let _ = img.check();
});
