use std::time::Duration;

use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::descriptor::encode;
use crate::testing::{mem, Driver, ManualClock, Mem, RecordingMsi, SharedHost, SimHost, Tables};
use crate::walk::PageTable;
use crate::{FaultReason, Perm, PAGE_SIZE};

const P: u64 = PAGE_SIZE;
const DEV: SourceId = SourceId(0x0018); // 00:03.0
const DOMAIN: u16 = 1;

struct Fixture {
    mem: Mem,
    vtd: Vtd<Mem>,
    msi: RecordingMsi,
    clock: ManualClock,
    host: SharedHost,
    drv: Driver,
    /// Root table `linux_boot` set up, and where later table allocations go.
    root: u64,
    next_tables: u64,
}

fn fixture_with(config: VtdConfig, host: SimHost) -> Fixture {
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

fn fixture() -> Fixture {
    fixture_with(VtdConfig::default(), SimHost::new())
}

impl Fixture {
    fn r32(&mut self, off: u64) -> u32 {
        Driver::read32(&mut self.vtd, off)
    }
    fn r64(&mut self, off: u64) -> u64 {
        Driver::read64(&mut self.vtd, off)
    }
    fn w32(&mut self, off: u64, v: u32) {
        Driver::write32(&mut self.vtd, off, v)
    }
    fn w64(&mut self, off: u64, v: u64) {
        Driver::write64(&mut self.vtd, off, v)
    }

    /// Brings the unit up as Linux does: QI, root table, a context for DEV in DOMAIN, TE.
    fn linux_boot(&mut self) -> (u64, PageTable) {
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
    fn tables(&mut self) -> Tables {
        let next = self.next_tables;
        self.next_tables += 1 << 20;
        Tables::resume(&self.mem, self.root, next)
    }

    fn sync(&mut self, descs: &[[u64; 2]]) {
        assert!(self
            .drv
            .submit_sync(&mut self.vtd, &self.mem, descs, 0x600d));
    }

    fn host_pages(&self) -> Vec<(u64, u64)> {
        self.host
            .get()
            .page_map()
            .iter()
            .map(|(&i, &(g, _))| (i, g))
            .collect()
    }
}

/// Writes a 4 KiB mapping straight into `pt` (tables allocated by `t`).
fn map(t: &mut Tables, pt: PageTable, iova: u64, gpa: u64, pages: u64) {
    t.map(pt, iova, gpa, pages * P, Perm::RW);
}

#[test]
fn reset_values_report_the_configured_capabilities() {
    let mut f = fixture();
    assert_eq!(f.r32(VER_REG), 0x10);
    let cap = f.r64(CAP_REG);
    assert_eq!(cap & 7, 6, "16-bit domain ids");
    assert!(cap & CAP_CM != 0);
    assert_eq!((cap >> 8) & 0x1f, 0b110, "SAGAW 39 and 48");
    assert_eq!((cap >> 16) & 0x3f, 47, "MGAW");
    assert_eq!(((cap >> 24) & 0x3ff) * 16, FRCD_REG_BASE);
    assert_eq!((cap >> 40) & 0xff, 7, "NFR is 8");
    assert_eq!((cap >> 48) & 0x3f, 18, "MAMV");
    assert!(cap & CAP_PSI != 0 && cap & CAP_SLLPS_2M != 0 && cap & CAP_SLLPS_1G != 0);
    let ecap = f.r64(ECAP_REG);
    assert!(ecap & ECAP_QI != 0 && ecap & ECAP_PT != 0 && ecap & ECAP_C != 0);
    assert_eq!(((ecap >> 8) & 0x3ff) * 16, IOTLB_REG_BASE);
    assert_eq!(f.r32(GSTS_REG), 0);
    assert_eq!(f.r32(FECTL_REG), ECTL_IM, "fault event masked at reset");
    assert_eq!(f.r32(IECTL_REG), ECTL_IM);
}

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
    let cap = Driver::read64(&mut vtd, CAP_REG);
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
fn read_only_registers_ignore_writes() {
    let mut f = fixture();
    let (cap, ecap) = (f.r64(CAP_REG), f.r64(ECAP_REG));
    f.w64(CAP_REG, 0);
    f.w64(ECAP_REG, 0);
    f.w32(VER_REG, 0);
    f.w32(GSTS_REG, u32::MAX);
    f.w64(IQH_REG, 0x50);
    assert_eq!((f.r64(CAP_REG), f.r64(ECAP_REG)), (cap, ecap));
    assert_eq!(f.r32(VER_REG), 0x10);
    assert_eq!(f.r32(GSTS_REG), 0);
    assert_eq!(f.r64(IQH_REG), 0);
    assert_eq!(f.r32(GCMD_REG), 0, "GCMD is write-only");
}

#[test]
fn sixty_four_bit_registers_take_two_32_bit_halves() {
    let mut f = fixture();
    f.w32(RTADDR_REG, 0x1234_5000);
    f.w32(RTADDR_REG + 4, 0x1);
    assert_eq!(f.r64(RTADDR_REG), 0x1_1234_5000);
    assert_eq!(f.r32(RTADDR_REG + 4), 1);
    f.w32(RTADDR_REG, 0x7000);
    assert_eq!(
        f.r64(RTADDR_REG),
        0x1_0000_7000,
        "a low write keeps the high half"
    );
}

#[test]
fn eight_byte_access_to_a_32_bit_pair_reaches_both_registers() {
    let mut f = fixture();
    f.w64(FEADDR_REG, 0x1_fee0_0000);
    assert_eq!(f.r32(FEADDR_REG), 0xfee0_0000);
    assert_eq!(f.r32(FEUADDR_REG), 0x1);
    assert_eq!(f.r64(FEADDR_REG), 0x1_fee0_0000);
}

#[test]
fn odd_sized_or_misaligned_accesses_are_ignored() {
    let mut f = fixture();
    f.vtd.mmio_write(FEDATA_REG, &[1, 2]);
    f.vtd.mmio_write(FEDATA_REG + 1, &[1, 2, 3, 4]);
    assert_eq!(f.r32(FEDATA_REG), 0);
    let mut b = [0xffu8; 2];
    f.vtd.mmio_read(VER_REG, &mut b);
    assert_eq!(b, [0, 0]);
    let mut b = [0xffu8; 4];
    f.vtd.mmio_read(0xfff, &mut b[..1]);
    f.vtd.mmio_read(REG_WINDOW_SIZE + 0x100, &mut b);
    assert_eq!(b, [0; 4], "beyond the window reads zero");
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
fn translation_off_gives_attached_devices_all_guest_ram() {
    let f = fixture();
    let pages = f.host.get().page_map();
    assert_eq!(pages.len() as u64, crate::testing::TEST_MEM_SIZE / P);
    assert_eq!(
        f.host.get().mappings(),
        1,
        "one host mapping for one RAM region"
    );
}

#[test]
fn enabling_translation_leaves_exactly_the_guest_tables_mapped() {
    let mut f = fixture();
    f.linux_boot();
    assert!(f.host_pages().is_empty(), "an empty domain maps nothing");
    let mut t = f.tables();
    let pt = PageTable {
        root: t.read_context_raw(DEV)[0] & !0xfff,
        levels: 4,
    };
    map(&mut t, pt, 0x1000, 0x3000, 1);
    f.sync(&[encode::iotlb_page(DOMAIN, 0x1000, 0, false)]);
    assert_eq!(f.host_pages(), vec![(0x1000, 0x3000)]);
    f.drv.set_translation(&mut f.vtd, false);
    assert_eq!(
        f.host_pages().len() as u64,
        crate::testing::TEST_MEM_SIZE / P
    );
}

#[test]
fn strict_unmap_is_done_on_the_host_before_the_wait_status_is_written() {
    struct Watch {
        inner: SharedHost,
        mem: Mem,
        status: u64,
        seen: std::sync::Arc<std::sync::Mutex<Vec<u32>>>,
    }
    impl HostDma for Watch {
        fn map(&mut self, i: u64, g: u64, l: u64, p: Perm) -> Result<(), crate::HostDmaError> {
            self.inner.map(i, g, l, p)
        }
        fn unmap(&mut self, i: u64, l: u64) -> Result<(), crate::HostDmaError> {
            let s = self.mem.read_obj::<u32>(GuestAddress(self.status)).unwrap();
            self.seen.lock().unwrap().push(s);
            self.inner.unmap(i, l)
        }
    }
    let mem = mem();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut vtd = Vtd::new(
        VtdConfig::default(),
        mem.clone(),
        Box::new(RecordingMsi::default()),
        Box::new(ManualClock::default()),
    )
    .unwrap();
    let mut drv = Driver::new();
    let watch = Watch {
        inner: SharedHost::default(),
        mem: mem.clone(),
        status: drv.status,
        seen: seen.clone(),
    };
    vtd.attach(DEV, Box::new(watch)).unwrap();
    let mut t = Tables::new(&mem);
    let pt = t.context(DEV, DOMAIN, 4);
    drv.enable_qi(&mut vtd);
    drv.set_root(&mut vtd, t.root);
    drv.set_translation(&mut vtd, true);
    t.map(pt, 0x8000, 0x1000, P, Perm::RW);
    assert!(drv.submit_sync(
        &mut vtd,
        &mem,
        &[encode::iotlb_page(DOMAIN, 0x8000, 0, false)],
        1
    ));
    seen.lock().unwrap().clear();
    t.unmap(pt, 0x8000, P);
    assert!(drv.submit_sync(
        &mut vtd,
        &mem,
        &[encode::iotlb_page(DOMAIN, 0x8000, 0, false)],
        2
    ));
    assert_eq!(
        *seen.lock().unwrap(),
        vec![0],
        "unmapped before the status word was written"
    );
    assert!(vtd.host_mappings(DEV).is_empty());
}

#[test]
fn scatter_gather_psi_maps_once_and_unmaps_with_one_flush() {
    let mut f = fixture();
    let (_, pt) = f.linux_boot();
    let boot = f.vtd.stats();
    let mut t = f.tables();
    map(&mut t, pt, 0x20_0000, 0x40_0000, 32);
    f.sync(&[encode::iotlb_page(DOMAIN, 0x20_0000, 5, false)]);
    let s = f.vtd.stats();
    assert_eq!(s.host_map_calls - boot.host_map_calls, 1);
    assert_eq!(f.host_pages().len(), 32);
    t.unmap(pt, 0x20_0000, 32 * P);
    f.sync(&[encode::iotlb_page(DOMAIN, 0x20_0000, 5, false)]);
    let s2 = f.vtd.stats();
    assert_eq!(s2.host_unmap_calls - s.host_unmap_calls, 1);
    assert_eq!(s2.host_mappings_removed - s.host_mappings_removed, 1);
    assert_eq!(f.host.get().flushes, s2.host_mappings_removed);
}

#[test]
fn descriptors_of_one_submission_are_synced_together() {
    let mut f = fixture();
    let (_, pt) = f.linux_boot();
    let mut t = f.tables();
    // Four adjacent single-page maps invalidated by four PSIs in one submission.
    map(&mut t, pt, 0x10_0000, 0x30_0000, 4);
    let descs: Vec<_> = (0..4)
        .map(|i| encode::iotlb_page(DOMAIN, 0x10_0000 + i * P, 0, false))
        .collect();
    let before = f.vtd.stats().host_map_calls;
    f.sync(&descs);
    assert_eq!(f.vtd.stats().host_map_calls - before, 1);
}

#[test]
fn domain_invalidation_does_host_work_only_for_what_changed() {
    let mut f = fixture();
    let (_, pt) = f.linux_boot();
    let mut t = f.tables();
    for i in 0..64 {
        map(&mut t, pt, i * 2 * P, 0x10_0000 + i * 4 * P, 1);
    }
    let boot = f.vtd.stats();
    f.sync(&[encode::iotlb_domain(DOMAIN)]);
    let s = f.vtd.stats();
    assert_eq!(s.host_map_calls - boot.host_map_calls, 64);
    // Lazy-mode guest: clear 8 entries, then one domain-selective flush.
    for i in 0..8 {
        t.unmap(pt, i * 2 * 4 * P, P);
    }
    f.sync(&[encode::iotlb_domain(DOMAIN)]);
    let s2 = f.vtd.stats();
    assert_eq!(s2.host_mappings_removed - s.host_mappings_removed, 8);
    assert_eq!(s2.host_map_calls, s.host_map_calls, "nothing re-mapped");
    assert_eq!(f.host_pages().len(), 56);
}

#[test]
fn context_change_moves_the_device_to_its_new_domain_tables() {
    let mut f = fixture();
    let (_, pt) = f.linux_boot();
    let mut t = f.tables();
    map(&mut t, pt, 0x1000, 0x5000, 1);
    f.sync(&[encode::iotlb_domain(DOMAIN)]);
    let pt2 = t.page_table(3);
    map(&mut t, pt2, 0x7000, 0x9000, 1);
    t.attach(DEV, 2, pt2);
    f.sync(&[encode::context_device(0, DEV, 0), encode::iotlb_domain(2)]);
    assert_eq!(f.host_pages(), vec![(0x7000, 0x9000)]);
    // Context entry cleared: the device reaches nothing.
    t.write_context_raw(DEV, 0, 0);
    f.sync(&[encode::context_global()]);
    assert!(f.host_pages().is_empty());
}

#[test]
fn pass_through_context_maps_all_guest_ram() {
    let mut f = fixture();
    f.linux_boot();
    let mut t = f.tables();
    t.attach_pass_through(DEV, 3);
    f.sync(&[encode::context_device(0, DEV, 0)]);
    assert_eq!(
        f.host_pages().len() as u64,
        crate::testing::TEST_MEM_SIZE / P
    );
}

#[test]
fn mappings_outside_guest_ram_are_not_given_to_the_host() {
    let mut f = fixture();
    let (_, pt) = f.linux_boot();
    let mut t = f.tables();
    let beyond = crate::testing::TEST_MEM_SIZE;
    map(&mut t, pt, 0x1000, beyond - P, 2);
    f.sync(&[encode::iotlb_page(DOMAIN, 0x1000, 1, false)]);
    assert_eq!(f.host_pages(), vec![(0x1000, beyond - P)]);
}

#[test]
fn refused_host_map_becomes_a_fault_record_for_the_device() {
    let mut f = fixture_with(VtdConfig::default(), SimHost::with_limit(2));
    let (_, pt) = f.linux_boot();
    let mut t = f.tables();
    for i in 0..3 {
        map(&mut t, pt, i * 2 * P, 0x10_0000 + i * 4 * P, 1);
    }
    f.sync(&[encode::iotlb_domain(DOMAIN)]);
    let s = f.vtd.stats();
    assert_eq!(s.host_errors, 1);
    assert_eq!(s.faults, 1);
    assert!(f.r32(FSTS_REG) & FSTS_PPF != 0);
    let hi = f.r64(FRCD_REG_BASE + 8);
    assert_eq!(hi & 0xffff, u64::from(DEV.0));
    assert_eq!((hi >> 32) & 0xff, FaultReason::ReadNotPermitted as u64);
    assert_eq!(f.r64(FRCD_REG_BASE), 4 * P);
    assert_eq!(
        f.vtd.host_mappings(DEV).len(),
        2,
        "the shadow says what the host has"
    );
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
    assert_eq!((fsts >> 8) & 0xff, 1, "FRI moved to the next record");
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

fn deferred_fixture() -> Fixture {
    let config = VtdConfig {
        flush: FlushMode::Deferred {
            max_pending: 4,
            max_delay: Duration::from_millis(10),
        },
        ..VtdConfig::default()
    };
    fixture_with(config, SimHost::new())
}

#[test]
fn deferred_unmaps_wait_for_the_count_bound() {
    let mut f = deferred_fixture();
    let (_, pt) = f.linux_boot();
    let boot = f.vtd.stats();
    let mut t = f.tables();
    for i in 0..4 {
        map(&mut t, pt, i * 2 * P, 0x10_0000 + i * 4 * P, 1);
        f.sync(&[encode::iotlb_page(DOMAIN, i * 2 * P, 0, false)]);
    }
    for i in 0..3 {
        t.unmap(pt, i * 2 * P, P);
        f.sync(&[encode::iotlb_page(DOMAIN, i * 2 * P, 0, false)]);
    }
    assert_eq!(f.host_pages().len(), 4, "unmaps deferred");
    assert_eq!(f.vtd.deferred_pending(), 3);
    t.unmap(pt, 3 * 2 * P, P);
    f.sync(&[encode::iotlb_page(DOMAIN, 3 * 2 * P, 0, false)]);
    assert!(f.host_pages().is_empty(), "the fourth reaches the bound");
    let s = f.vtd.stats();
    assert_eq!(s.deferred_flushes, 1);
    assert_eq!(
        s.host_unmap_calls - boot.host_unmap_calls,
        1,
        "one call for all four"
    );
}

#[test]
fn deferred_unmaps_wait_for_the_time_bound() {
    let mut f = deferred_fixture();
    let (_, pt) = f.linux_boot();
    let mut t = f.tables();
    map(&mut t, pt, 0, 0x10_0000, 1);
    f.sync(&[encode::iotlb_page(DOMAIN, 0, 0, false)]);
    t.unmap(pt, 0, P);
    f.sync(&[encode::iotlb_page(DOMAIN, 0, 0, false)]);
    assert_eq!(f.vtd.next_deadline(), Some(Duration::from_millis(10)));
    f.clock.advance(Duration::from_millis(9));
    f.vtd.poll();
    assert_eq!(f.host_pages().len(), 1);
    f.clock.advance(Duration::from_millis(1));
    f.vtd.poll();
    assert!(f.host_pages().is_empty());
    assert_eq!(f.vtd.next_deadline(), None);
}

#[test]
fn deferred_remap_of_the_same_translation_cancels_the_unmap() {
    let mut f = deferred_fixture();
    let (_, pt) = f.linux_boot();
    let mut t = f.tables();
    map(&mut t, pt, 0x3000, 0x10_0000, 1);
    f.sync(&[encode::iotlb_page(DOMAIN, 0x3000, 0, false)]);
    let base = f.vtd.stats();
    for _ in 0..100 {
        t.unmap(pt, 0x3000, P);
        f.sync(&[encode::iotlb_page(DOMAIN, 0x3000, 0, false)]);
        map(&mut t, pt, 0x3000, 0x10_0000, 1);
        f.sync(&[encode::iotlb_page(DOMAIN, 0x3000, 0, false)]);
    }
    let s = f.vtd.stats();
    assert_eq!(s.host_map_calls, base.host_map_calls);
    assert_eq!(s.host_unmap_calls, base.host_unmap_calls);
    assert_eq!(s.deferred_unmaps_cancelled, 100);
}

#[test]
fn deferred_mode_still_unmaps_at_once_when_the_device_changes_domain() {
    let mut f = deferred_fixture();
    let (_, pt) = f.linux_boot();
    let mut t = f.tables();
    map(&mut t, pt, 0, 0x10_0000, 1);
    f.sync(&[encode::iotlb_page(DOMAIN, 0, 0, false)]);
    t.unmap(pt, 0, P);
    f.sync(&[encode::iotlb_page(DOMAIN, 0, 0, false)]);
    assert_eq!(f.host_pages().len(), 1);
    t.write_context_raw(DEV, 0, 0);
    f.sync(&[encode::context_device(0, DEV, 0)]);
    assert!(f.host_pages().is_empty());
    assert_eq!(f.vtd.deferred_pending(), 0);
}

#[test]
fn per_leaf_baseline_reaches_the_same_host_translations() {
    let run = |strategy| {
        let config = VtdConfig {
            strategy,
            ..VtdConfig::default()
        };
        let mut f = fixture_with(config, SimHost::new());
        let (_, pt) = f.linux_boot();
        let mut t = f.tables();
        map(&mut t, pt, 0x20_0000, 0x40_0000, 32);
        t.map_large(pt, 0x4000_0000, 0x20_0000, 2, Perm::READ);
        f.sync(&[
            encode::iotlb_page(DOMAIN, 0x20_0000, 5, false),
            encode::iotlb_page(DOMAIN, 0x4000_0000, 9, false),
        ]);
        t.unmap(pt, 0x20_0000, 8 * P);
        f.sync(&[encode::iotlb_page(DOMAIN, 0x20_0000, 3, false)]);
        let s = f.vtd.stats();
        let calls = s.host_map_calls + s.host_unmap_calls;
        let pages = f.host.get().page_map();
        (pages, calls)
    };
    let (batched, batched_calls) = run(SyncStrategy::Batched);
    let (baseline, baseline_calls) = run(SyncStrategy::PerLeaf);
    assert_eq!(batched, baseline);
    assert!(batched_calls < baseline_calls);
}

#[test]
fn detach_removes_every_host_mapping() {
    let mut f = fixture();
    assert!(!f.host_pages().is_empty());
    f.vtd.detach(DEV);
    assert!(f.host_pages().is_empty());
}

#[test]
fn hostile_self_referencing_tables_stop_at_the_walk_budget() {
    let config = VtdConfig {
        walk_budget: 4096,
        ..VtdConfig::default()
    };
    let mut f = fixture_with(config, SimHost::new());
    let (_, pt) = f.linux_boot();
    let t = f.tables();
    for i in 0..512 {
        t.write_u64(pt.root + i * 8, pt.root | 3);
    }
    f.sync(&[encode::iotlb_global()]);
    assert_eq!(f.vtd.stats().walk_budget_exceeded, 1);
    assert!(f.host_pages().is_empty());
}

#[test]
fn domain_invalidation_after_a_partial_sync_does_not_trust_an_old_table_snapshot() {
    let mut f = fixture();
    let (_, pt) = f.linux_boot();
    let mut t = f.tables();
    map(&mut t, pt, 0x20_0000, 0x30_0000, 1);
    // A full sync snapshots the table with one entry.
    f.sync(&[encode::iotlb_domain(DOMAIN)]);
    // A second entry, synced by a PSI only: the span now differs from the snapshot.
    map(&mut t, pt, 0x20_1000, 0x50_0000, 1);
    f.sync(&[encode::iotlb_page(DOMAIN, 0x20_1000, 0, false)]);
    assert_eq!(f.host_pages().len(), 2);
    // Back to the snapshot's content, then a domain flush: the host must follow.
    t.unmap(pt, 0x20_1000, P);
    f.sync(&[encode::iotlb_domain(DOMAIN)]);
    assert_eq!(f.host_pages(), vec![(0x20_0000, 0x30_0000)]);
}

#[test]
fn domain_invalidation_skips_unchanged_last_level_tables() {
    let mut f = fixture();
    let (_, pt) = f.linux_boot();
    let mut t = f.tables();
    // 16 tables' worth of mappings that stay, and one page that changes.
    for k in 0..16u64 {
        map(
            &mut t,
            pt,
            0x4000_0000 + k * (2 << 20),
            0x10_0000 + k * 2 * P,
            1,
        );
    }
    f.sync(&[encode::iotlb_domain(DOMAIN)]);
    map(&mut t, pt, 0x8000_0000, 0x30_0000, 1);
    let before = f.vtd.stats();
    f.sync(&[encode::iotlb_domain(DOMAIN)]);
    let after = f.vtd.stats();
    assert_eq!(after.host_map_calls - before.host_map_calls, 1);
    assert_eq!(f.host_pages().len(), 17);
}
