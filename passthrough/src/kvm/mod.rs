//! The KVM side of interrupt delivery: one GSI routing table shared by every interrupt source
//! of a VM, and KVM's VFIO pseudo-device.
//!
//! KVM_SET_GSI_ROUTING replaces the whole table, so the table holds all of it: the fixed part
//! the irqchip needs, then one MSI entry per passed-through vector from GSI 24 up. Changes that
//! belong together (an interrupt-remapping invalidation re-translating many routes) go to KVM
//! as one [`RouteBatch`], one KVM_SET_GSI_ROUTING.
//!
//! With the in-kernel irqchip the fixed part is KVM's default irqchip entries (what
//! KVM_CREATE_IRQCHIP installs: GSI 0-15 to the PIC and IOAPIC, 16-23 to the IOAPIC).
//!
//! With the split irqchip (KVM_CAP_SPLIT_IRQCHIP) the IOAPIC is the VMM's and KVM refuses
//! irqchip entries and resample irqfds. GSI `pin` (0..24) then carries the message the IOAPIC
//! entry of `pin` makes, masked or not: KVM derives from the level-triggered routes of those
//! GSIs which vectors' EOIs exit to user space (KVM_EXIT_IOAPIC_EOI), so an interrupt in service
//! on a pin the guest masked meanwhile still has its EOI reach the IOAPIC. A line KVM injects
//! from an eventfd (a VFIO INTx, the serial port) gets a GSI of its own from 24 up, whose route
//! carries the pin's message while the entry is unmasked and is absent while it is masked, so
//! KVM drops what the line signals then, as the 82093AA ignores a masked pin. Its resample
//! eventfd, which KVM would signal at EOI, is signalled by [`KvmRouting::ioapic_eoi`] and when
//! a level-triggered pin is unmasked (a level line whose signal was dropped asserts again).
//!
//! With interrupt remapping the messages in the table are the translated ones, and a message
//! the remapping unit blocks has no route: an MSI route or a pin is then *blocked*. Rather than
//! let KVM drop the signals of a blocked route, the table takes its eventfds away from KVM and
//! hands them to the [`BlockedSignals`] watcher, which turns each signal into a request the unit
//! sees (and faults); once the route translates again they go back to KVM. Lines of a masked
//! pin stay with KVM, blocked or not: a masked pin sends nothing to block.
//!
//! Lock order: the table's lock is taken after the caller's (a device's, the IOAPIC's, the
//! remapping unit's) and before the watcher's.

mod table;
#[cfg(test)]
mod tests;

use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use kvm_bindings::{kvm_create_device, kvm_device_type_KVM_DEV_TYPE_VFIO, KvmIrqRouting};
use kvm_ioctls::VmFd;
use vfio_ioctls::VfioDeviceFd;
use vm_device::interrupt::MsiMessage;
use vmm_sys_util::eventfd::EventFd;

use crate::irq::{IrqRoutes, RouteError};
use table::{Irqfd, PinLine, Table};

/// IOAPIC pins (GSIs 0..24) in KVM's default routing, and the GSIs KVM reserves for the
/// user-space IOAPIC with the split irqchip.
pub const IOAPIC_PINS: u32 = 24;
/// KVM_MAX_IRQ_ROUTES on x86.
pub const MAX_ROUTES: u32 = 4096;

/// Where the VM's IOAPIC (and PIC) live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Irqchip {
    /// KVM_CREATE_IRQCHIP: PIC, IOAPIC and local APICs in KVM.
    Kernel,
    /// KVM_CAP_SPLIT_IRQCHIP: local APICs in KVM, the IOAPIC in user space.
    Split,
}

/// What the IOAPIC entry of a pin asks of KVM (split irqchip).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PinRoute {
    /// The message KVM delivers for the pin: the entry's, or its translation when interrupt
    /// remapping is on; None while interrupt remapping blocks it.
    pub message: Option<MsiMessage>,
    pub masked: bool,
    pub level: bool,
}

