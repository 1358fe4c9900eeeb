//! Fault injection: each injected error leaves the registers, the queue and the interrupts as
//! the spec defines them (6.5.2.10 for the queue errors, 7.2.1 for fault recording), and the
//! queue errors the unit detects by itself say why in IQERCD.IQEI.

use super::*;
use crate::inject::Injection;
use crate::testing::DRIVER_STATUS;

const SID: SourceId = SourceId(0x0020);

fn injected(config: VtdConfig, injections: &str) -> Fixture {
    let mut f = unit(config);
    for i in crate::inject::parse_list(injections).expect("valid injections") {
        assert!(f.vtd.inject(i));
    }
    f.w32(FEDATA_REG, 0x31);
    f.w32(FEADDR_REG, 0xfee0_0000);
    f.w32(FECTL_REG, 0);
    f.w32(IEDATA_REG, 0x32);
    f.w32(IEADDR_REG, 0xfee0_0000);
    f.w32(IECTL_REG, 0);
    f.drv.enable_qi(&mut f.vtd);
    f
}

fn status(f: &Fixture) -> u32 {
    f.mem
        .read_obj(GuestAddress(DRIVER_STATUS))
        .expect("status word")
}

fn fault_events(f: &Fixture, msis: &[(u64, u32)]) -> usize {
    let _ = f;
    msis.iter().filter(|(_, d)| *d == 0x31).count()
}

#[test]
fn an_injected_queue_error_stops_the_queue_at_the_descriptor_until_iqe_is_cleared() {
    let mut f = injected(VtdConfig::default(), "iqe@2");
    // Descriptors 0 (context) and 1 (IOTLB, the injected one), then a wait at 2.
    let done = f.drv.submit_sync(
        &mut f.vtd,
        &f.mem.clone(),
        &[encode::context_global(), encode::iotlb_global()],
        7,
    );
    assert!(!done, "the wait after the error is not fetched");
    let fsts = f.r32(FSTS_REG);
    assert_eq!(fsts & (FSTS_IQE | FSTS_ITE | FSTS_ICE), FSTS_IQE);
    assert_eq!(
        f.r64(IQH_REG) >> IQ_INDEX_SHIFT,
        1,
        "IQH at the failed descriptor"
    );
    assert_eq!(f.r64(IQERCD_REG) & IQERCD_IQEI_MASK, u64::from(IQEI_FETCH));
    let msis = f.msi.take();
    assert_eq!(fault_events(&f, &msis), 1);
    assert_eq!(f.vtd.stats().injected, 1);
    // A tail write while IQE is set fetches nothing.
    f.w64(IQT_REG, f.drv.tail_register());
    assert_eq!(f.r64(IQH_REG) >> IQ_INDEX_SHIFT, 1);
    // Clearing IQE resumes at IQH: the IOTLB invalidation, then the wait.
    f.w32(FSTS_REG, FSTS_IQE);
    assert_eq!(f.r32(FSTS_REG) & FSTS_IQE, 0);
    assert_eq!(status(&f), 7);
    assert_eq!(f.r64(IQH_REG), f.drv.tail_register());
}

fn dt_config() -> VtdConfig {
    VtdConfig {
        device_iotlb: true,
        ..VtdConfig::default()
    }
}

