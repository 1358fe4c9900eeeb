//! Replays invalidation streams shaped like a Linux guest's through the batched engine and, in
//! the same run, through a baseline that does what QEMU does (one host call per leaf, descriptor
//! by descriptor), and prints one line per stream:
//!
//! `trace=NAME baseline_calls=N batched_calls=N baseline_flushes=N batched_flushes=N ns_per_desc=X`
//!
//! Streams named `sm-...` run the same workload in scalable mode, as Linux 6.1 drives it with
//! `intel_iommu=on,sm_on`: 256-bit descriptors, the device behind a second-stage PASID entry
//! (RID_PASID), and the same type-2 IOTLB invalidations, which Linux uses for second-stage
//! domains.
//!
//! Calls are host map plus unmap calls; flushes are host mappings removed (VFIO type1 flushes
//! the host IOTLB once for each); both are counted by a host that keeps VFIO type1's rules.
//! `ns_per_desc` is the batched engine's own time per descriptor: the unit's handling of the
//! queue tail writes, over a host that does nothing, so host work is excluded; `allocs_per_desc`
//! the heap allocations it made per descriptor (each costs far more under emulation or in a
//! loaded host than the arithmetic around it).
//!
//! Then the recorded corpus (`resources/viommu-corpus`, real L2 Linux streams, see
//! docs/recording.md) is replayed the same way, one line per recording, `trace=rec-NAME`, with the
//! deferred policy's counts (deferred 256 unmaps or 10 ms, as Linux's flush queue) and the
//! baseline's own time beside the batched engine's, timed in the same run:
//! `... deferred_calls=N deferred_flushes=N deferred_unmaps=N cancelled=N ns_per_desc=X
//! baseline_ns_per_desc=X cpu_vs_baseline=R deferred_ns_per_desc=X allocs_per_desc=Y
//! peak_mappings=N peak_snapshots=N` (R under 1: the batched engine spends less CPU per
//! descriptor than the baseline; the peaks are the strict engine's host mappings and table
//! snapshots at most, what it holds for the guest).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Counts heap allocations, so the benchmark can report them per descriptor.
struct CountingAlloc;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: every call is forwarded to the system allocator unchanged; only a counter is added.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `alloc` above, i.e. from the system allocator.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: as for `alloc` and `dealloc`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

use viommu::descriptor::encode;
use viommu::testing::{
    mem, Driver, ManualClock, Mem, NullHost, RecordingMsi, ScalableTables, SharedHost, SimHost,
    Tables,
};
use viommu::walk::PageTable;
use viommu::{FlushMode, HostDma, Perm, SourceId, SyncStrategy, Vtd, VtdConfig};

const P: u64 = 0x1000;
const DEV: SourceId = SourceId(0x0018);
const DOMAIN: u16 = 1;

/// Which tables and queue the guest drives the unit with.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Legacy,
    /// Scalable mode, as Linux 6.1 runs it with a second-stage domain.
    Scalable,
}

/// A guest driving one unit with one attached device, as Linux's intel-iommu does in caching
/// mode: edit the tables, queue invalidations, wait.
struct Guest {
    mem: Mem,
    vtd: Vtd<Mem>,
    drv: Driver,
    mode: Mode,
    tables: Tables,
    pt: PageTable,
    queued: Vec<[u64; 2]>,
    token: u32,
    /// Time spent inside the unit's tail-write handling, and the allocations it made.
    busy: Duration,
    allocations: u64,
}

impl Guest {
    fn new(strategy: SyncStrategy, flush: FlushMode, mode: Mode, host: Box<dyn HostDma>) -> Self {
        let mem = mem();
        let config = VtdConfig {
            strategy,
            flush,
            scalable_mode: mode == Mode::Scalable,
            ..VtdConfig::default()
        };
        let mut vtd = Vtd::new(
            config,
            mem.clone(),
            Box::new(RecordingMsi::default()),
            Box::new(ManualClock::default()),
        )
        .expect("config");
        vtd.attach(DEV, host).expect("attach");
        let mut drv = Driver::new();
        drv.queue_entries = 4096;
        drv.wide = mode == Mode::Scalable;
        let tables = Tables::new(&mem);
        Guest {
            mem,
            vtd,
            drv,
            mode,
            tables,
            pt: PageTable { root: 0, levels: 4 },
            queued: Vec::new(),
            token: 0,
            busy: Duration::ZERO,
            allocations: 0,
        }
    }