/// Route changes that go to KVM together, in one KVM_SET_GSI_ROUTING. A GSI or pin named twice
/// keeps its last change.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RouteBatch {
    msi: Vec<(u32, Option<MsiMessage>)>,
    pins: Vec<(u32, PinRoute)>,
}

impl RouteBatch {
    /// MSI route `gsi` delivers `message`; None: interrupt remapping blocks it.
    pub fn msi(&mut self, gsi: u32, message: Option<MsiMessage>) -> &mut Self {
        self.msi.retain(|(g, _)| *g != gsi);
        self.msi.push((gsi, message));
        self
    }

    /// IOAPIC pin `pin` is routed as `route` says (split irqchip).
    pub fn pin(&mut self, pin: u32, route: PinRoute) -> &mut Self {
        self.pins.retain(|(p, _)| *p != pin);
        self.pins.push((pin, route));
        self
    }

    pub fn is_empty(&self) -> bool {
        self.msi.is_empty() && self.pins.is_empty()
    }
}

/// What a blocked signal was for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SignalSource {
    /// An MSI route (a passed-through vector): each signal is a request of its message.
    Msi,
    /// A line of IOAPIC pin `pin`: each signal is the pin's interrupt.
    IoapicPin(u32),
}

/// The watcher of blocked signals: while interrupt remapping blocks a route, the eventfds KVM
/// would inject on it are the watcher's, so that each signal still reaches the remapping unit
/// (as a request it blocks, or one it delivers once it translates again). Called with the
/// routing table locked: it must not call back into the table.
pub trait BlockedSignals: Send + Sync {
    /// From now on the signals of `fd`, injected on `gsi` for `source`, are the watcher's.
    fn watch(&self, gsi: u32, source: SignalSource, fd: &EventFd);
    /// `gsi`'s eventfd went back to KVM, or away.
    fn unwatch(&self, gsi: u32);
}

/// The VM's GSI routing table.
pub struct KvmRouting {
    vm: Arc<VmFd>,
    irqchip: Irqchip,
    table: Mutex<Table>,
    /// Who takes blocked signals; without one they stay with KVM, which drops them.
    blocked: OnceLock<Arc<dyn BlockedSignals>>,
    /// KVM_SET_GSI_ROUTING calls made.
    updates: AtomicU64,
}

/// What happens to the eventfds of a pin's lines or an MSI route around a table update.
#[derive(Default)]
struct Moves {
    /// Pins whose lines KVM gets back after the update (deassigned before it, or watched).
    assign_lines: Vec<u32>,
    /// Pins whose lines go to the watcher after the update.
    watch_lines: Vec<u32>,
    /// Level-triggered pins whose lines' resample eventfds are signalled last.
    resample: Vec<u32>,
    /// MSI GSIs whose irqfd KVM gets back after the update.
    assign_msi: Vec<u32>,
    /// MSI GSIs whose irqfd goes to the watcher after the update.
    watch_msi: Vec<u32>,
}

impl KvmRouting {
    /// The table of a VM whose irqchip is `irqchip`.
    pub fn new(vm: Arc<VmFd>, irqchip: Irqchip) -> Arc<Self> {
        Arc::new(Self {
            vm,
            irqchip,
            table: Mutex::new(Table::new(irqchip)),
            blocked: OnceLock::new(),
            updates: AtomicU64::new(0),
        })
    }

    /// The irqchip the table is for.
    pub fn irqchip(&self) -> Irqchip {
        self.irqchip
    }

    /// A handle implementing [`IrqRoutes`] for one device.
    pub fn routes(self: &Arc<Self>) -> KvmIrqRoutes {
        KvmIrqRoutes(self.clone())
    }

