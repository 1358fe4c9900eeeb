//! The virtual VT-d on the VMM's buses: its register block as an MMIO device (reads from a
//! read-only page where KVM allows, see [`mirror`]), its queue's tail writes taken by KVM when
//! asked (see [`doorbell`]), its interrupts as KVM MSIs, the timer that bounds deferred unmaps,
//! and the DMAR table that announces it.

pub mod blocked;
pub mod doorbell;
pub mod host_time;
pub mod inject;
pub mod intremap;
pub mod mirror;

use std::ops::{Deref, DerefMut};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use kvm_ioctls::VmFd;
use vm_device::interrupt::MsiMessage;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::timerfd::TimerFd;

use viommu::dmar::{DeviceScope, Dmar, Drhd, DMAR_FLAG_INTR_REMAP};
use viommu::record::RecordSummary;
use viommu::{FlushMode, MsiSink, Vtd, VtdConfig};

use crate::arch::x86_64::layout::VTD_REGS_START;
use crate::devices::bus::BusDevice;
use crate::devices::ioapic::{IOAPIC_ID, IOAPIC_SOURCE_ID};
use crate::vstate::vm::signal_msi;
use doorbell::QueueDoorbells;
use host_time::HostDmaTime;
use mirror::RegisterMirror;

/// The remapping unit, shared by the vCPUs (register accesses), the devices behind it, the
/// event loop (doorbells, deferred-flush timer) and the stats writer.
pub type SharedVtd = Arc<VtdUnit>;

/// The model plus what publishes it to the guest.
pub struct VtdUnit {
    published: Mutex<Published>,
    doorbells: OnceLock<QueueDoorbells>,
    /// The file `--viommu inject-control=PATH` names.
    inject_control: OnceLock<std::path::PathBuf>,
    /// Guest register writes handled (trapped or through doorbells) and the time spent on them,
    /// queue processing and host calls included: what the VMM itself costs the guest.
    writes: AtomicU64,
    write_ns: AtomicU64,
    /// Of `write_ns`, the time trapped writes spent waiting for the unit's lock (another vCPU,
    /// the event loop or the stats writer holding it; with queue=async, also carrying out the
    /// tail writes that came before).
    lock_wait_ns: AtomicU64,
    /// The host DMA calls made for the devices behind the unit (within `write_ns` when a
    /// register write made them).
    host_time: Arc<HostDmaTime>,
}

/// The model and the page that shows its registers to the guest, under one lock: the page is
/// rendered only by whoever holds the model.
struct Published {
    vtd: Vtd<GuestMemoryMmap>,
    mirror: Option<RegisterMirror>,
    /// The unit's own interrupts, sent once the page shows what raised them.
    interrupts: Option<KvmMsi>,
}

impl VtdUnit {
    /// Wraps `vtd`; with `mirror`, every change is rendered into its page (rendered once now).
    /// `interrupts` is the sink `vtd` was created with, when it is a [`KvmMsi`]: what it holds
    /// is sent when the lock is released.
    pub fn new(
        vtd: Vtd<GuestMemoryMmap>,
        mut mirror: Option<RegisterMirror>,
        interrupts: Option<KvmMsi>,
    ) -> SharedVtd {
        if let Some(m) = &mut mirror {
            m.render(&vtd);
        }
        Arc::new(VtdUnit {
            published: Mutex::new(Published {
                vtd,
                mirror,
                interrupts,
            }),
            doorbells: OnceLock::new(),
            inject_control: OnceLock::new(),
            writes: AtomicU64::new(0),
            write_ns: AtomicU64::new(0),
            lock_wait_ns: AtomicU64::new(0),
            host_time: Arc::default(),
        })
    }

