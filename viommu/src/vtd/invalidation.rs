//! Invalidation: the queue (VT-d spec 6.5.2), register-based invalidation (6.5.1), and how both
//! become host work for the attached devices.

use vm_memory::GuestMemoryBackend;

use super::{iq_entries, FlushMode, SyncStrategy, Vtd};
use crate::cache::iotlb::{Selector, Stage};
use crate::check::CacheKey;
use crate::descriptor::{
    self, ContextScope, Descriptor, DeviceTlbScope, InvalidDescriptor, IotlbScope, PasidCacheScope,
    PasidIotlbScope,
};
use crate::fault::{Access, Fault, FaultReason};
use crate::host::HostOp;
use crate::inject::Target;
use crate::intremap::IecScope;
use crate::memory::TableMemory;
use crate::ranges::Range;
use crate::record::{Event, Tap};
use crate::regs::*;
use crate::space::{Space, SyncEnv, SyncReport, View, FULL};
use crate::tables::TableMode;
use crate::SourceId;

/// Why the queue stopped with FSTS.IQE.
#[derive(Debug, thiserror::Error)]
enum QueueError {
    #[error("tail {tail} is beyond the queue of {entries} 128-bit units")]
    TailBeyondQueue { tail: u64, entries: u64 },
    #[error("head {head} is beyond the queue of {entries} 128-bit units")]
    HeadBeyondQueue { head: u64, entries: u64 },
    #[error("offset {0} (128-bit units) is not the start of a 256-bit descriptor")]
    Misaligned(u64),
    #[error("scalable mode requires 256-bit descriptors (IQA.DW)")]
    DescriptorWidth,
    #[error("descriptor at {0:#x} is outside guest memory")]
    Fetch(u64),
    #[error(transparent)]
    Invalid(descriptor::InvalidDescriptor),
    #[error("wait status address {0:#x} is outside guest memory")]
    StatusWrite(u64),
    #[error("the descriptor could not be fetched (injected)")]
    Injected,
}

impl QueueError {
    /// What IQERCD.IQEI reports for it (11.4.9.9).
    fn iqei(&self) -> u8 {
        match self {
            QueueError::TailBeyondQueue { .. }
            | QueueError::HeadBeyondQueue { .. }
            | QueueError::Misaligned(_) => IQEI_TAIL,
            QueueError::DescriptorWidth => IQEI_WIDTH,
            QueueError::Fetch(_) | QueueError::Injected => IQEI_FETCH,
            QueueError::Invalid(InvalidDescriptor::UnknownType(_)) => IQEI_TYPE,
            QueueError::Invalid(_) => IQEI_RESERVED,
            // Not a descriptor error the register has a code for.
            QueueError::StatusWrite(_) => 0,
        }
    }
}

/// How a descriptor left the queue.
enum Flow {
    Continue,
    /// A wait the time-out of an earlier device-TLB invalidation aborted (6.5.2.10): the
    /// requester of that invalidation.
    Aborted(crate::SourceId),
}

