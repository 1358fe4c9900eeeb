//! Property tests of caching-mode host sync: random guest page-table edits, invalidations and
//! waits, checked against a reference that knows only the VT-d rule: after a wait, the host
//! translates each page exactly as the guest's tables did when it was last invalidated. In
//! legacy mode (128-bit descriptors, a context entry naming the table) and in scalable mode
//! (256-bit descriptors, a second-stage PASID entry naming it, PASID-based invalidations).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, PoisonError};

use proptest::prelude::*;
use viommu::descriptor::encode;
use viommu::regs::{ICS_IWC, ICS_REG, IECTL_REG};
use viommu::testing::{mem, Driver, ManualClock, Mem, ScalableTables, SharedHost, SimHost, Tables};
use viommu::walk::{self, PageTable};
use viommu::{
    Access, Capabilities, FlushMode, MsiSink, Perm, SourceId, SyncStrategy, Vtd, VtdConfig,
};

type PageMap = BTreeMap<u64, (u64, Perm)>;

/// Takes a picture of the host's mappings when the unit signals a wait's completion: what the
/// guest may rely on from that moment.
struct SnapshotMsi {
    host: SharedHost,
    snapshot: Arc<Mutex<Option<PageMap>>>,
}

impl MsiSink for SnapshotMsi {
    fn send(&self, _addr: u64, _data: u32) {
        *self.snapshot.lock().unwrap_or_else(PoisonError::into_inner) =
            Some(self.host.get().page_map());
    }
}

const P: u64 = 0x1000;
const DEV: SourceId = SourceId(0x0018);
const DOMAIN: u16 = 1;
/// IOVA pages the guest uses: a window that straddles a 2 MiB boundary.
const IOVA_BASE: u64 = 0x1f_0000;
const IOVA_PAGES: u64 = 64;
/// Guest-physical pages mappings point at.
const GPA_BASE: u64 = 0x10_0000;
const GPA_PAGES: u64 = 48;

#[derive(Clone, Debug)]
enum Op {
    /// Write `pages` leaf entries from `iova` to consecutive guest pages from `gpa`.
    Map {
        iova: u64,
        gpa: u64,
        pages: u64,
        perm: u8,
    },
    Unmap {
        iova: u64,
        pages: u64,
    },
    /// Queue a page-selective invalidation of 2^am pages at `iova`.
    Psi {
        iova: u64,
        am: u8,
    },
    Dsi,
    Global,
    /// Queue a device-selective context invalidation.
    Context,
    /// Queue a PASID-based page-selective invalidation of the RID_PASID (a page-selective one
    /// in legacy mode).
    PasidPsi {
        iova: u64,
        am: u8,
    },
    /// Queue a PASID-selective PASID-based invalidation (domain-selective in legacy mode).
    PasidAll,
    /// Queue a PASID-cache invalidation of the RID_PASID entry (context in legacy mode).
    PasidCache,
    /// Submit what is queued, with a wait.
    Wait,
}

/// Which tables and queue the guest uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Legacy,
    Scalable,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..IOVA_PAGES, 0..GPA_PAGES, 1..8u64, 1..4u8)
            .prop_map(|(iova, gpa, pages, perm)| Op::Map { iova, gpa, pages, perm }),
        // Wide unmaps often put a table back as an earlier full sync saw it, which is what
        // trips a stale last-level-table snapshot.
        3 => (0..IOVA_PAGES, 1..24u64).prop_map(|(iova, pages)| Op::Unmap { iova, pages }),
        4 => (0..IOVA_PAGES, 0..6u8).prop_map(|(iova, am)| Op::Psi { iova, am }),
        2 => Just(Op::Dsi),
        1 => Just(Op::Global),
        1 => Just(Op::Context),
        2 => (0..IOVA_PAGES, 0..6u8).prop_map(|(iova, am)| Op::PasidPsi { iova, am }),
        1 => Just(Op::PasidAll),
        1 => Just(Op::PasidCache),
        4 => Just(Op::Wait),
    ]
}

/// A guest driving one unit with one attached device.
struct Guest {
    mem: Mem,
    vtd: Vtd<Mem>,
    host: SharedHost,
    drv: Driver,
    mode: Mode,
    tables: Tables,
    pt: PageTable,
    queued: Vec<[u64; 2]>,
    /// Pages the queued descriptors cover.
    covered: BTreeSet<u64>,
    /// What the host must translate after the next wait: the reference.
    expected: PageMap,
    token: u32,
    snapshot: Arc<Mutex<Option<PageMap>>>,
}

fn perm_of(bits: u8) -> Perm {
    Perm {
        read: bits & 1 != 0,
        write: bits & 2 != 0,
    }
}

