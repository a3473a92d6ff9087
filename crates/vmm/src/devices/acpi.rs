//! The ACPI power-management ports (the FADT and DSDT in
//! [`crate::boot::acpi`] point here):
//!
//! | port | register | |
//! |---|---|---|
//! | 0x600 | sleep control | a write with SLP_EN and SLP_TYP = [`S5_SLP_TYP`] powers off |
//! | 0x601 | sleep status | reads 0; writes ignored |
//! | 0x602 | GED events | pending events, cleared by the read (`_EVT` reads it) |
//! | 0x603 | reset | writing [`RESET_VALUE`] resets |
//! | 0x604–0x605 | PM1a status | reads 0 (no fixed events); writes clear nothing |
//! | 0x606–0x607 | PM1a enable | kept as written |
//! | 0x608–0x609 | PM1a control | SCI_EN always set (no SMI: always in ACPI mode); SLP_EN with SLP_TYP = S5 powers off |
//!
//! A kernel booted with `noapic` gets a full (not hardware-reduced) FADT, so
//! that it still has an interrupt controller for the ISA lines (Linux
//! ignores the 8259 on a hardware-reduced machine): its PM1 blocks are the
//! registers above. Every other boot gets the hardware-reduced FADT, whose
//! sleep control and status registers are the first two.
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
/// PM1a event block: status (2 bytes), then enable (2 bytes).
pub const PM1A_EVT: u16 = 0x604;
pub const PM1_EVT_LEN: u8 = 4;
/// PM1a control block (2 bytes).
pub const PM1A_CNT: u16 = 0x608;
pub const PM1_CNT_LEN: u8 = 2;
/// First and last port.
pub const BASE: u16 = SLEEP_CONTROL;
pub const LAST: u16 = PM1A_CNT + PM1_CNT_LEN as u16 - 1;
/// The value the guest writes to [`RESET`].
pub const RESET_VALUE: u8 = 1;
/// SLP_TYP of S5 (soft off), as `_S5_` in the DSDT says.
pub const S5_SLP_TYP: u8 = 5;
/// Interrupt line of the Generic Event Device (COM2's ISA line; there is no COM2).
pub const GED_IRQ: u32 = 3;
/// The System Control Interrupt's line (level, active high: the MADT's
/// override says so). Nothing raises it (no fixed events; the power button is
/// the GED's), but a full ACPI machine must name one below 16, and an OS
/// installs a handler on it. 12 is free: the FADT says there is no 8042 for
/// a mouse, and 9 is a virtio line.
pub const SCI_IRQ: u32 = 12;
// An ISA line: what an OS using the 8259s can take.
const _: () = assert!(SCI_IRQ < 16);
/// GED event bit: the power button was pressed.
pub const EVENT_POWER_BUTTON: u8 = 1;
/// GED event bit: the VM generation ID changed (the guest was restored).
pub const EVENT_VMGENID: u8 = 2;
/// GED event bit: a PCI slot's hotplug registers changed
/// ([`super::hotplug`]).
pub const EVENT_PCI_HOTPLUG: u8 = 4;

const SLP_EN: u8 = 1 << 5;
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0x7 << SLP_TYP_SHIFT;

/// PM1a enable, low and high byte.
const PM1A_EN: u16 = PM1A_EVT + 2;
const PM1A_EN_HIGH: u16 = PM1A_EVT + 3;
/// PM1a control's high byte: SLP_TYP and SLP_EN, where the sleep control
/// register has them.
const PM1A_CNT_HIGH: u16 = PM1A_CNT + 1;
/// SCI_EN in PM1 control: the machine is in ACPI mode.
const SCI_EN: u8 = 1;

/// Saved state: events raised but not yet read by the guest, and the PM1
/// enable register (absent from images of older versions: 0).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcpiPmState {
    pub pending: u8,
    #[serde(default)]
    pub pm1_enable: u16,
}

/// The device.
pub struct AcpiPm {
    pending: AtomicU8,
    pm1_enable: [AtomicU8; 2],
    irq: EventFd,
    sink: RequestSink,
}

impl AcpiPm {
    pub fn new(irq: EventFd, sink: RequestSink, state: &AcpiPmState) -> Self {
        let [lo, hi] = state.pm1_enable.to_le_bytes();
        AcpiPm {
            pending: AtomicU8::new(state.pending),
            pm1_enable: [AtomicU8::new(lo), AtomicU8::new(hi)],
            irq,
            sink,
        }
    }

    pub fn save(&self) -> AcpiPmState {
        AcpiPmState {
            pending: self.pending.load(Ordering::SeqCst),
            pm1_enable: u16::from_le_bytes(
                self.pm1_enable.each_ref().map(|b| b.load(Ordering::SeqCst)),
            ),
        }
    }

    /// `system_powerdown`: raises the power-button event.
    pub fn press_power_button(&self) -> std::io::Result<()> {
        self.raise(EVENT_POWER_BUTTON)
    }

    /// Tells the guest its VM generation ID changed.
    pub fn notify_vmgenid(&self) -> std::io::Result<()> {
        self.raise(EVENT_VMGENID)
    }

    /// Tells the guest to look at the PCI hotplug registers.
    pub fn notify_pci_hotplug(&self) -> std::io::Result<()> {
        self.raise(EVENT_PCI_HOTPLUG)
    }

