//! The remapping hardware unit: its configuration and state, and the devices attached behind
//! it. The register file is described in [`registers`]; guest register accesses and what they
//! start (global commands, fault and completion events) are in `mmio`, invalidation in
//! `invalidation`, what a device's requests translate through (DMA translation for emulated
//! devices, the view attached devices are synced to) in `translate`.

mod ats;
mod cached;
mod check;
mod interrupts;
mod invalidation;
mod mmio;
mod record;
pub use record::RecordError;
pub mod registers;
mod sharing;
pub use sharing::{DomainUse, HostDomainUse};
#[cfg(test)]
mod tests;
mod translate;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::ats::SharedDeviceTlb;
use crate::cache::{CacheConfig, Caches};
use crate::check::Checker;
use crate::fault::{FaultLog, FaultReason};
use crate::host::HostDma;
use crate::inject::{Injection, Injector};
use crate::intremap::{InterruptRoutes, RemapState};
use crate::ranges::{self, Range};
use crate::record::{Event, Tap};
use crate::regs::*;
use crate::space::Space;
use crate::stats::Footprint;
use crate::tables::TableMode;
use crate::{Capabilities, SourceId, Stats};
use registers::RegisterFile;

/// When the host unmaps what the guest unmapped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlushMode {
    /// Before the guest's wait descriptor completes: once the guest sees its invalidation done,
    /// the device can no longer reach what was unmapped.
    Strict,
    /// Queued, and carried out once `max_pending` host mappings wait or the oldest has waited
    /// `max_delay` (Linux's flush queue: 256 entries, 10 ms), as [`Vtd::poll`] finds at each
    /// submission and whenever the VMM calls it. Until then the device can still
    /// reach memory the guest unmapped: the guest gives up protection against a device that
    /// keeps using a buffer after its driver unmapped it, in exchange for far fewer host IOTLB
    /// flushes. Re-mapping the same IOVA to the same address cancels the pending unmap.
    Deferred {
        max_pending: usize,
        max_delay: Duration,
    },
}

impl FlushMode {
    /// Deferred mode with Linux's flush-queue bounds.
    pub const DEFERRED_DEFAULT: FlushMode = FlushMode::Deferred {
        max_pending: 256,
        max_delay: Duration::from_millis(10),
    };
}

/// How invalidations become host work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncStrategy {
    /// All descriptors of a submission up to each wait are synced together, in the fewest calls.
    Batched,
    /// What QEMU does: each descriptor synced at once, one host call per changed leaf. Kept as
    /// the baseline that benchmarks measure the batched engine against.
    PerLeaf,
}

