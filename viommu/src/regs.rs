//! Register map and bit definitions of the remapping hardware unit.
//!
//! Offsets and fields follow the Intel VT-d specification (section numbers are those of revision
//! 5.10), chapter 11.4 ("Register Descriptions"), legacy and scalable mode alike. How
//! each register behaves (its read-only, read-write and write-1-to-clear bits, its reset value,
//! what a write starts) is described once, in [`crate::registers::REGISTERS`].

/// Size of the MMIO window the register block occupies (one 4 KiB page).
pub const REG_WINDOW_SIZE: u64 = 0x1000;
/// The window in 8-byte words, the unit of [`crate::Vtd::register_image`].
pub const REG_IMAGE_WORDS: usize = (REG_WINDOW_SIZE / 8) as usize;

// 11.4: register offsets.
/// Version register (32-bit), 11.4.1.
pub const VER_REG: u64 = 0x00;
/// Capability register (64-bit), 11.4.2.
pub const CAP_REG: u64 = 0x08;
/// Extended capability register (64-bit), 11.4.3.
pub const ECAP_REG: u64 = 0x10;
/// Global command register (32-bit, write-only), 11.4.4.1.
pub const GCMD_REG: u64 = 0x18;
/// Global status register (32-bit, read-only), 11.4.4.2.
pub const GSTS_REG: u64 = 0x1c;
/// Root table address register (64-bit), 11.4.5.
pub const RTADDR_REG: u64 = 0x20;
/// Context command register (64-bit), 11.4.6.1.
pub const CCMD_REG: u64 = 0x28;
/// Fault status register (32-bit), 11.4.7.1.
pub const FSTS_REG: u64 = 0x34;
/// Fault event control register (32-bit), 11.4.7.2.
pub const FECTL_REG: u64 = 0x38;
/// Fault event data register (32-bit), 11.4.7.3.
pub const FEDATA_REG: u64 = 0x3c;
/// Fault event address register (32-bit), 11.4.7.4.
pub const FEADDR_REG: u64 = 0x40;
/// Fault event upper address register (32-bit), 11.4.7.5.
pub const FEUADDR_REG: u64 = 0x44;
/// Advanced fault log register (64-bit): described by revisions up to 3.x (10.4.15), gone from
/// 5.10, where the offset is reserved. Kept as a plain register for drivers that still write it.
pub const AFLOG_REG: u64 = 0x58;
/// Protected memory enable register (32-bit), 11.4.8.1.
pub const PMEN_REG: u64 = 0x64;
/// Protected low-memory base register (32-bit), 11.4.8.2.
pub const PLMBASE_REG: u64 = 0x68;
/// Protected low-memory limit register (32-bit), 11.4.8.3.
pub const PLMLIMIT_REG: u64 = 0x6c;
/// Protected high-memory base register (64-bit), 11.4.8.4.
pub const PHMBASE_REG: u64 = 0x70;
/// Protected high-memory limit register (64-bit), 11.4.8.5.
pub const PHMLIMIT_REG: u64 = 0x78;
/// Invalidation queue head register (64-bit, read-only), 11.4.9.1.
pub const IQH_REG: u64 = 0x80;
/// Invalidation queue tail register (64-bit), 11.4.9.2.
pub const IQT_REG: u64 = 0x88;
/// Invalidation queue address register (64-bit), 11.4.9.3.
pub const IQA_REG: u64 = 0x90;
/// Invalidation completion status register (32-bit), 11.4.9.4.
pub const ICS_REG: u64 = 0x9c;
/// Invalidation event control register (32-bit), 11.4.9.5.
pub const IECTL_REG: u64 = 0xa0;
/// Invalidation event data register (32-bit), 11.4.9.6.
pub const IEDATA_REG: u64 = 0xa4;
/// Invalidation event address register (32-bit), 11.4.9.7.
pub const IEADDR_REG: u64 = 0xa8;
/// Invalidation event upper address register (32-bit), 11.4.9.8.
pub const IEUADDR_REG: u64 = 0xac;
/// Invalidation queue error record register (64-bit, read-only), 11.4.9.9.
pub const IQERCD_REG: u64 = 0xb0;
/// Interrupt remapping table address register (64-bit), 11.4.10.
pub const IRTA_REG: u64 = 0xb8;

