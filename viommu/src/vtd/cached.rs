//! Requests of emulated devices through the unit's caches (VT-d spec chapter 6): the context
//! and PASID entries from the context- and PASID-caches, the leaf from the IOTLB, each read
//! from the tables only on a miss and then cached. In caching mode, not-present entries are
//! cached too (6.1). With the protocol checker on, every hit is compared with the tables.

use vm_memory::GuestMemoryBackend;

use super::Vtd;
use crate::cache::iotlb::{Entry, Key, Page, Table, Tag};
use crate::cache::{CachedContext, CachedPasid};
use crate::fault::{Access, FaultReason, PasidTag};
use crate::first_stage::{self, Request};
use crate::scalable::{self, ScalableContext};
use crate::tables::{self, Context, LookupFault, TableMode};
use crate::walk::{self, Leaf, StageFault};
use crate::SourceId;

/// Why a walk did not translate: the fault reason, and whether it is a not-present entry
/// (which caching mode may cache).
pub(super) type WalkFault = (FaultReason, bool);

impl<M: GuestMemoryBackend> Vtd<M> {
    /// What a request from `source` with `pasid` translates through, from the context- and
    /// PASID-caches where they hold it.
    pub(super) fn resolve_cached(
        &mut self,
        source: SourceId,
        pasid: Option<PasidTag>,
    ) -> Result<Context, LookupFault> {
        if self.root_mode == TableMode::Legacy && pasid.is_some() {
            return Err(LookupFault::new(FaultReason::PasidInLegacyMode));
        }
        match self.cached_context(source)? {
            CachedContext::Legacy(ctx) => Ok(ctx),
            CachedContext::Scalable(sctx) => {
                let p = scalable::select_pasid(&sctx, pasid)?;
                let entry = self.cached_pasid(source, &sctx, p)?;
                scalable::context_of(&sctx, &entry, p, pasid.is_some_and(|t| t.privileged))
            }
            // `cached_context` turns these into errors.
            CachedContext::NotPresent { reason, fpd } => Err(LookupFault { reason, fpd }),
        }
    }

    /// The context entry of `source` as the tables hold it, in the form the cache keeps.
    pub(super) fn context_from_tables(
        &self,
        source: SourceId,
    ) -> Result<CachedContext, LookupFault> {
        match self.root_mode {
            TableMode::Legacy => tables::lookup(&self.mem, self.root_table, source, &self.caps)
                .map(CachedContext::Legacy),
            TableMode::Scalable => {
                scalable::lookup_context(&self.mem, self.root_table, source, &self.caps)
                    .map(CachedContext::Scalable)
            }
        }
    }

    /// What the cache keeps of a context lookup's result: the entry, a not-present entry in
    /// caching mode, or nothing.
    fn cacheable_context(&self, r: &Result<CachedContext, LookupFault>) -> Option<CachedContext> {
        match *r {
            Ok(c) => Some(c),
            Err(e)
                if self.config.caching_mode
                    && matches!(
                        e.reason,
                        FaultReason::ContextEntryNotPresent | FaultReason::SmContextEntryNotPresent
                    ) =>
            {
                Some(CachedContext::NotPresent {
                    reason: e.reason,
                    fpd: e.fpd,
                })
            }
            Err(_) => None,
        }
    }

    /// The context entry of `source` from the context-cache, filled on a miss.
    fn cached_context(&mut self, source: SourceId) -> Result<CachedContext, LookupFault> {
        let scalable = self.root_mode == TableMode::Scalable;
        let hit = self.caches.context.get(source).filter(|c| match c {
            CachedContext::Legacy(_) => !scalable,
            CachedContext::Scalable(_) => scalable,
            CachedContext::NotPresent { .. } => true,
        });
        self.stats.caches.context.lookup(hit.is_some());
        let entry = match hit {
            Some(c) => {
                if self.check.enabled() {
                    self.check_context_use(source, &c);
                }
                c
            }
            None => {
                let fresh = self.context_from_tables(source);
                if let Some(c) = self.cacheable_context(&fresh) {
                    if self.caches.context.insert(source, c) {
                        self.stats.caches.context.evictions += 1;
                    }
                    if let Some(d) = c.domain() {
                        self.check.saw_domain(d);
                    }
                }
                fresh?
            }
        };
        match entry {
            CachedContext::NotPresent { reason, fpd } => Err(LookupFault { reason, fpd }),
            c => Ok(c),
        }
    }