    /// Hands blocked signals to `watcher` from now on (see [`BlockedSignals`]). Once, before any
    /// route is blocked; Err(watcher) if one is already set.
    pub fn set_blocked_signals(
        &self,
        watcher: Arc<dyn BlockedSignals>,
    ) -> Result<(), Arc<dyn BlockedSignals>> {
        self.blocked.set(watcher)
    }

    /// KVM_SET_GSI_ROUTING calls made so far.
    pub fn updates(&self) -> u64 {
        self.updates.load(Ordering::Relaxed)
    }

    /// What KVM delivers for MSI route `gsi`; None when it has no route (none set, or blocked).
    pub fn msi_route(&self, gsi: u32) -> Option<MsiMessage> {
        self.lock().msi.get(&gsi).copied().flatten()
    }

    /// What KVM delivers for IOAPIC pin `pin` (split irqchip); None when it has no route.
    pub fn pin_route(&self, pin: u32) -> Option<MsiMessage> {
        self.lock().pins.get(pin as usize).and_then(|p| p.message)
    }

    fn lock(&self) -> MutexGuard<'_, table::Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn commit(&self, t: &Table, gsi: u32) -> Result<(), RouteError> {
        let routing = KvmIrqRouting::from_entries(&t.entries(self.irqchip))
            .map_err(|source| RouteError::Table { gsi, source })?;
        self.updates.fetch_add(1, Ordering::Relaxed);
        self.vm
            .set_gsi_routing(&routing)
            .map_err(|source| RouteError::Kvm {
                what: "KVM_SET_GSI_ROUTING",
                gsi,
                source,
            })
    }

    /// Assigns `irqfd` to `gsi`, or deassigns it (which returns once KVM injected what it had
    /// pending).
    fn set_irqfd(&self, irqfd: &Irqfd, gsi: u32, assign: bool) -> Result<(), RouteError> {
        let (done, what) = if assign {
            (self.vm.register_irqfd(&irqfd.fd, gsi), "KVM_IRQFD")
        } else {
            (
                self.vm.unregister_irqfd(&irqfd.fd, gsi),
                "KVM_IRQFD deassign",
            )
        };
        done.map_err(|source| RouteError::Kvm { what, gsi, source })
    }

    fn set_lines(&self, t: &Table, pin: u32, assign: bool) -> Result<(), RouteError> {
        let mut result = Ok(());
        for line in &t.pins[pin as usize].lines {
            result = result.and(self.set_irqfd(&line.irqfd, line.gsi, assign));
        }
        result
    }

    /// Applies `batch` with one KVM_SET_GSI_ROUTING (none when nothing changed), moving the
    /// eventfds of routes that become blocked to the watcher and back. Unmasking a
    /// level-triggered pin, or unblocking an unmasked one, signals its lines' resample eventfds.
    /// Every change is carried out even when one fails; the first failure is returned.
    pub fn apply(&self, batch: &RouteBatch) -> Result<(), RouteError> {
        if let Some(&(pin, _)) = batch.pins.first() {
            if self.irqchip != Irqchip::Split {
                return Err(RouteError::NotSplit { pin });
            }
        }
        let mut t = self.lock();
        if let Some(&(pin, _)) = batch.pins.iter().find(|(p, _)| *p >= t.pins.len() as u32) {
            return Err(RouteError::NoSuchPin { pin });
        }
        let watcher = self.blocked.get();
        let mut result = Ok(());
        let mut moves = Moves::default();
        let mut dirty = None;
        for &(pin, route) in &batch.pins {
            let p = &t.pins[pin as usize];
            let was_watched = watcher.is_some() && p.watched();
            let watched = watcher.is_some() && !route.masked && route.message.is_none();
            let unmasked = p.masked && !route.masked;
            if (p.message, p.masked) != (route.message, route.masked) {
                dirty = dirty.or(Some(pin));
            }
            match (was_watched, watched) {
                (false, true) => {
                    result = result.and(self.set_lines(&t, pin, false));
                    moves.watch_lines.push(pin);
                }
                (true, false) => {
                    if let Some(w) = watcher {
                        for line in &p.lines {
                            w.unwatch(line.gsi);
                        }
                    }
                    moves.assign_lines.push(pin);
                    if route.level && !route.masked {
                        moves.resample.push(pin);
                    }
                }
                // A signal that finds no route is injected later by a KVM work item that looks
                // the route up again, so an edge a line gave while the pin was masked would
                // arrive once it is unmasked. Deassigning the irqfds first waits for those
                // items, which still find no route: the edge is lost, as the 82093AA loses an
                // edge on a masked pin.
                (false, false) if unmasked => {
                    result = result.and(self.set_lines(&t, pin, false));
                    moves.assign_lines.push(pin);
                    if route.level {
                        moves.resample.push(pin);
                    }
                }
                _ => {}
            }
            let p = &mut t.pins[pin as usize];
            p.message = route.message;
            p.masked = route.masked;
        }
        for &(gsi, message) in &batch.msi {
            let was_blocked = t.msi_blocked(gsi);
            if let (Some(w), Some(irqfd)) = (watcher, t.irqfds.get(&gsi)) {
                match (was_blocked, message.is_none()) {
                    (false, true) => {
                        result = result.and(self.set_irqfd(irqfd, gsi, false));
                        moves.watch_msi.push(gsi);
                    }
                    (true, false) => {
                        w.unwatch(gsi);
                        moves.assign_msi.push(gsi);
                    }
                    _ => {}
                }
            }
            if t.msi.insert(gsi, message) != Some(message) {
                dirty = dirty.or(Some(gsi));
            }
        }
        if let Some(gsi) = dirty {
            result = result.and(self.commit(&t, gsi));
        }
        // After the routes: KVM injects what an eventfd already holds when it is assigned.
        for &pin in &moves.assign_lines {
            result = result.and(self.set_lines(&t, pin, true));
        }
        for &gsi in &moves.assign_msi {
            if let Some(irqfd) = t.irqfds.get(&gsi) {
                result = result.and(self.set_irqfd(irqfd, gsi, true));
            }
        }
        if let Some(w) = watcher {
            for &pin in &moves.watch_lines {
                for line in &t.pins[pin as usize].lines {
                    w.watch(line.gsi, SignalSource::IoapicPin(pin), &line.irqfd.fd);
                }
            }
            for &gsi in &moves.watch_msi {
                if let Some(irqfd) = t.irqfds.get(&gsi) {
                    w.watch(gsi, SignalSource::Msi, &irqfd.fd);
                }
            }
        }
        // Last: the line may signal again at once, and its route must be there.
        for &pin in &moves.resample {
            t.pins[pin as usize].signal_resample(pin);
        }
        result
    }

    /// Split irqchip: the IOAPIC entry of `pin` now asks for `route`. Routes GSI `pin` and the
    /// pin's lines accordingly (see [`Self::apply`]).
    pub fn set_ioapic_pin(&self, pin: u32, route: PinRoute) -> Result<(), RouteError> {
        self.apply(RouteBatch::default().pin(pin, route))
    }

    /// Split irqchip: the EOI of level-triggered `pin` arrived; its lines' resample eventfds
    /// are signalled (what KVM does for resample irqfds with its own IOAPIC).
    pub fn ioapic_eoi(&self, pin: u32) {
        if let Some(p) = self.lock().pins.get(pin as usize) {
            p.signal_resample(pin);
        }
    }

    /// Split irqchip: KVM injects IOAPIC pin `pin` whenever `fd` is signalled, while the pin
    /// is unmasked; `resample` is signalled at the pin's EOI.
    pub fn attach_ioapic_line(
        &self,
        pin: u32,
        fd: &EventFd,
        resample: Option<&EventFd>,
    ) -> Result<(), RouteError> {
        if self.irqchip != Irqchip::Split {
            return Err(RouteError::NotSplit { pin });
        }
        let resample = resample
            .map(EventFd::try_clone)
            .transpose()
            .map_err(|source| RouteError::ResampleFd { pin, source })?;
        let dup = fd
            .try_clone()
            .map_err(|source| RouteError::TriggerFd { pin, source })?;
        let mut t = self.lock();
        let watched = match t.pins.get(pin as usize) {
            Some(p) => p.watched() && self.blocked.get().is_some(),
            None => return Err(RouteError::NoSuchPin { pin }),
        };
        let gsi = t.allocate_gsi()?;
        let line = PinLine {
            irqfd: Irqfd {
                trigger: fd.as_raw_fd(),
                fd: dup,
            },
            gsi,
            resample,
        };
        // The route first: KVM injects what `fd` already holds when the irqfd is registered.
        let attached = self
            .commit(&t, gsi)
            .and_then(|()| match self.blocked.get() {
                Some(w) if watched => {
                    w.watch(gsi, SignalSource::IoapicPin(pin), &line.irqfd.fd);
                    Ok(())
                }
                _ => self.set_irqfd(&line.irqfd, gsi, true),
            });
        match attached {
            Ok(()) => t.pins[pin as usize].lines.push(line),
            Err(_) => {
                t.used.remove(&gsi);
                if let Err(e) = self.commit(&t, gsi) {
                    vm_device::warn_limited!("{e}");
                }
            }
        }
        attached
    }

    /// Split irqchip: stops injecting `fd` (attached with [`Self::attach_ioapic_line`]).
    pub fn detach_ioapic_line(&self, pin: u32, fd: &EventFd) -> Result<(), RouteError> {
        let mut t = self.lock();
        let p = t
            .pins
            .get_mut(pin as usize)
            .ok_or(RouteError::NoSuchPin { pin })?;
        let at = p
            .lines
            .iter()
            .position(|l| l.irqfd.trigger == fd.as_raw_fd())
            .ok_or(RouteError::NotAttached {
                pin,
                fd: fd.as_raw_fd(),
            })?;
        let line = p.lines.remove(at);
        let watched = p.watched();
        t.used.remove(&line.gsi);
        let unregistered = match self.blocked.get() {
            Some(w) if watched => {
                w.unwatch(line.gsi);
                Ok(())
            }
            _ => self.set_irqfd(&line.irqfd, line.gsi, false),
        };
        self.commit(&t, line.gsi)?;
        unregistered
    }

    /// KVM injects MSI route `gsi` (from [`IOAPIC_PINS`] up) whenever `fd` is signalled; while
    /// the route is blocked, `fd` is the watcher's.
    fn attach_msi_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<(), RouteError> {
        let mut t = self.lock();
        if t.irqfds.contains_key(&gsi) {
            return Err(RouteError::IrqfdTaken { gsi });
        }
        let irqfd = Irqfd {
            trigger: fd.as_raw_fd(),
            fd: fd
                .try_clone()
                .map_err(|source| RouteError::IrqfdDup { gsi, source })?,
        };
        match self.blocked.get() {
            Some(w) if t.msi_blocked(gsi) => w.watch(gsi, SignalSource::Msi, &irqfd.fd),
            _ => self.set_irqfd(&irqfd, gsi, true)?,
        }
        t.irqfds.insert(gsi, irqfd);
        Ok(())
    }

    /// Stops injecting the irqfd of MSI route `gsi`: the one of `trigger`, or whichever is there
    /// when None. None when there is no such irqfd.
    fn detach_msi_irqfd(
        &self,
        t: &mut Table,
        gsi: u32,
        trigger: Option<RawFd>,
    ) -> Option<Result<(), RouteError>> {
        let irqfd = t.irqfds.get(&gsi)?;
        if trigger.is_some_and(|fd| fd != irqfd.trigger) {
            return None;
        }
        let irqfd = t.irqfds.remove(&gsi)?;
        Some(match self.blocked.get() {
            Some(w) if t.msi_blocked(gsi) => {
                w.unwatch(gsi);
                Ok(())
            }
            _ => self.set_irqfd(&irqfd, gsi, false),
        })
    }
}

