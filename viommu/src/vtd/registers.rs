//! The register file of the remapping unit as one table (VT-d spec 11.4; section numbers of
//! revision 5.10).
//!
//! Each register is described once in [`REGISTERS`]: its offset and width, which of its bits are
//! read-only, read-write or write-1-to-clear (every other bit is reserved: it reads as zero and
//! writes to it are dropped), where its value lives ([`Storage`]) and what a write to it starts
//! ([`Effect`]). Everything else is derived from the table: which offsets hold registers (the
//! rest are reserved and read as zero), how 4-byte accesses reach the halves of 64-bit registers,
//! what reads return, what writes keep, and the image of the window a VMM publishes. Modelling a
//! new register is one entry here (its offset named in [`crate::regs`]), plus its [`Effect`] when
//! a write to it must act, or its [`Derived`] kind when the unit computes its value.

use crate::intremap::{IRTA_ADDR_MASK, IRTA_EIME, IRTA_S_MASK};
use crate::regs::*;

/// How wide a register is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Width {
    W32,
    W64,
}

impl Width {
    pub const fn bytes(self) -> u64 {
        match self {
            Width::W32 => 4,
            Width::W64 => 8,
        }
    }

    /// The bits a register of this width has.
    pub const fn mask(self) -> u64 {
        match self {
            Width::W32 => 0xffff_ffff,
            Width::W64 => u64::MAX,
        }
    }
}

/// Where a register's value lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Storage {
    /// In the register file: reads return what software wrote through the RW and RW1C bits and
    /// what the unit set in the RO ones; `reset` is the value at reset.
    Stored { reset: u64 },
    /// Nowhere: the register reads as zero and a write only starts its effect (GCMD).
    WriteOnly,
    /// Computed from the unit's state at each read; a write acts only through the effect.
    Derived(Derived),
}

/// Register values the unit computes from its state rather than keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Derived {
    /// CAP, from the configuration.
    Capability,
    /// ECAP, from the configuration.
    ExtendedCapability,
    /// FSTS: the queue errors, and FRI, PPF and PFO from the fault log.
    FaultStatus,
    /// IQH: the queue head, in register form (descriptor index in bits 18:4).
    QueueHead,
    /// Quadword `half` (0 low, 1 high) of a fault recording register.
    FaultRecord { half: usize },
    /// IQERCD: what the last queue errors recorded.
    QueueErrorRecord,
}

/// How many times a register repeats.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Instances {
    One,
    /// Once per fault recording register, every [`FRCD_REG_SIZE`] bytes from its offset: CAP.NFR
    /// of them hold records, the rest of the window up to [`MAX_FAULT_RECORDS`] reads as zero.
    PerFaultRecord,
}

/// What a write to a register starts, beyond updating its bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Effect {
    /// GCMD: translation and queue enables, the root table pointer, write-buffer flush.
    GlobalCommand,
    /// CCMD.ICC: a register-based context-cache invalidation.
    ContextInvalidation,
    /// IOTLB.IVT: a register-based IOTLB invalidation.
    IotlbInvalidation,
    /// FSTS: clearing an error retires the fault event; clearing IQE restarts the queue.
    FaultStatus,
    /// FECTL: unmasking delivers a pending fault event.
    FaultEventControl,
    /// FRCD.F: clearing a record's fault retires the fault event.
    FaultRecord,
    /// PMEN: the status bit follows the enable.
    ProtectedMemory,
    /// IQT: a new tail runs the queue.
    QueueTail,
    /// ICS.IWC: clearing it retires a pending completion interrupt.
    CompletionStatus,
    /// IECTL: unmasking delivers a pending completion interrupt.
    CompletionEventControl,
    /// IRTA: EIME is reserved without extended interrupt mode.
    InterruptTableAddress,
    /// RTADDR: TTM = 01b (scalable mode) is reserved without ECAP.SMTS.
    RootTableAddress,
    /// IQA: DW (256-bit descriptors) is reserved without ECAP.SMTS.
    QueueAddress,
}

/// One register, as the spec describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Register {
    pub name: &'static str,
    pub offset: u64,
    pub width: Width,
    /// Bits that read the unit's state and ignore writes.
    pub ro: u64,
    /// Bits software sets and clears.
    pub rw: u64,
    /// Bits software clears by writing 1 (writing 0 leaves them).
    pub rw1c: u64,
    pub storage: Storage,
    pub effect: Option<Effect>,
    pub instances: Instances,
}

