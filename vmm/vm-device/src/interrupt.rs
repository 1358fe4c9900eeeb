//! Interrupt messages: the MSI-format write by which PCI devices, the IOAPIC and a remapping
//! unit raise interrupts on x86 (Intel SDM Vol. 3A, 11.11; VT-d spec 5.1.2 for the remappable
//! format), and the way an emulated device asks the VMM to send one ([`MsiSender`]).
//!
//! One definition for every crate that makes, routes or translates these messages: the VT-d
//! model (interrupt remapping), the passthrough crate (MSI/MSI-X capabilities, KVM routes) and
//! the VMM's IOAPIC.

/// Address bits 31:20 of every interrupt request (SDM 11.11.1; VT-d 5.1.2).
pub const MSI_ADDRESS_WINDOW: u64 = 0xfee0_0000;
/// The bits [`MSI_ADDRESS_WINDOW`] occupies.
pub const MSI_ADDRESS_WINDOW_MASK: u64 = 0xfff0_0000;

// Compatibility format (SDM 11.11.1 and 11.11.2; VT-d 5.1.2.1).
/// Address bits 19:12: the destination APIC ID (physical) or logical destination.
pub const MSI_ADDRESS_DEST_SHIFT: u32 = 12;
pub const MSI_ADDRESS_DEST_MASK: u64 = 0xff;
/// Address bit 3: redirection hint (lowest-priority delivery among the destinations).
pub const MSI_ADDRESS_REDIRECTION_HINT: u64 = 1 << 3;
/// Address bit 2: logical destination mode.
pub const MSI_ADDRESS_DEST_MODE_LOGICAL: u64 = 1 << 2;
/// Address bits 63:40 carry destination ID bits 31:8 (x2APIC destinations above 255): the
/// convention of KVM's routes with `KVM_X2APIC_API_USE_32BIT_IDS`, and of the upper address a
/// Linux guest in x2APIC mode programs for the remapping unit's own interrupts.
pub const MSI_ADDRESS_EXT_DEST_SHIFT: u32 = 32;
/// Data bits 7:0: the vector.
pub const MSI_DATA_VECTOR_MASK: u32 = 0xff;
/// Data bits 10:8: the delivery mode (0 fixed, 1 lowest priority, 2 SMI, 4 NMI, 5 INIT,
/// 7 ExtINT).
pub const MSI_DATA_DELIVERY_MODE_SHIFT: u32 = 8;
pub const MSI_DATA_DELIVERY_MODE_MASK: u32 = 0x7;
/// Data bit 14: level asserted (meaningful for level-triggered messages only).
pub const MSI_DATA_LEVEL_ASSERT: u32 = 1 << 14;
/// Data bit 15: level-triggered.
pub const MSI_DATA_TRIGGER_LEVEL: u32 = 1 << 15;

// Remappable format (VT-d 5.1.2.2): the request names an interrupt remapping table entry.
/// Address bit 4: interrupt format, set for remappable format.
pub const MSI_ADDRESS_FORMAT_REMAPPABLE: u64 = 1 << 4;
/// Address bit 3: subhandle valid, the data's low 16 bits are added to the handle.
pub const MSI_ADDRESS_SHV: u64 = 1 << 3;
/// Address bit 2: handle bit 15.
pub const MSI_ADDRESS_HANDLE_15: u64 = 1 << 2;
/// Address bits 19:5: handle bits 14:0.
pub const MSI_ADDRESS_HANDLE_SHIFT: u32 = 5;
pub const MSI_ADDRESS_HANDLE_LOW_MASK: u64 = 0x7fff;
/// Data bits 15:0: the subhandle; bits 31:16 are reserved.
pub const MSI_DATA_SUBHANDLE_MASK: u32 = 0xffff;

/// An MSI: the address and data a device (or the IOAPIC) writes to raise an interrupt.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct MsiMessage {
    pub address: u64,
    pub data: u32,
}

impl MsiMessage {
    pub const fn new(address: u64, data: u32) -> Self {
        MsiMessage { address, data }
    }