/// One device's view of the shared routing table. With the split irqchip, an irqfd on an
/// IOAPIC pin's GSI (INTx) becomes a line of that pin.
pub struct KvmIrqRoutes(Arc<KvmRouting>);

impl KvmIrqRoutes {
    fn is_ioapic_line(&self, gsi: u32) -> bool {
        self.0.irqchip == Irqchip::Split && gsi < IOAPIC_PINS
    }

    /// The table this handle routes through.
    pub fn routing(&self) -> &Arc<KvmRouting> {
        &self.0
    }
}

impl IrqRoutes for KvmIrqRoutes {
    fn allocate_gsi(&mut self) -> Result<u32, RouteError> {
        self.0.lock().allocate_gsi()
    }

    fn free_gsi(&mut self, gsi: u32) {
        let mut t = self.0.lock();
        t.used.remove(&gsi);
        // An irqfd left attached would keep injecting on a GSI another device may get next.
        if let Some(Err(e)) = self.0.detach_msi_irqfd(&mut t, gsi, None) {
            vm_device::warn_limited!("{e}");
        }
        if t.msi.remove(&gsi).is_some() {
            if let Err(e) = self.0.commit(&t, gsi) {
                vm_device::warn_limited!("{e}");
            }
        }
    }

    fn set_msi_route(&mut self, gsi: u32, msg: MsiMessage) -> Result<(), RouteError> {
        self.0.apply(RouteBatch::default().msi(gsi, Some(msg)))
    }

