//! One attached device's host address space: which view of the guest's translations it follows,
//! the invalidated ranges waiting to be synced, and the host mappings that implement it.

use crate::host::HostDma;
use crate::memory::TableMemory;
use crate::ranges::{self, Range};
use crate::shadow::{clip_to_ram_into, coalesce, Failed, HostWork, Plan, Shadow};
use crate::snapshots::LeafTables;
use crate::walk::{walk_range_with, Leaf, PageTable, UnchangedHook, WalkCounters, WalkItem};
use crate::{Capabilities, Perm, SourceId};

/// Most leaves (and plan entries) whose room a space keeps between syncs: a wait's sync needs a
/// few, and the room a whole-space sync needed is given back rather than held for the device's
/// lifetime.
const KEPT_ROOM: usize = 1024;

/// The whole input address space a sync may have to cover (52-bit addresses).
pub(crate) const FULL: Range = (0, 1 << 52);

/// What a device's DMA addresses mean, as the unit's state and its context entry (legacy mode)
/// or the PASID entry of its RID_PASID (scalable mode) say. The sync engine only looks at the
/// table: second-level tables are the same in both modes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum View {
    /// No translation: the context or PASID entry is missing or invalid.
    Blocked,
    /// DMA addresses are guest-physical: translation is off, or the entry is pass-through.
    Identity,
    /// Through the second-level tables of `domain`; `pasid` is the RID_PASID whose entry named
    /// them (scalable mode), which PASID-based invalidations select by.
    Tables {
        domain: u16,
        pasid: Option<u32>,
        table: PageTable,
    },
}

impl View {
    pub fn domain(&self) -> Option<u16> {
        match self {
            View::Tables { domain, .. } => Some(*domain),
            _ => None,
        }
    }

    pub fn pasid(&self) -> Option<u32> {
        match self {
            View::Tables { pasid, .. } => *pasid,
            _ => None,
        }
    }
}

/// What a sync needs to know of the guest.
pub(crate) struct SyncEnv<'a, M> {
    pub mem: &'a M,
    pub caps: &'a Capabilities,
    /// Guest RAM, normalized.
    pub ram: &'a [Range],
    /// Start and end of every guest RAM region, sorted.
    pub ram_bounds: &'a [u64],
    /// Walk visits left for this and the following syncs; each sync takes what it uses.
    pub walk_budget: std::cell::Cell<u64>,
}

/// What a sync did.
#[derive(Debug, Default)]
pub(crate) struct SyncReport {
    pub work: HostWork,
    pub failed: Vec<Failed>,
    pub tables_read: u64,
    pub budget_exceeded: bool,
}

/// Whether a space's device uses the host's shared identity domain ([`HostDma::use_identity`])
/// while its view is [`View::Identity`], instead of mapping all guest RAM in its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SharedIdentity {
    /// Not to be asked: the unit's user turned it off (a recording unit), or the host said it
    /// has none.
    Off,
    /// To be asked when the view next becomes identity.
    Available,
    /// The device is on the shared domain; its own maps nothing.
    InUse,
}

/// Whether a space's device uses another device's host domain ([`HostDma::use_domain`]) while
/// both views are the same translated tables, instead of mirroring them in its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Sharing {
    /// Not to be asked: the unit's user turned it off (a recording unit), or the host cannot
    /// share its domains.
    Off,
    /// On its own domain, which devices with the same view may use.
    Own,
    /// On `leader`'s own domain; its own maps nothing.
    Follows { leader: SourceId },
    /// Was following, but the leader's domain no longer maps its view: its next sync maps its
    /// own domain in full, then moves it back (retried at every sync until the host agrees).
    Leaving,
}

