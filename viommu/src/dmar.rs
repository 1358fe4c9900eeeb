//! The ACPI DMA Remapping Reporting table (VT-d spec 8.1) that announces remapping units to the
//! guest. The acpi_tables crate has no DMAR module, so the bytes are laid out here.

/// 8.1: DMAR flags.
pub const DMAR_FLAG_INTR_REMAP: u8 = 1 << 0;
pub const DMAR_FLAG_X2APIC_OPT_OUT: u8 = 1 << 1;

/// 8.3: DRHD flag: the unit covers every PCI device of its segment not claimed by another unit.
pub const DRHD_FLAG_INCLUDE_PCI_ALL: u8 = 1 << 0;

// 8.2: remapping structure types.
const STRUCT_DRHD: u16 = 0;
const STRUCT_RMRR: u16 = 1;

// 8.3.1: device scope entry types.
const SCOPE_PCI_ENDPOINT: u8 = 1;
const SCOPE_IOAPIC: u8 = 3;

const HEADER_LEN: usize = 36;

/// A device a remapping structure names: the path from a bus to a PCI function, or an I/O APIC.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceScope {
    /// A PCI endpoint at `device.function` on `bus` (directly on the bus: a one-hop path).
    PciEndpoint { bus: u8, device: u8, function: u8 },
    /// An I/O APIC with `id`, whose requests appear as `bus:device.function`.
    IoApic {
        id: u8,
        bus: u8,
        device: u8,
        function: u8,
    },
}

impl DeviceScope {
    fn bytes(&self) -> [u8; 8] {
        let (kind, id, bus, dev, func) = match *self {
            DeviceScope::PciEndpoint {
                bus,
                device,
                function,
            } => (SCOPE_PCI_ENDPOINT, 0, bus, device, function),
            DeviceScope::IoApic {
                id,
                bus,
                device,
                function,
            } => (SCOPE_IOAPIC, id, bus, device, function),
        };
        [kind, 8, 0, 0, id, bus, dev, func]
    }
}

/// One remapping hardware unit definition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Drhd {
    pub segment: u16,
    /// Guest-physical address of the unit's register block.
    pub register_base: u64,
    /// Covers every device of the segment not claimed by another unit.
    pub include_pci_all: bool,
    pub scopes: Vec<DeviceScope>,
}

/// A reserved memory region devices use before the OS sets up remapping (8.4).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rmrr {
    pub segment: u16,
    pub base: u64,
    /// Last byte of the region (inclusive), as the table states it.
    pub limit: u64,
    pub scopes: Vec<DeviceScope>,
}

/// The DMAR table's content.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dmar {
    /// Host address width: the most guest-physical address bits DMA can reach.
    pub host_address_width: u8,
    pub flags: u8,
    pub units: Vec<Drhd>,
    pub reserved_regions: Vec<Rmrr>,
}

