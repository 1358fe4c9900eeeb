//! The unit's interrupt remapping over KVM: every interrupt source behind the unit has its
//! requests translated by the guest's interrupt remapping table before KVM sees them.
//!
//! - Passed-through MSI/MSI-X vectors ([`RemappedIrqRoutes`], the `IrqRoutes` of a device
//!   behind the unit) and the IOAPIC's pins ([`IoapicRemapping`]): KVM's GSI route holds the
//!   *translated* message, so KVM keeps delivering from the eventfd without a trip to user
//!   space. [`InterruptRemapping`] keeps each route's requester ID and guest message, and the
//!   unit calls its [`InterruptRoutes::retranslate`] at each interrupt-entry-cache invalidation
//!   (and SIRTP, IRE, CFI change): the routes are translated again and KVM's table updated with
//!   one KVM_SET_GSI_ROUTING. A route whose translation faults has no KVM route; its eventfds
//!   are watched in user space meanwhile ([`super::blocked`]), and each signal goes through
//!   [`Vtd::remap_interrupt`], which records the fault (or delivers, once it translates again).
//! - The IOAPIC's own deliveries and emulated devices' MSIs ([`DeviceMsi`]) are requests:
//!   [`Vtd::remap_interrupt`], then KVM_SIGNAL_MSI for what it lets through.
//! - The unit's fault-event and completion interrupts are not remapped (the VT-d spec exempts
//!   interrupts the unit generates itself):
//!   [`super::KvmMsi`] sends them as they are.
//!
//! Lock order, which every path here follows: a device's lock (a passed-through function's, the
//! IOAPIC's), then the unit's ([`VtdUnit::lock`]), then the routes' ([`InterruptRemapping`]'s
//! own), then KVM's routing table ([`KvmRouting`]), then the blocked-signal watcher's registry.
//! The unit calls `retranslate` holding its own lock and the routes never call a device, so a
//! translation and the KVM update it leads to are never interleaved with another.
//!
//! [`Vtd::remap_interrupt`]: viommu::Vtd::remap_interrupt

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use kvm_ioctls::VmFd;
use passthrough::irq::{IrqRoutes, RouteError};
use passthrough::kvm::{KvmIrqRoutes, KvmRouting, PinRoute, RouteBatch, SignalSource};
use viommu::intremap::{IecScope, InterruptRoutes, Translate};
use viommu::SourceId;
use vm_device::interrupt::{MsiMessage, MsiSender};
use vm_device::warn_limited;
use vmm_sys_util::eventfd::EventFd;

use super::{SharedVtd, VtdUnit};
use crate::devices::ioapic::{PinState, TriggerMode, IOAPIC_NUM_PINS, IOAPIC_SOURCE_ID};
use crate::vstate::vm::signal_msi;

/// A passed-through vector's route.
struct MsiRoute {
    source: SourceId,
    /// What the guest programmed (MSI capability or MSI-X table entry).
    guest: MsiMessage,
    /// What KVM delivers: the translation, None while it faults.
    translated: Option<MsiMessage>,
}

/// An IOAPIC pin's route, as the IOAPIC last reported its entry.
#[derive(Clone, Copy)]
struct PinRouteState {
    guest: MsiMessage,
    masked: bool,
    level: bool,
    translated: Option<MsiMessage>,
}

impl PinRouteState {
    fn route(&self) -> PinRoute {
        PinRoute {
            message: self.translated,
            masked: self.masked,
            level: self.level,
        }
    }
}

#[derive(Default)]
struct Routes {
    msi: BTreeMap<u32, MsiRoute>,
    pins: [Option<PinRouteState>; IOAPIC_NUM_PINS],
}

/// The routes of every interrupt source behind the unit: what each requests (requester ID and
/// guest message) and what KVM delivers for it.
pub struct InterruptRemapping {
    routing: Arc<KvmRouting>,
    routes: Mutex<Routes>,
}

