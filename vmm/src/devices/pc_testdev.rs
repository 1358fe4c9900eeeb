//! The I/O register of QEMU's `pc-testdev` (hw/misc/pc-testdev.c), which kvm-unit-tests'
//! `realmode` test uses to check port I/O of each width: four bytes at port 0xe0 that read back
//! what was last written, byte lane by byte lane. (pc-testdev's IRQ lines at 0x2000, page-flush
//! port at 0xe4 and MMIO area are not modelled: no test on the PASS list needs them.)

use crate::devices::bus::BusDevice;

/// The port.
pub const PC_TESTDEV_PORT: u64 = 0xe0;
/// Four bytes.
pub const PC_TESTDEV_LEN: u64 = 4;

/// The register.
#[derive(Debug, Default)]
pub struct PcTestdev {
    data: [u8; PC_TESTDEV_LEN as usize],
}

impl BusDevice for PcTestdev {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.data.get(offset as usize + i).copied().unwrap_or(0);
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            if let Some(lane) = self.data.get_mut(offset as usize + i) {
                *lane = *b;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(d: &mut PcTestdev, offset: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0xaa; len];
        d.read(PC_TESTDEV_PORT, offset, &mut b);
        b
    }

    #[test]
    fn each_width_reads_back_its_lanes() {
        let mut d = PcTestdev::default();
        assert_eq!(read(&mut d, 0, 4), [0; 4]);
        // realmode's "pio 1..3": out of 0xff, 0xffff, 0xffffffff, each read back.
        d.write(PC_TESTDEV_PORT, 0, &[0x12, 0x34, 0x56, 0x78]);
        d.write(PC_TESTDEV_PORT, 0, &[0xff]);
        assert_eq!(read(&mut d, 0, 1), [0xff]);
        assert_eq!(
            read(&mut d, 0, 4),
            [0xff, 0x34, 0x56, 0x78],
            "other lanes stay"
        );
        d.write(PC_TESTDEV_PORT, 2, &[0xab, 0xcd]);
        assert_eq!(read(&mut d, 2, 2), [0xab, 0xcd]);
        assert_eq!(read(&mut d, 0, 4), [0xff, 0x34, 0xab, 0xcd]);
    }
}
