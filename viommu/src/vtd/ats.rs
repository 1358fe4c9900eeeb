//! Address Translation Services for emulated devices (VT-d spec 6.3, 4.2): translation
//! requests the unit answers into the device's device-TLB, translated requests served from it,
//! device-TLB invalidations forwarded to it, and the checks the protocol checker makes of them.

use vm_memory::GuestMemoryBackend;

use super::Vtd;
use crate::ats::{AtcEntry, SharedDeviceTlb};
use crate::cache::iotlb::{Stage, Table, Tag};
use crate::check::{CacheKey, Kind, Violation};
use crate::descriptor::DeviceTlbScope;
use crate::fault::{Access, Fault};
use crate::tables::Translation;
use crate::{SourceId, PAGE_SIZE};

impl<M: GuestMemoryBackend> Vtd<M> {
    /// Puts the device-TLB of the emulated ATS device `source` behind the unit: while the
    /// device enables ATS, its requests without a PASID go through it (see
    /// [`Vtd::translate_request`]), and device-TLB invalidations naming `source` reach it.
    pub fn attach_device_tlb(&mut self, source: SourceId, tlb: SharedDeviceTlb) {
        self.device_tlbs.insert(source, tlb);
    }

    /// A request of `source` without a PASID, when the device enables ATS: a translated request
    /// from its device-TLB on a hit; on a miss a translation request, whose completion fills
    /// the device-TLB, then the translated request. None when the request goes untranslated
    /// instead: ATS off, or the unit refusing the translation request (the device then retries
    /// untranslated, and the fault, if any, is recorded as for any request).
    pub(super) fn ats_request(
        &mut self,
        source: SourceId,
        iova: u64,
        access: Access,
    ) -> Option<Result<(u64, u64), Fault>> {
        let tlb = self.device_tlbs.get(&source)?.clone();
        if !self.caps.device_iotlb || !tlb.lock().enabled() {
            return None;
        }
        let hit = tlb
            .lock()
            .lookup(None, iova)
            .filter(|(_, e)| e.perm.allows(access));
        self.stats.caches.device_tlb.lookup(hit.is_some());
        let (base, entry) = match hit {
            Some((base, entry)) => {
                if self.check.enabled() {
                    if let Some(v) = self.device_tlb_violation(source, base, &entry) {
                        self.check.suspect(CacheKey::DeviceTlb(source, base), v);
                    }
                }
                (base, entry)
            }
            None => {
                let (base, entry) = self.translation_request(source, iova, access)?;
                if tlb.lock().insert(None, base, entry) {
                    self.stats.caches.device_tlb.evictions += 1;
                }
                (base, entry)
            }
        };
        let off = iova - base;
        Some(Ok((entry.gpa + off, (1u64 << entry.shift) - off)))
    }

    /// Answers a translation request of `source` for `iova`: the page and what the device may
    /// cache of it, or None when the context entry does not allow translation requests or the
    /// page does not translate (a completion without permission: nothing is recorded).
    fn translation_request(
        &mut self,
        source: SourceId,
        iova: u64,
        access: Access,
    ) -> Option<(u64, AtcEntry)> {
        let ctx = self.resolve_cached(source, None).ok()?;
        if !ctx.device_tlb {
            return None;
        }
        let (tag, table) = match ctx.translation {
            Translation::PassThrough => {
                let base = iova & !(PAGE_SIZE - 1);
                let tag = Tag {
                    domain: ctx.domain,
                    pasid: ctx.pasid,
                    stage: Stage::Second,
                    privileged: false,
                };
                let entry = AtcEntry {
                    shift: crate::PAGE_SHIFT as u8,
                    gpa: base,
                    perm: crate::Perm::RW,
                    tag,
                    table: None,
                };
                return Some((base, entry));
            }
            Translation::Tables(t) => (Stage::Second, Table::Second(t)),
            Translation::FirstStage(t) => (Stage::First, Table::First(t)),
        };
        let tag = Tag {
            domain: ctx.domain,
            pasid: ctx.pasid,
            stage: tag,
            privileged: false,
        };
        let leaf = self
            .translate_cached(source, tag, table, iova, access)
            .ok()?;
        Some((
            leaf.iova,
            AtcEntry {
                shift: leaf.len.trailing_zeros() as u8,
                gpa: leaf.gpa,
                perm: leaf.perm,
                tag,
                table: Some(table),
            },
        ))
    }

