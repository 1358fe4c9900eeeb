//! The invalidation queue over hostile guest memory. The fuzzer may start from a Linux-like set
//! of tables (which its memory writes then corrupt) and writes descriptors either well-formed or
//! raw, so it spends its time in queue processing and host sync, not in finding a valid context.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use viommu::descriptor::encode;
use viommu::regs::*;
use viommu::testing::{Driver, Tables};
use viommu::{FlushMode, Perm, VtdConfig};
use viommu_fuzz::{in_ram, Guest, DEV};

/// Where a prepared table setup lives (inside low RAM).
const SETUP_BASE: u64 = 1 << 20;

#[derive(Arbitrary, Debug)]
struct Setup {
    four_levels: bool,
    pass_through: bool,
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
        }
    }
}

#[derive(Arbitrary, Debug)]
struct Input {
    deferred: bool,
    translation: bool,
    setup: Option<Setup>,
    root: u64,
    queue: u64,
    queue_size: u8,
    /// Guest memory writes: (address, value), applied after the setup.
    memory: Vec<(u64, u64)>,
    /// Descriptors written at the queue, with the tail written after each batch.
    batches: Vec<Vec<Desc>>,
    clear_errors: bool,
}

fuzz_target!(|input: Input| {
    let config = VtdConfig {
        flush: if input.deferred {
            FlushMode::DEFERRED_DEFAULT
        } else {
            FlushMode::Strict
        },
        walk_budget: 1 << 16,
        ..VtdConfig::default()
    };
    let mut g = Guest::new(config);
    let root = match &input.setup {
        Some(s) => {
            let mut t = Tables::at(&g.mem, SETUP_BASE);
            let domain = u16::from(s.domain);
            if s.pass_through {
                t.attach_pass_through(DEV, domain);
            } else {
                let pt = t.context(DEV, domain, if s.four_levels { 4 } else { 3 });
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
            t.root
        }
        None => in_ram(input.root) & !0xfff,
    };
    for &(addr, value) in input.memory.iter().take(512) {
        g.write_mem(addr, value);
    }
    let queue = in_ram(input.queue) & !0xfff;
    let qs = u64::from(input.queue_size % 3);
    let entries = 256u64 << qs;
    Driver::write64(&mut g.vtd, IQT_REG, 0);
    Driver::write64(&mut g.vtd, IQA_REG, queue | qs);
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
            g.write_mem(queue + tail * 16, lo);
            g.write_mem(queue + tail * 16 + 8, hi);
            tail = (tail + 1) % entries;
        }
        Driver::write64(&mut g.vtd, IQT_REG, tail << 4);
        g.check_always();
        if input.clear_errors {
            Driver::write32(&mut g.vtd, FSTS_REG, FSTS_IQE);
            g.check_always();
        }
    }
    g.vtd.flush_deferred();
    g.check_quiesced();
});