    /// Locks the unit. A vCPU that panicked while holding it leaves consistent state (every
    /// operation completes or is dropped whole), so a poisoned lock is taken over. Lock order
    /// ([`intremap`]): after a device's or the IOAPIC's lock, before the interrupt routes' and
    /// KVM's routing table's.
    pub fn lock(&self) -> VtdGuard<'_> {
        VtdGuard {
            published: self.published.lock().unwrap_or_else(|e| e.into_inner()),
            changed: false,
        }
    }

    /// Locks the unit after carrying out the tail writes KVM took so far: a trapped register
    /// write must not overtake a queue submission the guest made before it.
    pub fn lock_in_order(&self) -> VtdGuard<'_> {
        let mut guard = self.lock();
        if let Some(bells) = self.doorbells.get() {
            // Those tail writes did not exit: no instruction of this exit is behind them.
            vm_device::origin::scope(None, || bells.drain(&mut *guard));
        }
        guard
    }

    /// Hands tail writes of the queue to `bells` (already registered with KVM). Once only.
    pub fn set_doorbells(&self, bells: QueueDoorbells) -> Result<(), QueueDoorbells> {
        self.doorbells.set(bells)
    }

    /// The doorbells, when the queue runs asynchronously.
    pub fn doorbells(&self) -> Option<&QueueDoorbells> {
        self.doorbells.get()
    }

    /// Names the file whose fault injections the event loop arms as it changes. Once only.
    pub fn set_inject_control(&self, path: std::path::PathBuf) -> Result<(), std::path::PathBuf> {
        self.inject_control.set(path)
    }

    /// The inject control file, if any.
    pub fn inject_control(&self) -> Option<&std::path::Path> {
        self.inject_control.get().map(|p| p.as_path())
    }

    /// Counts `n` register writes handled since `start`.
    fn account_writes(&self, n: u64, start: Instant) {
        let ns = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.writes.fetch_add(n, Ordering::Relaxed);
        self.write_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// Locks the unit as [`VtdUnit::lock_in_order`] does for a register write started at
    /// `start`, counting the wait.
    fn lock_for_write(&self, start: Instant) -> VtdGuard<'_> {
        let guard = self.lock_in_order();
        let ns = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.lock_wait_ns.fetch_add(ns, Ordering::Relaxed);
        guard
    }

    /// Of [`VtdUnit::write_time`]'s nanoseconds, those spent waiting for the unit's lock.
    pub fn lock_wait_ns(&self) -> u64 {
        self.lock_wait_ns.load(Ordering::Relaxed)
    }

    /// Where the host DMA wrappers of the devices behind the unit count their calls.
    pub fn host_time(&self) -> &Arc<HostDmaTime> {
        &self.host_time
    }

    /// Guest register writes handled so far, and the nanoseconds spent handling them.
    pub fn write_time(&self) -> (u64, u64) {
        (
            self.writes.load(Ordering::Relaxed),
            self.write_ns.load(Ordering::Relaxed),
        )
    }

    /// The guest's read-only register page at `offset`, when there is one.
    #[cfg(test)]
    fn mirror_word(&self, offset: u64) -> Option<u64> {
        let published = self.published.lock().unwrap_or_else(|e| e.into_inner());
        published.mirror.as_ref().map(|m| m.word(offset))
    }
}

/// Locks `vtd` (see [`VtdUnit::lock`]).
pub fn lock(vtd: &SharedVtd) -> VtdGuard<'_> {
    vtd.lock()
}

/// The locked model. Mutable use marks the registers changed; dropping the guard then
/// re-renders the guest's read-only register page, so the guest never reads a register older
/// than the last operation that finished.
pub struct VtdGuard<'a> {
    published: MutexGuard<'a, Published>,
    changed: bool,
}

impl Deref for VtdGuard<'_> {
    type Target = Vtd<GuestMemoryMmap>;

    fn deref(&self) -> &Self::Target {
        &self.published.vtd
    }
}

impl DerefMut for VtdGuard<'_> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        self.changed = true;
        &mut self.published.vtd
    }
}

impl Drop for VtdGuard<'_> {
    fn drop(&mut self) {
        let Published {
            vtd,
            mirror,
            interrupts,
        } = &mut *self.published;
        if let (true, Some(mirror)) = (self.changed, mirror) {
            mirror.render(vtd);
        }
        // After the page: the guest's handler may read it before this thread goes on.
        if let Some(interrupts) = interrupts {
            interrupts.flush();
        }
    }
}

/// The register block as an MMIO device at [`VTD_REGS_START`]. With the mirror in place only
/// writes reach it.
pub struct VtdRegisters(pub SharedVtd);

impl BusDevice for VtdRegisters {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        self.0.lock_in_order().mmio_read(offset, data);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        let start = Instant::now();
        self.0.lock_for_write(start).mmio_write(offset, data);
        self.0.account_writes(1, start);
    }
}

/// Carries out rung queue doorbells on the event loop.
pub struct DoorbellWatcher(pub SharedVtd);

