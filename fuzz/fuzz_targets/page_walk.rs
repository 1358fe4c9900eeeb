//! Second-level walks over arbitrary tables: loops, self-references, huge pages, addresses
//! beyond the width. Range walks must agree with single-address translation, tile the range in
//! order, and stop at the budget.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use viommu::walk::{translate, walk_range, PageTable, WalkCounters, WalkItem};
use viommu::{Access, Capabilities, VtdConfig};
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
});
