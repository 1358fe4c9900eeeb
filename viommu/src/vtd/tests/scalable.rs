//! Scalable mode in the unit: capabilities and their configuration, RTADDR.TTM and IQA.DW, the
//! 256-bit queue, PASID-cache and PASID-based invalidations reaching the host, first-stage
//! translation of emulated devices, and faults carrying their PASID.

use super::*;
use crate::fault::PasidTag;
use crate::first_stage::FirstStageTable;
use crate::tables::TableMode;
use crate::testing::{FirstStageFlags, ScalableTables};

fn sm_config() -> VtdConfig {
    VtdConfig {
        scalable_mode: true,
        ..VtdConfig::default()
    }
}

fn fs_config() -> VtdConfig {
    VtdConfig {
        first_stage: true,
        ..sm_config()
    }
}

impl Fixture {
    /// Brings the unit up as Linux 6.1 does in scalable mode: a queue of 256-bit descriptors
    /// (two pages, QS = 1), the scalable-mode root table, a global PASID-cache, context and
    /// IOTLB invalidation, then TE.
    fn sm_boot(&mut self, t: &ScalableTables) {
        self.drv.wide = true;
        self.drv.enable_qi(&mut self.vtd);
        self.drv.set_scalable_root(&mut self.vtd, t.root);
        assert_eq!(self.vtd.root_table_mode(), TableMode::Scalable);
        self.sync(&[
            encode::pasid_cache_global(),
            encode::context_global(),
            encode::iotlb_global(),
        ]);
        self.drv.set_translation(&mut self.vtd, true);
        self.root = t.root;
    }

    /// A scalable-mode table writer above everything allocated so far.
    fn sm_tables(&mut self) -> ScalableTables {
        let base = self.next_tables;
        self.next_tables += 1 << 20;
        ScalableTables::at(&self.mem, base)
    }

    fn frcd(&self, record: u64) -> (u64, u64) {
        let base = FRCD_REG_BASE + record * FRCD_REG_SIZE;
        (self.r64(base), self.r64(base + 8))
    }
}

/// A scalable-mode unit with DEV attached behind a second-stage RID_PASID entry in DOMAIN.
fn sm_fixture() -> (Fixture, ScalableTables, PageTable) {
    let mut f = fixture_with(sm_config(), SimHost::new());
    let mut t = f.sm_tables();
    let pt = t.attach_second_stage(DEV, DOMAIN, 4);
    f.sm_boot(&t);
    (f, t, pt)
}

#[test]
fn scalable_mode_and_first_stage_are_advertised_only_when_configured() {
    let legacy = unit(VtdConfig::default());
    let ecap = legacy.r64(ECAP_REG);
    assert_eq!(
        ecap & (ECAP_SMTS | ECAP_SLTS | ECAP_FLTS | ECAP_PASID | ECAP_SMPWC | ECAP_SRS),
        0
    );
    assert_eq!(legacy.r64(CAP_REG) & CAP_FL1GP, 0);
    let sm = unit(sm_config());
    let ecap = sm.r64(ECAP_REG);
    assert_eq!(
        ecap & (ECAP_SMTS | ECAP_SLTS | ECAP_PASID | ECAP_SMPWC),
        ECAP_SMTS | ECAP_SLTS | ECAP_PASID | ECAP_SMPWC
    );
    assert_eq!((ecap >> ECAP_PSS_SHIFT) & 0x1f, 19, "20-bit PASIDs");
    assert_eq!(ecap & (ECAP_FLTS | ECAP_SRS), 0);
    // What the unit does not offer stays clear: nested, PRS, EAFS, SSADS, RPRIVS, SC, DT.
    assert_eq!(
        ecap & (1 << 26 | ECAP_PRS | ECAP_EAFS | ECAP_SSADS | ECAP_RPRIVS | ECAP_SC | ECAP_DT),
        0
    );
    assert!(sm.r64(CAP_REG) & CAP_FL1GP != 0);
    assert_eq!(sm.r64(CAP_REG) & CAP_FL5LP, 0);
    let fs = unit(fs_config());
    assert_eq!(
        fs.r64(ECAP_REG) & (ECAP_FLTS | ECAP_SRS),
        ECAP_FLTS | ECAP_SRS
    );
}

