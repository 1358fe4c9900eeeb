//! What a device's requests translate through, in legacy or scalable mode: DMA translation for
//! emulated devices (requests with or without a PASID, through second-stage, first-stage or
//! pass-through), the view an attached device's host mappings follow, and the faults either
//! records.

use vm_memory::GuestMemoryBackend;

use super::Vtd;
use crate::cache::iotlb::{Stage, Table, Tag};
use crate::fault::{Access, Fault, FaultReason, PasidTag, RecordOutcome};
use crate::inject::Target;
use crate::record::Event;
use crate::space::View;
use crate::tables::{self, Context, LookupFault, TableMode, Translation};
use crate::walk::Leaf;
use crate::{scalable, Perm, SourceId, PAGE_SIZE};

/// The interrupt address range, 0xFEE0_0000 to 0xFEEF_FFFF (3.14).
const INTERRUPT_RANGE: (u64, u64) = (0xfee0_0000, 0xfef0_0000);

impl<M: GuestMemoryBackend> Vtd<M> {
    /// What a request from `source` with `pasid` (None: a request without one) translates
    /// through, under the root table the last SRTP latched, read from the tables (no cache).
    pub(super) fn resolve(
        &self,
        source: SourceId,
        pasid: Option<PasidTag>,
    ) -> Result<Context, LookupFault> {
        match self.root_mode {
            TableMode::Legacy if pasid.is_some() => {
                Err(LookupFault::new(FaultReason::PasidInLegacyMode))
            }
            TableMode::Legacy => tables::lookup(&self.mem, self.root_table, source, &self.caps),
            TableMode::Scalable => {
                scalable::lookup(&self.mem, self.root_table, source, pasid, &self.caps)
            }
        }
    }

    /// What the DMA of the attached device `source` currently means, for its host mappings. A
    /// table the guest misprogrammed (a reserved bit, an unsupported setting such as a
    /// first-stage table, a pointer outside its memory) blocks the device and is recorded as
    /// the fault its DMA would raise, once: the host cannot report the device's own blocked
    /// requests. A missing entry is a normal state (a device between domains) and blocks
    /// silently.
    pub(super) fn view_for_host(&mut self, source: SourceId) -> View {
        if !self.translation_enabled() {
            self.refused.remove(&source);
            return View::Identity;
        }
        let refusal = match self.resolve(source, None) {
            Ok(ctx) => match ctx.translation {
                Translation::PassThrough => {
                    self.refused.remove(&source);
                    return View::Identity;
                }
                Translation::Tables(table) => {
                    self.refused.remove(&source);
                    return View::Tables {
                        domain: ctx.domain,
                        pasid: ctx.pasid,
                        table,
                    };
                }
                // Only reachable if FLTS were offered with a device attached, which attach
                // refuses: the host could never follow a first-stage table.
                Translation::FirstStage(_) => LookupFault {
                    reason: FaultReason::PasidEntryInvalid,
                    fpd: ctx.fpd,
                },
            },
            Err(e) => e,
        };
        if !refusal.reason.is_table_error() {
            self.refused.remove(&source);
        } else if self.refused.insert(source, refusal.reason) != Some(refusal.reason) {
            vm_device::warn_limited!(
                "VT-d: {source}: DMA blocked, the guest's tables are invalid: {:?}",
                refusal.reason
            );
            let fault = Fault::new(source, 0, refusal.reason, Access::Read);
            self.report_fault(&fault, refusal.fpd);
        }
        View::Blocked
    }

    /// Translates a DMA request without a PASID of an emulated device. On failure the fault is
    /// recorded (unless FPD suppresses it) and the fault event raised.
    ///
    /// Returns the guest-physical address and how many bytes from it stay in the same page.
    pub fn translate(
        &mut self,
        source: SourceId,
        iova: u64,
        access: Access,
    ) -> Result<(u64, u64), Fault> {
        self.translate_request(source, None, iova, access)
    }

