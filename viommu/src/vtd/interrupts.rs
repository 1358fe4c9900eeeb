//! Interrupt remapping in the unit (VT-d spec chapter 5): the GCMD commands that set it up, the
//! interrupt-entry cache as the routes a VMM holds, and the requests of emulated devices.

use vm_device::interrupt::MsiMessage;
use vm_memory::GuestMemoryBackend;

use super::Vtd;
use crate::fault::Fault;
use crate::intremap::{self, IecScope, InterruptRoutes, Irte, RemapFault, RemapTable, Request};
use crate::record::Event;
use crate::regs::*;
use crate::SourceId;

impl<M: GuestMemoryBackend> Vtd<M> {
    /// GCMD's interrupt-remapping commands (11.4.4.1): SIRTP is one-shot; IRE and CFI are
    /// persistent, written with their wanted state every time. Every change that alters what a
    /// request means invalidates the interrupt-entry cache (ESIRTPS for SIRTP).
    pub(super) fn interrupt_remapping_command(&mut self, v: u32) {
        let mut changed = false;
        if v & GCMD_SIRTP != 0 {
            let irta = self.regs.get::<IRTA_REG>();
            self.remap.table = Some(RemapTable::from_irta(irta, self.config.x2apic));
            self.regs.set_bits::<GSTS_REG>(GSTS_IRTPS);
            vm_device::debug_limited!("VT-d: interrupt remapping table {irta:#x}");
            // ESIRTPS (6.7): the pointer set invalidates the interrupt-entry cache.
            self.invalidate_interrupt_entry_cache(IecScope::Global);
            changed = true;
        }
        let ire = v & GCMD_IRE != 0;
        if ire != self.remap.enabled {
            self.remap.enabled = ire;
            if ire {
                self.regs.set_bits::<GSTS_REG>(GSTS_IRES);
            } else {
                self.regs.clear_bits::<GSTS_REG>(GSTS_IRES);
            }
            vm_device::debug_limited!(
                "VT-d: interrupt remapping {}",
                if ire { "enabled" } else { "disabled" }
            );
            changed = true;
        }
        let cfi = v & GCMD_CFI != 0;
        if cfi != self.remap.compat_allowed {
            self.remap.compat_allowed = cfi;
            if cfi {
                self.regs.set_bits::<GSTS_REG>(GSTS_CFIS);
            } else {
                self.regs.clear_bits::<GSTS_REG>(GSTS_CFIS);
            }
            changed = true;
        }
        if changed {
            self.invalidate_interrupt_entries(IecScope::Global);
        }
    }

    /// Drops the cached remappings `scope` covers: the route holder re-translates them now.
    pub(super) fn invalidate_interrupt_entries(&mut self, scope: IecScope) {
        self.stats.iec_invalidations += 1;
        let Some(mut routes) = self.interrupt_routes.take() else {
            return;
        };
        let mut translated = 0;
        // The routes are the VMM's: a recording keeps which ones were re-translated.
        let recording = self.mem.recorder().is_some();
        let mut seen = Vec::new();
        let (mem, state) = (&self.mem, &self.remap);
        routes.retranslate(scope, &mut |source, msg| {
            if recording {
                seen.push((source, msg));
            }
            let out = intremap::translate(mem, state, source, msg);
            translated += u64::from(state.enabled && out.is_ok());
            out
        });
        if let Some(mut r) = self.mem.recorder() {
            r.retranslated(&seen);
        }
        self.stats.interrupts_remapped += translated;
        self.interrupt_routes = Some(routes);
    }

    /// Hands the unit the holder of translated interrupt routes (the VMM's GSI routes), to be
    /// told when they must re-translate.
    pub fn set_interrupt_routes(&mut self, routes: Box<dyn InterruptRoutes>) {
        self.interrupt_routes = Some(routes);
    }

    /// Is interrupt remapping enabled (GSTS.IRES)?
    pub fn interrupt_remapping_enabled(&self) -> bool {
        self.remap.enabled
    }

    /// What the interrupt request `msg` from `source` currently means, without side effects:
    /// for a VMM computing a route. Unchanged while remapping is off.
    pub fn translate_interrupt(
        &self,
        source: SourceId,
        msg: MsiMessage,
    ) -> Result<MsiMessage, RemapFault> {
        self.record_event(Event::QueryInterrupt { source, msg });
        intremap::translate(&self.mem, &self.remap, source, msg)
    }

    /// What the interrupt request `msg` from `source` means, for a VMM setting up the route
    /// that will deliver it (a KVM GSI route delivers a device's MSIs without the unit): counted
    /// in `interrupts_remapped` as every route the unit re-translates is, but a fault is not
    /// recorded, since no request was made (the route holder has the request go through
    /// [`Self::remap_interrupt`] when the device raises it).
    pub fn translate_route(
        &mut self,
        source: SourceId,
        msg: MsiMessage,
    ) -> Result<MsiMessage, RemapFault> {
        self.record_event(Event::TranslateRoute { source, msg });
        let out = intremap::translate(&self.mem, &self.remap, source, msg);
        self.stats.interrupts_remapped += u64::from(self.remap.enabled && out.is_ok());
        out
    }

    /// An interrupt request `msg` from `source` (an emulated device, or a route that faulted):
    /// the interrupt to deliver, or None when remapping blocks it, in which case the fault is
    /// recorded unless the IRTE disables fault processing, and the fault event raised. The
    /// entry comes from the interrupt-entry cache when it holds it (see [`crate::cache`]).
    pub fn remap_interrupt(&mut self, source: SourceId, msg: MsiMessage) -> Option<MsiMessage> {
        self.record_event(Event::RemapInterrupt { source, msg });
        let result =
            intremap::classify(&self.remap, msg).and_then(|request| match request {
                Request::Pass(msg) => Ok(msg),
                Request::Remap { table, index } => self
                    .cached_irte(source, &table, index)?
                    .deliver(source, index, self.remap.verifies(source)),
            });
        match result {
            Ok(out) => {
                self.stats.interrupts_remapped += u64::from(self.remap.enabled);
                Some(out)
            }
            Err(f) => {
                self.stats.interrupt_faults += 1;
                vm_device::debug_limited!(
                    "interrupt remapping fault: {source} {msg:x?} index {}: {:?}",
                    f.index,
                    f.reason
                );
                self.record_fault(&Fault::interrupt(source, f.index, f.reason), f.fpd);
                None
            }
        }
    }

    /// The IRTE at `index` from the interrupt-entry cache, read from `table` and cached on a
    /// miss (only present, valid entries are).
    fn cached_irte(
        &mut self,
        source: SourceId,
        table: &RemapTable,
        index: u32,
    ) -> Result<Irte, RemapFault> {
        let hit = self.caches.iec.get(index);
        self.stats.caches.iec.lookup(hit.is_some());
        if let Some(irte) = hit {
            if self.check.enabled() {
                self.check_irte_use(source, index, &irte);
            }
            return Ok(irte);
        }
        let irte = intremap::read_entry(&self.mem, table, index)?;
        if self.caches.iec.insert(index, irte) {
            self.stats.caches.iec.evictions += 1;
        }
        Ok(irte)
    }
}
