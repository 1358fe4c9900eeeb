//! Primary fault logging (VT-d spec 7.2.1) into the fault recording registers (11.4.14).

use crate::regs::{FRCD_HI_F, FRCD_HI_FR_SHIFT, FRCD_HI_T};
use crate::SourceId;

/// Legacy-mode fault reasons (VT-d spec 7.1.3, table "Unrecoverable fault conditions").
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
}

impl FaultReason {
    /// Is this an interrupt-remapping fault (whose fault info is an interrupt index)?
    pub fn is_interrupt_remapping(self) -> bool {
        self as u8 >= 0x20
    }
}

/// The direction of a DMA request (shared with the host side, hence defined in `vm-device`).
pub use vm_device::dma::Access;

/// A translation or interrupt-remapping fault, as it is written into a fault record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    pub source: SourceId,
    /// The fault info: the faulting address (page-aligned when recorded, per 11.4.14), or for
    /// an interrupt-remapping fault the interrupt index in bits 63:48.
    pub addr: u64,
    pub reason: FaultReason,
    pub access: Access,
}

impl Fault {
    /// An interrupt-remapping fault of the request from `source` referencing `index`.
    /// Interrupt requests are writes.
    pub fn interrupt(source: SourceId, index: u16, reason: FaultReason) -> Self {
        Fault {
            source,
            addr: u64::from(index) << 48,
            reason,
            access: Access::Write,
        }
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
    /// Fault record index: the record hardware writes next.
    fri: usize,
    /// Primary fault overflow.
    pfo: bool,
}

impl FaultLog {
    /// Creates a log with `count` fault recording registers (at least one).
    pub fn new(count: usize) -> Self {
        FaultLog {
            records: vec![[0; 2]; count.max(1)],
            fri: 0,
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

    /// Logs `fault` as 7.2.1 describes: into the record at FRI unless that one is still pending.
    pub fn record(&mut self, fault: &Fault) -> RecordOutcome {
        if self.pfo {
            return RecordOutcome::Dropped;
        }
        let slot = &mut self.records[self.fri];
        if slot[1] & FRCD_HI_F != 0 {
            self.pfo = true;
            return RecordOutcome::Overflowed;
        }
        let t = match fault.access {
            Access::Read => FRCD_HI_T,
            Access::Write => 0,
        };
        slot[0] = fault.addr & !0xfff;
        slot[1] =
            FRCD_HI_F | t | ((fault.reason as u64) << FRCD_HI_FR_SHIFT) | u64::from(fault.source.0);
        self.fri = (self.fri + 1) % self.records.len();
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

    pub fn fri(&self) -> usize {
        self.fri
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
        Fault {
            source: SourceId(0x0108),
            addr,
            reason: FaultReason::WriteNotPermitted,
            access: Access::Write,
        }
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
        assert_eq!(log.fri(), 1);
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