/// Offset of the IOTLB register pair (IVA at +0, IOTLB at +8), advertised through ECAP.IRO.
pub const IOTLB_REG_BASE: u64 = 0x100;
/// Invalidate address register (64-bit), 11.4.6.4.
pub const IVA_REG: u64 = IOTLB_REG_BASE;
/// IOTLB invalidate register (64-bit), 11.4.6.3.
pub const IOTLB_REG: u64 = IOTLB_REG_BASE + 8;
/// Offset of the first fault recording register, advertised through CAP.FRO.
pub const FRCD_REG_BASE: u64 = 0x200;
/// Size of one fault recording register (128-bit), 11.4.7.6.
pub const FRCD_REG_SIZE: u64 = 16;
/// Most fault recording registers the window above FRCD_REG_BASE leaves room for.
pub const MAX_FAULT_RECORDS: usize = ((REG_WINDOW_SIZE - FRCD_REG_BASE) / FRCD_REG_SIZE) as usize;

/// 11.4.1: version 1.0 (major in bits 7:4, minor in 3:0).
pub const VER_VALUE: u32 = 0x10;

// 11.4.2: capability register fields.
/// Number of domains supported: 6 means 2^16 domain ids.
pub const CAP_ND_16BIT: u64 = 6;
/// Required write-buffer flushing.
pub const CAP_RWBF: u64 = 1 << 4;
/// Caching mode: not-present and erroneous entries may be cached, so software invalidates on
/// every change, which is what lets a VMM shadow the guest's tables.
pub const CAP_CM: u64 = 1 << 7;
pub const CAP_SAGAW_SHIFT: u64 = 8;
/// SAGAW bit 1: 39-bit AGAW, 3-level second-level tables.
pub const CAP_SAGAW_39: u64 = 1 << (CAP_SAGAW_SHIFT + 1);
/// SAGAW bit 2: 48-bit AGAW, 4-level second-level tables.
pub const CAP_SAGAW_48: u64 = 1 << (CAP_SAGAW_SHIFT + 2);
pub const CAP_MGAW_SHIFT: u64 = 16;
pub const CAP_FRO_SHIFT: u64 = 24;
/// Second-level large page support: bit 34 is 2 MiB, bit 35 is 1 GiB.
pub const CAP_SLLPS_2M: u64 = 1 << 34;
pub const CAP_SLLPS_1G: u64 = 1 << 35;
/// Page-selective invalidation supported.
pub const CAP_PSI: u64 = 1 << 39;
pub const CAP_NFR_SHIFT: u64 = 40;
pub const CAP_MAMV_SHIFT: u64 = 48;
/// Write draining and read draining.
pub const CAP_DWD: u64 = 1 << 54;
pub const CAP_DRD: u64 = 1 << 55;
/// Enhanced set-root-table-pointer support: SRTP also invalidates all translation caches.
pub const CAP_ESRTPS: u64 = 1 << 63;
/// Enhanced set-interrupt-root-table-pointer support: SIRTP also invalidates the interrupt
/// entry cache.
pub const CAP_ESIRTPS: u64 = 1 << 62;
/// Maximum address mask value for page-selective invalidation (QEMU uses 18 too).
pub const MAMV: u64 = 18;
/// First-stage 1 GiB page support (scalable mode).
pub const CAP_FL1GP: u64 = 1 << 56;
/// First-stage 5-level paging support: not offered (first-stage tables are 4-level).
pub const CAP_FL5LP: u64 = 1 << 60;