#[test]
fn an_injected_time_out_aborts_the_next_wait_and_stops_the_queue_until_ite_is_cleared() {
    let mut f = injected(dt_config(), "ite");
    let mem = f.mem.clone();
    f.mem
        .write_obj(0u32, GuestAddress(DRIVER_STATUS))
        .expect("status");
    f.drv.submit(
        &mut f.vtd,
        &mem,
        &[
            encode::device_iotlb(SID, 0x5000, false),
            encode::wait(Some((DRIVER_STATUS, 9)), true, false),
            encode::iotlb_global(),
        ],
    );
    let fsts = f.r32(FSTS_REG);
    assert_eq!(fsts & (FSTS_IQE | FSTS_ITE | FSTS_ICE), FSTS_ITE);
    assert_eq!(status(&f), 0, "the aborted wait wrote no status");
    assert_eq!(f.r32(ICS_REG) & ICS_IWC, 0, "and raised no completion");
    assert_eq!(
        f.r64(IQH_REG) >> IQ_INDEX_SHIFT,
        2,
        "IQH past the aborted wait, before what follows it"
    );
    assert_eq!(
        (f.r64(IQERCD_REG) & IQERCD_ITESID_MASK) >> IQERCD_ITESID_SHIFT,
        u64::from(SID.0)
    );
    let msis = f.msi.take();
    assert_eq!(msis.len(), 1, "the fault event only: {msis:x?}");
    assert_eq!(fault_events(&f, &msis), 1);
    assert_eq!(f.vtd.stats().descriptors_by_type.iotlb_global, 0);
    // Clearing ITE resumes at IQH.
    f.w32(FSTS_REG, FSTS_ITE);
    assert_eq!(f.vtd.stats().descriptors_by_type.iotlb_global, 1);
    assert_eq!(f.r64(IQH_REG), f.drv.tail_register());
    // Retried, the invalidation completes.
    assert!(f.drv.submit_sync(
        &mut f.vtd,
        &mem,
        &[encode::device_iotlb(SID, 0x5000, false)],
        3
    ));
}

#[test]
fn a_time_out_before_a_bad_descriptor_is_reported_with_the_queue_error_and_not_left_pending() {
    let mut f = injected(dt_config(), "ite");
    let mem = f.mem.clone();
    // A device-TLB invalidation that times out, then a descriptor of no known type, no wait.
    f.drv.submit(
        &mut f.vtd,
        &mem,
        &[encode::device_iotlb(SID, 0x5000, false), [0xf, 0]],
    );
    let fsts = f.r32(FSTS_REG);
    assert_eq!(
        fsts & (FSTS_IQE | FSTS_ITE | FSTS_ICE),
        FSTS_IQE | FSTS_ITE,
        "both errors: {fsts:#x}"
    );
    assert_eq!(
        (f.r64(IQERCD_REG) & IQERCD_ITESID_MASK) >> IQERCD_ITESID_SHIFT,
        u64::from(SID.0)
    );
    // Software gives up on that queue: disabled, errors cleared, set up afresh.
    f.w32(GCMD_REG, 0);
    f.w32(FSTS_REG, FSTS_IQE | FSTS_ITE);
    f.drv.enable_qi(&mut f.vtd);
    assert!(
        f.drv
            .submit_sync(&mut f.vtd, &mem, &[encode::iotlb_global()], 5),
        "no time-out of the old queue aborts the new queue's wait"
    );
    assert_eq!(f.r32(FSTS_REG) & (FSTS_IQE | FSTS_ITE), 0);
}

#[test]
fn an_injected_completion_error_sets_ice_and_the_queue_goes_on() {
    let mut f = injected(dt_config(), "ice@2");
    let mem = f.mem.clone();
    assert!(f.drv.submit_sync(
        &mut f.vtd,
        &mem,
        &[encode::device_iotlb(SID, 0x5000, false)],
        1
    ));
    assert_eq!(f.r32(FSTS_REG) & FSTS_ICE, 0, "the first one completes");
    assert!(f.drv.submit_sync(
        &mut f.vtd,
        &mem,
        &[encode::device_iotlb(SID, 0x5000, true)],
        2
    ));
    let fsts = f.r32(FSTS_REG);
    assert_eq!(fsts & (FSTS_IQE | FSTS_ITE | FSTS_ICE), FSTS_ICE);
    assert_eq!(
        (f.r64(IQERCD_REG) & IQERCD_ICESID_MASK) >> IQERCD_ICESID_SHIFT,
        u64::from(SID.0)
    );
    let msis = f.msi.take();
    assert_eq!(fault_events(&f, &msis), 1);
    f.w32(FSTS_REG, FSTS_ICE);
    assert_eq!(f.r32(FSTS_REG) & FSTS_ICE, 0);
    assert_eq!(f.r32(FECTL_REG) & ECTL_IP, 0);
}

