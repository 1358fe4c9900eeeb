//! Device-TLBs of emulated ATS devices: translation requests fill them, translated requests use
//! them, device-TLB invalidations empty them, and the checker reports the missing ones.

use super::*;
use crate::ats::SharedDeviceTlb;
use crate::check::Kind;

/// Translation type 01b: untranslated requests through the tables, ATS allowed.
const TT_DEVICE_TLB: u64 = 0b01 << 2;

fn ats_unit(check: bool) -> (Fixture, PageTable, SharedDeviceTlb) {
    let mut f = unit(VtdConfig {
        caching_mode: false,
        device_iotlb: true,
        check,
        ..VtdConfig::default()
    });
    let (_, pt) = f.linux_boot();
    let mut t = f.tables();
    let [lo, hi] = t.read_context_raw(DEV);
    t.write_context_raw(DEV, lo | TT_DEVICE_TLB, hi);
    f.sync(&[encode::context_global(), encode::iotlb_global()]);
    let tlb = SharedDeviceTlb::new(16);
    tlb.lock().set_enabled(true);
    f.vtd.attach_device_tlb(DEV, tlb.clone());
    (f, pt, tlb)
}

#[test]
fn the_unit_reports_device_tlbs_and_a_device_caches_its_translations() {
    let (mut f, pt, tlb) = ats_unit(false);
    assert!(f.r64(ECAP_REG) & ECAP_DT != 0);
    let mut t = f.tables();
    map(&mut t, pt, 0x1000, 0x5000, 1);
    assert_eq!(
        f.vtd.translate(DEV, 0x1010, Access::Read),
        Ok((0x5010, P - 0x10))
    );
    assert_eq!(tlb.lock().len(), 1, "the translation completion");
    // The IOTLB is invalidated, the device-TLB is not: the device keeps using the old page.
    map(&mut t, pt, 0x1000, 0x6000, 1);
    f.sync(&[encode::iotlb_page(DOMAIN, 0x1000, 0, false)]);
    assert_eq!(
        f.vtd.translate(DEV, 0x1010, Access::Read),
        Ok((0x5010, P - 0x10))
    );
    f.sync(&[encode::device_iotlb(DEV, 0x1000, false)]);
    assert!(tlb.lock().is_empty());
    assert_eq!(
        f.vtd.translate(DEV, 0x1010, Access::Read),
        Ok((0x6010, P - 0x10))
    );
    let c = f.vtd.stats().caches.device_tlb;
    assert_eq!((c.hits, c.misses, c.invalidated), (1, 2, 1), "{c:?}");
}

#[test]
fn without_ats_enabled_or_allowed_requests_go_untranslated_and_fault_as_usual() {
    let (mut f, pt, tlb) = ats_unit(false);
    tlb.lock().set_enabled(false);
    let mut t = f.tables();
    map(&mut t, pt, 0x1000, 0x5000, 1);
    assert_eq!(f.vtd.translate(DEV, 0x1000, Access::Read), Ok((0x5000, P)));
    assert!(tlb.lock().is_empty());
    tlb.lock().set_enabled(true);
    // A page that does not translate: no completion to cache; the untranslated retry faults.
    let e = f.vtd.translate(DEV, 0x9000, Access::Read).unwrap_err();
    assert_eq!(e.reason, FaultReason::ReadNotPermitted);
    assert!(tlb.lock().is_empty());
    assert!(f.r32(FSTS_REG) & FSTS_PPF != 0);
}

#[test]
fn an_iotlb_invalidation_without_its_device_tlb_invalidation_is_reported() {
    for devtlb in [false, true] {
        let (mut f, pt, _tlb) = ats_unit(true);
        let mut t = f.tables();
        map(&mut t, pt, 0x1000, 0x5000, 1);
        assert!(f.vtd.translate(DEV, 0x1000, Access::Read).is_ok());
        t.unmap(pt, 0x1000, P);
        // Linux 6.1: the IOTLB invalidation and its wait, then the device-TLB one and its wait.
        f.sync(&[encode::iotlb_page(DOMAIN, 0x1000, 0, false)]);
        if devtlb {
            f.sync(&[encode::device_iotlb(DEV, 0x1000, false)]);
        } else {
            f.sync(&[]);
        }
        let kinds: Vec<Kind> = f.vtd.violations().iter().map(|v| v.kind).collect();
        if devtlb {
            assert!(kinds.is_empty(), "{:?}", f.vtd.violations());
        } else {
            assert_eq!(kinds, vec![Kind::MissingDeviceTlbInvalidation]);
            let v = &f.vtd.violations()[0];
            assert_eq!((v.source, v.iova), (Some(DEV), Some(0x1000)));
        }
    }
}

#[test]
fn a_translated_request_from_a_stale_device_tlb_entry_is_reported() {
    let (mut f, pt, _tlb) = ats_unit(true);
    let mut t = f.tables();
    map(&mut t, pt, 0x1000, 0x5000, 1);
    assert!(f.vtd.translate(DEV, 0x1000, Access::Read).is_ok());
    map(&mut t, pt, 0x1000, 0x6000, 1);
    assert_eq!(f.vtd.translate(DEV, 0x1000, Access::Read), Ok((0x5000, P)));
    f.vtd.finish_check();
    let kinds: Vec<Kind> = f.vtd.violations().iter().map(|v| v.kind).collect();
    assert_eq!(kinds, vec![Kind::StaleDeviceTlb]);
}
