//! First-stage translation (VT-d spec 3.6 and 9.7): IA-32e paging structures, 4-level, walked on
//! demand for the requests of emulated devices.
//!
//! A first-stage entry is present when P is set; R/W and U/S restrict writes and user requests
//! at every level; PS makes a 2 MiB (level 2) or, with CAP.FL1GP, 1 GiB (level 3) page. XD only
//! denies execute requests, which no device behind this unit issues (ECAP.ERS is clear), so it is
//! neither checked nor reserved: Linux 6.1 sets it without NXE in the PASID entry. A successful
//! translation sets the accessed flag of every entry it used and, for a write, the dirty flag of
//! the leaf, each with an atomic compare-and-exchange as hardware's locked update: if the guest
//! changed the entry meanwhile, the walk starts over.
//!
//! Nothing shadows first-stage tables into the host: a caching-mode guest sends no invalidation
//! when it adds a first-stage mapping, so the host could not follow them (see
//! [`crate::VtdConfig::first_stage`]).

use crate::memory::TableMemory;

use crate::fault::{Access, FaultReason};
use crate::tables::beyond_haw_mask;
use crate::walk::Leaf;
use crate::{Capabilities, Perm, PAGE_SHIFT};

// 9.7: first-stage paging entry fields.
/// Present.
const FS_P: u64 = 1 << 0;
/// Read/write: writes allowed through this entry.
const FS_RW: u64 = 1 << 1;
/// User/supervisor: user requests allowed through this entry.
const FS_US: u64 = 1 << 2;
/// Accessed.
const FS_A: u64 = 1 << 5;
/// Dirty (leaf entries).
const FS_D: u64 = 1 << 6;
/// Page size (levels 2 and 3); the PAT bit at level 1; reserved at level 4.
const FS_PS: u64 = 1 << 7;
/// Address bits of an entry (51:12).
const FS_ADDR_MASK: u64 = ((1 << 52) - 1) & !0xfff;

/// Levels of a first-stage table: 4-level paging, 48-bit canonical input addresses (5-level
/// paging is not offered: CAP.FL5LP is clear).
pub const FIRST_STAGE_LEVELS: u8 = 4;
/// Width of a first-stage input address.
const INPUT_WIDTH: u32 = PAGE_SHIFT + 9 * FIRST_STAGE_LEVELS as u32;
/// Walks retried after the guest changed an entry under an accessed/dirty update.
const MAX_RETRIES: usize = 8;

/// A first-stage table and what its PASID entry says about privilege.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FirstStageTable {
    /// Address of the top-level (PML4) table.
    pub root: u64,
    /// SRE: supervisor requests are allowed.
    pub supervisor: bool,
    /// WPE: supervisor writes respect R/W.
    pub write_protect: bool,
}

/// A first-stage translation request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    pub iova: u64,
    pub access: Access,
    /// A supervisor request (privileged mode requested).
    pub privileged: bool,
}

/// Is `iova` canonical for 4-level paging: bits 63:47 all equal?
fn canonical(iova: u64) -> bool {
    let top = (iova as i64) >> (INPUT_WIDTH - 1);
    top == 0 || top == -1
}

fn level_shift(level: u8) -> u32 {
    PAGE_SHIFT + 9 * (u32::from(level) - 1)
}

/// Reserved bits of a present entry at `level` (9.7): address bits at and above HAW; PS in the
/// top level; for large pages the address bits below the page size (bit 12 is PAT); PS at level
/// 3 without CAP.FL1GP.
fn reserved(pte: u64, level: u8, caps: &Capabilities) -> bool {
    let mut rsvd = FS_ADDR_MASK & beyond_haw_mask(caps.haw);
    let large = pte & FS_PS != 0;
    match level {
        4 => rsvd |= FS_PS,
        3 if large && !caps.first_stage_1g => return true,
        2 | 3 if large => rsvd |= ((1 << level_shift(level)) - 1) & !0x1fff,
        _ => {}
    }
    pte & rsvd != 0
}

/// Sets `flags` in the entry at `addr` if it still holds `seen`. False when the guest changed it.
fn set_flags<M: TableMemory>(mem: &M, addr: u64, seen: u64, flags: u64) -> bool {
    if seen & flags == flags {
        return true;
    }
    mem.compare_exchange_u64(addr, seen, seen | flags) == Some(true)
}

