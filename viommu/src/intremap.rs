//! Interrupt remapping (VT-d spec chapter 5; the IRTE format, 9.10; IRTA, 11.4.x).
//!
//! An interrupt request is an MSI write: 32-bit data to an address in the 0xFEEx_xxxx window. In
//! compatibility format (address bit 4 clear) the request names its destination and vector
//! itself; with interrupt remapping enabled such requests are blocked unless software allowed
//! them (GSTS.CFIS, and never in x2APIC mode). In remappable format (bit 4 set) the request only
//! names an entry of the interrupt remapping table (IRTE) in guest memory, and what that entry
//! says is delivered: a device cannot raise a vector, or reach a CPU, its entry does not allow.
//!
//! This module decodes requests and entries and turns a request into the interrupt to deliver
//! or the fault to report. It has no state of its own: the unit owns the latched table and the
//! enables, and the VMM owns the routes (see [`InterruptRoutes`]).

use vm_device::interrupt::{
    MsiMessage, MSI_ADDRESS_DEST_MODE_LOGICAL, MSI_ADDRESS_DEST_SHIFT, MSI_ADDRESS_EXT_DEST_SHIFT,
    MSI_ADDRESS_REDIRECTION_HINT, MSI_ADDRESS_WINDOW, MSI_DATA_DELIVERY_MODE_SHIFT,
    MSI_DATA_LEVEL_ASSERT, MSI_DATA_SUBHANDLE_MASK, MSI_DATA_TRIGGER_LEVEL,
};

use crate::fault::FaultReason;
use crate::memory::TableMemory;
use crate::SourceId;

// 11.4.x: interrupt remapping table address register.
/// Table address, bits 63:12.
pub const IRTA_ADDR_MASK: u64 = !0xfff;
/// Extended interrupt mode enable (x2APIC): 32-bit destination ids; needs ECAP.EIM.
pub const IRTA_EIME: u64 = 1 << 11;
/// Table size: 2^(S + 1) entries.
pub const IRTA_S_MASK: u64 = 0xf;

// 9.10: interrupt remapping table entry for remapped interrupts (IM = 0).
const IRTE_SIZE: u64 = 16;
const IRTE_LO_P: u64 = 1 << 0;
const IRTE_LO_FPD: u64 = 1 << 1;
const IRTE_LO_DM: u64 = 1 << 2;
const IRTE_LO_RH: u64 = 1 << 3;
const IRTE_LO_TM: u64 = 1 << 4;
const IRTE_LO_DLM_SHIFT: u32 = 5;
/// IRTE mode: set for posted interrupts, which need CAP.PI (not offered).
const IRTE_LO_IM: u64 = 1 << 15;
const IRTE_LO_VECTOR_SHIFT: u32 = 16;
const IRTE_LO_DST_SHIFT: u32 = 32;
/// Bits 14:12 and 31:24 are reserved (bits 11:8 are available to software).
const IRTE_LO_RSVD: u64 = 0x7000 | 0xff00_0000;
/// In xAPIC mode the destination is bits 47:40; bits 39:32 and 63:48 are reserved.
const IRTE_LO_RSVD_XAPIC: u64 = 0xff << 32 | 0xffff << 48;
const IRTE_HI_SID_MASK: u64 = 0xffff;
const IRTE_HI_SQ_SHIFT: u32 = 16;
const IRTE_HI_SVT_SHIFT: u32 = 18;
/// Bits 127:84.
const IRTE_HI_RSVD: u64 = !0xf_ffff;

// 9.10: source validation type.
const SVT_NONE: u64 = 0b00;
const SVT_REQUESTER_ID: u64 = 0b01;
const SVT_BUS_RANGE: u64 = 0b10;

/// The interrupt remapping table as the last SIRTP latched it from IRTA.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RemapTable {
    pub base: u64,
    /// Entries: 2^(S + 1), 2 to 65536.
    pub entries: u32,
    /// IRTA.EIME: destinations are 32-bit x2APIC ids; compatibility format is blocked.
    pub x2apic: bool,
}