/// Configuration of the remapping unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VtdConfig {
    /// Guest address width: 39 (3-level tables) or 48 (3- and 4-level tables).
    pub aw_bits: u32,
    /// Caching mode (CAP.CM); required for devices whose DMA the host remaps.
    pub caching_mode: bool,
    /// Pass-through context entries (ECAP.PT).
    pub pass_through: bool,
    /// Number of fault recording registers (CAP.NFR), 1 to [`MAX_FAULT_RECORDS`].
    pub fault_records: usize,
    pub flush: FlushMode,
    pub strategy: SyncStrategy,
    /// Most page-table entries the syncs that one register access triggers may visit, all
    /// together: hostile tables (entries pointing back at their own table) bound the work, and
    /// a sync that runs out unmaps what it was to sync rather than leave it stale.
    pub walk_budget: u64,
    /// Interrupt remapping (ECAP.IR): interrupt requests go through the guest's IRTE table
    /// once it enables remapping.
    pub interrupt_remapping: bool,
    /// Extended interrupt mode (ECAP.EIM): IRTEs may name 32-bit x2APIC destinations.
    /// Needs `interrupt_remapping`.
    pub x2apic: bool,
    /// Scalable mode (ECAP.SMTS with SLTS, PASID and SMPWC; CAP.FL1GP): the guest may point
    /// RTADDR at a scalable-mode root table (TTM = 01b), whose PASID entries translate through
    /// second-stage tables (shadowed into the host as legacy ones are) or pass through, and then
    /// queues 256-bit descriptors.
    pub scalable_mode: bool,
    /// First-stage translation (ECAP.FLTS, with SRS): PASID entries may name IA-32e tables,
    /// which emulated devices translate through on demand. Needs `scalable_mode` and a 48-bit
    /// width. Only for a unit with no device the host remaps DMA for ([`Vtd::attach`] refuses
    /// them): a caching-mode guest sends no invalidation when it adds a first-stage mapping (Linux
    /// since 6.x does not), so a VFIO type1 host could never follow its tables; only hardware
    /// nesting through iommufd could.
    pub first_stage: bool,
    /// A requester whose interrupt requests skip IRTE source validation (SVT/SQ/SID, 9.10),
    /// as QEMU's VT-d skips it for its IOAPIC (whose requests carry no requester ID there):
    /// for guest code written against QEMU, such as kvm-unit-tests' `intel_iommu`, whose IOAPIC
    /// IRTE names the edu's requester ID. None (the default) validates every request, as the
    /// spec says.
    pub unverified_source: Option<SourceId>,
    /// How many entries each translation cache holds (see [`crate::cache`]); emulated devices'
    /// requests go through them.
    pub caches: CacheConfig,
    /// The protocol checker (see [`crate::check`]).
    pub check: bool,
    /// Device-TLBs (ECAP.DT): context entries may allow ATS, for emulated devices that
    /// attach a device-TLB ([`Vtd::attach_device_tlb`]).
    pub device_iotlb: bool,
}

impl Default for VtdConfig {
    fn default() -> Self {
        VtdConfig {
            aw_bits: 48,
            caching_mode: true,
            pass_through: true,
            fault_records: 8,
            flush: FlushMode::Strict,
            strategy: SyncStrategy::Batched,
            walk_budget: 1 << 24,
            interrupt_remapping: false,
            x2apic: false,
            scalable_mode: false,
            first_stage: false,
            unverified_source: None,
            caches: CacheConfig::HARDWARE,
            check: false,
            device_iotlb: false,
        }
    }
}

/// A configuration the unit cannot take.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("address width {0} is not supported (use 39 or 48)")]
    AddressWidth(u32),
    #[error("{0} fault recording registers requested (use 1 to {MAX_FAULT_RECORDS})")]
    FaultRecords(usize),
    #[error("device {0} needs caching mode to have its DMA remapped by the host")]
    NoCachingMode(SourceId),
    #[error("device {0} is already attached")]
    AlreadyAttached(SourceId),
    #[error("extended interrupt mode (x2APIC) needs interrupt remapping")]
    ExtendedInterruptModeWithoutRemapping,
    #[error("first-stage translation needs scalable mode")]
    FirstStageWithoutScalableMode,
    #[error(
        "first-stage translation needs a 48-bit address width, not {0} (its tables are 4-level, \
         and Linux wants a width both stages share)"
    )]
    FirstStageAddressWidth(u32),
    #[error(
        "device {0} cannot be behind a unit offering first-stage translation: a caching-mode \
         guest sends no invalidation when it maps through first-stage tables, so the host could \
         not follow them"
    )]
    FirstStageWithHostDevice(SourceId),
}

/// Where the unit's interrupts go: the VMM delivers an MSI with this address and data.
pub trait MsiSink: Send {
    fn send(&self, addr: u64, data: u32);
}

/// A monotonic clock for the deferred flush bound.
pub trait Clock: Send {
    fn now(&self) -> Duration;
}

/// [`Clock`] over the system's monotonic clock.
pub struct SystemClock(Instant);

impl Default for SystemClock {
    fn default() -> Self {
        SystemClock(Instant::now())
    }
}

impl Clock for SystemClock {
    fn now(&self) -> Duration {
        self.0.elapsed()
    }
}

