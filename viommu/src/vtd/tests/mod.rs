use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::descriptor::encode;
use crate::testing::{
    mem, Driver, ManualClock, Mem, RecordingMsi, SharedHost, SimHost, Tables, DRIVER_QUEUE,
};
use crate::walk::PageTable;
use crate::{Access, FaultReason, Perm, PAGE_SIZE};

pub(super) const P: u64 = PAGE_SIZE;
pub(super) const DEV: SourceId = SourceId(0x0018); // 00:03.0
pub(super) const DOMAIN: u16 = 1;

pub(super) struct Fixture {
    pub(super) mem: Mem,
    pub(super) vtd: Vtd<Mem>,
    pub(super) msi: RecordingMsi,
    pub(super) clock: ManualClock,
    pub(super) host: SharedHost,
    pub(super) drv: Driver,
    /// Root table `linux_boot` set up, and where later table allocations go.
    pub(super) root: u64,
    pub(super) next_tables: u64,
}

pub(super) fn fixture_with(config: VtdConfig, host: SimHost) -> Fixture {
    let mem = mem();
    let msi = RecordingMsi::default();
    let clock = ManualClock::default();
    let mut vtd = Vtd::new(
        config,
        mem.clone(),
        Box::new(msi.clone()),
        Box::new(clock.clone()),
    )
    .expect("valid config");
    let host = SharedHost::new(host);
    vtd.attach(DEV, Box::new(host.clone())).expect("attach");
    Fixture {
        mem,
        vtd,
        msi,
        clock,
        host,
        drv: Driver::new(),
        root: 0,
        next_tables: crate::testing::TABLES_BASE + (4 << 20),
    }
}

pub(super) fn fixture() -> Fixture {
    fixture_with(VtdConfig::default(), SimHost::new())
}

/// A unit with no attached device.
pub(super) fn unit(config: VtdConfig) -> Fixture {
    let mem = mem();
    let msi = RecordingMsi::default();
    let clock = ManualClock::default();
    let vtd = Vtd::new(
        config,
        mem.clone(),
        Box::new(msi.clone()),
        Box::new(clock.clone()),
    )
    .expect("valid config");
    Fixture {
        mem,
        vtd,
        msi,
        clock,
        host: SharedHost::new(SimHost::new()),
        drv: Driver::new(),
        root: 0,
        next_tables: crate::testing::TABLES_BASE + (4 << 20),
    }
}

impl Fixture {
    pub(super) fn r32(&self, off: u64) -> u32 {
        Driver::read32(&self.vtd, off)
    }
    pub(super) fn r64(&self, off: u64) -> u64 {
        Driver::read64(&self.vtd, off)
    }
    pub(super) fn w32(&mut self, off: u64, v: u32) {
        Driver::write32(&mut self.vtd, off, v)
    }
    pub(super) fn w64(&mut self, off: u64, v: u64) {
        Driver::write64(&mut self.vtd, off, v)
    }

    /// Brings the unit up as Linux does: QI, root table, a context for DEV in DOMAIN, TE.
    pub(super) fn linux_boot(&mut self) -> (u64, PageTable) {
        let mut t = Tables::new(&self.mem);
        let pt = t.context(DEV, DOMAIN, 4);
        let root = t.root;
        self.drv.enable_qi(&mut self.vtd);
        self.drv.set_root(&mut self.vtd, root);
        assert!(self.drv.submit_sync(
            &mut self.vtd,
            &self.mem,
            &[encode::context_global(), encode::iotlb_global()],
            1
        ));
        self.drv.set_translation(&mut self.vtd, true);
        self.root = root;
        (root, pt)
    }

    /// A table writer over the booted root table, allocating where no earlier one did.
    pub(super) fn tables(&mut self) -> Tables {
        let next = self.next_tables;
        self.next_tables += 1 << 20;
        Tables::resume(&self.mem, self.root, next)
    }

    pub(super) fn sync(&mut self, descs: &[[u64; 2]]) {
        assert!(self
            .drv
            .submit_sync(&mut self.vtd, &self.mem, descs, 0x600d));
    }

