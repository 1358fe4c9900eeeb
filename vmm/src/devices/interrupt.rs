//! How emulated PCI functions raise interrupts: message-signalled ones through an
//! [`MsiSender`], which the device manager hands each function, and legacy INTx through an
//! [`IrqLine`] wired to the IOAPIC pin the DSDT's `_PRT` gives the function's slot.
//!
//! A device model only calls these traits, so it stays a plain state machine its unit tests
//! drive with fakes. The implementations here deliver through KVM: [`DirectMsi`] with
//! KVM_SIGNAL_MSI as the message is written (no interrupt remapping), [`KvmIrqLine`] with
//! KVM_IRQ_LINE on the in-kernel irqchip, [`IoapicLine`] on the split irqchip's IOAPIC model.
//! An emulated device lives in the VMM and knows its line's level at every moment, so it drives
//! the level directly, with the IOAPIC's own semantics for edge and level entries, rather than
//! through the irqfd and resample eventfd an assigned device's INTx needs.

use std::sync::Arc;

use kvm_bindings::kvm_msi;
use kvm_ioctls::VmFd;
use passthrough::irq::{MSI_ADDRESS_BASE, MSI_ADDRESS_MASK};
use viommu::SourceId;
use vm_device::{debug_limited, warn_limited};

use crate::devices::ioapic::{self, SharedIoapic};

/// Where a function's message-signalled interrupts go.
pub trait MsiSender: Send + Sync {
    /// Delivers the interrupt message `function` writes: `data` to `address` (PCI 3.0, 6.8.3.3).
    fn send(&self, function: SourceId, address: u64, data: u32);
}

/// MSIs straight to KVM's local APICs (KVM_SIGNAL_MSI), in compatibility format as the function
/// wrote them: no interrupt remapping on the way.
pub struct DirectMsi(Arc<VmFd>);

impl DirectMsi {
    /// Delivers into `vm`, which needs KVM's local APICs (either irqchip).
    pub fn new(vm: Arc<VmFd>) -> Self {
        Self(vm)
    }
}

impl MsiSender for DirectMsi {
    fn send(&self, function: SourceId, address: u64, data: u32) {
        // A write outside the interrupt window is a memory write, not an interrupt (Intel SDM
        // Vol. 3, 11.11.1); a function that makes one has a guest that programmed it so.
        if address & MSI_ADDRESS_MASK != MSI_ADDRESS_BASE {
            warn_limited!("{function}: MSI to {address:#x} is outside 0xfee00000-0xfeefffff");
            return;
        }
        let msi = kvm_msi {
            address_lo: address as u32,
            address_hi: (address >> 32) as u32,
            data,
            ..Default::default()
        };
        // 0: KVM found no local APIC to take it (e.g. one the guest disabled).
        match self.0.signal_msi(msi) {
            Ok(0) => debug_limited!("{function}: MSI {address:#x}/{data:#x} reached no local APIC"),
            Ok(_) => {}
            Err(e) => warn_limited!("{function}: KVM_SIGNAL_MSI {address:#x}/{data:#x}: {e}"),
        }
    }
}

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
    use passthrough::msi::MsiMessage;
    use std::sync::Mutex;
    use std::time::Duration;

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