impl<M: GuestMemoryBackend> Vtd<M> {
    /// Processes descriptors from IQH up to IQT, as hardware does after a tail write. Stops at
    /// the first bad descriptor with FSTS.IQE set and IQH left pointing at it.
    ///
    /// IQH and IQT count 128-bit units whatever the descriptor width: with 256-bit descriptors
    /// (IQA.DW) each descriptor is two of them and an odd tail is invalid (6.5.2). A queue of
    /// 128-bit descriptors is valid in legacy mode only; one of 256-bit descriptors in both
    /// (Linux sets DW whenever the unit reports ECAP.SMTS, interrupt remapping included).
    pub(super) fn process_queue(&mut self) {
        let stopped = self.fsts_errors & (FSTS_IQE | FSTS_ITE) != 0;
        if self.regs.get32::<GSTS_REG>() & GSTS_QIES == 0 || stopped {
            return;
        }
        let iqa = self.regs.get::<IQA_REG>();
        let wide = iqa & IQA_DW != 0;
        let step = if wide { 2 } else { 1 };
        let entries = iq_entries(iqa);
        let tail = self.regs.get::<IQT_REG>() >> IQ_INDEX_SHIFT;
        if tail >= entries {
            return self.queue_error(QueueError::TailBeyondQueue { tail, entries });
        }
        if self.iqh >= entries {
            let head = self.iqh;
            return self.queue_error(QueueError::HeadBeyondQueue { head, entries });
        }
        if let Some(odd) = [tail, self.iqh].into_iter().find(|&o| o % step != 0) {
            return self.queue_error(QueueError::Misaligned(odd));
        }
        if self.iqh != tail {
            if !wide && self.root_mode == TableMode::Scalable {
                return self.queue_error(QueueError::DescriptorWidth);
            }
            self.stats.submissions += 1;
        }
        let base = iqa & IQA_IQA_MASK;
        let mode = self.root_mode;
        // Bounded: IQH advances modulo the queue size until it meets IQT, which is inside it
        // and reached in steps of the descriptor size (descriptors cannot write IQT).
        while self.iqh != tail {
            if self.check.enabled() {
                self.check.set_descriptor(Some(self.iqh));
            }
            // The guest can put the queue at the top of the address space: no wrapping.
            let addr = base.checked_add(self.iqh * DESCRIPTOR_SIZE);
            let fetched = if self.inject.occurs(Target::QueueError) {
                self.stats.injected += 1;
                Err(QueueError::Injected)
            } else {
                addr.and_then(|a| self.fetch(a, wide))
                    .ok_or(QueueError::Fetch(addr.unwrap_or(base)))
            };
            self.stats.descriptors += 1;
            self.stats.wide_descriptors += u64::from(wide);
            let result = fetched
                .and_then(|words| descriptor::decode_in(mode, words).map_err(QueueError::Invalid));
            let result = result.and_then(|d| self.execute(d));
            self.check.set_descriptor(None);
            match result {
                Ok(Flow::Continue) => {}
                Ok(Flow::Aborted(source)) => {
                    self.iqh = (self.iqh + step) % entries;
                    return self.time_out(source);
                }
                Err(e) => {
                    if matches!(
                        e,
                        QueueError::Invalid(_) | QueueError::Fetch(_) | QueueError::Injected
                    ) {
                        self.stats.descriptors_by_type.invalid += 1;
                    }
                    // What the descriptors before the bad one asked for is done.
                    self.sync_pending();
                    self.queue_error(e);
                    // A device-TLB invalidation before the bad descriptor that timed out still
                    // reports its time-out: the queue stops for both, and nothing of the
                    // time-out is left to abort a wait of the queue software restarts.
                    if let Some(source) = self.timed_out.take() {
                        self.time_out(source);
                    }
                    return;
                }
            }
            self.iqh = (self.iqh + step) % entries;
        }
        if let Some(source) = self.timed_out.take() {
            // No wait followed the timed-out invalidation: the time-out still stops the queue.
            return self.time_out(source);
        }
        self.sync_pending();
        self.poll_due();
    }

    /// A device-TLB invalidation of `source` timed out (6.5.2.10): FSTS.ITE, with IQERCD.ITESID
    /// when ITE was clear, and the fault event; the queue fetches nothing more until software
    /// clears ITE.
    fn time_out(&mut self, source: crate::SourceId) {
        vm_device::warn_limited!(
            "VT-d: device-TLB invalidation of {source} timed out (injected); queue stopped at \
             IQH {}",
            self.iqh
        );
        self.timed_out = None;
        self.sync_pending();
        let before = self.fsts();
        if self.fsts_errors & FSTS_ITE == 0 {
            self.queue_errors.itesid = source.0;
        }
        self.fsts_errors |= FSTS_ITE;
        self.fault_event(before);
    }

    /// Reads the descriptor at `addr`: 128 bits, or 256 when `wide`.
    fn fetch(&self, addr: u64, wide: bool) -> Option<[u64; 4]> {
        let mut words = [0u64; 4];
        let n = if wide { 4 } else { 2 };
        for (i, w) in words.iter_mut().take(n).enumerate() {
            let a = addr.checked_add(i as u64 * 8)?;
            *w = self.mem.read_u64(a)?;
        }
        Some(words)
    }

