//! The host mappings of one device, and how a change in the guest's translations becomes the
//! fewest host calls that keep them exact.
//!
//! The shadow mirrors the host mapping by mapping: each entry is one host `map` call, which the
//! host can only remove whole. Syncing a set of invalidated ranges compares what the guest now
//! translates there (the desired extents) with the host mappings that overlap them:
//! - a mapping whose translation still holds everywhere in the ranges is kept, with no host call;
//! - a mapping that now conflicts (the guest translates part of it elsewhere), or whose pages the
//!   guest dropped in strict mode, is removed; adjacent removals share one unmap call, and the
//!   parts of it the guest still translates are mapped again;
//! - in deferred mode, a mapping whose pages the guest dropped is kept on the host and marked
//!   dead there until the next flush; if the guest maps the same addresses again before that,
//!   the mark is cleared and no host call happens at all; when a removal is due anyway, the
//!   wholly dead mappings beside it leave in the same unmap call;
//! - everything desired and not covered by a kept mapping is mapped, with extents merged where
//!   both IOVA and guest-physical addresses are contiguous, so later unmaps remove one host
//!   mapping (one host IOTLB flush) instead of many.

use std::collections::BTreeMap;

use crate::host::{HostDma, HostDmaError};
use crate::ranges::{self, Range};
use crate::walk::{Leaf, WalkItem};
use crate::Perm;

/// One host mapping.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostMapping {
    pub len: u64,
    pub gpa: u64,
    pub perm: Perm,
    /// Ranges (absolute IOVAs) the guest no longer translates but the host still maps, waiting
    /// for a deferred flush. Always empty in strict mode.
    pub dead: Vec<Range>,
}

impl HostMapping {
    fn leaf_at(&self, key: u64, start: u64, end: u64) -> Leaf {
        Leaf {
            iova: start,
            gpa: self.gpa + (start - key),
            len: end - start,
            perm: self.perm,
        }
    }

    fn translates_like(&self, key: u64, d: &Leaf) -> bool {
        d.perm == self.perm && d.gpa.wrapping_sub(d.iova) == self.gpa.wrapping_sub(key)
    }
}

/// Counters of host work.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostWork {
    pub map_calls: u64,
    pub unmap_calls: u64,
    /// Host mappings removed: each costs the host one IOTLB flush.
    pub mappings_removed: u64,
    /// Mappings whose unmap was deferred.
    pub deferred: u64,
    /// Deferred unmaps cancelled because the guest mapped the same translation again.
    pub revived: u64,
}

/// Host mappings that one unmap call removes: `count` whole mappings within `[start, end)` and
/// nothing else.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct UnmapRun {
    start: u64,
    end: u64,
    count: u64,
}

/// What a sync decided, before any host call. A space keeps one between syncs, so that a sync
/// per wait descriptor does not allocate its lists anew.
#[derive(Debug, Default)]
pub struct Plan {
    /// Host mappings to remove, grouped into unmap calls, ascending.
    remove: Vec<UnmapRun>,
    /// Host mappings that stay but whose dead ranges change.
    mark: Vec<(u64, Vec<Range>)>,
    /// Extents to map once the removals are done, ascending and coalesced.
    map: Vec<Leaf>,
    /// Scratch of [`Shadow::plan_into`]: what kept mappings cover, and one mapping's live and
    /// dead parts.
    covered: Vec<Range>,
    live: Vec<Range>,
    dead: Vec<Range>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.mark.is_empty() && self.map.is_empty()
    }

    /// Entries the plan's lists have room for.
    pub fn room(&self) -> usize {
        self.remove.capacity()
            + self.mark.capacity()
            + self.map.capacity()
            + self.covered.capacity()
            + self.live.capacity()
            + self.dead.capacity()
    }

    fn clear(&mut self) {
        self.remove.clear();
        self.mark.clear();
        self.map.clear();
        self.covered.clear();
    }
}

