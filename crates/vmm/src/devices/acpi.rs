//! The ACPI power-management ports of a hardware-reduced machine (the FADT and
//! DSDT in [`crate::boot::acpi`] point here):
//!
//! | port | register | |
//! |---|---|---|
//! | 0x600 | sleep control | a write with SLP_EN and SLP_TYP = [`S5_SLP_TYP`] powers off |
//! | 0x601 | sleep status | reads 0; writes ignored |
//! | 0x602 | GED events | pending events, cleared by the read (`_EVT` reads it) |
//! | 0x603 | reset | writing [`RESET_VALUE`] resets |
//!
//! [`AcpiPm::press_power_button`] is `system_powerdown`: it sets the event bit
//! and raises the Generic Event Device's interrupt; a guest with ACPI then
//! shuts down as its OS decides.

use std::sync::atomic::{AtomicU8, Ordering};

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use super::{DeviceRequest, RequestSink};

/// Sleep control register.
pub const SLEEP_CONTROL: u16 = 0x600;
/// Sleep status register.
pub const SLEEP_STATUS: u16 = 0x601;
/// Generic Event Device event register.
pub const GED_EVENT: u16 = 0x602;
/// Reset register.
pub const RESET: u16 = 0x603;
/// First and last port.
pub const BASE: u16 = SLEEP_CONTROL;
pub const LAST: u16 = RESET;
/// The value the guest writes to [`RESET`].
pub const RESET_VALUE: u8 = 1;
/// SLP_TYP of S5 (soft off), as `_S5_` in the DSDT says.
pub const S5_SLP_TYP: u8 = 5;
/// Interrupt line of the Generic Event Device (COM2's ISA line; there is no COM2).
pub const GED_IRQ: u32 = 3;
/// GED event bit: the power button was pressed.
pub const EVENT_POWER_BUTTON: u8 = 1;

const SLP_EN: u8 = 1 << 5;
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0x7 << SLP_TYP_SHIFT;

/// Saved state: events raised but not yet read by the guest.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcpiPmState {
    pub pending: u8,
}

/// The device.
pub struct AcpiPm {
    pending: AtomicU8,
    irq: EventFd,
    sink: RequestSink,
}

impl AcpiPm {
    pub fn new(irq: EventFd, sink: RequestSink, state: &AcpiPmState) -> Self {
        AcpiPm {
            pending: AtomicU8::new(state.pending),
            irq,
            sink,
        }
    }

    pub fn save(&self) -> AcpiPmState {
        AcpiPmState {
            pending: self.pending.load(Ordering::SeqCst),
        }
    }

    /// `system_powerdown`: raises the power-button event.
    pub fn press_power_button(&self) -> std::io::Result<()> {
        self.pending.fetch_or(EVENT_POWER_BUTTON, Ordering::SeqCst);
        self.irq.write(1)
    }

    pub fn read(&self, port: u16) -> u8 {
        match port {
            GED_EVENT => self.pending.swap(0, Ordering::SeqCst),
            _ => 0,
        }
    }

    pub fn write(&self, port: u16, value: u8) {
        match port {
            SLEEP_CONTROL
                if value & SLP_EN != 0 && (value & SLP_TYP_MASK) >> SLP_TYP_SHIFT == S5_SLP_TYP =>
            {
                (self.sink)(DeviceRequest::PowerOff(0))
            }
            RESET if value == RESET_VALUE => (self.sink)(DeviceRequest::Reset),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    fn device() -> (AcpiPm, Arc<Mutex<Vec<DeviceRequest>>>, EventFd) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let dev = AcpiPm::new(
            irq.try_clone().unwrap(),
            Box::new(move |r| s.lock().unwrap().push(r)),
            &AcpiPmState::default(),
        );
        (dev, seen, irq)
    }

    #[test]
    fn s5_powers_off_and_other_sleep_states_do_not() {
        let (dev, seen, _) = device();
        dev.write(SLEEP_CONTROL, 3 << SLP_TYP_SHIFT | SLP_EN); // S3: not supported, ignored
        dev.write(SLEEP_CONTROL, S5_SLP_TYP << SLP_TYP_SHIFT); // no SLP_EN
        dev.write(SLEEP_STATUS, 0x80);
        assert!(seen.lock().unwrap().is_empty());
        dev.write(SLEEP_CONTROL, S5_SLP_TYP << SLP_TYP_SHIFT | SLP_EN);
        assert_eq!(*seen.lock().unwrap(), vec![DeviceRequest::PowerOff(0)]);
    }

    #[test]
    fn reset_register_resets() {
        let (dev, seen, _) = device();
        dev.write(RESET, 0);
        dev.write(RESET, RESET_VALUE);
        assert_eq!(*seen.lock().unwrap(), vec![DeviceRequest::Reset]);
    }

    #[test]
    fn power_button_raises_the_interrupt_and_the_read_clears_the_event() {
        let (dev, _, irq) = device();
        assert_eq!(dev.read(GED_EVENT), 0);
        dev.press_power_button().unwrap();
        assert_eq!(irq.read().unwrap(), 1, "interrupt raised");
        assert_eq!(dev.save().pending, EVENT_POWER_BUTTON);
        assert_eq!(dev.read(GED_EVENT), EVENT_POWER_BUTTON);
        assert_eq!(dev.read(GED_EVENT), 0, "read clears");
        // A pending event survives a save and restore.
        dev.press_power_button().unwrap();
        let restored = AcpiPm::new(EventFd::new(0).unwrap(), Box::new(|_| {}), &dev.save());
        assert_eq!(restored.read(GED_EVENT), EVENT_POWER_BUTTON);
    }
}
