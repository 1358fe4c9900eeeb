//! PCI Express structures of an emulated function's configuration space: the PCI Express
//! capability that makes it a PCIe function (and so makes an OS look at the extended
//! configuration space 0x100..0x1000, reachable through ECAM), and extended capabilities there,
//! of which the Address Translation Services capability (PCIe Base 4.0, 10.5.1).
//!
//! They are registers of the [`PciConfiguration`] with their write masks; what the function
//! does when the guest writes them (ATS Enable) is the device model's.

use crate::pci::configuration::PciConfiguration;
use crate::pci::spec::*;

/// A capability that does not fit where it was asked to go.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CapabilityError {
    /// Capabilities start dword-aligned, past the header, and end inside their space.
    #[error("a {size}-byte capability cannot go at config offset {offset:#x}")]
    Placement { offset: usize, size: usize },
}

/// The first byte past the type-0 header, where conventional capabilities may start.
const PCI_STD_HEADER_SIZEOF: usize = 0x40;

/// Checks that `size` bytes at `offset` are dword-aligned and inside `space`.
fn place(
    offset: usize,
    size: usize,
    space: std::ops::Range<usize>,
) -> Result<usize, CapabilityError> {
    let fits = offset.is_multiple_of(4)
        && offset >= space.start
        && offset.checked_add(size).is_some_and(|end| end <= space.end);
    if fits {
        Ok(offset / 4)
    } else {
        Err(CapabilityError::Placement { offset, size })
    }
}

impl PciConfiguration {
    /// Writes a version-2 PCI Express capability (7.5.3) of a Root Complex Integrated Endpoint
    /// at `offset`, the last of the capability list: no link, slot or root registers; 128-byte
    /// payloads; Device Control's error-reporting, ordering, snoop and size fields writable (the
    /// function has none of the behaviour they select, but an OS sets them). The capability
    /// list must reach `offset` (from the pointer or the capability before).
    pub fn add_pcie_capability(&mut self, offset: usize) -> Result<(), CapabilityError> {
        let reg = place(
            offset,
            PCI_CAP_EXP_SIZEOF,
            PCI_STD_HEADER_SIZEOF..PCI_CONFIG_SIZE,
        )?;
        let flags = PCI_EXP_FLAGS_VERS2 | PCI_EXP_TYPE_RC_END << PCI_EXP_FLAGS_TYPE_SHIFT;
        self.set_reg(
            reg,
            u32::from(PCI_CAP_ID_EXP) | u32::from(flags) << (8 * PCI_EXP_FLAGS),
            0,
        );
        self.set_reg(reg + PCI_EXP_DEVCAP / 4, PCI_EXP_DEVCAP_RBER, 0);
        let devctl_writable = PCI_EXP_DEVCTL_ERRORS
            | PCI_EXP_DEVCTL_RELAX_EN
            | PCI_EXP_DEVCTL_PAYLOAD
            | PCI_EXP_DEVCTL_NOSNOOP_EN
            | PCI_EXP_DEVCTL_READRQ;
        // Reset values (7.5.3.4): relaxed ordering and no snoop enabled, 512-byte reads.
        let devctl =
            PCI_EXP_DEVCTL_RELAX_EN | PCI_EXP_DEVCTL_NOSNOOP_EN | PCI_EXP_DEVCTL_READRQ_512B;
        // Device Status, the upper half, has only error bits, which this function never sets.
        self.set_reg(
            reg + PCI_EXP_DEVCTL / 4,
            devctl.into(),
            devctl_writable.into(),
        );
        for r in reg + PCI_EXP_DEVCTL / 4 + 1..reg + PCI_CAP_EXP_SIZEOF / 4 {
            self.set_reg(r, 0, 0);
        }
        Ok(())
    }

    /// Writes the header of extended capability `id` (version `version`) at `offset`, followed
    /// by the one at `next` (0: the last).
    fn add_extended_capability(
        &mut self,
        offset: usize,
        size: usize,
        (id, version): (u16, u8),
        next: usize,
    ) -> Result<usize, CapabilityError> {
        let reg = place(offset, size, PCI_EXT_CAP_START..PCIE_CONFIG_SIZE)?;
        if next != 0 {
            place(next, 4, PCI_EXT_CAP_START..PCIE_CONFIG_SIZE)?;
        }
        let header = u32::from(id)
            | u32::from(version & 0xf) << PCI_EXT_CAP_VER_SHIFT
            | (next as u32) << PCI_EXT_CAP_NEXT_SHIFT;
        self.set_reg(reg, header, 0);
        Ok(reg)
    }
}

/// What software wrote to a function's ATS Control register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AtsControl {
    /// The function may issue translation requests and translated requests (ATS Enable).
    pub enabled: bool,
    /// Smallest Translation Unit: the function caches translations of at least
    /// 2^(12 + stu) bytes.
    pub stu: u8,
}

/// A function's ATS extended capability (10.5.1) in its configuration space.
#[derive(Clone, Copy, Debug)]
pub struct AtsCapability {
    /// Dword register of the capability and control registers.
    reg: usize,
}

impl AtsCapability {
    /// Version of the capability structure.
    const VERSION: u8 = 1;