/// A host call that failed while applying a plan.
#[derive(Debug)]
pub struct Failed {
    pub error: HostDmaError,
}

/// The host mappings of one device.
#[derive(Debug, Default)]
pub struct Shadow {
    maps: BTreeMap<u64, HostMapping>,
    /// Number of mappings with dead ranges.
    doomed: usize,
}

impl Shadow {
    pub fn new() -> Self {
        Self::default()
    }

    /// The host mappings, by IOVA.
    pub fn mappings(&self) -> impl Iterator<Item = (u64, &HostMapping)> {
        self.maps.iter().map(|(k, m)| (*k, m))
    }

    pub fn len(&self) -> usize {
        self.maps.len()
    }

    pub fn is_empty(&self) -> bool {
        self.maps.is_empty()
    }

    /// Number of host mappings waiting for a deferred unmap.
    pub fn doomed(&self) -> usize {
        self.doomed
    }

    /// Adds the mapping at `key` to the removals of `plan`. Keys come in ascending order; a
    /// removal joins the previous unmap call unless a mapping that stays lies between them.
    fn remove_in(&self, plan: &mut Plan, key: u64, len: u64) {
        if let Some(last) = plan.remove.last_mut() {
            if last.end == key || self.maps.range(last.end..key).next().is_none() {
                last.end = key + len;
                last.count += 1;
                return;
            }
        }
        plan.remove.push(UnmapRun {
            start: key,
            end: key + len,
            count: 1,
        });
    }