impl MutEventSubscriber for DoorbellWatcher {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        if let Some(bells) = self.0.doorbells() {
            let start = Instant::now();
            let n = bells.drain(&mut *self.0.lock());
            self.0.account_writes(n as u64, start);
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        let Some(bells) = self.0.doorbells() else {
            return;
        };
        if let Err(e) = ops.add(Events::new_raw(bells.as_raw_fd(), EventSet::IN)) {
            log::error!("VT-d: cannot watch the queue doorbells: {e:?}");
        }
    }
}

/// Delivers the unit's fault-event and invalidation-completion interrupts as KVM MSIs, as they
/// are: the VT-d spec exempts the interrupts the unit generates itself from remapping. Raised
/// while the unit is locked, they wait until the guard releasing it has rendered the register
/// page ([`VtdUnit::new`]): register reads from the page do not wait for the lock, and a
/// handler on another vCPU (the unit may raise them from the event loop, e.g. for a blocked
/// interrupt's fault) must not read fault or completion status older than the interrupt.
#[derive(Clone)]
pub struct KvmMsi {
    vm: Arc<VmFd>,
    outbox: Arc<Mutex<Vec<MsiMessage>>>,
}

impl KvmMsi {
    pub fn new(vm: Arc<VmFd>) -> Self {
        KvmMsi {
            vm,
            outbox: Arc::new(Mutex::new(Vec::new())),
        }
    }

    /// Sends what was raised since the last flush.
    fn flush(&self) {
        let raised = std::mem::take(&mut *self.outbox.lock().unwrap_or_else(|e| e.into_inner()));
        for m in raised {
            signal_msi(&self.vm, m, "VT-d");
        }
    }
}

impl MsiSink for KvmMsi {
    fn send(&self, addr: u64, data: u32) {
        self.outbox
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(MsiMessage::new(addr, data));
    }
}

/// The DMAR table: one remapping unit at [`VTD_REGS_START`] covering every PCI device. With
/// interrupt remapping the table says so (INTR_REMAP; the x2APIC opt-out stays clear, so a
/// guest may use x2APIC with it) and the unit's device scope names the IOAPIC with the
/// requester ID its requests carry, without which Linux does not enable interrupt remapping.
pub fn dmar_table(config: &VtdConfig) -> Vec<u8> {
    let ir = config.interrupt_remapping;
    let scopes = if ir {
        vec![DeviceScope::IoApic {
            id: IOAPIC_ID,
            bus: IOAPIC_SOURCE_ID.bus(),
            device: IOAPIC_SOURCE_ID.devfn() >> 3,
            function: IOAPIC_SOURCE_ID.devfn() & 7,
        }]
    } else {
        Vec::new()
    };
    Dmar {
        host_address_width: config.aw_bits as u8,
        flags: if ir { DMAR_FLAG_INTR_REMAP } else { 0 },
        units: vec![Drhd {
            segment: 0,
            register_base: VTD_REGS_START,
            include_pci_all: true,
            scopes,
        }],
        reserved_regions: Vec::new(),
    }
    .to_bytes(*b"RVMM  ", *b"RVMMDMAR", 1)
}

