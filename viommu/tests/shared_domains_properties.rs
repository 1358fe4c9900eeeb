//! Property tests of host domain sharing: three devices moved at random between two guest
//! domains, two page tables, pass-through (the host's shared identity domain) and no
//! translation, the tables edited and invalidated at random,
//! waits in between. Whatever the order, once the guest invalidates everything and waits, each
//! device reaches on the host exactly what its own context entry translates, and what is shared
//! is pinned once: no own domain of a device on another's holds a mapping.

use proptest::prelude::*;
use viommu::descriptor::encode;
use viommu::testing::{
    mem, Driver, HostDomains, ManualClock, Mem, RecordingMsi, Tables, TEST_MEM_SIZE,
};
use viommu::walk::PageTable;
use viommu::{DomainUse, FlushMode, Perm, SourceId, SyncStrategy, Vtd, VtdConfig};

const P: u64 = 0x1000;
const DEVS: [SourceId; 3] = [SourceId(0x0028), SourceId(0x0029), SourceId(0x0030)];
const DOMAINS: [u16; 2] = [1, 2];
const IOVA_BASE: u64 = 0x1f_0000;
const IOVA_PAGES: u64 = 32;
const GPA_BASE: u64 = 0x10_0000;
/// The table index of a pass-through context entry.
const PASS_THROUGH: usize = 2;

#[derive(Clone, Debug)]
enum Op {
    /// Maps `pages` pages of table `table` from IOVA page `iova`.
    Map {
        table: usize,
        iova: u64,
        pages: u64,
    },
    Unmap {
        table: usize,
        iova: u64,
        pages: u64,
    },
    /// Points device `dev`'s context entry at table `table` (0 or 1; 2: pass-through) in
    /// domain `domain`, or clears it.
    Move {
        dev: usize,
        to: Option<(usize, usize)>,
    },
    /// Queues a domain-selective IOTLB invalidation.
    Dsi {
        domain: usize,
    },
    /// Queues a page-selective one.
    Psi {
        domain: usize,
        iova: u64,
    },
    /// Queues a device-selective context invalidation of `dev` in `domain`.
    Context {
        dev: usize,
        domain: usize,
    },
    /// Submits what is queued, with a wait.
    Wait,
    /// Detaches device `dev` from the unit (the VMM unplugging it).
    Detach {
        dev: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..2usize, 0..IOVA_PAGES, 1..4u64).prop_map(|(table, iova, pages)| Op::Map { table, iova, pages }),
        2 => (0..2usize, 0..IOVA_PAGES, 1..4u64).prop_map(|(table, iova, pages)| Op::Unmap { table, iova, pages }),
        3 => (0..3usize, prop::option::of((0..2usize, 0..3usize))).prop_map(|(dev, to)| Op::Move { dev, to }),
        2 => (0..2usize).prop_map(|domain| Op::Dsi { domain }),
        2 => (0..2usize, 0..IOVA_PAGES).prop_map(|(domain, iova)| Op::Psi { domain, iova }),
        2 => (0..3usize, 0..2usize).prop_map(|(dev, domain)| Op::Context { dev, domain }),
        3 => Just(Op::Wait),
        1 => (0..3usize).prop_map(|dev| Op::Detach { dev }),
    ]
}

struct Guest {
    mem: Mem,
    vtd: Vtd<Mem>,
    host: HostDomains,
    drv: Driver,
    t: Tables,
    tables: [PageTable; 2],
    /// Each device's context entry: (domain, table), or none.
    entries: [Option<(usize, usize)>; 3],
    attached: [bool; 3],
    queued: Vec<[u64; 2]>,
}

impl Guest {
    fn new(strategy: SyncStrategy, flush: FlushMode) -> Self {
        let mem = mem();
        let config = VtdConfig {
            strategy,
            flush,
            ..VtdConfig::default()
        };
        let mut vtd = Vtd::new(
            config,
            mem.clone(),
            Box::new(RecordingMsi::default()),
            Box::new(ManualClock::default()),
        )
        .expect("config");
        let host = HostDomains::with_identity();
        for (i, dev) in DEVS.iter().enumerate() {
            vtd.attach(*dev, Box::new(host.device(i as u32 + 1)))
                .expect("attach");
        }
        let mut t = Tables::new(&mem);
        let tables = [t.page_table(3), t.page_table(3)];
        let mut drv = Driver::new();
        drv.enable_qi(&mut vtd);
        drv.set_root(&mut vtd, t.root);
        drv.set_translation(&mut vtd, true);
        Guest {
            mem,
            vtd,
            host,
            drv,
            t,
            tables,
            entries: [None; 3],
            attached: [true; 3],
            queued: Vec::new(),
        }
    }