impl InterruptRemapping {
    /// The routes over `routing`, the VM's table (split irqchip).
    pub fn new(routing: Arc<KvmRouting>) -> Arc<Self> {
        Arc::new(InterruptRemapping {
            routing,
            routes: Mutex::new(Routes::default()),
        })
    }

    /// The handle the unit re-translates the routes through (for
    /// [`viommu::Vtd::set_interrupt_routes`]).
    pub fn holder(self: &Arc<Self>) -> Box<dyn InterruptRoutes> {
        Box::new(RouteHolder(self.clone()))
    }

    /// The VM's routing table.
    pub fn routing(&self) -> &Arc<KvmRouting> {
        &self.routing
    }

    fn lock(&self) -> MutexGuard<'_, Routes> {
        self.routes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets the route of `gsi` to what `source`'s `guest` message translates to now.
    fn set_msi(
        &self,
        vtd: &VtdUnit,
        source: SourceId,
        gsi: u32,
        guest: MsiMessage,
    ) -> Result<(), RouteError> {
        // Held until KVM has the route: an invalidation cannot slip in between.
        let mut unit = vtd.lock();
        let translated = unit.translate_route(source, guest).ok();
        let mut routes = self.lock();
        routes.msi.insert(
            gsi,
            MsiRoute {
                source,
                guest,
                translated,
            },
        );
        self.routing
            .apply(RouteBatch::default().msi(gsi, translated))
    }

    /// The IOAPIC reported `pin`'s entry: its route follows the entry's translation.
    fn set_pin(&self, vtd: &VtdUnit, pin: u8, state: PinState) -> Result<(), RouteError> {
        let mut unit = vtd.lock();
        let translated = unit.translate_route(IOAPIC_SOURCE_ID, state.message).ok();
        let route = PinRouteState {
            guest: state.message,
            masked: state.masked,
            level: state.trigger == TriggerMode::Level,
            translated,
        };
        let mut routes = self.lock();
        if let Some(slot) = routes.pins.get_mut(usize::from(pin)) {
            *slot = Some(route);
        }
        self.routing.set_ioapic_pin(u32::from(pin), route.route())
    }

    /// A signal KVM could not deliver on `gsi` (see [`super::blocked`]): the request it stands
    /// for goes through the unit, which records the fault or, when the route translates by now,
    /// lets it through to KVM_SIGNAL_MSI.
    pub(super) fn request_blocked(&self, vtd: &VtdUnit, vm: &VmFd, gsi: u32, from: SignalSource) {
        let mut unit = vtd.lock();
        let request = {
            let routes = self.lock();
            match from {
                SignalSource::Msi => routes.msi.get(&gsi).map(|r| (r.source, r.guest)),
                // A masked pin sends nothing (its line's signal is dropped, as KVM would).
                SignalSource::IoapicPin(pin) => routes
                    .pins
                    .get(pin as usize)
                    .copied()
                    .flatten()
                    .filter(|p| !p.masked)
                    .map(|p| (IOAPIC_SOURCE_ID, p.guest)),
            }
        };
        let Some((source, guest)) = request else {
            return;
        };
        if let Some(out) = unit.remap_interrupt(source, guest) {
            drop(unit);
            signal_msi(vm, out, "blocked signal");
        }
    }
}

/// The unit's view of the routes.
struct RouteHolder(Arc<InterruptRemapping>);

impl InterruptRoutes for RouteHolder {
    fn retranslate(&mut self, scope: IecScope, translate: &mut Translate<'_>) {
        let mut routes = self.0.lock();
        let mut batch = RouteBatch::default();
        for (&gsi, r) in routes
            .msi
            .iter_mut()
            .filter(|(_, r)| scope.covers(&r.guest))
        {
            let translated = translate(r.source, r.guest).ok();
            if translated != r.translated {
                r.translated = translated;
                batch.msi(gsi, translated);
            }
        }
        for (pin, slot) in routes.pins.iter_mut().enumerate() {
            let Some(p) = slot.as_mut().filter(|p| scope.covers(&p.guest)) else {
                continue;
            };
            let translated = translate(IOAPIC_SOURCE_ID, p.guest).ok();
            if translated != p.translated {
                p.translated = translated;
                batch.pin(pin as u32, p.route());
            }
        }
        if batch.is_empty() {
            return;
        }
        if let Err(e) = self.0.routing.apply(&batch) {
            warn_limited!("interrupt remapping: updating KVM's routes: {e}");
        }
    }
}

