//! The context-cache (VT-d spec 6.2.2) and the PASID-cache (6.2.3): the context entries the
//! unit looked up for each requester, and in scalable mode the PASID entries it looked up for
//! each requester and PASID. Each is emptied by its own invalidation descriptor (6.5.2.1 and
//! 6.5.2.2) and by a root table pointer set (6.6, ESRTPS).

use super::lru::Lru;
use crate::descriptor::{ContextScope, PasidCacheScope};
use crate::fault::FaultReason;
use crate::scalable::{PasidEntry, ScalableContext};
use crate::tables::Context;
use crate::SourceId;

/// A cached context entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CachedContext {
    /// A legacy-mode context entry, as it translates.
    Legacy(Context),
    /// A scalable-mode context entry.
    Scalable(ScalableContext),
    /// A not-present entry, cached only in caching mode (6.1), with the fault it raises.
    NotPresent { reason: FaultReason, fpd: bool },
}

impl CachedContext {
    /// The domain the entry names (legacy mode only: a scalable-mode context entry has none).
    pub fn domain(&self) -> Option<u16> {
        match self {
            CachedContext::Legacy(c) => Some(c.domain),
            _ => None,
        }
    }
}

/// The context-cache.
#[derive(Debug)]
pub struct ContextCache {
    entries: Lru<SourceId, CachedContext>,
}

impl ContextCache {
    pub fn new(capacity: usize) -> Self {
        ContextCache {
            entries: Lru::new(capacity),
        }
    }

    pub fn get(&mut self, source: SourceId) -> Option<CachedContext> {
        self.entries.get(&source).copied()
    }

    pub fn insert(&mut self, source: SourceId, entry: CachedContext) -> bool {
        self.entries.insert(source, entry).is_some()
    }

    /// Removes the entries `scope` covers and returns them. A domain-selective invalidation
    /// also removes entries that name no domain (scalable-mode and not-present ones): hardware
    /// may always invalidate more than asked.
    pub fn invalidate(&mut self, scope: ContextScope) -> Vec<(SourceId, CachedContext)> {
        self.entries.remove_where(|&source, e| match scope {
            ContextScope::Global => true,
            ContextScope::Domain(d) => e.domain().is_none_or(|own| own == d),
            ContextScope::Device { .. } => scope.covers(source, e.domain()),
        })
    }

    pub fn clear(&mut self) -> usize {
        self.entries.clear()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&SourceId, &CachedContext)> {
        self.entries.iter()
    }

    pub fn contains(&self, source: SourceId, entry: &CachedContext) -> bool {
        self.entries.peek(&source) == Some(entry)
    }
}

/// A cached PASID entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CachedPasid {
    Entry(PasidEntry),
    /// A not-present entry, cached only in caching mode (6.1).
    NotPresent {
        fpd: bool,
    },
}

impl CachedPasid {
    pub fn domain(&self) -> Option<u16> {
        match self {
            CachedPasid::Entry(e) => Some(e.domain),
            CachedPasid::NotPresent { .. } => None,
        }
    }
}

/// The PASID-cache, by requester and PASID.
#[derive(Debug)]
pub struct PasidCache {
    entries: Lru<(SourceId, u32), CachedPasid>,
}

impl PasidCache {
    pub fn new(capacity: usize) -> Self {
        PasidCache {
            entries: Lru::new(capacity),
        }
    }

    pub fn get(&mut self, source: SourceId, pasid: u32) -> Option<CachedPasid> {
        self.entries.get(&(source, pasid)).copied()
    }

    pub fn insert(&mut self, source: SourceId, pasid: u32, entry: CachedPasid) -> bool {
        self.entries.insert((source, pasid), entry).is_some()
    }

    /// Removes the entries `scope` covers (a not-present entry names no domain and is always
    /// covered) and returns them.
    pub fn invalidate(&mut self, scope: PasidCacheScope) -> Vec<((SourceId, u32), CachedPasid)> {
        self.entries
            .remove_where(|&(_, pasid), e| scope.covers(e.domain(), Some(pasid)))
    }

    pub fn clear(&mut self) -> usize {
        self.entries.clear()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&(SourceId, u32), &CachedPasid)> {
        self.entries.iter()
    }

    pub fn contains(&self, key: (SourceId, u32), entry: &CachedPasid) -> bool {
        self.entries.peek(&key) == Some(entry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tables::Translation;

    fn legacy(domain: u16) -> CachedContext {
        CachedContext::Legacy(Context {
            domain,
            translation: Translation::PassThrough,
            fpd: false,
            pasid: None,
            device_tlb: false,
        })
    }

    #[test]
    fn context_invalidations_remove_by_device_with_function_mask_or_by_domain() {
        let mut c = ContextCache::new(8);
        let a = SourceId::new(0, 3, 0);
        let b = SourceId::new(0, 3, 1);
        let other = SourceId::new(0, 4, 0);
        c.insert(a, legacy(1));
        c.insert(b, legacy(1));
        c.insert(other, legacy(2));
        let gone = c.invalidate(ContextScope::Device {
            domain: 1,
            source: a,
            function_mask: 0,
        });
        assert_eq!(gone, vec![(a, legacy(1))]);
        let gone = c.invalidate(ContextScope::Device {
            domain: 1,
            source: a,
            function_mask: 3,
        });
        assert_eq!(gone, vec![(b, legacy(1))], "FM 3 ignores the function bits");
        c.insert(a, legacy(1));
        assert_eq!(
            c.invalidate(ContextScope::Domain(2)),
            vec![(other, legacy(2))]
        );
        assert_eq!(c.len(), 1);
        assert_eq!(c.invalidate(ContextScope::Global).len(), 1);
    }

    #[test]
    fn pasid_invalidations_select_by_domain_and_pasid() {
        let mut c = PasidCache::new(8);
        let dev = SourceId::new(0, 3, 0);
        let entry = |domain| {
            CachedPasid::Entry(PasidEntry {
                domain,
                translation: Translation::PassThrough,
                supervisor: false,
                fpd: false,
            })
        };
        c.insert(dev, 0, entry(1));
        c.insert(dev, 5, entry(1));
        c.insert(dev, 6, CachedPasid::NotPresent { fpd: false });
        let gone = c.invalidate(PasidCacheScope::Pasid {
            domain: 1,
            pasid: 5,
        });
        let mut keys: Vec<u32> = gone.iter().map(|((_, p), _)| *p).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            vec![5, 6],
            "the not-present entry has no domain to keep it"
        );
        assert_eq!(c.invalidate(PasidCacheScope::Domain(2)), vec![]);
        assert_eq!(c.invalidate(PasidCacheScope::Global).len(), 1);
    }
}