impl Register {
    /// A register whose every bit is reserved, kept in the register file, reset to zero.
    const fn new(name: &'static str, offset: u64, width: Width) -> Self {
        Register {
            name,
            offset,
            width,
            ro: 0,
            rw: 0,
            rw1c: 0,
            storage: Storage::Stored { reset: 0 },
            effect: None,
            instances: Instances::One,
        }
    }

    const fn ro(mut self, bits: u64) -> Self {
        self.ro = bits;
        self
    }

    const fn rw(mut self, bits: u64) -> Self {
        self.rw = bits;
        self
    }

    const fn rw1c(mut self, bits: u64) -> Self {
        self.rw1c = bits;
        self
    }

    const fn reset(mut self, value: u64) -> Self {
        self.storage = Storage::Stored { reset: value };
        self
    }

    const fn write_only(mut self) -> Self {
        self.storage = Storage::WriteOnly;
        self
    }

    const fn derived(mut self, d: Derived) -> Self {
        self.storage = Storage::Derived(d);
        self
    }

    const fn effect(mut self, e: Effect) -> Self {
        self.effect = Some(e);
        self
    }

    const fn per_fault_record(mut self) -> Self {
        self.instances = Instances::PerFaultRecord;
        self
    }

    /// Bits that are neither read-only, read-write nor write-1-to-clear: they read as zero.
    pub const fn reserved(&self) -> u64 {
        self.width.mask() & !(self.ro | self.rw | self.rw1c)
    }

    /// Bits a write can change: the read-write and write-1-to-clear ones.
    pub const fn writable(&self) -> u64 {
        self.rw | self.rw1c
    }
}

use Width::{W32, W64};

/// `u32` register bits as a table mask.
const fn b(bits: u32) -> u64 {
    bits as u64
}

