//! Scalable-mode translation structures (VT-d spec 3.4.3, 9.2 and 9.4-9.6): the scalable-mode
//! root table, 256-bit context entries, PASID directories and 512-bit PASID table entries.
//!
//! A request is looked up as the spec walks it: the root entry of its bus (its lower half for
//! devfn 0-127, upper half for 128-255), the context entry of its devfn, then the PASID it
//! carries, or the context's RID_PASID when it carries none, indexes the PASID directory (PASID
//! bits 19:6) and the PASID table (bits 5:0). The PASID table entry names the domain and the
//! translation: first-stage, second-stage or pass-through (PGTT). Each step checks what the
//! spec makes reserved for the capabilities the unit reports, and fails with its own
//! scalable-mode fault reason; FPD in the context, directory and PASID entries suppresses the
//! recording of the faults found past them (even when their present bit is clear), except
//! failures to read a table.

use crate::memory::TableMemory;

use crate::fault::{FaultReason, PasidTag};
use crate::first_stage::FirstStageTable;
use crate::regs::PASID_BITS;
use crate::tables::{beyond_haw_mask, Context, LookupFault, Translation};
use crate::walk::PageTable;
use crate::{Capabilities, SourceId};

// 9.2: scalable-mode root entry: two halves, each a present bit and a context table pointer.
const ROOT_ENTRY_SIZE: u64 = 16;
const ROOT_P: u64 = 1 << 0;
const ROOT_RSVD: u64 = 0xffe;

// 9.4: scalable-mode context entry (256 bits; 128 entries a table).
const CONTEXT_ENTRY_SIZE: u64 = 32;
const CTX_P: u64 = 1 << 0;
const CTX_FPD: u64 = 1 << 1;
/// Device-TLB enable: reserved without ECAP.DT.
const CTX_DTE: u64 = 1 << 2;
/// PASID enable: requests with a PASID are allowed (reserved without ECAP.PASID).
const CTX_PASIDE: u64 = 1 << 3;
/// Page request enable: reserved without ECAP.PRS, which the unit does not report.
const CTX_PRE: u64 = 1 << 4;
const CTX_LO_RSVD: u64 = 0x1e0;
/// PASID directory table size (11:9): 2^(PDTS + 7) directory entries.
const CTX_PDTS_SHIFT: u64 = 9;
const CTX_RID_PASID_MASK: u64 = 0xf_ffff;
/// RID_PRIV (bit 84): reserved without ECAP.RPRIVS; bits 127:85 reserved.
const CTX_HI_RSVD: u64 = !CTX_RID_PASID_MASK;

// 9.5: PASID directory entry.
const PDE_SIZE: u64 = 8;
const PDE_P: u64 = 1 << 0;
const PDE_FPD: u64 = 1 << 1;
const PDE_RSVD: u64 = 0xffc;
/// PASIDs one PASID table holds (its 64 entries of 512 bits fill a page).
pub const PASIDS_PER_TABLE: u32 = 64;

// 9.6: PASID table entry, quadword 0.
const PASID_ENTRY_SIZE: u64 = 64;
const PE_P: u64 = 1 << 0;
const PE_FPD: u64 = 1 << 1;
/// Second-stage address width (4:2): 001b 39-bit (3 levels), 010b 48-bit (4 levels).
const PE_AW_SHIFT: u64 = 2;
const PE_AW_MASK: u64 = 0b111 << PE_AW_SHIFT;
/// PASID granular translation type (8:6).
const PE_PGTT_SHIFT: u64 = 6;
const PE_PGTT_MASK: u64 = 0b111 << PE_PGTT_SHIFT;
/// Second-stage accessed/dirty enable: reserved without ECAP.SSADS.
const PE_SSADE: u64 = 1 << 9;
/// Bit 5 and bits 11:10.
const PE_QW0_RSVD: u64 = 1 << 5 | 0b11 << 10;
// Quadword 1.
const PE_DID_MASK: u64 = 0xffff;
/// Page-walk snoop (bit 87): allowed with ECAP.SMPWC.
const PE_PWSNP: u64 = 1 << 23;
// Quadword 2.
/// Supervisor requests enable (bit 128): allowed with ECAP.SRS.
const PE_SRE: u64 = 1 << 0;
/// First-stage paging mode (131:130): 00b 4-level.
const PE_FSPM_SHIFT: u64 = 2;
const PE_FSPM_MASK: u64 = 0b11 << PE_FSPM_SHIFT;
/// Write protect enable (bit 132).
const PE_WPE: u64 = 1 << 4;
/// NXE and SMEP (bits 134:133): ignored, as the spec now says for compatibility with software
/// that still sets them (Linux 6.4 to 6.10 set NXE).
const PE_QW2_IGNORED: u64 = 0b11 << 5;
/// Extended accessed flag enable (bit 135): reserved without ECAP.EAFS.
const PE_EAFE: u64 = 1 << 7;
/// Bit 129 (ERE in older revisions) and bits 139:136.
const PE_QW2_RSVD: u64 = 1 << 1 | 0xf << 8;

