//! One I/O redirection table entry (82093AA datasheet, 3.2.4 "IOREDTBL"; the upper bits as the
//! Intel ICH/PCH IOxAPIC and VT-d spec 5.1.5.1 define them) and the interrupt message it makes.
//!
//! ```text
//! 63:56 destination (compatibility) | interrupt index 14:7 (remappable)
//! 55:49 extended destination ID     | interrupt index 6:0
//! 48    0: compatibility format     | 1: remappable format
//! 47:17 reserved (read as zero)
//! 16    mask
//! 15    trigger mode (1: level)
//! 14    remote IRR (read-only)
//! 13    polarity (1: active low)
//! 12    delivery status (read-only)
//! 11    destination mode (1: logical)  | interrupt index 15
//! 10:8  delivery mode                  | 000 (so SHV is clear)
//! 7:0   vector
//! ```
//!
//! The IOAPIC turns an entry into an MSI-format write (Intel SDM Vol. 3A, 11.11; ICH9 datasheet,
//! 13.5.7 "Interrupt Delivery"): bits 63:48 of the entry land in address bits 19:4, bit 11 in
//! address bit 2, the redirection hint (address bit 3) is set for lowest-priority delivery. The
//! mapping is the same whatever the format bit says, which is how a remappable-format entry
//! yields a remappable-format request (VT-d spec 5.1.2.2: handle in address bits 19:5 and 2,
//! format bit 4, SHV bit 3): the IOAPIC never interprets the format, the remapping unit does.

use vm_device::interrupt::{
    MsiMessage, MSI_ADDRESS_DEST_MODE_LOGICAL, MSI_ADDRESS_REDIRECTION_HINT, MSI_ADDRESS_WINDOW,
    MSI_DATA_DELIVERY_MODE_SHIFT, MSI_DATA_LEVEL_ASSERT, MSI_DATA_TRIGGER_LEVEL,
};

/// Bits 7:0: the vector.
const VECTOR_MASK: u64 = 0xff;
/// Bits 10:8: the delivery mode.
const DELIVERY_MODE_SHIFT: u32 = 8;
const DELIVERY_MODE_MASK: u64 = 0x7;
/// Bit 11: logical destination mode; in remappable format, interrupt index bit 15.
const DEST_MODE_LOGICAL: u64 = 1 << 11;
/// Bit 12: delivery status (read-only).
pub(super) const DELIVERY_STATUS: u64 = 1 << 12;
/// Bit 13: polarity, active low.
const POLARITY_LOW: u64 = 1 << 13;
/// Bit 14: remote IRR (read-only).
pub(super) const REMOTE_IRR: u64 = 1 << 14;
/// Bit 15: level-triggered.
const TRIGGER_LEVEL: u64 = 1 << 15;
/// Bit 16: masked.
pub(super) const MASKED: u64 = 1 << 16;
/// Bit 48: interrupt format, set for remappable format (VT-d spec 5.1.5.1).
const FORMAT_REMAPPABLE: u64 = 1 << 48;
/// Bits 63:48 land in message address bits 19:4.
const UPPER_SHIFT: u32 = 48;
const UPPER_MASK: u64 = 0xffff;
/// Bits 63:56: the destination APIC ID (compatibility format).
const DESTINATION_SHIFT: u32 = 56;
/// Bits 55:49: the extended destination ID (compatibility format).
const EXT_DESTINATION_SHIFT: u32 = 49;
const EXT_DESTINATION_MASK: u64 = 0x7f;
/// Bits 63:49: interrupt index 14:0 (remappable format).
const INDEX_LOW_SHIFT: u32 = 49;
const INDEX_LOW_MASK: u64 = 0x7fff;

/// What software can write: bits 16:0 but for the two read-only status bits, and 63:48.
const WRITABLE: u64 = 0xffff_0000_0001_ffff & !(DELIVERY_STATUS | REMOTE_IRR);
/// The state after reset: masked, everything else clear.
pub(super) const RESET: u64 = MASKED;

/// Entry bits 63:48 land in message address bits 19:4 (the MSI format's fields are
/// `vm_device::interrupt`'s).
const MSI_ADDRESS_UPPER_SHIFT: u32 = 4;

/// Trigger mode, bit 15.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TriggerMode {
    /// Delivered once per rising edge of the line.
    Edge,
    /// Delivered while the line is asserted, once per EOI (remote IRR).
    Level,
}

/// Delivery mode, bits 10:8 (82093AA datasheet, 3.2.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeliveryMode {
    Fixed,
    LowestPriority,
    Smi,
    Nmi,
    Init,
    ExtInt,
    /// 011 and 110.
    Reserved(u8),
}

impl DeliveryMode {
    fn from_bits(bits: u8) -> Self {
        match bits {
            0b000 => Self::Fixed,
            0b001 => Self::LowestPriority,
            0b010 => Self::Smi,
            0b100 => Self::Nmi,
            0b101 => Self::Init,
            0b111 => Self::ExtInt,
            other => Self::Reserved(other),
        }
    }
}

