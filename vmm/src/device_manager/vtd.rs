//! The virtual VT-d: the model (viommu) behind the register device of [`crate::devices::vtd`],
//! on the MMIO bus at [`VTD_REGS_START`], with its register page mapped read-only where KVM
//! can and its queue doorbells when asked.

use std::sync::{Arc, Mutex};

use vm_memory::GuestMemoryMmap;

use super::{DeviceManager, DeviceManagerError};
use crate::arch::x86_64::layout::{VTD_REGS_SIZE, VTD_REGS_START};
use crate::config::ViommuConfig;
use crate::devices::bus::Bus;
use crate::devices::vtd::doorbell::QueueDoorbells;
use crate::devices::vtd::mirror::{MirrorError, RegisterMirror};
use crate::devices::vtd::{KvmMsi, SharedVtd, VtdRegisters, VtdUnit};
use crate::vstate::vm::Vm;

/// Why the virtual VT-d could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum VtdSetupError {
    /// The configuration is one the model refuses.
    #[error("virtual VT-d: {0}")]
    Model(#[source] viommu::ConfigError),
    /// The page for register reads without exits could not be set up.
    #[error(transparent)]
    RegisterPage(MirrorError),
    /// The queue doorbells' eventfds could not be created.
    #[error("cannot create the VT-d queue doorbells: {0}")]
    Doorbells(#[source] std::io::Error),
    /// KVM refused the doorbells' ioeventfds.
    #[error("VT-d queue doorbells (KVM_IOEVENTFD): {0}")]
    RegisterDoorbells(#[source] kvm_ioctls::Error),
}

/// Creates the virtual VT-d and puts its registers on `mmio` at [`VTD_REGS_START`]. Caching
/// mode is always on: devices whose DMA the host remaps need it.
pub(super) fn create_vtd(
    c: ViommuConfig,
    vm: &Vm,
    mem: &GuestMemoryMmap,
    mmio: &Bus,
) -> Result<SharedVtd, DeviceManagerError> {
    let config = viommu::VtdConfig {
        aw_bits: c.aw_bits,
        caching_mode: true,
        flush: if c.deferred {
            viommu::FlushMode::DEFERRED_DEFAULT
        } else {
            viommu::FlushMode::Strict
        },
        scalable_mode: c.scalable_mode,
        first_stage: c.first_stage,
        ..viommu::VtdConfig::default()
    };
    let unit = viommu::Vtd::new(
        config,
        mem.clone(),
        Box::new(KvmMsi(vm.shared_fd())),
        Box::new(viommu::SystemClock::default()),
    )
    .map_err(VtdSetupError::Model)?;
    // Register reads as memory loads where KVM can map a read-only page; writes still trap.
    let mirror = if vm.has_readonly_mem() {
        Some(RegisterMirror::map(vm, VTD_REGS_START).map_err(VtdSetupError::RegisterPage)?)
    } else {
        log::info!("KVM cannot map read-only memory: VT-d register reads will exit");
        None
    };
    let shared = VtdUnit::new(unit, mirror);
    if c.async_queue {
        let bells = QueueDoorbells::new().map_err(VtdSetupError::Doorbells)?;
        bells
            .register(vm.fd(), VTD_REGS_START)
            .map_err(VtdSetupError::RegisterDoorbells)?;
        // A fresh unit has no doorbells yet.
        let _ = shared.set_doorbells(bells);
    }
    DeviceManager::register(
        mmio,
        "VT-d registers",
        Arc::new(Mutex::new(VtdRegisters(shared.clone()))),
        VTD_REGS_START,
        VTD_REGS_SIZE,
    )?;
    Ok(shared)
}