    pub(super) fn host_pages(&self) -> Vec<(u64, u64)> {
        self.host
            .get()
            .page_map()
            .iter()
            .map(|(&i, &(g, _))| (i, g))
            .collect()
    }
}

/// Writes a 4 KiB mapping straight into `pt` (tables allocated by `t`).
pub(super) fn map(t: &mut Tables, pt: PageTable, iova: u64, gpa: u64, pages: u64) {
    t.map(pt, iova, gpa, pages * P, Perm::RW);
}

mod ats;
mod caches;
mod check;
mod identity;
mod inject;
mod interrupts;
mod registers;
mod scalable;
mod sharing;
mod sync;

#[test]
fn config_changes_width_caching_mode_and_fault_records() {
    let config = VtdConfig {
        aw_bits: 39,
        caching_mode: false,
        fault_records: 2,
        ..VtdConfig::default()
    };
    let mut vtd = Vtd::new(
        config,
        mem(),
        Box::new(RecordingMsi::default()),
        Box::new(ManualClock::default()),
    )
    .unwrap();
    let cap = Driver::read64(&vtd, CAP_REG);
    assert_eq!((cap >> 8) & 0x1f, 0b010);
    assert_eq!((cap >> 16) & 0x3f, 38);
    assert_eq!(cap & CAP_CM, 0);
    assert_eq!((cap >> 40) & 0xff, 1);
    assert!(matches!(
        vtd.attach(DEV, Box::new(SimHost::new())),
        Err(ConfigError::NoCachingMode(_))
    ));
    for bad in [
        VtdConfig {
            aw_bits: 40,
            ..VtdConfig::default()
        },
        VtdConfig {
            fault_records: 0,
            ..VtdConfig::default()
        },
        VtdConfig {
            fault_records: MAX_FAULT_RECORDS + 1,
            ..VtdConfig::default()
        },
    ] {
        assert!(Vtd::new(
            bad,
            mem(),
            Box::new(RecordingMsi::default()),
            Box::new(ManualClock::default())
        )
        .is_err());
    }
}

#[test]
fn srtp_latches_the_root_and_repeating_it_changes_nothing() {
    let mut f = fixture();
    let (root, pt) = f.linux_boot();
    assert!(f.r32(GSTS_REG) & GSTS_RTPS != 0);
    let mut t = f.tables();
    map(&mut t, pt, 0x10_0000, 0x20_0000, 4);
    f.sync(&[encode::iotlb_page(DOMAIN, 0x10_0000, 2, false)]);
    let before = (f.vtd.stats(), f.host_pages());
    // Rewriting RTADDR does nothing until SRTP; SRTP with the same root is idempotent.
    f.w64(RTADDR_REG, 0x5000);
    assert_eq!(f.host_pages(), before.1);
    f.drv.set_root(&mut f.vtd, root);
    f.drv.set_root(&mut f.vtd, root);
    let after = f.vtd.stats();
    assert_eq!(f.host_pages(), before.1);
    assert_eq!(after.host_map_calls, before.0.host_map_calls);
    assert_eq!(after.host_unmap_calls, before.0.host_unmap_calls);
}

#[test]
fn gcmd_persistent_bits_follow_each_write_and_one_shots_complete_at_once() {
    let mut f = fixture();
    f.drv.enable_qi(&mut f.vtd);
    assert!(f.r32(GSTS_REG) & GSTS_QIES != 0);
    f.w32(GCMD_REG, GCMD_QIE | GCMD_WBF);
    assert_eq!(
        f.r32(GSTS_REG) & GSTS_WBFS,
        0,
        "write-buffer flush completes at once"
    );
    assert!(f.r32(GSTS_REG) & GSTS_QIES != 0);
    // A write without QIE turns queued invalidation off: GCMD is not a set-only register.
    f.w32(GCMD_REG, GCMD_TE);
    let gsts = f.r32(GSTS_REG);
    assert_eq!(gsts & GSTS_QIES, 0);
    assert!(gsts & GSTS_TES != 0);
    // Interrupt-remapping bits are reserved without ECAP.IR.
    f.w32(GCMD_REG, GCMD_TE | GCMD_IRE | GCMD_SIRTP);
    assert_eq!(f.r32(GSTS_REG) & (1 << 25 | 1 << 24), 0);
}

