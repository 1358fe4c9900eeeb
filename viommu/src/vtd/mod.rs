//! The remapping hardware unit: its register file (VT-d spec 11.4), global commands, fault and
//! invalidation-completion events, and the devices attached behind it.

mod invalidation;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::fault::{Access, Fault, FaultLog, RecordOutcome};
use crate::host::HostDma;
use crate::ranges::{self, Range};
use crate::regs::*;
use crate::space::{Space, View};
use crate::tables::{self, Translation};
use crate::walk;
use crate::{Capabilities, SourceId, Stats};

/// When the host unmaps what the guest unmapped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlushMode {
    /// Before the guest's wait descriptor completes: once the guest sees its invalidation done,
    /// the device can no longer reach what was unmapped.
    Strict,
    /// Queued, and carried out when `max_pending` host mappings wait or the oldest has waited
    /// `max_delay` (Linux's flush queue: 256 entries, 10 ms). Until then the device can still
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
    mem: M,
    ram: Vec<Range>,
    ram_bounds: Vec<u64>,
    msi: Box<dyn MsiSink>,
    clock: Box<dyn Clock>,

    gsts: u32,
    rtaddr: u64,
    /// The root table latched by the last SRTP.
    root_table: u64,
    ccmd: u64,
    iva: u64,
    iotlb: u64,
    faults: FaultLog,
    /// FSTS error bits other than the fault-record ones (IQE, ICE, ITE).
    fsts_errors: u32,
    fectl: u32,
    fedata: u32,
    feaddr: u32,
    feuaddr: u32,
    aflog: u64,
    pmen: u32,
    plmbase: u32,
    plmlimit: u32,
    phmbase: u64,
    phmlimit: u64,
    /// Queue head and tail as descriptor indices.
    iqh: u64,
    iqt: u64,
    iqa: u64,
    ics: u32,
    iectl: u32,
    iedata: u32,
    ieaddr: u32,
    ieuaddr: u32,
    irta: u64,

    spaces: BTreeMap<SourceId, Space>,
    stats: Stats,
    /// When the oldest deferred unmap was queued.
    deferred_since: Option<Duration>,
    /// What is left of the walk budget for the current register access.
    walk_left: u64,
}

/// Which bits of a 64-bit register an access wrote.
const LOW_HALF: u64 = 0xffff_ffff;
const HIGH_HALF: u64 = !LOW_HALF;

/// Descriptors the queue holds: 256 << IQA.QS (11.4.9.3; 128-bit descriptors, legacy mode).
pub(crate) fn iq_entries(iqa: u64) -> u64 {
    256 << (iqa & IQA_QS_MASK)
}