#[test]
fn first_stage_needs_scalable_mode_48_bits_and_no_device_the_host_remaps() {
    let make = |config| {
        Vtd::new(
            config,
            mem(),
            Box::new(RecordingMsi::default()),
            Box::new(ManualClock::default()),
        )
    };
    assert_eq!(
        make(VtdConfig {
            first_stage: true,
            ..VtdConfig::default()
        })
        .err(),
        Some(ConfigError::FirstStageWithoutScalableMode)
    );
    assert_eq!(
        make(VtdConfig {
            aw_bits: 39,
            ..fs_config()
        })
        .err(),
        Some(ConfigError::FirstStageAddressWidth(39))
    );
    let mut f = unit(fs_config());
    assert_eq!(
        f.vtd.attach(DEV, Box::new(SimHost::new())),
        Err(ConfigError::FirstStageWithHostDevice(DEV))
    );
}

#[test]
fn ttm_and_dw_are_reserved_without_smts_and_latched_with_it() {
    let mut legacy = unit(VtdConfig::default());
    legacy.w64(RTADDR_REG, 0x5000 | RTADDR_TTM_MASK);
    assert_eq!(legacy.r64(RTADDR_REG), 0x5000, "TTM bits read as zero");
    legacy.w64(IQA_REG, DRIVER_QUEUE | IQA_DW | 1);
    assert_eq!(legacy.r64(IQA_REG), DRIVER_QUEUE | 1, "DW reads as zero");
    legacy.w32(GCMD_REG, GCMD_SRTP);
    assert_eq!(legacy.vtd.root_table_mode(), TableMode::Legacy);

    let mut sm = unit(sm_config());
    sm.w64(RTADDR_REG, 0x5000 | RTADDR_TTM_MASK);
    assert_eq!(
        sm.r64(RTADDR_REG),
        0x5000 | RTADDR_TTM_SCALABLE,
        "abort-DMA mode (bit 11) is not offered"
    );
    assert_eq!(sm.vtd.root_table_mode(), TableMode::Legacy, "until SRTP");
    sm.w32(GCMD_REG, GCMD_SRTP);
    assert_eq!(sm.vtd.root_table_mode(), TableMode::Scalable);
    assert_eq!(sm.vtd.root_table(), 0x5000);
    sm.w64(RTADDR_REG, 0x5000);
    sm.w32(GCMD_REG, GCMD_SRTP);
    assert_eq!(sm.vtd.root_table_mode(), TableMode::Legacy);
}

#[test]
fn an_attached_device_behind_a_second_stage_pasid_entry_is_shadowed_as_in_legacy_mode() {
    let (mut f, mut t, pt) = sm_fixture();
    assert!(f.host_pages().is_empty(), "an empty domain maps nothing");
    // Linux 6.1 invalidates second-stage mappings with type-2 descriptors, 256 bits wide.
    t.pages().map(pt, 0x10_0000, 0x20_0000, 4 * P, Perm::RW);
    f.sync(&[encode::iotlb_page(DOMAIN, 0x10_0000, 2, false)]);
    assert_eq!(
        f.host_pages(),
        (0..4)
            .map(|i| (0x10_0000 + i * P, 0x20_0000 + i * P))
            .collect::<Vec<_>>()
    );
    assert_eq!(
        f.host.get().mappings(),
        1,
        "coalesced into one host mapping"
    );
    let flushes = f.host.get().flushes;
    t.pages().unmap(pt, 0x10_0000, 4 * P);
    f.sync(&[encode::iotlb_page(DOMAIN, 0x10_0000, 2, false)]);
    assert!(f.host_pages().is_empty());
    assert_eq!(f.host.get().flushes - flushes, 1, "one host IOTLB flush");
    let s = f.vtd.stats();
    assert_eq!(s.descriptors, s.wide_descriptors);
    assert_eq!(s.descriptors_by_type.pasid_cache, 1);
    assert_eq!(f.r32(FSTS_REG) & FSTS_IQE, 0);
}

#[test]
fn pasid_based_iotlb_invalidations_reach_the_host_for_the_pasid_they_name() {
    let (mut f, mut t, pt) = sm_fixture();
    t.pages().map(pt, 0x10_0000, 0x20_0000, P, Perm::RW);
    // Another PASID or domain: not this device's RID_PASID entry.
    f.sync(&[
        encode::pasid_iotlb_page(DOMAIN, 1, 0x10_0000, 0, false),
        encode::pasid_iotlb_pasid(DOMAIN + 1, 0),
    ]);
    assert!(f.host_pages().is_empty());
    f.sync(&[encode::pasid_iotlb_page(DOMAIN, 0, 0x10_0000, 0, false)]);
    assert_eq!(f.host_pages(), vec![(0x10_0000, 0x20_0000)]);
    t.pages().map(pt, 0x40_0000, 0x30_0000, P, Perm::RW);
    f.sync(&[encode::pasid_iotlb_pasid(DOMAIN, 0)]);
    assert_eq!(f.host_pages().len(), 2, "PASID-selective covers everything");
    assert_eq!(f.vtd.stats().descriptors_by_type.pasid_iotlb, 4);
}