    /// Is this an interrupt request at all: an address in the interrupt window, nothing above
    /// bit 31?
    pub fn is_interrupt(&self) -> bool {
        self.address & MSI_ADDRESS_WINDOW_MASK == MSI_ADDRESS_WINDOW && self.address >> 32 == 0
    }

    /// Is it in remappable format (address bit 4)?
    pub fn is_remappable(&self) -> bool {
        self.address & MSI_ADDRESS_FORMAT_REMAPPABLE != 0
    }

    /// The vector of a compatibility-format message.
    pub fn vector(&self) -> u8 {
        (self.data & MSI_DATA_VECTOR_MASK) as u8
    }

    /// The handle of a remappable request (VT-d 5.1.2.2).
    pub fn handle(&self) -> u32 {
        let low = (self.address >> MSI_ADDRESS_HANDLE_SHIFT) & MSI_ADDRESS_HANDLE_LOW_MASK;
        let high = u64::from(self.address & MSI_ADDRESS_HANDLE_15 != 0) << 15;
        (low | high) as u32
    }

    /// The interrupt_index of a remappable request: its handle, plus the subhandle when SHV is
    /// set (VT-d 5.1.3). May exceed 16 bits, which no table holds.
    pub fn interrupt_index(&self) -> u32 {
        if self.address & MSI_ADDRESS_SHV != 0 {
            self.handle() + (self.data & MSI_DATA_SUBHANDLE_MASK)
        } else {
            self.handle()
        }
    }

    /// A remappable-format request for `index` without subhandle, as an IOAPIC or a driver
    /// that gives each vector its own handle writes it.
    pub fn remappable(index: u16) -> Self {
        let index = u64::from(index);
        let mut address = MSI_ADDRESS_WINDOW
            | (index & MSI_ADDRESS_HANDLE_LOW_MASK) << MSI_ADDRESS_HANDLE_SHIFT
            | MSI_ADDRESS_FORMAT_REMAPPABLE;
        if index & 0x8000 != 0 {
            address |= MSI_ADDRESS_HANDLE_15;
        }
        MsiMessage { address, data: 0 }
    }
}

/// How an emulated device raises an MSI: it hands over the message its MSI capability (or
/// MSI-X table entry) holds, and the VMM delivers it as a request of the device's requester ID:
/// through the remapping unit's interrupt remapping when the device sits behind one, which may
/// block it (and record the fault), else as it is. The VMM gives each device its own sender,
/// bound to its requester ID.
pub trait MsiSender: Send + Sync {
    fn send(&self, message: MsiMessage);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_interrupt_window_is_bits_31_20_with_nothing_above() {
        assert!(MsiMessage::new(0xfee0_1000, 0x31).is_interrupt());
        assert!(MsiMessage::new(0xfeef_fffc, 0).is_interrupt());
        assert!(!MsiMessage::new(0xfed0_0000, 0).is_interrupt());
        assert!(!MsiMessage::new(1 << 32 | 0xfee0_0000, 0).is_interrupt());
        assert_eq!(MsiMessage::new(0xfee0_0000, 0x4041).vector(), 0x41);
    }

    #[test]
    fn handle_and_subhandle_make_the_interrupt_index() {
        for index in [0u16, 1, 0x7fff, 0x8000, 0x8123, 0xffff] {
            let m = MsiMessage::remappable(index);
            assert!(m.is_interrupt() && m.is_remappable(), "{index:#x}");
            assert_eq!(m.handle(), u32::from(index));
            assert_eq!(m.interrupt_index(), u32::from(index));
        }
        let m = MsiMessage::remappable(0x8123);
        assert_eq!(m.address & MSI_ADDRESS_HANDLE_15, MSI_ADDRESS_HANDLE_15);
        assert_eq!((m.address >> 5) & 0x7fff, 0x123);
        let shv = MsiMessage::new(m.address | MSI_ADDRESS_SHV, 5);
        assert_eq!(shv.interrupt_index(), 0x8128);
        let no_shv = MsiMessage::new(m.address, 5);
        assert_eq!(no_shv.interrupt_index(), 0x8123, "data ignored without SHV");
        assert!(!MsiMessage::new(0xfee0_0000, 0).is_remappable());
    }
}
