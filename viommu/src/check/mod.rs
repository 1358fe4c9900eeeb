//! The protocol checker: reports what a guest driver does that the VT-d spec makes a
//! violation, each with the spec section, the requester, domain, address or index concerned,
//! the descriptor or register write that exposed it and the guest instruction that made that
//! write (see [`Kind`] for what it can prove).
//!
//! This module keeps the checker's state; the unit (`crate::vtd`) feeds it at the points where a
//! violation becomes provable: a descriptor decoded, a request served from a cache, a wait
//! descriptor completed, the VM stopped. A cached entry that no longer matches the tables is
//! first a *suspect*: a request may legitimately race with a driver updating an entry it is
//! about to invalidate. It becomes a violation when a wait descriptor completes after it was
//! seen (the driver declared its invalidations done) and the entry is still cached and still
//! stale, or when the VM stops with it so. Everything the checker keeps is bounded: the guest
//! decides how much it would otherwise grow.

mod kind;

use std::collections::VecDeque;

pub use kind::{Instruction, Kind, RegisterWrite, Violation};

use serde::Serialize;
use vm_device::ratelimit::LogLimit;

use crate::cache::iotlb;
use crate::ranges::Range;
use crate::SourceId;

/// Violations a report keeps; later ones are counted only.
pub const MAX_KEPT: usize = 4096;
/// Suspects kept at once; later ones are not followed.
const MAX_SUSPECTS: usize = 1024;
/// Completed unmaps remembered for use-after-unmap.
const MAX_UNMAPPED: usize = 4096;
/// IOTLB entries invalidated since the last wait that are remembered for reuse-before-wait.
const MAX_PENDING: usize = 4096;

/// Which cached entry a suspect concerns.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CacheKey {
    Iotlb(iotlb::Key),
    Context(SourceId),
    Pasid(SourceId, u32),
    Irte(u32),
    /// A device-TLB page served stale: the device and the page's untranslated address.
    DeviceTlb(SourceId, u64),
    /// A device-TLB page an IOTLB invalidation covered: the device and the page's address.
    DeviceTlbCovered(SourceId, u64),
}

/// A stale cached entry not yet proven to be a missing invalidation.
#[derive(Clone, Debug)]
struct Suspect {
    key: CacheKey,
    /// The number of waits completed when it was seen stale.
    seen_at: u64,
    violation: Violation,
}

/// A translation an invalidation removed from the IOTLB before the wait that completes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Invalidated {
    pub key: iotlb::Key,
    /// What it cached (a leaf: not-present entries are not followed).
    pub entry: iotlb::Entry,
    /// Queue position of the invalidation descriptor.
    pub descriptor: Option<u64>,
}

/// Counters by kind, for `--stats-json`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CheckCounts {
    pub enabled: bool,
    pub total: u64,
    /// Per kind name, every kind present.
    pub by_kind: std::collections::BTreeMap<&'static str, u64>,
}

/// The JSON report `check-report=PATH` writes.
#[derive(Clone, Debug, Serialize)]
pub struct Report<'a> {
    pub total: u64,
    /// Per kind name, every kind present.
    pub counts: std::collections::BTreeMap<&'static str, u64>,
    /// The first [`MAX_KEPT`] violations, in the order found.
    pub violations: &'a [Violation],
    /// Violations found past [`MAX_KEPT`], counted only.
    pub not_kept: u64,
}

/// The set of domain ids seen in the guest's structures.
#[derive(Clone, Debug)]
struct Domains(Box<[u64; 1024]>);

impl Domains {
    fn insert(&mut self, d: u16) {
        self.0[usize::from(d / 64)] |= 1 << (d % 64);
    }

    fn contains(&self, d: u16) -> bool {
        self.0[usize::from(d / 64)] & 1 << (d % 64) != 0
    }
}