    /// Brings the unit up and gives the device an empty domain, as Linux's boot does.
    fn boot(&mut self) {
        self.drv.enable_qi(&mut self.vtd);
        match self.mode {
            Mode::Legacy => {
                self.pt = self.tables.context(DEV, DOMAIN, 4);
                self.drv.set_root(&mut self.vtd, self.tables.root);
            }
            Mode::Scalable => {
                let mut sm = ScalableTables::at(&self.mem, viommu::testing::TABLES_BASE);
                self.pt = sm.attach_second_stage(DEV, DOMAIN, 4);
                self.drv.set_scalable_root(&mut self.vtd, sm.root);
                // Page tables go on above the scalable-mode structures.
                self.tables = Tables::resume(&self.mem, sm.root, self.pt.root + (1 << 20));
                self.queued.push(encode::pasid_cache_global());
            }
        }
        self.queued.push(encode::context_global());
        self.queued.push(encode::iotlb_global());
        self.wait();
        self.drv.set_translation(&mut self.vtd, true);
    }

    fn map(&mut self, iova: u64, gpa: u64, pages: u64) {
        self.tables.map(self.pt, iova, gpa, pages * P, Perm::RW);
    }

    fn map_scattered(&mut self, iova: u64, gpas: &[u64]) {
        for (i, &g) in gpas.iter().enumerate() {
            self.tables
                .map(self.pt, iova + i as u64 * P, g, P, Perm::RW);
        }
    }

    fn unmap(&mut self, iova: u64, pages: u64) {
        self.tables.unmap(self.pt, iova, pages * P);
    }

    fn psi(&mut self, iova: u64, am: u8) {
        self.queued
            .push(encode::iotlb_page(DOMAIN, iova, am, false));
    }

    fn dsi(&mut self) {
        self.queued.push(encode::iotlb_domain(DOMAIN));
    }

    fn context_device(&mut self) {
        self.queued.push(encode::context_device(DOMAIN, DEV, 0));
    }

    /// Submits what is queued plus a wait, as `qi_submit_sync` does, and checks it completed.
    fn wait(&mut self) {
        self.token = self.token.wrapping_add(1);
        let mut descs = std::mem::take(&mut self.queued);
        descs.push(encode::wait(
            Some((self.drv.status, self.token)),
            false,
            false,
        ));
        // Write the descriptors, then time only the unit's handling of the tail write.
        let size = if self.drv.wide { 32 } else { 16 };
        let tail_before = Driver::read64(&self.vtd, viommu::regs::IQT_REG) / size;
        let entries = self.drv.queue_entries;
        for (i, d) in descs.iter().enumerate() {
            let slot = (tail_before + i as u64) % entries;
            let words = [d[0], d[1], 0, 0];
            for (k, w) in words.iter().take(size as usize / 8).enumerate() {
                let addr = self.drv.queue + slot * size + k as u64 * 8;
                vm_memory::Bytes::write_obj(&self.mem, *w, vm_memory::GuestAddress(addr))
                    .expect("queue");
            }
        }
        let tail = (tail_before + descs.len() as u64) % entries;
        let allocations = ALLOCATIONS.load(Ordering::Relaxed);
        let start = Instant::now();
        Driver::write64(&mut self.vtd, viommu::regs::IQT_REG, tail * size);
        self.busy += start.elapsed();
        self.allocations += ALLOCATIONS.load(Ordering::Relaxed) - allocations;
        let status: u32 =
            vm_memory::Bytes::read_obj(&self.mem, vm_memory::GuestAddress(self.drv.status))
                .expect("status");
        assert_eq!(status, self.token, "wait completed");
    }
}

/// One I/O at queue depth 1: map one page (PSI + wait), unmap it (PSI + wait). The IOVA comes
/// from a small set, as Linux's per-CPU IOVA caches hand the same ones back; the buffer is the
/// same guest page, as `dd` with O_DIRECT reuses its buffer.
fn qd1_4k(g: &mut Guest) {
    for i in 0..2000u64 {
        let iova = 0xffff_f000 - (i % 4) * P;
        g.map(iova, 0x20_0000, 1);
        g.psi(iova, 0);
        g.wait();
        g.unmap(iova, 1);
        g.psi(iova, 0);
        g.wait();
    }
}

/// A 128 KiB scatter-gather I/O: 32 guest-physically contiguous pages mapped and invalidated as
/// one PSI with AM=5, then unmapped the same way.
fn sg128k(g: &mut Guest) {
    for i in 0..500u64 {
        let iova = 0xfff0_0000 - (i % 4) * 32 * P;
        g.map(iova, 0x40_0000, 32);
        g.psi(iova, 5);
        g.wait();
        g.unmap(iova, 32);
        g.psi(iova, 5);
        g.wait();
    }
}

