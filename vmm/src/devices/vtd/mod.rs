//! The virtual VT-d on the VMM's buses: its register block as an MMIO device (reads from a
//! read-only page where KVM allows, see [`mirror`]), its queue's tail writes taken by KVM when
//! asked (see [`doorbell`]), its interrupts as KVM MSIs, the timer that bounds deferred unmaps,
//! and the DMAR table that announces it.

pub mod doorbell;
pub mod mirror;

use std::ops::{Deref, DerefMut};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use kvm_bindings::kvm_msi;
use kvm_ioctls::VmFd;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::timerfd::TimerFd;

use viommu::dmar::{Dmar, Drhd};
use viommu::{FlushMode, MsiSink, Vtd};

use crate::arch::x86_64::layout::VTD_REGS_START;
use crate::devices::bus::BusDevice;
use doorbell::QueueDoorbells;
use mirror::RegisterMirror;

/// The remapping unit, shared by the vCPUs (register accesses), the devices behind it, the
/// event loop (doorbells, deferred-flush timer) and the stats writer.
pub type SharedVtd = Arc<VtdUnit>;

/// The model plus what publishes it to the guest.
pub struct VtdUnit {
    published: Mutex<Published>,
    doorbells: OnceLock<QueueDoorbells>,
    /// Guest register writes handled (trapped or through doorbells) and the time spent on them,
    /// queue processing and host calls included: what the VMM itself costs the guest.
    writes: AtomicU64,
    write_ns: AtomicU64,
}

/// The model and the page that shows its registers to the guest, under one lock: the page is
/// rendered only by whoever holds the model.
struct Published {
    vtd: Vtd<GuestMemoryMmap>,
    mirror: Option<RegisterMirror>,
}

impl VtdUnit {
    /// Wraps `vtd`; with `mirror`, every change is rendered into its page (rendered once now).
    pub fn new(vtd: Vtd<GuestMemoryMmap>, mut mirror: Option<RegisterMirror>) -> SharedVtd {
        if let Some(m) = &mut mirror {
            m.render(&vtd);
        }
        Arc::new(VtdUnit {
            published: Mutex::new(Published { vtd, mirror }),
            doorbells: OnceLock::new(),
            writes: AtomicU64::new(0),
            write_ns: AtomicU64::new(0),
        })
    }

    /// Locks the unit. A vCPU that panicked while holding it leaves consistent state (every
    /// operation completes or is dropped whole), so a poisoned lock is taken over.
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
            bells.drain(&mut *guard);
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

    /// Counts `n` register writes handled since `start`.
    fn account_writes(&self, n: u64, start: Instant) {
        let ns = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.writes.fetch_add(n, Ordering::Relaxed);
        self.write_ns.fetch_add(ns, Ordering::Relaxed);
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
        let Published { vtd, mirror } = &mut *self.published;
        if let (true, Some(mirror)) = (self.changed, mirror) {
            mirror.render(vtd);
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
        self.0.lock_in_order().mmio_write(offset, data);
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

/// Delivers the unit's fault-event and invalidation-completion interrupts as KVM MSIs.
pub struct KvmMsi(pub Arc<VmFd>);

impl MsiSink for KvmMsi {
    fn send(&self, addr: u64, data: u32) {
        let msi = kvm_msi {
            address_lo: addr as u32,
            address_hi: (addr >> 32) as u32,
            data,
            ..Default::default()
        };
        if let Err(e) = self.0.signal_msi(msi) {
            log::warn!("VT-d: cannot deliver MSI {addr:#x}/{data:#x}: {e}");
        }
    }
}

/// The DMAR table: one remapping unit at [`VTD_REGS_START`] covering every PCI device.
pub fn dmar_table(aw_bits: u32) -> Vec<u8> {
    Dmar {
        host_address_width: aw_bits as u8,
        flags: 0,
        units: vec![Drhd {
            segment: 0,
            register_base: VTD_REGS_START,
            include_pci_all: true,
            scopes: Vec::new(),
        }],
        reserved_regions: Vec::new(),
    }
    .to_bytes(*b"RVMM  ", *b"RVMMDMAR", 1)
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
        VtdUnit::new(vtd, Some(RegisterMirror::unmapped().expect("page")))
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
    fn dmar_table_names_one_include_all_unit_at_the_register_block() {
        let t = dmar_table(48);
        assert_eq!(&t[0..4], b"DMAR");
        assert_eq!(t[36], 47, "host address width minus one");
        let drhd = &t[48..];
        assert_eq!(drhd[4] & 1, 1, "INCLUDE_PCI_ALL");
        assert_eq!(
            u64::from_le_bytes(drhd[8..16].try_into().unwrap()),
            VTD_REGS_START
        );
        assert_eq!(t.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
    }
}
