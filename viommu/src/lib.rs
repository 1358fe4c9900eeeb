//! An emulated Intel VT-d remapping unit, in legacy and scalable mode, as Linux's intel-iommu
//! driver and QEMU's `intel-iommu` device use it, whose guest invalidations reach the host batched.
//!
//! The model knows nothing of KVM or VFIO. It reads guest memory through vm-memory, signals
//! interrupts through [`MsiSink`] and, in caching mode, keeps each attached device's host DMA
//! mappings equal to what the guest's tables say through [`HostDma`]. Emulated devices'
//! requests go through translation caches kept as hardware keeps them ([`cache`]); a protocol
//! checker reports what a guest driver does that the spec makes a violation ([`check`]); faults
//! can be injected for a driver's error paths ([`inject`]). Every behaviour can be tested
//! without hardware.
//!
//! References are to the Intel Virtualization Technology for Directed I/O Architecture
//! Specification; "QEMU" means `hw/i386/intel_iommu.c`.

pub mod ats;
pub mod cache;
pub mod check;
pub mod descriptor;
pub mod dmar;
pub mod fault;
pub mod first_stage;
pub mod host;
pub mod inject;
pub mod intremap;
pub mod memory;
pub mod ranges;
pub mod record;
pub mod regs;
pub mod replay;
pub mod scalable;
pub mod shadow;
mod snapshots;
mod space;
pub mod stats;
pub mod tables;
pub mod testing;
mod vtd;
pub mod walk;

pub use fault::{Access, Fault, FaultReason, PasidTag};
pub use host::{HostDma, HostDmaError};
pub use stats::{Footprint, Stats};
pub use vm_device::dma::Perm;
pub use vtd::registers;
pub use vtd::{
    Clock, ConfigError, DomainUse, FlushMode, HostDomainUse, MsiSink, RecordError, SyncStrategy,
    SystemClock, Vtd, VtdConfig,
};

/// Size of a VT-d page.
pub const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;
pub const PAGE_SHIFT: u32 = 12;

/// A PCI requester id: bus in bits 15:8, device in 7:3, function in 2:0.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceId(pub u16);

impl SourceId {
    pub fn new(bus: u8, device: u8, function: u8) -> Self {
        SourceId(u16::from(bus) << 8 | u16::from(device & 0x1f) << 3 | u16::from(function & 7))
    }

    pub fn bus(self) -> u8 {
        (self.0 >> 8) as u8
    }

    /// Device and function, as the context table indexes them.
    pub fn devfn(self) -> u8 {
        self.0 as u8
    }
}

impl std::fmt::Display for SourceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:02x}:{:02x}.{}",
            self.bus(),
            self.devfn() >> 3,
            self.devfn() & 7
        )
    }
}

/// What the remapping unit supports, as CAP and ECAP report it and the table walks enforce it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capabilities {
    /// Guest address width (MGAW), 39 or 48; SAGAW offers 3 levels, and 4 when 48.
    pub aw_bits: u32,
    /// Host address width: guest-physical address bits a table entry may hold.
    pub haw: u32,
    pub large_2m: bool,
    pub large_1g: bool,
    /// Pass-through context entries (ECAP.PT).
    pub pass_through: bool,
    /// Device-TLBs / ATS (ECAP.DT): context entries may allow translation requests.
    pub device_iotlb: bool,
    /// Scalable-mode translation (ECAP.SMTS, with SLTS): scalable-mode root tables, PASID
    /// tables, 256-bit invalidation descriptors.
    pub scalable: bool,
    /// First-stage translation (ECAP.FLTS): PASID entries with PGTT = 001b.
    pub first_stage: bool,
    /// First-stage 1 GiB pages (CAP.FL1GP).
    pub first_stage_1g: bool,
    /// Requests with a PASID (ECAP.PASID), of [`regs::PASID_BITS`] bits.
    pub pasid: bool,
    /// Supervisor requests (ECAP.SRS): PASID entries may set SRE.
    pub supervisor_requests: bool,
    /// Scalable-mode page-walk coherency (ECAP.SMPWC): PASID entries may set PWSNP.
    pub page_walk_snoop: bool,
}

impl Default for Capabilities {
    fn default() -> Self {
        Capabilities {
            aw_bits: 48,
            haw: 48,
            large_2m: true,
            large_1g: true,
            pass_through: true,
            device_iotlb: false,
            scalable: false,
            first_stage: false,
            first_stage_1g: false,
            pasid: false,
            supervisor_requests: false,
            page_walk_snoop: false,
        }
    }
}

impl Capabilities {
    /// Does SAGAW offer tables of `levels` levels?
    pub fn supports_levels(&self, levels: u8) -> bool {
        match levels {
            3 => true,
            4 => self.aw_bits >= 48,
            _ => false,
        }
    }
}