/// The checker's state.
#[derive(Debug)]
pub struct Checker {
    enabled: bool,
    counts: [u64; Kind::ALL.len()],
    limits: [LogLimit; Kind::ALL.len()],
    kept: Vec<Violation>,
    /// The register write being handled, and the descriptor being executed.
    write: Option<RegisterWrite>,
    descriptor: Option<u64>,
    /// Wait descriptors completed.
    waits: u64,
    domains: Domains,
    suspects: Vec<Suspect>,
    /// Entries already reported stale: not followed again until invalidated.
    reported: Vec<CacheKey>,
    /// IOTLB translations invalidated since the last wait.
    pending: Vec<Invalidated>,
    /// Translations whose invalidation completed while the tables no longer mapped them.
    unmapped: VecDeque<iotlb::Key>,
    /// What the IOTLB invalidations since the last wait selected (None: more than are kept).
    iotlb_invalidations: Option<Vec<iotlb::Selector>>,
}

impl Checker {
    pub fn new(enabled: bool) -> Self {
        Checker {
            enabled,
            counts: [0; Kind::ALL.len()],
            limits: std::array::from_fn(|_| LogLimit::new()),
            kept: Vec::new(),
            write: None,
            descriptor: None,
            waits: 0,
            domains: Domains(Box::new([0; 1024])),
            suspects: Vec::new(),
            reported: Vec::new(),
            pending: Vec::new(),
            unmapped: VecDeque::new(),
            iotlb_invalidations: Some(Vec::new()),
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The register write the unit handles now (None once done).
    pub fn set_write(&mut self, w: Option<RegisterWrite>) {
        self.write = w;
    }

    /// The queue position of the descriptor the unit executes now (None once done).
    pub fn set_descriptor(&mut self, d: Option<u64>) {
        self.descriptor = d;
    }

    pub fn descriptor(&self) -> Option<u64> {
        self.descriptor
    }

    /// Records `v`, completing it with the current descriptor, register write and guest
    /// instruction where it has none, and logs it (rate-limited per kind).
    pub fn report(&mut self, mut v: Violation) {
        if !self.enabled {
            return;
        }
        v.descriptor = v.descriptor.or(self.descriptor);
        v.register = v.register.or(self.write);
        v.at =
            v.at.or_else(|| vm_device::origin::current().map(Instruction::from));
        let k = v.kind.index();
        self.counts[k] += 1;
        vm_device::warn_limited_by!(&self.limits[k], "VT-d protocol violation: {v}");
        if self.kept.len() < MAX_KEPT {
            self.kept.push(v);
        }
    }

    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }

    pub fn count(&self, kind: Kind) -> u64 {
        self.counts[kind.index()]
    }

    pub fn violations(&self) -> &[Violation] {
        &self.kept
    }

    fn by_kind(&self) -> std::collections::BTreeMap<&'static str, u64> {
        Kind::ALL
            .iter()
            .map(|k| (k.name(), self.counts[k.index()]))
            .collect()
    }

    pub fn counts(&self) -> CheckCounts {
        CheckCounts {
            enabled: self.enabled,
            total: self.total(),
            by_kind: self.by_kind(),
        }
    }