#[test]
fn an_injected_dma_fault_is_recorded_as_a_not_present_page() {
    let mut f = injected(VtdConfig::default(), "dma-fault@2");
    let (_, pt) = f.linux_boot();
    let mut t = f.tables();
    map(&mut t, pt, 0x1000, 0x5000, 2);
    assert!(f.vtd.translate(DEV, 0x1000, Access::Read).is_ok());
    let e = f.vtd.translate(DEV, 0x2000, Access::Write).unwrap_err();
    assert_eq!(e.reason, FaultReason::WriteNotPermitted);
    assert_eq!(f.r64(FRCD_REG_BASE), 0x2000);
    let hi = f.r64(FRCD_REG_BASE + 8);
    assert_eq!((hi & FRCD_HI_FR_MASK) >> FRCD_HI_FR_SHIFT, 5);
    assert_eq!(hi & FRCD_HI_SID_MASK, u64::from(DEV.0));
    assert!(f.r32(FSTS_REG) & FSTS_PPF != 0);
    assert!(f.vtd.translate(DEV, 0x2000, Access::Write).is_ok(), "once");
}

#[test]
fn an_injected_full_ring_fills_every_record_and_overflows_with_one_fault_event() {
    let config = VtdConfig {
        fault_records: 4,
        ..VtdConfig::default()
    };
    let mut f = injected(config, "records-full");
    f.linux_boot();
    f.msi.take();
    f.vtd.translate(DEV, 0x9000, Access::Read).unwrap_err();
    for record in 0..4 {
        let base = FRCD_REG_BASE + record * FRCD_REG_SIZE;
        assert_eq!(f.r64(base), 0x9000, "record {record}");
        assert!(f.r64(base + 8) & FRCD_HI_F != 0, "record {record}");
    }
    let fsts = f.r32(FSTS_REG);
    assert!(fsts & FSTS_PPF != 0 && fsts & FSTS_PFO != 0, "{fsts:#x}");
    assert_eq!(
        (fsts & FSTS_FRI_MASK) >> FSTS_FRI_SHIFT,
        0,
        "FRI went round"
    );
    assert_eq!(f.msi.take().len(), 1, "one fault event");
}

#[test]
fn queue_errors_the_unit_detects_say_why_in_iqei() {
    for (words, want) in [
        ([0xf_u64, 0], IQEI_TYPE),
        ([0x2 | 1 << 4 | 1 << 12, 0], IQEI_RESERVED),
    ] {
        let mut f = injected(VtdConfig::default(), "");
        f.drv.submit(&mut f.vtd, &f.mem.clone(), &[words]);
        assert!(f.r32(FSTS_REG) & FSTS_IQE != 0);
        assert_eq!(f.r64(IQERCD_REG) & IQERCD_IQEI_MASK, u64::from(want));
    }
    let mut f = injected(VtdConfig::default(), "");
    f.w64(IQT_REG, 300 << IQ_INDEX_SHIFT);
    assert_eq!(f.r64(IQERCD_REG) & IQERCD_IQEI_MASK, u64::from(IQEI_TAIL));
    // The first error's cause stays while IQE is set.
    f.drv.submit(&mut f.vtd, &f.mem.clone(), &[[0xf, 0]]);
    assert_eq!(f.r64(IQERCD_REG) & IQERCD_IQEI_MASK, u64::from(IQEI_TAIL));
}

#[test]
fn injections_armed_together_count_their_own_events() {
    let mut f = injected(VtdConfig::default(), "");
    let (_, pt) = f.linux_boot();
    for i in crate::inject::parse_list("dma-fault@1+iqe@1").expect("valid") {
        assert!(f.vtd.inject(i));
    }
    assert!(!f.drv.submit_sync(&mut f.vtd, &f.mem.clone(), &[], 5));
    assert!(f.r32(FSTS_REG) & FSTS_IQE != 0, "the next descriptor");
    f.w32(FSTS_REG, FSTS_IQE);
    let mut t = f.tables();
    map(&mut t, pt, 0x1000, 0x5000, 1);
    f.vtd.translate(DEV, 0x1000, Access::Read).unwrap_err();
    assert!(f.vtd.translate(DEV, 0x1000, Access::Read).is_ok());
    assert_eq!(f.vtd.stats().injected, 2);
    assert_eq!(
        "ite".parse::<Injection>().map(|i| i.nth),
        Ok(1),
        "the occurrence defaults to the next one"
    );
}