    /// Translates a DMA request of an emulated device, carrying `pasid` or not (a request
    /// without one uses its context's RID_PASID in scalable mode), through the unit's caches
    /// (see [`crate::cache`]). On failure the fault is recorded with the request's PASID
    /// (unless FPD suppresses it) and the fault event raised.
    ///
    /// Returns the guest-physical address and how many bytes from it stay in the same page.
    pub fn translate_request(
        &mut self,
        source: SourceId,
        pasid: Option<PasidTag>,
        iova: u64,
        access: Access,
    ) -> Result<(u64, u64), Fault> {
        self.record_event(Event::Translate {
            source,
            pasid,
            iova,
            access,
        });
        if !self.translation_enabled() {
            return Ok((iova, PAGE_SIZE - (iova & (PAGE_SIZE - 1))));
        }
        if pasid.is_none() && !self.device_tlbs.is_empty() {
            if let Some(done) = self.ats_request(source, iova, access) {
                return done;
            }
        }
        let fault = |reason| Fault {
            source,
            addr: iova,
            reason,
            access,
            pasid,
        };
        let ctx = match self.resolve_cached(source, pasid) {
            Ok(ctx) => ctx,
            Err(e) => {
                let f = fault(e.reason);
                self.report_fault(&f, e.fpd);
                return Err(f);
            }
        };
        if let Some(reason) = self.injected_dma_fault(&ctx, access) {
            let f = fault(reason);
            self.report_fault(&f, ctx.fpd);
            return Err(f);
        }
        let scalable = self.root_mode == TableMode::Scalable;
        let leaf = match ctx.translation {
            Translation::PassThrough => Ok(Leaf {
                iova: iova & !(PAGE_SIZE - 1),
                gpa: iova & !(PAGE_SIZE - 1),
                len: PAGE_SIZE,
                perm: Perm::RW,
            }),
            Translation::Tables(table) => {
                let tag = Tag {
                    domain: ctx.domain,
                    pasid: ctx.pasid,
                    stage: Stage::Second,
                    privileged: false,
                };
                self.translate_cached(source, tag, Table::Second(table), iova, access)
            }
            Translation::FirstStage(table) => {
                let tag = Tag {
                    domain: ctx.domain,
                    pasid: ctx.pasid,
                    stage: Stage::First,
                    privileged: pasid.is_some_and(|p| p.privileged),
                };
                self.translate_cached(source, tag, Table::First(table), iova, access)
            }
        };
        let result = leaf.and_then(|leaf| {
            let off = iova - leaf.iova;
            let (gpa, mut len) = (leaf.gpa + off, leaf.len - off);
            // 3.14: in scalable mode a translation into the interrupt range is blocked (SGN.8),
            // as is a request with a PASID passed through to it. Legacy mode does not check.
            let translated = !matches!(ctx.translation, Translation::PassThrough);
            if scalable && (translated || pasid.is_some()) {
                if (INTERRUPT_RANGE.0..INTERRUPT_RANGE.1).contains(&gpa) {
                    return Err(FaultReason::SmInterruptAddress);
                }
                if gpa < INTERRUPT_RANGE.0 {
                    len = len.min(INTERRUPT_RANGE.0 - gpa);
                }
            }
            Ok((gpa, len))
        });
        result.map_err(|reason| {
            let f = fault(reason);
            self.report_fault(&f, ctx.fpd);
            f
        })
    }

    /// The fault an armed `dma-fault` injection gives this request: the one a not-present
    /// page would (7.1.3), for the table `ctx` names.
    fn injected_dma_fault(&mut self, ctx: &Context, access: Access) -> Option<FaultReason> {
        if !self.inject.occurs(Target::DmaFault) {
            return None;
        }
        self.stats.injected += 1;
        vm_device::warn_limited!("VT-d: DMA translation faults (injected)");
        Some(match (ctx.translation, self.root_mode) {
            (Translation::FirstStage(_), _) => FaultReason::FirstStageEntryNotPresent,
            (_, TableMode::Scalable) => FaultReason::SecondStageEntryNotPresent,
            (_, TableMode::Legacy) => match access {
                Access::Read => FaultReason::ReadNotPermitted,
                Access::Write => FaultReason::WriteNotPermitted,
            },
        })
    }

    /// Counts a fault and, unless `fpd`, logs it into the fault records (7.2.1).
    pub(super) fn report_fault(&mut self, fault: &Fault, fpd: bool) {
        self.stats.faults += 1;
        vm_device::debug_limited!(
            "DMA fault: {} {:?} at {:#x} (PASID {:?}): {:?}",
            fault.source,
            fault.access,
            fault.addr,
            fault.pasid,
            fault.reason
        );
        self.record_fault(fault, fpd);
    }

    /// Logs `fault` into the fault records unless `fpd` (7.2.1), raising the fault event.
    pub(super) fn record_fault(&mut self, fault: &Fault, fpd: bool) {
        if fpd {
            return;
        }
        let before = self.fsts();
        let mut outcome = self.faults.record(fault);
        if outcome == RecordOutcome::Recorded && self.inject.occurs(Target::RecordsFull) {
            // The fault arrives as a burst of itself: it fills every free record, and the
            // next one overflows (at most one more than there are records).
            self.stats.injected += 1;
            vm_device::warn_limited!("VT-d: fault records filled (injected)");
            while outcome == RecordOutcome::Recorded {
                outcome = self.faults.record(fault);
            }
        }
        match outcome {
            RecordOutcome::Recorded | RecordOutcome::Overflowed => self.fault_event(before),
            RecordOutcome::Dropped => {}
        }
    }
}