#[test]
fn queue_processes_from_head_to_tail_and_wraps_around() {
    let mut f = fixture();
    f.linux_boot();
    let start = f.vtd.stats().descriptors;
    // 300 descriptors through a 256-entry queue: the tail wraps past the end.
    for i in 0..150 {
        assert!(f
            .drv
            .submit_sync(&mut f.vtd, &f.mem, &[encode::iotlb_global()], i));
    }
    let s = f.vtd.stats();
    assert_eq!(s.descriptors - start, 300);
    assert_eq!(f.r64(IQH_REG), f.r64(IQT_REG));
    assert_eq!(f.r32(FSTS_REG) & FSTS_IQE, 0);
}

#[test]
fn wait_descriptor_writes_status_and_signals_completion_per_iectl() {
    let mut f = fixture();
    f.linux_boot();
    f.w32(IEDATA_REG, 0x55);
    f.w32(IEADDR_REG, 0xfee0_0000);
    let status = f.drv.status;
    f.drv.submit(
        &mut f.vtd,
        &f.mem,
        &[encode::wait(Some((status, 7)), true, false)],
    );
    assert_eq!(f.mem.read_obj::<u32>(GuestAddress(status)).unwrap(), 7);
    assert!(f.r32(ICS_REG) & ICS_IWC != 0);
    assert!(f.r32(IECTL_REG) & ECTL_IP != 0, "masked at reset: pending");
    assert!(f.msi.take().is_empty());
    f.w32(IECTL_REG, 0);
    assert_eq!(
        f.msi.take(),
        vec![(0xfee0_0000, 0x55)],
        "unmasking delivers it"
    );
    assert_eq!(f.r32(IECTL_REG) & ECTL_IP, 0);
    // With IWC still set, a new completion raises nothing (11.4.9.6).
    f.drv
        .submit(&mut f.vtd, &f.mem, &[encode::wait(None, true, false)]);
    assert!(f.msi.take().is_empty());
    f.w32(ICS_REG, ICS_IWC);
    f.drv
        .submit(&mut f.vtd, &f.mem, &[encode::wait(None, true, false)]);
    assert_eq!(f.msi.take().len(), 1);
}

#[test]
fn invalid_descriptor_sets_iqe_stops_at_it_and_resumes_when_cleared() {
    let mut f = fixture();
    f.linux_boot();
    f.w32(FECTL_REG, 0);
    f.w32(FEDATA_REG, 0x66);
    let head = f.r64(IQH_REG);
    let status = f.drv.status;
    f.mem.write_obj(0u32, GuestAddress(status)).unwrap();
    f.drv.submit(
        &mut f.vtd,
        &f.mem,
        &[
            encode::iotlb_global(),
            [0x7, 0], // unknown type
            encode::wait(Some((status, 9)), false, false),
        ],
    );
    assert!(f.r32(FSTS_REG) & FSTS_IQE != 0);
    assert_eq!(
        f.r64(IQH_REG),
        head + (1 << 4),
        "IQH stays at the bad descriptor"
    );
    assert_eq!(f.mem.read_obj::<u32>(GuestAddress(status)).unwrap(), 0);
    assert_eq!(f.msi.take().len(), 1, "the fault event fires");
    // More tail writes do nothing while IQE is set.
    let tail = f.r64(IQT_REG);
    f.w64(IQT_REG, tail);
    assert_eq!(f.r64(IQH_REG), head + (1 << 4));
    // Linux overwrites the bad descriptor and clears IQE; the queue resumes from IQH.
    let bad = f.drv.queue + (head >> 4) * 16 + 16;
    f.mem
        .write_obj(encode::iotlb_global(), GuestAddress(bad))
        .unwrap();
    f.w32(FSTS_REG, FSTS_IQE);
    assert_eq!(f.r32(FSTS_REG) & FSTS_IQE, 0);
    assert_eq!(f.r64(IQH_REG), f.r64(IQT_REG));
    assert_eq!(f.mem.read_obj::<u32>(GuestAddress(status)).unwrap(), 9);
    assert_eq!(f.vtd.stats().descriptors_by_type.invalid, 1);
}

