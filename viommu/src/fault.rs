//! Primary fault logging (VT-d spec 7.2.1) into the fault recording registers (11.4.14).

use crate::regs::{
    FRCD_HI_F, FRCD_HI_FR_SHIFT, FRCD_HI_PP, FRCD_HI_PRIV, FRCD_HI_PV_MASK, FRCD_HI_PV_SHIFT,
    FRCD_HI_T,
};
use crate::SourceId;

/// Fault reasons (VT-d spec 7.1.3): the legacy-mode conditions (01h-0Ch), the interrupt-remapping
/// ones (20h-26h) and the scalable-mode ones (30h-90h; the spec names them SCT, SPD, SPT, SFS,
/// SSS and SGN).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FaultReason {
    /// The present bit of the root entry is clear.
    RootEntryNotPresent = 0x1,
    /// The present bit of the context entry is clear.
    ContextEntryNotPresent = 0x2,
    /// The context entry is programmed with an unsupported address width or translation type.
    ContextEntryInvalid = 0x3,
    /// The input address is beyond the address width of the context.
    AddressBeyondWidth = 0x4,
    /// A write to a page that is not present or not writable.
    WriteNotPermitted = 0x5,
    /// A read from a page that is not present or not readable.
    ReadNotPermitted = 0x6,
    /// A second-level paging entry could not be read.
    PagingEntryAccess = 0x7,
    /// The root table could not be read.
    RootTableAccess = 0x8,
    /// The context table could not be read.
    ContextTableAccess = 0x9,
    /// A reserved field of the root entry is set.
    RootEntryReserved = 0xa,
    /// A reserved field of the context entry is set.
    ContextEntryReserved = 0xb,
    /// A reserved field of a second-level paging entry is set.
    PagingEntryReserved = 0xc,
    // Interrupt-remapping fault conditions (7.1.3, reasons 20h-26h).
    /// A reserved field of a remappable interrupt request is set.
    IrRequestReserved = 0x20,
    /// The request's interrupt_index is beyond the table size IRTA gives.
    IrIndexBeyondTable = 0x21,
    /// The IRTE the request references is not present.
    IrEntryNotPresent = 0x22,
    /// The interrupt remapping table could not be read.
    IrTableAccess = 0x23,
    /// A reserved field of a present IRTE is set.
    IrEntryReserved = 0x24,
    /// A compatibility-format request arrived while they are blocked (CFIS clear, or x2APIC
    /// mode).
    IrCompatibilityBlocked = 0x25,
    /// The request's source id failed the IRTE's source validation.
    IrSourceIdMismatch = 0x26,
    // Scalable-mode fault conditions.
    /// A request with a PASID while the root table is a legacy one (TTM = 00b).
    PasidInLegacyMode = 0x31,
    /// The scalable-mode root table could not be read (SCT.2).
    SmRootTableAccess = 0x38,
    /// The lower or upper present bit of the root entry that the request uses is clear.
    SmRootEntryNotPresent = 0x39,
    /// A reserved field of the scalable-mode root entry is set.
    SmRootEntryReserved = 0x3a,
    /// The scalable-mode context table could not be read.
    SmContextTableAccess = 0x40,
    /// The present bit of the scalable-mode context entry is clear.
    SmContextEntryNotPresent = 0x41,
    /// A reserved field of the scalable-mode context entry is set (DTE and PRE among them, as
    /// the unit offers neither device TLBs nor page requests).
    SmContextEntryReserved = 0x42,
    /// A request with a PASID to a context entry whose PASID Enable (PASIDE) is clear.
    PasidNotEnabled = 0x45,
    /// The request's PASID is beyond the PASID directory the context entry's PDTS sizes.
    PasidBeyondDirectory = 0x46,
    /// The context entry's RID_PASID is beyond its PASID directory.
    RidPasidInvalid = 0x48,
    /// The PASID directory entry could not be read.
    PasidDirectoryAccess = 0x50,
    /// The present bit of the PASID directory entry is clear.
    PasidDirectoryEntryNotPresent = 0x51,
    /// A reserved field of the PASID directory entry is set.
    PasidDirectoryEntryReserved = 0x52,
    /// The PASID table entry could not be read.
    PasidTableAccess = 0x58,
    /// The present bit of the PASID table entry is clear.
    PasidEntryNotPresent = 0x59,
    /// A reserved field of the PASID table entry is set.
    PasidEntryReserved = 0x5a,
    /// The PASID table entry asks for what the unit does not offer: a PGTT it does not support
    /// (nested, or first-stage without ECAP.FLTS), a second-stage width outside SAGAW, a
    /// first-stage paging mode other than 4-level.
    PasidEntryInvalid = 0x5b,
    /// A supervisor request through a PASID entry whose SRE is clear.
    SupervisorRequestsDisabled = 0x5d,
    /// A first-stage paging entry below the top level could not be read (SFS.1).
    FirstStageEntryAccess = 0x70,
    /// The present bit of a first-stage paging entry is clear (SFS.2).
    FirstStageEntryNotPresent = 0x71,
    /// A reserved field of a present first-stage paging entry is set (SFS.3).
    FirstStageEntryReserved = 0x72,
    /// The top-level first-stage table the PASID entry's FSPTPTR names could not be read.
    FirstStageRootAccess = 0x73,
    /// A second-stage paging entry below the top level could not be read (SSS.1).
    SecondStageEntryAccess = 0x78,
    /// A second-stage paging entry with both R and W clear, i.e. not present (SSS.2).
    SecondStageEntryNotPresent = 0x79,
    /// A reserved field of a second-stage paging entry is set (SSS.3).
    SecondStageEntryReserved = 0x7a,
    /// The top-level second-stage table the PASID entry's SSPTPTR names could not be read.
    SecondStageRootAccess = 0x7b,
    /// A first-stage input address that is not canonical (SGN.1).
    NonCanonicalAddress = 0x80,
    /// A user request reached a page whose U/S is clear at some level (SGN.2).
    UserRequestToSupervisorPage = 0x81,
    /// A second-stage input address beyond the PASID entry's width or MGAW (SGN.4).
    SmAddressBeyondWidth = 0x83,
    /// A write to a page the translation does not make writable (SGN.6).
    SmWriteNotPermitted = 0x85,
    /// A read from a page the translation does not make readable (SGN.7).
    SmReadNotPermitted = 0x86,
    /// The translated address of a request with a PASID lies in the interrupt range
    /// 0xFEEx_xxxx (SGN.8).
    SmInterruptAddress = 0x87,
}

