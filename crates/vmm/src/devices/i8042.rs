//! i8042 keyboard controller, only as far as a guest uses it to reset the
//! machine (command 0xfe on port 0x64). Wraps vm-superio's device.

use serde::{Deserialize, Serialize};
use vm_superio::{I8042Device, Trigger};

use super::{DeviceRequest, RequestSink};

/// Data port.
pub const DATA: u16 = 0x60;
/// Command/status port.
pub const COMMAND: u16 = 0x64;

/// Turns vm-superio's reset trigger into a [`DeviceRequest::Reset`].
pub struct ResetTrigger(RequestSink);

impl Trigger for ResetTrigger {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        (self.0)(DeviceRequest::Reset);
        Ok(())
    }
}

/// The i8042 device.
pub struct I8042 {
    dev: I8042Device<ResetTrigger>,
}

/// Saved state. vm-superio's i8042 keeps no guest-visible register state beyond
/// reset handling, so the state is empty; it exists so the device is saved explicitly.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042State {}

impl I8042 {
    pub fn new(sink: RequestSink) -> Self {
        I8042 {
            dev: I8042Device::new(ResetTrigger(sink)),
        }
    }

    pub fn read(&mut self, port: u16) -> u8 {
        self.dev.read((port - DATA) as u8)
    }

    pub fn write(&mut self, port: u16, value: u8) {
        let _ = self.dev.write((port - DATA) as u8, value);
    }

    pub fn save(&self) -> I8042State {
        I8042State {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn command_fe_resets() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let mut dev = I8042::new(Box::new(move |r| s.lock().unwrap().push(r)));
        dev.write(COMMAND, 0xfe);
        assert_eq!(*seen.lock().unwrap(), vec![DeviceRequest::Reset]);
    }
}