/// How the interrupt is addressed, by the entry's format bit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Addressing {
    /// Compatibility format: the entry names the destination itself.
    Compatibility {
        /// APIC ID (physical) or logical destination, bits 63:56.
        destination: u8,
        /// Bits 55:49, destination ID bits 14:8 where the platform extends it.
        ext_destination: u8,
        /// Bit 11.
        logical: bool,
        /// Bits 10:8.
        delivery_mode: DeliveryMode,
    },
    /// Remappable format (VT-d spec 5.1.5.1): the remapping unit's interrupt remapping table
    /// entry `index` decides the destination.
    Remappable {
        /// Interrupt index 15:0, from bit 11 and bits 63:49.
        index: u16,
        /// Whether the request claims a subhandle (any delivery mode but Fixed sets it, which
        /// is why software must program Fixed).
        subhandle_valid: bool,
    },
}

/// One redirection table entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RedirectionEntry(u64);

impl Default for RedirectionEntry {
    fn default() -> Self {
        Self(RESET)
    }
}

impl RedirectionEntry {
    /// The raw 64 bits, as the guest reads them.
    pub fn bits(self) -> u64 {
        self.0
    }

    /// The entry after the guest writes `value` to its low (`high` false) or high half: the
    /// read-only bits keep their state, reserved bits stay clear.
    pub fn with_half_written(self, high: bool, value: u32) -> Self {
        let written = if high {
            (self.0 & 0xffff_ffff) | (u64::from(value) << 32)
        } else {
            (self.0 & !0xffff_ffff) | u64::from(value)
        };
        Self((written & WRITABLE) | (self.0 & (DELIVERY_STATUS | REMOTE_IRR)))
    }

    pub fn vector(self) -> u8 {
        (self.0 & VECTOR_MASK) as u8
    }

    pub fn trigger(self) -> TriggerMode {
        if self.0 & TRIGGER_LEVEL != 0 {
            TriggerMode::Level
        } else {
            TriggerMode::Edge
        }
    }

    pub fn masked(self) -> bool {
        self.0 & MASKED != 0
    }

    pub fn remote_irr(self) -> bool {
        self.0 & REMOTE_IRR != 0
    }

    pub(super) fn set_remote_irr(&mut self, set: bool) {
        if set {
            self.0 |= REMOTE_IRR;
        } else {
            self.0 &= !REMOTE_IRR;
        }
    }

    /// Active-low polarity (bit 13). Lines are modelled by their logical assertion, so it
    /// only tells the guest's own view of the wire.
    pub fn active_low(self) -> bool {
        self.0 & POLARITY_LOW != 0
    }

    fn delivery_mode_bits(self) -> u8 {
        ((self.0 >> DELIVERY_MODE_SHIFT) & DELIVERY_MODE_MASK) as u8
    }

    /// The entry's addressing, decoded by its format bit.
    pub fn addressing(self) -> Addressing {
        let delivery_mode = DeliveryMode::from_bits(self.delivery_mode_bits());
        if self.0 & FORMAT_REMAPPABLE != 0 {
            let low = ((self.0 >> INDEX_LOW_SHIFT) & INDEX_LOW_MASK) as u16;
            let high = u16::from(self.0 & DEST_MODE_LOGICAL != 0) << 15;
            Addressing::Remappable {
                index: high | low,
                subhandle_valid: delivery_mode == DeliveryMode::LowestPriority,
            }
        } else {
            Addressing::Compatibility {
                destination: (self.0 >> DESTINATION_SHIFT) as u8,
                ext_destination: ((self.0 >> EXT_DESTINATION_SHIFT) & EXT_DESTINATION_MASK) as u8,
                logical: self.0 & DEST_MODE_LOGICAL != 0,
                delivery_mode,
            }
        }
    }