impl Guest {
    fn new(strategy: SyncStrategy, flush: FlushMode, mode: Mode) -> Self {
        let mem = mem();
        let config = VtdConfig {
            strategy,
            flush,
            scalable_mode: mode == Mode::Scalable,
            ..VtdConfig::default()
        };
        let host = SharedHost::new(SimHost::new());
        let snapshot = Arc::new(Mutex::new(None));
        let msi = SnapshotMsi {
            host: host.clone(),
            snapshot: snapshot.clone(),
        };
        let mut vtd = Vtd::new(
            config,
            mem.clone(),
            Box::new(msi),
            Box::new(ManualClock::default()),
        )
        .expect("config");
        vtd.attach(DEV, Box::new(host.clone())).expect("attach");
        // Completion interrupts unmasked: each wait's MSI takes the snapshot.
        Driver::write32(&mut vtd, IECTL_REG, 0);
        let mut drv = Driver::new();
        let (tables, pt) = match mode {
            Mode::Legacy => {
                let mut tables = Tables::new(&mem);
                let pt = tables.context(DEV, DOMAIN, 3);
                drv.enable_qi(&mut vtd);
                drv.set_root(&mut vtd, tables.root);
                (tables, pt)
            }
            Mode::Scalable => {
                let mut sm = ScalableTables::new(&mem);
                let pt = sm.attach_second_stage(DEV, DOMAIN, 3);
                drv.wide = true;
                drv.queue_entries = 128;
                drv.enable_qi(&mut vtd);
                drv.set_scalable_root(&mut vtd, sm.root);
                // Page tables are written through the same allocator.
                let next = pt.root + 0x10_0000;
                (Tables::resume(&mem, sm.root, next), pt)
            }
        };
        drv.set_translation(&mut vtd, true);
        Guest {
            mem,
            vtd,
            host,
            drv,
            mode,
            tables,
            pt,
            queued: Vec::new(),
            covered: BTreeSet::new(),
            expected: BTreeMap::new(),
            token: 0,
            snapshot,
        }
    }

    /// What the guest's tables translate `iova` to now.
    fn translation(&self, iova: u64) -> Option<(u64, Perm)> {
        let caps = Capabilities::default();
        let r = walk::translate(&self.mem, self.pt, iova, Access::Read, &caps).ok();
        let w = walk::translate(&self.mem, self.pt, iova, Access::Write, &caps).ok();
        let leaf = r.or(w)?;
        let gpa = leaf.gpa + (iova - leaf.iova);
        Some((
            gpa,
            Perm {
                read: r.is_some(),
                write: w.is_some(),
            },
        ))
    }

    fn cover_all(&mut self) {
        self.covered
            .extend((0..IOVA_PAGES).map(|p| IOVA_BASE + p * P));
    }

    fn apply(&mut self, op: &Op) {
        match *op {
            Op::Map {
                iova,
                gpa,
                pages,
                perm,
            } => {
                let pages = pages.min(IOVA_PAGES - iova);
                self.tables.map(
                    self.pt,
                    IOVA_BASE + iova * P,
                    GPA_BASE + gpa * P,
                    pages * P,
                    perm_of(perm),
                );
            }
            Op::Unmap { iova, pages } => {
                let pages = pages.min(IOVA_PAGES - iova);
                self.tables.unmap(self.pt, IOVA_BASE + iova * P, pages * P);
            }
            Op::Psi { iova, am } => {
                let addr = IOVA_BASE + iova * P;
                self.queued
                    .push(encode::iotlb_page(DOMAIN, addr, am, false));
                let size = P << am;
                let start = addr & !(size - 1);
                self.covered.extend((0..1u64 << am).map(|i| start + i * P));
            }
            Op::Dsi => {
                self.queued.push(encode::iotlb_domain(DOMAIN));
                self.cover_all();
            }
            Op::Global => {
                self.queued.push(encode::iotlb_global());
                self.cover_all();
            }
            Op::Context => {
                self.queued.push(encode::context_device(DOMAIN, DEV, 0));
                // The context did not change, so nothing is re-read: the reference covers
                // nothing new either.
            }
            Op::PasidPsi { iova, am } => match self.mode {
                Mode::Legacy => self.apply(&Op::Psi { iova, am }),
                Mode::Scalable => {
                    let addr = IOVA_BASE + iova * P;
                    self.queued
                        .push(encode::pasid_iotlb_page(DOMAIN, 0, addr, am, false));
                    let size = P << am;
                    let start = addr & !(size - 1);
                    self.covered.extend((0..1u64 << am).map(|i| start + i * P));
                }
            },
            Op::PasidAll => match self.mode {
                Mode::Legacy => self.apply(&Op::Dsi),
                Mode::Scalable => {
                    self.queued.push(encode::pasid_iotlb_pasid(DOMAIN, 0));
                    self.cover_all();
                }
            },
            Op::PasidCache => match self.mode {
                Mode::Legacy => self.apply(&Op::Context),
                // The entry did not change: nothing new is covered.
                Mode::Scalable => self.queued.push(encode::pasid_cache_pasid(DOMAIN, 0)),
            },
            Op::Wait => self.wait(),
        }
    }

