//! A minimal i8042 keyboard controller: enough for the guest's "pulse reset line" command.

use crate::devices::bus::BusDevice;
use crate::exit::{ExitHandle, VmExit};

/// Data port.
pub const I8042_DATA_PORT: u64 = 0x60;
/// Ports 0x60..=0x64 (0x61 is the PC speaker/NMI port, answered here too).
pub const I8042_LEN: u64 = 5;
/// Offset of the command/status port (0x64) from 0x60.
const COMMAND_OFFSET: u64 = 4;
/// Command 0xfe pulses the CPU reset line (IBM PC/AT Technical Reference, 8042 commands).
const CMD_RESET_CPU: u8 = 0xfe;

/// The controller.
pub struct I8042 {
    exit: ExitHandle,
}

impl I8042 {
    /// A controller that turns a reset command into a VM exit.
    pub fn new(exit: ExitHandle) -> Self {
        Self { exit }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        // Status 0: output buffer empty, input buffer empty; the guest never waits on us.
        data.fill(0);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if offset == COMMAND_OFFSET && data.first() == Some(&CMD_RESET_CPU) {
            self.exit.request(VmExit::Reboot {
                cause: "i8042 reset",
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command() {
        let exit = ExitHandle::new().unwrap();
        let mut dev = I8042::new(exit.clone());
        dev.write(0x60, 0, &[0xfe]);
        assert_eq!(
            exit.reason(),
            None,
            "0xfe on the data port is not a command"
        );
        dev.write(0x60, 4, &[0xfe]);
        assert_eq!(
            exit.reason(),
            Some(VmExit::Reboot {
                cause: "i8042 reset"
            })
        );
    }
}
