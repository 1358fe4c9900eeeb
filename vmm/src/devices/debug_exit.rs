//! QEMU's isa-debug-exit device as kvm-unit-tests configures it (`-device
//! isa-debug-exit,iobase=0xf4,iosize=0x4`): a write of `value` ends the VM, and the VMM exits
//! with status `(value << 1) | 1`, so a guest can report success (status 1 for value 0) in a
//! way no VMM failure produces. Reads return 0.

use crate::devices::bus::BusDevice;
use crate::exit::{ExitHandle, VmExit};

/// The port (the iobase kvm-unit-tests passes).
pub const DEBUG_EXIT_PORT: u64 = 0xf4;
/// Four bytes (iosize=0x4): 1-, 2- and 4-byte writes all count.
pub const DEBUG_EXIT_LEN: u64 = 4;

/// The device.
pub struct DebugExit {
    exit: ExitHandle,
}

impl DebugExit {
    /// A device ending the VM through `exit`.
    pub fn new(exit: ExitHandle) -> Self {
        Self { exit }
    }
}

impl BusDevice for DebugExit {
    fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _base: u64, _offset: u64, data: &[u8]) {
        // Little-endian, as wide as the access (QEMU takes the value the access carries).
        let value = data
            .iter()
            .take(4)
            .rev()
            .fold(0u32, |v, &b| (v << 8) | u32::from(b));
        self.exit.request(VmExit::DebugExit { value });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(data: &[u8]) -> VmExit {
        let exit = ExitHandle::new().unwrap();
        let mut dev = DebugExit::new(exit.clone());
        let mut b = [0xff; 4];
        dev.read(DEBUG_EXIT_PORT, 0, &mut b);
        assert_eq!(b, [0; 4]);
        assert_eq!(exit.reason(), None, "a read ends nothing");
        dev.write(DEBUG_EXIT_PORT, 0, data);
        exit.reason().unwrap()
    }

    #[test]
    fn writes_end_the_vm_with_qemus_status() {
        // kvm-unit-tests' exit(0): `outl(0, 0xf4)`, a pass.
        let e = write(&[0, 0, 0, 0]);
        assert_eq!(e, VmExit::DebugExit { value: 0 });
        assert_eq!(e.exit_code(), 1);
        // exit(1) from realmode's `outb`: status 3, a failure.
        assert_eq!(write(&[1]).exit_code(), 3);
        // The process status keeps the low 8 bits, as exit(3) does in QEMU.
        assert_eq!(write(&[0x80, 0]).exit_code(), 1);
        assert_eq!(
            write(&0x1234_5678u32.to_le_bytes()),
            VmExit::DebugExit { value: 0x1234_5678 }
        );
        assert_eq!(write(&[0x7f]).exit_code(), 0xff);
    }
}