    fn raise(&self, event: u8) -> std::io::Result<()> {
        self.pending.fetch_or(event, Ordering::SeqCst);
        self.irq.write(1)
    }

    /// A guest `in` of `data.len()` bytes from `port` (a 16-bit register
    /// may be read whole or a byte at a time).
    pub fn read(&self, port: u16, data: &mut [u8]) {
        for (p, b) in (port..).zip(data.iter_mut()) {
            *b = self.read_byte(p);
        }
    }

    /// A guest `out` of `data` to `port` and the ports after it.
    pub fn write(&self, port: u16, data: &[u8]) {
        for (p, b) in (port..).zip(data) {
            self.write_byte(p, *b);
        }
    }

    fn read_byte(&self, port: u16) -> u8 {
        match port {
            GED_EVENT => self.pending.swap(0, Ordering::SeqCst),
            PM1A_EN | PM1A_EN_HIGH => {
                self.pm1_enable[usize::from(port - PM1A_EN)].load(Ordering::SeqCst)
            }
            PM1A_CNT => SCI_EN,
            _ => 0,
        }
    }

    fn write_byte(&self, port: u16, value: u8) {
        match port {
            SLEEP_CONTROL | PM1A_CNT_HIGH
                if value & SLP_EN != 0 && (value & SLP_TYP_MASK) >> SLP_TYP_SHIFT == S5_SLP_TYP =>
            {
                (self.sink)(DeviceRequest::PowerOff(0))
            }
            PM1A_EN | PM1A_EN_HIGH => {
                self.pm1_enable[usize::from(port - PM1A_EN)].store(value, Ordering::SeqCst)
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

    fn read1(dev: &AcpiPm, port: u16) -> u8 {
        let mut b = [0u8];
        dev.read(port, &mut b);
        b[0]
    }

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
        dev.write(SLEEP_CONTROL, &[3 << SLP_TYP_SHIFT | SLP_EN]); // S3: not supported, ignored
        dev.write(SLEEP_CONTROL, &[S5_SLP_TYP << SLP_TYP_SHIFT]); // no SLP_EN
        dev.write(SLEEP_STATUS, &[0x80]);
        assert!(seen.lock().unwrap().is_empty());
        dev.write(SLEEP_CONTROL, &[S5_SLP_TYP << SLP_TYP_SHIFT | SLP_EN]);
        assert_eq!(*seen.lock().unwrap(), vec![DeviceRequest::PowerOff(0)]);
    }

    #[test]
    fn reset_register_resets() {
        let (dev, seen, _) = device();
        dev.write(RESET, &[0]);
        dev.write(RESET, &[RESET_VALUE]);
        assert_eq!(*seen.lock().unwrap(), vec![DeviceRequest::Reset]);
    }

    #[test]
    fn power_button_raises_the_interrupt_and_the_read_clears_the_event() {
        let (dev, _, irq) = device();
        assert_eq!(read1(&dev, GED_EVENT), 0);
        dev.press_power_button().unwrap();
        assert_eq!(irq.read().unwrap(), 1, "interrupt raised");
        assert_eq!(dev.save().pending, EVENT_POWER_BUTTON);
        assert_eq!(read1(&dev, GED_EVENT), EVENT_POWER_BUTTON);
        assert_eq!(read1(&dev, GED_EVENT), 0, "read clears");
        // A pending event survives a save and restore.
        dev.press_power_button().unwrap();
        let restored = AcpiPm::new(EventFd::new(0).unwrap(), Box::new(|_| {}), &dev.save());
        assert_eq!(read1(&restored, GED_EVENT), EVENT_POWER_BUTTON);
    }

    /// The PM1 blocks a full-ACPI OS drives: a 16-bit write of SLP_TYP = S5
    /// with SLP_EN to PM1 control powers off, SCI_EN reads set, the enable
    /// register keeps what was written (and survives a save), status reads 0.
    #[test]
    fn pm1_control_powers_off_and_enable_is_kept() {
        let (dev, seen, _) = device();
        let mut w = [0u8; 2];
        dev.read(PM1A_CNT, &mut w);
        assert_eq!(u16::from_le_bytes(w) & 1, 1, "SCI_EN");
        dev.write(PM1A_EVT + 2, &0x0120u16.to_le_bytes());
        let mut e = [0u8; 4];
        dev.read(PM1A_EVT, &mut e);
        assert_eq!(e, [0, 0, 0x20, 0x01]);
        let restored = AcpiPm::new(EventFd::new(0).unwrap(), Box::new(|_| {}), &dev.save());
        restored.read(PM1A_EVT, &mut e);
        assert_eq!(e, [0, 0, 0x20, 0x01]);
        // S3 with SLP_EN, then S5 without: nothing.
        dev.write(PM1A_CNT, &(3u16 << 10 | 1 << 13).to_le_bytes());
        dev.write(PM1A_CNT, &(u16::from(S5_SLP_TYP) << 10).to_le_bytes());
        assert!(seen.lock().unwrap().is_empty());
        dev.write(
            PM1A_CNT,
            &(u16::from(S5_SLP_TYP) << 10 | 1 << 13 | 1).to_le_bytes(),
        );
        assert_eq!(*seen.lock().unwrap(), vec![DeviceRequest::PowerOff(0)]);
    }
}