    /// The MSI-format write the IOAPIC puts on the bus for this entry.
    pub fn message(self) -> MsiMessage {
        let mode = self.delivery_mode_bits();
        let mut address = MSI_ADDRESS_WINDOW
            | (((self.0 >> UPPER_SHIFT) & UPPER_MASK) << MSI_ADDRESS_UPPER_SHIFT);
        if self.0 & DEST_MODE_LOGICAL != 0 {
            address |= MSI_ADDRESS_DEST_MODE_LOGICAL;
        }
        if DeliveryMode::from_bits(mode) == DeliveryMode::LowestPriority {
            address |= MSI_ADDRESS_REDIRECTION_HINT;
        }
        let mut data = u32::from(self.vector()) | (u32::from(mode) << MSI_DATA_DELIVERY_MODE_SHIFT);
        if self.trigger() == TriggerMode::Level {
            data |= MSI_DATA_TRIGGER_LEVEL | MSI_DATA_LEVEL_ASSERT;
        }
        MsiMessage { address, data }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(bits: u64) -> RedirectionEntry {
        RedirectionEntry(bits)
    }

    #[test]
    fn reset_entry_is_masked_edge_vector_zero() {
        let e = RedirectionEntry::default();
        assert_eq!(e.bits(), 0x1_0000);
        assert!(e.masked());
        assert_eq!(e.trigger(), TriggerMode::Edge);
        assert_eq!(e.vector(), 0);
        assert!(!e.remote_irr());
    }

    #[test]
    fn writes_keep_read_only_bits_and_drop_reserved_ones() {
        let mut e = RedirectionEntry::default();
        e.set_remote_irr(true);
        let e = e.with_half_written(false, 0xffff_ffff);
        assert_eq!(
            e.bits() as u32,
            0x0001_ffff & !0x1000,
            "bits 31:17 reserved, 12 read-only (clear), 14 read-only (kept set)"
        );
        let e = e.with_half_written(false, 0);
        assert_eq!(
            e.bits() as u32,
            0x4000,
            "remote IRR cannot be written clear"
        );
        let e = e.with_half_written(true, 0xffff_ffff);
        assert_eq!(e.bits() >> 32, 0xffff_0000, "bits 47:32 reserved");
        assert_eq!(
            e.bits() as u32,
            0x4000,
            "the high half leaves the low one alone"
        );
    }

    #[test]
    fn fields_decode() {
        let e = entry(0x0300_0000_0001_a931);
        assert_eq!(e.vector(), 0x31);
        assert_eq!(e.trigger(), TriggerMode::Level);
        assert!(e.masked());
        assert!(e.active_low());
        assert_eq!(
            e.addressing(),
            Addressing::Compatibility {
                destination: 3,
                ext_destination: 0,
                logical: true,
                delivery_mode: DeliveryMode::LowestPriority,
            }
        );
        let modes: Vec<DeliveryMode> = (0..8u64)
            .map(|m| match entry(m << 8).addressing() {
                Addressing::Compatibility { delivery_mode, .. } => delivery_mode,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            modes,
            [
                DeliveryMode::Fixed,
                DeliveryMode::LowestPriority,
                DeliveryMode::Smi,
                DeliveryMode::Reserved(3),
                DeliveryMode::Nmi,
                DeliveryMode::Init,
                DeliveryMode::Reserved(6),
                DeliveryMode::ExtInt,
            ]
        );
    }

    #[test]
    fn compatibility_messages() {
        // Physical, fixed, edge, APIC 3, vector 0x31.
        let m = entry(0x0300_0000_0000_0031).message();
        assert_eq!((m.address, m.data), (0xfee0_3000, 0x31));
        // Logical, lowest priority, level: redirection hint and destination mode set; data
        // carries the trigger mode and the assert level.
        let m = entry(0x0f00_0000_0000_8931).message();
        assert_eq!((m.address, m.data), (0xfee0_f00c, 0xc131));
        // NMI keeps its delivery mode; the mask and polarity bits do not reach the message.
        let m = entry(0x0100_0000_0001_2402).message();
        assert_eq!((m.address, m.data), (0xfee0_1000, 0x402));
        // The extended destination ID (bits 55:49) lands in address bits 11:5.
        let e = entry(0x02fe_0000_0000_0040);
        assert_eq!(e.message().address, 0xfee0_2fe0);
        assert!(matches!(
            e.addressing(),
            Addressing::Compatibility {
                destination: 2,
                ext_destination: 0x7f,
                ..
            }
        ));
    }

    #[test]
    fn remappable_entries_make_remappable_requests() {
        // Index 0x8123: bits 14:0 in 63:49, bit 15 in bit 11; format bit 48; level, vector 0x41.
        let bits = (0x0123u64 << 49) | (1 << 48) | (1 << 11) | (1 << 15) | 0x41;
        let e = entry(bits);
        assert_eq!(
            e.addressing(),
            Addressing::Remappable {
                index: 0x8123,
                subhandle_valid: false,
            }
        );
        let m = e.message();
        // VT-d spec 5.1.2.2: handle 14:0 in address 19:5, format bit 4, SHV bit 3 clear,
        // handle 15 in bit 2.
        assert_eq!(m.address & 0xfff0_0000, 0xfee0_0000);
        assert_eq!((m.address >> 5) & 0x7fff, 0x0123);
        assert_eq!(
            m.address & 0x1c,
            0x14,
            "format set, SHV clear, handle bit 15 set"
        );
        assert_eq!(
            m.data & 0xffff,
            0xc041,
            "vector and trigger mode as the entry says"
        );
        // Delivery mode other than Fixed claims a subhandle.
        let e = entry(bits | (1 << 8));
        assert!(matches!(
            e.addressing(),
            Addressing::Remappable {
                subhandle_valid: true,
                ..
            }
        ));
        assert_ne!(e.message().address & 0x8, 0, "SHV set");
        // Index 0: only the format bit.
        assert_eq!(entry(1 << 48).message().address, 0xfee0_0010);
    }
}