impl RemapTable {
    /// Decodes IRTA. `eim` says whether the unit supports extended interrupt mode (ECAP.EIM):
    /// without it EIME is reserved and reads as zero.
    pub fn from_irta(irta: u64, eim: bool) -> Self {
        RemapTable {
            base: irta & IRTA_ADDR_MASK,
            entries: 2 << (irta & IRTA_S_MASK),
            x2apic: eim && irta & IRTA_EIME != 0,
        }
    }
}

/// What the unit's interrupt remapping is set to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RemapState {
    /// GSTS.IRES.
    pub enabled: bool,
    /// GSTS.CFIS: compatibility-format requests pass through (xAPIC mode only).
    pub compat_allowed: bool,
    /// The table latched by SIRTP, if any.
    pub table: Option<RemapTable>,
    /// A requester whose requests skip the IRTE's source validation ([`VtdConfig`]'s
    /// `unverified_source`).
    ///
    /// [`VtdConfig`]: crate::VtdConfig
    pub unverified_source: Option<SourceId>,
}

impl RemapState {
    /// Whether the requests of `source` are validated against their IRTE's SVT/SQ/SID (9.10):
    /// all but those of the unverified requester.
    pub fn verifies(&self, source: SourceId) -> bool {
        self.unverified_source != Some(source)
    }
}

/// The interrupt to deliver, as a remapped IRTE (or a passed compatibility request) names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Interrupt {
    pub vector: u8,
    /// APIC id (physical) or logical destination; 32 bits in x2APIC mode.
    pub dest: u32,
    pub logical: bool,
    pub redirection_hint: bool,
    pub level: bool,
    /// Delivery mode as the MSI data encodes it (0 fixed, 1 lowest priority, 2 SMI, 4 NMI,
    /// 5 INIT, 7 ExtINT).
    pub delivery_mode: u8,
}

impl Interrupt {
    /// The compatibility-format MSI that delivers this interrupt (destinations above 255 in
    /// address bits 63:40, see [`MSI_ADDRESS_EXT_DEST_SHIFT`]).
    pub fn to_msi(&self) -> MsiMessage {
        let mut address = MSI_ADDRESS_WINDOW
            | u64::from(self.dest & 0xff) << MSI_ADDRESS_DEST_SHIFT
            | u64::from(self.dest & !0xff) << MSI_ADDRESS_EXT_DEST_SHIFT;
        if self.redirection_hint {
            address |= MSI_ADDRESS_REDIRECTION_HINT;
        }
        if self.logical {
            address |= MSI_ADDRESS_DEST_MODE_LOGICAL;
        }
        let mut data =
            u32::from(self.vector) | u32::from(self.delivery_mode) << MSI_DATA_DELIVERY_MODE_SHIFT;
        if self.level {
            data |= MSI_DATA_TRIGGER_LEVEL | MSI_DATA_LEVEL_ASSERT;
        }
        MsiMessage { address, data }
    }
}

/// Why an interrupt request was blocked: the fault to record (7.1.3 table, reasons 0x20-0x26).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RemapFault {
    pub reason: FaultReason,
    /// The interrupt_index the request referenced (recorded in FI bits 63:48; zero for a
    /// compatibility-format request).
    pub index: u16,
    /// The IRTE was read and has FPD set: the fault is not recorded.
    pub fpd: bool,
}

impl RemapFault {
    fn new(reason: FaultReason, index: u32) -> Self {
        RemapFault {
            reason,
            index: index as u16,
            fpd: false,
        }
    }
}

/// A decoded, valid, present IRTE: what the interrupt-entry cache holds (6.2.x).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Irte {
    interrupt: Interrupt,
    sid: u16,
    sq: u8,
    svt: u64,
    /// Fault processing disable: a source-id mismatch through this entry is not recorded.
    fpd: bool,
}

