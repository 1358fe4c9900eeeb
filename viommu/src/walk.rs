//! Second-level (second-stage) page walks (VT-d spec 3.7 and 9.8), the same tables in legacy and
//! scalable mode.
//!
//! Two walks share one entry decoder: [`walk`] resolves one address for a DMA request and says
//! why it failed ([`StageFault`], which each mode turns into its own fault reason; [`translate`]
//! gives the legacy one); [`walk_range`] visits every leaf and hole over a range, for shadowing
//! the guest's tables into host mappings.

use crate::memory::TableMemory;

use crate::fault::{Access, FaultReason};
use crate::tables::beyond_haw_mask;
use crate::{Capabilities, Perm, PAGE_SHIFT};

// 9.8: second-level paging entry fields.
const SL_R: u64 = 1 << 0;
const SL_W: u64 = 1 << 1;
/// Page size: the entry maps a 2 MiB (level 2) or 1 GiB (level 3) page.
const SL_PS: u64 = 1 << 7;
/// Snoop behaviour: reserved without ECAP.SC, which this model does not report.
const SL_SNP: u64 = 1 << 11;
/// Transient mapping: reserved without ECAP.DT.
const SL_TM: u64 = 1 << 62;
/// Address bits of an entry (51:12); bits above the host address width are reserved.
const SL_ADDR_MASK: u64 = ((1 << 52) - 1) & !0xfff;

const ENTRIES_PER_TABLE: u64 = 512;
const LEVEL_STRIDE: u32 = 9;

/// A second-level page table: its root and number of levels (3 for 39-bit, 4 for 48-bit).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PageTable {
    pub root: u64,
    pub levels: u8,
}

impl Leaf {
    /// The part of this leaf over `[start, end)`, which lies within it.
    pub fn sub(&self, start: u64, end: u64) -> Leaf {
        Leaf {
            iova: start,
            gpa: self.gpa + (start - self.iova),
            len: end - start,
            perm: self.perm,
        }
    }
}

impl PageTable {
    /// Width of the input address space in bits.
    pub fn width(&self) -> u32 {
        PAGE_SHIFT + LEVEL_STRIDE * u32::from(self.levels)
    }

    /// One past the highest input address.
    pub fn limit(&self) -> u64 {
        1 << self.width()
    }
}

/// A translated range: `len` bytes at `iova` map to `gpa` with `perm`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Leaf {
    pub iova: u64,
    pub gpa: u64,
    pub len: u64,
    pub perm: Perm,
}

/// What a range walk finds, in address order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WalkItem {
    Leaf(Leaf),
    /// No translation over `len` bytes at `iova` (not present, reserved bits or unreadable),
    /// reported once per entry at the level where it was found.
    Hole {
        iova: u64,
        len: u64,
    },
    /// A whole last-level table the caller's [`UnchangedHook`] recognised: its leaves are not
    /// visited.
    Unchanged {
        iova: u64,
        len: u64,
    },
}

/// Asked, for each last-level table a range walk covers whole, whether the caller already
/// knows it: `(iova of the table's span, table address, permissions inherited from above,
/// its 512 entries)`. Returning true skips the table's leaves.
pub type UnchangedHook<'a, 'h> = &'a mut (dyn FnMut(u64, u64, Perm, &[u64]) -> bool + 'h);

/// Bytes of input address space one last-level table covers.
pub const LEAF_TABLE_SPAN: u64 = 1 << 21;

/// The range walk gave up because the guest's tables held more entries than the budget.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BudgetExceeded;

/// What range walks may still do and what they did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WalkCounters {
    /// Visits left before the walk gives up.
    pub budget: u64,
    /// Guest page-table pages read.
    pub tables_read: u64,
}

impl WalkCounters {
    pub fn new(budget: u64) -> Self {
        WalkCounters {
            budget,
            tables_read: 0,
        }
    }
}

fn level_shift(level: u8) -> u32 {
    PAGE_SHIFT + LEVEL_STRIDE * (u32::from(level) - 1)
}

/// How one paging entry at one level decodes.
enum Entry {
    NotPresent,
    Reserved,
    Leaf { addr: u64, perm: Perm },
    Table { addr: u64, perm: Perm },
}

/// The R (bit 0) and W (bit 1) bits of a second-level entry granting `perm`.
pub fn perm_bits(perm: Perm) -> u64 {
    (u64::from(perm.read) * SL_R) | (u64::from(perm.write) * SL_W)
}

