//! QEMU's `pc-testdev` (hw/misc/pc-testdev.c), as kvm-unit-tests uses it: the I/O register,
//! with which `realmode` checks port I/O of each width (four bytes at port 0xe0 that read back
//! what was last written, byte lane by byte lane), and the MMIO area at
//! [`PC_TESTDEV_IOMEM_START`] that behaves as 64 KiB of memory, which `emulator`, `lam` and
//! `cmpxchg8b` access to have KVM emulate instructions on MMIO ([`PcTestdevIomem`]).
//! (pc-testdev's IRQ lines at 0x2000 and page-flush port at 0xe4 are not modelled.)

use crate::devices::bus::BusDevice;

pub use crate::arch::x86_64::layout::{PC_TESTDEV_IOMEM_SIZE, PC_TESTDEV_IOMEM_START};

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

/// The MMIO area: reads return what was written there, at any width.
pub struct PcTestdevIomem {
    data: Box<[u8; PC_TESTDEV_IOMEM_SIZE as usize]>,
}

impl Default for PcTestdevIomem {
    fn default() -> Self {
        Self {
            data: Box::new([0; PC_TESTDEV_IOMEM_SIZE as usize]),
        }
    }
}

impl BusDevice for PcTestdevIomem {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|at| self.data.get(at as usize))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            let at = offset.checked_add(i as u64);
            if let Some(byte) = at.and_then(|at| self.data.get_mut(at as usize)) {
                *byte = *b;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mmio_area_reads_back_what_was_written_at_any_width() {
        let mut m = PcTestdevIomem::default();
        let base = PC_TESTDEV_IOMEM_START;
        m.write(base, 0x100, &0x0123_4567_89ab_cdefu64.to_le_bytes());
        let mut q = [0u8; 8];
        m.read(base, 0x100, &mut q);
        assert_eq!(u64::from_le_bytes(q), 0x0123_4567_89ab_cdef);
        let mut w = [0u8; 2];
        m.read(base, 0x102, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x89ab);
        m.write(base, 0x101, &[0xee]);
        m.read(base, 0x100, &mut q);
        assert_eq!(u64::from_le_bytes(q), 0x0123_4567_89ab_eeef);
        // An access running past the end keeps to the area.
        m.write(base, PC_TESTDEV_IOMEM_SIZE - 2, &[1, 2, 3, 4]);
        let mut tail = [0xaa; 4];
        m.read(base, PC_TESTDEV_IOMEM_SIZE - 2, &mut tail);
        assert_eq!(tail, [1, 2, 0, 0]);
        m.read(base, u64::MAX, &mut tail);
        assert_eq!(tail, [0; 4]);
    }

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