#[test]
fn a_pasid_cache_invalidation_moves_the_device_to_what_its_entry_now_says() {
    let (mut f, mut t, pt) = sm_fixture();
    t.pages().map(pt, 0x10_0000, 0x20_0000, P, Perm::RW);
    f.sync(&[encode::iotlb_domain(DOMAIN)]);
    let other = t.pages().page_table(3);
    t.pages().map(other, 0x50_0000, 0x60_0000, P, Perm::RW);
    t.second_stage(DEV, 0, 9, other);
    // A PASID-cache invalidation of another domain's entry leaves the cached one.
    f.sync(&[encode::pasid_cache_pasid(DOMAIN + 5, 0)]);
    assert_eq!(f.host_pages(), vec![(0x10_0000, 0x20_0000)]);
    f.sync(&[encode::pasid_cache_pasid(DOMAIN, 0)]);
    assert_eq!(f.host_pages(), vec![(0x50_0000, 0x60_0000)]);
    // Pass-through: all of guest RAM.
    t.pass_through(DEV, 0, 1);
    f.sync(&[encode::pasid_cache_domain(9)]);
    let pages = f.host_pages();
    assert_eq!(pages.len() as u64, crate::testing::TEST_MEM_SIZE / P);
    assert!(pages.iter().all(|&(i, g)| i == g));
    // The entry goes away: nothing is reachable.
    t.write_pasid_raw(DEV, 0, [0; 8]);
    f.sync(&[encode::pasid_cache_global()]);
    assert!(f.host_pages().is_empty());
    assert_eq!(f.vtd.stats().faults, 0, "a missing entry is no fault");
}

#[test]
fn a_device_the_host_remaps_pointed_at_a_first_stage_table_is_blocked_with_the_specs_fault() {
    let (mut f, mut t, pt) = sm_fixture();
    t.pages().map(pt, 0x10_0000, 0x20_0000, P, Perm::RW);
    f.sync(&[encode::iotlb_domain(DOMAIN)]);
    assert_eq!(f.host_pages().len(), 1);
    let fs = t.first_stage_table();
    t.map_first_stage(fs, 0x10_0000, 0x20_0000, P, FirstStageFlags::USER_RW);
    t.first_stage(DEV, 0, DOMAIN, fs);
    f.sync(&[encode::pasid_cache_pasid(DOMAIN, 0)]);
    assert!(
        f.host_pages().is_empty(),
        "never a stale second-stage mapping"
    );
    let (_, hi) = f.frcd(0);
    assert!(hi & FRCD_HI_F != 0);
    assert_eq!(
        (hi & FRCD_HI_FR_MASK) >> FRCD_HI_FR_SHIFT,
        FaultReason::PasidEntryInvalid as u64
    );
    assert_eq!(hi & FRCD_HI_SID_MASK, u64::from(DEV.0));
    assert_eq!(hi & FRCD_HI_PP, 0, "the device's requests carry no PASID");
    // Invalidating again records nothing new.
    f.sync(&[encode::pasid_cache_global(), encode::iotlb_global()]);
    assert_eq!(f.vtd.stats().faults, 1);
}

#[test]
fn the_queue_needs_256_bit_descriptors_in_scalable_mode_but_takes_them_in_legacy_mode() {
    // Legacy mode, 256-bit descriptors (as Linux queues them when ECAP.SMTS is set, before it
    // points RTADDR at a scalable-mode table): taken.
    let mut f = unit(sm_config());
    f.drv.wide = true;
    f.drv.enable_qi(&mut f.vtd);
    f.sync(&[encode::interrupt_entry_cache(None), encode::iotlb_global()]);
    assert_eq!(f.r32(FSTS_REG) & FSTS_IQE, 0);
    assert_eq!(f.r64(IQH_REG), 3 * 32, "IQH counts 128-bit units");
    // ... but not the PASID-based ones.
    f.drv
        .submit(&mut f.vtd, &f.mem, &[encode::pasid_cache_global()]);
    assert!(f.r32(FSTS_REG) & FSTS_IQE != 0);
    assert_eq!(f.r64(IQH_REG), 3 * 32, "IQH stays at the bad descriptor");

    // Scalable mode with 128-bit descriptors: the first fetch is an error.
    let mut f = unit(sm_config());
    let t = f.sm_tables();
    f.drv.enable_qi(&mut f.vtd);
    f.drv.set_scalable_root(&mut f.vtd, t.root);
    f.drv
        .submit(&mut f.vtd, &f.mem, &[encode::wait(None, false, false)]);
    assert!(f.r32(FSTS_REG) & FSTS_IQE != 0);
    assert_eq!(f.r64(IQH_REG), 0);
    assert_eq!(f.vtd.stats().waits, 0);
}

