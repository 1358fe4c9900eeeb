//! How emulated PCI functions raise legacy INTx: through an [`IrqLine`] wired to the IOAPIC
//! pin the DSDT's `_PRT` gives the function's slot. (Their MSIs go through the
//! [`vm_device::interrupt::MsiSender`] the device manager binds to their requester ID, which
//! the VT-d remaps when it remaps interrupts.)
//!
//! A device model only calls these traits, so it stays a plain state machine its unit tests
//! drive with fakes. The implementations here deliver through KVM: [`KvmIrqLine`] with
//! KVM_IRQ_LINE on the in-kernel irqchip, [`IoapicLine`] on the split irqchip's IOAPIC model
//! (whose messages the VT-d remaps).
//! An emulated device lives in the VMM and knows its line's level at every moment, so it drives
//! the level directly, with the IOAPIC's own semantics for edge and level entries, rather than
//! through the irqfd and resample eventfd an assigned device's INTx needs.

use std::sync::Arc;

use kvm_ioctls::VmFd;
use vm_device::warn_limited;

use crate::devices::ioapic::{self, SharedIoapic};

/// A function's INTx# wire, level-triggered: asserted until the function deasserts it.
pub trait IrqLine: Send {
    /// Drives the wire: `asserted` is its logical state (INTx# is active low on the bus; the
    /// `_PRT` and the IOAPIC entry's polarity are the guest's knowledge of that, not ours).
    fn set_level(&self, asserted: bool);
}

/// A GSI of KVM's in-kernel irqchip (KVM_IRQ_LINE): pins 16..24 reach its IOAPIC only.
pub struct KvmIrqLine {
    vm: Arc<VmFd>,
    gsi: u32,
}

impl KvmIrqLine {
    /// GSI `gsi` of `vm`, which has the in-kernel irqchip.
    pub fn new(vm: Arc<VmFd>, gsi: u32) -> Self {
        Self { vm, gsi }
    }
}

impl IrqLine for KvmIrqLine {
    fn set_level(&self, asserted: bool) {
        if let Err(e) = self.vm.set_irq_line(self.gsi, asserted) {
            warn_limited!(
                "KVM_IRQ_LINE {} level {}: {e}",
                self.gsi,
                u8::from(asserted)
            );
        }
    }
}

/// An input pin of the split irqchip's IOAPIC (the VMM's model).
pub struct IoapicLine {
    ioapic: SharedIoapic,
    pin: u8,
}

impl IoapicLine {
    /// Pin `pin` of `ioapic`; None when the IOAPIC has no such pin.
    pub fn new(ioapic: SharedIoapic, pin: u32) -> Option<Self> {
        let pin = u8::try_from(pin)
            .ok()
            .filter(|p| usize::from(*p) < ioapic::IOAPIC_NUM_PINS)?;
        Some(Self { ioapic, pin })
    }
}

impl IrqLine for IoapicLine {
    fn set_level(&self, asserted: bool) {
        // `new` checked the pin.
        if let Err(e) = ioapic::lock(&self.ioapic).set_irq(self.pin, asserted) {
            warn_limited!("{e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::ioapic::{Ioapic, IoapicOutput, PinState};
    use std::sync::Mutex;
    use std::time::Duration;
    use vm_device::interrupt::MsiMessage;

    /// Records what the IOAPIC delivers.
    struct Delivered(Arc<Mutex<Vec<(u8, MsiMessage)>>>);

    impl IoapicOutput for Delivered {
        fn pin_changed(&mut self, _pin: u8, _state: PinState) {}
        fn deliver(&mut self, pin: u8, message: MsiMessage) {
            self.0.lock().unwrap().push((pin, message));
        }
        fn end_of_interrupt(&mut self, _pin: u8) {}
        fn schedule_deferred_service(&mut self, _delay: Duration) {}
    }

    #[test]
    fn an_ioapic_line_drives_its_pin_with_the_entrys_edge_semantics() {
        let delivered = Arc::new(Mutex::new(Vec::new()));
        let ioapic = Arc::new(Mutex::new(Ioapic::new(Box::new(Delivered(
            delivered.clone(),
        )))));
        assert!(IoapicLine::new(ioapic.clone(), 24).is_none(), "pins 0..24");
        let line = IoapicLine::new(ioapic.clone(), 17).expect("pin 17");
        // Redirection entry 17: vector 0x41, edge, unmasked (IOREGSEL/IOWIN at 0x00/0x10).
        {
            use crate::devices::bus::BusDevice;
            let mut io = ioapic.lock().unwrap();
            io.write(0, 0x00, &(0x10u32 + 2 * 17).to_le_bytes());
            io.write(0, 0x10, &0x41u32.to_le_bytes());
        }
        line.set_level(true);
        line.set_level(true);
        line.set_level(false);
        line.set_level(true);
        let d = delivered.lock().unwrap();
        assert_eq!(d.len(), 2, "one interrupt a rising edge: {d:?}");
        assert!(d.iter().all(|(pin, m)| *pin == 17 && m.data & 0xff == 0x41));
    }
}