impl FaultReason {
    /// Is this an interrupt-remapping fault (whose fault info is an interrupt index)?
    pub fn is_interrupt_remapping(self) -> bool {
        (0x20..0x30).contains(&(self as u8))
    }

    /// Is this a scalable-mode fault condition?
    pub fn is_scalable_mode(self) -> bool {
        self as u8 >= 0x30
    }

    /// Does this fault say the guest misprogrammed a root, context or PASID structure (a
    /// reserved bit, an unsupported setting, a table outside its memory), rather than left an
    /// entry out or a page unmapped?
    pub fn is_table_error(self) -> bool {
        use FaultReason::*;
        matches!(
            self,
            ContextEntryInvalid
                | RootTableAccess
                | ContextTableAccess
                | RootEntryReserved
                | ContextEntryReserved
                | SmRootTableAccess
                | SmRootEntryReserved
                | SmContextTableAccess
                | SmContextEntryReserved
                | RidPasidInvalid
                | PasidDirectoryAccess
                | PasidDirectoryEntryReserved
                | PasidTableAccess
                | PasidEntryReserved
                | PasidEntryInvalid
        )
    }
}

/// The direction of a DMA request (shared with the host side, hence defined in `vm-device`).
pub use vm_device::dma::Access;

/// The PASID a DMA request carries (requests-with-PASID, scalable mode), and whether it asks for
/// supervisor privilege.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PasidTag {
    /// The process address space id: 20 bits are taken, the rest ignored.
    pub pasid: u32,
    /// Privileged-mode requested (a supervisor request).
    pub privileged: bool,
}

impl PasidTag {
    /// A user request with `pasid`.
    pub fn user(pasid: u32) -> Self {
        PasidTag {
            pasid,
            privileged: false,
        }
    }
}

/// A translation or interrupt-remapping fault, as it is written into a fault record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    pub source: SourceId,
    /// The fault info: the faulting address (page-aligned when recorded, per 11.4.14), or for
    /// an interrupt-remapping fault the interrupt index in bits 63:48.
    pub addr: u64,
    pub reason: FaultReason,
    pub access: Access,
    /// The PASID of a request that carried one (recorded with PP set). A request without one
    /// has none here even when scalable mode translated it through its RID_PASID.
    pub pasid: Option<PasidTag>,
}

impl Fault {
    /// A fault of a request without a PASID.
    pub fn new(source: SourceId, addr: u64, reason: FaultReason, access: Access) -> Self {
        Fault {
            source,
            addr,
            reason,
            access,
            pasid: None,
        }
    }