#[test]
fn an_odd_tail_or_upper_bits_of_a_256_bit_descriptor_are_queue_errors() {
    let mut f = unit(sm_config());
    let t = f.sm_tables();
    f.drv.wide = true;
    f.drv.enable_qi(&mut f.vtd);
    f.drv.set_scalable_root(&mut f.vtd, t.root);
    f.w64(IQT_REG, 1 << IQ_INDEX_SHIFT);
    assert!(f.r32(FSTS_REG) & FSTS_IQE != 0, "tail inside a descriptor");
    f.w64(IQT_REG, 0);
    f.w32(FSTS_REG, FSTS_IQE);
    // A wait descriptor with a bit set in its upper half.
    let [lo, hi] = encode::wait(None, true, false);
    for (i, w) in [lo, hi, 0, 1].into_iter().enumerate() {
        f.mem
            .write_obj(w, GuestAddress(DRIVER_QUEUE + i as u64 * 8))
            .unwrap();
    }
    f.w64(IQT_REG, 2 << IQ_INDEX_SHIFT);
    assert!(f.r32(FSTS_REG) & FSTS_IQE != 0);
    assert_eq!(f.vtd.stats().descriptors_by_type.invalid, 1);
    assert_eq!(f.r32(ICS_REG) & ICS_IWC, 0);
}

#[test]
fn pasid_device_tlb_invalidations_are_counted_and_complete() {
    let (mut f, _, _) = sm_fixture();
    f.sync(&[encode::pasid_device_iotlb(DEV, 3, 0x1000, false)]);
    assert_eq!(f.vtd.stats().descriptors_by_type.pasid_device_iotlb, 1);
}

#[test]
fn an_emulated_device_translates_through_a_first_stage_table_and_faults_with_its_pasid() {
    let mut f = unit(fs_config());
    f.w32(FECTL_REG, 0);
    let mut t = f.sm_tables();
    // RID_PASID 0 and PASID 5 both first-stage; PASIDE lets requests carry a PASID.
    t.context(DEV, 2, 0, true);
    let fs = t.first_stage_table();
    t.map_first_stage(fs, 0x1000, 0x5000, P, FirstStageFlags::USER_RW);
    t.first_stage(DEV, 0, DOMAIN, fs);
    let fs5 = t.first_stage_table();
    t.map_first_stage(fs5, 0x1000, 0x7000, P, FirstStageFlags::USER_RO);
    t.first_stage(DEV, 5, DOMAIN, fs5);
    f.sm_boot(&t);
    assert_eq!(
        f.vtd.translate(DEV, 0x1234, Access::Write),
        Ok((0x5234, P - 0x234))
    );
    let tag = PasidTag::user(5);
    assert_eq!(
        f.vtd
            .translate_request(DEV, Some(tag), 0x1010, Access::Read),
        Ok((0x7010, P - 0x10))
    );
    // Not present, with the PASID: reason 71h, PP and PV in the record.
    let e = f
        .vtd
        .translate_request(DEV, Some(tag), 0x9000, Access::Read)
        .unwrap_err();
    assert_eq!(e.reason, FaultReason::FirstStageEntryNotPresent);
    assert_eq!(e.pasid, Some(tag));
    let (lo, hi) = f.frcd(0);
    assert_eq!(lo, 0x9000);
    assert_eq!((hi & FRCD_HI_FR_MASK) >> FRCD_HI_FR_SHIFT, 0x71);
    assert!(hi & FRCD_HI_PP != 0);
    assert_eq!((hi & FRCD_HI_PV_MASK) >> FRCD_HI_PV_SHIFT, 5);
    assert!(hi & FRCD_HI_T != 0, "a read");
    assert_eq!(f.msi.take().len(), 1, "the fault event");
    // A write through the read-only PASID 5 mapping; then a request without a PASID: no PP.
    let e = f
        .vtd
        .translate_request(DEV, Some(tag), 0x1000, Access::Write)
        .unwrap_err();
    assert_eq!(e.reason, FaultReason::SmWriteNotPermitted);
    f.vtd.translate(DEV, 0x9000, Access::Write).unwrap_err();
    let (_, hi) = f.frcd(2);
    assert_eq!((hi & FRCD_HI_FR_MASK) >> FRCD_HI_FR_SHIFT, 0x71);
    assert_eq!(hi & (FRCD_HI_PP | FRCD_HI_PV_MASK), 0);
    assert_eq!(f.vtd.stats().first_stage_walks, 5);
    // A supervisor request needs SRE.
    let sup = PasidTag {
        pasid: 5,
        privileged: true,
    };
    let e = f
        .vtd
        .translate_request(DEV, Some(sup), 0x1000, Access::Read)
        .unwrap_err();
    assert_eq!(e.reason, FaultReason::SupervisorRequestsDisabled);
    t.first_stage(
        DEV,
        5,
        DOMAIN,
        FirstStageTable {
            supervisor: true,
            ..fs5
        },
    );
    // The unit cached the old entry: a driver invalidates it after the change.
    f.sync(&[encode::pasid_cache_pasid(DOMAIN, 5)]);
    assert!(f
        .vtd
        .translate_request(DEV, Some(sup), 0x1000, Access::Write)
        .is_ok());
}

