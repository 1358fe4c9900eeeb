//! Second-level walks over arbitrary tables: loops, self-references, huge pages, addresses
//! beyond the width. Range walks must agree with single-address translation, tile the range in
//! order, and stop at the budget. First-stage walks over the same memory return a leaf holding
//! the address with the access allowed, leave accessed (and for writes dirty) flags set so a
//! repeated walk agrees, and fault without touching memory otherwise; scalable-mode lookups of
//! arbitrary root, context and PASID structures fault or name a table, never panic.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use viommu::first_stage::{self, FirstStageTable, Request};
use viommu::walk::{translate, walk_range, PageTable, WalkCounters, WalkItem};
use viommu::{scalable, Access, Capabilities, PasidTag, SourceId, VtdConfig};
use viommu_fuzz::{in_ram, Guest};

#[derive(Arbitrary, Debug)]
struct Input {
    four_levels: bool,
    aw39: bool,
    haw: u8,
    large_pages: bool,
    root: u64,
    memory: Vec<(u64, u64)>,
    start: u64,
    pages: u32,
    probes: Vec<u64>,
    /// First-stage walks: (address, write, supervisor), through the same root with SRE/WPE.
    first_stage: Vec<(u64, bool, bool)>,
    sre: bool,
    wpe: bool,
    /// Scalable-mode lookups: (source, PASID) under the same root.
    lookups: Vec<(u16, Option<(u32, bool)>)>,
}

fuzz_target!(|input: Input| {
    let g = Guest::new(VtdConfig::default());
    for &(addr, value) in input.memory.iter().take(1024) {
        g.write_mem(addr, value);
    }
    let caps = Capabilities {
        aw_bits: if input.aw39 { 39 } else { 48 },
        haw: 32 + u32::from(input.haw % 21),
        large_2m: input.large_pages,
        large_1g: input.large_pages,
        ..Capabilities::default()
    };
    let table = PageTable {
        root: in_ram(input.root) & !0xfff,
        levels: if input.four_levels { 4 } else { 3 },
    };
    for &iova in input.probes.iter().take(64) {
        for access in [Access::Read, Access::Write] {
            if let Ok(l) = translate(&g.mem, table, iova, access, &caps) {
                assert!(
                    l.iova <= iova && iova - l.iova < l.len,
                    "leaf holds the address"
                );
                assert!(l.perm.allows(access));
            }
        }
    }
    let start = input.start & !0xfff & (table.limit() - 1);
    let end = start.saturating_add(u64::from(input.pages) << 12);
    let budget = 1 << 14;
    let mut counters = WalkCounters::new(budget);
    let mut items = Vec::new();
    let r = walk_range(
        &g.mem,
        table,
        (start, end),
        &caps,
        &mut counters,
        &mut |i| items.push(i),
    );
    assert!(items.len() as u64 <= budget);
    let mut pos = start;
    for item in &items {
        let (iova, len) = match *item {
            WalkItem::Leaf(l) => (l.iova, l.len),
            WalkItem::Hole { iova, len } | WalkItem::Unchanged { iova, len } => (iova, len),
        };
        assert_eq!(iova, pos, "items tile the range in order");
        assert!(len > 0);
        pos = iova + len;
        if let WalkItem::Leaf(l) = *item {
            // The leaf agrees with single-address translation at both ends.
            for probe in [l.iova, l.iova + l.len - 1] {
                let access = if l.perm.read {
                    Access::Read
                } else {
                    Access::Write
                };
                let t = translate(&g.mem, table, probe, access, &caps).expect("leaf translates");
                assert_eq!(t.gpa + (probe - t.iova), l.gpa + (probe - l.iova));
                assert_eq!(t.perm, l.perm);
            }
        }
    }
    let limit = table.limit().min(1 << caps.aw_bits);
    if r.is_ok() && start < limit {
        assert_eq!(pos, end.min(limit), "a finished walk covers the range");
    }
    let sm_caps = Capabilities {
        scalable: true,
        first_stage: true,
        first_stage_1g: input.large_pages,
        pasid: true,
        supervisor_requests: true,
        page_walk_snoop: true,
        ..caps
    };
    let fs = FirstStageTable {
        root: table.root,
        supervisor: input.sre,
        write_protect: input.wpe,
    };
    for &(iova, write, privileged) in input.first_stage.iter().take(32) {
        let access = if write { Access::Write } else { Access::Read };
        let req = Request {
            iova,
            access,
            privileged,
        };
        match first_stage::translate(&g.mem, fs, req, &sm_caps) {
            Ok(l) => {
                assert!(
                    l.iova <= iova && iova - l.iova < l.len,
                    "leaf holds the address"
                );
                assert!(l.perm.allows(access));
                assert!(l.gpa >> sm_caps.haw == 0, "output within the host width");
                // Flags are set: walking again changes nothing and agrees.
                let again = first_stage::translate(&g.mem, fs, req, &sm_caps);
                assert_eq!(again, Ok(l));
            }
            Err(reason) => assert!(reason.is_scalable_mode(), "{reason:?}"),
        }
    }
    for &(source, pasid) in input.lookups.iter().take(16) {
        let tag = pasid.map(|(pasid, privileged)| PasidTag { pasid, privileged });
        match scalable::lookup(&g.mem, table.root, SourceId(source), tag, &sm_caps) {
            Ok(ctx) => assert!(ctx.pasid.is_some_and(|p| p < 1 << 20)),
            Err(e) => assert!(e.reason.is_scalable_mode(), "{:?}", e.reason),
        }
    }
});
