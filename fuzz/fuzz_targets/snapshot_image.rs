#![no_main]
//! Arbitrary bytes opened as a snapshot image (livesnap format v1). The
//! header and device-state checksums are fixed up first, so the fuzzer gets
//! past them to the layout checks and the readers behind them.

use libfuzzer_sys::fuzz_target;
use livesnap::{Image, Source, HEADER_SIZE};

const OFF_DEV_OFFSET: usize = 32;
const OFF_DEV_LEN: usize = 40;
const OFF_DEV_CRC: usize = 48;
const OFF_HEADER_CRC: usize = HEADER_SIZE as usize - 4;

fn get64(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}

fuzz_target!(|data: &[u8]| {
    let mut img = data.to_vec();
    if img.len() >= HEADER_SIZE as usize {
        let (off, len) = (get64(&img, OFF_DEV_OFFSET), get64(&img, OFF_DEV_LEN));
        if let Some(end) = off.checked_add(len) {
            if end <= img.len() as u64 {
                let crc = crc32fast::hash(&img[off as usize..end as usize]);
                img[OFF_DEV_CRC..OFF_DEV_CRC + 4].copy_from_slice(&crc.to_le_bytes());
            }
        }
        let crc = crc32fast::hash(&img[..OFF_HEADER_CRC]);
        img[OFF_HEADER_CRC..OFF_HEADER_CRC + 4].copy_from_slice(&crc.to_le_bytes());
    }
    let len = img.len() as u64;
    let Ok(image) = Image::from_source(Box::new(img) as Box<dyn Source>) else {
        return;
    };
    // An image that opened describes only bytes it has.
    assert!(image.file_len() <= len);
    let _ = image.device_state();
    for (i, r) in image.ranges().to_vec().iter().enumerate() {
        if r.len > 1 << 20 {
            continue;
        }
        let mut buf = vec![0xa5u8; r.len as usize];
        if image.read_ram_into_zeroed(i, &mut buf).is_ok() {
            let mut again = vec![0u8; r.len as usize];
            image
                .read_ram_into(i, &mut again)
                .expect("second read of a readable range");
            assert_eq!(buf, again);
        }
    }
});