/// Every register of the window, in offset order.
pub const REGISTERS: &[Register] = &[
    // 11.4.1: major and minor version.
    Register::new("VER", VER_REG, W32)
        .ro(0xff)
        .reset(VER_VALUE as u64),
    // 11.4.2: what the configuration offers; every bit read-only.
    Register::new("CAP", CAP_REG, W64)
        .ro(u64::MAX)
        .derived(Derived::Capability),
    // 11.4.3
    Register::new("ECAP", ECAP_REG, W64)
        .ro(u64::MAX)
        .derived(Derived::ExtendedCapability),
    // 11.4.4.1: commands take effect at once and show in GSTS. IRE, SIRTP and CFI act only when
    // the unit offers interrupt remapping (ECAP.IR); otherwise they are ignored as reserved.
    Register::new("GCMD", GCMD_REG, W32)
        .rw(b(GCMD_TE
            | GCMD_SRTP
            | GCMD_SFL
            | GCMD_EAFL
            | GCMD_WBF
            | GCMD_QIE
            | GCMD_IRE
            | GCMD_SIRTP
            | GCMD_CFI))
        .write_only()
        .effect(Effect::GlobalCommand),
    // 11.4.4.2: set by the unit as it carries out GCMD.
    Register::new("GSTS", GSTS_REG, W32).ro(b(GSTS_TES
        | GSTS_RTPS
        | GSTS_FLS
        | GSTS_AFLS
        | GSTS_WBFS
        | GSTS_QIES
        | GSTS_IRES
        | GSTS_IRTPS
        | GSTS_CFIS)),
    // 11.4.5: latched by GCMD.SRTP. TTM bit 10 selects scalable mode where ECAP.SMTS allows it
    // (the effect clears it otherwise); bit 11 (abort-DMA mode, ECAP.ADMS) is reserved.
    Register::new("RTADDR", RTADDR_REG, W64)
        .rw(RTADDR_RTA_MASK | RTADDR_TTM_SCALABLE)
        .effect(Effect::RootTableAddress),
    // 11.4.6.1: the unit clears ICC and reports the granularity it used in CAIG.
    Register::new("CCMD", CCMD_REG, W64)
        .rw(CCMD_ICC | CCMD_CIRG_MASK | CCMD_FM_MASK | CCMD_SID_MASK | CCMD_DID_MASK)
        .ro(CCMD_CAIG_MASK)
        .effect(Effect::ContextInvalidation),
    // 11.4.7.1: PPF and FRI follow the fault records.
    Register::new("FSTS", FSTS_REG, W32)
        .ro(b(FSTS_PPF | FSTS_FRI_MASK))
        .rw1c(b(FSTS_RW1C))
        .derived(Derived::FaultStatus)
        .effect(Effect::FaultStatus),
    // 11.4.7.2: masked at reset; IP holds an event the mask kept back.
    Register::new("FECTL", FECTL_REG, W32)
        .rw(b(ECTL_IM))
        .ro(b(ECTL_IP))
        .reset(ECTL_IM as u64)
        .effect(Effect::FaultEventControl),
    // 11.4.7.3
    Register::new("FEDATA", FEDATA_REG, W32).rw(0xffff_ffff),
    // 11.4.7.4
    Register::new("FEADDR", FEADDR_REG, W32).rw(b(EADDR_MA_MASK)),
    // 11.4.7.5
    Register::new("FEUADDR", FEUADDR_REG, W32).rw(0xffff_ffff),
    // Revision 3.x, 10.4.15: the fault log's address; advanced fault logging is not offered.
    Register::new("AFLOG", AFLOG_REG, W64).rw(AFLOG_FLA_MASK),
    // 11.4.8.1: no protected regions are reported (CAP.PLMR/PHMR clear), so PRS just follows EPM.
    Register::new("PMEN", PMEN_REG, W32)
        .rw(b(PMEN_EPM))
        .ro(b(PMEN_PRS))
        .effect(Effect::ProtectedMemory),
    // 11.4.8.2 - 11.4.8.5
    Register::new("PLMBASE", PLMBASE_REG, W32).rw(0xffff_ffff),
    Register::new("PLMLIMIT", PLMLIMIT_REG, W32).rw(0xffff_ffff),
    Register::new("PHMBASE", PHMBASE_REG, W64).rw(u64::MAX),
    Register::new("PHMLIMIT", PHMLIMIT_REG, W64).rw(u64::MAX),
    // 11.4.9.1: advanced by the unit as it fetches descriptors.
    Register::new("IQH", IQH_REG, W64)
        .ro(IQ_INDEX_MASK)
        .derived(Derived::QueueHead),
    // 11.4.9.2: a write to the low half runs the queue up to the new tail.
    Register::new("IQT", IQT_REG, W64)
        .rw(IQ_INDEX_MASK)
        .effect(Effect::QueueTail),
    // 11.4.9.3: DW (256-bit descriptors) exists only with ECAP.SMTS (the effect clears it
    // otherwise).
    Register::new("IQA", IQA_REG, W64)
        .rw(IQA_IQA_MASK | IQA_DW | IQA_QS_MASK)
        .effect(Effect::QueueAddress),
    // 11.4.9.4
    Register::new("ICS", ICS_REG, W32)
        .rw1c(b(ICS_IWC))
        .effect(Effect::CompletionStatus),
    // 11.4.9.5: as FECTL, for invalidation completion.
    Register::new("IECTL", IECTL_REG, W32)
        .rw(b(ECTL_IM))
        .ro(b(ECTL_IP))
        .reset(ECTL_IM as u64)
        .effect(Effect::CompletionEventControl),
    // 11.4.9.6 - 11.4.9.8
    Register::new("IEDATA", IEDATA_REG, W32).rw(0xffff_ffff),
    Register::new("IEADDR", IEADDR_REG, W32).rw(b(EADDR_MA_MASK)),
    Register::new("IEUADDR", IEUADDR_REG, W32).rw(0xffff_ffff),
    // 11.4.9.9: written by the unit as it detects queue errors.
    Register::new("IQERCD", IQERCD_REG, W64)
        .ro(IQERCD_IQEI_MASK | IQERCD_ITESID_MASK | IQERCD_ICESID_MASK)
        .derived(Derived::QueueErrorRecord),
    // 11.4.10: latched by GCMD.SIRTP. EIME exists only with ECAP.EIM (the effect clears it
    // otherwise).
    Register::new("IRTA", IRTA_REG, W64)
        .rw(IRTA_ADDR_MASK | IRTA_EIME | IRTA_S_MASK)
        .effect(Effect::InterruptTableAddress),
    // 11.4.6.4: the page a page-selective IOTLB invalidation names.
    Register::new("IVA", IVA_REG, W64).rw(IVA_ADDR_MASK | IVA_IH | IVA_AM_MASK),
    // 11.4.6.3: the unit clears IVT and reports the granularity it used in IAIG.
    Register::new("IOTLB", IOTLB_REG, W64)
        .rw(IOTLB_IVT | IOTLB_IIRG_MASK | IOTLB_DR | IOTLB_DW | IOTLB_DID_MASK)
        .ro(IOTLB_IAIG_MASK)
        .effect(Effect::IotlbInvalidation),
    // 11.4.7.6: written by the unit as faults are logged; software clears F to free a record.
    Register::new("FRCD.LO", FRCD_REG_BASE, W64)
        .ro(FRCD_LO_FI_MASK)
        .derived(Derived::FaultRecord { half: 0 })
        .per_fault_record(),
    Register::new("FRCD.HI", FRCD_REG_BASE + 8, W64)
        .ro(FRCD_HI_T
            | FRCD_HI_AT_MASK
            | FRCD_HI_PV_MASK
            | FRCD_HI_FR_MASK
            | FRCD_HI_PP
            | FRCD_HI_PRIV
            | FRCD_HI_SID_MASK)
        .rw1c(FRCD_HI_F)
        .derived(Derived::FaultRecord { half: 1 })
        .effect(Effect::FaultRecord)
        .per_fault_record(),
];