    fn attach_irqfd(
        &mut self,
        fd: &EventFd,
        gsi: u32,
        resample: Option<&EventFd>,
    ) -> Result<(), RouteError> {
        if self.is_ioapic_line(gsi) {
            return self.0.attach_ioapic_line(gsi, fd, resample);
        }
        let r = match resample {
            Some(_) if self.0.irqchip == Irqchip::Split => {
                return Err(RouteError::ResampleNotPin { gsi })
            }
            Some(rfd) => self.0.vm.register_irqfd_with_resample(fd, rfd, gsi),
            None if gsi >= IOAPIC_PINS => return self.0.attach_msi_irqfd(fd, gsi),
            None => self.0.vm.register_irqfd(fd, gsi),
        };
        r.map_err(|source| RouteError::Kvm {
            what: "KVM_IRQFD",
            gsi,
            source,
        })
    }

    fn detach_irqfd(&mut self, fd: &EventFd, gsi: u32) -> Result<(), RouteError> {
        if self.is_ioapic_line(gsi) {
            return self.0.detach_ioapic_line(gsi, fd);
        }
        let mut t = self.0.lock();
        if let Some(r) = self.0.detach_msi_irqfd(&mut t, gsi, Some(fd.as_raw_fd())) {
            return r;
        }
        drop(t);
        self.0
            .vm
            .unregister_irqfd(fd, gsi)
            .map_err(|source| RouteError::Kvm {
                what: "KVM_IRQFD deassign",
                gsi,
                source,
            })
    }
}

/// Creates KVM's VFIO pseudo-device (KVM_DEV_TYPE_VFIO), which VFIO groups join so KVM
/// knows about assigned devices (coherency, posted interrupts).
pub fn create_kvm_vfio_device(vm: &VmFd) -> Result<VfioDeviceFd, kvm_ioctls::Error> {
    let mut dev = kvm_create_device {
        type_: kvm_device_type_KVM_DEV_TYPE_VFIO,
        fd: 0,
        flags: 0,
    };
    let fd = vm.create_device(&mut dev)?;
    Ok(VfioDeviceFd::new_from_kvm(fd))
}