    fn queue_error(&mut self, e: QueueError) {
        vm_device::warn_limited!("VT-d: invalidation queue error at IQH {}: {e}", self.iqh);
        let before = self.fsts();
        if self.fsts_errors & FSTS_IQE == 0 {
            self.queue_errors.iqei = e.iqei();
        }
        self.fsts_errors |= FSTS_IQE;
        self.fault_event(before);
    }

    fn execute(&mut self, d: Descriptor) -> Result<Flow, QueueError> {
        let counts = &mut self.stats.descriptors_by_type;
        match d {
            Descriptor::ContextCache(scope) => {
                counts.context_cache += 1;
                self.check_context_scope(scope, "a domain-selective context-cache invalidation");
                self.invalidate_context(scope);
                self.invalidate_context_cache(scope);
            }
            Descriptor::Iotlb(scope) => {
                match scope {
                    IotlbScope::Global => counts.iotlb_global += 1,
                    IotlbScope::Domain(_) => counts.iotlb_domain += 1,
                    IotlbScope::Page { .. } => counts.iotlb_page += 1,
                }
                self.check_iotlb_scope(scope, "an IOTLB invalidation");
                self.invalidate_iotlb(scope);
                self.invalidate_iotlb_cache(scope);
            }
            Descriptor::DeviceIotlb(scope) => {
                counts.device_iotlb += 1;
                self.invalidate_device_tlb(scope);
            }
            Descriptor::PasidCache(scope) => {
                counts.pasid_cache += 1;
                match scope {
                    PasidCacheScope::Domain(d) => {
                        self.check_domain(d, "a domain-selective PASID-cache invalidation")
                    }
                    PasidCacheScope::Pasid { domain, .. } => self.check.saw_domain(domain),
                    PasidCacheScope::Global => {}
                }
                self.invalidate_pasid_cache(scope);
                self.invalidate_pasid_cache_entries(scope);
            }
            Descriptor::PasidIotlb(scope) => {
                counts.pasid_iotlb += 1;
                if let PasidIotlbScope::Page {
                    domain,
                    pasid,
                    addr,
                    am,
                    ..
                } = scope
                {
                    self.check_alignment(domain, Some(pasid), addr, am);
                }
                self.check_domain(scope.domain(), "a PASID-based-IOTLB invalidation");
                self.invalidate_pasid_iotlb(scope);
                let sel = Selector {
                    domain: Some(scope.domain()),
                    pasid: Some(scope.pasid()),
                    stage: Some(Stage::First),
                    range: scope.range(),
                };
                let gone = self.caches.iotlb.invalidate(&sel);
                self.iotlb_invalidated(sel, &gone);
            }
            Descriptor::PasidDeviceIotlb(scope) => {
                counts.pasid_device_iotlb += 1;
                self.invalidate_device_tlb(scope);
            }
            Descriptor::InterruptEntryCache(scope) => {
                counts.interrupt_entry_cache += 1;
                if !scope.aligned() {
                    self.report_misaligned_iec(scope);
                }
                // Routes are re-translated before any later wait can complete.
                self.invalidate_interrupt_entries(scope);
                self.invalidate_interrupt_entry_cache(scope);
            }
            Descriptor::Wait {
                status_write,
                interrupt,
                fence: _,
            } => {
                counts.wait += 1;
                // Strict mode's promise: everything before the wait is done on the host before
                // the guest can see the wait complete. Descriptors run in order here, so the
                // fence flag needs nothing more.
                self.sync_pending();
                if let Some(source) = self.timed_out {
                    // 6.5.2.10: the time-out aborts the wait: no status write, no interrupt.
                    return Ok(Flow::Aborted(source));
                }
                if let Some((addr, _)) = status_write {
                    self.check_status_address(addr);
                }
                self.check_completion("wait descriptor");
                if let Some((addr, data)) = status_write {
                    if !self.mem.write_bytes(addr, &data.to_le_bytes()) {
                        return Err(QueueError::StatusWrite(addr));
                    }
                }
                if interrupt {
                    self.completion_event();
                }
                self.stats.waits += 1;
            }
        }
        Ok(Flow::Continue)
    }