/// PGTT values (9.6).
const PGTT_FIRST_STAGE: u64 = 0b001;
const PGTT_SECOND_STAGE: u64 = 0b010;
/// Nested (first-stage over second-stage): not offered.
#[cfg(test)]
const PGTT_NESTED: u64 = 0b011;
const PGTT_PASS_THROUGH: u64 = 0b100;
/// FSPM 00b: 4-level first-stage paging.
const FSPM_4_LEVEL: u64 = 0b00;

/// A present, valid scalable-mode context entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScalableContext {
    /// Address of the PASID directory.
    pub pasid_dir: u64,
    /// PASIDs the directory covers: 64 for each of its 2^(PDTS + 7) entries.
    pub pasid_limit: u32,
    /// The PASID of requests without one.
    pub rid_pasid: u32,
    /// PASIDE: requests with a PASID are allowed.
    pub pasid_enable: bool,
    /// DTE: translation requests and translated requests (ATS) are allowed.
    pub device_tlb: bool,
    pub fpd: bool,
}

/// A present, valid PASID table entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PasidEntry {
    pub domain: u16,
    pub translation: Translation,
    /// SRE: supervisor requests are allowed, whatever the translation type.
    pub supervisor: bool,
    /// FPD of the context, the directory entry or this entry.
    pub fpd: bool,
}

fn read_words<M: TableMemory, const N: usize>(mem: &M, addr: u64) -> Option<[u64; N]> {
    let mut words = [0u64; N];
    for (i, w) in words.iter_mut().enumerate() {
        let a = addr.checked_add(i as u64 * 8)?;
        *w = mem.read_u64(a)?;
    }
    Some(words)
}

/// Looks up the scalable-mode context entry of `source` under the root table at `root_table`.
pub fn lookup_context<M: TableMemory>(
    mem: &M,
    root_table: u64,
    source: SourceId,
    caps: &Capabilities,
) -> Result<ScalableContext, LookupFault> {
    let upper = source.devfn() >= 0x80;
    let half_addr = root_table
        .checked_add(u64::from(source.bus()) * ROOT_ENTRY_SIZE + if upper { 8 } else { 0 });
    let [half] = half_addr
        .and_then(|a| read_words(mem, a))
        .ok_or(LookupFault::new(FaultReason::SmRootTableAccess))?;
    if half & ROOT_P == 0 {
        return Err(LookupFault::new(FaultReason::SmRootEntryNotPresent));
    }
    if half & (ROOT_RSVD | beyond_haw_mask(caps.haw)) != 0 {
        return Err(LookupFault::new(FaultReason::SmRootEntryReserved));
    }
    let [lo, hi, w2, w3] = (half & !0xfff)
        .checked_add(u64::from(source.devfn() & 0x7f) * CONTEXT_ENTRY_SIZE)
        .and_then(|a| read_words(mem, a))
        .ok_or(LookupFault::new(FaultReason::SmContextTableAccess))?;
    let fpd = lo & CTX_FPD != 0;
    let fault = |reason| LookupFault { reason, fpd };
    if lo & CTX_P == 0 {
        return Err(fault(FaultReason::SmContextEntryNotPresent));
    }
    let mut lo_rsvd = CTX_LO_RSVD | CTX_PRE | beyond_haw_mask(caps.haw);
    if !caps.device_iotlb {
        lo_rsvd |= CTX_DTE;
    }
    if !caps.pasid {
        lo_rsvd |= CTX_PASIDE;
    }
    if lo & lo_rsvd != 0 || hi & CTX_HI_RSVD != 0 || w2 != 0 || w3 != 0 {
        return Err(fault(FaultReason::SmContextEntryReserved));
    }
    let dir_entries = 1u32 << (((lo >> CTX_PDTS_SHIFT) & 0b111) + 7);
    Ok(ScalableContext {
        pasid_dir: lo & !0xfff,
        pasid_limit: dir_entries * PASIDS_PER_TABLE,
        rid_pasid: (hi & CTX_RID_PASID_MASK) as u32,
        pasid_enable: lo & CTX_PASIDE != 0,
        device_tlb: lo & CTX_DTE != 0,
        fpd,
    })
}