pub(crate) struct Space {
    pub source: SourceId,
    pub view: View,
    host: Box<dyn HostDma>,
    identity: SharedIdentity,
    sharing: Sharing,
    pub shadow: Shadow,
    /// Invalidated ranges not yet synced.
    pending: Vec<Range>,
    /// The whole space must be synced, strictly, because the view changed.
    view_changed: bool,
    /// Last-level tables as the host last mirrored them.
    snapshots: LeafTables,
    /// The buffer a sync collects the guest's leaves in, kept between syncs.
    desired: Vec<Leaf>,
    /// The plan a sync fills, kept between syncs.
    plan: Plan,
}

impl Space {
    /// A space for `source` over its own host domain `host`; with `share`, its identity views
    /// use the host's shared identity domain when the host has one, and its translated views
    /// the domain of another device with the same view when the host can share domains.
    pub fn new(source: SourceId, host: Box<dyn HostDma>, share: bool) -> Self {
        let sharing = if share && host.own_domain().is_some() {
            Sharing::Own
        } else {
            Sharing::Off
        };
        Space {
            source,
            view: View::Blocked,
            host,
            identity: if share {
                SharedIdentity::Available
            } else {
                SharedIdentity::Off
            },
            sharing,
            shadow: Shadow::new(),
            pending: Vec::new(),
            view_changed: true,
            snapshots: LeafTables::default(),
            desired: Vec::new(),
            plan: Plan::default(),
        }
    }

    /// Notes that the guest invalidated `range`.
    pub fn invalidate(&mut self, range: Range) {
        self.pending.push(range);
    }

    /// Switches to `view`; the whole space is synced strictly at the next sync. Returns
    /// whether the view changed.
    pub fn set_view(&mut self, view: View) -> bool {
        let changed = view != self.view;
        if changed {
            self.view = view;
            self.view_changed = true;
            self.snapshots.clear();
        }
        changed
    }

    /// Last-level tables this space keeps a snapshot of (4 KiB each).
    pub fn snapshot_count(&self) -> usize {
        self.snapshots.len()
    }

    pub fn has_pending(&self) -> bool {
        self.view_changed
            || !self.pending.is_empty()
            || self.must_leave_identity()
            || self.sharing == Sharing::Leaving
    }

    /// Whether the whole space is synced at the next sync (its view changed since the last).
    pub fn view_changed(&self) -> bool {
        self.view_changed
    }

    pub fn sharing(&self) -> Sharing {
        self.sharing
    }

    /// The host domain devices with this space's view may use: its own, while its device is
    /// on it and it mirrors translated tables already synced (not just switched to).
    pub fn leader_domain(&self) -> Option<u32> {
        let synced = matches!(self.view, View::Tables { .. }) && !self.view_changed;
        if self.sharing != Sharing::Own || !synced {
            return None;
        }
        self.host.own_domain()
    }

    /// Whether the space may move onto another device's domain: it shares, and its view is
    /// translated.
    pub fn may_follow(&self) -> bool {
        self.sharing != Sharing::Off && matches!(self.view, View::Tables { .. })
    }

    /// Moves the device onto `leader`'s domain `domain`, which maps this space's view (it may
    /// be on another leader's domain with the same view, or on its own). The next sync empties
    /// its own domain. A refusal leaves the device where it was; `Ok(false)` (the host cannot
    /// share) turns sharing off for the space.
    pub fn follow(&mut self, leader: SourceId, domain: u32) -> SyncReport {
        let mut report = SyncReport::default();
        match self.host.use_domain(Some(domain)) {
            Ok(true) => {
                vm_device::debug_limited!(
                    "VT-d: {}: on the host domain of {leader}, which the guest gave it too",
                    self.source
                );
                self.sharing = Sharing::Follows { leader };
                // Moved off the shared identity domain too, if it was on it.
                if self.identity == SharedIdentity::InUse {
                    self.identity = SharedIdentity::Available;
                }
                // The own domain's mappings are dropped at the next sync.
                self.view_changed = true;
            }
            Ok(false) => self.must_leave_or(Sharing::Off),
            Err(error) => {
                report.failed.push(Failed { error });
                if matches!(self.sharing, Sharing::Follows { .. }) {
                    self.must_leave_or(Sharing::Own);
                }
            }
        }
        report
    }

