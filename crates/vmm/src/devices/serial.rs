//! 16550A UART at 0x3f8 (COM1), IRQ 4, output to a writer. Wraps vm-superio's
//! register model; its interrupt is an eventfd registered as KVM irqfd for GSI 4.

use std::io::Write;

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState as SuperioState};
use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

/// First port.
pub const BASE: u16 = 0x3f8;
/// Last port.
pub const LAST: u16 = 0x3ff;
/// ISA IRQ line.
pub const IRQ: u32 = 4;

/// Interrupt line of the UART: an eventfd KVM turns into GSI 4.
pub struct IrqLine(pub EventFd);

impl Trigger for IrqLine {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Where serial output goes.
pub type Output = Box<dyn Write + Send>;

/// The COM1 device.
pub struct Serial {
    dev: vm_superio::Serial<IrqLine, NoEvents, Output>,
}

/// Saved state: every UART register and the receive FIFO.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

impl Serial {
    pub fn new(irq: EventFd, out: Output) -> Self {
        Serial {
            dev: vm_superio::Serial::new(IrqLine(irq), out),
        }
    }

    /// Rebuilds the device from saved state (a restore).
    pub fn restore(irq: EventFd, out: Output, s: &SerialState) -> std::io::Result<Self> {
        let st = SuperioState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        };
        let dev = vm_superio::Serial::from_state(&st, IrqLine(irq), NoEvents, out)
            .map_err(|e| std::io::Error::other(format!("{e:?}")))?;
        Ok(Serial { dev })
    }

    pub fn save(&self) -> SerialState {
        let s = self.dev.state();
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    pub fn read(&mut self, offset: u8) -> u8 {
        self.dev.read(offset)
    }

    pub fn write(&mut self, offset: u8, value: u8) {
        // Output errors (a closed terminal) must not stop the guest.
        let _ = self.dev.write(offset, value);
        if offset == 0 && value == b'\n' {
            let _ = self.dev.writer_mut().flush();
        }
    }

    /// Queues console input for the guest; returns how many bytes fit in the
    /// receive FIFO (0 when it is full: try again once the guest has read).
    pub fn input(&mut self, bytes: &[u8]) -> usize {
        self.dev.enqueue_raw_bytes(bytes).unwrap_or(0)
    }

    /// Flushes buffered output.
    pub fn flush(&mut self) {
        let _ = self.dev.writer_mut().flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn output_and_state_round_trip() {
        let sink = Sink::default();
        let mut s = Serial::new(EventFd::new(0).unwrap(), Box::new(sink.clone()));
        for b in b"hi\n" {
            s.write(0, *b);
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"hi\n");
        s.write(7, 0x5a); // scratch register
        s.write(3, 0x03); // line control: 8N1
        let st = s.save();
        let mut r =
            Serial::restore(EventFd::new(0).unwrap(), Box::new(Sink::default()), &st).unwrap();
        assert_eq!(r.save(), st);
        assert_eq!(r.read(7), 0x5a);
    }

    #[test]
    fn input_fills_the_fifo_and_the_guest_reads_it() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut s = Serial::new(irq.try_clone().unwrap(), Box::new(Sink::default()));
        s.write(1, 0x01); // IER: received-data interrupt on
        assert_eq!(s.input(b"ls\n"), 3);
        assert!(irq.read().unwrap() >= 1, "interrupt raised");
        assert_ne!(s.read(5) & 1, 0, "LSR: data ready");
        assert_eq!([s.read(0), s.read(0), s.read(0)], *b"ls\n");
        assert_eq!(s.read(5) & 1, 0, "FIFO drained");
        let big = [b'x'; 200];
        let n = s.input(&big);
        assert!(n > 0 && n < big.len(), "the FIFO takes part: {n}");
        assert_eq!(s.input(&big), 0, "full");
    }
}
