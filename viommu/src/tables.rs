//! Root and context tables in legacy mode (VT-d spec 3.4.2, 9.1 and 9.3), and what a lookup in
//! either mode yields ([`Context`], [`LookupFault`]); scalable mode's tables are in
//! [`crate::scalable`].
//!
//! The root table has one 128-bit entry per bus; each present entry points to a context table
//! with one 128-bit entry per device/function. A context entry names the domain and how the
//! device's requests are translated.

use crate::memory::TableMemory;

use crate::fault::FaultReason;
use crate::first_stage::FirstStageTable;
use crate::walk::PageTable;
use crate::{Capabilities, SourceId};

const ENTRY_SIZE: u64 = 16;

// 9.1: root entry, low quadword.
const ROOT_LO_P: u64 = 1 << 0;
const ROOT_LO_RSVD: u64 = 0xffe;

// 9.3: context entry.
const CTX_LO_P: u64 = 1 << 0;
const CTX_LO_FPD: u64 = 1 << 1;
const CTX_LO_TT_SHIFT: u64 = 2;
const CTX_LO_TT_MASK: u64 = 0b11 << CTX_LO_TT_SHIFT;
const CTX_LO_RSVD: u64 = 0xff0;
const CTX_HI_AW_MASK: u64 = 0b111;
const CTX_HI_DID_SHIFT: u64 = 8;
/// Bit 7 and bits 63:24 are reserved; bits 6:3 are available to software.
const CTX_HI_RSVD: u64 = !0xff_ff7f;

/// Translation type: untranslated requests go through second-level tables.
const TT_MULTI_LEVEL: u64 = 0b00;
/// Translation type: as multi-level, and translation requests (ATS) are allowed.
const TT_DEVICE_TLB: u64 = 0b01;
/// Translation type: untranslated requests pass through unchanged.
const TT_PASS_THROUGH: u64 = 0b10;

/// Which kind of root table the unit translates through, as RTADDR.TTM said at the last SRTP.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TableMode {
    /// TTM = 00b: legacy root and context tables.
    #[default]
    Legacy,
    /// TTM = 01b: scalable-mode root, context and PASID tables (ECAP.SMTS).
    Scalable,
}

/// How a device's requests are translated, as its context entry (legacy mode) or PASID entry
/// (scalable mode) says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Translation {
    /// Through second-level (second-stage) page tables: the same tables in both modes.
    Tables(PageTable),
    /// Through first-stage tables (scalable mode, PGTT = 001b).
    FirstStage(FirstStageTable),
    /// Addresses are guest-physical addresses.
    PassThrough,
}

/// What a request from a device translates through: a present, valid legacy context entry, or
/// in scalable mode the context entry and the PASID entry it leads to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Context {
    /// The domain id: the context entry's (legacy) or the PASID entry's (scalable mode).
    pub domain: u16,
    pub translation: Translation,
    /// Fault processing disable: faults of this request are not recorded.
    pub fpd: bool,
    /// The PASID whose entry was used (scalable mode: the request's, or RID_PASID for a
    /// request without one); None in legacy mode.
    pub pasid: Option<u32>,
    /// Translation requests and translated requests (ATS) are allowed: a legacy context entry
    /// of translation type 01b, or a scalable-mode one with DTE set (needs ECAP.DT).
    pub device_tlb: bool,
}

/// Why no translation could be found, and whether the fault may be recorded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LookupFault {
    pub reason: FaultReason,
    /// Set when the fault is a qualified one (found past the root table) and an entry read on
    /// the way has FPD set: the fault is not recorded.
    pub fpd: bool,
}

impl LookupFault {
    /// A fault that FPD cannot suppress.
    pub(crate) fn new(reason: FaultReason) -> Self {
        LookupFault { reason, fpd: false }
    }
}

fn read_entry<M: TableMemory>(mem: &M, addr: u64) -> Option<[u64; 2]> {
    let lo = mem.read_u64(addr)?;
    let hi = mem.read_u64(addr.checked_add(8)?)?;
    Some([lo, hi])
}