    /// The leader's domain no longer maps this space's view: back to its own, at the next
    /// sync, after mapping it in full. A space not following becomes `otherwise`.
    pub fn must_leave_or(&mut self, otherwise: Sharing) {
        if matches!(self.sharing, Sharing::Follows { .. } | Sharing::Leaving) {
            self.sharing = Sharing::Leaving;
            self.view_changed = true;
            self.snapshots.clear();
        } else {
            self.sharing = otherwise;
        }
    }

    /// While following: drops what the own domain still maps (it only pins memory) and what
    /// was pending, which the leader syncs. True when the device is on a leader's domain.
    fn stay_on_leader(&mut self, report: &mut SyncReport) -> bool {
        if !matches!(self.sharing, Sharing::Follows { .. }) {
            return false;
        }
        self.drop_own(report);
        true
    }

    /// Forgets what was pending and unmaps all the own domain holds: the device is on a
    /// shared domain, which maps what it reaches.
    fn drop_own(&mut self, report: &mut SyncReport) {
        self.pending.clear();
        self.view_changed = false;
        self.snapshots.clear();
        if !self.shadow.is_empty() {
            let mut plan = self.shadow.plan(&[FULL], &[], &[], false);
            self.apply(&mut plan, report);
        }
    }

    /// After a sync that mapped the own domain in full: moves a leaving device back onto it.
    fn leave_leader(&mut self, report: &mut SyncReport) {
        if self.sharing != Sharing::Leaving {
            return;
        }
        match self.host.use_domain(None) {
            Ok(_) => {
                vm_device::debug_limited!("VT-d: {}: back on its own host domain", self.source);
                self.sharing = Sharing::Own;
            }
            Err(error) => report.failed.push(Failed { error }),
        }
    }

    /// Whether the device is on the shared identity domain.
    pub fn on_shared_identity(&self) -> bool {
        self.identity == SharedIdentity::InUse
    }

    /// The device is on the shared identity domain but its view is no longer identity (a
    /// switch back that failed is retried at every sync).
    fn must_leave_identity(&self) -> bool {
        self.on_shared_identity() && self.view != View::Identity
    }

    /// Before a sync: with an identity view, moves the device onto the host's shared identity
    /// domain when it has one and drops the space's own mappings, which the device no longer
    /// reaches (they only pin memory). True when the device is on the shared domain: the
    /// sync has nothing to map.
    fn enter_identity(&mut self, report: &mut SyncReport) -> bool {
        if self.view != View::Identity {
            return false;
        }
        if self.identity == SharedIdentity::Available {
            match self.host.use_identity(true) {
                Ok(true) => {
                    vm_device::debug_limited!(
                        "VT-d: {}: on the host's shared identity domain",
                        self.source
                    );
                    self.identity = SharedIdentity::InUse;
                    // Off a leader's domain too, if it was on one.
                    if self.sharing == Sharing::Leaving {
                        self.sharing = Sharing::Own;
                    }
                }
                Ok(false) => self.identity = SharedIdentity::Off,
                // The device stays on its own domain, which the sync maps as before.
                Err(error) => report.failed.push(Failed { error }),
            }
        }
        if !self.on_shared_identity() {
            return false;
        }
        self.drop_own(report);
        true
    }

    /// After a sync that mapped what the non-identity view allows in the device's own domain:
    /// moves the device back onto it. Until this returns the device still reaches all guest
    /// RAM; a failure leaves it there, and is retried at the next sync.
    fn leave_identity(&mut self, report: &mut SyncReport) {
        if !self.must_leave_identity() {
            return;
        }
        match self.host.use_identity(false) {
            Ok(_) => {
                vm_device::debug_limited!("VT-d: {}: back on its own host domain", self.source);
                self.identity = SharedIdentity::Available;
            }
            Err(error) => report.failed.push(Failed { error }),
        }
    }