    fn apply(&mut self, op: &Op) {
        match *op {
            Op::Map { table, iova, pages } => {
                let pages = pages.min(IOVA_PAGES - iova);
                let gpa = GPA_BASE + ((iova * 7 + table as u64 * 13) % 40) * P;
                self.t.map(
                    self.tables[table],
                    IOVA_BASE + iova * P,
                    gpa,
                    pages * P,
                    Perm::RW,
                );
            }
            Op::Unmap { table, iova, pages } => {
                let pages = pages.min(IOVA_PAGES - iova);
                self.t
                    .unmap(self.tables[table], IOVA_BASE + iova * P, pages * P);
            }
            Op::Move { dev, to } => {
                match to {
                    Some((d, PASS_THROUGH)) => self.t.attach_pass_through(DEVS[dev], DOMAINS[d]),
                    Some((d, table)) => self.t.attach(DEVS[dev], DOMAINS[d], self.tables[table]),
                    None => self.t.write_context_raw(DEVS[dev], 0, 0),
                }
                self.entries[dev] = to;
            }
            Op::Dsi { domain } => self.queued.push(encode::iotlb_domain(DOMAINS[domain])),
            Op::Psi { domain, iova } => self.queued.push(encode::iotlb_page(
                DOMAINS[domain],
                IOVA_BASE + iova * P,
                0,
                false,
            )),
            Op::Context { dev, domain } => {
                self.queued
                    .push(encode::context_device(DOMAINS[domain], DEVS[dev], 0))
            }
            Op::Wait => self.wait(),
            Op::Detach { dev } => {
                if self.attached[dev] {
                    self.vtd.detach(DEVS[dev]);
                    self.attached[dev] = false;
                }
            }
        }
    }

    fn wait(&mut self) {
        let queued = std::mem::take(&mut self.queued);
        assert!(self.drv.submit_sync(&mut self.vtd, &self.mem, &queued, 1));
    }

    /// What device `dev`'s context entry translates, page by page.
    fn expected(&self, dev: usize) -> Vec<(u64, u64)> {
        let Some((_, table)) = self.entries[dev].filter(|_| self.attached[dev]) else {
            return Vec::new();
        };
        if table == PASS_THROUGH {
            return (0..TEST_MEM_SIZE)
                .step_by(P as usize)
                .map(|a| (a, a))
                .collect();
        }
        let caps = viommu::Capabilities::default();
        (0..IOVA_PAGES)
            .filter_map(|p| {
                let iova = IOVA_BASE + p * P;
                viommu::walk::translate(
                    &self.mem,
                    self.tables[table],
                    iova,
                    viommu::Access::Read,
                    &caps,
                )
                .ok()
                .map(|l| (iova, l.gpa + (iova - l.iova)))
            })
            .collect()
    }
}

fn check(ops: &[Op], strategy: SyncStrategy, flush: FlushMode) -> Result<(), TestCaseError> {
    let mut g = Guest::new(strategy, flush);
    for op in ops {
        g.apply(op);
    }
    g.queued.push(encode::context_global());
    g.queued.push(encode::iotlb_global());
    g.wait();
    if let FlushMode::Deferred { .. } = flush {
        g.vtd.flush_deferred();
    }
    for dev in 0..DEVS.len() {
        let reach: Vec<(u64, u64)> = g.host.reach_pages(dev as u32 + 1);
        prop_assert_eq!(&reach, &g.expected(dev), "device {} reaches", dev);
    }
    prop_assert_eq!(g.vtd.stats().host_errors, 0);
    for d in g.vtd.host_domains() {
        if matches!(d.on, DomainUse::SharedWith(_) | DomainUse::SharedIdentity) {
            prop_assert_eq!(d.own_mappings, 0, "{} pins nothing of its own", d.source);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn shared_host_domains_give_each_device_exactly_its_own_view(ops in prop::collection::vec(op(), 1..50)) {
        check(&ops, SyncStrategy::Batched, FlushMode::Strict)?;
    }

    #[test]
    fn shared_host_domains_give_each_device_exactly_its_own_view_deferred(ops in prop::collection::vec(op(), 1..50)) {
        check(&ops, SyncStrategy::Batched, FlushMode::DEFERRED_DEFAULT)?;
    }

    #[test]
    fn shared_host_domains_give_each_device_exactly_its_own_view_per_leaf(ops in prop::collection::vec(op(), 1..50)) {
        check(&ops, SyncStrategy::PerLeaf, FlushMode::Strict)?;
    }
}