// 11.4.3: extended capability register fields.
/// Page-walk coherency: the unit snoops the caches when it reads the tables, so software need
/// not flush them after each update. The model reads guest memory directly, so it is coherent.
pub const ECAP_C: u64 = 1 << 0;
/// Queued invalidation support.
pub const ECAP_QI: u64 = 1 << 1;
/// Device-TLB support (ATS).
pub const ECAP_DT: u64 = 1 << 2;
/// Pass-through context entries supported.
pub const ECAP_PT: u64 = 1 << 6;
/// Interrupt remapping support.
pub const ECAP_IR: u64 = 1 << 3;
/// Extended interrupt mode (x2APIC, 32-bit destination ids in IRTEs).
pub const ECAP_EIM: u64 = 1 << 4;
pub const ECAP_IRO_SHIFT: u64 = 8;
/// Snoop control (not offered: the PGSNP field of PASID entries is reserved).
pub const ECAP_SC: u64 = 1 << 7;
/// Page request support (not offered: no PRI, so PRE in context entries is reserved).
pub const ECAP_PRS: u64 = 1 << 29;
/// Supervisor request support: first-stage translation checks the privilege of requests that
/// carry one, as the SRE and WPE fields of the PASID entry say.
pub const ECAP_SRS: u64 = 1 << 31;
/// Extended accessed flag support (not offered: EAFE in PASID entries is reserved).
pub const ECAP_EAFS: u64 = 1 << 34;
/// PASID size supported (39:35): the unit takes PASIDs of PSS + 1 bits.
pub const ECAP_PSS_SHIFT: u64 = 35;
/// Requests with a PASID are supported.
pub const ECAP_PASID: u64 = 1 << 40;
/// Scalable-mode translation support (RTADDR.TTM = 01b, 256-bit descriptors).
pub const ECAP_SMTS: u64 = 1 << 43;
/// Second-stage accessed/dirty support (not offered: SSADE in PASID entries is reserved).
pub const ECAP_SSADS: u64 = 1 << 45;
/// Second-stage translation support in scalable mode (PASID entries with PGTT = 010b).
pub const ECAP_SLTS: u64 = 1 << 46;
/// First-stage translation support (PASID entries with PGTT = 001b).
pub const ECAP_FLTS: u64 = 1 << 47;
/// Scalable-mode page-walk coherency: walks snoop when a PASID entry's PWSNP is set (the model
/// reads guest memory directly, so every walk is coherent).
pub const ECAP_SMPWC: u64 = 1 << 48;
/// RID_PRIV support (not offered: requests without a PASID are user requests).
pub const ECAP_RPRIVS: u64 = 1 << 53;
/// Widest PASID the unit takes (20 bits, PSS = 19).
pub const PASID_BITS: u32 = 20;

// 11.4.4.1 / 11.4.4.2: global command and status bits (same positions in both registers).
/// Translation enable / status.
pub const GCMD_TE: u32 = 1 << 31;
pub const GSTS_TES: u32 = 1 << 31;
/// Set root table pointer / root table pointer status.
pub const GCMD_SRTP: u32 = 1 << 30;
pub const GSTS_RTPS: u32 = 1 << 30;
/// Set fault log / status.
pub const GCMD_SFL: u32 = 1 << 29;
pub const GSTS_FLS: u32 = 1 << 29;
/// Enable advanced fault logging / status.
pub const GCMD_EAFL: u32 = 1 << 28;
pub const GSTS_AFLS: u32 = 1 << 28;
/// Write buffer flush / status.
pub const GCMD_WBF: u32 = 1 << 27;
pub const GSTS_WBFS: u32 = 1 << 27;
/// Queued invalidation enable / status.
pub const GCMD_QIE: u32 = 1 << 26;
pub const GSTS_QIES: u32 = 1 << 26;
/// Interrupt remapping enable / status (reserved here: no IR support yet).
pub const GCMD_IRE: u32 = 1 << 25;
pub const GSTS_IRES: u32 = 1 << 25;
/// Set interrupt remap table pointer / status (reserved here: no IR support yet).
pub const GCMD_SIRTP: u32 = 1 << 24;
pub const GSTS_IRTPS: u32 = 1 << 24;
/// Compatibility format interrupt / status (reserved here: no IR support yet).
pub const GCMD_CFI: u32 = 1 << 23;
pub const GSTS_CFIS: u32 = 1 << 23;

// 11.4.5: root table address register.
/// Translation table mode (bits 11:10): 00b legacy, 01b scalable, 10b reserved, 11b abort-DMA
/// mode (not offered: ECAP.ADMS is clear, so bit 11 is reserved).
pub const RTADDR_TTM_SHIFT: u64 = 10;
pub const RTADDR_TTM_MASK: u64 = 0b11 << RTADDR_TTM_SHIFT;
/// TTM = 01b: the root table is a scalable-mode root table (needs ECAP.SMTS).
pub const RTADDR_TTM_SCALABLE: u64 = 0b01 << RTADDR_TTM_SHIFT;
pub const RTADDR_RTA_MASK: u64 = !0xfff;

