//! The MSI capability, emulated (PCI Local Bus 3.0, 6.8.1).
//!
//! The guest's writes land in our copy and never reach the device: VFIO programs the device's
//! own MSI registers when we enable MSI through VFIO_DEVICE_SET_IRQS, and the message the
//! guest chose becomes the KVM route behind each vector's eventfd.

use vm_device::interrupt::MsiMessage;
use vm_device::pci::configuration::merge_bytes;
use vm_device::pci::spec::*;

/// What the interrupt side must do after a guest write to the capability.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MsiUpdate {
    /// Nothing changed that matters.
    None,
    /// Enable `vectors` vectors (or change their number): route each, then unmask as `masked` says.
    Enable { vectors: usize },
    /// Turn MSI off.
    Disable,
    /// Messages or masks changed while enabled: re-route / re-mask.
    Reprogram,
}

/// The emulated MSI capability at `offset` in config space.
#[derive(Clone, Debug)]
pub struct MsiCap {
    offset: usize,
    control: u16,
    address: u64,
    data: u16,
    mask: u32,
}

impl MsiCap {
    /// The capability at `offset` whose control word the device reports as `control`.
    pub fn new(offset: usize, control: u16) -> Self {
        // Keep the capability bits (64-bit, per-vector mask, multiple message capable);
        // start disabled with one message enabled.
        let control = control & (PCI_MSI_FLAGS_64BIT | PCI_MSI_FLAGS_MASKBIT | PCI_MSI_FLAGS_QMASK);
        Self {
            offset,
            control,
            address: 0,
            data: 0,
            mask: 0,
        }
    }

    pub fn offset(&self) -> usize {
        self.offset
    }

    fn is_64bit(&self) -> bool {
        self.control & PCI_MSI_FLAGS_64BIT != 0
    }

    fn has_mask(&self) -> bool {
        self.control & PCI_MSI_FLAGS_MASKBIT != 0
    }

    /// Bytes of config space the capability spans.
    pub fn len(&self) -> usize {
        let base = if self.is_64bit() { 14 } else { 10 };
        if self.has_mask() {
            base + 10
        } else {
            base
        }
    }

    /// Never empty; for clippy's `len` convention.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Whether config byte `off` lies in the capability.
    pub fn contains(&self, off: usize) -> bool {
        off >= self.offset && off < self.offset + self.len()
    }

    fn data_off(&self) -> usize {
        if self.is_64bit() {
            12
        } else {
            8
        }
    }

    fn mask_off(&self) -> usize {
        self.data_off() + 4
    }

    pub fn enabled(&self) -> bool {
        self.control & PCI_MSI_FLAGS_ENABLE != 0
    }

    /// Vectors the device can do (multiple message capable, a power of two up to 32).
    pub fn capable(&self) -> usize {
        1 << ((self.control & PCI_MSI_FLAGS_QMASK) >> 1).min(5)
    }

    /// Vectors the guest enabled (multiple message enable).
    pub fn vectors(&self) -> usize {
        1 << ((self.control & PCI_MSI_FLAGS_QSIZE) >> 4)
    }

    /// The message of vector `i`: multiple messages differ in the low data bits (6.8.3.4).
    pub fn message(&self, i: usize) -> MsiMessage {
        let n = self.vectors() as u32;
        let data = u32::from(self.data) & !(n - 1) | (i as u32 & (n - 1));
        MsiMessage {
            address: if self.is_64bit() {
                self.address
            } else {
                self.address & 0xffff_ffff
            },
            data,
        }
    }

    /// Whether vector `i` is masked by the per-vector mask bits.
    pub fn masked(&self, i: usize) -> bool {
        self.has_mask() && i < 32 && self.mask & (1 << i) != 0
    }

    /// The dword at capability-relative dword offset `rel` (a multiple of 4).
    fn dword(&self, rel: usize, header: u16) -> u32 {
        match rel {
            0 => u32::from(header) | u32::from(self.control) << 16,
            4 => self.address as u32,
            8 if self.is_64bit() => (self.address >> 32) as u32,
            r if r == self.data_off() => u32::from(self.data),
            r if self.has_mask() && r == self.mask_off() => self.mask,
            // Pending bits: VFIO does not report them; none pending.
            _ => 0,
        }
    }

    /// Reads the config dword at `reg_off` (4-aligned, inside the capability); `header` is
    /// the capability ID and next pointer as the device reports them.
    pub fn read(&self, reg_off: usize, header: u16) -> u32 {
        self.dword(reg_off - self.offset, header)
    }