/// Translates `req` through `table`, setting accessed and dirty flags as it succeeds.
pub fn translate<M: TableMemory>(
    mem: &M,
    table: FirstStageTable,
    req: Request,
    caps: &Capabilities,
) -> Result<Leaf, FaultReason> {
    if req.privileged && !table.supervisor {
        return Err(FaultReason::SupervisorRequestsDisabled);
    }
    if !canonical(req.iova) {
        return Err(FaultReason::NonCanonicalAddress);
    }
    for _ in 0..MAX_RETRIES {
        if let Some(leaf) = walk_once(mem, table, req, caps, true)? {
            return Ok(leaf);
        }
    }
    // A guest rewriting its own tables as fast as the walk reads them: treat it like an entry
    // the walk could not access.
    Err(FaultReason::FirstStageEntryAccess)
}

/// What [`translate`] would answer for `req`, without setting any accessed or dirty flag: how
/// the protocol checker compares a cached translation with the tables.
pub fn peek<M: TableMemory>(
    mem: &M,
    table: FirstStageTable,
    req: Request,
    caps: &Capabilities,
) -> Result<Leaf, FaultReason> {
    if req.privileged && !table.supervisor {
        return Err(FaultReason::SupervisorRequestsDisabled);
    }
    if !canonical(req.iova) {
        return Err(FaultReason::NonCanonicalAddress);
    }
    walk_once(mem, table, req, caps, false)?.ok_or(FaultReason::FirstStageEntryAccess)
}