/// Looks up the PASID table entry of `pasid` (which the caller checked against the context's
/// limit) through the directory of `ctx`.
pub fn lookup_pasid<M: TableMemory>(
    mem: &M,
    ctx: &ScalableContext,
    pasid: u32,
    caps: &Capabilities,
) -> Result<PasidEntry, LookupFault> {
    let [pde] = ctx
        .pasid_dir
        .checked_add(u64::from(pasid / PASIDS_PER_TABLE) * PDE_SIZE)
        .and_then(|a| read_words(mem, a))
        .ok_or(LookupFault::new(FaultReason::PasidDirectoryAccess))?;
    let mut fpd = ctx.fpd || pde & PDE_FPD != 0;
    if pde & PDE_P == 0 {
        return Err(LookupFault {
            reason: FaultReason::PasidDirectoryEntryNotPresent,
            fpd,
        });
    }
    if pde & (PDE_RSVD | beyond_haw_mask(caps.haw)) != 0 {
        return Err(LookupFault {
            reason: FaultReason::PasidDirectoryEntryReserved,
            fpd,
        });
    }
    let qw: [u64; 8] = (pde & !0xfff)
        .checked_add(u64::from(pasid % PASIDS_PER_TABLE) * PASID_ENTRY_SIZE)
        .and_then(|a| read_words(mem, a))
        .ok_or(LookupFault::new(FaultReason::PasidTableAccess))?;
    fpd |= qw[0] & PE_FPD != 0;
    let fault = |reason| LookupFault { reason, fpd };
    if qw[0] & PE_P == 0 {
        return Err(fault(FaultReason::PasidEntryNotPresent));
    }
    if pasid_entry_reserved(&qw, caps) {
        return Err(fault(FaultReason::PasidEntryReserved));
    }
    let domain = (qw[1] & PE_DID_MASK) as u16;
    let translation = match (qw[0] & PE_PGTT_MASK) >> PE_PGTT_SHIFT {
        PGTT_SECOND_STAGE => {
            let levels = match (qw[0] & PE_AW_MASK) >> PE_AW_SHIFT {
                1 if caps.supports_levels(3) => 3,
                2 if caps.supports_levels(4) => 4,
                _ => return Err(fault(FaultReason::PasidEntryInvalid)),
            };
            Translation::Tables(PageTable {
                root: qw[0] & !0xfff,
                levels,
            })
        }
        PGTT_FIRST_STAGE if caps.first_stage => {
            if (qw[2] & PE_FSPM_MASK) >> PE_FSPM_SHIFT != FSPM_4_LEVEL {
                return Err(fault(FaultReason::PasidEntryInvalid));
            }
            Translation::FirstStage(FirstStageTable {
                root: qw[2] & !0xfff,
                supervisor: qw[2] & PE_SRE != 0,
                write_protect: qw[2] & PE_WPE != 0,
            })
        }
        PGTT_PASS_THROUGH if caps.pass_through => Translation::PassThrough,
        // Nested translation (PGTT_NESTED) is not offered (ECAP.NEST clear), nor first-stage
        // without FLTS, nor pass-through without PT; 000b and 101b-111b are reserved encodings.
        _ => return Err(fault(FaultReason::PasidEntryInvalid)),
    };
    Ok(PasidEntry {
        domain,
        translation,
        supervisor: qw[2] & PE_SRE != 0,
        fpd,
    })
}