    /// A device-TLB invalidation (6.5.2.5, 6.5.2.6): the device's cached translations over the
    /// range go; an injected time-out or completion error is raised here.
    fn invalidate_device_tlb(&mut self, scope: DeviceTlbScope) {
        if self.inject.occurs(Target::TimeOut) {
            self.stats.injected += 1;
            self.timed_out = Some(scope.source);
        }
        if self.inject.occurs(Target::CompletionError) {
            self.stats.injected += 1;
            vm_device::warn_limited!(
                "VT-d: device-TLB invalidation of {} completed in error (injected)",
                scope.source
            );
            let before = self.fsts();
            if self.fsts_errors & FSTS_ICE == 0 {
                self.queue_errors.icesid = scope.source.0;
            }
            self.fsts_errors |= FSTS_ICE;
            self.fault_event(before);
        }
        self.device_tlb_invalidation(scope);
    }

    /// What the checker makes of a context-cache invalidation's domain.
    fn check_context_scope(&mut self, scope: ContextScope, what: &str) {
        match scope {
            ContextScope::Domain(d) => self.check_domain(d, what),
            // A device-selective invalidation names the domain of the entry it invalidates.
            ContextScope::Device { domain, .. } => self.check.saw_domain(domain),
            ContextScope::Global => {}
        }
    }

    /// What the checker makes of an IOTLB invalidation's domain and address.
    fn check_iotlb_scope(&mut self, scope: IotlbScope, what: &str) {
        match scope {
            IotlbScope::Domain(d) => self.check_domain(d, what),
            IotlbScope::Page {
                domain, addr, am, ..
            } => {
                self.check_alignment(domain, None, addr, am);
                self.check_domain(domain, what);
            }
            IotlbScope::Global => {}
        }
    }

    /// Removes from the context-cache what `scope` covers.
    fn invalidate_context_cache(&mut self, scope: ContextScope) {
        let gone = self.caches.context.invalidate(scope);
        self.stats.caches.context.invalidated += gone.len() as u64;
        self.check
            .forget(|k| matches!(k, CacheKey::Context(s) if gone.iter().any(|(g, _)| g == s)));
    }

    /// Removes from the PASID-cache what `scope` covers.
    fn invalidate_pasid_cache_entries(&mut self, scope: PasidCacheScope) {
        let gone = self.caches.pasid.invalidate(scope);
        self.stats.caches.pasid.invalidated += gone.len() as u64;
        self.check.forget(
            |k| matches!(k, CacheKey::Pasid(s, p) if gone.iter().any(|(g, _)| *g == (*s, *p))),
        );
    }

    /// Removes from the IOTLB the second-stage pages an IOTLB invalidation covers (in scalable
    /// mode, domain- and page-selective ones leave first-stage pages: 6.5.2.3).
    fn invalidate_iotlb_cache(&mut self, scope: IotlbScope) {
        let stage = match self.root_mode {
            TableMode::Legacy => None,
            TableMode::Scalable => Some(Stage::Second),
        };
        let sel = match scope {
            IotlbScope::Global => Selector::ALL,
            IotlbScope::Domain(d) => Selector {
                domain: Some(d),
                stage,
                ..Selector::ALL
            },
            IotlbScope::Page {
                domain, addr, am, ..
            } => Selector {
                domain: Some(domain),
                stage,
                range: Some(IotlbScope::page_range(addr, am)),
                ..Selector::ALL
            },
        };
        let gone = self.caches.iotlb.invalidate(&sel);
        self.iotlb_invalidated(sel, &gone);
    }

    /// Removes from the interrupt-entry cache what `scope` covers.
    pub(super) fn invalidate_interrupt_entry_cache(&mut self, scope: IecScope) {
        let gone = self.caches.iec.invalidate(scope);
        self.stats.caches.iec.invalidated += gone.len() as u64;
        self.check
            .forget(|k| matches!(k, CacheKey::Irte(i) if gone.iter().any(|(g, _)| g == i)));
    }

    /// Re-reads the context entries `scope` covers and re-syncs devices whose view changed.
    fn invalidate_context(&mut self, scope: ContextScope) {
        let sources: Vec<SourceId> = self
            .spaces
            .values()
            .filter(|s| match scope {
                ContextScope::Device { .. } => scope.covers(s.source, s.view.domain()),
                // Domain-selective covers more than the spec asks (every device is re-read):
                // hardware may always invalidate more, and a device whose entry was not
                // present has no domain to match.
                ContextScope::Global | ContextScope::Domain(_) => true,
            })
            .map(|s| s.source)
            .collect();
        self.refresh(&sources);
    }