/// Number of entries in [`REGISTERS`].
pub const REGISTER_COUNT: usize = REGISTERS.len();

/// 4-byte units of the window.
const DWORDS: usize = (REG_WINDOW_SIZE / 4) as usize;
/// Marks a 4-byte unit that holds no register.
const NONE: u8 = u8::MAX;

/// The table entry each 4-byte unit of the window belongs to, or [`NONE`]. Building it checks
/// the table: registers aligned to their width, inside the window, not overlapping, masks
/// disjoint and within the width, reset values within the defined bits.
static DWORD_SLOTS: [u8; DWORDS] = SLOTS;
const SLOTS: [u8; DWORDS] = dword_slots();

const fn dword_slots() -> [u8; DWORDS] {
    assert!(REGISTERS.len() < NONE as usize);
    let mut slots = [NONE; DWORDS];
    let mut i = 0;
    while i < REGISTERS.len() {
        let r = &REGISTERS[i];
        assert!(
            r.offset.is_multiple_of(r.width.bytes()),
            "misaligned register"
        );
        let m = r.width.mask();
        assert!(r.ro & r.rw == 0 && r.ro & r.rw1c == 0 && r.rw & r.rw1c == 0);
        assert!(
            (r.ro | r.rw | r.rw1c) & !m == 0,
            "mask wider than the register"
        );
        match r.storage {
            Storage::Stored { reset } => assert!(reset & r.reserved() == 0, "reserved bit set"),
            Storage::WriteOnly => assert!(r.ro == 0 && r.rw1c == 0, "write-only with status"),
            Storage::Derived(_) => {}
        }
        let count = match r.instances {
            Instances::One => 1,
            Instances::PerFaultRecord => {
                assert!(matches!(r.width, Width::W64), "fault records are quadwords");
                assert!(
                    matches!(r.storage, Storage::Derived(_)),
                    "fault records are state"
                );
                assert!(r.offset >= FRCD_REG_BASE && r.offset < FRCD_REG_BASE + FRCD_REG_SIZE);
                MAX_FAULT_RECORDS as u64
            }
        };
        let mut k = 0;
        while k < count {
            let offset = r.offset + k * FRCD_REG_SIZE;
            let mut d = offset / 4;
            while d < (offset + r.width.bytes()) / 4 {
                assert!(d < DWORDS as u64, "register beyond the window");
                assert!(slots[d as usize] == NONE, "overlapping registers");
                slots[d as usize] = i as u8;
                d += 1;
            }
            k += 1;
        }
        i += 1;
    }
    slots
}

/// Where an access lands in the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Location {
    pub register: &'static Register,
    /// Index of `register` in [`REGISTERS`].
    pub slot: usize,
    /// Which repetition of the register (the fault record); 0 for single registers.
    pub instance: usize,
    /// Offset of that repetition in the window.
    pub base: u64,
}