/// Does the PASID entry `qw` set a bit the spec reserves for the unit's capabilities?
fn pasid_entry_reserved(qw: &[u64; 8], caps: &Capabilities) -> bool {
    let haw = beyond_haw_mask(caps.haw);
    // The pointers' bits above HAW stay reserved even where the translation type leaves the
    // pointer unused.
    let rsvd0 = PE_QW0_RSVD | PE_SSADE | haw;
    let allowed1 = PE_DID_MASK | if caps.page_walk_snoop { PE_PWSNP } else { 0 };
    let mut rsvd2 = PE_QW2_RSVD | PE_EAFE | haw;
    if !caps.supervisor_requests {
        rsvd2 |= PE_SRE;
    }
    qw[0] & rsvd0 != 0
        || qw[1] & !allowed1 != 0
        || qw[2] & rsvd2 & !PE_QW2_IGNORED != 0
        || qw[3..].iter().any(|&w| w != 0)
}

/// The PASID a request with `pasid` (None: a request without one, which uses the context's
/// RID_PASID) looks up under the context entry `ctx`, or the fault that blocks it.
pub fn select_pasid(ctx: &ScalableContext, pasid: Option<PasidTag>) -> Result<u32, LookupFault> {
    let fault = |reason| LookupFault {
        reason,
        fpd: ctx.fpd,
    };
    match pasid {
        Some(tag) => {
            if !ctx.pasid_enable {
                return Err(fault(FaultReason::PasidNotEnabled));
            }
            let p = tag.pasid & ((1 << PASID_BITS) - 1);
            if p >= ctx.pasid_limit {
                return Err(fault(FaultReason::PasidBeyondDirectory));
            }
            Ok(p)
        }
        None if ctx.rid_pasid >= ctx.pasid_limit => Err(fault(FaultReason::RidPasidInvalid)),
        None => Ok(ctx.rid_pasid),
    }
}

/// What a request translates through once its PASID entry `entry` (of PASID `pasid`, under the
/// context entry `ctx`) is found: a supervisor request needs SRE in the entry.
pub fn context_of(
    ctx: &ScalableContext,
    entry: &PasidEntry,
    pasid: u32,
    privileged: bool,
) -> Result<Context, LookupFault> {
    if privileged && !entry.supervisor {
        return Err(LookupFault {
            reason: FaultReason::SupervisorRequestsDisabled,
            fpd: entry.fpd,
        });
    }
    Ok(Context {
        domain: entry.domain,
        translation: entry.translation,
        fpd: entry.fpd,
        pasid: Some(pasid),
        device_tlb: ctx.device_tlb,
    })
}

