//! The unit's side of the protocol checker ([`crate::check`]): what it compares with the
//! tables, when, and what it reports.

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::Vtd;
use crate::cache::iotlb::{self, Entry, Page, Tag};
use crate::cache::{CachedContext, CachedPasid};
use crate::check::{CacheKey, Invalidated, Kind, Violation};
use crate::fault::Access;
use crate::intremap;
use crate::ranges;
use crate::scalable::{self, ScalableContext};
use crate::tables::TableMode;
use crate::walk::Leaf;
use crate::SourceId;

use super::cached::WalkFault;

/// Entries a scan for a domain id reads at most: beyond it the scan proves nothing.
const SCAN_BUDGET: u64 = 1 << 16;

impl<M: GuestMemoryBackend> Vtd<M> {
    /// The protocol checker's counters.
    pub fn check_counts(&self) -> crate::check::CheckCounts {
        self.check.counts()
    }

    /// The protocol checker's report: every violation kept, and counts.
    pub fn check_report(&self) -> crate::check::Report<'_> {
        self.check.report_json()
    }

    /// The violations the checker kept, in the order found.
    pub fn violations(&self) -> &[Violation] {
        self.check.violations()
    }

    /// Settles what the checker still follows, as the VM stops: a cached entry seen stale and
    /// still stale now was never invalidated. The VMM calls this once the vCPUs stopped.
    pub fn finish_check(&mut self) {
        if !self.check.enabled() {
            return;
        }
        self.check.set_write(None);
        self.check.set_descriptor(None);
        for key in self.check.due(true) {
            let stale = self.still_stale(key);
            self.check
                .settle(key, stale, "still not invalidated when the VM stopped");
        }
    }

    /// The violation a cached context entry of `source` amounts to, if the tables no longer
    /// hold it.
    fn context_violation(&self, source: SourceId, cached: &CachedContext) -> Option<Violation> {
        let fresh = self.context_from_tables(source);
        let same = match (cached, &fresh) {
            (CachedContext::NotPresent { reason, fpd }, Err(e)) => {
                e.reason == *reason && e.fpd == *fpd
            }
            (c, Ok(f)) => c == f,
            _ => false,
        };
        if same {
            return None;
        }
        let v = match (cached, fresh) {
            (CachedContext::NotPresent { .. }, Ok(_)) => Violation::new(
                Kind::CachingModeNoInvalidation,
                "the context entry was made present without a context-cache invalidation; \
                 the unit still uses the not-present entry it cached",
            )
            .spec("6.1, 6.2.2"),
            (_, now) => Violation::new(
                Kind::StaleContext,
                format!(
                    "the context entry changed without a context-cache invalidation: cached \
                     {cached:?}, the table now holds {now:?}"
                ),
            ),
        };
        Some(v.source(source).domain(cached.domain()))
    }

    /// The violation a cached PASID entry amounts to, if the tables no longer hold it.
    fn pasid_violation(
        &self,
        source: SourceId,
        sctx: &ScalableContext,
        pasid: u32,
        cached: &CachedPasid,
    ) -> Option<Violation> {
        let fresh = scalable::lookup_pasid(self.mem.inner(), sctx, pasid, &self.caps);
        let v = match (cached, &fresh) {
            (CachedPasid::Entry(e), Ok(f)) if e == f => return None,
            (CachedPasid::NotPresent { .. }, Err(e))
                if e.reason == crate::FaultReason::PasidEntryNotPresent =>
            {
                return None
            }
            (CachedPasid::NotPresent { .. }, Ok(_)) => Violation::new(
                Kind::CachingModeNoInvalidation,
                "the PASID entry was made present without a PASID-cache invalidation",
            )
            .spec("6.1, 6.2.3"),
            (_, now) => Violation::new(
                Kind::StalePasid,
                format!(
                    "the PASID entry changed without a PASID-cache invalidation: cached \
                     {cached:?}, the table now holds {now:?}"
                ),
            ),
        };
        Some(v.source(source).domain(cached.domain()).pasid(Some(pasid)))
    }

    /// The violation a cached IRTE amounts to, if the table no longer holds it.
    fn irte_violation(&self, index: u32, cached: &intremap::Irte) -> Option<Violation> {
        let table = self.remap.table?;
        let fresh = intremap::read_entry(self.mem.inner(), &table, index);
        if fresh.as_ref() == Ok(cached) {
            return None;
        }
        Some(
            Violation::new(
                Kind::StaleIrte,
                format!(
                    "the interrupt remapping table entry changed without an interrupt-entry-cache \
                     invalidation: cached {cached:?}, the table now holds {fresh:?}"
                ),
            )
            .index(index),
        )
    }

    /// What a fresh walk of the page `key` caches finds, without touching accessed or dirty
    /// flags: probed with an access the cached permissions allow.
    fn walk_again(&mut self, key: &iotlb::Key, entry: &Entry) -> Result<Leaf, WalkFault> {
        let probe = match entry.page {
            Page::Leaf { perm, .. } if !perm.read => Access::Write,
            _ => Access::Read,
        };
        self.walk_table(entry.table, key.tag, key.base, probe, false)
    }

    /// The violation a cached IOTLB page amounts to, if the tables no longer map it so.
    fn iotlb_violation(&mut self, key: &iotlb::Key, entry: &Entry) -> Option<Violation> {
        let fresh = self.walk_again(key, entry);
        let v = match (entry.page, fresh) {
            (Page::Leaf { gpa, perm, .. }, Ok(l))
                if l.iova == key.base && l.len == key.size() && l.gpa == gpa && l.perm == perm =>
            {
                return None
            }
            (Page::NotPresent, Err((_, true))) => return None,
            (Page::NotPresent, now) => Violation::new(
                Kind::CachingModeNoInvalidation,
                format!(
                    "the page was made present ({now:x?}) without an IOTLB invalidation; the \
                     unit still uses the not-present entry it cached"
                ),
            ),
            (Page::Leaf { gpa, perm, .. }, now) => Violation::new(
                Kind::StaleIotlb,
                format!(
                    "served from the IOTLB as {gpa:#x} {perm:?} ({} KiB page), but the tables \
                     now say {now:x?}",
                    key.size() >> 10
                ),
            ),
        };
        Some(
            v.domain(Some(key.tag.domain))
                .pasid(key.tag.pasid)
                .iova(key.base),
        )
    }

    /// Is the entry of suspect `key` still cached and still stale?
    fn still_stale(&mut self, key: CacheKey) -> bool {
        match key {
            CacheKey::Iotlb(k) => {
                let Some(entry) = self.caches.iotlb.peek(&k) else {
                    return false;
                };
                self.iotlb_violation(&k, &entry).is_some()
            }
            CacheKey::Context(source) => {
                let cached = self.caches.context.iter().find(|(s, _)| **s == source);
                let Some((_, c)) = cached else {
                    return false;
                };
                self.context_violation(source, c).is_some()
            }
            CacheKey::Pasid(source, pasid) => {
                let cached = self
                    .caches
                    .pasid
                    .iter()
                    .find(|(k, _)| **k == (source, pasid))
                    .map(|(_, c)| *c);
                let (Some(c), Ok(CachedContext::Scalable(sctx))) =
                    (cached, self.context_from_tables(source))
                else {
                    return false;
                };
                self.pasid_violation(source, &sctx, pasid, &c).is_some()
            }
            CacheKey::Irte(index) => {
                let cached = self.caches.iec.iter().find(|(i, _)| **i == index);
                let Some((_, irte)) = cached else {
                    return false;
                };
                self.irte_violation(index, irte).is_some()
            }
            CacheKey::DeviceTlb(source, page) => self.device_tlb_still_stale(source, page),
            CacheKey::DeviceTlbCovered(source, page) => self.device_tlb_still_cached(source, page),
        }
    }

    /// A request of `source` was served by its cached context entry `cached`.
    pub(super) fn check_context_use(&mut self, source: SourceId, cached: &CachedContext) {
        if let Some(v) = self.context_violation(source, cached) {
            self.check.suspect(CacheKey::Context(source), v);
        }
    }

    /// A request of `source` was served by its cached PASID entry `cached`.
    pub(super) fn check_pasid_use(
        &mut self,
        source: SourceId,
        sctx: &ScalableContext,
        pasid: u32,
        cached: &CachedPasid,
    ) {
        if let Some(v) = self.pasid_violation(source, sctx, pasid, cached) {
            self.check.suspect(CacheKey::Pasid(source, pasid), v);
        }
    }

    /// An interrupt request was served by the cached IRTE `cached`.
    pub(super) fn check_irte_use(&mut self, source: SourceId, index: u32, cached: &intremap::Irte) {
        if let Some(v) = self.irte_violation(index, cached) {
            self.check.suspect(CacheKey::Irte(index), v.source(source));
        }
    }

    /// A request of `source` was served by the cached IOTLB page `key`.
    pub(super) fn check_iotlb_use(&mut self, source: SourceId, key: iotlb::Key, entry: Entry) {
        if let Some(v) = self.iotlb_violation(&key, &entry) {
            self.check.suspect(CacheKey::Iotlb(key), v.source(source));
        }
    }

    /// What a request of `source` to `iova` under `tag` came to, checked against the
    /// invalidations not yet waited for and the unmaps that completed.
    pub(super) fn check_request(
        &mut self,
        source: SourceId,
        tag: Tag,
        iova: u64,
        result: &Result<Leaf, WalkFault>,
    ) {
        match result {
            Ok(leaf) => {
                let now = leaf.gpa + (iova - leaf.iova);
                let reused = self.check.pending().iter().copied().find(|inv| {
                    let (s, e) = inv.key.range();
                    inv.key.tag == tag
                        && (s..e).contains(&iova)
                        && match inv.entry.page {
                            Page::Leaf { gpa, perm, .. } => {
                                gpa + (iova - s) != now || perm != leaf.perm
                            }
                            Page::NotPresent => false,
                        }
                });
                if let Some(inv) = reused {
                    let mut v = Violation::new(
                        Kind::ReuseBeforeWait,
                        format!(
                            "the IOVA now maps {now:#x}, but the invalidation of its old \
                             translation (descriptor at IQH {:?}) has not been waited for",
                            inv.descriptor
                        ),
                    )
                    .source(source)
                    .domain(Some(tag.domain))
                    .pasid(tag.pasid)
                    .iova(iova);
                    v.descriptor = inv.descriptor;
                    v.request_at = vm_device::origin::current().map(Into::into);
                    self.check.report(v);
                }
                self.check
                    .remapped(tag, (leaf.iova, leaf.iova.saturating_add(leaf.len)));
            }
            Err((reason, true)) => {
                if let Some(k) = self.check.unmap_covering(tag, iova) {
                    let mut v = Violation::new(
                        Kind::UseAfterUnmap,
                        format!(
                            "the {} KiB page at {:#x} was unmapped and its invalidation waited \
                             for; the request faults ({reason:?})",
                            k.size() >> 10,
                            k.base
                        ),
                    )
                    .source(source)
                    .domain(Some(tag.domain))
                    .pasid(tag.pasid)
                    .iova(iova);
                    v.request_at = vm_device::origin::current().map(Into::into);
                    self.check.report(v);
                }
            }
            Err(_) => {}
        }
    }

    /// An IOTLB invalidation selected `sel` and removed `gone`: the checker follows the removed
    /// pages until the next wait, and forgets what it suspected of them.
    pub(super) fn iotlb_invalidated(&mut self, sel: iotlb::Selector, gone: &[(iotlb::Key, Entry)]) {
        self.stats.caches.iotlb.invalidated += gone.len() as u64;
        if !self.check.enabled() {
            return;
        }
        self.check.iotlb_invalidation(sel);
        if gone.is_empty() {
            return;
        }
        let descriptor = self.check.descriptor();
        self.check
            .forget(|k| matches!(k, CacheKey::Iotlb(key) if gone.iter().any(|(g, _)| g == key)));
        self.check.invalidated(
            gone.iter()
                .filter(|(_, e)| matches!(e.page, Page::Leaf { .. }))
                .map(|&(key, entry)| Invalidated {
                    key,
                    entry,
                    descriptor,
                }),
        );
    }

    /// A wait descriptor (or a register-based invalidation, which completes at once) completed:
    /// the invalidations before it are done. Settles the suspects seen before it, records the
    /// unmaps it completed, and looks for cached entries the tables no longer hold.
    pub(super) fn check_completion(&mut self, what: &str) {
        if !self.check.enabled() {
            return;
        }
        self.check.wait_completed();
        for inv in self.check.take_pending() {
            if let Err((_, true)) = self.walk_again(&inv.key, &inv.entry) {
                self.check.unmapped(inv.key);
            }
        }
        let why = format!("still not invalidated at the {what}");
        for key in self.check.due(false) {
            let stale = self.still_stale(key);
            self.check.settle(key, stale, &why);
        }
        let contexts: Vec<(SourceId, CachedContext)> =
            self.caches.context.iter().map(|(s, c)| (*s, *c)).collect();
        for (source, c) in contexts {
            if let Some(v) = self.context_violation(source, &c) {
                self.check.suspect(CacheKey::Context(source), v);
            }
        }
        let pasids: Vec<((SourceId, u32), CachedPasid)> =
            self.caches.pasid.iter().map(|(k, c)| (*k, *c)).collect();
        for ((source, pasid), c) in pasids {
            if let Ok(CachedContext::Scalable(sctx)) = self.context_from_tables(source) {
                if let Some(v) = self.pasid_violation(source, &sctx, pasid, &c) {
                    self.check.suspect(CacheKey::Pasid(source, pasid), v);
                }
            }
        }
        let irtes: Vec<(u32, intremap::Irte)> =
            self.caches.iec.iter().map(|(i, e)| (*i, *e)).collect();
        for (index, irte) in irtes {
            if let Some(v) = self.irte_violation(index, &irte) {
                self.check.suspect(CacheKey::Irte(index), v);
            }
        }
        self.check_device_tlbs_at_completion();
    }

    /// A page-selective invalidation of 2^`am` pages at `addr`: its address must be aligned
    /// to that size.
    pub(super) fn check_alignment(&mut self, domain: u16, pasid: Option<u32>, addr: u64, am: u8) {
        let size = 1u64.checked_shl(crate::PAGE_SHIFT + u32::from(am));
        if !self.check.enabled() || size.is_none_or(|s| addr & (s - 1) == 0) {
            return;
        }
        let (start, end) = crate::descriptor::IotlbScope::page_range(addr, am);
        self.check.report(
            Violation::new(
                Kind::MisalignedInvalidation,
                format!(
                    "address {addr:#x} is not aligned to its mask {am} ({} pages): the unit \
                     invalidates {start:#x}..{end:#x} instead",
                    1u64 << am
                ),
            )
            .domain(Some(domain))
            .pasid(pasid)
            .iova(addr),
        );
    }

    /// An invalidation of domain `d`: it must be a domain some context or PASID entry carried.
    pub(super) fn check_domain(&mut self, d: u16, what: &str) {
        if !self.check.enabled()
            || self.check.domain_seen(d)
            || (self.config.caching_mode && d == 0)
        {
            return;
        }
        // Only a complete scan proves the domain is nowhere in the tables.
        if let Some(false) = self.scan_for_domain(d) {
            self.check.report(
                Violation::new(
                    Kind::UnknownDomain,
                    format!("{what} names domain {d}, which no context or PASID entry has carried"),
                )
                .domain(Some(d)),
            );
        }
    }

    /// Reads every context entry (and in scalable mode every PASID entry) the root table
    /// reaches, noting their domains. Whether `d` is among them, or None when the tables hold
    /// more entries than a scan reads.
    fn scan_for_domain(&mut self, d: u16) -> Option<bool> {
        let mut budget = SCAN_BUDGET;
        let mut found = Vec::new();
        let mut read = |addr: u64| -> Option<u64> {
            budget = budget.checked_sub(1)?;
            Some(u64::from_le(
                self.mem.inner().read_obj(GuestAddress(addr)).unwrap_or(0),
            ))
        };
        let root = self.root_table;
        match self.root_mode {
            TableMode::Legacy => {
                for bus in 0..256u64 {
                    let re = read(root.checked_add(bus * 16)?)?;
                    if re & 1 == 0 {
                        continue;
                    }
                    let table = re & !0xfff;
                    for devfn in 0..256u64 {
                        let a = table.checked_add(devfn * 16)?;
                        if read(a)? & 1 != 0 {
                            found.push((read(a + 8)? >> 8) as u16);
                        }
                    }
                }
            }
            TableMode::Scalable => {
                for half in 0..512u64 {
                    let re = read(root.checked_add(half * 8)?)?;
                    if re & 1 == 0 {
                        continue;
                    }
                    let table = re & !0xfff;
                    for devfn in 0..128u64 {
                        let a = table.checked_add(devfn * 32)?;
                        let lo = read(a)?;
                        if lo & 1 == 0 {
                            continue;
                        }
                        let ctx = ScalableContext {
                            pasid_dir: lo & !0xfff,
                            pasid_limit: (1u32 << (((lo >> 9) & 0b111) + 7))
                                * scalable::PASIDS_PER_TABLE,
                            rid_pasid: 0,
                            pasid_enable: true,
                            device_tlb: false,
                            fpd: false,
                        };
                        let dir_entries = u64::from(ctx.pasid_limit / scalable::PASIDS_PER_TABLE);
                        for i in 0..dir_entries {
                            let pde = read(ctx.pasid_dir.checked_add(i * 8)?)?;
                            if pde & 1 == 0 {
                                continue;
                            }
                            for p in 0..u64::from(scalable::PASIDS_PER_TABLE) {
                                let e = (pde & !0xfff).checked_add(p * 64)?;
                                if read(e)? & 1 != 0 {
                                    found.push(read(e + 8)? as u16);
                                }
                            }
                        }
                    }
                }
            }
        }
        for &dom in &found {
            self.check.saw_domain(dom);
        }
        Some(found.contains(&d))
    }

    /// An index-selective interrupt-entry-cache invalidation whose index is not aligned to its
    /// mask.
    pub(super) fn report_misaligned_iec(&mut self, scope: intremap::IecScope) {
        if let intremap::IecScope::Index { index, mask } = scope {
            self.check.report(
                Violation::new(
                    Kind::MisalignedInvalidation,
                    format!(
                        "interrupt index {index} is not aligned to its mask {mask}: the unit \
                         invalidates the {} entries of the aligned block instead",
                        1u32 << mask.min(16)
                    ),
                )
                .spec("6.5.2.7")
                .index(u32::from(index)),
            );
        }
    }

    /// A wait descriptor's status write to `addr`: it must be guest RAM.
    pub(super) fn check_status_address(&mut self, addr: u64) {
        let in_ram = ranges::intersect(&[(addr, addr.saturating_add(4))], &self.ram)
            .first()
            .is_some_and(|&(s, e)| s == addr && e == addr.saturating_add(4));
        if self.check.enabled() && !in_ram {
            self.check.report(
                Violation::new(
                    Kind::WaitStatusNotRam,
                    format!("the status write goes to {addr:#x}, which is not guest RAM"),
                )
                .iova(addr),
            );
        }
    }
}