#[test]
fn tail_beyond_the_queue_and_unwritable_status_are_queue_errors() {
    let mut f = fixture();
    f.linux_boot();
    f.w64(IQT_REG, 300 << 4);
    assert!(f.r32(FSTS_REG) & FSTS_IQE != 0);
    let head = f.r64(IQH_REG);
    f.w64(IQT_REG, head);
    f.w32(FSTS_REG, FSTS_IQE);
    assert_eq!(f.r32(FSTS_REG) & FSTS_IQE, 0);
    f.drv.submit(
        &mut f.vtd,
        &f.mem,
        &[encode::wait(Some((1 << 40, 1)), false, false)],
    );
    assert!(f.r32(FSTS_REG) & FSTS_IQE != 0);
}

#[test]
fn queue_at_the_top_of_the_address_space_is_a_queue_error_not_a_wrap() {
    let mut f = fixture();
    f.drv.queue = !0xfff;
    f.drv.enable_qi(&mut f.vtd);
    f.w64(IQT_REG, 255 << 4);
    assert!(f.r32(FSTS_REG) & FSTS_IQE != 0);
    // And the same for the root table: translation on, every lookup faults.
    f.w64(RTADDR_REG, u64::MAX);
    f.w32(GCMD_REG, GCMD_SRTP | GCMD_TE);
    assert!(f.host_pages().is_empty());
}

#[test]
fn queue_at_an_address_outside_guest_memory_is_a_queue_error() {
    let mut f = fixture();
    f.drv.queue = 1 << 40;
    f.drv.enable_qi(&mut f.vtd);
    f.w64(IQT_REG, 1 << 4);
    assert!(f.r32(FSTS_REG) & FSTS_IQE != 0);
    assert_eq!(f.r64(IQH_REG), 0);
}

#[test]
fn register_based_invalidation_completes_and_reports_granularity() {
    let mut f = fixture();
    let mut t = Tables::new(&f.mem);
    let pt = t.context(DEV, DOMAIN, 4);
    let root = t.root;
    f.drv.set_root(&mut f.vtd, root);
    f.drv.set_translation(&mut f.vtd, true);
    map(&mut t, pt, 0x4000, 0x9000, 1);
    // Page-selective through IVA + IOTLB registers (QI off).
    f.w64(IVA_REG, 0x4000);
    f.w64(
        IOTLB_REG,
        IOTLB_IVT | 3 << IOTLB_IIRG_SHIFT | u64::from(DOMAIN) << 32,
    );
    let v = f.r64(IOTLB_REG);
    assert_eq!(v & IOTLB_IVT, 0, "IVT clears when done");
    assert_eq!((v >> IOTLB_IAIG_SHIFT) & 3, 3);
    assert_eq!(f.host_pages(), vec![(0x4000, 0x9000)]);
    // Context command, global.
    f.w64(CCMD_REG, CCMD_ICC | 1 << CCMD_CIRG_SHIFT);
    let v = f.r64(CCMD_REG);
    assert_eq!(v & CCMD_ICC, 0);
    assert_eq!((v >> CCMD_CAIG_SHIFT) & 3, 1);
    // A reserved granularity is reported as not done.
    f.w64(IOTLB_REG, IOTLB_IVT);
    assert_eq!((f.r64(IOTLB_REG) >> IOTLB_IAIG_SHIFT) & 3, 0);
}