    /// The mappings overlapping any of `ranges` (normalized), ascending, each once.
    fn overlapping<'a>(
        &'a self,
        ranges: &'a [Range],
    ) -> impl Iterator<Item = (u64, &'a HostMapping)> + 'a {
        let mut last = None;
        ranges
            .iter()
            .flat_map(move |&(s, e)| {
                let straddling = self
                    .maps
                    .range(..=s)
                    .next_back()
                    .filter(|(&k, m)| k + m.len > s);
                straddling
                    .into_iter()
                    .chain(self.maps.range(s.saturating_add(1)..e))
            })
            // A mapping across the gap between two ranges comes once for each.
            .filter(move |&(&k, _)| last.replace(k) != Some(k))
            .map(|(&k, m)| (k, m))
    }

    /// Plans the host calls that make the host translate exactly `desired` over `ranges`
    /// (normalized), leaving everything outside them as it is. `desired` is sorted, disjoint,
    /// within `ranges` and within guest RAM; `ram_bounds` holds the start and end of every guest
    /// RAM region, which no host mapping may span. With `defer`, dropped pages are marked dead
    /// instead of unmapped.
    pub fn plan(
        &self,
        ranges: &[Range],
        desired: &[Leaf],
        ram_bounds: &[u64],
        defer: bool,
    ) -> Plan {
        let mut plan = Plan::default();
        self.plan_into(ranges, desired, ram_bounds, defer, &mut plan);
        plan
    }

    /// [`Shadow::plan`] into `plan`'s lists, which it clears first.
    pub fn plan_into(
        &self,
        ranges: &[Range],
        desired: &[Leaf],
        ram_bounds: &[u64],
        defer: bool,
        plan: &mut Plan,
    ) {
        plan.clear();
        // Parts of `desired` that kept mappings already translate; ascending by construction.
        let mut covered = std::mem::take(&mut plan.covered);
        // What removed mappings translate outside `ranges`, to map again.
        let mut to_map = std::mem::take(&mut plan.map);
        let (mut live, mut dead) = (
            std::mem::take(&mut plan.live),
            std::mem::take(&mut plan.dead),
        );
        for (key, h) in self.overlapping(ranges) {
            let (hs, he) = (key, key + h.len);
            live.clear();
            dead.clear();
            let mut conflict = false;
            let mut inside_len = 0;
            let first_range = ranges.partition_point(|r| r.1 <= hs);
            for &(rs, re) in ranges[first_range..].iter().take_while(|r| r.0 < he) {
                let (s, e) = (rs.max(hs), re.min(he));
                inside_len += e - s;
                let mut pos = s;
                let first = desired.partition_point(|d| d.iova + d.len <= s);
                for d in desired[first..].iter().take_while(|d| d.iova < e) {
                    let (ds, de) = (d.iova.max(s), (d.iova + d.len).min(e));
                    if ds > pos {
                        dead.push((pos, ds));
                    }
                    if h.translates_like(key, d) {
                        live.push((ds, de));
                    } else {
                        conflict = true;
                    }
                    pos = de;
                }
                if pos < e {
                    dead.push((pos, e));
                }
            }
            // In strict mode any dropped page means removal; only deferred mode keeps dead
            // ranges, and only it needs them worked out.
            let remove = conflict || (!defer && !dead.is_empty());
            if remove {
                self.remove_in(plan, key, h.len);
                if inside_len < h.len {
                    // What the guest still translates outside the ranges must come back.
                    let outside = ranges::subtract(&ranges::subtract(&[(hs, he)], ranges), &h.dead);
                    to_map.extend(outside.iter().map(|&(s, e)| h.leaf_at(key, s, e)));
                }
                continue;
            }
            covered.extend_from_slice(&live);
            if !(h.dead.is_empty() && dead.is_empty()) {
                let mut new_dead = ranges::subtract(&h.dead, ranges);
                new_dead.extend_from_slice(&dead);
                let new_dead = ranges::normalize(new_dead);
                if new_dead != h.dead {
                    plan.mark.push((key, new_dead));
                }
            }
        }
        // `desired` minus `covered`, in one pass over both sorted lists.
        let mut ci = 0;
        for d in desired {
            let (mut s, e) = (d.iova, d.iova + d.len);
            while ci < covered.len() && covered[ci].1 <= s {
                ci += 1;
            }
            let mut k = ci;
            while s < e {
                match covered.get(k) {
                    Some(&(cs, ce)) if cs < e => {
                        if cs > s {
                            to_map.push(d.sub(s, cs));
                        }
                        s = s.max(ce);
                        k += 1;
                    }
                    _ => {
                        to_map.push(d.sub(s, e));
                        break;
                    }
                }
            }
        }
        to_map.sort_unstable_by_key(|l| l.iova);
        plan.map = coalesce(to_map, ram_bounds);
        (plan.covered, plan.live, plan.dead) = (covered, live, dead);
        if defer {
            self.join_doomed(plan, ranges);
        }
    }

    /// Whether the mapping at `key` waits for a deferred unmap with nothing of it left live:
    /// removing it early costs no map call, and no flush the deferred flush would not make.
    fn wholly_dead(key: u64, h: &HostMapping) -> bool {
        h.dead == [(key, key + h.len)]
    }

    /// In deferred mode, a plan that removes mappings anyway (the guest pointed an IOVA whose
    /// unmap waits at another page) takes the wholly dead mappings beside each removal into the
    /// same unmap call: their flush was coming, and now it costs no call of its own. Only
    /// neighbours outside `ranges` join (the sync decided those inside), and only across
    /// nothing the host keeps, so each call still removes whole mappings and nothing else.
    fn join_doomed(&self, plan: &mut Plan, ranges: &[Range]) {
        if self.doomed == 0 || plan.remove.is_empty() {
            return;
        }
        let outside = |k: u64, h: &HostMapping| {
            let i = ranges.partition_point(|r| r.1 <= k);
            ranges.get(i).is_none_or(|r| r.0 >= k + h.len)
        };
        let joinable = |k: u64, h: &HostMapping| Self::wholly_dead(k, h) && outside(k, h);
        let runs = std::mem::take(&mut plan.remove);
        let mut joined: Vec<UnmapRun> = Vec::with_capacity(runs.len());
        for (i, mut run) in runs.iter().copied().enumerate() {
            // Back to the previous run's end, forward to the next run's start: runs stay
            // disjoint and ascending.
            let floor = joined.last().map_or(0, |r| r.end);
            while let Some((&k, h)) = self.maps.range(floor..run.start).next_back() {
                if !joinable(k, h) {
                    break;
                }
                run.start = k;
                run.count += 1;
            }
            let ceiling = runs.get(i + 1).map_or(u64::MAX, |r| r.start);
            while let Some((&k, h)) = self.maps.range(run.end..ceiling).next() {
                if !joinable(k, h) {
                    break;
                }
                run.end = k + h.len;
                run.count += 1;
            }
            match joined.last_mut() {
                Some(last) if self.maps.range(last.end..run.start).next().is_none() => {
                    last.end = run.end;
                    last.count += run.count;
                }
                _ => joined.push(run),
            }
        }
        plan.remove = joined;
    }

    /// Plans the deferred flush: every mapping with dead ranges is removed and its live parts
    /// mapped again.
    pub fn plan_flush(&self, ram_bounds: &[u64]) -> Plan {
        let mut plan = Plan::default();
        let mut carry = Vec::new();
        for (&key, h) in self.maps.iter().filter(|(_, h)| !h.dead.is_empty()) {
            self.remove_in(&mut plan, key, h.len);
            let live = ranges::subtract(&[(key, key + h.len)], &h.dead);
            carry.extend(live.iter().map(|&(s, e)| h.leaf_at(key, s, e)));
        }
        plan.map = coalesce(carry, ram_bounds);
        plan
    }

    /// Carries out `plan` on `host`: removals first, adjacent ones sharing one unmap call, then
    /// the maps. The shadow changes only where the host said yes, so it always says exactly what
    /// the host maps. Returns the calls the host refused.
    pub fn apply(
        &mut self,
        plan: &mut Plan,
        host: &mut dyn HostDma,
        work: &mut HostWork,
    ) -> Vec<Failed> {
        let mut failed = Vec::new();
        for run in plan.remove.drain(..) {
            work.unmap_calls += 1;
            match host.unmap(run.start, run.end - run.start) {
                Ok(()) => {
                    // The run holds only mappings being removed: take them all out at once.
                    for (_, h) in self.maps.extract_if(run.start..run.end, |_, _| true) {
                        if !h.dead.is_empty() {
                            self.doomed -= 1;
                        }
                    }
                    work.mappings_removed += run.count;
                }
                Err(error) => failed.push(Failed { error }),
            }
        }
        for (key, dead) in plan.mark.drain(..) {
            if let Some(h) = self.maps.get_mut(&key) {
                match (h.dead.is_empty(), dead.is_empty()) {
                    (true, false) => {
                        self.doomed += 1;
                        work.deferred += 1;
                    }
                    (false, true) => {
                        self.doomed -= 1;
                        work.revived += 1;
                    }
                    _ => {}
                }
                h.dead = dead;
            }
        }
        for l in plan.map.drain(..) {
            work.map_calls += 1;
            match host.map(l.iova, l.gpa, l.len, l.perm) {
                Ok(()) => {
                    self.maps.insert(
                        l.iova,
                        HostMapping {
                            len: l.len,
                            gpa: l.gpa,
                            perm: l.perm,
                            dead: Vec::new(),
                        },
                    );
                }
                Err(error) => failed.push(Failed { error }),
            }
        }
        failed
    }

    /// Brings the host in line with one walk's items the way QEMU does, as the baseline the
    /// batched engine is measured against: item by item, one host call per changed leaf, one
    /// unmap call per hole that has host mappings in it, no coalescing.
    pub fn sync_per_leaf(
        &mut self,
        items: &[WalkItem],
        ram_bounds: &[u64],
        ram: &[Range],
        host: &mut dyn HostDma,
        work: &mut HostWork,
    ) -> Vec<Failed> {
        let mut failed = Vec::new();
        for item in items {
            let (s, e, leaf) = match *item {
                WalkItem::Hole { iova, len } => (iova, iova + len, None),
                WalkItem::Leaf(l) => (l.iova, l.iova + l.len, Some(l)),
                WalkItem::Unchanged { .. } => continue,
            };
            let keys: Vec<u64> = self.overlapping(&[(s, e)]).map(|o| o.0).collect();
            let unchanged = match (leaf, keys.as_slice()) {
                // One host mapping that holds the whole leaf as it is: nothing to do.
                (Some(l), [k]) => {
                    let h = &self.maps[k];
                    *k <= s && e <= k + h.len && h.translates_like(*k, &l)
                }
                (None, []) => true,
                _ => false,
            };
            if unchanged {
                continue;
            }
            let mut plan = Plan::default();
            for &k in &keys {
                let h = &self.maps[&k];
                self.remove_in(&mut plan, k, h.len);
                let outside = ranges::subtract(&[(k, k + h.len)], &[(s, e)]);
                plan.map
                    .extend(outside.iter().map(|&(a, b)| h.leaf_at(k, a, b)));
            }
            if let Some(l) = leaf {
                clip_to_ram_into(&l, ram, ram_bounds, &mut plan.map);
            }
            plan.map.sort_unstable_by_key(|l| l.iova);
            failed.extend(self.apply(&mut plan, host, work));
        }
        failed
    }
}