    /// An interrupt-remapping fault of the request from `source` referencing `index`.
    /// Interrupt requests are writes.
    pub fn interrupt(source: SourceId, index: u16, reason: FaultReason) -> Self {
        Fault::new(source, u64::from(index) << 48, reason, Access::Write)
    }
}

/// What happened to a fault handed to [`FaultLog::record`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordOutcome {
    /// Written into a fault record; the fault event must be signalled.
    Recorded,
    /// Dropped because the records are full; PFO is now set and the fault event must be signalled.
    Overflowed,
    /// Dropped because PFO was already set (7.2.1: no logging until software clears it).
    Dropped,
}

/// The fault recording registers and the state primary fault logging keeps about them.
#[derive(Debug)]
pub struct FaultLog {
    /// Each record as (low quadword, high quadword).
    records: Vec<[u64; 2]>,
    /// The record hardware writes next (it goes round the records).
    next: usize,
    /// FSTS.FRI (11.4.9.1): the record the first pending fault went to, latched when PPF went
    /// from clear to set; software starts reading there.
    first_pending: usize,
    /// Primary fault overflow.
    pfo: bool,
}

impl FaultLog {
    /// Creates a log with `count` fault recording registers (at least one).
    pub fn new(count: usize) -> Self {
        FaultLog {
            records: vec![[0; 2]; count.max(1)],
            next: 0,
            first_pending: 0,
            pfo: false,
        }
    }

    /// Number of fault recording registers.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Always false: there is at least one fault recording register.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Logs `fault` as 7.2.1 describes: into the next record unless that one is still pending.
    pub fn record(&mut self, fault: &Fault) -> RecordOutcome {
        if self.pfo {
            return RecordOutcome::Dropped;
        }
        let pending = self.ppf();
        let slot = &mut self.records[self.next];
        if slot[1] & FRCD_HI_F != 0 {
            self.pfo = true;
            return RecordOutcome::Overflowed;
        }
        let t = match fault.access {
            Access::Read => FRCD_HI_T,
            Access::Write => 0,
        };
        let pasid = fault.pasid.map_or(0, |p| {
            FRCD_HI_PP
                | (u64::from(p.pasid) << FRCD_HI_PV_SHIFT) & FRCD_HI_PV_MASK
                | if p.privileged { FRCD_HI_PRIV } else { 0 }
        });
        slot[0] = fault.addr & !0xfff;
        slot[1] = FRCD_HI_F
            | t
            | pasid
            | ((fault.reason as u64) << FRCD_HI_FR_SHIFT)
            | u64::from(fault.source.0);
        if !pending {
            self.first_pending = self.next;
        }
        self.next = (self.next + 1) % self.records.len();
        RecordOutcome::Recorded
    }

    /// Primary pending fault: some record has its F bit set.
    pub fn ppf(&self) -> bool {
        self.records.iter().any(|r| r[1] & FRCD_HI_F != 0)
    }

    pub fn pfo(&self) -> bool {
        self.pfo
    }

    pub fn clear_pfo(&mut self) {
        self.pfo = false;
    }

    /// FSTS.FRI: the record of the first pending fault (meaningful while PPF is set).
    pub fn fri(&self) -> usize {
        self.first_pending
    }

    /// Reads quadword `half` (0 low, 1 high) of record `index`.
    pub fn read(&self, index: usize, half: usize) -> u64 {
        self.records
            .get(index)
            .and_then(|r| r.get(half))
            .copied()
            .unwrap_or(0)
    }

