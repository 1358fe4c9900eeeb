//! Snapshots of the guest's last-level page tables as the host last mirrored them, so a sync
//! over a large range (a domain or global invalidation) skips tables that did not change:
//! its work follows what changed, not what is mapped.
//!
//! A snapshot of the 2 MiB span at `base` says: the last sync covered the whole span, went
//! through this table with these inherited permissions, saw these 512 entries and the host
//! took every call it made. If the same table still holds the same entries, the host mappings
//! over the span are exact as they are. Any sync that covers the span only in part, any host
//! failure and any change of view forgets snapshots, so a stale one is never trusted.

use std::collections::HashMap;

use crate::ranges::Range;
use crate::walk::LEAF_TABLE_SPAN;
use crate::Perm;

/// Most snapshots one device keeps (4 KiB each), bounding the memory a guest can make us hold.
const MAX_SNAPSHOTS: usize = 8192;

struct Snapshot {
    table: u64,
    perm: Perm,
    entries: Box<[u64]>,
}

/// Snapshots of one device's last-level tables, by the IOVA of the span each covers.
#[derive(Default)]
pub(crate) struct LeafTables {
    known: HashMap<u64, Snapshot>,
    /// Snapshots taken during the current sync, kept only if it succeeds.
    staged: Vec<(u64, Snapshot)>,
}

impl LeafTables {
    /// Number of tables with a snapshot.
    pub fn len(&self) -> usize {
        self.known.len()
    }

    /// Is the table at `table`, covering the span at `base`, as last mirrored? If not, stages
    /// a snapshot of it for [`LeafTables::commit`].
    pub fn unchanged(&mut self, base: u64, table: u64, perm: Perm, entries: &[u64]) -> bool {
        let same = self
            .known
            .get(&base)
            .is_some_and(|s| s.table == table && s.perm == perm && *s.entries == *entries);
        if !same && self.known.len() + self.staged.len() < MAX_SNAPSHOTS {
            self.staged.push((
                base,
                Snapshot {
                    table,
                    perm,
                    entries: entries.into(),
                },
            ));
        }
        same
    }

    /// After a sync of `ranges` (normalized) succeeded: forgets the spans it touched except
    /// those found unchanged, then keeps the snapshots it took.
    pub fn commit(&mut self, ranges: &[Range], unchanged: &[Range]) {
        // Most syncs cover a few pages of one table: nothing was known, nothing taken.
        if self.known.is_empty() && self.staged.is_empty() {
            return;
        }
        let kept = |base: u64| {
            let i = unchanged.partition_point(|r| r.1 <= base);
            unchanged.get(i).is_some_and(|r| r.0 <= base)
        };
        for &(s, e) in ranges {
            let (first, last) = (s / LEAF_TABLE_SPAN, (e - 1) / LEAF_TABLE_SPAN);
            if last - first < 64 {
                for span in first..=last {
                    let base = span * LEAF_TABLE_SPAN;
                    if !kept(base) {
                        self.known.remove(&base);
                    }
                }
            } else {
                self.known
                    .retain(|&base, _| kept(base) || base + LEAF_TABLE_SPAN <= s || base >= e);
            }
        }
        self.known.extend(self.staged.drain(..));
    }

    /// Forgets everything: after a host failure or a change of view.
    pub fn clear(&mut self) {
        self.known.clear();
        self.staged.clear();
    }
}