/// The register holding the 4-byte unit at `offset`, or None where the window is reserved.
pub fn locate(offset: u64) -> Option<Location> {
    let slot = usize::from(*DWORD_SLOTS.get(usize::try_from(offset / 4).ok()?)?);
    let register = REGISTERS.get(slot)?;
    let instance = match register.instances {
        Instances::One => 0,
        Instances::PerFaultRecord => ((offset - register.offset) / FRCD_REG_SIZE) as usize,
    };
    Some(Location {
        register,
        slot,
        instance,
        base: register.offset + instance as u64 * FRCD_REG_SIZE,
    })
}

/// Offsets of the 8-byte words holding single (not repeated) registers, in order. The register
/// file keeps the stored registers in these words, each at its place in its word, so a render
/// is a copy of them plus the derived values.
pub(super) const WORDS: [u64; WORD_COUNT] = words();
const WORD_COUNT: usize = count_words();

/// Does the 4-byte unit `d` hold a register that is not repeated?
const fn single(slots: &[u8; DWORDS], d: usize) -> bool {
    slots[d] != NONE && matches!(REGISTERS[slots[d] as usize].instances, Instances::One)
}

/// Does the 8-byte word `w` hold a single register?
const fn holds_single(slots: &[u8; DWORDS], w: usize) -> bool {
    single(slots, 2 * w) || single(slots, 2 * w + 1)
}

const fn count_words() -> usize {
    let slots = SLOTS;
    let mut n = 0;
    let mut w = 0;
    while w < DWORDS / 2 {
        if holds_single(&slots, w) {
            n += 1;
        }
        w += 1;
    }
    n
}

const fn words() -> [u64; WORD_COUNT] {
    let slots = SLOTS;
    let mut out = [0; WORD_COUNT];
    let mut n = 0;
    let mut w = 0;
    while w < DWORDS / 2 {
        if holds_single(&slots, w) {
            out[n] = w as u64 * 8;
            n += 1;
        }
        w += 1;
    }
    out
}

/// Where a single register's value sits in the register file's words.
#[derive(Clone, Copy, Debug)]
pub(super) struct Place {
    /// Index into [`WORDS`].
    pub word: usize,
    /// 0, or 32 for a 32-bit register in the upper half of its word.
    pub shift: u32,
    /// The register's bits (its width).
    pub mask: u64,
}

/// The place of each single register, indexed like [`REGISTERS`] (unused for repeated ones).
const PLACES: [Place; REGISTER_COUNT] = places();

const fn places() -> [Place; REGISTER_COUNT] {
    let mut out = [Place {
        word: 0,
        shift: 0,
        mask: 0,
    }; REGISTER_COUNT];
    let words = WORDS;
    let mut i = 0;
    while i < REGISTER_COUNT {
        let r = &REGISTERS[i];
        if let Instances::One = r.instances {
            let mut n = 0;
            while words[n] != r.offset & !7 {
                n += 1;
            }
            out[i] = Place {
                word: n,
                shift: ((r.offset & 7) * 8) as u32,
                mask: r.width.mask(),
            };
        }
        i += 1;
    }
    out
}

/// The single registers whose value is computed from the unit's state: where each goes in a
/// render, and how it is computed.
pub(super) const DERIVED: [(Place, Derived); DERIVED_COUNT] = derived();
const DERIVED_COUNT: usize = count_derived();

const fn count_derived() -> usize {
    let mut n = 0;
    let mut i = 0;
    while i < REGISTERS.len() {
        if let (Storage::Derived(_), Instances::One) =
            (REGISTERS[i].storage, REGISTERS[i].instances)
        {
            n += 1;
        }
        i += 1;
    }
    n
}

const fn derived() -> [(Place, Derived); DERIVED_COUNT] {
    let places = PLACES;
    let mut out = [(places[0], Derived::Capability); DERIVED_COUNT];
    let mut n = 0;
    let mut i = 0;
    while i < REGISTERS.len() {
        if let (Storage::Derived(d), Instances::One) =
            (REGISTERS[i].storage, REGISTERS[i].instances)
        {
            out[n] = (places[i], d);
            n += 1;
        }
        i += 1;
    }
    out
}

/// The quadwords of a fault recording register, as (offset of the first record's, half).
pub(super) const FAULT_RECORD_WORDS: [(u64, usize); FAULT_RECORD_WORD_COUNT] = fault_record_words();
const FAULT_RECORD_WORD_COUNT: usize = count_fault_record_words();

const fn count_fault_record_words() -> usize {
    let mut n = 0;
    let mut i = 0;
    while i < REGISTERS.len() {
        if matches!(REGISTERS[i].instances, Instances::PerFaultRecord) {
            n += 1;
        }
        i += 1;
    }
    n
}