fn decode(pte: u64, level: u8, caps: &Capabilities) -> Entry {
    let perm = Perm {
        read: pte & SL_R != 0,
        write: pte & SL_W != 0,
    };
    if perm.is_none() {
        return Entry::NotPresent;
    }
    let mut rsvd = SL_SNP | (SL_ADDR_MASK & beyond_haw_mask(caps.haw));
    let large = level > 1 && pte & SL_PS != 0;
    if large {
        let large_ok = match level {
            2 => caps.large_2m,
            3 => caps.large_1g,
            _ => false,
        };
        if !large_ok {
            return Entry::Reserved;
        }
        // The address of a large page is aligned to its size: the low address bits are reserved.
        rsvd |= ((1 << level_shift(level)) - 1) & !0xfff;
    }
    if (level == 1 || large) && !caps.device_iotlb {
        rsvd |= SL_TM;
    }
    if pte & rsvd != 0 {
        return Entry::Reserved;
    }
    let addr = pte & SL_ADDR_MASK;
    if level == 1 || large {
        Entry::Leaf { addr, perm }
    } else {
        Entry::Table { addr, perm }
    }
}

/// Why a second-stage walk did not translate, before a mode names the fault reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StageFault {
    /// The input address is beyond the table's width or MGAW.
    BeyondWidth,
    /// The top-level table could not be read.
    RootAccess,
    /// A lower-level table could not be read.
    EntryAccess,
    /// An entry on the way has both R and W clear.
    NotPresent,
    /// An entry on the way has a reserved bit set.
    Reserved,
    /// The leaf was found but the permissions along the way do not allow the access.
    Denied,
}

impl StageFault {
    /// The legacy-mode reason (7.1.3): a missing entry and a missing permission both read as
    /// a read or write permission fault.
    pub fn legacy(self, access: Access) -> FaultReason {
        match self {
            StageFault::BeyondWidth => FaultReason::AddressBeyondWidth,
            StageFault::RootAccess | StageFault::EntryAccess => FaultReason::PagingEntryAccess,
            StageFault::Reserved => FaultReason::PagingEntryReserved,
            StageFault::NotPresent | StageFault::Denied => match access {
                Access::Read => FaultReason::ReadNotPermitted,
                Access::Write => FaultReason::WriteNotPermitted,
            },
        }
    }

    /// The scalable-mode reason (SSS and SGN conditions of 7.1.3).
    pub fn scalable(self, access: Access) -> FaultReason {
        match self {
            StageFault::BeyondWidth => FaultReason::SmAddressBeyondWidth,
            StageFault::RootAccess => FaultReason::SecondStageRootAccess,
            StageFault::EntryAccess => FaultReason::SecondStageEntryAccess,
            StageFault::NotPresent => FaultReason::SecondStageEntryNotPresent,
            StageFault::Reserved => FaultReason::SecondStageEntryReserved,
            StageFault::Denied => match access {
                Access::Read => FaultReason::SmReadNotPermitted,
                Access::Write => FaultReason::SmWriteNotPermitted,
            },
        }
    }
}

/// Translates `iova` through `table` for a request of kind `access`, failing with the legacy
/// reason.
pub fn translate<M: TableMemory>(
    mem: &M,
    table: PageTable,
    iova: u64,
    access: Access,
    caps: &Capabilities,
) -> Result<Leaf, FaultReason> {
    walk(mem, table, iova, access, caps).map_err(|f| f.legacy(access))
}

/// Translates `iova` through `table` for a request of kind `access`.
pub fn walk<M: TableMemory>(
    mem: &M,
    table: PageTable,
    iova: u64,
    access: Access,
    caps: &Capabilities,
) -> Result<Leaf, StageFault> {
    if iova >= table.limit() || iova >> caps.aw_bits != 0 {
        return Err(StageFault::BeyondWidth);
    }
    let mut addr = table.root;
    let mut perm = Perm::RW;
    for level in (1..=table.levels).rev() {
        let shift = level_shift(level);
        let index = (iova >> shift) & (ENTRIES_PER_TABLE - 1);
        let pte = mem.read_u64(addr + index * 8).ok_or({
            if level == table.levels {
                StageFault::RootAccess
            } else {
                StageFault::EntryAccess
            }
        })?;
        match decode(pte, level, caps) {
            Entry::NotPresent => return Err(StageFault::NotPresent),
            Entry::Reserved => return Err(StageFault::Reserved),
            Entry::Table {
                addr: next,
                perm: p,
            } => {
                perm = perm.and(p);
                addr = next;
            }
            Entry::Leaf {
                addr: page,
                perm: p,
            } => {
                perm = perm.and(p);
                if perm.allows(access) {
                    let size = 1u64 << shift;
                    let base = iova & !(size - 1);
                    return Ok(Leaf {
                        iova: base,
                        gpa: page,
                        len: size,
                        perm,
                    });
                }
                return Err(StageFault::Denied);
            }
        }
    }
    // A table at level 1 is decoded as a leaf: the loop always returns.
    Err(StageFault::NotPresent)
}