#[test]
fn requests_with_a_pasid_fault_in_legacy_mode_and_second_stage_faults_use_scalable_reasons() {
    let mut f = fixture();
    f.linux_boot();
    let e = f
        .vtd
        .translate_request(DEV, Some(PasidTag::user(1)), 0, Access::Read)
        .unwrap_err();
    assert_eq!(e.reason, FaultReason::PasidInLegacyMode);
    let (mut f, mut t, pt) = sm_fixture();
    t.pages().map(pt, 0x1000, 0x5000, P, Perm::READ);
    assert_eq!(f.vtd.translate(DEV, 0x1000, Access::Read), Ok((0x5000, P)));
    let reason = |f: &mut Fixture, iova, access| f.vtd.translate(DEV, iova, access).unwrap_err();
    assert_eq!(
        reason(&mut f, 0x1000, Access::Write).reason,
        FaultReason::SmWriteNotPermitted
    );
    assert_eq!(
        reason(&mut f, 0x2000, Access::Read).reason,
        FaultReason::SecondStageEntryNotPresent
    );
    assert_eq!(
        reason(&mut f, 1 << 48, Access::Read).reason,
        FaultReason::SmAddressBeyondWidth
    );
    let e = f
        .vtd
        .translate_request(DEV, Some(PasidTag::user(0)), 0, Access::Read)
        .unwrap_err();
    assert_eq!(e.reason, FaultReason::PasidNotEnabled);
}

#[test]
fn a_translation_into_the_interrupt_range_is_blocked_in_scalable_mode() {
    let (mut f, mut t, pt) = sm_fixture();
    t.pages().map(pt, 0x1000, 0xfee0_0000, P, Perm::RW);
    let e = f.vtd.translate(DEV, 0x1000, Access::Write).unwrap_err();
    assert_eq!(e.reason, FaultReason::SmInterruptAddress);
    // A large page ending at the range is clipped before it.
    t.pages().map_large(pt, 0x20_0000, 0xfec0_0000, 2, Perm::RW);
    assert_eq!(
        f.vtd.translate(DEV, 0x20_0000, Access::Read),
        Ok((0xfec0_0000, 0x20_0000))
    );
}

#[test]
fn interrupt_entry_cache_invalidations_act_in_scalable_mode() {
    let config = VtdConfig {
        interrupt_remapping: true,
        ..sm_config()
    };
    let mut f = fixture_with(config, SimHost::new());
    let mut t = f.sm_tables();
    t.attach_second_stage(DEV, DOMAIN, 4);
    f.sm_boot(&t);
    let before = f.vtd.stats().iec_invalidations;
    f.sync(&[encode::interrupt_entry_cache(Some((4, 0)))]);
    let s = f.vtd.stats();
    assert_eq!(s.iec_invalidations, before + 1);
    assert_eq!(s.descriptors_by_type.interrupt_entry_cache, 1);
}