    /// Visits what `view` translates over `[start, end)`.
    fn items<M: TableMemory>(
        view: View,
        env: &SyncEnv<'_, M>,
        (start, end): Range,
        counters: &mut WalkCounters,
        report: &mut SyncReport,
        visit: &mut dyn FnMut(WalkItem),
        unchanged: Option<UnchangedHook<'_, '_>>,
    ) {
        match view {
            View::Blocked => visit(WalkItem::Hole {
                iova: start,
                len: end - start,
            }),
            View::Identity => {
                // Addresses outside RAM translate to nothing: holes, so a leaf-by-leaf sync
                // removes what the host still maps there (IOVAs above RAM that the tables mapped
                // before translation went off).
                let mut pos = start;
                for (s, e) in ranges::intersect(&[(start, end)], env.ram) {
                    if s > pos {
                        visit(WalkItem::Hole {
                            iova: pos,
                            len: s - pos,
                        });
                    }
                    visit(WalkItem::Leaf(Leaf {
                        iova: s,
                        gpa: s,
                        len: e - s,
                        perm: Perm::RW,
                    }));
                    pos = e;
                }
                if pos < end {
                    visit(WalkItem::Hole {
                        iova: pos,
                        len: end - pos,
                    });
                }
            }
            View::Tables { table, .. } => {
                let r = walk_range_with(
                    env.mem,
                    table,
                    (start, end),
                    env.caps,
                    counters,
                    visit,
                    unchanged,
                );
                if r.is_err() {
                    report.budget_exceeded = true;
                }
            }
        }
    }

    /// Syncs the pending ranges (or the whole space after a view change) in one batch.
    pub fn sync<M: TableMemory>(&mut self, env: &SyncEnv<'_, M>, defer: bool) -> SyncReport {
        let mut report = SyncReport::default();
        if self.enter_identity(&mut report) || self.stay_on_leader(&mut report) {
            return report;
        }
        self.sync_own(env, defer, &mut report);
        self.leave_identity(&mut report);
        self.leave_leader(&mut report);
        report
    }

    /// [`Space::sync`] in the device's own domain.
    fn sync_own<M: TableMemory>(
        &mut self,
        env: &SyncEnv<'_, M>,
        defer: bool,
        report: &mut SyncReport,
    ) {
        let (ranges, defer) = if self.view_changed {
            (vec![FULL], false)
        } else {
            (ranges::normalize(std::mem::take(&mut self.pending)), defer)
        };
        self.pending.clear();
        self.view_changed = false;
        if ranges.is_empty() {
            self.recycle_pending(ranges);
            return;
        }
        // The leaf buffer lives in the space, so a sync per wait does not allocate it anew.
        let mut desired = std::mem::take(&mut self.desired);
        desired.clear();
        let mut unchanged = Vec::new();
        let mut counters = WalkCounters::new(env.walk_budget.get());
        let snapshots = &mut self.snapshots;
        for &r in &ranges {
            let mut hook = |base, table, perm, entries: &[u64]| {
                snapshots.unchanged(base, table, perm, entries)
            };
            Self::items(
                self.view,
                env,
                r,
                &mut counters,
                report,
                &mut |item| match item {
                    WalkItem::Leaf(l) => {
                        clip_to_ram_into(&l, env.ram, env.ram_bounds, &mut desired)
                    }
                    WalkItem::Unchanged { iova, len } => unchanged.push((iova, iova + len)),
                    WalkItem::Hole { .. } => {}
                },
                Some(&mut hook),
            );
        }
        report.tables_read = counters.tables_read;
        env.walk_budget.set(counters.budget);
        let (desired, defer) = if report.budget_exceeded {
            // Fail safe: what the guest invalidated is unmapped on the host, so the device
            // reaches less than the guest's tables allow, never more (never a page the guest
            // took away).
            vm_device::warn_limited!(
                "{}: guest tables exceed the walk budget; unmapping the invalidated ranges",
                self.source
            );
            self.snapshots.clear();
            unchanged.clear();
            desired.clear();
            (desired, false)
        } else {
            (coalesce(desired, env.ram_bounds), defer)
        };
        // Spans whose tables did not change need no diff: the host is exact there.
        let to_plan = if unchanged.is_empty() {
            std::borrow::Cow::Borrowed(&ranges[..])
        } else {
            std::borrow::Cow::Owned(ranges::subtract(&ranges, &unchanged))
        };
        let mut plan = std::mem::take(&mut self.plan);
        self.shadow
            .plan_into(&to_plan, &desired, env.ram_bounds, defer, &mut plan);
        self.apply(&mut plan, report);
        if plan.room() <= KEPT_ROOM {
            self.plan = plan;
        }
        if report.failed.is_empty() && !report.budget_exceeded {
            self.snapshots.commit(&ranges, &unchanged);
        } else {
            self.snapshots.clear();
        }
        self.recycle_pending(ranges);
        if desired.capacity() <= KEPT_ROOM {
            self.desired = desired;
        }
    }