    /// The PASID entry of `pasid` under `source`'s context `sctx` from the PASID-cache, filled
    /// on a miss.
    fn cached_pasid(
        &mut self,
        source: SourceId,
        sctx: &ScalableContext,
        pasid: u32,
    ) -> Result<scalable::PasidEntry, LookupFault> {
        let hit = self.caches.pasid.get(source, pasid);
        self.stats.caches.pasid.lookup(hit.is_some());
        let entry = match hit {
            Some(c) => {
                if self.check.enabled() {
                    self.check_pasid_use(source, sctx, pasid, &c);
                }
                c
            }
            None => {
                let fresh = scalable::lookup_pasid(&self.mem, sctx, pasid, &self.caps);
                let cached = match fresh {
                    Ok(e) => Some(CachedPasid::Entry(e)),
                    Err(e)
                        if self.config.caching_mode
                            && e.reason == FaultReason::PasidEntryNotPresent =>
                    {
                        Some(CachedPasid::NotPresent { fpd: e.fpd })
                    }
                    Err(_) => None,
                };
                if let Some(c) = cached {
                    if self.caches.pasid.insert(source, pasid, c) {
                        self.stats.caches.pasid.evictions += 1;
                    }
                    if let Some(d) = c.domain() {
                        self.check.saw_domain(d);
                    }
                }
                return fresh;
            }
        };
        match entry {
            CachedPasid::Entry(e) => Ok(e),
            CachedPasid::NotPresent { fpd } => Err(LookupFault {
                reason: FaultReason::PasidEntryNotPresent,
                fpd,
            }),
        }
    }

    /// Walks `table` for a request to `iova` of kind `access` under `tag`; `update` sets the
    /// first-stage accessed and dirty flags as a request does (the checker's walks leave them).
    pub(super) fn walk_table(
        &mut self,
        table: Table,
        tag: Tag,
        iova: u64,
        access: Access,
        update: bool,
    ) -> Result<Leaf, WalkFault> {
        // The checker's walks (`!update`) read past the recorder: they are none of the unit's
        // behaviour, which a replay (without the checker) repeats.
        match table {
            Table::Second(t) => {
                let walked = if update {
                    walk::walk(&self.mem, t, iova, access, &self.caps)
                } else {
                    walk::walk(self.mem.inner(), t, iova, access, &self.caps)
                };
                walked.map_err(|f| {
                    let reason = match self.root_mode {
                        TableMode::Legacy => f.legacy(access),
                        TableMode::Scalable => f.scalable(access),
                    };
                    (reason, f == StageFault::NotPresent)
                })
            }
            Table::First(t) => {
                let req = Request {
                    iova,
                    access,
                    privileged: tag.privileged,
                };
                let walked = if update {
                    self.stats.first_stage_walks += 1;
                    first_stage::translate(&self.mem, t, req, &self.caps)
                } else {
                    first_stage::peek(self.mem.inner(), t, req, &self.caps)
                };
                walked.map_err(|r| (r, r == FaultReason::FirstStageEntryNotPresent))
            }
        }
    }

    /// The fault a request of kind `access` gets from a not-present page under `tag`.
    fn not_present_reason(&self, table: Table, access: Access) -> FaultReason {
        match (table, self.root_mode) {
            (Table::First(_), _) => FaultReason::FirstStageEntryNotPresent,
            (Table::Second(_), TableMode::Scalable) => StageFault::NotPresent.scalable(access),
            (Table::Second(_), TableMode::Legacy) => StageFault::NotPresent.legacy(access),
        }
    }

    /// Translates `iova` under `tag` through the IOTLB, walking `table` on a miss. A cached
    /// page whose permissions deny the access (or a first-stage page not yet dirty, for a
    /// write) is walked again, so the fault or the flag update comes from the tables.
    pub(super) fn translate_cached(
        &mut self,
        source: SourceId,
        tag: Tag,
        table: Table,
        iova: u64,
        access: Access,
    ) -> Result<Leaf, FaultReason> {
        let hit = self
            .caches
            .iotlb
            .lookup(tag, iova)
            .filter(|(_, e)| match e.page {
                Page::Leaf { perm, dirty, .. } => {
                    perm.allows(access)
                        && (matches!(table, Table::Second(_)) || access == Access::Read || dirty)
                }
                Page::NotPresent => true,
            });
        self.stats.caches.iotlb.lookup(hit.is_some());
        let result = match hit {
            Some((key, entry)) => {
                if self.check.enabled() {
                    self.check_iotlb_use(source, key, entry);
                }
                match entry.page {
                    Page::Leaf { gpa, perm, .. } => Ok(Leaf {
                        iova: key.base,
                        gpa,
                        len: key.size(),
                        perm,
                    }),
                    Page::NotPresent => Err((self.not_present_reason(entry.table, access), true)),
                }
            }
            None => {
                let walked = self.walk_table(table, tag, iova, access, true);
                let cached = match walked {
                    Ok(leaf) => Some((
                        Key {
                            tag,
                            base: leaf.iova,
                            shift: leaf.len.trailing_zeros() as u8,
                        },
                        Page::Leaf {
                            gpa: leaf.gpa,
                            perm: leaf.perm,
                            dirty: access == Access::Write,
                        },
                    )),
                    Err((_, true)) if self.config.caching_mode => Some((
                        Key {
                            tag,
                            base: iova & !(crate::PAGE_SIZE - 1),
                            shift: crate::PAGE_SHIFT as u8,
                        },
                        Page::NotPresent,
                    )),
                    Err(_) => None,
                };
                if let Some((key, page)) = cached {
                    if self
                        .caches
                        .iotlb
                        .insert(key, Entry { page, table })
                        .is_some()
                    {
                        self.stats.caches.iotlb.evictions += 1;
                    }
                }
                walked
            }
        };
        if self.check.enabled() {
            self.check_request(source, tag, iova, &result);
        }
        result.map_err(|(reason, _)| reason)
    }
}
