//! The unit's translation caches (VT-d spec chapter 6), as hardware keeps them: a context-cache,
//! a PASID-cache, an IOTLB with an entry per page of the size the tables map, and an
//! interrupt-entry cache. They serve the requests of emulated devices, which the model
//! translates on demand: each is filled as requests are translated, bounded (the guest decides
//! what fills them, so each holds a fixed number of entries and evicts the least recently used),
//! and emptied only by the invalidations and events the spec names. A driver that changes a
//! table without invalidating what the unit cached from it therefore sees what hardware would
//! show it: the old translation. Devices the host remaps (passed through) do not use them: their
//! host mappings follow the invalidations themselves.

mod context;
mod iec;
pub mod iotlb;
mod lru;

pub use context::{CachedContext, CachedPasid, ContextCache, PasidCache};
pub use iec::InterruptEntryCache;
pub use iotlb::Iotlb;
pub use lru::Lru;

use serde::Serialize;

/// How many entries each cache holds; zero turns a cache off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheConfig {
    pub context: usize,
    pub pasid: usize,
    pub iotlb: usize,
    pub iec: usize,
}

impl CacheConfig {
    /// No caching: every request reads the tables, as the model did before it had caches.
    pub const OFF: CacheConfig = CacheConfig {
        context: 0,
        pasid: 0,
        iotlb: 0,
        iec: 0,
    };

    /// Sizes of the order of a server unit's: a context-cache and a PASID-cache of some tens of
    /// entries, an IOTLB of hundreds, an interrupt-entry cache of a hundred or so.
    pub const HARDWARE: CacheConfig = CacheConfig {
        context: 64,
        pasid: 64,
        iotlb: 512,
        iec: 128,
    };
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig::HARDWARE
    }
}

/// What one cache did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CacheCounters {
    /// Lookups a cached entry answered.
    pub hits: u64,
    /// Lookups that read the tables.
    pub misses: u64,
    /// Entries dropped to make room.
    pub evictions: u64,
    /// Entries removed by invalidations and root-pointer sets.
    pub invalidated: u64,
}

impl CacheCounters {
    pub(crate) fn lookup(&mut self, hit: bool) {
        if hit {
            self.hits += 1;
        } else {
            self.misses += 1;
        }
    }
}

/// Counters of every cache, for `--stats-json`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CacheStats {
    pub context: CacheCounters,
    pub pasid: CacheCounters,
    pub iotlb: CacheCounters,
    pub iec: CacheCounters,
    /// The device-TLBs of emulated ATS devices, all together; misses are translation requests.
    pub device_tlb: CacheCounters,
}

/// The caches of one unit.
#[derive(Debug)]
pub struct Caches {
    pub context: ContextCache,
    pub pasid: PasidCache,
    pub iotlb: Iotlb,
    pub iec: InterruptEntryCache,
}

impl Caches {
    pub fn new(config: CacheConfig) -> Self {
        Caches {
            context: ContextCache::new(config.context),
            pasid: PasidCache::new(config.pasid),
            iotlb: Iotlb::new(config.iotlb),
            iec: InterruptEntryCache::new(config.iec),
        }
    }

    /// Empties the DMA-remapping caches, as a root table pointer set does with ESRTPS (6.6),
    /// counting what each held as invalidated.
    pub fn clear_translations(&mut self, stats: &mut CacheStats) {
        stats.context.invalidated += self.context.clear() as u64;
        stats.pasid.invalidated += self.pasid.clear() as u64;
        stats.iotlb.invalidated += self.iotlb.invalidate(&iotlb::Selector::ALL).len() as u64;
    }
}