    /// A device-TLB invalidation reached the unit: the device's translations over its range go.
    pub(super) fn device_tlb_invalidation(&mut self, scope: DeviceTlbScope) {
        let Some(tlb) = self.device_tlbs.get(&scope.source) else {
            return;
        };
        let gone = tlb.lock().invalidate(scope.pasid, scope.range);
        self.stats.caches.device_tlb.invalidated += gone.len() as u64;
        let source = scope.source;
        self.check.forget(|k| match *k {
            CacheKey::DeviceTlb(s, b) | CacheKey::DeviceTlbCovered(s, b) => {
                s == source && gone.contains(&b)
            }
            _ => false,
        });
    }

    /// The violation a device-TLB page amounts to, if the tables no longer map it so.
    fn device_tlb_violation(
        &mut self,
        source: SourceId,
        base: u64,
        entry: &AtcEntry,
    ) -> Option<Violation> {
        let table = entry.table?;
        let probe = if entry.perm.read {
            Access::Read
        } else {
            Access::Write
        };
        let fresh = self.walk_table(table, entry.tag, base, probe, false);
        match fresh {
            Ok(l)
                if l.iova == base
                    && l.len == 1 << entry.shift
                    && l.gpa == entry.gpa
                    && l.perm == entry.perm =>
            {
                None
            }
            now => Some(
                Violation::new(
                    Kind::StaleDeviceTlb,
                    format!(
                        "a translated request used the device-TLB's {:#x} {:?}, but the tables \
                         now say {now:x?}",
                        entry.gpa, entry.perm
                    ),
                )
                .source(source)
                .domain(Some(entry.tag.domain))
                .iova(base),
            ),
        }
    }

    /// Is the device-TLB page `base` of `source` still cached and stale?
    pub(super) fn device_tlb_still_stale(&mut self, source: SourceId, base: u64) -> bool {
        let entry = self
            .device_tlbs
            .get(&source)
            .and_then(|t| t.lock().peek(None, base));
        entry.is_some_and(|e| self.device_tlb_violation(source, base, &e).is_some())
    }

    /// Is the device-TLB page `base` of `source` still cached?
    pub(super) fn device_tlb_still_cached(&self, source: SourceId, base: u64) -> bool {
        self.device_tlbs
            .get(&source)
            .is_some_and(|t| t.lock().peek(None, base).is_some())
    }

    /// At a wait: device-TLB pages that an IOTLB invalidation since the previous wait covered
    /// and that no device-TLB invalidation removed become suspects, reported if the next wait
    /// finds them still cached (Linux sends the device-TLB invalidation in the submission after
    /// the IOTLB one).
    pub(super) fn check_device_tlbs_at_completion(&mut self) {
        let Some(invalidations) = self.check.take_iotlb_invalidations() else {
            return;
        };
        if invalidations.is_empty() {
            return;
        }
        let tlbs: Vec<(SourceId, SharedDeviceTlb)> = self
            .device_tlbs
            .iter()
            .map(|(s, t)| (*s, t.clone()))
            .collect();
        for (source, tlb) in tlbs {
            let entries = tlb.lock().entries();
            for (_, base, e) in entries {
                let range = (base, base.saturating_add(1 << e.shift));
                let covered = invalidations.iter().find(|sel| {
                    sel.matches(&crate::cache::iotlb::Key {
                        tag: e.tag,
                        base,
                        shift: e.shift,
                    })
                });
                if covered.is_some() {
                    let v = Violation::new(
                        Kind::MissingDeviceTlbInvalidation,
                        format!(
                            "an IOTLB invalidation covered {:#x}..{:#x}, which the device's \
                             device-TLB holds, and no device-TLB invalidation removed it",
                            range.0, range.1
                        ),
                    )
                    .source(source)
                    .domain(Some(e.tag.domain))
                    .iova(base);
                    self.check
                        .suspect(CacheKey::DeviceTlbCovered(source, base), v);
                }
            }
        }
    }
}