/// The emulated remapping hardware unit.
pub struct Vtd<M: GuestMemoryBackend> {
    config: VtdConfig,
    caps: Capabilities,
    cap: u64,
    ecap: u64,
    mem: Tap<M>,
    ram: Vec<Range>,
    ram_bounds: Vec<u64>,
    msi: Box<dyn MsiSink>,
    clock: Box<dyn Clock>,

    /// The stored registers; the others are computed from the state below.
    regs: RegisterFile,
    /// The root table latched by the last SRTP.
    root_table: u64,
    /// The kind of root table latched by the last SRTP (RTADDR.TTM).
    root_mode: TableMode,
    faults: FaultLog,
    /// FSTS error bits other than the fault-record ones (IQE, ICE, ITE).
    fsts_errors: u32,
    /// What IQERCD reports about the last queue errors (11.4.9.9).
    queue_errors: QueueErrorRecord,
    /// A device-TLB invalidation that timed out (injected): the requester, until the queue
    /// reaches the wait it aborts.
    timed_out: Option<SourceId>,
    /// Queue head as a descriptor index.
    iqh: u64,
    /// Interrupt remapping as GCMD set it up.
    remap: RemapState,
    /// Who holds translated interrupt routes, told when they must re-translate.
    interrupt_routes: Option<Box<dyn InterruptRoutes>>,

    spaces: BTreeMap<SourceId, Space>,
    /// Views changed since devices last settled which host domain they use
    /// ([`Vtd::settle_sharing`]).
    sharing_dirty: bool,
    /// Attached devices whose tables the guest misprogrammed, with the fault recorded for it,
    /// so a repeated invalidation does not record it again.
    refused: BTreeMap<SourceId, FaultReason>,
    stats: Stats,
    /// When the oldest deferred unmap was queued.
    deferred_since: Option<Duration>,
    /// What is left of the walk budget for the current register access.
    walk_left: u64,
    /// The translation caches emulated devices' requests go through.
    caches: Caches,
    /// The protocol checker.
    check: Checker,
    /// Faults to produce on purpose.
    inject: Injector,
    /// The device-TLBs of emulated ATS devices.
    device_tlbs: BTreeMap<SourceId, SharedDeviceTlb>,
}

/// IQERCD (11.4.9.9): why the queue last stopped, and which devices' invalidations failed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct QueueErrorRecord {
    /// IQEI (3:0): the cause of IQE, valid while FSTS.IQE is set.
    pub iqei: u8,
    /// ITESID (47:32): the requester whose device-TLB invalidation timed out.
    pub itesid: u16,
    /// ICESID (63:48): the requester whose device-TLB invalidation completion was in error.
    pub icesid: u16,
}

impl QueueErrorRecord {
    pub fn value(&self) -> u64 {
        u64::from(self.iqei & 0xf) | u64::from(self.itesid) << 32 | u64::from(self.icesid) << 48
    }
}

/// The queue's size in 128-bit units (the unit of IQH and IQT): 2^QS pages (11.4.9.3), which
/// hold 256 << QS 128-bit descriptors or 128 << QS 256-bit ones.
pub(crate) fn iq_entries(iqa: u64) -> u64 {
    256 << (iqa & IQA_QS_MASK)
}

