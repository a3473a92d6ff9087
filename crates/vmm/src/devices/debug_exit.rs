//! Debug-exit port: the guest powers off with an exit status by writing it to
//! port 0xf4 (the port of QEMU's `isa-debug-exit,iobase=0xf4,iosize=4`).
//!
//! snapvmm exits with the value written; QEMU exits with `(value << 1) | 1`.
//! The device has no state to save.

use super::{DeviceRequest, RequestSink};

/// First port.
pub const BASE: u16 = 0xf4;
/// Last port.
pub const LAST: u16 = 0xf7;

/// The debug-exit device.
pub struct DebugExit {
    sink: RequestSink,
}

impl DebugExit {
    pub fn new(sink: RequestSink) -> Self {
        DebugExit { sink }
    }

    /// A write of 1, 2 or 4 bytes: the little-endian value is the exit status (low 8 bits).
    pub fn write(&self, data: &[u8]) {
        let mut v = [0u8; 4];
        let n = data.len().min(4);
        v[..n].copy_from_slice(&data[..n]);
        (self.sink)(DeviceRequest::PowerOff(
            (u32::from_le_bytes(v) & 0xff) as i32,
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn write_powers_off_with_the_value() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let dev = DebugExit::new(Box::new(move |r| s.lock().unwrap().push(r)));
        dev.write(&[7, 0, 0, 0]);
        dev.write(&[0x2a]);
        assert_eq!(
            *seen.lock().unwrap(),
            vec![DeviceRequest::PowerOff(7), DeviceRequest::PowerOff(42)]
        );
    }
}