/// The `IrqRoutes` of a passed-through function behind the unit: its MSI/MSI-X routes carry
/// the translations of its messages as requests of `source`; GSIs, irqfds and INTx lines are
/// the VM table's ([`KvmIrqRoutes`]).
pub struct RemappedIrqRoutes {
    source: SourceId,
    vtd: SharedVtd,
    remapping: Arc<InterruptRemapping>,
    table: KvmIrqRoutes,
}

impl RemappedIrqRoutes {
    /// The routes of the function with requester ID `source`.
    pub fn new(source: SourceId, vtd: SharedVtd, remapping: Arc<InterruptRemapping>) -> Self {
        let table = remapping.routing.routes();
        RemappedIrqRoutes {
            source,
            vtd,
            remapping,
            table,
        }
    }
}

impl IrqRoutes for RemappedIrqRoutes {
    fn allocate_gsi(&mut self) -> Result<u32, RouteError> {
        self.table.allocate_gsi()
    }

    fn free_gsi(&mut self, gsi: u32) {
        self.remapping.lock().msi.remove(&gsi);
        self.table.free_gsi(gsi);
    }

    fn set_msi_route(&mut self, gsi: u32, msg: MsiMessage) -> Result<(), RouteError> {
        self.remapping.set_msi(&self.vtd, self.source, gsi, msg)
    }

    fn attach_irqfd(
        &mut self,
        fd: &EventFd,
        gsi: u32,
        resample: Option<&EventFd>,
    ) -> Result<(), RouteError> {
        self.table.attach_irqfd(fd, gsi, resample)
    }

    fn detach_irqfd(&mut self, fd: &EventFd, gsi: u32) -> Result<(), RouteError> {
        self.table.detach_irqfd(fd, gsi)
    }
}

/// The IOAPIC behind the unit: its requester ID is [`IOAPIC_SOURCE_ID`], its pins' routes are
/// [`InterruptRemapping`]'s, its deliveries requests to the unit.
#[derive(Clone)]
pub struct IoapicRemapping {
    pub vtd: SharedVtd,
    pub remapping: Arc<InterruptRemapping>,
}

impl IoapicRemapping {
    /// `pin`'s entry changed: its route follows the entry's translation.
    pub fn pin_changed(&self, pin: u8, state: PinState) -> Result<(), RouteError> {
        self.remapping.set_pin(&self.vtd, pin, state)
    }

    /// The IOAPIC sends `message` now: what the unit lets through, None when it blocks it
    /// (having recorded the fault).
    pub fn request(&self, message: MsiMessage) -> Option<MsiMessage> {
        self.vtd.lock().remap_interrupt(IOAPIC_SOURCE_ID, message)
    }
}

/// How an emulated device raises its MSIs ([`MsiSender`]): as requests of its requester ID,
/// through the unit when it sits behind one, then KVM_SIGNAL_MSI.
pub struct DeviceMsi {
    source: SourceId,
    vtd: Option<SharedVtd>,
    vm: Arc<VmFd>,
}

impl DeviceMsi {
    /// The sender of the device with requester ID `source`, behind `vtd` if given.
    pub fn new(source: SourceId, vtd: Option<SharedVtd>, vm: Arc<VmFd>) -> Self {
        DeviceMsi { source, vtd, vm }
    }
}

impl MsiSender for DeviceMsi {
    fn send(&self, message: MsiMessage) {
        let out = match &self.vtd {
            Some(vtd) => vtd.lock().remap_interrupt(self.source, message),
            None => Some(message),
        };
        if let Some(out) = out {
            signal_msi(&self.vm, out, "emulated device");
        }
    }
}

#[cfg(test)]
#[path = "intremap_tests.rs"]
mod tests;