const fn fault_record_words() -> [(u64, usize); FAULT_RECORD_WORD_COUNT] {
    let mut out = [(0, 0); FAULT_RECORD_WORD_COUNT];
    let mut n = 0;
    let mut i = 0;
    while i < REGISTERS.len() {
        let r = &REGISTERS[i];
        if let Instances::PerFaultRecord = r.instances {
            let Storage::Derived(Derived::FaultRecord { half }) = r.storage else {
                panic!("a register repeated per fault record is a fault record's quadword");
            };
            out[n] = (r.offset, half);
            n += 1;
        }
        i += 1;
    }
    out
}

/// The table index of the stored register at `offset`; fails to compile when there is none.
const fn stored_slot(offset: u64) -> usize {
    let slots = SLOTS;
    assert!(offset < REG_WINDOW_SIZE, "offset beyond the window");
    let slot = slots[(offset / 4) as usize];
    assert!(slot != NONE, "no register at this offset");
    let r = &REGISTERS[slot as usize];
    assert!(r.offset == offset, "not the start of a register");
    assert!(
        matches!(r.storage, Storage::Stored { .. }),
        "not a stored register"
    );
    slot as usize
}

/// The values of the stored registers, each at its place in the words of the window that hold
/// single registers ([`WORDS`]); the places of the others read zero here. The unit names a
/// register by its offset constant; an offset that is not a stored register's fails to compile
/// (when the unit is compiled for a memory type, as every test build does).
#[derive(Clone, Debug)]
pub(crate) struct RegisterFile {
    words: [u64; WORD_COUNT],
}

/// What a guest write brings to one register.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Write {
    /// Which repetition of the register (the fault record).
    pub instance: usize,
    /// The bits the access covered (one half of a 64-bit register for a 4-byte write).
    pub written: u64,
    /// The written value, limited to the covered RW and RW1C bits: what the write can act on.
    pub value: u64,
}

impl RegisterFile {
    /// Every stored register at its reset value.
    pub fn new() -> Self {
        let mut file = RegisterFile {
            words: [0; WORD_COUNT],
        };
        for (slot, r) in REGISTERS.iter().enumerate() {
            if let (Storage::Stored { reset }, Instances::One) = (r.storage, r.instances) {
                file.put(slot, reset);
            }
        }
        file
    }

    /// The value of the stored register at `OFFSET`.
    pub fn get<const OFFSET: u64>(&self) -> u64 {
        self.at(const { stored_slot(OFFSET) })
    }

    /// The value of the stored 32-bit register at `OFFSET`.
    pub fn get32<const OFFSET: u64>(&self) -> u32 {
        const { assert!(matches!(REGISTERS[stored_slot(OFFSET)].width, Width::W32)) };
        self.get::<OFFSET>() as u32
    }

    /// Sets the stored register at `OFFSET` as the unit does: reserved bits stay zero.
    pub fn set<const OFFSET: u64>(&mut self, value: u64) {
        self.put(const { stored_slot(OFFSET) }, value);
    }

    /// Sets `bits` of the stored register at `OFFSET`.
    pub fn set_bits<const OFFSET: u64>(&mut self, bits: impl Into<u64>) {
        let v = self.get::<OFFSET>() | bits.into();
        self.set::<OFFSET>(v);
    }

    /// Clears `bits` of the stored register at `OFFSET`.
    pub fn clear_bits<const OFFSET: u64>(&mut self, bits: impl Into<u64>) {
        let v = self.get::<OFFSET>() & !bits.into();
        self.set::<OFFSET>(v);
    }

    /// The words a render starts from: the stored registers in place, zero elsewhere.
    pub fn words(&self) -> [u64; WORD_COUNT] {
        self.words
    }

    /// The stored value of table entry `slot`.
    pub fn at(&self, slot: usize) -> u64 {
        let Some(p) = PLACES.get(slot) else {
            return 0;
        };
        self.words
            .get(p.word)
            .map_or(0, |w| (w >> p.shift) & p.mask)
    }

    /// Stores `value` (without its reserved bits) as table entry `slot`.
    fn put(&mut self, slot: usize, value: u64) {
        let (Some(p), Some(r)) = (PLACES.get(slot), REGISTERS.get(slot)) else {
            return;
        };
        if let Some(w) = self.words.get_mut(p.word) {
            *w = (*w & !(p.mask << p.shift)) | (value & !r.reserved()) << p.shift;
        }
    }