    /// Re-reads the PASID entries `scope` covers (scalable mode) and re-syncs devices whose
    /// view changed. A device whose entry the unit could not resolve has no domain to match
    /// and is always re-read.
    fn invalidate_pasid_cache(&mut self, scope: PasidCacheScope) {
        let sources: Vec<SourceId> = self
            .spaces
            .values()
            .filter(|s| scope.covers(s.view.domain(), s.view.pasid()))
            .map(|s| s.source)
            .collect();
        self.refresh(&sources);
    }

    /// Re-evaluates what each device in `sources` translates through, syncing changed ones.
    fn refresh(&mut self, sources: &[SourceId]) {
        for &source in sources {
            if !self.spaces.contains_key(&source) {
                continue;
            }
            let view = self.view_for_host(source);
            if let Some(space) = self.spaces.get_mut(&source) {
                self.sharing_dirty |= space.set_view(view);
            }
        }
        if self.config.strategy == SyncStrategy::PerLeaf {
            self.sync_each_per_leaf(|_| Some(FULL), true);
        }
    }

    /// Re-evaluates every device's view, after the root pointer or translation enable changed.
    pub(super) fn refresh_views(&mut self) {
        let all: Vec<SourceId> = self.spaces.keys().copied().collect();
        self.refresh(&all);
        self.sync_pending();
    }

    fn invalidate_iotlb(&mut self, scope: IotlbScope) {
        self.invalidate_ranges(move |view: &View| -> Option<Range> {
            let domain = view.domain()?;
            match scope {
                IotlbScope::Global => Some(FULL),
                IotlbScope::Domain(d) => (d == domain).then_some(FULL),
                IotlbScope::Page {
                    domain: d,
                    addr,
                    am,
                    ih: _,
                } => (d == domain).then(|| IotlbScope::page_range(addr, am)),
            }
        });
    }

    /// A PASID-based-IOTLB invalidation covers the devices whose RID_PASID entry it names, over
    /// its range. The spec scopes it to first-stage mappings; hardware may always invalidate
    /// more, and following it for second-stage tables too costs at most a diffed sync, while it
    /// keeps the host exact for a guest that invalidates them this way.
    fn invalidate_pasid_iotlb(&mut self, scope: PasidIotlbScope) {
        self.invalidate_ranges(move |view: &View| -> Option<Range> {
            let matches = view.domain()? == scope.domain() && view.pasid()? == scope.pasid();
            matches.then(|| scope.range().unwrap_or(FULL))
        });
    }

    /// Notes (or, leaf by leaf, syncs at once) the range `range_for` picks for each device.
    fn invalidate_ranges(&mut self, range_for: impl Fn(&View) -> Option<Range> + Copy) {
        match self.config.strategy {
            SyncStrategy::Batched => {
                for space in self.spaces.values_mut() {
                    if let Some(r) = range_for(&space.view) {
                        space.invalidate(r);
                    }
                }
            }
            SyncStrategy::PerLeaf => self.sync_each_per_leaf(range_for, false),
        }
    }

