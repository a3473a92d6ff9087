#![no_main]
//! Open arbitrary bytes as a qcow2 image and exercise the read-only paths.

use libfuzzer_sys::fuzz_target;
use qcow2::{Extent, MemBackend, Qcow2};

fuzz_target!(|data: &[u8]| {
    let Ok(mut img) = Qcow2::open_with(Box::new(MemBackend::new(data.to_vec())), false, None)
    else {
        return;
    };
    let mut buf = vec![0u8; img.size().min(1 << 16) as usize];
    let read = img.read_at(&mut buf, 0);
    // Where the same bytes are, as a device reading the file itself sees
    // them: every piece must hold what `read_at` read.
    if let (Ok(()), Ok(pieces)) = (read, img.extents(0, buf.len() as u64)) {
        assert_eq!(
            pieces.iter().map(Extent::len).sum::<u64>(),
            buf.len() as u64
        );
        let mut at = 0usize;
        for p in pieces {
            let got = &buf[at..at + p.len() as usize];
            match p {
                Extent::File { at: host, .. } => {
                    let mut want = vec![0u8; got.len()];
                    let from = usize::try_from(host).unwrap_or(usize::MAX).min(data.len());
                    let n = (data.len() - from).min(want.len());
                    want[..n].copy_from_slice(&data[from..from + n]);
                    assert!(got == want.as_slice(), "a file run differs from read_at");
                }
                Extent::Zero { .. } => assert!(got.iter().all(|&b| b == 0)),
                Extent::Other { .. } => {}
            }
            at += p.len() as usize;
        }
    }
    for s in img.snapshots().to_vec() {
        let mut v = vec![0u8; s.vm_state_size.min(4096) as usize];
        let _ = img.read_vmstate(&s.id, 0, &mut v);
        let mut d = vec![0u8; s.disk_size.min(img.size()).min(4096) as usize];
        let _ = img.read_snapshot_at(&s.id, &mut d, 0);
    }
    let _ = img.check();
});