/// Decodes the IRTE `[lo, hi]`; `Err(fpd)` when it is not present (reason 0x22) and
/// `Err` with reason 0x24 when a reserved field is set.
fn decode_irte(lo: u64, hi: u64, x2apic: bool, index: u32) -> Result<Irte, RemapFault> {
    let fpd = lo & IRTE_LO_FPD != 0;
    let fault = |reason| RemapFault {
        fpd,
        ..RemapFault::new(reason, index)
    };
    if lo & IRTE_LO_P == 0 {
        return Err(fault(FaultReason::IrEntryNotPresent));
    }
    let svt = (hi >> IRTE_HI_SVT_SHIFT) & 0b11;
    let delivery_mode = ((lo >> IRTE_LO_DLM_SHIFT) & 0b111) as u8;
    let dest_rsvd = if x2apic { 0 } else { IRTE_LO_RSVD_XAPIC };
    let reserved = lo & (IRTE_LO_RSVD | IRTE_LO_IM | dest_rsvd) != 0
        || hi & IRTE_HI_RSVD != 0
        || svt == 0b11
        // Delivery modes 011b and 110b are reserved encodings.
        || matches!(delivery_mode, 0b011 | 0b110);
    if reserved {
        return Err(fault(FaultReason::IrEntryReserved));
    }
    let dst = (lo >> IRTE_LO_DST_SHIFT) as u32;
    Ok(Irte {
        interrupt: Interrupt {
            vector: (lo >> IRTE_LO_VECTOR_SHIFT) as u8,
            dest: if x2apic { dst } else { (dst >> 8) & 0xff },
            logical: lo & IRTE_LO_DM != 0,
            redirection_hint: lo & IRTE_LO_RH != 0,
            level: lo & IRTE_LO_TM != 0,
            delivery_mode,
        },
        sid: (hi & IRTE_HI_SID_MASK) as u16,
        sq: ((hi >> IRTE_HI_SQ_SHIFT) & 0b11) as u8,
        svt,
        fpd,
    })
}

impl Irte {
    /// Source validation (9.10, SVT/SQ/SID): may `source` use this entry?
    fn allows(&self, source: SourceId) -> bool {
        match self.svt {
            SVT_NONE => true,
            SVT_REQUESTER_ID => {
                // SQ says how many function bits to ignore: none, bit 2, bits 2:1, bits 2:0.
                let ignored: u16 = match self.sq {
                    0 => 0,
                    1 => 0b100,
                    2 => 0b110,
                    _ => 0b111,
                };
                source.0 | ignored == self.sid | ignored
            }
            SVT_BUS_RANGE => {
                let (first, last) = ((self.sid >> 8) as u8, self.sid as u8);
                (first..=last).contains(&source.bus())
            }
            _ => false,
        }
    }

    /// What a request from `source` referencing this entry (at `index`) delivers; `verify`:
    /// whether the unit validates the request's source (see [`RemapState::verifies`]).
    pub fn deliver(
        &self,
        source: SourceId,
        index: u32,
        verify: bool,
    ) -> Result<MsiMessage, RemapFault> {
        if verify && !self.allows(source) {
            return Err(RemapFault {
                fpd: self.fpd,
                ..RemapFault::new(FaultReason::IrSourceIdMismatch, index)
            });
        }
        Ok(self.interrupt.to_msi())
    }
}

/// What an interrupt request needs under the unit's remapping state (5.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    /// Delivered as it is: remapping is off, or a compatibility-format request it allows.
    Pass(MsiMessage),
    /// Remapped through the entry `index` of `table`.
    Remap { table: RemapTable, index: u32 },
}

/// Decides what the request `msg` needs under `state`, before any table is read: the faults
/// found here concern the request itself, not an entry.
pub fn classify(state: &RemapState, msg: MsiMessage) -> Result<Request, RemapFault> {
    if !state.enabled {
        return Ok(Request::Pass(msg));
    }
    if !msg.is_remappable() {
        let x2apic = state.table.is_some_and(|t| t.x2apic);
        if !state.compat_allowed || x2apic {
            return Err(RemapFault::new(FaultReason::IrCompatibilityBlocked, 0));
        }
        return Ok(Request::Pass(msg));
    }
    let index = msg.interrupt_index();
    if msg.data & !MSI_DATA_SUBHANDLE_MASK != 0 || msg.address >> 32 != 0 {
        return Err(RemapFault::new(FaultReason::IrRequestReserved, index));
    }
    // IRE can only be set once a table pointer was latched; a unit without one behaves as if
    // the table were empty.
    let Some(table) = state.table else {
        return Err(RemapFault::new(FaultReason::IrIndexBeyondTable, index));
    };
    if index >= table.entries {
        return Err(RemapFault::new(FaultReason::IrIndexBeyondTable, index));
    }
    Ok(Request::Remap { table, index })
}