fn is_reg64(offset: u64) -> bool {
    matches!(
        offset,
        CAP_REG
            | ECAP_REG
            | RTADDR_REG
            | CCMD_REG
            | AFLOG_REG
            | PHMBASE_REG
            | PHMLIMIT_REG
            | IQH_REG
            | IQT_REG
            | IQA_REG
            | IRTA_REG
            | IVA_REG
            | IOTLB_REG
    ) || (FRCD_REG_BASE..REG_WINDOW_SIZE).contains(&offset)
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
        let caps = Capabilities {
            aw_bits: config.aw_bits,
            haw: config.aw_bits,
            large_2m: true,
            large_1g: true,
            pass_through: config.pass_through,
            device_iotlb: false,
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
            | CAP_ESRTPS;
        let ecap = ECAP_C
            | ECAP_QI
            | if config.pass_through { ECAP_PT } else { 0 }
            | (IOTLB_REG_BASE / 16) << ECAP_IRO_SHIFT;
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
            mem,
            ram,
            ram_bounds,
            msi,
            clock,
            gsts: 0,
            rtaddr: 0,
            root_table: 0,
            ccmd: 0,
            iva: 0,
            iotlb: 0,
            faults: FaultLog::new(config.fault_records),
            fsts_errors: 0,
            fectl: ECTL_IM,
            fedata: 0,
            feaddr: 0,
            feuaddr: 0,
            aflog: 0,
            pmen: 0,
            plmbase: 0,
            plmlimit: 0,
            phmbase: 0,
            phmlimit: 0,
            iqh: 0,
            iqt: 0,
            iqa: 0,
            ics: 0,
            iectl: ECTL_IM,
            iedata: 0,
            ieaddr: 0,
            ieuaddr: 0,
            irta: 0,
            spaces: BTreeMap::new(),
            stats: Stats::default(),
            deferred_since: None,
            walk_left: config.walk_budget,
        })
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

    /// Is DMA remapping enabled (GSTS.TES)?
    pub fn translation_enabled(&self) -> bool {
        self.gsts & GSTS_TES != 0
    }

    /// Puts `source` behind the unit: from now on its host mappings (through `host`) follow
    /// what the guest's tables say. With translation off, that is all of guest RAM.
    pub fn attach(&mut self, source: SourceId, host: Box<dyn HostDma>) -> Result<(), ConfigError> {
        if !self.config.caching_mode {
            return Err(ConfigError::NoCachingMode(source));
        }
        if self.spaces.contains_key(&source) {
            return Err(ConfigError::AlreadyAttached(source));
        }
        let mut space = Space::new(source, host);
        space.set_view(self.view_of(source));
        self.spaces.insert(source, space);
        self.walk_left = self.config.walk_budget;
        self.sync_pending();
        Ok(())
    }

    /// Removes `source` from the unit, unmapping everything the host maps for it.
    pub fn detach(&mut self, source: SourceId) {
        if let Some(mut space) = self.spaces.remove(&source) {
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

    /// What a request from `source` to `iova` currently means.
    fn view_of(&self, source: SourceId) -> View {
        if !self.translation_enabled() {
            return View::Identity;
        }
        match tables::lookup(&self.mem, self.root_table, source, &self.caps) {
            Ok(ctx) => match ctx.translation {
                Translation::PassThrough => View::Identity,
                Translation::Tables(table) => View::Tables {
                    domain: ctx.domain,
                    table,
                },
            },
            Err(_) => View::Blocked,
        }
    }

    /// Translates a DMA request of an emulated device. On failure the fault is recorded (unless
    /// the context disables fault processing) and the fault event raised.
    ///
    /// Returns the guest-physical address and how many bytes from it stay in the same page.
    pub fn translate(
        &mut self,
        source: SourceId,
        iova: u64,
        access: Access,
    ) -> Result<(u64, u64), Fault> {
        if !self.translation_enabled() {
            return Ok((iova, crate::PAGE_SIZE - (iova & (crate::PAGE_SIZE - 1))));
        }
        let fault = |reason| Fault {
            source,
            addr: iova,
            reason,
            access,
        };
        let ctx = match tables::lookup(&self.mem, self.root_table, source, &self.caps) {
            Ok(ctx) => ctx,
            Err(e) => {
                let f = fault(e.reason);
                self.report_fault(&f, e.fpd);
                return Err(f);
            }
        };
        let table = match ctx.translation {
            Translation::PassThrough => {
                return Ok((iova, crate::PAGE_SIZE - (iova & (crate::PAGE_SIZE - 1))))
            }
            Translation::Tables(t) => t,
        };
        match walk::translate(&self.mem, table, iova, access, &self.caps) {
            Ok(leaf) => {
                let off = iova - leaf.iova;
                Ok((leaf.gpa + off, leaf.len - off))
            }
            Err(reason) => {
                let f = fault(reason);
                self.report_fault(&f, ctx.fpd);
                Err(f)
            }
        }
    }

    /// Counts a fault and, unless `fpd`, logs it into the fault records (7.2.1).
    fn report_fault(&mut self, fault: &Fault, fpd: bool) {
        self.stats.faults += 1;
        log::debug!(
            "DMA fault: {} {:?} at {:#x}: {:?}",
            fault.source,
            fault.access,
            fault.addr,
            fault.reason
        );
        if fpd {
            return;
        }
        let before = self.fsts();
        match self.faults.record(fault) {
            RecordOutcome::Recorded | RecordOutcome::Overflowed => self.fault_event(before),
            RecordOutcome::Dropped => {}
        }
    }

    fn fsts(&self) -> u32 {
        let mut v = self.fsts_errors | (self.faults.fri() as u32) << FSTS_FRI_SHIFT;
        if self.faults.pfo() {
            v |= FSTS_PFO;
        }
        if self.faults.ppf() {
            v |= FSTS_PPF;
        }
        v
    }

    /// Signals the fault event for a new condition, given FSTS before it arose (7.3.1): only
    /// when no earlier condition was still waiting for software.
    fn fault_event(&mut self, fsts_before: u32) {
        if fsts_before & FSTS_EVENT_CONDITIONS != 0 {
            return;
        }
        self.fectl |= ECTL_IP;
        if self.fectl & ECTL_IM == 0 {
            self.send_fault_msi();
        }
    }

    fn send_fault_msi(&mut self) {
        self.fectl &= !ECTL_IP;
        let addr = u64::from(self.feuaddr) << 32 | u64::from(self.feaddr);
        self.msi.send(addr, self.fedata);
    }

    /// Signals the invalidation completion event (6.5.2.8, 11.4.9.7).
    fn completion_event(&mut self) {
        if self.ics & ICS_IWC != 0 {
            return;
        }
        self.ics |= ICS_IWC;
        if self.iectl & ECTL_IM != 0 {
            self.iectl |= ECTL_IP;
        } else {
            let addr = u64::from(self.ieuaddr) << 32 | u64::from(self.ieaddr);
            self.msi.send(addr, self.iedata);
        }
    }

    /// Handles a guest read of `data.len()` bytes at `offset` in the register window.
    pub fn mmio_read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match data.len() {
            4 if offset.is_multiple_of(4) => {
                let base = offset & !7;
                if is_reg64(base) {
                    self.read64(base) >> ((offset - base) * 8)
                } else {
                    u64::from(self.read32(offset))
                }
            }
            8 if offset.is_multiple_of(8) => {
                if is_reg64(offset) {
                    self.read64(offset)
                } else {
                    u64::from(self.read32(offset)) | u64::from(self.read32(offset + 4)) << 32
                }
            }
            _ => {
                log::warn!("VT-d: ignoring {}-byte read at {offset:#x}", data.len());
                0
            }
        };
        data.fill(0);
        let bytes = value.to_le_bytes();
        let n = data.len().min(8);
        data[..n].copy_from_slice(&bytes[..n]);
    }

    /// The register window as the guest would read it with 8-byte loads: `image[i]` is what an
    /// 8-byte read at offset `8 * i` returns (a 4-byte read returns one half of it). Reads have
    /// no side effects in VT-d, so a VMM can publish this image in a read-only page and let the
    /// guest read registers without exits.
    pub fn register_image(&self, image: &mut [u64; REG_IMAGE_WORDS]) {
        image.fill(0);
        self.visit_registers(|offset, word| image[(offset / 8) as usize] = word);
    }

    /// Calls `f(offset, word)` for every 8-byte word of the window that holds a register, with
    /// the value an 8-byte read there returns; every other word reads as zero. Built from the
    /// fields directly, not through the read path, because a VMM calls it after every change
    /// (tests and the fuzz target hold it equal to what reads return).
    pub fn visit_registers(&self, mut f: impl FnMut(u64, u64)) {
        let pair = |lo: u32, hi: u32| u64::from(lo) | u64::from(hi) << 32;
        // GCMD (0x18) is write-only and reads as zero; the low halves of 0x30, 0x60 and 0x98
        // are reserved.
        let words = [
            (VER_REG, u64::from(VER_VALUE)),
            (CAP_REG, self.cap),
            (ECAP_REG, self.ecap),
            (GCMD_REG, pair(0, self.gsts)),
            (RTADDR_REG, self.rtaddr),
            (CCMD_REG, self.ccmd),
            (FSTS_REG & !7, pair(0, self.fsts())),
            (FECTL_REG, pair(self.fectl, self.fedata)),
            (FEADDR_REG, pair(self.feaddr, self.feuaddr)),
            (AFLOG_REG, self.aflog),
            (PMEN_REG & !7, pair(0, self.pmen)),
            (PLMBASE_REG, pair(self.plmbase, self.plmlimit)),
            (PHMBASE_REG, self.phmbase),
            (PHMLIMIT_REG, self.phmlimit),
            (IQH_REG, self.iqh << IQ_INDEX_SHIFT),
            (IQT_REG, self.iqt << IQ_INDEX_SHIFT),
            (IQA_REG, self.iqa),
            (ICS_REG & !7, pair(0, self.ics)),
            (IECTL_REG, pair(self.iectl, self.iedata)),
            (IEADDR_REG, pair(self.ieaddr, self.ieuaddr)),
            (IRTA_REG, self.irta),
            (IVA_REG, self.iva),
            (IOTLB_REG, self.iotlb),
        ];
        for (offset, word) in words {
            f(offset, word);
        }
        for record in 0..self.config.fault_records {
            let base = FRCD_REG_BASE + record as u64 * FRCD_REG_SIZE;
            f(base, self.faults.read(record, 0));
            f(base + 8, self.faults.read(record, 1));
        }
    }

    /// The queue's current head and size in descriptors (256 << IQA.QS), for a VMM that takes
    /// tail writes asynchronously and must order several of them.
    pub fn queue_head_and_len(&self) -> (u64, u64) {
        (self.iqh, iq_entries(self.iqa))
    }

    /// Handles a guest write of `data` at `offset` in the register window.
    pub fn mmio_write(&mut self, offset: u64, data: &[u8]) {
        // Everything one write triggers (a whole queue of descriptors) shares one walk budget.
        self.walk_left = self.config.walk_budget;
        match (data.len(), data) {
            (4, d) if offset.is_multiple_of(4) => {
                let v = u64::from(u32::from_le_bytes([d[0], d[1], d[2], d[3]]));
                let base = offset & !7;
                if is_reg64(base) {
                    let (value, written) = if offset == base {
                        (v, LOW_HALF)
                    } else {
                        (v << 32, HIGH_HALF)
                    };
                    let merged = (self.read64(base) & !written) | value;
                    self.write64(base, merged, written);
                } else {
                    self.write32(offset, v as u32);
                }
            }
            (8, d) if offset.is_multiple_of(8) => {
                let mut b = [0u8; 8];
                b.copy_from_slice(d);
                let v = u64::from_le_bytes(b);
                if is_reg64(offset) {
                    self.write64(offset, v, u64::MAX);
                } else {
                    self.write32(offset, v as u32);
                    self.write32(offset + 4, (v >> 32) as u32);
                }
            }
            _ => log::warn!("VT-d: ignoring {}-byte write at {offset:#x}", data.len()),
        }
    }

    fn read32(&self, offset: u64) -> u32 {
        match offset {
            VER_REG => VER_VALUE,
            GSTS_REG => self.gsts,
            FSTS_REG => self.fsts(),
            FECTL_REG => self.fectl,
            FEDATA_REG => self.fedata,
            FEADDR_REG => self.feaddr,
            FEUADDR_REG => self.feuaddr,
            PMEN_REG => self.pmen,
            PLMBASE_REG => self.plmbase,
            PLMLIMIT_REG => self.plmlimit,
            ICS_REG => self.ics,
            IECTL_REG => self.iectl,
            IEDATA_REG => self.iedata,
            IEADDR_REG => self.ieaddr,
            IEUADDR_REG => self.ieuaddr,
            // GCMD is write-only; reserved offsets read as zero.
            _ => 0,
        }
    }

    fn read64(&self, offset: u64) -> u64 {
        match offset {
            CAP_REG => self.cap,
            ECAP_REG => self.ecap,
            RTADDR_REG => self.rtaddr,
            CCMD_REG => self.ccmd,
            AFLOG_REG => self.aflog,
            PHMBASE_REG => self.phmbase,
            PHMLIMIT_REG => self.phmlimit,
            IQH_REG => self.iqh << IQ_INDEX_SHIFT,
            IQT_REG => self.iqt << IQ_INDEX_SHIFT,
            IQA_REG => self.iqa,
            IRTA_REG => self.irta,
            IVA_REG => self.iva,
            IOTLB_REG => self.iotlb,
            o if o >= FRCD_REG_BASE => {
                let rel = o - FRCD_REG_BASE;
                self.faults.read(
                    (rel / FRCD_REG_SIZE) as usize,
                    ((rel % FRCD_REG_SIZE) / 8) as usize,
                )
            }
            _ => 0,
        }
    }

    fn write32(&mut self, offset: u64, v: u32) {
        match offset {
            GCMD_REG => self.write_gcmd(v),
            FSTS_REG => self.write_fsts(v),
            FECTL_REG => {
                self.fectl = (self.fectl & ECTL_IP) | (v & ECTL_IM);
                // Unmasking with an interrupt pending delivers it (11.4.9.2).
                if self.fectl & ECTL_IM == 0 && self.fectl & ECTL_IP != 0 {
                    self.send_fault_msi();
                }
            }
            FEDATA_REG => self.fedata = v,
            FEADDR_REG => self.feaddr = v & !0x3,
            FEUADDR_REG => self.feuaddr = v,
            // Protected memory regions are not reported (CAP.PLMR/PHMR clear): EPM only
            // toggles its status bit.
            PMEN_REG => {
                self.pmen = if v & PMEN_EPM != 0 {
                    PMEN_EPM | PMEN_PRS
                } else {
                    0
                }
            }
            PLMBASE_REG => self.plmbase = v,
            PLMLIMIT_REG => self.plmlimit = v,
            ICS_REG => {
                if v & ICS_IWC != 0 {
                    self.ics &= !ICS_IWC;
                    // Clearing IWC retires a pending completion interrupt (11.4.9.7).
                    self.iectl &= !ECTL_IP;
                }
            }
            IECTL_REG => {
                self.iectl = (self.iectl & ECTL_IP) | (v & ECTL_IM);
                if self.iectl & ECTL_IM == 0 && self.iectl & ECTL_IP != 0 {
                    self.iectl &= !ECTL_IP;
                    let addr = u64::from(self.ieuaddr) << 32 | u64::from(self.ieaddr);
                    self.msi.send(addr, self.iedata);
                }
            }
            IEDATA_REG => self.iedata = v,
            IEADDR_REG => self.ieaddr = v & !0x3,
            IEUADDR_REG => self.ieuaddr = v,
            _ => log::debug!("VT-d: write {v:#x} to read-only or reserved {offset:#x} ignored"),
        }
    }

    /// Writes the bits `written` of the 64-bit register at `offset` (the others hold their
    /// current value in `v`).
    fn write64(&mut self, offset: u64, v: u64, written: u64) {
        match offset {
            RTADDR_REG => self.rtaddr = v & (RTADDR_RTA_MASK | RTADDR_TTM_MASK),
            CCMD_REG => {
                self.ccmd = v;
                if written & CCMD_ICC != 0 && v & CCMD_ICC != 0 {
                    self.register_context_invalidation();
                }
            }
            AFLOG_REG => self.aflog = v & !0xfff,
            PHMBASE_REG => self.phmbase = v,
            PHMLIMIT_REG => self.phmlimit = v,
            IQT_REG => {
                self.iqt = (v & IQ_INDEX_MASK) >> IQ_INDEX_SHIFT;
                if written & LOW_HALF != 0 {
                    self.process_queue();
                }
            }
            // DW (256-bit descriptors) exists only in scalable mode: reserved, reads zero.
            IQA_REG => self.iqa = v & (IQA_IQA_MASK | IQA_QS_MASK),
            IRTA_REG => self.irta = v,
            IVA_REG => self.iva = v & (IVA_ADDR_MASK | IVA_IH | IVA_AM_MASK),
            IOTLB_REG => {
                self.iotlb = v;
                if written & IOTLB_IVT != 0 && v & IOTLB_IVT != 0 {
                    self.register_iotlb_invalidation();
                }
            }
            o if o >= FRCD_REG_BASE => {
                let rel = o - FRCD_REG_BASE;
                let index = (rel / FRCD_REG_SIZE) as usize;
                let half = ((rel % FRCD_REG_SIZE) / 8) as usize;
                self.faults.write(index, half, v & written);
                self.retire_fault_event();
            }
            // CAP, ECAP and IQH are read-only.
            _ => log::debug!("VT-d: write {v:#x} to read-only {offset:#x} ignored"),
        }
    }

    fn write_fsts(&mut self, v: u32) {
        let clear = v & FSTS_RW1C;
        if clear & FSTS_PFO != 0 {
            self.faults.clear_pfo();
        }
        let iqe_cleared = clear & FSTS_IQE != 0 && self.fsts_errors & FSTS_IQE != 0;
        self.fsts_errors &= !clear;
        self.retire_fault_event();
        if iqe_cleared {
            // Hardware resumes fetching at IQH, where software has fixed the bad descriptor.
            self.process_queue();
        }
    }

    /// Clears FECTL.IP once software has serviced every fault condition.
    fn retire_fault_event(&mut self) {
        if self.fsts() & FSTS_EVENT_CONDITIONS == 0 {
            self.fectl &= !ECTL_IP;
        }
    }

    /// GCMD (11.4.4): TE and QIE are persistent (software writes their wanted state every time);
    /// SRTP and WBF are one-shot commands completed at once.
    fn write_gcmd(&mut self, v: u32) {
        if v & GCMD_SRTP != 0 {
            self.root_table = self.rtaddr & RTADDR_RTA_MASK;
            if self.rtaddr & RTADDR_TTM_MASK != 0 {
                log::warn!(
                    "VT-d: root table mode {:#x} unsupported, using legacy mode",
                    (self.rtaddr & RTADDR_TTM_MASK) >> 10
                );
            }
            self.gsts |= GSTS_RTPS;
            // ESRTPS: setting the root pointer invalidates every translation cache, the IOTLB
            // included, so every device is synced over its whole space (diffed: a repeated
            // SRTP over unchanged tables costs no host call).
            for space in self.spaces.values_mut() {
                space.invalidate(crate::space::FULL);
            }
            self.refresh_views();
        }
        let qie = v & GCMD_QIE != 0;
        if qie != (self.gsts & GSTS_QIES != 0) {
            if qie {
                self.iqh = 0;
                self.gsts |= GSTS_QIES;
                log::debug!("VT-d: queued invalidation enabled, IQA {:#x}", self.iqa);
            } else {
                self.gsts &= !GSTS_QIES;
            }
        }
        let te = v & GCMD_TE != 0;
        if te != self.translation_enabled() {
            if te {
                self.gsts |= GSTS_TES;
            } else {
                self.gsts &= !GSTS_TES;
            }
            log::debug!(
                "VT-d: translation {}",
                if te { "enabled" } else { "disabled" }
            );
            self.refresh_views();
        }
        // WBF completes at once: WBFS never reads as set. IRE, SIRTP and CFI are reserved
        // (ECAP.IR clear) and ignored.
    }
}