// 11.4.6.1: context command register.
/// Invalidate context-cache (set by software, cleared by hardware when done).
pub const CCMD_ICC: u64 = 1 << 63;
/// Requested granularity (62:61).
pub const CCMD_CIRG_SHIFT: u64 = 61;
pub const CCMD_CIRG_MASK: u64 = 0b11 << CCMD_CIRG_SHIFT;
/// Actual granularity (60:59), written by hardware.
pub const CCMD_CAIG_SHIFT: u64 = 59;
pub const CCMD_CAIG_MASK: u64 = 0b11 << CCMD_CAIG_SHIFT;
/// Function mask (33:32), source id (31:16) and domain id (15:0) of the request.
pub const CCMD_FM_SHIFT: u64 = 32;
pub const CCMD_FM_MASK: u64 = 0b11 << CCMD_FM_SHIFT;
pub const CCMD_SID_SHIFT: u64 = 16;
pub const CCMD_SID_MASK: u64 = 0xffff << CCMD_SID_SHIFT;
pub const CCMD_DID_MASK: u64 = 0xffff;

// 11.4.6.3: IOTLB invalidate register.
/// Invalidate IOTLB (set by software, cleared by hardware when done).
pub const IOTLB_IVT: u64 = 1 << 63;
/// Requested granularity (61:60).
pub const IOTLB_IIRG_SHIFT: u64 = 60;
pub const IOTLB_IIRG_MASK: u64 = 0b11 << IOTLB_IIRG_SHIFT;
/// Actual granularity (58:57), written by hardware.
pub const IOTLB_IAIG_SHIFT: u64 = 57;
pub const IOTLB_IAIG_MASK: u64 = 0b11 << IOTLB_IAIG_SHIFT;
/// Drain reads and drain writes.
pub const IOTLB_DR: u64 = 1 << 49;
pub const IOTLB_DW: u64 = 1 << 48;
/// Domain id of a domain- or page-selective request (47:32).
pub const IOTLB_DID_SHIFT: u64 = 32;
pub const IOTLB_DID_MASK: u64 = 0xffff << IOTLB_DID_SHIFT;
// 11.4.6.4: invalidate address register.
pub const IVA_AM_MASK: u64 = 0x3f;
pub const IVA_IH: u64 = 1 << 6;
pub const IVA_ADDR_MASK: u64 = !0xfff;

// 11.4.7.1: fault status register.
/// Primary fault overflow (RW1C).
pub const FSTS_PFO: u32 = 1 << 0;
/// Primary pending fault (RO: some fault record has F set).
pub const FSTS_PPF: u32 = 1 << 1;
/// Invalidation queue error (RW1C).
pub const FSTS_IQE: u32 = 1 << 4;
/// Invalidation completion error (RW1C).
pub const FSTS_ICE: u32 = 1 << 5;
/// Invalidation time-out error (RW1C).
pub const FSTS_ITE: u32 = 1 << 6;
/// Fault record index (RO, 15:8).
pub const FSTS_FRI_SHIFT: u32 = 8;
pub const FSTS_FRI_MASK: u32 = 0xff << FSTS_FRI_SHIFT;
/// Bits software clears by writing 1.
pub const FSTS_RW1C: u32 = FSTS_PFO | FSTS_IQE | FSTS_ICE | FSTS_ITE;
/// Conditions that keep the fault event pending.
pub const FSTS_EVENT_CONDITIONS: u32 = FSTS_PFO | FSTS_PPF | FSTS_IQE | FSTS_ICE | FSTS_ITE;

// 11.4.7.4 and 11.4.9.7: event address registers hold a dword-aligned message address (31:2).
pub const EADDR_MA_MASK: u32 = !0x3;

// Advanced fault log register (revision 3.x, 10.4.15): the log's address (63:12).
pub const AFLOG_FLA_MASK: u64 = !0xfff;