    /// Guest write of `data` at config byte `off` (within one dword). Returns what the
    /// interrupt side must do.
    pub fn write(&mut self, off: usize, data: &[u8]) -> MsiUpdate {
        let Some(rel) = off.checked_sub(self.offset) else {
            return MsiUpdate::None;
        };
        let dw = rel & !3;
        let old = self.dword(dw, 0);
        let value = merge_bytes(old, rel & 3, data);
        let (was_enabled, old_vectors) = (self.enabled(), self.vectors());
        let before = (self.address, self.data, self.mask);
        match dw {
            0 => {
                let ctl = (value >> 16) as u16;
                let writable = PCI_MSI_FLAGS_ENABLE | PCI_MSI_FLAGS_QSIZE;
                let mut new = (self.control & !writable) | (ctl & writable);
                // Multiple message enable above what the device can do: real devices keep
                // the field within capability; clamp and log.
                let asked = 1usize << ((new & PCI_MSI_FLAGS_QSIZE) >> 4);
                if asked > self.capable() {
                    vm_device::warn_limited!(
                        "MSI: guest enabled {asked} vectors, device has {}; using {}",
                        self.capable(),
                        self.capable()
                    );
                    let qsize = (self.capable().trailing_zeros() as u16) << 4;
                    new = (new & !PCI_MSI_FLAGS_QSIZE) | qsize;
                }
                self.control = new;
            }
            4 => self.address = (self.address & !0xffff_ffff) | u64::from(value & !0x3),
            8 if self.is_64bit() => {
                self.address = (self.address & 0xffff_ffff) | u64::from(value) << 32
            }
            r if r == self.data_off() => self.data = value as u16,
            r if self.has_mask() && r == self.mask_off() => {
                self.mask = value & mask_bits(self.capable())
            }
            _ => return MsiUpdate::None,
        }
        match (was_enabled, self.enabled()) {
            (false, true) => MsiUpdate::Enable {
                vectors: self.vectors(),
            },
            (true, false) => MsiUpdate::Disable,
            (true, true) if old_vectors != self.vectors() => MsiUpdate::Enable {
                vectors: self.vectors(),
            },
            (true, true) if before != (self.address, self.data, self.mask) => MsiUpdate::Reprogram,
            _ => MsiUpdate::None,
        }
    }
}

fn mask_bits(n: usize) -> u32 {
    if n >= 32 {
        u32::MAX
    } else {
        (1u32 << n) - 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cap64_mask_4() -> MsiCap {
        // 64-bit, per-vector masking, 4 vectors capable.
        MsiCap::new(0x50, PCI_MSI_FLAGS_64BIT | PCI_MSI_FLAGS_MASKBIT | (2 << 1))
    }

    #[test]
    fn enable_reports_vectors_and_messages_follow_data() {
        let mut c = cap64_mask_4();
        assert_eq!(c.len(), 24);
        assert_eq!(
            c.write(0x54, &0xfee0_1000u32.to_le_bytes()),
            MsiUpdate::None
        );
        assert_eq!(c.write(0x58, &0u32.to_le_bytes()), MsiUpdate::None);
        assert_eq!(c.write(0x5c, &0x4021u16.to_le_bytes()), MsiUpdate::None);
        // Enable with 4 vectors (MME = 2) in one 16-bit write of the control word.
        let upd = c.write(0x52, &(PCI_MSI_FLAGS_ENABLE | (2 << 4)).to_le_bytes());
        assert_eq!(upd, MsiUpdate::Enable { vectors: 4 });
        assert_eq!(
            c.message(3),
            MsiMessage {
                address: 0xfee0_1000,
                data: 0x4023
            }
        );
        assert_eq!(
            c.write(0x5c, &0x4031u16.to_le_bytes()),
            MsiUpdate::Reprogram
        );
        assert_eq!(c.write(0x60, &[0b10]), MsiUpdate::Reprogram);
        assert!(c.masked(1) && !c.masked(0));
        assert_eq!(c.write(0x52, &[0, 0]), MsiUpdate::Disable);
    }

    #[test]
    fn too_many_vectors_are_clamped_to_the_capability() {
        let mut c = MsiCap::new(0x50, 0); // 32-bit, one vector.
        let upd = c.write(0x52, &(PCI_MSI_FLAGS_ENABLE | (5 << 4)).to_le_bytes());
        assert_eq!(upd, MsiUpdate::Enable { vectors: 1 });
        assert_eq!(c.read(0x50, 0x0005) >> 16 & 0x70, 0);
    }

    #[test]
    fn capability_bits_are_read_only_and_reads_never_panic() {
        let mut c = cap64_mask_4();
        c.write(0x52, &[0, 0]);
        assert_eq!(
            (c.read(0x50, 0x6005) >> 16) as u16,
            PCI_MSI_FLAGS_64BIT | PCI_MSI_FLAGS_MASKBIT | 4
        );
        for off in (0x50..0x68).step_by(4) {
            let _ = c.read(off, 0);
        }
        assert_eq!(c.write(0x40, &[1]), MsiUpdate::None);
    }
}
