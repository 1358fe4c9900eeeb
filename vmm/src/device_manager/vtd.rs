//! The virtual VT-d: the model (viommu) behind the register device of [`crate::devices::vtd`],
//! on the MMIO bus at [`VTD_REGS_START`], with its register page mapped read-only where KVM
//! can and its queue doorbells when asked; with interrupt remapping, the routes it translates
//! ([`crate::devices::vtd::intremap`]) and the watcher of the signals it blocks.

use std::sync::{Arc, Mutex};

use kvm_ioctls::VmFd;
use passthrough::kvm::Irqchip;
use vm_memory::GuestMemoryMmap;

use super::{DeviceManager, DeviceManagerError};
use crate::arch::x86_64::layout::{VTD_REGS_SIZE, VTD_REGS_START};
use crate::config::ViommuConfig;
use crate::devices::bus::Bus;
use crate::devices::ioapic::kvm::KvmIoapic;
use crate::devices::ioapic::IOAPIC_SOURCE_ID;
use crate::devices::vtd::blocked::{BlockedSignalHandler, BlockedSignalSet};
use crate::devices::vtd::doorbell::QueueDoorbells;
use crate::devices::vtd::intremap::{InterruptRemapping, IoapicRemapping};
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
    /// The epoll set for the signals interrupt remapping blocks could not be created.
    #[error("cannot create the set of blocked interrupt signals: {0}")]
    BlockedSignals(#[source] std::io::Error),
    /// The recording file could not be created.
    #[error("cannot create the VT-d recording {path}: {source}")]
    RecordFile {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// More injections than the unit keeps armed at once.
    #[error("too many VT-d fault injections armed at once (at {0})")]
    TooManyInjections(viommu::inject::Injection),
}

/// Interrupt remapping over the VM's split irqchip: the routes the unit translates and the
/// signals it blocks, which the event loop takes ([`Remapping::blocked_handler`]).
pub struct Remapping {
    routes: Arc<InterruptRemapping>,
    blocked: Arc<BlockedSignalSet>,
    vtd: SharedVtd,
    vm: Arc<VmFd>,
}

impl Remapping {
    /// The routes every interrupt source behind the unit goes through.
    pub fn routes(&self) -> &Arc<InterruptRemapping> {
        &self.routes
    }

    /// The eventfds of the routes blocked now.
    pub fn blocked(&self) -> &Arc<BlockedSignalSet> {
        &self.blocked
    }

    /// What the event loop runs to take blocked signals.
    pub fn blocked_handler(&self) -> BlockedSignalHandler {
        BlockedSignalHandler {
            set: self.blocked.clone(),
            remapping: self.routes.clone(),
            vtd: self.vtd.clone(),
            vm: self.vm.clone(),
        }
    }
}

/// Puts every interrupt source of `vm` behind `unit`'s interrupt remapping: the unit
/// re-translates the routes, KVM's table hands the eventfds of blocked routes to a watcher,
/// the IOAPIC's pins and deliveries go through the unit. None when there is nothing to remap
/// (a VM without the split irqchip: no irqchip at all, since the builder refuses remapping
/// with KVM's IOAPIC).
pub(super) fn wire_interrupt_remapping(
    unit: &SharedVtd,
    vm: &Vm,
    ioapic: Option<&KvmIoapic>,
) -> Result<Option<Remapping>, VtdSetupError> {
    let Some(routing) = vm.routing().filter(|r| r.irqchip() == Irqchip::Split) else {
        return Ok(None);
    };
    let routes = InterruptRemapping::new(routing.clone());
    let blocked = BlockedSignalSet::new().map_err(VtdSetupError::BlockedSignals)?;
    // One VT-d a VM: the table has no watcher yet.
    let _ = routing.set_blocked_signals(blocked.clone());
    unit.lock().set_interrupt_routes(routes.holder());
    if let Some(io) = ioapic {
        let remapping = IoapicRemapping {
            vtd: unit.clone(),
            remapping: routes.clone(),
        };
        // A fresh IOAPIC, never put behind a unit before.
        let _ = io.set_remapping(remapping);
    }
    Ok(Some(Remapping {
        routes,
        blocked,
        vtd: unit.clone(),
        vm: vm.shared_fd(),
    }))
}

/// Creates the virtual VT-d with an `aw_bits` address width (`c`'s, or the one chosen for
/// it) and puts its registers on `mmio` at [`VTD_REGS_START`], with the faults `c` injects
/// from the start armed. Caching mode is on unless `c` turns it off (the command line refuses
/// that with a passed-through device, which needs it).
pub(super) fn create_vtd(
    c: ViommuConfig,
    aw_bits: u32,
    vm: &Vm,
    mem: &GuestMemoryMmap,
    mmio: &Bus,
) -> Result<SharedVtd, DeviceManagerError> {
    let config = viommu::VtdConfig {
        aw_bits,
        caching_mode: c.caching_mode,
        flush: if c.deferred {
            viommu::FlushMode::DEFERRED_DEFAULT
        } else {
            viommu::FlushMode::Strict
        },
        scalable_mode: c.scalable_mode,
        first_stage: c.first_stage,
        interrupt_remapping: c.intremap,
        x2apic: c.intremap && c.eim,
        unverified_source: (!c.ioapic_sid_check).then_some(IOAPIC_SOURCE_ID),
        caches: c.caches,
        check: c.check,
        device_iotlb: c.device_iotlb,
        ..viommu::VtdConfig::default()
    };
    let interrupts = KvmMsi::new(vm.shared_fd());
    let mut unit = viommu::Vtd::new(
        config,
        mem.clone(),
        Box::new(interrupts.clone()),
        Box::new(viommu::SystemClock::default()),
    )
    .map_err(VtdSetupError::Model)?;
    for i in c.inject {
        if !unit.inject(i) {
            return Err(VtdSetupError::TooManyInjections(i).into());
        }
    }
    if let Some(path) = &c.record {
        let recorder =
            viommu::record::Recorder::create(path, c.record_limit).map_err(|source| {
                VtdSetupError::RecordFile {
                    path: path.clone(),
                    source,
                }
            })?;
        // A unit fresh from Vtd::new always takes a recording.
        let _ = unit.start_recording(recorder);
        log::info!("VT-d: recording to {}", path.display());
    }
    // Register reads as memory loads where KVM can map a read-only page; writes still trap.
    let mirror = if vm.has_readonly_mem() {
        Some(RegisterMirror::map(vm, VTD_REGS_START).map_err(VtdSetupError::RegisterPage)?)
    } else {
        log::info!("KVM cannot map read-only memory: VT-d register reads will exit");
        None
    };
    let shared = VtdUnit::new(unit, mirror, Some(interrupts));
    if let Some(path) = c.inject_control {
        // A fresh unit has no control file yet.
        let _ = shared.set_inject_control(path);
    }
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