    /// Gives an emptied range buffer back to `pending`, so the next invalidation of this space
    /// does not allocate (one sync per wait descriptor makes this the hot path).
    fn recycle_pending(&mut self, mut buffer: Vec<Range>) {
        if self.pending.capacity() == 0 {
            buffer.clear();
            self.pending = buffer;
        }
    }

    /// Syncs `range` at once, leaf by leaf, the way QEMU does: the measured baseline.
    pub fn sync_per_leaf<M: TableMemory>(
        &mut self,
        env: &SyncEnv<'_, M>,
        range: Range,
    ) -> SyncReport {
        let mut report = SyncReport::default();
        if self.enter_identity(&mut report) || self.stay_on_leader(&mut report) {
            return report;
        }
        let range = if self.view_changed { FULL } else { range };
        self.view_changed = false;
        self.pending.clear();
        let mut items = Vec::new();
        let mut counters = WalkCounters::new(env.walk_budget.get());
        Self::items(
            self.view,
            env,
            range,
            &mut counters,
            &mut report,
            &mut |i| items.push(i),
            None,
        );
        report.tables_read = counters.tables_read;
        env.walk_budget.set(counters.budget);
        if report.budget_exceeded {
            // Fail safe, as the batched sync.
            items = vec![WalkItem::Hole {
                iova: range.0,
                len: range.1 - range.0,
            }];
        }
        let failed = self.shadow.sync_per_leaf(
            &items,
            env.ram_bounds,
            env.ram,
            self.host.as_mut(),
            &mut report.work,
        );
        report.failed.extend(failed);
        self.leave_identity(&mut report);
        self.leave_leader(&mut report);
        report
    }

    /// Carries out the deferred unmaps.
    pub fn flush_deferred(&mut self, ram_bounds: &[u64]) -> SyncReport {
        let mut report = SyncReport::default();
        if self.shadow.doomed() > 0 {
            let mut plan = self.shadow.plan_flush(ram_bounds);
            self.apply(&mut plan, &mut report);
        }
        report
    }

    fn apply(&mut self, plan: &mut Plan, report: &mut SyncReport) {
        if !plan.is_empty() {
            let failed = self
                .shadow
                .apply(plan, self.host.as_mut(), &mut report.work);
            report.failed.extend(failed);
        }
    }

    /// Removes every host mapping, for detaching the device.
    pub fn unmap_all(&mut self) -> SyncReport {
        self.snapshots.clear();
        self.set_view(View::Blocked);
        self.view_changed = true;
        let mut report = SyncReport::default();
        let mut plan = self.shadow.plan(&[FULL], &[], &[], false);
        self.apply(&mut plan, &mut report);
        self.view_changed = false;
        // Back on its own, now empty, domain: the shared ones stay for the devices using them.
        self.leave_identity(&mut report);
        if matches!(self.sharing, Sharing::Follows { .. }) {
            self.sharing = Sharing::Leaving;
        }
        self.leave_leader(&mut report);
        report
    }
}
