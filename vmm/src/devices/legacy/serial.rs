//! COM1: a 16550A UART (vm-superio) on I/O ports 0x3f8..0x400, IRQ 4, with the guest's output
//! going to a writer (stdout) and stdin fed in through an event-manager subscriber.

use std::io::{Read, Write};
use std::os::unix::io::AsRawFd;
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::bus::BusDevice;

/// COM1 base port (the PC/AT standard assignment).
pub const COM1_PORT: u64 = 0x3f8;
/// Eight UART registers.
pub const COM1_LEN: u64 = 8;
/// COM1's ISA IRQ.
pub const COM1_IRQ: u32 = 4;

/// Raises the serial interrupt by writing an eventfd registered as a KVM irqfd.
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// The serial device as seen from the I/O bus.
pub struct SerialDevice {
    uart: Serial<EventFdTrigger, NoEvents, Box<dyn Write + Send>>,
}

impl SerialDevice {
    /// A UART writing the guest's output to `out`, interrupting through `irq`.
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> Self {
        Self {
            uart: Serial::new(EventFdTrigger(irq), out),
        }
    }

    /// Queues host input for the guest; returns how many bytes fit in the receive FIFO.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        match self.uart.enqueue_raw_bytes(bytes) {
            Ok(n) => n,
            Err(e) => {
                log::debug!("serial input dropped: {e:?}");
                0
            }
        }
    }

    /// Room left in the receive FIFO.
    pub fn input_capacity(&self) -> usize {
        self.uart.fifo_capacity()
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let (Some(first), Ok(off)) = (data.first_mut(), u8::try_from(offset)) {
            *first = self.uart.read(off);
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if let (Some(&byte), Ok(off)) = (data.first(), u8::try_from(offset)) {
            if let Err(e) = self.uart.write(off, byte) {
                log::warn!("serial write at offset {off} failed: {e:?}");
            }
        }
    }
}

/// A pollable host stream that can feed the UART: stdin, a pipe.
pub trait InputSource: Read + AsRawFd + Send {}
impl<T: Read + AsRawFd + Send> InputSource for T {}

/// Feeds a host input stream (stdin) into the UART.
pub struct SerialInput {
    input: Box<dyn InputSource>,
    serial: Arc<Mutex<SerialDevice>>,
}

impl SerialInput {
    /// A subscriber moving bytes from `input` to `serial`.
    pub fn new(input: Box<dyn InputSource>, serial: Arc<Mutex<SerialDevice>>) -> Self {
        Self { input, serial }
    }
}

impl MutEventSubscriber for SerialInput {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let mut serial = self.serial.lock().unwrap_or_else(|e| e.into_inner());
        let room = serial.input_capacity();
        if room == 0 {
            // The guest has not drained the FIFO yet; leave the bytes in the input for later.
            drop(serial);
            std::thread::sleep(std::time::Duration::from_millis(1));
            return;
        }
        let mut buf = [0u8; 64];
        let n = room.min(buf.len());
        match self.input.read(&mut buf[..n]) {
            Ok(0) => {
                // End of input: stop polling it so the loop does not spin.
                if let Err(e) = ops.remove(events) {
                    log::warn!("cannot stop polling serial input: {e:?}");
                }
            }
            Ok(n) => {
                serial.enqueue_input(&buf[..n]);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                log::warn!("serial input read failed: {e}; input closed");
                let _ = ops.remove(events);
            }
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        // A regular file or /dev/null as stdin cannot be polled (EPERM): no guest input then.
        if let Err(e) = ops.add(Events::new_raw(self.input.as_raw_fd(), EventSet::IN)) {
            log::info!("serial input disabled, the input cannot be polled: {e:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn output_input_and_interrupt() {
        let out = Shared::default();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = SerialDevice::new(irq.try_clone().unwrap(), Box::new(out.clone()));
        for b in b"hi" {
            dev.write(COM1_PORT, 0, &[*b]);
        }
        assert_eq!(&*out.0.lock().unwrap(), b"hi");
        // Enable the received-data interrupt (IER bit 0), then feed input.
        dev.write(COM1_PORT, 1, &[1]);
        assert_eq!(dev.enqueue_input(b"ok"), 2);
        assert!(irq.read().unwrap() >= 1);
        let mut lsr = [0u8];
        dev.read(COM1_PORT, 5, &mut lsr);
        assert_eq!(lsr[0] & 1, 1, "LSR data ready");
        let mut c = [0u8];
        dev.read(COM1_PORT, 0, &mut c);
        assert_eq!(c[0], b'o');
    }
}