    pub fn report_json(&self) -> Report<'_> {
        Report {
            total: self.total(),
            counts: self.by_kind(),
            violations: &self.kept,
            not_kept: self.total() - self.kept.len() as u64,
        }
    }

    /// Notes that a context or PASID entry (or a driver's device- or PASID-selective
    /// invalidation, which names the domain of the entry it invalidates) carries domain `d`.
    pub fn saw_domain(&mut self, d: u16) {
        self.domains.insert(d);
    }

    pub fn domain_seen(&self, d: u16) -> bool {
        self.domains.contains(d)
    }

    /// Wait descriptors completed so far.
    pub fn waits(&self) -> u64 {
        self.waits
    }

    /// A wait descriptor completed.
    pub fn wait_completed(&mut self) {
        self.waits += 1;
    }

    /// Notes that the cached entry `key` was found stale, as `v` would report it. A suspect
    /// already followed for the entry keeps the moment it was first seen.
    pub fn suspect(&mut self, key: CacheKey, mut v: Violation) {
        if !self.enabled
            || self.suspects.iter().any(|s| s.key == key)
            || self.reported.contains(&key)
        {
            return;
        }
        if self.suspects.len() >= MAX_SUSPECTS {
            return;
        }
        v.request_at = v
            .request_at
            .or_else(|| vm_device::origin::current().map(Instruction::from));
        self.suspects.push(Suspect {
            key,
            seen_at: self.waits,
            violation: v,
        });
    }

    /// The entries of suspects seen before the latest wait (or every suspect when `all`):
    /// those the unit must check again to confirm them.
    pub fn due(&self, all: bool) -> Vec<CacheKey> {
        self.suspects
            .iter()
            .filter(|s| all || s.seen_at < self.waits)
            .map(|s| s.key)
            .collect()
    }

    /// Settles the suspect of `key`: reported when `still_stale`, dropped either way. `why`
    /// says what confirmed it.
    pub fn settle(&mut self, key: CacheKey, still_stale: bool, why: &str) {
        let Some(i) = self.suspects.iter().position(|s| s.key == key) else {
            return;
        };
        let s = self.suspects.swap_remove(i);
        if still_stale {
            let mut v = s.violation;
            v.detail = format!("{}; {why}", v.detail);
            self.report(v);
            if self.reported.len() < MAX_SUSPECTS {
                self.reported.push(key);
            }
        }
    }

    /// Drops what is known of the entries an invalidation removed.
    pub fn forget(&mut self, gone: impl Fn(&CacheKey) -> bool) {
        self.suspects.retain(|s| !gone(&s.key));
        self.reported.retain(|k| !gone(k));
    }

    /// Remembers IOTLB translations an invalidation just removed, until the next wait.
    pub fn invalidated(&mut self, entries: impl IntoIterator<Item = Invalidated>) {
        if !self.enabled {
            return;
        }
        for e in entries {
            if self.pending.len() >= MAX_PENDING {
                break;
            }
            self.pending.push(e);
        }
    }

    /// The translations invalidated since the last wait.
    pub fn pending(&self) -> &[Invalidated] {
        &self.pending
    }

    /// Ends the window of the invalidations since the last wait, handing them to the caller.
    pub fn take_pending(&mut self) -> Vec<Invalidated> {
        std::mem::take(&mut self.pending)
    }

    /// Notes an IOTLB invalidation (before the next wait), for the device-TLB check.
    pub fn iotlb_invalidation(&mut self, sel: iotlb::Selector) {
        if !self.enabled {
            return;
        }
        if let Some(list) = &mut self.iotlb_invalidations {
            if list.len() < MAX_PENDING {
                list.push(sel);
            } else {
                // Too many to follow: this window proves nothing about device-TLBs.
                self.iotlb_invalidations = None;
            }
        }
    }

    /// The IOTLB invalidations since the last wait, ending that window; None when there were
    /// more than are kept.
    pub fn take_iotlb_invalidations(&mut self) -> Option<Vec<iotlb::Selector>> {
        self.iotlb_invalidations.replace(Vec::new())
    }

    /// Remembers that the translation `key` was unmapped and its invalidation completed.
    pub fn unmapped(&mut self, key: iotlb::Key) {
        if self.unmapped.len() >= MAX_UNMAPPED {
            self.unmapped.pop_front();
        }
        self.unmapped.push_back(key);
    }

    /// A completed unmap covering `iova` under `tag`, if one is remembered.
    pub fn unmap_covering(&self, tag: iotlb::Tag, iova: u64) -> Option<iotlb::Key> {
        self.unmapped.iter().rev().copied().find(|k| {
            let (s, e) = k.range();
            k.tag == tag && (s..e).contains(&iova)
        })
    }

    /// Forgets completed unmaps over `range` under `tag` (the IOVA is mapped again).
    pub fn remapped(&mut self, tag: iotlb::Tag, range: Range) {
        self.unmapped.retain(|k| {
            let (s, e) = k.range();
            !(k.tag == tag && s < range.1 && range.0 < e)
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> CacheKey {
        CacheKey::Context(SourceId(0x18))
    }

    #[test]
    fn a_disabled_checker_reports_nothing() {
        let mut c = Checker::new(false);
        c.report(Violation::new(Kind::UnknownDomain, "x"));
        c.suspect(key(), Violation::new(Kind::StaleContext, "x"));
        assert_eq!(c.total(), 0);
        assert!(c.due(true).is_empty());
    }

    #[test]
    fn a_report_takes_the_current_descriptor_write_and_instruction() {
        let mut c = Checker::new(true);
        let write = RegisterWrite {
            name: "IQT",
            offset: 0x88,
            value: 0x20,
        };
        c.set_write(Some(write));
        c.set_descriptor(Some(1));
        let origin = vm_device::origin::Origin {
            vcpu: 1,
            rip: 0xffff_ffff_8100_0000,
        };
        vm_device::origin::scope(Some(origin), || {
            c.report(Violation::new(Kind::MisalignedInvalidation, "x").iova(0x3000));
        });
        let v = &c.violations()[0];
        assert_eq!(v.descriptor, Some(1));
        assert_eq!(v.register, Some(write));
        assert_eq!(v.at, Some(Instruction::from(origin)));
        assert_eq!(v.spec, Kind::MisalignedInvalidation.spec());
        assert_eq!(c.count(Kind::MisalignedInvalidation), 1);
        assert_eq!(c.counts().by_kind.len(), Kind::ALL.len());
    }

    #[test]
    fn a_suspect_is_due_after_the_next_wait_and_reported_only_if_still_stale() {
        let mut c = Checker::new(true);
        c.suspect(key(), Violation::new(Kind::StaleContext, "changed"));
        assert!(c.due(false).is_empty(), "not before a wait completes");
        assert_eq!(c.due(true), vec![key()], "all of them when the VM stops");
        c.wait_completed();
        assert_eq!(c.due(false), vec![key()]);
        c.settle(key(), false, "");
        assert_eq!(c.total(), 0, "invalidated or restored: no violation");
        c.suspect(key(), Violation::new(Kind::StaleContext, "changed"));
        c.wait_completed();
        c.settle(key(), true, "still stale at the next wait");
        assert_eq!(c.count(Kind::StaleContext), 1);
        assert!(c.violations()[0]
            .detail
            .ends_with("still stale at the next wait"));
    }

    #[test]
    fn what_it_keeps_is_bounded() {
        let mut c = Checker::new(true);
        for i in 0..(MAX_KEPT + 10) {
            c.report(Violation::new(Kind::UnknownDomain, format!("{i}")));
        }
        assert_eq!(c.violations().len(), MAX_KEPT);
        assert_eq!(c.report_json().not_kept, 10);
        for i in 0..(MAX_SUSPECTS + 10) {
            c.suspect(
                CacheKey::Irte(i as u32),
                Violation::new(Kind::StaleIrte, ""),
            );
        }
        assert_eq!(c.due(true).len(), MAX_SUSPECTS);
        let k = iotlb::Key {
            tag: iotlb::Tag {
                domain: 1,
                pasid: None,
                stage: iotlb::Stage::Second,
                privileged: false,
            },
            base: 0,
            shift: 12,
        };
        for _ in 0..(MAX_UNMAPPED + 10) {
            c.unmapped(k);
        }
        assert_eq!(c.unmapped.len(), MAX_UNMAPPED);
        assert_eq!(c.unmap_covering(k.tag, 0x800), Some(k));
        c.remapped(k.tag, (0, 0x1000));
        assert_eq!(c.unmap_covering(k.tag, 0x800), None);
    }
}