/// Walks `table` over `[start, end)` (page-aligned), calling `visit` for every leaf and hole in
/// address order. Leaves are clipped to the range.
///
/// The walk does at most `counters.budget` visits: a hostile guest can build tables whose
/// entries all point to the same lower table, so the leaf count is bounded by the budget, not
/// by the tables.
pub fn walk_range<M: TableMemory>(
    mem: &M,
    table: PageTable,
    range: (u64, u64),
    caps: &Capabilities,
    counters: &mut WalkCounters,
    visit: &mut dyn FnMut(WalkItem),
) -> Result<(), BudgetExceeded> {
    walk_range_with(mem, table, range, caps, counters, visit, None)
}

/// [`walk_range`], asking `unchanged` about each last-level table the range covers whole.
pub fn walk_range_with<M: TableMemory>(
    mem: &M,
    table: PageTable,
    (start, end): (u64, u64),
    caps: &Capabilities,
    counters: &mut WalkCounters,
    visit: &mut dyn FnMut(WalkItem),
    unchanged: Option<UnchangedHook<'_, '_>>,
) -> Result<(), BudgetExceeded> {
    // Nothing translates beyond the table's span or the unit's address width (MGAW).
    let end = end.min(table.limit()).min(1 << caps.aw_bits);
    if start >= end {
        return Ok(());
    }
    let mut walker = RangeWalker {
        mem,
        caps,
        counters,
        visit,
        unchanged,
    };
    walker.level(table.root, table.levels, 0, start, end, Perm::RW)
}

struct RangeWalker<'a, 'h, M> {
    mem: &'a M,
    caps: &'a Capabilities,
    counters: &'a mut WalkCounters,
    visit: &'a mut dyn FnMut(WalkItem),
    unchanged: Option<UnchangedHook<'a, 'h>>,
}

impl<M: TableMemory> RangeWalker<'_, '_, M> {
    fn emit(&mut self, item: WalkItem) -> Result<(), BudgetExceeded> {
        if self.counters.budget == 0 {
            return Err(BudgetExceeded);
        }
        self.counters.budget -= 1;
        (self.visit)(item);
        Ok(())
    }

    /// Visits the table at `addr` (level `level`, covering addresses from `base`) over
    /// `[start, end)`, which lies within the table's span.
    fn level(
        &mut self,
        addr: u64,
        level: u8,
        base: u64,
        start: u64,
        end: u64,
        perm: Perm,
    ) -> Result<(), BudgetExceeded> {
        let shift = level_shift(level);
        let first = (start - base) >> shift;
        let last = (end - 1 - base) >> shift;
        let count = (last - first + 1) as usize;
        // Most walks read a few entries per table: skip zeroing a whole table's buffer.
        let mut buf = std::mem::MaybeUninit::<[u64; ENTRIES_PER_TABLE as usize]>::uninit();
        // SAFETY: the first `count` elements are initialized by the write below before any
        // read; u64 has no invalid bit patterns.
        let ptes = unsafe {
            let p = buf.as_mut_ptr().cast::<u64>();
            std::ptr::write_bytes(p, 0, count);
            std::slice::from_raw_parts_mut(p, count)
        };
        let read = self.mem.read_bytes(addr + first * 8, as_bytes_mut(ptes));
        self.counters.tables_read += 1;
        if !read {
            return self.emit(WalkItem::Hole {
                iova: start,
                len: end - start,
            });
        }
        if level == 1 && count == ENTRIES_PER_TABLE as usize {
            if let Some(hook) = self.unchanged.as_mut() {
                if hook(base, addr, perm, ptes) {
                    return self.emit(WalkItem::Unchanged {
                        iova: base,
                        len: LEAF_TABLE_SPAN,
                    });
                }
            }
        }
        for (i, &pte) in ptes.iter().enumerate() {
            let entry_base = base + ((first + i as u64) << shift);
            let lo = start.max(entry_base);
            let hi = end.min(entry_base + (1 << shift));
            match decode(u64::from_le(pte), level, self.caps) {
                Entry::NotPresent | Entry::Reserved => self.emit(WalkItem::Hole {
                    iova: lo,
                    len: hi - lo,
                })?,
                Entry::Leaf {
                    addr: page,
                    perm: p,
                } => {
                    let perm = perm.and(p);
                    if perm.is_none() {
                        self.emit(WalkItem::Hole {
                            iova: lo,
                            len: hi - lo,
                        })?;
                    } else {
                        self.emit(WalkItem::Leaf(Leaf {
                            iova: lo,
                            gpa: page + (lo - entry_base),
                            len: hi - lo,
                            perm,
                        }))?;
                    }
                }
                Entry::Table {
                    addr: next,
                    perm: p,
                } => {
                    self.level(next, level - 1, entry_base, lo, hi, perm.and(p))?;
                }
            }
        }
        Ok(())
    }
}