/// The same over scattered guest pages: nothing to coalesce on the map side.
fn sg128k_scattered(g: &mut Guest) {
    let gpas: Vec<u64> = (0..32u64)
        .map(|k| 0x40_0000 + (k * 7 % 32) * 2 * P)
        .collect();
    for i in 0..500u64 {
        let iova = 0xfff0_0000 - (i % 4) * 32 * P;
        g.map_scattered(iova, &gpas);
        g.psi(iova, 5);
        g.wait();
        g.unmap(iova, 32);
        g.psi(iova, 5);
        g.wait();
    }
}

/// A lazy-mode guest: 4096 long-lived mappings stay; in each round 256 short-lived ones are
/// mapped, then unmapped without invalidation, then flushed with one domain-selective
/// invalidation. Work should follow the 256 that changed, not the 4096 that did not.
fn dsi_lazy(g: &mut Guest) {
    for k in 0..4096u64 {
        g.map(0x1000_0000 + k * P, 0x10_0000 + (k % 256) * 2 * P, 1);
    }
    g.dsi();
    g.wait();
    for round in 0..20u64 {
        for k in 0..256u64 {
            let iova = 0x8000_0000 + (round % 2) * 0x100_0000 + k * P;
            g.map(iova, 0x60_0000 + k * 2 * P, 1);
            g.psi(iova, 0);
            g.wait();
        }
        for k in 0..256u64 {
            g.unmap(0x8000_0000 + (round % 2) * 0x100_0000 + k * P, 1);
        }
        g.dsi();
        g.wait();
    }
}

/// Boot: context setup for the device, a burst of coherent allocations (4-page, contiguous,
/// one PSI with AM=2 each) and streaming single-page maps at descending IOVAs, as the IOVA
/// allocator hands them out, several invalidations per submission.
fn boot(g: &mut Guest) {
    g.context_device();
    g.dsi();
    g.wait();
    for k in 0..64u64 {
        let iova = 0xffff_0000 - k * 4 * P;
        g.map(iova, 0x80_0000 + k * 4 * P, 4);
        g.psi(iova, 2);
        g.wait();
    }
    for k in 0..512u64 {
        let iova = 0xfe00_0000 - k * P;
        g.map(iova, 0xc0_0000 + k * P, 1);
        g.psi(iova, 0);
        if k % 8 == 7 {
            g.wait();
        }
    }
    g.wait();
}

/// A guest workload: what the guest does to its tables and queue.
type Stream = fn(&mut Guest);

struct Counts {
    calls: u64,
    flushes: u64,
    descriptors: u64,
}

fn run(stream: Stream, strategy: SyncStrategy, flush: FlushMode, mode: Mode) -> Counts {
    let host = SharedHost::new(SimHost::new());
    let mut g = Guest::new(strategy, flush, mode, Box::new(host.clone()));
    g.boot();
    let before = host.get().clone();
    let desc_before = g.vtd.stats().descriptors;
    stream(&mut g);
    g.vtd.flush_deferred();
    let after = host.get();
    let stats = g.vtd.stats();
    assert_eq!(
        stats.descriptors_by_type.invalid, 0,
        "every descriptor valid"
    );
    if mode == Mode::Scalable {
        assert_eq!(
            stats.wide_descriptors, stats.descriptors,
            "256-bit descriptors"
        );
    }
    Counts {
        calls: (after.map_calls + after.unmap_calls) - (before.map_calls + before.unmap_calls),
        flushes: after.flushes - before.flushes,
        descriptors: g.vtd.stats().descriptors - desc_before,
    }
}

/// The batched engine's own time per descriptor (best of a few runs over a no-op host) and its
/// allocations per descriptor.
fn cost_per_desc(stream: Stream, flush: FlushMode, mode: Mode) -> (f64, f64) {
    (0..5)
        .map(|_| {
            let mut g = Guest::new(SyncStrategy::Batched, flush, mode, Box::new(NullHost));
            g.boot();
            g.busy = Duration::ZERO;
            g.allocations = 0;
            let before = g.vtd.stats().descriptors;
            stream(&mut g);
            let n = (g.vtd.stats().descriptors - before) as f64;
            (g.busy.as_nanos() as f64 / n, g.allocations as f64 / n)
        })
        .fold((f64::INFINITY, f64::INFINITY), |a, b| {
            (a.0.min(b.0), a.1.min(b.1))
        })
}