    /// Writes the capability at `offset` of extended configuration space, followed by the one
    /// at `next` (0: the last): an invalidate queue of `queue_depth` requests (1 to 32; values
    /// outside are clamped), page-aligned untranslated requests, ATS disabled with an STU of
    /// 4 KiB (the reset values). Software may write Enable and STU.
    pub fn add(
        config: &mut PciConfiguration,
        offset: usize,
        next: usize,
        queue_depth: u8,
    ) -> Result<Self, CapabilityError> {
        let header = config.add_extended_capability(
            offset,
            PCI_EXT_CAP_ATS_SIZEOF,
            (PCI_EXT_CAP_ID_ATS, Self::VERSION),
            next,
        )?;
        let reg = header + PCI_ATS_CAP / 4;
        // 32 is encoded as 0.
        let depth = u16::from(queue_depth.clamp(1, 32)) & PCI_ATS_CAP_QDEP_MASK;
        let capability = depth | PCI_ATS_CAP_PAGE_ALIGNED;
        let writable = PCI_ATS_CTRL_ENABLE | PCI_ATS_CTRL_STU_MASK;
        let control_shift = 8 * (PCI_ATS_CTRL - PCI_ATS_CAP);
        config.set_reg(reg, capability.into(), u32::from(writable) << control_shift);
        Ok(AtsCapability { reg })
    }

    /// Whether a write to dword register `reg` may have changed the ATS Control register.
    pub fn controls(&self, reg: usize) -> bool {
        reg == self.reg
    }

    /// The ATS Control register as software last wrote it.
    pub fn control(&self, config: &PciConfiguration) -> AtsControl {
        let control = (config.read_reg(self.reg) >> (8 * (PCI_ATS_CTRL - PCI_ATS_CAP))) as u16;
        AtsControl {
            enabled: control & PCI_ATS_CTRL_ENABLE != 0,
            stu: (control & PCI_ATS_CTRL_STU_MASK) as u8,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::configuration::tests::cfg;

    fn write16(c: &mut PciConfiguration, at: usize, v: u16) {
        c.write_reg(at / 4, at % 4, &v.to_le_bytes());
    }

    fn read16(c: &PciConfiguration, at: usize) -> u16 {
        (c.read_reg(at / 4) >> (8 * (at % 4))) as u16
    }

    #[test]
    fn the_pcie_capability_is_a_v2_rc_integrated_endpoint_whose_device_control_alone_is_writable() {
        let mut c = cfg();
        c.add_pcie_capability(0x80).unwrap();
        assert_eq!(
            c.read_reg(0x80 / 4),
            0x0092_0010,
            "ID 0x10, last, v2 type 9"
        );
        assert_eq!(c.read_reg(0x84 / 4), PCI_EXP_DEVCAP_RBER);
        assert_eq!(read16(&c, 0x88), 0x2810, "reset Device Control");
        write16(&mut c, 0x88, 0xffff);
        assert_eq!(
            read16(&c, 0x88),
            0x78ff,
            "no extended tags, phantom functions, aux power or FLR"
        );
        c.write_reg(0x88 / 4, 2, &[0xff, 0xff]);
        assert_eq!(read16(&c, 0x8a), 0, "Device Status has nothing to clear");
        for at in (0x8c..0x80 + PCI_CAP_EXP_SIZEOF).step_by(4) {
            c.write_reg(at / 4, 0, &[0xff; 4]);
            assert_eq!(c.read_reg(at / 4), 0, "{at:#x}: no link, slot or root");
        }
        c.write_reg(0x80 / 4, 0, &[0xff; 4]);
        assert_eq!(c.read_reg(0x80 / 4), 0x0092_0010, "read-only header");
    }

    #[test]
    fn capabilities_that_do_not_fit_their_space_are_refused() {
        let mut c = cfg();
        for offset in [0x3c, 0x82, 0xc8] {
            assert_eq!(
                c.add_pcie_capability(offset),
                Err(CapabilityError::Placement {
                    offset,
                    size: PCI_CAP_EXP_SIZEOF
                })
            );
        }
        for (offset, next) in [(0xfc, 0), (0x100, 0x1002), (0xffc, 0), (0x102, 0)] {
            assert!(AtsCapability::add(&mut c, offset, next, 32).is_err());
        }
    }

    #[test]
    fn the_ats_capability_reports_its_queue_and_takes_enable_and_stu_only() {
        let mut c = cfg();
        let ats = AtsCapability::add(&mut c, 0x100, 0x140, 32).unwrap();
        assert_eq!(
            c.read_reg(0x40),
            0x1401_000f,
            "ID 0xf, version 1, next 0x140"
        );
        assert_eq!(
            read16(&c, 0x104),
            PCI_ATS_CAP_PAGE_ALIGNED,
            "depth 32 reads 0"
        );
        assert_eq!(
            ats.control(&c),
            AtsControl {
                enabled: false,
                stu: 0
            }
        );
        assert!(ats.controls(0x41) && !ats.controls(0x40));
        write16(&mut c, 0x106, 0xffff);
        assert_eq!(read16(&c, 0x106), 0x801f);
        assert_eq!(
            ats.control(&c),
            AtsControl {
                enabled: true,
                stu: 0x1f
            }
        );
        write16(&mut c, 0x104, 0);
        assert_eq!(
            read16(&c, 0x104),
            PCI_ATS_CAP_PAGE_ALIGNED,
            "capability read-only"
        );
        write16(&mut c, 0x106, 0);
        assert!(!ats.control(&c).enabled);
        AtsCapability::add(&mut c, 0x140, 0, 2).unwrap();
        assert_eq!(read16(&c, 0x144), 2 | PCI_ATS_CAP_PAGE_ALIGNED);
    }
}
