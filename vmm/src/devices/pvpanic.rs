//! QEMU's pvpanic device (docs/specs/pvpanic.rst) at I/O port 0x505, described in the DSDT as
//! "QEMU0001". The guest reads the supported events and writes the event that happened.

use crate::devices::bus::BusDevice;
use crate::exit::{ExitHandle, VmExit};

/// The I/O port (QEMU's default `ioport` property).
pub const PVPANIC_PORT: u64 = 0x505;
/// One byte wide.
pub const PVPANIC_LEN: u64 = 1;
/// Event bit 0: the guest panicked.
pub const PVPANIC_PANICKED: u8 = 1 << 0;
/// Event bit 1: the guest loaded a crash kernel (kdump); not an exit for us.
pub const PVPANIC_CRASH_LOADED: u8 = 1 << 1;

/// The device.
pub struct PvPanic {
    exit: ExitHandle,
}

impl PvPanic {
    /// A pvpanic device reporting panics through `exit`.
    pub fn new(exit: ExitHandle) -> Self {
        Self { exit }
    }
}

impl BusDevice for PvPanic {
    fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        // Linux's driver ANDs its events with what this read advertises.
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = PVPANIC_PANICKED | PVPANIC_CRASH_LOADED;
        }
    }

    fn write(&mut self, _base: u64, _offset: u64, data: &[u8]) {
        let event = data.first().copied().unwrap_or(0);
        if event & PVPANIC_PANICKED != 0 {
            self.exit.request(VmExit::GuestPanic);
        } else if event & PVPANIC_CRASH_LOADED != 0 {
            vm_device::info_limited!("guest reports a crash kernel loaded");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advertises_and_reports_panic() {
        let exit = ExitHandle::new().unwrap();
        let mut dev = PvPanic::new(exit.clone());
        let mut b = [0u8];
        dev.read(PVPANIC_PORT, 0, &mut b);
        assert_eq!(b[0], 3);
        dev.write(PVPANIC_PORT, 0, &[PVPANIC_CRASH_LOADED]);
        assert_eq!(exit.reason(), None);
        dev.write(PVPANIC_PORT, 0, &[PVPANIC_PANICKED]);
        assert_eq!(exit.reason(), Some(VmExit::GuestPanic));
    }
}