fn as_bytes_mut(words: &mut [u64]) -> &mut [u8] {
    let len = std::mem::size_of_val(words);
    // SAFETY: the pointer and length come from a valid &mut [u64]; u8 has alignment 1 and any
    // bit pattern is a valid u64, so viewing the same memory as bytes is sound.
    unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<u8>(), len) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{mem, Tables};

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    fn walk_all(m: &crate::testing::Mem, t: PageTable, start: u64, end: u64) -> Vec<WalkItem> {
        let mut items = vec![];
        let mut counters = WalkCounters::new(u64::MAX);
        walk_range(
            m,
            t,
            (start, end),
            &Capabilities::default(),
            &mut counters,
            &mut |i| items.push(i),
        )
        .unwrap();
        items
    }

    #[test]
    fn translates_4k_2m_and_1g_leaves_at_3_and_4_levels() {
        for levels in [3, 4] {
            let m = mem();
            let mut t = Tables::new(&m);
            let pt = t.page_table(levels);
            t.map(pt, 0x1000, 0x5000, 0x1000, Perm::RW);
            t.map_large(pt, 2 * MIB, 4 * MIB, 2, Perm::READ);
            t.map_large(pt, GIB, 0, 3, Perm::RW);
            let caps = Capabilities::default();
            let l = translate(&m, pt, 0x1234, Access::Write, &caps).unwrap();
            assert_eq!((l.iova, l.gpa, l.len), (0x1000, 0x5000, 0x1000));
            let l = translate(&m, pt, 2 * MIB + 0x3456, Access::Read, &caps).unwrap();
            assert_eq!((l.iova, l.gpa, l.len), (2 * MIB, 4 * MIB, 2 * MIB));
            let l = translate(&m, pt, GIB + 5, Access::Read, &caps).unwrap();
            assert_eq!((l.iova, l.gpa, l.len), (GIB, 0, GIB));
        }
    }

    #[test]
    fn permission_faults_name_the_access() {
        let m = mem();
        let mut t = Tables::new(&m);
        let pt = t.page_table(3);
        t.map(pt, 0x1000, 0x5000, 0x1000, Perm::READ);
        let caps = Capabilities::default();
        assert_eq!(
            translate(&m, pt, 0x1000, Access::Write, &caps),
            Err(FaultReason::WriteNotPermitted)
        );
        assert_eq!(
            translate(&m, pt, 0x9000, Access::Read, &caps),
            Err(FaultReason::ReadNotPermitted)
        );
    }

    #[test]
    fn address_beyond_width_faults_with_reason_4() {
        let m = mem();
        let mut t = Tables::new(&m);
        let pt = t.page_table(3);
        assert_eq!(
            translate(&m, pt, 1 << 39, Access::Read, &Capabilities::default()),
            Err(FaultReason::AddressBeyondWidth)
        );
    }

    #[test]
    fn reserved_bits_and_unsupported_large_pages_fault_with_reason_c() {
        let m = mem();
        let mut t = Tables::new(&m);
        let pt = t.page_table(3);
        t.map(pt, 0x1000, 0x5000, 0x1000, Perm::RW);
        let caps = Capabilities::default();
        let pte = t.leaf_pte_addr(pt, 0x1000);
        let v = t.read_u64(pte);
        t.write_u64(pte, v | SL_SNP);
        assert_eq!(
            translate(&m, pt, 0x1000, Access::Read, &caps),
            Err(FaultReason::PagingEntryReserved)
        );
        t.write_u64(pte, v | 1 << 45);
        let haw39 = Capabilities { haw: 39, ..caps };
        assert_eq!(
            translate(&m, pt, 0x1000, Access::Read, &haw39),
            Err(FaultReason::PagingEntryReserved),
            "address bits beyond the 39-bit host address width are reserved"
        );
        t.map_large(pt, 2 * MIB, 4 * MIB, 2, Perm::RW);
        let no_2m = Capabilities {
            large_2m: false,
            ..caps
        };
        assert_eq!(
            translate(&m, pt, 2 * MIB, Access::Read, &no_2m),
            Err(FaultReason::PagingEntryReserved)
        );
    }

    #[test]
    fn scalable_mode_tells_a_missing_entry_from_a_missing_permission() {
        let m = mem();
        let mut t = Tables::new(&m);
        let pt = t.page_table(4);
        t.map(pt, 0x1000, 0x5000, 0x1000, Perm::READ);
        let caps = Capabilities::default();
        let w = walk(&m, pt, 0x1000, Access::Write, &caps).unwrap_err();
        assert_eq!(w, StageFault::Denied);
        assert_eq!(w.scalable(Access::Write), FaultReason::SmWriteNotPermitted);
        assert_eq!(w.legacy(Access::Write), FaultReason::WriteNotPermitted);
        let r = walk(&m, pt, 0x9000, Access::Read, &caps).unwrap_err();
        assert_eq!(r, StageFault::NotPresent);
        assert_eq!(
            r.scalable(Access::Read),
            FaultReason::SecondStageEntryNotPresent
        );
        assert_eq!(r.legacy(Access::Read), FaultReason::ReadNotPermitted);
        let beyond = walk(&m, pt, 1 << 48, Access::Read, &caps).unwrap_err();
        assert_eq!(
            beyond.scalable(Access::Read),
            FaultReason::SmAddressBeyondWidth
        );
        // The root table outside memory, then a lower table outside memory.
        let gone = PageTable {
            root: 1 << 38,
            levels: 4,
        };
        assert_eq!(
            walk(&m, gone, 0, Access::Read, &caps),
            Err(StageFault::RootAccess)
        );
        t.write_u64(pt.root, (1 << 38) | 3);
        assert_eq!(
            walk(&m, pt, 0, Access::Read, &caps),
            Err(StageFault::EntryAccess)
        );
        assert_eq!(
            StageFault::EntryAccess.scalable(Access::Read),
            FaultReason::SecondStageEntryAccess
        );
    }

    #[test]
    fn unreadable_table_faults_with_reason_7() {
        let m = mem();
        let pt = PageTable {
            root: 1 << 38,
            levels: 3,
        };
        assert_eq!(
            translate(&m, pt, 0, Access::Read, &Capabilities::default()),
            Err(FaultReason::PagingEntryAccess)
        );
    }

    #[test]
    fn range_walk_reports_leaves_clipped_and_holes_in_order() {
        let m = mem();
        let mut t = Tables::new(&m);
        let pt = t.page_table(3);
        t.map(pt, 0x2000, 0x8000, 0x2000, Perm::RW);
        t.map_large(pt, 2 * MIB, 6 * MIB, 2, Perm::READ);
        let items = walk_all(&m, pt, 0x1000, 2 * MIB + 0x3000);
        let leaves: Vec<_> = items
            .iter()
            .filter_map(|i| match i {
                WalkItem::Leaf(l) => Some((l.iova, l.gpa, l.len)),
                _ => None,
            })
            .collect();
        assert_eq!(
            leaves,
            vec![
                (0x2000, 0x8000, 0x1000),
                (0x3000, 0x9000, 0x1000),
                (2 * MIB, 6 * MIB, 0x3000)
            ]
        );
        let covered: u64 = items
            .iter()
            .map(|i| match i {
                WalkItem::Leaf(l) => l.len,
                WalkItem::Hole { len, .. } | WalkItem::Unchanged { len, .. } => *len,
            })
            .sum();
        assert_eq!(covered, 2 * MIB + 0x2000, "leaves and holes tile the range");
    }

    #[test]
    fn range_walk_over_self_referencing_tables_stops_at_the_budget() {
        let m = mem();
        let mut t = Tables::new(&m);
        let pt = t.page_table(4);
        // Every entry of the root points back at the root: a loop of tables.
        for i in 0..512 {
            t.write_u64(pt.root + i * 8, pt.root | 3);
        }
        let mut counters = WalkCounters::new(10_000);
        let r = walk_range(
            &m,
            pt,
            (0, pt.limit()),
            &Capabilities::default(),
            &mut counters,
            &mut |_| {},
        );
        assert_eq!(r, Err(BudgetExceeded));
    }
}