impl<M: GuestMemoryBackend> Vtd<M> {
    /// Creates a unit in its reset state over guest memory `mem`.
    pub fn new(
        config: VtdConfig,
        mem: M,
        msi: Box<dyn MsiSink>,
        clock: Box<dyn Clock>,
    ) -> Result<Self, ConfigError> {
        if config.aw_bits != 39 && config.aw_bits != 48 {
            return Err(ConfigError::AddressWidth(config.aw_bits));
        }
        if config.fault_records == 0 || config.fault_records > MAX_FAULT_RECORDS {
            return Err(ConfigError::FaultRecords(config.fault_records));
        }
        if config.x2apic && !config.interrupt_remapping {
            return Err(ConfigError::ExtendedInterruptModeWithoutRemapping);
        }
        if config.first_stage && !config.scalable_mode {
            return Err(ConfigError::FirstStageWithoutScalableMode);
        }
        if config.first_stage && config.aw_bits != 48 {
            return Err(ConfigError::FirstStageAddressWidth(config.aw_bits));
        }
        let sm = config.scalable_mode;
        let caps = Capabilities {
            aw_bits: config.aw_bits,
            haw: config.aw_bits,
            large_2m: true,
            large_1g: true,
            pass_through: config.pass_through,
            device_iotlb: config.device_iotlb,
            scalable: sm,
            first_stage: config.first_stage,
            first_stage_1g: sm,
            pasid: sm,
            supervisor_requests: config.first_stage,
            page_walk_snoop: sm,
        };
        let sagaw = CAP_SAGAW_39
            | if config.aw_bits == 48 {
                CAP_SAGAW_48
            } else {
                0
            };
        let cap = CAP_ND_16BIT
            | if config.caching_mode { CAP_CM } else { 0 }
            | sagaw
            | u64::from(config.aw_bits - 1) << CAP_MGAW_SHIFT
            | (FRCD_REG_BASE / 16) << CAP_FRO_SHIFT
            | CAP_SLLPS_2M
            | CAP_SLLPS_1G
            | CAP_PSI
            | (config.fault_records as u64 - 1) << CAP_NFR_SHIFT
            | MAMV << CAP_MAMV_SHIFT
            | CAP_DWD
            | CAP_DRD
            | CAP_ESRTPS
            | if config.interrupt_remapping {
                CAP_ESIRTPS
            } else {
                0
            }
            | if sm { CAP_FL1GP } else { 0 };
        let scalable_ecap = if sm {
            ECAP_SMTS
                | ECAP_SLTS
                | ECAP_PASID
                | u64::from(PASID_BITS - 1) << ECAP_PSS_SHIFT
                | ECAP_SMPWC
                | if config.first_stage {
                    ECAP_FLTS | ECAP_SRS
                } else {
                    0
                }
        } else {
            0
        };
        let ecap = ECAP_C
            | ECAP_QI
            | if config.device_iotlb { ECAP_DT } else { 0 }
            | if config.pass_through { ECAP_PT } else { 0 }
            | if config.interrupt_remapping {
                ECAP_IR
            } else {
                0
            }
            | if config.x2apic { ECAP_EIM } else { 0 }
            | (IOTLB_REG_BASE / 16) << ECAP_IRO_SHIFT
            | scalable_ecap;
        let ram = ranges::normalize(
            mem.iter()
                .map(|r| (r.start_addr().0, r.start_addr().0 + r.len()))
                .collect(),
        );
        let mut ram_bounds: Vec<u64> = mem
            .iter()
            .flat_map(|r| [r.start_addr().0, r.start_addr().0 + r.len()])
            .collect();
        ram_bounds.sort_unstable();
        ram_bounds.dedup();
        Ok(Vtd {
            config,
            caps,
            cap,
            ecap,
            mem: Tap::new(mem),
            ram,
            ram_bounds,
            msi,
            clock,
            regs: RegisterFile::new(),
            root_table: 0,
            root_mode: TableMode::Legacy,
            faults: FaultLog::new(config.fault_records),
            fsts_errors: 0,
            iqh: 0,
            remap: RemapState {
                unverified_source: config.unverified_source,
                ..RemapState::default()
            },
            interrupt_routes: None,
            spaces: BTreeMap::new(),
            sharing_dirty: false,
            refused: BTreeMap::new(),
            stats: Stats::default(),
            deferred_since: None,
            walk_left: config.walk_budget,
            caches: Caches::new(config.caches),
            check: Checker::new(config.check),
            inject: Injector::default(),
            device_tlbs: BTreeMap::new(),
            queue_errors: QueueErrorRecord::default(),
            timed_out: None,
        })
    }

    /// Arms a fault injection (see [`crate::inject`]), counted from now. False when too many
    /// are armed already.
    pub fn inject(&mut self, injection: Injection) -> bool {
        self.inject.arm(injection)
    }