    /// Writes quadword `half` of record `index`: only F is writable, and it is write-1-to-clear.
    pub fn write(&mut self, index: usize, half: usize, value: u64) {
        if half != 1 {
            return;
        }
        if let Some(r) = self.records.get_mut(index) {
            if value & FRCD_HI_F != 0 {
                r[1] &= !FRCD_HI_F;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fault(addr: u64) -> Fault {
        Fault::new(
            SourceId(0x0108),
            addr,
            FaultReason::WriteNotPermitted,
            Access::Write,
        )
    }

    #[test]
    fn record_encodes_source_reason_type_and_page_address() {
        let mut log = FaultLog::new(4);
        assert_eq!(log.record(&fault(0x1234_5678)), RecordOutcome::Recorded);
        assert_eq!(log.read(0, 0), 0x1234_5000);
        let hi = log.read(0, 1);
        assert_eq!(hi & 0xffff, 0x0108);
        assert_eq!((hi >> 32) & 0xff, 0x5);
        assert_eq!(hi & FRCD_HI_T, 0, "a write fault has T clear");
        assert!(hi & FRCD_HI_F != 0);
        assert!(log.ppf());
        assert_eq!(log.fri(), 0, "FRI names the record the fault went to");
    }

    #[test]
    fn fri_names_the_record_of_the_first_pending_fault_while_ppf_stays_set() {
        let mut log = FaultLog::new(4);
        log.record(&fault(0x1000));
        log.record(&fault(0x2000));
        assert_eq!(log.fri(), 0, "a second fault leaves FRI at the first");
        log.write(0, 1, FRCD_HI_F);
        log.write(1, 1, FRCD_HI_F);
        assert!(!log.ppf());
        // The next fault goes to record 2 and sets PPF again: FRI follows it.
        log.record(&fault(0x3000));
        assert_eq!((log.fri(), log.read(2, 0)), (2, 0x3000));
        // Going round: records 3 and 0, FRI still at 2.
        log.record(&fault(0x4000));
        log.record(&fault(0x5000));
        assert_eq!((log.fri(), log.read(0, 0)), (2, 0x5000));
    }

    #[test]
    fn a_request_with_a_pasid_records_pp_pv_and_priv() {
        let mut log = FaultLog::new(2);
        let f = Fault {
            pasid: Some(PasidTag {
                pasid: 0xa_bcde,
                privileged: true,
            }),
            reason: FaultReason::FirstStageEntryNotPresent,
            ..fault(0x7000)
        };
        log.record(&f);
        let hi = log.read(0, 1);
        assert!(hi & FRCD_HI_PP != 0);
        assert!(hi & FRCD_HI_PRIV != 0);
        assert_eq!((hi & FRCD_HI_PV_MASK) >> FRCD_HI_PV_SHIFT, 0xa_bcde);
        assert_eq!((hi >> FRCD_HI_FR_SHIFT) & 0xff, 0x71);
        // Without a PASID: PP, PV and PRIV clear.
        log.record(&fault(0x8000));
        assert_eq!(
            log.read(1, 1) & (FRCD_HI_PP | FRCD_HI_PV_MASK | FRCD_HI_PRIV),
            0
        );
    }

    #[test]
    fn only_20h_to_2fh_are_interrupt_remapping_reasons() {
        assert!(FaultReason::IrSourceIdMismatch.is_interrupt_remapping());
        assert!(!FaultReason::PasidEntryInvalid.is_interrupt_remapping());
        assert!(!FaultReason::ReadNotPermitted.is_interrupt_remapping());
        assert!(FaultReason::SmRootTableAccess.is_scalable_mode());
        assert!(!FaultReason::IrTableAccess.is_scalable_mode());
    }

    #[test]
    fn read_fault_sets_type_bit() {
        let mut log = FaultLog::new(1);
        let mut f = fault(0);
        f.access = Access::Read;
        log.record(&f);
        assert!(log.read(0, 1) & FRCD_HI_T != 0);
    }

    #[test]
    fn full_records_overflow_then_drop_until_pfo_cleared() {
        let mut log = FaultLog::new(2);
        assert_eq!(log.record(&fault(0x1000)), RecordOutcome::Recorded);
        assert_eq!(log.record(&fault(0x2000)), RecordOutcome::Recorded);
        assert_eq!(log.record(&fault(0x3000)), RecordOutcome::Overflowed);
        assert!(log.pfo());
        // Clearing a record is not enough: PFO blocks logging until software clears it.
        log.write(0, 1, FRCD_HI_F);
        assert_eq!(log.record(&fault(0x4000)), RecordOutcome::Dropped);
        log.clear_pfo();
        assert_eq!(log.record(&fault(0x4000)), RecordOutcome::Recorded);
        assert_eq!(log.read(0, 0), 0x4000);
    }

    #[test]
    fn f_bit_is_write_one_to_clear_and_other_bits_read_only() {
        let mut log = FaultLog::new(1);
        log.record(&fault(0x1000));
        log.write(0, 0, 0);
        assert_eq!(log.read(0, 0), 0x1000, "the low quadword is read-only");
        log.write(0, 1, 0);
        assert!(log.ppf(), "writing 0 leaves F set");
        log.write(0, 1, FRCD_HI_F);
        assert!(!log.ppf());
    }

    #[test]
    fn out_of_range_record_reads_zero_and_ignores_writes() {
        let mut log = FaultLog::new(1);
        assert_eq!(log.read(7, 1), 0);
        log.write(7, 1, u64::MAX);
        assert_eq!(log.read(0, 3), 0);
    }
}