fn main() {
    let legacy = Mode::Legacy;
    let streams: [(&str, Stream, FlushMode, Mode); 8] = [
        ("qd1-4k", qd1_4k, FlushMode::Strict, legacy),
        ("sg128k", sg128k, FlushMode::Strict, legacy),
        (
            "sg128k-scattered",
            sg128k_scattered,
            FlushMode::Strict,
            legacy,
        ),
        ("dsi-lazy", dsi_lazy, FlushMode::Strict, legacy),
        ("boot", boot, FlushMode::Strict, legacy),
        (
            "qd1-4k-deferred",
            qd1_4k,
            FlushMode::DEFERRED_DEFAULT,
            legacy,
        ),
        ("sm-qd1-4k", qd1_4k, FlushMode::Strict, Mode::Scalable),
        ("sm-sg128k", sg128k, FlushMode::Strict, Mode::Scalable),
    ];
    // `cargo bench -- NAME` runs only the streams whose name contains NAME.
    let filter: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    for (name, stream, flush, mode) in streams {
        if filter.as_deref().is_some_and(|f| !name.contains(f)) {
            continue;
        }
        let baseline = run(stream, SyncStrategy::PerLeaf, FlushMode::Strict, mode);
        let batched = run(stream, SyncStrategy::Batched, flush, mode);
        assert_eq!(baseline.descriptors, batched.descriptors);
        let (ns, allocations) = cost_per_desc(stream, flush, mode);
        println!(
            "trace={name} baseline_calls={} batched_calls={} baseline_flushes={} batched_flushes={} ns_per_desc={ns:.0} allocs_per_desc={allocations:.1}",
            baseline.calls,
            batched.calls,
            baseline.flushes,
            batched.flushes,
        );
    }
    replay_corpus(filter.as_deref());
}

/// Replays every recording of the corpus under the three policies.
fn replay_corpus(filter: Option<&str>) {
    use std::io::Read;
    use viommu::record::Recording;
    use viommu::replay::{replay, Host, Options, Outcome, Policy};

    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../resources/viommu-corpus");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("the corpus")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.to_string_lossy().ends_with(".vtdrec.gz"))
        .collect();
    files.sort();
    let meter = || ALLOCATIONS.load(Ordering::Relaxed);
    for path in files {
        let stem = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let name = format!("rec-{}", stem.trim_end_matches(".vtdrec.gz"));
        if filter.is_some_and(|f| !name.contains(f)) {
            continue;
        }
        let mut data = Vec::new();
        flate2::read::GzDecoder::new(std::fs::File::open(&path).expect("open"))
            .read_to_end(&mut data)
            .expect("gzip");
        let rec = Recording::parse(&data).expect("a valid recording");
        let counted = |p: &Policy| -> Outcome {
            replay(&rec, p, Host::Type1, Options::default(), &|| 0).expect("replays")
        };
        let deferred_policy = Policy::deferred(256, Duration::from_millis(10));
        let (baseline, batched, deferred) = (
            counted(&Policy::per_leaf()),
            counted(&Policy::strict()),
            counted(&deferred_policy),
        );
        // Each policy's best of 15 over a host that does nothing, the runs interleaved so that
        // a busy moment of the machine weighs on all alike.
        let timed = [Policy::strict(), Policy::per_leaf(), deferred_policy];
        let mut best = [(f64::INFINITY, f64::INFINITY); 3];
        for _ in 0..15 {
            for (p, b) in timed.iter().zip(best.iter_mut()) {
                let o = replay(&rec, p, Host::Null, Options::default(), &meter).expect("replays");
                *b = (
                    b.0.min(o.ns_per_descriptor()),
                    b.1.min(o.allocations_per_descriptor()),
                );
            }
        }
        let [(ns, allocations), (baseline_ns, _), (deferred_ns, _)] = best;
        println!(
            "trace={name} baseline_calls={} batched_calls={} baseline_flushes={} batched_flushes={} deferred_calls={} deferred_flushes={} deferred_unmaps={} cancelled={} ns_per_desc={ns:.0} baseline_ns_per_desc={baseline_ns:.0} cpu_vs_baseline={:.2} deferred_ns_per_desc={deferred_ns:.0} allocs_per_desc={allocations:.1} peak_mappings={} peak_snapshots={}",
            baseline.host_calls(),
            batched.host_calls(),
            baseline.host_flushes(),
            batched.host_flushes(),
            deferred.host_calls(),
            deferred.host_flushes(),
            deferred.stats.deferred_unmaps,
            deferred.stats.deferred_unmaps_cancelled,
            ns / baseline_ns,
            batched.peak.host_mappings,
            batched.peak.snapshots,
        );
    }
}
