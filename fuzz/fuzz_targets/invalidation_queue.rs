//! The invalidation queue over hostile guest memory. The fuzzer may start from a Linux-like set
//! of tables (which its memory writes then corrupt), legacy or scalable-mode (a second-stage,
//! pass-through or first-stage RID_PASID entry), and writes descriptors either well-formed or
//! raw, 128 or 256 bits wide, so it spends its time in queue processing and host sync, not in
//! finding a valid context.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use viommu::ats::SharedDeviceTlb;
use viommu::descriptor::encode;
use viommu::regs::*;
use viommu::testing::{Driver, FirstStageFlags, ScalableTables, Tables};
use viommu::walk::PageTable;
use viommu::{Access, FlushMode, Perm, VtdConfig};
use viommu_fuzz::{in_ram, Guest, DEV};

/// Where a prepared table setup lives (inside low RAM).
const SETUP_BASE: u64 = 1 << 20;

/// What the scalable-mode RID_PASID entry of the device names.
#[derive(Arbitrary, Debug)]
enum Entry {
    SecondStage,
    PassThrough,
    /// Refused on a unit without FLTS: the device must end up with nothing mapped.
    FirstStage,
}

#[derive(Arbitrary, Debug)]
struct Setup {
    four_levels: bool,
    pass_through: bool,
    /// Scalable-mode tables (RTADDR.TTM = 01b), with this RID_PASID entry and RID_PASID.
    scalable: Option<(Entry, u8)>,
    domain: u8,
    /// (IOVA page, guest page, pages, permission bits)
    maps: Vec<(u32, u16, u8, u8)>,
    /// 2 MiB pages: (IOVA 2 MiB page, guest 2 MiB page)
    large: Vec<(u16, u8)>,
}

#[derive(Arbitrary, Debug)]
enum Desc {
    Raw(u64, u64),
    Page {
        domain: u8,
        page: u32,
        am: u8,
        ih: bool,
    },
    Domain(u8),
    Global,
    ContextDevice {
        domain: u8,
        function_mask: u8,
    },
    ContextGlobal,
    Wait {
        status: Option<u32>,
        interrupt: bool,
    },
    PasidCache {
        granularity: u8,
        domain: u8,
        pasid: u8,
    },
    PasidIotlb {
        domain: u8,
        pasid: u8,
        page: Option<(u32, u8)>,
    },
    PasidDevice(u8),
}

impl Desc {
    fn encode(&self) -> [u64; 2] {
        match *self {
            Desc::Raw(lo, hi) => [lo, hi],
            Desc::Page {
                domain,
                page,
                am,
                ih,
            } => encode::iotlb_page(u16::from(domain), u64::from(page) << 12, am % 20, ih),
            Desc::Domain(d) => encode::iotlb_domain(u16::from(d)),
            Desc::Global => encode::iotlb_global(),
            Desc::ContextDevice {
                domain,
                function_mask,
            } => encode::context_device(u16::from(domain), DEV, function_mask),
            Desc::ContextGlobal => encode::context_global(),
            Desc::Wait { status, interrupt } => encode::wait(
                status.map(|a| (in_ram(u64::from(a)) & !3, 1)),
                interrupt,
                false,
            ),
            Desc::PasidCache {
                granularity,
                domain,
                pasid,
            } => {
                let (d, p) = (u16::from(domain), u32::from(pasid));
                match granularity % 3 {
                    0 => encode::pasid_cache_global(),
                    1 => encode::pasid_cache_domain(d),
                    _ => encode::pasid_cache_pasid(d, p),
                }
            }
            Desc::PasidIotlb {
                domain,
                pasid,
                page,
            } => {
                let (d, p) = (u16::from(domain), u32::from(pasid));
                match page {
                    None => encode::pasid_iotlb_pasid(d, p),
                    Some((page, am)) => {
                        encode::pasid_iotlb_page(d, p, u64::from(page) << 12, am % 64, false)
                    }
                }
            }
            Desc::PasidDevice(pasid) => {
                encode::pasid_device_iotlb(DEV, u32::from(pasid), 0x1000, false)
            }
        }
    }
}

/// Maps the setup's pages into the second-stage table `pt` through the writer `t`.
fn map_pages(t: &mut Tables, pt: PageTable, s: &Setup) {
    for &(iova, gpa, pages, perm) in s.maps.iter().take(32) {
        let perm = Perm {
            read: perm & 1 != 0,
            write: perm & 2 != 0,
        };
        let iova = (u64::from(iova) << 12) & (pt.limit() - 1);
        let pages = u64::from(pages % 64).min((pt.limit() - iova) >> 12);
        t.map(pt, iova, u64::from(gpa) << 12, pages << 12, perm);
    }
    for &(iova, gpa) in s.large.iter().take(4) {
        t.map_large(pt, u64::from(iova) << 21, u64::from(gpa) << 21, 2, Perm::RW);
    }
}