/// One walk; None when an accessed/dirty update found the entry changed. Without
/// `update_flags` the walk leaves the entries as they are.
fn walk_once<M: TableMemory>(
    mem: &M,
    table: FirstStageTable,
    req: Request,
    caps: &Capabilities,
    update_flags: bool,
) -> Result<Option<Leaf>, FaultReason> {
    let mut used = [(0u64, 0u64); FIRST_STAGE_LEVELS as usize];
    let mut depth = 0;
    let mut addr = table.root;
    let (mut user, mut writable) = (true, true);
    for level in (1..=FIRST_STAGE_LEVELS).rev() {
        let shift = level_shift(level);
        let entry_addr = addr + ((req.iova >> shift) & 511) * 8;
        let pte = mem.read_u64(entry_addr).ok_or({
            if level == FIRST_STAGE_LEVELS {
                FaultReason::FirstStageRootAccess
            } else {
                FaultReason::FirstStageEntryAccess
            }
        })?;
        if pte & FS_P == 0 {
            return Err(FaultReason::FirstStageEntryNotPresent);
        }
        if reserved(pte, level, caps) {
            return Err(FaultReason::FirstStageEntryReserved);
        }
        user &= pte & FS_US != 0;
        writable &= pte & FS_RW != 0;
        used[depth] = (entry_addr, pte);
        depth += 1;
        if level > 1 && pte & FS_PS == 0 {
            addr = pte & FS_ADDR_MASK;
            continue;
        }
        // A leaf: check the access against what every level allowed.
        if !req.privileged && !user {
            return Err(FaultReason::UserRequestToSupervisorPage);
        }
        let may_write = writable || (req.privileged && !table.write_protect);
        if req.access == Access::Write && !may_write {
            return Err(FaultReason::SmWriteNotPermitted);
        }
        let size = 1u64 << shift;
        let page = pte & FS_ADDR_MASK & !(size - 1);
        for (i, &(a, seen)) in used[..depth].iter().enumerate() {
            let leaf = i + 1 == depth;
            let flags = FS_A
                | if leaf && req.access == Access::Write {
                    FS_D
                } else {
                    0
                };
            if update_flags && !set_flags(mem, a, seen, flags) {
                return Ok(None);
            }
        }
        return Ok(Some(Leaf {
            iova: req.iova & !(size - 1),
            gpa: page,
            len: size,
            perm: Perm {
                read: true,
                write: may_write,
            },
        }));
    }
    // Level 1 always ends the loop as a leaf.
    Err(FaultReason::FirstStageEntryNotPresent)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{mem, FirstStageFlags, ScalableTables};

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    fn req(iova: u64, access: Access) -> Request {
        Request {
            iova,
            access,
            privileged: false,
        }
    }

    fn caps() -> Capabilities {
        Capabilities {
            first_stage_1g: true,
            ..Capabilities::default()
        }
    }

    #[test]
    fn translates_4k_2m_and_1g_pages() {
        let m = mem();
        let mut t = ScalableTables::new(&m);
        let fs = t.first_stage_table();
        t.map_first_stage(fs, 0x1000, 0x5000, 0x1000, FirstStageFlags::USER_RW);
        t.map_first_stage_large(fs, 2 * MIB, 4 * MIB, 2, FirstStageFlags::USER_RO);
        t.map_first_stage_large(fs, GIB, 0, 3, FirstStageFlags::USER_RW);
        let l = translate(&m, fs, req(0x1234, Access::Write), &caps()).unwrap();
        assert_eq!((l.iova, l.gpa, l.len), (0x1000, 0x5000, 0x1000));
        let l = translate(&m, fs, req(2 * MIB + 0x3456, Access::Read), &caps()).unwrap();
        assert_eq!((l.iova, l.gpa, l.len), (2 * MIB, 4 * MIB, 2 * MIB));
        assert!(!l.perm.write);
        let l = translate(&m, fs, req(GIB + 5, Access::Read), &caps()).unwrap();
        assert_eq!((l.iova, l.gpa, l.len), (GIB, 0, GIB));
    }

    #[test]
    fn not_present_entries_at_any_level_fault_with_71h() {
        let m = mem();
        let mut t = ScalableTables::new(&m);
        let fs = t.first_stage_table();
        t.map_first_stage(fs, 0x1000, 0x5000, 0x1000, FirstStageFlags::USER_RW);
        for iova in [0x2000, 1 << 30, 1 << 39] {
            assert_eq!(
                translate(&m, fs, req(iova, Access::Read), &caps()),
                Err(FaultReason::FirstStageEntryNotPresent),
                "{iova:#x}"
            );
        }
    }

    #[test]
    fn write_and_user_permissions_accumulate_over_the_levels() {
        let m = mem();
        let mut t = ScalableTables::new(&m);
        let fs = t.first_stage_table();
        t.map_first_stage(fs, 0x1000, 0x5000, 0x1000, FirstStageFlags::USER_RO);
        assert_eq!(
            translate(&m, fs, req(0x1000, Access::Write), &caps()),
            Err(FaultReason::SmWriteNotPermitted)
        );
        t.map_first_stage(
            fs,
            0x2000,
            0x6000,
            0x1000,
            FirstStageFlags {
                write: true,
                user: false,
            },
        );
        assert_eq!(
            translate(&m, fs, req(0x2000, Access::Read), &caps()),
            Err(FaultReason::UserRequestToSupervisorPage)
        );
        // A read-only upper level makes the writable leaf below it read-only.
        t.map_first_stage(fs, 0x4000, 0x7000, 0x1000, FirstStageFlags::USER_RW);
        let pml4e = fs.root;
        t.write_u64(pml4e, t.read_u64(pml4e) & !FS_RW);
        assert_eq!(
            translate(&m, fs, req(0x4000, Access::Write), &caps()),
            Err(FaultReason::SmWriteNotPermitted)
        );
        assert!(translate(&m, fs, req(0x4000, Access::Read), &caps()).is_ok());
    }

    #[test]
    fn supervisor_requests_need_sre_and_write_protection_follows_wpe() {
        let m = mem();
        let mut t = ScalableTables::new(&m);
        let user_only = t.first_stage_table();
        let flags = FirstStageFlags {
            write: false,
            user: false,
        };
        t.map_first_stage(user_only, 0x1000, 0x5000, 0x1000, flags);
        let sup = Request {
            privileged: true,
            ..req(0x1000, Access::Write)
        };
        assert_eq!(
            translate(&m, user_only, sup, &caps()),
            Err(FaultReason::SupervisorRequestsDisabled)
        );
        let sre = FirstStageTable {
            supervisor: true,
            ..user_only
        };
        // Without WPE a supervisor write ignores R/W; with it the write faults.
        let l = translate(&m, sre, sup, &caps()).unwrap();
        assert_eq!(l.gpa, 0x5000);
        let wpe = FirstStageTable {
            write_protect: true,
            ..sre
        };
        assert_eq!(
            translate(&m, wpe, sup, &caps()),
            Err(FaultReason::SmWriteNotPermitted)
        );
    }

    #[test]
    fn non_canonical_addresses_fault_with_80h_and_canonical_high_ones_walk() {
        let m = mem();
        let mut t = ScalableTables::new(&m);
        let fs = t.first_stage_table();
        let high = 0xffff_8000_0000_0000;
        t.map_first_stage(fs, high, 0x5000, 0x1000, FirstStageFlags::USER_RW);
        assert_eq!(
            translate(&m, fs, req(high, Access::Read), &caps()).map(|l| l.gpa),
            Ok(0x5000)
        );
        for bad in [1 << 47, 0x8000_0000_0000_0000, 0x0001_0000_0000_0000] {
            assert_eq!(
                translate(&m, fs, req(bad, Access::Read), &caps()),
                Err(FaultReason::NonCanonicalAddress),
                "{bad:#x}"
            );
        }
    }

    #[test]
    fn reserved_bits_fault_with_72h() {
        let m = mem();
        let mut t = ScalableTables::new(&m);
        let fs = t.first_stage_table();
        t.map_first_stage(fs, 0x1000, 0x5000, 0x1000, FirstStageFlags::USER_RW);
        let leaf = t.first_stage_entry_addr(fs, 0x1000, 1);
        let good = t.read_u64(leaf);
        let haw39 = Capabilities { haw: 39, ..caps() };
        t.write_u64(leaf, good | 1 << 40);
        assert_eq!(
            translate(&m, fs, req(0x1000, Access::Read), &haw39),
            Err(FaultReason::FirstStageEntryReserved),
            "address bits beyond HAW"
        );
        t.write_u64(leaf, good);
        // PS in the top level.
        t.write_u64(fs.root, t.read_u64(fs.root) | FS_PS);
        assert_eq!(
            translate(&m, fs, req(0x1000, Access::Read), &caps()),
            Err(FaultReason::FirstStageEntryReserved)
        );
        t.write_u64(fs.root, t.read_u64(fs.root) & !FS_PS);
        // A 2 MiB page whose address is not 2 MiB aligned; a 1 GiB page without FL1GP.
        t.map_first_stage_large(fs, 4 * MIB, 6 * MIB + 0x2000, 2, FirstStageFlags::USER_RW);
        assert_eq!(
            translate(&m, fs, req(4 * MIB, Access::Read), &caps()),
            Err(FaultReason::FirstStageEntryReserved)
        );
        t.map_first_stage_large(fs, 2 * GIB, GIB, 3, FirstStageFlags::USER_RW);
        let no_1g = Capabilities {
            first_stage_1g: false,
            ..caps()
        };
        assert_eq!(
            translate(&m, fs, req(2 * GIB, Access::Read), &no_1g),
            Err(FaultReason::FirstStageEntryReserved)
        );
        // XD and the ignored bits 62:52 are not reserved (Linux 6.1 sets XD).
        t.write_u64(leaf, good | 1 << 63 | 0x7ff << 52);
        assert!(translate(&m, fs, req(0x1000, Access::Read), &caps()).is_ok());
    }

    #[test]
    fn unreadable_tables_fault_with_73h_at_the_top_and_70h_below() {
        let m = mem();
        let gone = FirstStageTable {
            root: 1 << 40,
            supervisor: false,
            write_protect: false,
        };
        assert_eq!(
            translate(&m, gone, req(0, Access::Read), &caps()),
            Err(FaultReason::FirstStageRootAccess)
        );
        let mut t = ScalableTables::new(&m);
        let fs = t.first_stage_table();
        t.write_u64(fs.root, (1 << 40) | 0b111);
        assert_eq!(
            translate(&m, fs, req(0, Access::Read), &caps()),
            Err(FaultReason::FirstStageEntryAccess)
        );
    }

    #[test]
    fn a_translation_sets_accessed_on_every_level_and_dirty_on_a_written_leaf() {
        let m = mem();
        let mut t = ScalableTables::new(&m);
        let fs = t.first_stage_table();
        t.map_first_stage(fs, 0x1000, 0x5000, 0x1000, FirstStageFlags::USER_RW);
        let addrs: Vec<u64> = (1..=4)
            .rev()
            .map(|l| t.first_stage_entry_addr(fs, 0x1000, l))
            .collect();
        // Clear A everywhere (the writer sets it on tables, as Linux does).
        for &a in &addrs {
            t.write_u64(a, t.read_u64(a) & !(FS_A | FS_D));
        }
        translate(&m, fs, req(0x1000, Access::Read), &caps()).unwrap();
        for &a in &addrs {
            assert!(t.read_u64(a) & FS_A != 0, "A at {a:#x}");
            assert_eq!(t.read_u64(a) & FS_D, 0, "a read sets no D at {a:#x}");
        }
        translate(&m, fs, req(0x1000, Access::Write), &caps()).unwrap();
        let leaf = *addrs.last().unwrap();
        assert!(t.read_u64(leaf) & FS_D != 0, "a write dirties the leaf");
        assert_eq!(t.read_u64(fs.root) & FS_D, 0, "only the leaf is dirtied");
        // A faulting request changes nothing.
        t.write_u64(leaf, t.read_u64(leaf) & !(FS_A | FS_D | FS_RW));
        assert!(translate(&m, fs, req(0x1000, Access::Write), &caps()).is_err());
        assert_eq!(t.read_u64(leaf) & (FS_A | FS_D), 0);
    }
}