    /// Applies a guest write to table entry `slot`: RW bits take the written value, RW1C bits
    /// written as 1 clear, the rest stay.
    pub fn write(&mut self, slot: usize, w: &Write) {
        let Some(r) = REGISTERS.get(slot) else {
            return;
        };
        let old = self.at(slot);
        let new = ((old & !(r.rw & w.written)) | (w.value & r.rw)) & !(w.value & r.rw1c);
        self.put(slot, new);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_in_offset_order_and_counted() {
        assert_eq!(REGISTERS.len(), REGISTER_COUNT);
        assert!(REGISTERS.windows(2).all(|w| w[0].offset < w[1].offset));
    }

    #[test]
    fn every_register_is_located_from_each_of_its_4_byte_units() {
        for (slot, r) in REGISTERS.iter().enumerate() {
            for d in (0..r.width.bytes()).step_by(4) {
                let loc = locate(r.offset + d).expect("a register");
                assert_eq!((loc.slot, loc.instance, loc.base), (slot, 0, r.offset));
            }
        }
        let last = FRCD_REG_BASE + (MAX_FAULT_RECORDS as u64 - 1) * FRCD_REG_SIZE + 12;
        let loc = locate(last).expect("the last fault record");
        assert_eq!(loc.register.name, "FRCD.HI");
        assert_eq!(loc.instance, MAX_FAULT_RECORDS - 1);
        assert_eq!(loc.base, last - 4);
    }

    #[test]
    fn offsets_without_a_register_are_reserved() {
        for offset in [0x30, 0x48, 0x4c, 0x50, 0x54, 0x60, 0x98, 0xc0, 0x110, 0x1fc] {
            assert_eq!(locate(offset), None, "{offset:#x}");
        }
        assert_eq!(locate(REG_WINDOW_SIZE), None);
        assert_eq!(locate(u64::MAX), None);
        // 0xb0 holds IQERCD (11.4.9.9), read-only in both halves.
        for offset in [IQERCD_REG, IQERCD_REG + 4] {
            let loc = locate(offset).expect("IQERCD");
            assert_eq!(loc.register.name, "IQERCD");
            assert_eq!(loc.register.writable(), 0);
        }
    }

    #[test]
    fn every_single_register_has_its_own_place_in_the_words() {
        let mut places = Vec::new();
        for (slot, r) in REGISTERS.iter().enumerate() {
            if r.instances == Instances::One {
                let p = PLACES[slot];
                assert_eq!(
                    WORDS[p.word] + u64::from(p.shift / 8),
                    r.offset,
                    "{}",
                    r.name
                );
                places.push((p.word, p.shift));
            }
        }
        let n = places.len();
        places.sort_unstable();
        places.dedup();
        assert_eq!(places.len(), n, "two registers share a place");
        assert!(WORDS.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn a_write_keeps_ro_and_reserved_bits_sets_rw_and_clears_rw1c_written_as_one() {
        let mut file = RegisterFile::new();
        // FECTL: IM read-write, IP read-only.
        file.set::<FECTL_REG>(u64::from(ECTL_IM | ECTL_IP));
        let slot = locate(FECTL_REG).expect("FECTL").slot;
        file.write(
            slot,
            &Write {
                instance: 0,
                written: 0xffff_ffff,
                value: 0,
            },
        );
        assert_eq!(file.get32::<FECTL_REG>(), ECTL_IP);
        // ICS: IWC write-1-to-clear.
        file.set::<ICS_REG>(u64::from(ICS_IWC));
        let slot = locate(ICS_REG).expect("ICS").slot;
        let keep = Write {
            instance: 0,
            written: 0xffff_ffff,
            value: 0,
        };
        file.write(slot, &keep);
        assert_eq!(file.get32::<ICS_REG>(), ICS_IWC, "writing 0 leaves it");
        file.write(
            slot,
            &Write {
                value: u64::from(ICS_IWC),
                ..keep
            },
        );
        assert_eq!(file.get32::<ICS_REG>(), 0);
        // The unit itself cannot set reserved bits either.
        file.set::<FEADDR_REG>(u64::MAX);
        assert_eq!(file.get32::<FEADDR_REG>(), EADDR_MA_MASK);
    }
}