    /// Drops every injection still armed.
    pub fn disarm_injections(&mut self) {
        self.inject = Injector::default();
    }

    /// The translation caches, for tests and the VMM's diagnostics.
    pub fn caches(&self) -> &Caches {
        &self.caches
    }

    pub fn config(&self) -> &VtdConfig {
        &self.config
    }

    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// What the unit supports, as its CAP and ECAP registers report.
    pub fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    /// The root table address latched by the last SRTP.
    pub fn root_table(&self) -> u64 {
        self.root_table
    }

    /// The kind of root table latched by the last SRTP.
    pub fn root_table_mode(&self) -> TableMode {
        self.root_mode
    }

    /// Is DMA remapping enabled (GSTS.TES)?
    pub fn translation_enabled(&self) -> bool {
        self.regs.get32::<GSTS_REG>() & GSTS_TES != 0
    }

    /// Puts `source` behind the unit: from now on its host mappings (through `host`) follow
    /// what the guest's tables say. With translation off, that is all of guest RAM.
    ///
    /// Where its view is identity (translation off, or a pass-through context or PASID entry)
    /// and `host` has a shared identity domain ([`HostDma::use_identity`]), the device uses that
    /// instead and its own domain maps nothing; when the view becomes translated again, its own
    /// domain is mapped as the tables say before the device is moved back, within the same
    /// sync (so before a wait completes). Not while recording (see [`Vtd::start_recording`]):
    /// the recording format does not say what the host supports, and replay must repeat the
    /// live counters.
    pub fn attach(&mut self, source: SourceId, host: Box<dyn HostDma>) -> Result<(), ConfigError> {
        self.record_event(Event::Attach(source));
        if !self.config.caching_mode {
            return Err(ConfigError::NoCachingMode(source));
        }
        if self.config.first_stage {
            return Err(ConfigError::FirstStageWithHostDevice(source));
        }
        if self.spaces.contains_key(&source) {
            return Err(ConfigError::AlreadyAttached(source));
        }
        // A recording unit keeps every device's views in its own domain, as replay (which has
        // no such host) does, so that a replay repeats the live counters exactly.
        let share = self.mem.recorder().is_none();
        let mut space = Space::new(source, host, share);
        let view = self.view_for_host(source);
        space.set_view(view);
        self.spaces.insert(source, space);
        self.sharing_dirty = true;
        self.walk_left = self.config.walk_budget;
        self.sync_pending();
        Ok(())
    }

    /// Removes `source` from the unit, unmapping everything the host maps for it.
    pub fn detach(&mut self, source: SourceId) {
        self.record_event(Event::Detach(source));
        self.refused.remove(&source);
        if let Some(mut space) = self.spaces.remove(&source) {
            // Its followers leave its domain (for another leader's, or their own mapped in
            // full) before it is emptied.
            self.sharing_dirty = true;
            self.walk_left = self.config.walk_budget;
            self.settle_sharing();
            let report = space.unmap_all();
            self.account(source, report);
        }
    }

    /// The host mappings of `source`, as (IOVA, length, guest-physical address) triples.
    pub fn host_mappings(&self, source: SourceId) -> Vec<(u64, u64, u64)> {
        self.spaces
            .get(&source)
            .map(|s| {
                s.shadow
                    .mappings()
                    .map(|(k, h)| (k, h.len, h.gpa))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// What the engine holds for the attached devices: host mappings and table snapshots.
    pub fn footprint(&self) -> Footprint {
        let mut f = Footprint::default();
        for s in self.spaces.values() {
            f.host_mappings += s.shadow.len();
            f.deferred_mappings += s.shadow.doomed();
            f.snapshots += s.snapshot_count();
        }
        f
    }

    /// The queue's current head and size in 128-bit units (256 << IQA.QS, the unit of the tail
    /// register's bits 18:4), for a VMM that takes tail writes asynchronously and must order
    /// several of them.
    pub fn queue_head_and_len(&self) -> (u64, u64) {
        (self.iqh, iq_entries(self.regs.get::<IQA_REG>()))
    }
}