// 11.4.7.2 and 11.4.9.5: event control registers (fault and invalidation completion).
/// Interrupt mask.
pub const ECTL_IM: u32 = 1 << 31;
/// Interrupt pending (read-only).
pub const ECTL_IP: u32 = 1 << 30;

// 11.4.9.9: invalidation queue error record register.
/// Invalidation queue error info (3:0): why IQE was set.
pub const IQERCD_IQEI_MASK: u64 = 0xf;
/// Source id of the device-TLB invalidation that timed out (47:32), valid while ITE is set.
pub const IQERCD_ITESID_SHIFT: u64 = 32;
pub const IQERCD_ITESID_MASK: u64 = 0xffff << IQERCD_ITESID_SHIFT;
/// Source id of the device-TLB invalidation completion in error (63:48), valid while ICE is set.
pub const IQERCD_ICESID_SHIFT: u64 = 48;
pub const IQERCD_ICESID_MASK: u64 = 0xffff << IQERCD_ICESID_SHIFT;
/// IQEI values: the tail pointer was invalid; a descriptor could not be fetched; a descriptor
/// has an invalid type; a valid type has a reserved field set; the queue's descriptor width
/// (IQA.DW) is invalid for the translation mode.
pub const IQEI_TAIL: u8 = 1;
pub const IQEI_FETCH: u8 = 2;
pub const IQEI_TYPE: u8 = 3;
pub const IQEI_RESERVED: u8 = 4;
pub const IQEI_WIDTH: u8 = 5;

// 11.4.9.4: invalidation completion status register.
/// Invalidation wait descriptor complete (RW1C).
pub const ICS_IWC: u32 = 1 << 0;

// 11.4.9.3: invalidation queue address register.
pub const IQA_IQA_MASK: u64 = !0xfff;
/// Descriptor width (bit 11): set for 256-bit descriptors, which scalable mode requires; reserved
/// without ECAP.SMTS.
pub const IQA_DW: u64 = 1 << 11;
pub const IQA_QS_MASK: u64 = 0x7;
/// Queue head/tail registers hold the queue offset in 128-bit units in bits 18:4; with 256-bit
/// descriptors bit 4 is zero and bits 18:5 are the descriptor index.
pub const IQ_INDEX_SHIFT: u64 = 4;
pub const IQ_INDEX_MASK: u64 = 0x7fff << IQ_INDEX_SHIFT;
/// Size of one 128-bit invalidation descriptor: the unit of IQH and IQT.
pub const DESCRIPTOR_SIZE: u64 = 16;
/// Size of one 256-bit invalidation descriptor (IQA.DW = 1).
pub const WIDE_DESCRIPTOR_SIZE: u64 = 32;

// 11.4.7.6: fault recording register.
/// Lower quadword: the faulting page's address (63:12).
pub const FRCD_LO_FI_MASK: u64 = !0xfff;
// Upper quadword:
/// Fault bit (RW1C).
pub const FRCD_HI_F: u64 = 1 << 63;
/// Type: set for a read request, clear for a write.
pub const FRCD_HI_T: u64 = 1 << 62;
/// Address type of the faulted request (61:60).
pub const FRCD_HI_AT_MASK: u64 = 0b11 << 60;
/// PASID value of the faulted request (59:40), valid when PP is set.
pub const FRCD_HI_PV_SHIFT: u64 = 40;
pub const FRCD_HI_PV_MASK: u64 = 0xf_ffff << FRCD_HI_PV_SHIFT;
/// Fault reason (39:32).
pub const FRCD_HI_FR_SHIFT: u64 = 32;
pub const FRCD_HI_FR_MASK: u64 = 0xff << FRCD_HI_FR_SHIFT;
/// PASID present: the faulted request carried a PASID (in PV).
pub const FRCD_HI_PP: u64 = 1 << 31;
/// Privilege mode requested: the faulted request with a PASID was a supervisor request.
pub const FRCD_HI_PRIV: u64 = 1 << 29;
/// Source id of the faulted request (15:0).
pub const FRCD_HI_SID_MASK: u64 = 0xffff;

// 11.4.8.1: protected memory enable register.
pub const PMEN_EPM: u32 = 1 << 31;
pub const PMEN_PRS: u32 = 1 << 0;