/// Mask of the address bits at and above the host address width, which must be zero.
pub(crate) fn beyond_haw_mask(haw: u32) -> u64 {
    !((1u64 << haw) - 1)
}

/// Looks up the context of `source` in the legacy-mode root table at `root_table`.
pub fn lookup<M: TableMemory>(
    mem: &M,
    root_table: u64,
    source: SourceId,
    caps: &Capabilities,
) -> Result<Context, LookupFault> {
    let root_addr = root_table + u64::from(source.bus()) * ENTRY_SIZE;
    let [root_lo, _] =
        read_entry(mem, root_addr).ok_or(LookupFault::new(FaultReason::RootTableAccess))?;
    if root_lo & ROOT_LO_P == 0 {
        return Err(LookupFault::new(FaultReason::RootEntryNotPresent));
    }
    // The upper quadword of a legacy root entry is reserved too, but Linux leaves it as it
    // found it; like QEMU, only the low quadword is checked.
    if root_lo & (ROOT_LO_RSVD | beyond_haw_mask(caps.haw)) != 0 {
        return Err(LookupFault::new(FaultReason::RootEntryReserved));
    }
    let [lo, hi] = (root_lo & !0xfff)
        .checked_add(u64::from(source.devfn()) * ENTRY_SIZE)
        .and_then(|a| read_entry(mem, a))
        .ok_or(LookupFault::new(FaultReason::ContextTableAccess))?;
    let fpd = lo & CTX_LO_FPD != 0;
    let fault = |reason| LookupFault { reason, fpd };
    if lo & CTX_LO_P == 0 {
        return Err(fault(FaultReason::ContextEntryNotPresent));
    }
    let tt = (lo & CTX_LO_TT_MASK) >> CTX_LO_TT_SHIFT;
    let pass_through = tt == TT_PASS_THROUGH;
    // The second-level pointer is unused, so unchecked, for pass-through entries.
    let ptr_rsvd = if pass_through {
        0
    } else {
        beyond_haw_mask(caps.haw)
    };
    if lo & (CTX_LO_RSVD | ptr_rsvd) != 0 || hi & CTX_HI_RSVD != 0 {
        return Err(fault(FaultReason::ContextEntryReserved));
    }
    let domain = ((hi >> CTX_HI_DID_SHIFT) & 0xffff) as u16;
    let translation = match tt {
        TT_PASS_THROUGH if caps.pass_through => Translation::PassThrough,
        TT_DEVICE_TLB if !caps.device_iotlb => return Err(fault(FaultReason::ContextEntryInvalid)),
        TT_MULTI_LEVEL | TT_DEVICE_TLB => {
            let levels = match hi & CTX_HI_AW_MASK {
                1 if caps.supports_levels(3) => 3,
                2 if caps.supports_levels(4) => 4,
                _ => return Err(fault(FaultReason::ContextEntryInvalid)),
            };
            Translation::Tables(PageTable {
                root: lo & !0xfff,
                levels,
            })
        }
        _ => return Err(fault(FaultReason::ContextEntryInvalid)),
    };
    Ok(Context {
        domain,
        translation,
        fpd,
        pasid: None,
        device_tlb: tt == TT_DEVICE_TLB,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::testing::{mem, Tables};

    #[test]
    fn present_multi_level_context_is_decoded() {
        let m = mem();
        let mut t = Tables::new(&m);
        t.context(SourceId::new(0, 3, 0), 42, 3);
        let c = lookup(&m, t.root, SourceId::new(0, 3, 0), &Capabilities::default()).unwrap();
        assert_eq!(c.domain, 42);
        assert!(matches!(
            c.translation,
            Translation::Tables(PageTable { levels: 3, .. })
        ));
        assert!(!c.fpd);
    }

    #[test]
    fn not_present_root_entry_faults_with_reason_1() {
        let m = mem();
        let t = Tables::new(&m);
        let e = lookup(&m, t.root, SourceId::new(5, 0, 0), &Capabilities::default());
        assert_eq!(e.unwrap_err().reason, FaultReason::RootEntryNotPresent);
    }

    #[test]
    fn not_present_context_entry_faults_with_reason_2_and_honours_fpd() {
        let m = mem();
        let mut t = Tables::new(&m);
        let sid = SourceId::new(0, 4, 0);
        t.context(SourceId::new(0, 3, 0), 1, 3);
        t.write_context_raw(sid, CTX_LO_FPD, 0);
        let e = lookup(&m, t.root, sid, &Capabilities::default()).unwrap_err();
        assert_eq!(e.reason, FaultReason::ContextEntryNotPresent);
        assert!(e.fpd);
    }

    #[test]
    fn reserved_bits_fault_with_their_reasons() {
        let m = mem();
        let mut t = Tables::new(&m);
        let sid = SourceId::new(0, 3, 0);
        t.context(sid, 1, 3);
        let caps = Capabilities::default();
        let [lo, hi] = t.read_context_raw(sid);
        t.write_context_raw(sid, lo | 1 << 5, hi);
        assert_eq!(
            lookup(&m, t.root, sid, &caps).unwrap_err().reason,
            FaultReason::ContextEntryReserved
        );
        t.write_context_raw(sid, lo, hi | 1 << 40);
        assert_eq!(
            lookup(&m, t.root, sid, &caps).unwrap_err().reason,
            FaultReason::ContextEntryReserved
        );
        t.write_context_raw(sid, lo, hi);
        t.write_root_raw(0, t.read_root_raw(0) | 1 << 3);
        assert_eq!(
            lookup(&m, t.root, sid, &caps).unwrap_err().reason,
            FaultReason::RootEntryReserved
        );
    }

    #[test]
    fn unsupported_width_or_type_is_an_invalid_context() {
        let m = mem();
        let mut t = Tables::new(&m);
        let sid = SourceId::new(0, 3, 0);
        t.context(sid, 1, 4);
        let caps39 = Capabilities {
            aw_bits: 39,
            ..Capabilities::default()
        };
        assert_eq!(
            lookup(&m, t.root, sid, &caps39).unwrap_err().reason,
            FaultReason::ContextEntryInvalid
        );
        let [lo, hi] = t.read_context_raw(sid);
        t.write_context_raw(sid, lo | 0b11 << 2, hi);
        assert_eq!(
            lookup(&m, t.root, sid, &Capabilities::default())
                .unwrap_err()
                .reason,
            FaultReason::ContextEntryInvalid
        );
        t.write_context_raw(sid, lo | TT_DEVICE_TLB << 2, hi);
        assert_eq!(
            lookup(&m, t.root, sid, &Capabilities::default())
                .unwrap_err()
                .reason,
            FaultReason::ContextEntryInvalid,
            "device-TLB entries need ECAP.DT"
        );
    }

    #[test]
    fn pass_through_context_ignores_the_table_pointer() {
        let m = mem();
        let mut t = Tables::new(&m);
        let sid = SourceId::new(0, 3, 0);
        t.context(sid, 7, 4);
        t.write_context_raw(sid, u64::MAX << 52 | TT_PASS_THROUGH << 2 | 1, 2 | 7 << 8);
        let c = lookup(&m, t.root, sid, &Capabilities::default()).unwrap();
        assert_eq!(c.translation, Translation::PassThrough);
        let no_pt = Capabilities {
            pass_through: false,
            ..Capabilities::default()
        };
        assert_eq!(
            lookup(&m, t.root, sid, &no_pt).unwrap_err().reason,
            FaultReason::ContextEntryInvalid
        );
    }

    #[test]
    fn root_table_at_the_top_of_the_address_space_faults_without_wrapping() {
        let m = mem();
        let e = lookup(
            &m,
            !0xfff,
            SourceId::new(0xff, 0, 0),
            &Capabilities::default(),
        );
        assert_eq!(e.unwrap_err().reason, FaultReason::RootTableAccess);
    }

    #[test]
    fn root_table_outside_guest_memory_faults_with_reason_8() {
        let m = mem();
        let e = lookup(
            &m,
            1 << 40,
            SourceId::new(0, 0, 0),
            &Capabilities::default(),
        );
        assert_eq!(e.unwrap_err().reason, FaultReason::RootTableAccess);
    }
}