impl Dmar {
    /// The table as bytes, with its ACPI header and checksum.
    pub fn to_bytes(&self, oem_id: [u8; 6], oem_table_id: [u8; 8], oem_revision: u32) -> Vec<u8> {
        let mut t = Vec::with_capacity(256);
        t.extend_from_slice(b"DMAR");
        t.extend_from_slice(&[0; 4]); // length, patched below
        t.push(1); // revision
        t.push(0); // checksum, patched below
        t.extend_from_slice(&oem_id);
        t.extend_from_slice(&oem_table_id);
        t.extend_from_slice(&oem_revision.to_le_bytes());
        t.extend_from_slice(b"RVMM"); // creator id
        t.extend_from_slice(&1u32.to_le_bytes()); // creator revision
        debug_assert_eq!(t.len(), HEADER_LEN);
        // 8.1: the width is stated minus one.
        t.push(self.host_address_width.saturating_sub(1));
        t.push(self.flags);
        t.extend_from_slice(&[0; 10]);
        for u in &self.units {
            let len = 16 + 8 * u.scopes.len();
            t.extend_from_slice(&STRUCT_DRHD.to_le_bytes());
            t.extend_from_slice(&(len as u16).to_le_bytes());
            t.push(if u.include_pci_all {
                DRHD_FLAG_INCLUDE_PCI_ALL
            } else {
                0
            });
            t.push(0); // size: 2^0 pages of registers
            t.extend_from_slice(&u.segment.to_le_bytes());
            t.extend_from_slice(&u.register_base.to_le_bytes());
            for s in &u.scopes {
                t.extend_from_slice(&s.bytes());
            }
        }
        for r in &self.reserved_regions {
            let len = 24 + 8 * r.scopes.len();
            t.extend_from_slice(&STRUCT_RMRR.to_le_bytes());
            t.extend_from_slice(&(len as u16).to_le_bytes());
            t.extend_from_slice(&[0; 2]);
            t.extend_from_slice(&r.segment.to_le_bytes());
            t.extend_from_slice(&r.base.to_le_bytes());
            t.extend_from_slice(&r.limit.to_le_bytes());
            for s in &r.scopes {
                t.extend_from_slice(&s.bytes());
            }
        }
        let len = t.len() as u32;
        t[4..8].copy_from_slice(&len.to_le_bytes());
        let sum = t.iter().fold(0u8, |a, b| a.wrapping_add(*b));
        t[9] = 0u8.wrapping_sub(sum);
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> Vec<u8> {
        Dmar {
            host_address_width: 48,
            flags: 0,
            units: vec![Drhd {
                segment: 0,
                register_base: 0xfed9_0000,
                include_pci_all: true,
                scopes: vec![],
            }],
            reserved_regions: vec![],
        }
        .to_bytes(*b"RVMMVM", *b"RVMMDMAR", 1)
    }

    #[test]
    fn dmar_header_length_and_checksum_are_valid() {
        let t = table();
        assert_eq!(&t[0..4], b"DMAR");
        assert_eq!(
            u32::from_le_bytes(t[4..8].try_into().unwrap()) as usize,
            t.len()
        );
        assert_eq!(t.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
    }

    #[test]
    fn dmar_states_width_minus_one_and_one_include_all_unit() {
        let t = table();
        assert_eq!(t[36], 47);
        let drhd = &t[48..];
        assert_eq!(u16::from_le_bytes([drhd[0], drhd[1]]), 0, "type DRHD");
        assert_eq!(u16::from_le_bytes([drhd[2], drhd[3]]), 16);
        assert_eq!(drhd[4], DRHD_FLAG_INCLUDE_PCI_ALL);
        assert_eq!(
            u64::from_le_bytes(drhd[8..16].try_into().unwrap()),
            0xfed9_0000
        );
        assert_eq!(t.len(), 48 + 16);
    }

    #[test]
    fn device_scopes_and_reserved_regions_are_laid_out() {
        let t = Dmar {
            host_address_width: 39,
            flags: DMAR_FLAG_INTR_REMAP,
            units: vec![Drhd {
                segment: 0,
                register_base: 0xfed9_0000,
                include_pci_all: false,
                scopes: vec![DeviceScope::PciEndpoint {
                    bus: 0,
                    device: 3,
                    function: 0,
                }],
            }],
            reserved_regions: vec![Rmrr {
                segment: 0,
                base: 0x1000,
                limit: 0x1fff,
                scopes: vec![DeviceScope::PciEndpoint {
                    bus: 0,
                    device: 3,
                    function: 0,
                }],
            }],
        }
        .to_bytes(*b"RVMMVM", *b"RVMMDMAR", 1);
        assert_eq!(t[37], DMAR_FLAG_INTR_REMAP);
        let scope = &t[48 + 16..48 + 24];
        assert_eq!(scope, &[SCOPE_PCI_ENDPOINT, 8, 0, 0, 0, 0, 3, 0]);
        let rmrr = &t[48 + 24..];
        assert_eq!(u16::from_le_bytes([rmrr[0], rmrr[1]]), 1);
        assert_eq!(u16::from_le_bytes([rmrr[2], rmrr[3]]), 32);
        assert_eq!(u64::from_le_bytes(rmrr[16..24].try_into().unwrap()), 0x1fff);
        assert_eq!(t.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
    }
}