/// Reads and decodes the entry `index` (within the table) of `table`.
pub fn read_entry<M: TableMemory>(
    mem: &M,
    table: &RemapTable,
    index: u32,
) -> Result<Irte, RemapFault> {
    let entry = table
        .base
        .checked_add(u64::from(index) * IRTE_SIZE)
        .and_then(|addr| {
            let lo = mem.read_u64(addr)?;
            let hi = mem.read_u64(addr.checked_add(8)?)?;
            Some((lo, hi))
        });
    let Some((lo, hi)) = entry else {
        return Err(RemapFault::new(FaultReason::IrTableAccess, index));
    };
    decode_irte(lo, hi, table.x2apic, index)
}

/// Translates the interrupt request `msg` from `source` under `state`: the interrupt to deliver,
/// or the fault that blocks it. Reads the IRTE from `mem`; records nothing.
pub fn translate<M: TableMemory>(
    mem: &M,
    state: &RemapState,
    source: SourceId,
    msg: MsiMessage,
) -> Result<MsiMessage, RemapFault> {
    match classify(state, msg)? {
        Request::Pass(msg) => Ok(msg),
        Request::Remap { table, index } => {
            read_entry(mem, &table, index)?.deliver(source, index, state.verifies(source))
        }
    }
}

/// Which cached interrupt remappings an interrupt-entry-cache invalidation drops (6.5.2.7).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IecScope {
    /// Every entry (and compatibility-format decisions, which depend on no entry).
    Global,
    /// The 2^`mask` entries from `index` aligned down to that size.
    Index { index: u16, mask: u8 },
}

impl IecScope {
    /// Does the invalidation cover what the request `msg` was translated through?
    pub fn covers(&self, msg: &MsiMessage) -> bool {
        match *self {
            IecScope::Global => true,
            IecScope::Index { .. } => {
                msg.is_remappable() && self.covers_index(msg.interrupt_index())
            }
        }
    }

    /// Does the invalidation cover the entry at `index`?
    pub fn covers_index(&self, entry: u32) -> bool {
        match *self {
            IecScope::Global => true,
            IecScope::Index { index, mask } => {
                let size = 1u32 << mask.min(16);
                let first = u32::from(index) & !(size - 1);
                (first..first + size).contains(&entry)
            }
        }
    }

    /// Is the index-selective invalidation's index aligned to its mask (6.5.2.7: IIDX names
    /// 2^IM entries and its low IM bits must be zero)?
    pub fn aligned(&self) -> bool {
        match *self {
            IecScope::Global => true,
            IecScope::Index { index, mask } => u32::from(index) & ((1u32 << mask.min(16)) - 1) == 0,
        }
    }

    /// The smallest scope covering both.
    pub fn merge(self, other: IecScope) -> IecScope {
        match (self, other) {
            (a, b) if a == b => a,
            _ => IecScope::Global,
        }
    }
}

/// A translation without side effects, as [`InterruptRoutes::retranslate`] is given it.
pub type Translate<'a> = dyn FnMut(SourceId, MsiMessage) -> Result<MsiMessage, RemapFault> + 'a;

/// Holders of translated interrupt routes (a VMM's KVM GSI routes, which deliver a device's
/// MSIs without a trip to user space). The unit calls `retranslate` whenever what a request
/// means may have changed in a way software made visible: an interrupt-entry-cache invalidation
/// (before the wait descriptor that follows it completes), a new table pointer, or interrupt
/// remapping or compatibility format turned on or off. Like a hardware interrupt-entry cache,
/// a route is not refreshed when software changes an IRTE without invalidating it.
pub trait InterruptRoutes: Send {
    /// Re-translates every route `scope` covers with `translate`. A route whose translation
    /// now faults must stop delivering (the request is blocked); the holder decides how the
    /// fault gets recorded when the device next raises it (e.g. through
    /// [`crate::Vtd::remap_interrupt`] from a user-space path).
    fn retranslate(&mut self, scope: IecScope, translate: &mut Translate<'_>);
}

#[cfg(test)]
mod tests;