/// Looks up what a request from `source` with `pasid` (None: a request without a PASID, which
/// uses the context's RID_PASID and is a user request) translates through, under the
/// scalable-mode root table at `root_table`. A supervisor request needs SRE in the PASID entry.
pub fn lookup<M: TableMemory>(
    mem: &M,
    root_table: u64,
    source: SourceId,
    pasid: Option<PasidTag>,
    caps: &Capabilities,
) -> Result<Context, LookupFault> {
    let ctx = lookup_context(mem, root_table, source, caps)?;
    let p = select_pasid(&ctx, pasid)?;
    let entry = lookup_pasid(mem, &ctx, p, caps)?;
    context_of(&ctx, &entry, p, pasid.is_some_and(|t| t.privileged))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{mem, Mem, ScalableTables};

    const DEV: SourceId = SourceId(0x0018);
    /// A function in the upper half of its bus's root entry (devfn 0x88: device 17).
    const HIGH: SourceId = SourceId(0x0188);

    fn caps() -> Capabilities {
        Capabilities {
            scalable: true,
            first_stage: true,
            first_stage_1g: true,
            pasid: true,
            supervisor_requests: true,
            page_walk_snoop: true,
            ..Capabilities::default()
        }
    }

    fn reason(r: Result<Context, LookupFault>) -> FaultReason {
        r.expect_err("a fault").reason
    }

    fn setup(m: &Mem) -> (ScalableTables, PageTable) {
        let mut t = ScalableTables::new(m);
        let pt = t.attach_second_stage(DEV, 7, 4);
        (t, pt)
    }

    #[test]
    fn a_request_without_pasid_uses_rid_pasid_and_its_second_stage_table() {
        let m = mem();
        let (t, pt) = setup(&m);
        let c = lookup(&m, t.root, DEV, None, &caps()).unwrap();
        assert_eq!(c.domain, 7);
        assert_eq!(c.translation, Translation::Tables(pt));
        assert_eq!(c.pasid, Some(0));
        assert!(!c.fpd);
    }

    #[test]
    fn devfns_above_127_use_the_upper_half_of_the_root_entry() {
        let m = mem();
        let (mut t, _) = setup(&m);
        assert_eq!(
            reason(lookup(&m, t.root, HIGH, None, &caps())),
            FaultReason::SmRootEntryNotPresent,
            "only the lower half is present"
        );
        let pt = t.attach_second_stage(HIGH, 9, 3);
        let c = lookup(&m, t.root, HIGH, None, &caps()).unwrap();
        assert_eq!((c.domain, c.translation), (9, Translation::Tables(pt)));
        assert_eq!(t.root_half_addr(HIGH), t.root + 16 + 8);
    }

    #[test]
    fn each_translation_type_decodes_and_nested_or_unoffered_ones_are_invalid() {
        let m = mem();
        let (mut t, _) = setup(&m);
        t.pass_through(DEV, 0, 1);
        assert_eq!(
            lookup(&m, t.root, DEV, None, &caps()).unwrap().translation,
            Translation::PassThrough
        );
        let fs = t.first_stage_table();
        t.first_stage(DEV, 0, 3, fs);
        assert_eq!(
            lookup(&m, t.root, DEV, None, &caps()).unwrap().translation,
            Translation::FirstStage(fs)
        );
        let no_flts = Capabilities {
            first_stage: false,
            ..caps()
        };
        assert_eq!(
            reason(lookup(&m, t.root, DEV, None, &no_flts)),
            FaultReason::PasidEntryInvalid,
            "first-stage without ECAP.FLTS"
        );
        let mut qw = t.read_pasid_raw(DEV, 0);
        for pgtt in [0b000, PGTT_NESTED, 0b101, 0b110, 0b111] {
            qw[0] = (qw[0] & !PE_PGTT_MASK) | pgtt << PE_PGTT_SHIFT;
            t.write_pasid_raw(DEV, 0, qw);
            assert_eq!(
                reason(lookup(&m, t.root, DEV, None, &caps())),
                FaultReason::PasidEntryInvalid,
                "PGTT {pgtt:03b}"
            );
        }
        // 5-level first-stage paging is not offered.
        t.first_stage(DEV, 0, 3, fs);
        let mut qw = t.read_pasid_raw(DEV, 0);
        qw[2] |= 1 << PE_FSPM_SHIFT;
        t.write_pasid_raw(DEV, 0, qw);
        assert_eq!(
            reason(lookup(&m, t.root, DEV, None, &caps())),
            FaultReason::PasidEntryInvalid
        );
    }

    #[test]
    fn second_stage_widths_outside_sagaw_are_invalid() {
        let m = mem();
        let (t, _) = setup(&m);
        let aw39 = Capabilities {
            aw_bits: 39,
            ..caps()
        };
        assert_eq!(
            reason(lookup(&m, t.root, DEV, None, &aw39)),
            FaultReason::PasidEntryInvalid,
            "a 4-level table on a 39-bit unit"
        );
    }

    #[test]
    fn not_present_entries_fault_with_their_reasons_and_fpd_suppresses_past_the_root() {
        let m = mem();
        let mut t = ScalableTables::new(&m);
        assert_eq!(
            reason(lookup(&m, t.root, DEV, None, &caps())),
            FaultReason::SmRootEntryNotPresent
        );
        t.write_context_raw(DEV, [CTX_FPD, 0, 0, 0]);
        let e = lookup(&m, t.root, DEV, None, &caps()).unwrap_err();
        assert_eq!(e.reason, FaultReason::SmContextEntryNotPresent);
        assert!(e.fpd, "FPD counts even when P is clear");
        t.context(DEV, 2, 0, false);
        let e = lookup(&m, t.root, DEV, None, &caps()).unwrap_err();
        assert_eq!(e.reason, FaultReason::PasidDirectoryEntryNotPresent);
        assert!(!e.fpd);
        let pde = t.pasid_dir_entry_addr(DEV, 0);
        t.write_u64(pde, PDE_FPD);
        assert!(lookup(&m, t.root, DEV, None, &caps()).unwrap_err().fpd);
        t.write_u64(pde, 0);
        t.write_pasid_raw(DEV, 0, [PE_FPD, 0, 0, 0, 0, 0, 0, 0]);
        let e = lookup(&m, t.root, DEV, None, &caps()).unwrap_err();
        assert_eq!(e.reason, FaultReason::PasidEntryNotPresent);
        assert!(e.fpd);
    }

    #[test]
    fn reserved_bits_of_each_structure_fault_with_their_reasons() {
        let m = mem();
        let (mut t, _) = setup(&m);
        let half = t.root_half_addr(DEV);
        let good_root = t.read_u64(half);
        t.write_u64(half, good_root | 1 << 5);
        assert_eq!(
            reason(lookup(&m, t.root, DEV, None, &caps())),
            FaultReason::SmRootEntryReserved
        );
        t.write_u64(half, good_root);
        let ctx = t.read_context_raw(DEV);
        let no_pasid = Capabilities {
            pasid: false,
            ..caps()
        };
        for (words, c) in [
            ([ctx[0] | 1 << 6, ctx[1], 0, 0], caps()),
            ([ctx[0] | CTX_PRE, ctx[1], 0, 0], caps()),
            ([ctx[0] | CTX_DTE, ctx[1], 0, 0], caps()),
            ([ctx[0], ctx[1] | 1 << 20, 0, 0], caps()),
            ([ctx[0], ctx[1], 0, 1], caps()),
            ([ctx[0] | CTX_PASIDE, ctx[1], 0, 0], no_pasid),
        ] {
            t.write_context_raw(DEV, words);
            assert_eq!(
                reason(lookup(&m, t.root, DEV, None, &c)),
                FaultReason::SmContextEntryReserved,
                "{words:x?}"
            );
        }
        t.write_context_raw(DEV, ctx);
        let pde = t.pasid_dir_entry_addr(DEV, 0);
        let good_pde = t.read_u64(pde);
        t.write_u64(pde, good_pde | 1 << 4);
        assert_eq!(
            reason(lookup(&m, t.root, DEV, None, &caps())),
            FaultReason::PasidDirectoryEntryReserved
        );
        t.write_u64(pde, good_pde);
        let qw = t.read_pasid_raw(DEV, 0);
        let no_smpwc = Capabilities {
            page_walk_snoop: false,
            ..caps()
        };
        let no_srs = Capabilities {
            supervisor_requests: false,
            ..caps()
        };
        let mut cases = vec![];
        for (word, bit, c) in [
            (0, PE_SSADE, caps()),
            (0, 1 << 5, caps()),
            (1, 1 << 24, caps()),
            (1, 1 << 40, caps()),
            (1, PE_PWSNP, no_smpwc),
            (2, PE_EAFE, caps()),
            (2, 1 << 1, caps()),
            (2, PE_SRE, no_srs),
            (3, 1, caps()),
            (7, 1 << 63, caps()),
        ] {
            let mut bad = qw;
            bad[word] |= bit;
            cases.push((bad, c));
        }
        for (bad, c) in cases {
            t.write_pasid_raw(DEV, 0, bad);
            assert_eq!(
                reason(lookup(&m, t.root, DEV, None, &c)),
                FaultReason::PasidEntryReserved,
                "{bad:x?}"
            );
        }
        // NXE and SMEP are ignored.
        let mut ignored = qw;
        ignored[2] |= PE_QW2_IGNORED;
        t.write_pasid_raw(DEV, 0, ignored);
        assert!(lookup(&m, t.root, DEV, None, &caps()).is_ok());
    }

    #[test]
    fn requests_with_a_pasid_need_paside_and_a_pasid_within_the_directory() {
        let m = mem();
        let mut t = ScalableTables::new(&m);
        t.context(DEV, 0, 0, false);
        assert_eq!(
            reason(lookup(&m, t.root, DEV, Some(PasidTag::user(5)), &caps())),
            FaultReason::PasidNotEnabled
        );
        // PDTS 0: 128 directory entries, PASIDs 0 to 8191.
        t.context(DEV, 0, 0, true);
        let pt = t.pages().page_table(3);
        t.second_stage(DEV, 8191, 4, pt);
        let c = lookup(&m, t.root, DEV, Some(PasidTag::user(8191)), &caps()).unwrap();
        assert_eq!((c.domain, c.pasid), (4, Some(8191)));
        assert_eq!(
            reason(lookup(&m, t.root, DEV, Some(PasidTag::user(8192)), &caps())),
            FaultReason::PasidBeyondDirectory
        );
        // A supervisor request needs SRE, whatever the translation type.
        let sup = PasidTag {
            pasid: 8191,
            privileged: true,
        };
        assert_eq!(
            reason(lookup(&m, t.root, DEV, Some(sup), &caps())),
            FaultReason::SupervisorRequestsDisabled
        );
        let mut qw = t.read_pasid_raw(DEV, 8191);
        qw[2] |= PE_SRE;
        t.write_pasid_raw(DEV, 8191, qw);
        assert!(lookup(&m, t.root, DEV, Some(sup), &caps()).is_ok());
        // RID_PASID beyond the directory.
        let [lo, _, _, _] = t.read_context_raw(DEV);
        t.write_context_raw(DEV, [lo, 8192, 0, 0]);
        assert_eq!(
            reason(lookup(&m, t.root, DEV, None, &caps())),
            FaultReason::RidPasidInvalid
        );
    }

    #[test]
    fn unreadable_tables_fault_with_their_access_reasons_unsuppressed() {
        let m = mem();
        assert_eq!(
            reason(lookup(&m, 1 << 40, DEV, None, &caps())),
            FaultReason::SmRootTableAccess
        );
        assert_eq!(
            reason(lookup(&m, !0xfff, SourceId(0xffff), None, &caps())),
            FaultReason::SmRootTableAccess,
            "no wrap at the top of the address space"
        );
        let mut t = ScalableTables::new(&m);
        let half = t.root_half_addr(DEV);
        t.write_u64(half, (1 << 40) | 1);
        assert_eq!(
            reason(lookup(&m, t.root, DEV, None, &caps())),
            FaultReason::SmContextTableAccess
        );
        t.write_u64(half, 0);
        t.context(DEV, 2, 0, false);
        let ctx = t.read_context_raw(DEV);
        t.write_context_raw(DEV, [(ctx[0] & 0xfff) | 1 << 40 | CTX_FPD, 0, 0, 0]);
        let e = lookup(&m, t.root, DEV, None, &caps()).unwrap_err();
        assert_eq!(e.reason, FaultReason::PasidDirectoryAccess);
        assert!(!e.fpd, "access faults are not qualified");
        t.write_context_raw(DEV, ctx);
        let pde = t.pasid_dir_entry_addr(DEV, 0);
        t.write_u64(pde, (1 << 40) | 1);
        assert_eq!(
            reason(lookup(&m, t.root, DEV, None, &caps())),
            FaultReason::PasidTableAccess
        );
    }
}