/// The unit's counters (all zero without a unit) and configuration as one JSON object, as
/// `--stats-json` writes it: every [`viommu::Stats`] counter (DMA and interrupt remapping),
/// the configuration under "viommu" (null without a unit), and what the VMM itself did.
/// `record` is what a finished recording wrote and cost (while recording, the unit says).
pub fn stats_json(vtd: Option<&SharedVtd>, record: Option<RecordSummary>) -> serde_json::Value {
    let (stats, config, root_table, record, check) = match vtd {
        Some(v) => {
            let v = lock(v);
            let record = record.or_else(|| v.recording());
            (
                v.stats(),
                Some(*v.config()),
                Some(v.root_table_mode()),
                record,
                v.check_counts(),
            )
        }
        None => (
            viommu::Stats::default(),
            None,
            None,
            record,
            viommu::check::CheckCounts::default(),
        ),
    };
    let mut json = serde_json::to_value(stats).unwrap_or_default();
    // The protocol checker's violations, by kind (all zero when it is off).
    json["check"] = serde_json::to_value(check).unwrap_or_default();
    let doorbells = vtd.and_then(|v| v.doorbells()).map(|b| b.carried_out());
    json["viommu"] = serde_json::json!(config.map(|c| serde_json::json!({
        "aw_bits": c.aw_bits,
        "flush": match c.flush {
            FlushMode::Strict => "strict",
            FlushMode::Deferred { .. } => "deferred",
        },
        "queue": if doorbells.is_some() { "async" } else { "sync" },
        "scalable_mode": c.scalable_mode,
        "first_stage": c.first_stage,
        "intremap": c.interrupt_remapping,
        "eim": c.x2apic,
        "caching_mode": c.caching_mode,
        "device_iotlb": c.device_iotlb,
        "check": c.check,
        "cache_entries": {
            "context": c.caches.context,
            "pasid": c.caches.pasid,
            "iotlb": c.caches.iotlb,
            "iec": c.caches.iec,
        },
        // The kind of root table the guest last pointed the unit at (RTADDR.TTM).
        "root_table": match root_table {
            Some(viommu::tables::TableMode::Scalable) => "scalable",
            _ => "legacy",
        },
    })));
    // Tail writes KVM took through the queue doorbells (queue=async).
    json["queue_doorbells"] = serde_json::json!(doorbells.unwrap_or(0));
    // What handling the guest's register writes (queue runs included) cost the VMM.
    let (writes, write_ns) = vtd.map(|v| v.write_time()).unwrap_or((0, 0));
    json["register_writes"] = serde_json::json!(writes);
    json["register_write_ns"] = serde_json::json!(write_ns);
    // Of that: waiting for the unit's lock (trapped writes), and the host DMA calls (all of
    // them, also those the event loop's deferred flushes make).
    json["register_lock_wait_ns"] = serde_json::json!(vtd.map_or(0, |v| v.lock_wait_ns()));
    let (host_calls, host_ns) = vtd.map(|v| v.host_time().get()).unwrap_or((0, 0));
    json["host_dma_calls"] = serde_json::json!(host_calls);
    json["host_dma_ns"] = serde_json::json!(host_ns);
    // Which host domain each passed-through device uses: its own, the shared identity one, or
    // that of another device the guest put in the same domain.
    let domains = vtd.map(|v| lock(v).host_domains()).unwrap_or_default();
    json["host_domains"] = domains
        .iter()
        .map(|d| {
            let on = match d.on {
                viommu::DomainUse::Own => "own".to_string(),
                viommu::DomainUse::SharedIdentity => "identity".to_string(),
                viommu::DomainUse::SharedWith(leader) => leader.to_string(),
            };
            serde_json::json!({
                "source": d.source.to_string(),
                "on": on,
                "own_mappings": d.own_mappings,
                "own_pages": d.own_pages,
            })
        })
        .collect();
    // What recording (record=PATH) wrote and cost: its `ns` is part of register_write_ns.
    json["record"] = serde_json::json!(record);
    json
}

/// In deferred mode, carries out queued host unmaps once their time bound passes even if the
/// guest submits nothing more: a periodic timer at a quarter of the bound.
pub struct DeferredFlushTimer {
    vtd: SharedVtd,
    timer: TimerFd,
}

impl DeferredFlushTimer {
    /// A timer for `vtd`, or None when its flush mode is strict.
    pub fn new(vtd: SharedVtd) -> std::io::Result<Option<Self>> {
        let FlushMode::Deferred { max_delay, .. } = lock(&vtd).config().flush else {
            return Ok(None);
        };
        let mut timer = TimerFd::new()?;
        let period = (max_delay / 4).max(Duration::from_millis(1));
        timer.reset(period, Some(period))?;
        Ok(Some(DeferredFlushTimer { vtd, timer }))
    }
}