    /// Runs `f` on every attached device with what a sync needs to know of the guest, then
    /// accounts for the reports it returns.
    pub(super) fn each_space(
        &mut self,
        mut f: impl FnMut(&SyncEnv<'_, Tap<M>>, &mut Space) -> Option<SyncReport>,
    ) {
        let mut spaces = std::mem::take(&mut self.spaces);
        let env = SyncEnv {
            mem: &self.mem,
            caps: &self.caps,
            ram: &self.ram,
            ram_bounds: &self.ram_bounds,
            walk_budget: std::cell::Cell::new(self.walk_left),
        };
        let reports: Vec<(SourceId, SyncReport)> = spaces
            .values_mut()
            .filter_map(|s| f(&env, s).map(|r| (s.source, r)))
            .collect();
        self.walk_left = env.walk_budget.get();
        self.spaces = spaces;
        for (source, report) in reports {
            self.account(source, report);
        }
    }

    /// Syncs at once, leaf by leaf, the range `range_for` picks for each device (the baseline).
    fn sync_each_per_leaf(
        &mut self,
        range_for: impl Fn(&View) -> Option<Range>,
        pending_only: bool,
    ) {
        self.settle_sharing();
        self.each_space(|env, space| {
            if pending_only && !space.has_pending() {
                return None;
            }
            range_for(&space.view).map(|r| space.sync_per_leaf(env, r))
        });
    }

    /// Brings every device's host mappings up to date with what was invalidated so far.
    pub(super) fn sync_pending(&mut self) {
        if self.config.strategy == SyncStrategy::PerLeaf {
            return self.sync_each_per_leaf(|_| Some(FULL), true);
        }
        let defer = matches!(self.config.flush, FlushMode::Deferred { .. });
        self.settle_sharing();
        self.each_space(|env, space| space.has_pending().then(|| space.sync(env, defer)));
    }

    /// Adds a sync's work to the counters and turns refused host maps into faults.
    pub(super) fn account(&mut self, source: SourceId, report: SyncReport) {
        let w = report.work;
        self.stats.host_map_calls += w.map_calls;
        self.stats.host_unmap_calls += w.unmap_calls;
        self.stats.host_mappings_removed += w.mappings_removed;
        self.stats.deferred_unmaps += w.deferred;
        self.stats.deferred_unmaps_cancelled += w.revived;
        self.stats.pages_walked += report.tables_read;
        self.stats.walk_budget_exceeded += u64::from(report.budget_exceeded);
        if w.deferred > 0 || w.revived > 0 || w.mappings_removed > 0 {
            // The age bound runs from the first unmap deferred while none waited, and starts
            // afresh once the last waiting one is cancelled or carried out (a timer poll has
            // nothing to do until the next one).
            self.deferred_since = match self.deferred_pending() {
                0 => None,
                _ => self.deferred_since.or_else(|| Some(self.clock.now())),
            };
        }
        for failed in report.failed {
            self.stats.host_errors += 1;
            let e = failed.error;
            vm_device::warn_limited!("VT-d: {source}: {e}");
            if e.op == HostOp::Map {
                // The device will find the page unreachable: tell the guest as a DMA read
                // fault at the first address the host refused.
                let reason = match self.root_mode {
                    TableMode::Legacy => FaultReason::ReadNotPermitted,
                    TableMode::Scalable => FaultReason::SmReadNotPermitted,
                };
                let fault = Fault::new(source, e.iova, reason, Access::Read);
                self.report_fault(&fault, false);
            }
        }
    }

    /// Host mappings waiting for a deferred unmap, over all devices.
    pub fn deferred_pending(&self) -> usize {
        self.spaces.values().map(|s| s.shadow.doomed()).sum()
    }

    /// How long until the deferred unmaps reach their age bound (zero when overdue), or None
    /// when no unmap waits. Measured from the first unmap deferred since the last flush, so it
    /// is never later than the oldest waiting unmap's due time. The count bound is not part of
    /// it: [`Vtd::poll`] checks that one.
    pub fn next_deadline(&self) -> Option<std::time::Duration> {
        let FlushMode::Deferred { max_delay, .. } = self.config.flush else {
            return None;
        };
        let since = self.deferred_since?;
        if self.deferred_pending() == 0 {
            return None;
        }
        Some((since + max_delay).saturating_sub(self.clock.now()))
    }

    /// Carries out the deferred unmaps if their count or age bound is reached. The unit calls
    /// this after each queue submission and register-based IOTLB invalidation; a VMM calls it
    /// from a timer too, so unmaps come due when the guest submits nothing more (by
    /// [`Vtd::next_deadline`], or periodically as this VMM's timer does).
    pub fn poll(&mut self) {
        // A poll that finds nothing due changes nothing (the age bound restarts whenever the
        // last waiting unmap goes): not an event worth recording, nor engine time worth
        // replaying.
        if !self.deferred_due() {
            return;
        }
        self.record_event(Event::Poll);
        self.poll_due();
    }

    /// Have the deferred unmaps reached their count or age bound, so that [`Vtd::poll`] would
    /// carry them out?
    pub fn deferred_due(&self) -> bool {
        let FlushMode::Deferred {
            max_pending,
            max_delay,
        } = self.config.flush
        else {
            return false;
        };
        let pending = self.deferred_pending();
        // The clock only when the count does not decide.
        pending > 0
            && (pending >= max_pending
                || self
                    .deferred_since
                    .is_some_and(|s| self.clock.now().saturating_sub(s) >= max_delay))
    }

    /// [`Vtd::poll`], as the unit itself calls it while handling an event.
    fn poll_due(&mut self) {
        if self.deferred_due() {
            self.flush_all_deferred();
        }
    }

    /// Carries out every deferred unmap now (for example before the VM stops).
    pub fn flush_deferred(&mut self) {
        self.record_event(Event::FlushDeferred);
        self.flush_all_deferred();
    }

    fn flush_all_deferred(&mut self) {
        if self.deferred_pending() > 0 {
            self.stats.deferred_flushes += 1;
        }
        self.each_space(|env, space| {
            (space.shadow.doomed() > 0).then(|| space.flush_deferred(env.ram_bounds))
        });
        self.deferred_since = None;
    }

    /// CCMD (11.4.6.1): register-based context-cache invalidation, used while QI is off.
    pub(super) fn register_context_invalidation(&mut self) {
        let v = self.regs.get::<CCMD_REG>();
        let granularity = (v & CCMD_CIRG_MASK) >> CCMD_CIRG_SHIFT;
        let domain = (v & CCMD_DID_MASK) as u16;
        let scope = match granularity {
            _ if self.regs.get32::<GSTS_REG>() & GSTS_QIES != 0 => None,
            1 => Some(ContextScope::Global),
            2 => Some(ContextScope::Domain(domain)),
            3 => Some(ContextScope::Device {
                domain,
                source: SourceId(((v & CCMD_SID_MASK) >> CCMD_SID_SHIFT) as u16),
                function_mask: ((v & CCMD_FM_MASK) >> CCMD_FM_SHIFT) as u8,
            }),
            _ => None,
        };
        self.stats.register_invalidations += 1;
        // The actual granularity is the requested one; zero reports a request not carried out.
        let actual = match scope {
            Some(s) => {
                self.check_context_scope(s, "a register-based context-cache invalidation");
                self.invalidate_context(s);
                self.invalidate_context_cache(s);
                self.sync_pending();
                self.check_completion("register-based context-cache invalidation");
                granularity
            }
            None => {
                vm_device::warn_limited!("VT-d: context command {v:#x} ignored");
                0
            }
        };
        self.regs
            .set::<CCMD_REG>((v & !(CCMD_ICC | CCMD_CAIG_MASK)) | actual << CCMD_CAIG_SHIFT);
    }

    /// IOTLB register (11.4.6.3): register-based IOTLB invalidation, used while QI is off.
    pub(super) fn register_iotlb_invalidation(&mut self) {
        let v = self.regs.get::<IOTLB_REG>();
        let iva = self.regs.get::<IVA_REG>();
        let granularity = (v & IOTLB_IIRG_MASK) >> IOTLB_IIRG_SHIFT;
        let domain = ((v & IOTLB_DID_MASK) >> IOTLB_DID_SHIFT) as u16;
        let am = iva & IVA_AM_MASK;
        let scope = match granularity {
            _ if self.regs.get32::<GSTS_REG>() & GSTS_QIES != 0 => None,
            1 => Some(IotlbScope::Global),
            2 => Some(IotlbScope::Domain(domain)),
            3 if am <= MAMV => Some(IotlbScope::Page {
                domain,
                addr: iva & IVA_ADDR_MASK,
                am: am as u8,
                ih: iva & IVA_IH != 0,
            }),
            _ => None,
        };
        self.stats.register_invalidations += 1;
        let actual = match scope {
            Some(s) => {
                self.check_iotlb_scope(s, "a register-based IOTLB invalidation");
                self.invalidate_iotlb(s);
                self.invalidate_iotlb_cache(s);
                self.sync_pending();
                self.poll_due();
                self.check_completion("register-based IOTLB invalidation");
                granularity
            }
            None => {
                vm_device::warn_limited!("VT-d: IOTLB command {v:#x} (IVA {iva:#x}) ignored");
                0
            }
        };
        self.regs
            .set::<IOTLB_REG>((v & !(IOTLB_IVT | IOTLB_IAIG_MASK)) | actual << IOTLB_IAIG_SHIFT);
    }
}