/// Merges consecutive extents that are contiguous in IOVA and guest-physical space with the same
/// permissions, never across a guest RAM region boundary.
pub fn coalesce(mut sorted: Vec<Leaf>, ram_bounds: &[u64]) -> Vec<Leaf> {
    // `dedup_by` hands each extent with the last one kept: fold it in when contiguous.
    sorted.dedup_by(|next, last| {
        let joins = last.iova + last.len == next.iova
            && last.gpa + last.len == next.gpa
            && last.perm == next.perm
            && ram_bounds.binary_search(&next.gpa).is_err();
        if joins {
            last.len += next.len;
        }
        joins
    });
    sorted
}

/// Appends to `out` the parts of `leaf` whose guest-physical addresses are guest RAM (`ram`
/// normalized), split at region boundaries (`ram_bounds`).
pub fn clip_to_ram_into(leaf: &Leaf, ram: &[Range], ram_bounds: &[u64], out: &mut Vec<Leaf>) {
    let (gs, ge) = (leaf.gpa, leaf.gpa.saturating_add(leaf.len));
    // The common case: the leaf lies inside one region with no boundary inside it.
    let r = ram.partition_point(|r| r.1 <= gs);
    if ram.get(r).is_some_and(|&(rs, re)| rs <= gs && ge <= re) {
        let b = ram_bounds.partition_point(|&b| b <= gs);
        if ram_bounds.get(b).is_none_or(|&b| b >= ge) {
            out.push(*leaf);
            return;
        }
    }
    for (s, e) in ranges::intersect(&[(gs, ge)], ram) {
        let mut pos = s;
        let first = ram_bounds.partition_point(|&b| b <= s);
        for &b in ram_bounds[first..].iter().take_while(|&&b| b < e) {
            out.push(leaf.sub(leaf.iova + (pos - gs), leaf.iova + (b - gs)));
            pos = b;
        }
        out.push(leaf.sub(leaf.iova + (pos - gs), leaf.iova + (e - gs)));
    }
}