impl MutEventSubscriber for DeferredFlushTimer {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        // Reading the expiration count re-arms the level-triggered fd.
        if let Err(e) = self.timer.wait() {
            log::warn!("VT-d: deferred-flush timer: {e}");
        }
        lock(&self.vtd).poll();
    }

    fn init(&mut self, ops: &mut EventOps) {
        let fd = self.timer.as_raw_fd();
        if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
            log::error!("VT-d: cannot watch the deferred-flush timer: {e:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use viommu::regs::{FEDATA_REG, VER_REG};
    use viommu::testing::RecordingMsi;
    use vm_memory::GuestAddress;

    fn unit_with_mirror() -> SharedVtd {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("memory");
        let vtd = Vtd::new(
            viommu::VtdConfig::default(),
            mem,
            Box::new(RecordingMsi::default()),
            Box::new(viommu::SystemClock::default()),
        )
        .expect("config");
        VtdUnit::new(vtd, Some(RegisterMirror::unmapped().expect("page")), None)
    }

    #[test]
    fn the_unit_is_shared_between_threads_and_its_page_follows_each_locked_change() {
        fn shared<T: Send + Sync>() {}
        shared::<VtdUnit>();
        let unit = unit_with_mirror();
        assert_eq!(
            unit.mirror_word(VER_REG),
            Some(0x10),
            "rendered at creation"
        );
        let writer = {
            let unit = unit.clone();
            std::thread::spawn(move || unit.lock().mmio_write(FEDATA_REG, &0xabcdu32.to_le_bytes()))
        };
        writer.join().expect("writer thread");
        let word = unit.mirror_word(FEDATA_REG & !7).expect("a mirror");
        assert_eq!(
            (word >> 32) as u32,
            0xabcd,
            "rendered when the guard dropped"
        );
    }

    #[test]
    fn the_stats_json_has_the_interrupt_remapping_counters_and_configuration() {
        let json = stats_json(None, None);
        assert_eq!(json["viommu"], serde_json::Value::Null);
        assert_eq!(json["interrupts_remapped"], 0);
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("memory");
        let config = viommu::VtdConfig {
            interrupt_remapping: true,
            x2apic: true,
            ..viommu::VtdConfig::default()
        };
        let vtd = Vtd::new(
            config,
            mem,
            Box::new(RecordingMsi::default()),
            Box::new(viommu::SystemClock::default()),
        )
        .expect("config");
        let unit = VtdUnit::new(vtd, None, None);
        // Remapping on (SIRTP, IRE: two cache invalidations), then a request for an entry of
        // the zeroed table: not present, blocked.
        viommu::testing::Driver::new().set_interrupt_remapping(&mut unit.lock(), 0x1_0000, true);
        let msg = vm_device::interrupt::MsiMessage::remappable(1);
        assert_eq!(unit.lock().remap_interrupt(viommu::SourceId(8), msg), None);
        let json = stats_json(Some(&unit), None);
        assert_eq!(json["interrupts_remapped"], 0);
        assert_eq!(json["interrupt_faults"], 1);
        assert_eq!(json["iec_invalidations"], 2);
        assert_eq!(json["viommu"]["intremap"], true);
        assert_eq!(json["viommu"]["eim"], true);
        assert_eq!(json["viommu"]["queue"], "sync");
    }

    #[test]
    fn dmar_table_names_one_include_all_unit_at_the_register_block() {
        let t = dmar_table(&viommu::VtdConfig::default());
        assert_eq!(&t[0..4], b"DMAR");
        assert_eq!(t[36], 47, "host address width minus one");
        let drhd = &t[48..];
        assert_eq!(drhd[4] & 1, 1, "INCLUDE_PCI_ALL");
        assert_eq!(
            u64::from_le_bytes(drhd[8..16].try_into().unwrap()),
            VTD_REGS_START
        );
        assert_eq!(t.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        assert_eq!(t[37], 0, "no interrupt remapping");
        assert_eq!(t.len(), 48 + 16, "no device scope");
    }

    #[test]
    fn with_interrupt_remapping_the_dmar_says_so_and_scopes_the_ioapic_at_its_requester_id() {
        let config = viommu::VtdConfig {
            interrupt_remapping: true,
            x2apic: true,
            aw_bits: 39,
            ..viommu::VtdConfig::default()
        };
        let t = dmar_table(&config);
        assert_eq!(t[36], 38);
        assert_eq!(t[37], 0b01, "INTR_REMAP set, X2APIC_OPT_OUT clear");
        let drhd = &t[48..];
        assert_eq!(u16::from_le_bytes([drhd[2], drhd[3]]), 16 + 8, "one scope");
        // 8.3.1: type 3 (IOAPIC), length 8, enumeration ID = the MADT's IOAPIC ID, start bus
        // 0xff, path device 0 function 0: requester ID ff:00.0.
        assert_eq!(&drhd[16..24], &[3, 8, 0, 0, IOAPIC_ID, 0xff, 0, 0]);
        assert_eq!(IOAPIC_SOURCE_ID, viommu::SourceId::new(0xff, 0, 0));
        assert_eq!(
            u32::from_le_bytes(t[4..8].try_into().unwrap()) as usize,
            t.len()
        );
        assert_eq!(t.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
    }
}
