//! The split irqchip's IOAPIC: the model of [`crate::devices::ioapic`] over KVM
//! ([`KvmIoapic`]), on the MMIO bus at [`IOAPIC_START`], where the MADT says it is. With the
//! in-kernel irqchip the IOAPIC is KVM's and nothing is added here.

use passthrough::kvm::Irqchip;

use super::{DeviceManager, DeviceManagerError};
use crate::arch::x86_64::layout::IOAPIC_START;
use crate::devices::bus::Bus;
use crate::devices::ioapic::kvm::KvmIoapic;
use crate::devices::ioapic::IOAPIC_MMIO_SIZE;
use crate::vstate::vm::Vm;

/// Creates the IOAPIC when `vm` has the split irqchip, and puts it on `mmio`.
pub(super) fn create_ioapic(vm: &Vm, mmio: &Bus) -> Result<Option<KvmIoapic>, DeviceManagerError> {
    let (Some(Irqchip::Split), Some(routing)) = (vm.irqchip(), vm.routing()) else {
        return Ok(None);
    };
    let ioapic = KvmIoapic::new(vm.shared_fd(), routing.clone()).map_err(|source| {
        DeviceManagerError::Timer {
            what: "IOAPIC storm guard",
            source,
        }
    })?;
    DeviceManager::register(
        mmio,
        "IOAPIC",
        ioapic.shared().clone(),
        IOAPIC_START,
        IOAPIC_MMIO_SIZE,
    )?;
    Ok(Some(ioapic))
}
