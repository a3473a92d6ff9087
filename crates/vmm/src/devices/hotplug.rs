//! ACPI PCI hotplug on bus 0, for one use: **re-plugging** a virtio-pci
//! device so that the guest's driver probes it again. Linux's virtio-net
//! driver reads the MAC only when it probes; a clone restored with its own
//! MAC (`--net …,mac=`) would otherwise keep answering with the image's.
//!
//! The protocol is the one stock kernels drive through `acpiphp` (QEMU's
//! PIIX4 hotplug has the same shape): each re-pluggable slot is a DSDT
//! device under `\_SB.PCI0` with `_ADR` and `_EJ0`; the Generic Event
//! Device's event [`super::acpi::EVENT_PCI_HOTPLUG`] runs `PCNT`, which reads
//! the two bitmaps below and notifies each slot named there.
//!
//! | port | register | |
//! |---|---|---|
//! | 0xae00 | up (u32) | slots the guest should scan (device check); cleared by the read |
//! | 0xae04 | down (u32) | slots the guest is asked to eject (eject request); cleared by the read |
//! | 0xae08 | eject (u32) | `_EJ0` writes the slot's bit: the guest let the device go |
//!
//! Bit *n* is PCI device *n* (00:*n*.0). A re-plug: [`PciHotplug::request`]
//! sets the slot's down bit (the caller raises the GED event) → the guest
//! removes its driver and writes the eject bit → [`PciHotplug::eject`] hands
//! the slot back to the caller, which puts the device in its power-on state
//! (the new MAC stays), and sets the up bit → the guest scans the slot and
//! probes a fresh device. An eject the host did not ask for changes nothing:
//! the device stays where it is and a guest rescan finds it again.

use std::sync::atomic::{AtomicU32, Ordering};

use serde::{Deserialize, Serialize};

/// First port; the registers are 32 bits each.
pub const BASE: u16 = 0xae00;
pub const UP: u16 = BASE;
pub const DOWN: u16 = BASE + 4;
pub const EJECT: u16 = BASE + 8;
pub const LAST: u16 = EJECT + 3;

/// Saved state: a re-plug the guest has not finished yet (absent from
/// older images: none).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciHotplugState {
    pub up: u32,
    pub down: u32,
    /// Slots asked to eject whose `_EJ0` has not come yet.
    pub ejecting: u32,
}

/// The registers; lock-free, as the other port devices.
#[derive(Debug, Default)]
pub struct PciHotplug {
    up: AtomicU32,
    down: AtomicU32,
    ejecting: AtomicU32,
}

impl PciHotplug {
    pub fn new(st: &PciHotplugState) -> PciHotplug {
        PciHotplug {
            up: AtomicU32::new(st.up),
            down: AtomicU32::new(st.down),
            ejecting: AtomicU32::new(st.ejecting),
        }
    }

    pub fn save(&self) -> PciHotplugState {
        PciHotplugState {
            up: self.up.load(Ordering::SeqCst),
            down: self.down.load(Ordering::SeqCst),
            ejecting: self.ejecting.load(Ordering::SeqCst),
        }
    }

    /// Asks the guest to eject PCI device `slot` (1–31); the caller raises
    /// the GED event.
    pub fn request(&self, slot: u8) {
        assert!((1..32).contains(&slot), "PCI device {slot} on bus 0");
        let bit = 1u32 << slot;
        self.ejecting.fetch_or(bit, Ordering::SeqCst);
        self.down.fetch_or(bit, Ordering::SeqCst);
    }

    /// Slots whose re-plug the guest has not finished.
    pub fn in_progress(&self) -> u32 {
        self.ejecting.load(Ordering::SeqCst)
    }

    /// The caller put the devices of `slots` in their power-on state: the
    /// guest is told to scan them (the caller raises the GED event).
    pub fn inserted(&self, slots: u32) {
        self.up.fetch_or(slots, Ordering::SeqCst);
    }

    /// A guest `in` (whole registers only; anything else reads as ones).
    pub fn read(&self, port: u16, data: &mut [u8]) {
        data.fill(0xff);
        if data.len() != 4 {
            return;
        }
        let v = match port {
            UP => self.up.swap(0, Ordering::SeqCst),
            DOWN => self.down.swap(0, Ordering::SeqCst),
            _ => return,
        };
        data.copy_from_slice(&v.to_le_bytes());
    }

    /// A guest `out`: returns the slots the guest ejected that were asked
    /// to (the caller re-plugs them); any other bit is ignored.
    pub fn eject(&self, port: u16, data: &[u8]) -> u32 {
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return 0;
        };
        if port != EJECT {
            return 0;
        }
        let bits = u32::from_le_bytes(bytes);
        self.ejecting.fetch_and(!bits, Ordering::SeqCst) & bits
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(h: &PciHotplug, port: u16) -> u32 {
        let mut b = [0u8; 4];
        h.read(port, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn a_replug_goes_eject_request_then_eject_then_device_check() {
        let h = PciHotplug::default();
        assert_eq!((read(&h, UP), read(&h, DOWN)), (0, 0));
        h.request(3);
        assert_eq!(h.in_progress(), 1 << 3);
        assert_eq!(read(&h, DOWN), 1 << 3);
        assert_eq!(read(&h, DOWN), 0, "the read clears it");
        // Half a register, or another port, is not an eject.
        assert_eq!(h.eject(EJECT, &[8, 0]), 0);
        assert_eq!(h.eject(UP, &8u32.to_le_bytes()), 0);
        // The guest ejects slots 2 and 3: only 3 was asked for.
        assert_eq!(h.eject(EJECT, &0b1100u32.to_le_bytes()), 1 << 3);
        assert_eq!(h.in_progress(), 0);
        assert_eq!(
            h.eject(EJECT, &8u32.to_le_bytes()),
            0,
            "a second eject is not a second re-plug"
        );
        h.inserted(1 << 3);
        assert_eq!(read(&h, UP), 1 << 3);
        assert_eq!(read(&h, UP), 0);
        let mut b = [0u8; 2];
        h.read(UP, &mut b);
        assert_eq!(b, [0xff, 0xff], "a partial read");
    }

    #[test]
    fn an_unfinished_replug_survives_a_save() {
        let h = PciHotplug::default();
        h.request(2);
        let st = h.save();
        assert_eq!(
            st,
            PciHotplugState {
                up: 0,
                down: 4,
                ejecting: 4
            }
        );
        let r = PciHotplug::new(&st);
        assert_eq!(read(&r, DOWN), 4);
        assert_eq!(r.eject(EJECT, &4u32.to_le_bytes()), 4);
    }
}