    fn wait(&mut self) {
        // The reference: every covered page takes the translation the tables hold now, since
        // descriptors of one submission all see the tables as they are at submission.
        for &iova in &self.covered {
            match self.translation(iova) {
                Some(t) if t.0 < viommu::testing::TEST_MEM_SIZE => {
                    self.expected.insert(iova, t);
                }
                _ => {
                    self.expected.remove(&iova);
                }
            }
        }
        self.covered.clear();
        self.token += 1;
        let mut descs = std::mem::take(&mut self.queued);
        descs.push(encode::wait(
            Some((self.drv.status, self.token)),
            true,
            false,
        ));
        self.drv.submit(&mut self.vtd, &self.mem, &descs);
        Driver::write32(&mut self.vtd, ICS_REG, ICS_IWC);
    }

    /// The host's mappings when the last wait completed.
    fn host_pages(&self) -> PageMap {
        self.snapshot
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
            .expect("the wait completed and signalled")
    }
}

fn check_strict(ops: &[Op], mode: Mode) -> Result<(), TestCaseError> {
    let mut batched = Guest::new(SyncStrategy::Batched, FlushMode::Strict, mode);
    let mut per_leaf = Guest::new(SyncStrategy::PerLeaf, FlushMode::Strict, mode);
    for op in ops.iter().chain(std::iter::once(&Op::Wait)) {
        batched.apply(op);
        per_leaf.apply(op);
        if matches!(op, Op::Wait) {
            prop_assert_eq!(&batched.host_pages(), &batched.expected);
            prop_assert_eq!(&per_leaf.host_pages(), &per_leaf.expected);
        }
    }
    let b = batched.vtd.stats();
    let l = per_leaf.vtd.stats();
    prop_assert!(b.host_map_calls + b.host_unmap_calls <= l.host_map_calls + l.host_unmap_calls);
    prop_assert_eq!(b.host_errors, 0);
    prop_assert_eq!(b.descriptors_by_type.invalid, 0);
    if mode == Mode::Scalable {
        prop_assert_eq!(b.wide_descriptors, b.descriptors);
    }
    Ok(())
}

/// Deferred mode: after every wait the host maps every invalidated guest translation, may keep
/// stale ones only where the guest translates nothing, and after a flush maps exactly the
/// reference.
fn check_deferred(ops: &[Op], mode: Mode) -> Result<(), TestCaseError> {
    let mut g = Guest::new(SyncStrategy::Batched, FlushMode::DEFERRED_DEFAULT, mode);
    for op in ops.iter().chain(std::iter::once(&Op::Wait)) {
        g.apply(op);
        if matches!(op, Op::Wait) {
            let host = g.host_pages();
            for (iova, t) in &g.expected {
                prop_assert_eq!(host.get(iova), Some(t), "iova {:#x}", iova);
            }
            for iova in host.keys() {
                prop_assert!(
                    g.expected.contains_key(iova)
                        || (IOVA_BASE..IOVA_BASE + IOVA_PAGES * P).contains(iova),
                    "stale mapping {:#x} outside anything the guest ever mapped",
                    iova
                );
            }
        }
    }
    g.vtd.flush_deferred();
    prop_assert_eq!(&g.host.get().page_map(), &g.expected);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Strict mode: after every wait the host maps exactly the guest's invalidated translations,
    /// and the batched engine ends in the same host state as QEMU's leaf-by-leaf way.
    #[test]
    fn strict_host_mappings_equal_invalidated_guest_translations(ops in prop::collection::vec(op(), 1..60)) {
        check_strict(&ops, Mode::Legacy)?;
    }

    /// The same over short histories, where an edit is often undone before the next full
    /// sync: what trips a sync that trusts an out-of-date view of the guest's tables.
    #[test]
    fn strict_host_mappings_equal_invalidated_guest_translations_short(ops in prop::collection::vec(op(), 1..12)) {
        check_strict(&ops, Mode::Legacy)?;
    }

    /// Deferred mode: every invalidated translation mapped, stale ones only where the guest
    /// maps nothing, exact after a flush.
    #[test]
    fn deferred_host_mappings_cover_guest_translations_and_converge_on_flush(ops in prop::collection::vec(op(), 1..60)) {
        check_deferred(&ops, Mode::Legacy)?;
    }

    /// Scalable mode, strict: the same rule through a second-stage PASID entry, 256-bit
    /// descriptors, PASID-based IOTLB and PASID-cache invalidations.
    #[test]
    fn scalable_strict_host_mappings_equal_invalidated_guest_translations(ops in prop::collection::vec(op(), 1..60)) {
        check_strict(&ops, Mode::Scalable)?;
    }

    /// Scalable mode, short histories.
    #[test]
    fn scalable_strict_host_mappings_equal_invalidated_guest_translations_short(ops in prop::collection::vec(op(), 1..12)) {
        check_strict(&ops, Mode::Scalable)?;
    }

    /// Scalable mode, deferred.
    #[test]
    fn scalable_deferred_host_mappings_cover_guest_translations_and_converge_on_flush(ops in prop::collection::vec(op(), 1..60)) {
        check_deferred(&ops, Mode::Scalable)?;
    }
}