/// The parts of `leaf` whose guest-physical addresses are guest RAM.
pub fn clip_to_ram(leaf: &Leaf, ram: &[Range], ram_bounds: &[u64]) -> Vec<Leaf> {
    let mut out = Vec::new();
    clip_to_ram_into(leaf, ram, ram_bounds, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::SimHost;

    const P: u64 = 0x1000;

    fn leaf(iova: u64, gpa: u64, pages: u64) -> Leaf {
        Leaf {
            iova: iova * P,
            gpa: gpa * P,
            len: pages * P,
            perm: Perm::RW,
        }
    }

    /// Syncs `ranges` (in pages) to `desired`, returning the work done.
    fn sync(
        s: &mut Shadow,
        host: &mut SimHost,
        ranges: &[(u64, u64)],
        desired: &[Leaf],
        defer: bool,
    ) -> HostWork {
        let r: Vec<Range> = ranges.iter().map(|&(a, b)| (a * P, b * P)).collect();
        let mut plan = s.plan(&ranges::normalize(r), desired, &[], defer);
        let mut w = HostWork::default();
        assert!(s.apply(&mut plan, host, &mut w).is_empty());
        assert_eq!(
            host.page_map(),
            shadow_pages(s),
            "the shadow mirrors the host"
        );
        w
    }

    fn shadow_pages(s: &Shadow) -> std::collections::BTreeMap<u64, (u64, Perm)> {
        let mut m = std::collections::BTreeMap::new();
        for (k, h) in s.mappings() {
            for p in 0..h.len / P {
                m.insert(k + p * P, (h.gpa + p * P, h.perm));
            }
        }
        m
    }

    #[test]
    fn contiguous_leaves_become_one_host_mapping() {
        let mut s = Shadow::new();
        let mut h = SimHost::new();
        let desired: Vec<_> = (0..32).map(|i| leaf(100 + i, 500 + i, 1)).collect();
        let w = sync(&mut s, &mut h, &[(100, 132)], &desired, false);
        assert_eq!((w.map_calls, s.len()), (1, 1));
        let w = sync(&mut s, &mut h, &[(100, 132)], &[], false);
        assert_eq!((w.unmap_calls, w.mappings_removed), (1, 1));
        assert!(s.is_empty());
    }

    #[test]
    fn unchanged_translations_cost_no_host_call() {
        let mut s = Shadow::new();
        let mut h = SimHost::new();
        sync(&mut s, &mut h, &[(0, 8)], &[leaf(0, 10, 8)], false);
        let w = sync(&mut s, &mut h, &[(0, 64)], &[leaf(0, 10, 8)], false);
        assert_eq!(w, HostWork::default());
    }

    #[test]
    fn partial_unmap_of_a_coalesced_mapping_keeps_the_rest_mapped() {
        let mut s = Shadow::new();
        let mut h = SimHost::new();
        sync(&mut s, &mut h, &[(0, 8)], &[leaf(0, 10, 8)], false);
        // The guest drops pages 2 and 3 only; the invalidation covers pages 0..4.
        let w = sync(&mut s, &mut h, &[(0, 4)], &[leaf(0, 10, 2)], false);
        assert_eq!((w.unmap_calls, w.mappings_removed, w.map_calls), (1, 1, 2));
        let pages = h.page_map();
        assert_eq!(pages.len(), 6);
        assert!(!pages.contains_key(&(2 * P)) && !pages.contains_key(&(3 * P)));
        assert_eq!(pages[&(7 * P)].0, 17 * P);
    }

    #[test]
    fn remapping_elsewhere_replaces_only_the_changed_mapping() {
        let mut s = Shadow::new();
        let mut h = SimHost::new();
        sync(
            &mut s,
            &mut h,
            &[(0, 2)],
            &[leaf(0, 10, 1), leaf(1, 30, 1)],
            false,
        );
        assert_eq!(s.len(), 2, "not contiguous in guest-physical space");
        let w = sync(
            &mut s,
            &mut h,
            &[(0, 2)],
            &[leaf(0, 10, 1), leaf(1, 40, 1)],
            false,
        );
        assert_eq!((w.unmap_calls, w.map_calls), (1, 1));
        assert_eq!(h.page_map()[&P].0, 40 * P);
    }

    #[test]
    fn adjacent_removals_share_one_unmap_call_but_not_across_a_kept_mapping() {
        let mut s = Shadow::new();
        let mut h = SimHost::new();
        let all = [
            leaf(0, 10, 1),
            leaf(1, 30, 1),
            leaf(2, 50, 1),
            leaf(3, 70, 1),
        ];
        sync(&mut s, &mut h, &[(0, 4)], &all, false);
        let w = sync(&mut s, &mut h, &[(0, 4)], &[], false);
        assert_eq!((w.unmap_calls, w.mappings_removed), (1, 4));
        sync(&mut s, &mut h, &[(0, 4)], &all, false);
        let w = sync(&mut s, &mut h, &[(0, 4)], &[all[2]], false);
        assert_eq!((w.unmap_calls, w.mappings_removed), (2, 3));
    }

    #[test]
    fn deferred_drop_keeps_the_host_mapping_until_flush_and_a_remap_revives_it() {
        let mut s = Shadow::new();
        let mut h = SimHost::new();
        sync(&mut s, &mut h, &[(0, 1)], &[leaf(0, 10, 1)], true);
        let w = sync(&mut s, &mut h, &[(0, 1)], &[], true);
        assert_eq!((w.unmap_calls, w.deferred, s.doomed()), (0, 1, 1));
        assert_eq!(
            h.page_map().len(),
            1,
            "still mapped on the host until the flush"
        );
        let w = sync(&mut s, &mut h, &[(0, 1)], &[leaf(0, 10, 1)], true);
        assert_eq!((w.map_calls, w.unmap_calls, w.revived), (0, 0, 1));
        assert_eq!(s.doomed(), 0);
    }

    #[test]
    fn deferred_remap_elsewhere_unmaps_at_once() {
        let mut s = Shadow::new();
        let mut h = SimHost::new();
        sync(&mut s, &mut h, &[(0, 1)], &[leaf(0, 10, 1)], true);
        sync(&mut s, &mut h, &[(0, 1)], &[], true);
        let w = sync(&mut s, &mut h, &[(0, 1)], &[leaf(0, 20, 1)], true);
        assert_eq!((w.unmap_calls, w.map_calls), (1, 1));
        assert_eq!(h.page_map()[&0].0, 20 * P);
        assert_eq!(s.doomed(), 0);
    }

    #[test]
    fn deferred_remap_elsewhere_takes_the_wholly_dead_neighbours_into_its_unmap_call() {
        let mut s = Shadow::new();
        let mut h = SimHost::new();
        // Pages 0..6, each its own mapping (not contiguous in guest-physical space).
        let all: Vec<_> = (0..6).map(|i| leaf(i, 10 + 2 * i, 1)).collect();
        sync(&mut s, &mut h, &[(0, 6)], &all, true);
        // The guest drops 1, 2, 4 and 5, one invalidation each: all four wait.
        for p in [1, 2, 4, 5] {
            sync(&mut s, &mut h, &[(p, p + 1)], &[], true);
        }
        sync(&mut s, &mut h, &[(0, 1)], &[all[0]], true);
        assert_eq!(s.doomed(), 4);
        // It points page 2 elsewhere: 1 (dead) joins the call, 0 and 3 (live) stop it.
        let w = sync(&mut s, &mut h, &[(2, 3)], &[leaf(2, 99, 1)], true);
        assert_eq!((w.unmap_calls, w.mappings_removed, w.map_calls), (1, 2, 1));
        assert_eq!(s.doomed(), 2);
        let mapped: Vec<u64> = h.page_map().keys().map(|k| k / P).collect();
        assert_eq!(mapped, vec![0, 2, 3, 4, 5]);
        // Pointing 3 elsewhere takes 4 and 5 along: one call for three mappings.
        let w = sync(&mut s, &mut h, &[(3, 4)], &[leaf(3, 98, 1)], true);
        assert_eq!((w.unmap_calls, w.mappings_removed, w.map_calls), (1, 3, 1));
        assert_eq!(s.doomed(), 0);
        let mapped: Vec<u64> = h.page_map().keys().map(|k| k / P).collect();
        assert_eq!(mapped, vec![0, 2, 3]);
    }

    #[test]
    fn a_partly_live_doomed_mapping_does_not_join_a_removal() {
        let mut s = Shadow::new();
        let mut h = SimHost::new();
        // One mapping over pages 0..4, then page 4 on its own.
        sync(
            &mut s,
            &mut h,
            &[(0, 5)],
            &[leaf(0, 10, 4), leaf(4, 50, 1)],
            true,
        );
        // Pages 2..4 die: the first mapping waits with 0..2 still live.
        sync(&mut s, &mut h, &[(2, 4)], &[], true);
        assert_eq!(s.doomed(), 1);
        let w = sync(&mut s, &mut h, &[(4, 5)], &[leaf(4, 60, 1)], true);
        assert_eq!((w.unmap_calls, w.mappings_removed, w.map_calls), (1, 1, 1));
        assert_eq!(
            s.doomed(),
            1,
            "removing it would have cost a map of its live part"
        );
    }

    #[test]
    fn deferred_flush_removes_dead_mappings_and_remaps_their_live_parts() {
        let mut s = Shadow::new();
        let mut h = SimHost::new();
        sync(&mut s, &mut h, &[(0, 8)], &[leaf(0, 10, 8)], true);
        sync(
            &mut s,
            &mut h,
            &[(0, 4), (6, 8)],
            &[leaf(0, 10, 2), leaf(6, 16, 1)],
            true,
        );
        assert_eq!(h.page_map().len(), 8);
        let mut plan = s.plan_flush(&[]);
        let mut w = HostWork::default();
        assert!(s.apply(&mut plan, &mut h, &mut w).is_empty());
        assert_eq!((w.unmap_calls, w.mappings_removed), (1, 1));
        let pages = h.page_map();
        let mapped: Vec<u64> = pages.keys().map(|k| k / P).collect();
        assert_eq!(mapped, vec![0, 1, 4, 5, 6]);
        assert_eq!(s.doomed(), 0);
    }

    #[test]
    fn coalescing_stops_at_ram_region_boundaries() {
        let l = coalesce(vec![leaf(0, 0, 1), leaf(1, 1, 1)], &[P]);
        assert_eq!(l.len(), 2);
        let pieces = clip_to_ram(
            &leaf(0, 0, 4),
            &[(0, 2 * P), (3 * P, 8 * P)],
            &[0, P, 2 * P],
        );
        let got: Vec<_> = pieces.iter().map(|l| (l.iova / P, l.len / P)).collect();
        assert_eq!(got, vec![(0, 1), (1, 1), (3, 1)]);
    }

    #[test]
    fn refused_map_leaves_the_shadow_exact() {
        let mut s = Shadow::new();
        let mut h = SimHost::with_limit(1);
        let mut plan = s.plan(&[(0, 4 * P)], &[leaf(0, 10, 1), leaf(2, 30, 1)], &[], false);
        let mut w = HostWork::default();
        let failed = s.apply(&mut plan, &mut h, &mut w);
        assert_eq!(failed.len(), 1);
        assert_eq!(s.len(), 1);
        assert_eq!(h.page_map(), shadow_pages(&s));
    }

    #[test]
    fn per_leaf_baseline_makes_one_call_per_changed_leaf() {
        let mut s = Shadow::new();
        let mut h = SimHost::new();
        let items: Vec<_> = (0..4).map(|i| WalkItem::Leaf(leaf(i, 10 + i, 1))).collect();
        let ram = [(0, 1 << 40)];
        let mut w = HostWork::default();
        s.sync_per_leaf(&items, &[0, 1 << 40], &ram, &mut h, &mut w);
        assert_eq!(w.map_calls, 4);
        let holes = [WalkItem::Hole {
            iova: 0,
            len: 4 * P,
        }];
        let mut w = HostWork::default();
        s.sync_per_leaf(&holes, &[0, 1 << 40], &ram, &mut h, &mut w);
        assert_eq!((w.unmap_calls, w.mappings_removed), (1, 4));
    }
}