/// Writes the setup's tables; returns the RTADDR value pointing at them.
fn write_setup(g: &Guest, s: &Setup) -> u64 {
    let domain = u16::from(s.domain);
    let levels = if s.four_levels { 4 } else { 3 };
    let Some((entry, rid_pasid)) = &s.scalable else {
        let mut t = Tables::at(&g.mem, SETUP_BASE);
        if s.pass_through {
            t.attach_pass_through(DEV, domain);
        } else {
            let pt = t.context(DEV, domain, levels);
            map_pages(&mut t, pt, s);
        }
        return t.root;
    };
    let mut t = ScalableTables::at(&g.mem, SETUP_BASE);
    let rid_pasid = u32::from(*rid_pasid);
    t.context(DEV, 0, rid_pasid, true);
    match entry {
        Entry::SecondStage => {
            let pt = t.pages().page_table(levels);
            t.second_stage(DEV, rid_pasid, domain, pt);
            map_pages(t.pages(), pt, s);
        }
        Entry::PassThrough => t.pass_through(DEV, rid_pasid, domain),
        Entry::FirstStage => {
            let fs = t.first_stage_table();
            for &(iova, gpa, pages, _) in s.maps.iter().take(8) {
                let (iova, gpa) = (u64::from(iova) << 12, u64::from(gpa) << 12);
                let len = u64::from(pages % 8) << 12;
                t.map_first_stage(fs, iova, gpa, len, FirstStageFlags::USER_RW);
            }
            t.first_stage(DEV, rid_pasid, domain, fs);
        }
    }
    t.root | RTADDR_TTM_SCALABLE
}

#[derive(Arbitrary, Debug)]
struct Input {
    deferred: bool,
    translation: bool,
    /// A unit reporting scalable mode (ECAP.SMTS).
    scalable_unit: bool,
    /// 256-bit descriptors (IQA.DW).
    wide: bool,
    setup: Option<Setup>,
    root: u64,
    queue: u64,
    queue_size: u8,
    /// Guest memory writes: (address, value), applied after the setup.
    memory: Vec<(u64, u64)>,
    /// Descriptors written at the queue, with the tail written after each batch.
    batches: Vec<Vec<Desc>>,
    clear_errors: bool,
    /// The protocol checker on, an ATS device-TLB for DEV, and faults armed.
    check: bool,
    device_tlb: bool,
    injections: Vec<(u8, u8)>,
    /// Emulated DMAs after each batch: (IOVA, write).
    dmas: Vec<(u64, bool)>,
}

fuzz_target!(|input: Input| {
    let config = VtdConfig {
        flush: if input.deferred {
            FlushMode::DEFERRED_DEFAULT
        } else {
            FlushMode::Strict
        },
        walk_budget: 1 << 16,
        scalable_mode: input.scalable_unit,
        check: input.check,
        device_iotlb: input.device_tlb,
        ..VtdConfig::default()
    };
    let mut g = Guest::new(config);
    let tlb = input.device_tlb.then(|| SharedDeviceTlb::new(8));
    if let Some(t) = &tlb {
        t.lock().set_enabled(true);
        g.vtd.attach_device_tlb(DEV, t.clone());
    }
    for &(target, nth) in input.injections.iter().take(8) {
        let name = ["iqe", "ite", "ice", "dma-fault", "records-full"][usize::from(target % 5)];
        let i = format!("{name}@{}", u64::from(nth) + 1)
            .parse()
            .expect("a valid injection");
        g.vtd.inject(i);
    }
    let root = match &input.setup {
        Some(s) => write_setup(&g, s),
        None => in_ram(input.root) & !0xfff | input.root & RTADDR_TTM_MASK,
    };
    for &(addr, value) in input.memory.iter().take(512) {
        g.write_mem(addr, value);
    }
    let queue = in_ram(input.queue) & !0xfff;
    let qs = u64::from(input.queue_size % 3);
    let (dw, size) = if input.wide { (IQA_DW, 32) } else { (0, 16) };
    let entries = (256u64 << qs) * 16 / size;
    Driver::write64(&mut g.vtd, IQT_REG, 0);
    Driver::write64(&mut g.vtd, IQA_REG, queue | dw | qs);
    Driver::write32(&mut g.vtd, GCMD_REG, GCMD_QIE);
    Driver::write64(&mut g.vtd, RTADDR_REG, root);
    Driver::write32(&mut g.vtd, GCMD_REG, GCMD_QIE | GCMD_SRTP);
    let te = if input.translation { GCMD_TE } else { 0 };
    Driver::write32(&mut g.vtd, GCMD_REG, GCMD_QIE | te);
    g.check_always();
    let mut tail = 0u64;
    for batch in input.batches.iter().take(16) {
        for d in batch.iter().take(entries as usize) {
            let [lo, hi] = d.encode();
            let at = queue + tail * size;
            g.write_mem(at, lo);
            g.write_mem(at + 8, hi);
            if input.wide {
                // The upper half is reserved: zero, unless the raw descriptor says otherwise.
                let upper = if let Desc::Raw(lo, _) = d {
                    lo.rotate_left(7)
                } else {
                    0
                };
                g.write_mem(at + 16, upper & 1);
                g.write_mem(at + 24, 0);
            }
            tail = (tail + 1) % entries;
        }
        Driver::write64(&mut g.vtd, IQT_REG, tail * size);
        g.check_always();
        if input.clear_errors {
            Driver::write32(&mut g.vtd, FSTS_REG, FSTS_IQE | FSTS_ITE | FSTS_ICE);
            g.check_always();
        }
        for &(iova, write) in input.dmas.iter().take(16) {
            let access = if write { Access::Write } else { Access::Read };
            let _ = g.vtd.translate(DEV, iova, access);
        }
    }
    g.vtd.flush_deferred();
    g.vtd.finish_check();
    // The final check compares the host with what the unit translates now: no fault may be
    // injected into it, and a device-TLB would still hold what no global invalidation removes.
    g.vtd.disarm_injections();
    if let Some(t) = &tlb {
        t.lock().set_enabled(false);
    }
    g.check_quiesced();
});