#[test]
fn emulated_device_fault_is_recorded_with_reason_and_source_and_signalled() {
    let mut f = fixture();
    let (_, pt) = f.linux_boot();
    f.w32(FEDATA_REG, 0x31);
    f.w32(FEADDR_REG, 0xfee0_1000);
    f.w32(FECTL_REG, 0);
    let mut t = f.tables();
    map(&mut t, pt, 0x1000, 0x5000, 1);
    assert_eq!(
        f.vtd.translate(DEV, 0x1234, Access::Write),
        Ok((0x5234, P - 0x234))
    );
    let e = f.vtd.translate(DEV, 0x9000, Access::Write).unwrap_err();
    assert_eq!(e.reason, FaultReason::WriteNotPermitted);
    assert_eq!(f.msi.take(), vec![(0xfee0_1000, 0x31)]);
    let fsts = f.r32(FSTS_REG);
    assert!(fsts & FSTS_PPF != 0);
    // 11.4.9.1: FRI names the record the first pending fault went to, where software reads.
    assert_eq!(
        (fsts >> 8) & 0xff,
        0,
        "FRI at the first pending fault's record"
    );
    assert!(f.r64(FRCD_REG_BASE + 8) & FRCD_HI_F != 0);
    // A second fault while the first is unserviced raises no second interrupt.
    let unknown = SourceId::new(3, 0, 0);
    let e = f.vtd.translate(unknown, 0, Access::Read).unwrap_err();
    assert_eq!(e.reason, FaultReason::RootEntryNotPresent);
    assert!(f.msi.take().is_empty());
    // Software clears both records; the next fault interrupts again.
    f.w64(FRCD_REG_BASE + 8, FRCD_HI_F);
    f.w64(FRCD_REG_BASE + 16 + 8, FRCD_HI_F);
    assert_eq!(f.r32(FSTS_REG) & FSTS_PPF, 0);
    f.vtd.translate(DEV, 0x9000, Access::Read).unwrap_err();
    assert_eq!(f.msi.take().len(), 1);
    // It went to the third record, which FRI now names.
    assert_eq!((f.r32(FSTS_REG) >> 8) & 0xff, 2);
    assert!(f.r64(FRCD_REG_BASE + 2 * 16 + 8) & FRCD_HI_F != 0);
}

#[test]
fn masked_fault_event_is_pending_until_unmasked() {
    let mut f = fixture();
    f.linux_boot();
    f.vtd
        .translate(SourceId::new(9, 0, 0), 0, Access::Read)
        .unwrap_err();
    assert!(f.r32(FECTL_REG) & ECTL_IP != 0);
    assert!(f.msi.take().is_empty());
    f.w32(FECTL_REG, 0);
    assert_eq!(f.msi.take().len(), 1);
    assert_eq!(f.r32(FECTL_REG) & ECTL_IP, 0);
}

#[test]
fn fault_records_overflow_into_pfo() {
    let config = VtdConfig {
        fault_records: 2,
        ..VtdConfig::default()
    };
    let mut f = fixture_with(config, SimHost::new());
    f.linux_boot();
    for bus in 1..=3 {
        f.vtd
            .translate(SourceId::new(bus, 0, 0), 0, Access::Read)
            .unwrap_err();
    }
    let fsts = f.r32(FSTS_REG);
    assert!(fsts & FSTS_PFO != 0 && fsts & FSTS_PPF != 0);
    f.w32(FSTS_REG, FSTS_PFO);
    assert_eq!(f.r32(FSTS_REG) & FSTS_PFO, 0);
    assert!(f.r32(FSTS_REG) & FSTS_PPF != 0, "PPF is read-only");
}

#[test]
fn fault_processing_disable_suppresses_the_record() {
    let mut f = fixture();
    f.linux_boot();
    let mut t = f.tables();
    let [lo, hi] = t.read_context_raw(DEV);
    t.write_context_raw(DEV, lo | 1 << 1, hi);
    f.vtd.translate(DEV, 0x7000, Access::Read).unwrap_err();
    assert_eq!(f.vtd.stats().faults, 1);
    assert_eq!(f.r32(FSTS_REG) & FSTS_PPF, 0);
}
