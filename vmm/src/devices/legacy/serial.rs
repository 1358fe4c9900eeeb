//! COM1: a 16550A UART (vm-superio) on I/O ports 0x3f8..0x400, IRQ 4, with the guest's output
//! going to a writer (stdout) and stdin fed in through an event-manager subscriber.

use std::io::{Read, Write};
use std::os::unix::io::AsRawFd;
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vm_superio::serial::SerialEvents;
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

/// Signals an eventfd when the guest has read the last byte of the receive FIFO, so input
/// paused on a full FIFO resumes (Firecracker's scheme).
pub struct InputDrained(EventFd);

impl SerialEvents for InputDrained {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        if let Err(e) = self.0.write(1) {
            vm_device::warn_limited!("cannot signal serial input room: {e}");
        }
    }
}

/// The serial device as seen from the I/O bus.
pub struct SerialDevice {
    uart: Serial<EventFdTrigger, InputDrained, Box<dyn Write + Send>>,
    drained: EventFd,
}

impl SerialDevice {
    /// A UART writing the guest's output to `out`, interrupting through `irq`.
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> std::io::Result<Self> {
        let drained = EventFd::new(libc::EFD_NONBLOCK)?;
        Ok(Self {
            uart: Serial::with_events(EventFdTrigger(irq), InputDrained(drained.try_clone()?), out),
            drained,
        })
    }

    /// An eventfd readable once the guest has emptied the receive FIFO.
    pub fn input_drained_event(&self) -> std::io::Result<EventFd> {
        self.drained.try_clone()
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
                vm_device::warn_limited!("serial write at offset {off} failed: {e:?}");
            }
        }
    }
}

/// A pollable host stream that can feed the UART: stdin, a pipe.
pub trait InputSource: Read + AsRawFd + Send {}
impl<T: Read + AsRawFd + Send> InputSource for T {}

/// Feeds a host input stream (stdin) into the UART. While the receive FIFO is full it stops
/// polling the input and waits for the guest to drain the FIFO.
pub struct SerialInput {
    input: Box<dyn InputSource>,
    serial: Arc<Mutex<SerialDevice>>,
    drained: EventFd,
    paused: bool,
}

impl SerialInput {
    /// A subscriber moving bytes from `input` to `serial`.
    pub fn new(
        input: Box<dyn InputSource>,
        serial: Arc<Mutex<SerialDevice>>,
    ) -> std::io::Result<Self> {
        let drained = serial
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .input_drained_event()?;
        Ok(Self {
            input,
            serial,
            drained,
            paused: false,
        })
    }

    fn input_events(&self) -> Events {
        Events::new_raw(self.input.as_raw_fd(), EventSet::IN)
    }

    fn stop_polling_input(&mut self, ops: &mut EventOps, why: &str) {
        if let Err(e) = ops.remove(self.input_events()) {
            log::warn!("cannot stop polling serial input ({why}): {e:?}");
        }
    }

    fn on_input(&mut self, ops: &mut EventOps) {
        let mut serial = self.serial.lock().unwrap_or_else(|e| e.into_inner());
        let room = serial.input_capacity();
        if room == 0 {
            drop(serial);
            self.stop_polling_input(ops, "receive FIFO full");
            self.paused = true;
            return;
        }
        let mut buf = [0u8; 64];
        let n = room.min(buf.len());
        match self.input.read(&mut buf[..n]) {
            Ok(0) => {
                drop(serial);
                // End of input: stop polling it so the loop does not spin.
                self.stop_polling_input(ops, "end of input");
            }
            Ok(n) => {
                serial.enqueue_input(&buf[..n]);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                drop(serial);
                log::warn!("serial input read failed: {e}; input closed");
                self.stop_polling_input(ops, "read error");
            }
        }
    }
}

impl MutEventSubscriber for SerialInput {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() == self.drained.as_raw_fd() {
            let _ = self.drained.read();
            if self.paused {
                self.paused = false;
                if let Err(e) = ops.add(self.input_events()) {
                    log::warn!("cannot resume polling serial input: {e:?}");
                }
            }
            return;
        }
        self.on_input(ops);
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.drained, EventSet::IN)) {
            log::warn!("cannot poll the serial FIFO-drained event: {e:?}");
        }
        // A regular file or /dev/null as stdin cannot be polled (EPERM): no guest input then.
        if let Err(e) = ops.add(self.input_events()) {
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
        let mut dev = SerialDevice::new(irq.try_clone().unwrap(), Box::new(out.clone())).unwrap();
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
