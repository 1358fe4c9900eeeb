//! The protocol checker: each kind of violation a driver commits is reported with its kind,
//! requester, domain, address or index, descriptor, register write and instruction; the same
//! sequences done right report nothing.

use vm_device::origin::{self, Origin};

use super::*;
use crate::cache::CacheConfig;
use crate::check::{Instruction, Kind};
use vm_device::interrupt::MsiMessage;

const RIP: Origin = Origin {
    vcpu: 0,
    rip: 0xffff_ffff_8123_4567,
};

fn checked(caching_mode: bool) -> Fixture {
    unit(VtdConfig {
        caching_mode,
        check: true,
        interrupt_remapping: true,
        ..VtdConfig::default()
    })
}

fn kinds(f: &Fixture) -> Vec<Kind> {
    f.vtd.violations().iter().map(|v| v.kind).collect()
}

/// A guest map, as a driver does it: the PTE, then in caching mode a PSI and a wait.
fn map_page(f: &mut Fixture, t: &mut Tables, pt: PageTable, iova: u64, gpa: u64, cm: bool) {
    map(t, pt, iova, gpa, 1);
    if cm {
        f.sync(&[encode::iotlb_page(DOMAIN, iova, 0, false)]);
    }
}

/// A guest unmap done right: the PTE cleared, a PSI and a wait.
fn unmap_page(f: &mut Fixture, t: &mut Tables, pt: PageTable, iova: u64) {
    t.unmap(pt, iova, P);
    f.sync(&[encode::iotlb_page(DOMAIN, iova, 0, false)]);
}

#[test]
fn a_linux_like_driver_is_clean_in_both_caching_modes() {
    for cm in [false, true] {
        let mut f = checked(cm);
        let (_, pt) = f.linux_boot();
        let mut t = f.tables();
        for round in 0..4u64 {
            for page in 0..8 {
                let iova = 0x10_0000 + page * P;
                map_page(
                    &mut f,
                    &mut t,
                    pt,
                    iova,
                    0x50_0000 + (round * 8 + page) * P,
                    cm,
                );
                assert!(f.vtd.translate(DEV, iova, Access::Write).is_ok());
            }
            for page in 0..8 {
                unmap_page(&mut f, &mut t, pt, 0x10_0000 + page * P);
            }
        }
        f.vtd.finish_check();
        assert_eq!(f.vtd.violations(), &[], "caching mode {cm}");
        assert_eq!(f.vtd.check_counts().total, 0);
    }
}

#[test]
fn a_pte_changed_without_an_invalidation_is_reported_at_the_next_wait() {
    let mut f = checked(false);
    let (_, pt) = f.linux_boot();
    let mut t = f.tables();
    map(&mut t, pt, 0x1000, 0x5000, 1);
    assert!(f.vtd.translate(DEV, 0x1000, Access::Read).is_ok());
    map(&mut t, pt, 0x1000, 0x6000, 1);
    let served = origin::scope(Some(Origin { vcpu: 1, rip: 0x77 }), || {
        f.vtd.translate(DEV, 0x1000, Access::Read)
    });
    assert_eq!(
        served,
        Ok((0x5000, P)),
        "the stale translation, as on hardware"
    );
    assert!(
        kinds(&f).is_empty(),
        "a suspect until the driver declares its work done"
    );
    let tail = f.drv.tail_register();
    origin::scope(Some(RIP), || f.sync(&[]));
    assert_eq!(kinds(&f), vec![Kind::StaleIotlb]);
    let v = &f.vtd.violations()[0];
    assert_eq!(
        (v.source, v.domain, v.iova),
        (Some(DEV), Some(DOMAIN), Some(0x1000))
    );
    assert_eq!(
        v.descriptor,
        Some(tail >> IQ_INDEX_SHIFT),
        "the wait's queue slot"
    );
    assert_eq!(v.register.map(|r| r.name), Some("IQT"));
    assert_eq!(
        v.at,
        Some(Instruction::from(RIP)),
        "the IQT write's instruction"
    );
    assert_eq!(v.request_at, Some(Instruction { vcpu: 1, rip: 0x77 }));
    assert_eq!(v.spec, Kind::StaleIotlb.spec());
    // Reported once, however often it is used after.
    assert!(f.vtd.translate(DEV, 0x1000, Access::Read).is_ok());
    f.sync(&[]);
    f.sync(&[]);
    assert_eq!(f.vtd.check_counts().total, 1);
}

#[test]
fn a_request_racing_an_update_that_is_then_invalidated_is_not_reported() {
    let mut f = checked(false);
    let (_, pt) = f.linux_boot();
    let mut t = f.tables();
    map(&mut t, pt, 0x1000, 0x5000, 1);
    assert!(f.vtd.translate(DEV, 0x1000, Access::Read).is_ok());
    t.unmap(pt, 0x1000, P);
    assert!(f.vtd.translate(DEV, 0x1000, Access::Read).is_ok(), "stale");
    f.sync(&[encode::iotlb_page(DOMAIN, 0x1000, 0, false)]);
    f.vtd.finish_check();
    assert!(kinds(&f).is_empty());
}

#[test]
fn a_stale_translation_never_invalidated_is_reported_when_the_vm_stops() {
    let mut f = checked(false);
    let (_, pt) = f.linux_boot();
    let mut t = f.tables();
    map(&mut t, pt, 0x1000, 0x5000, 1);
    assert!(f.vtd.translate(DEV, 0x1000, Access::Read).is_ok());
    map(&mut t, pt, 0x1000, 0x6000, 1);
    assert!(f.vtd.translate(DEV, 0x1000, Access::Read).is_ok());
    f.vtd.finish_check();
    assert_eq!(kinds(&f), vec![Kind::StaleIotlb]);
    assert!(f.vtd.violations()[0].detail.contains("VM stopped"));
}

#[test]
fn a_page_selective_invalidation_misaligned_to_its_mask_is_reported_with_its_address() {
    let mut f = checked(true);
    f.linux_boot();
    f.sync(&[encode::iotlb_page(DOMAIN, 0x4000, 2, false)]);
    assert!(kinds(&f).is_empty(), "aligned to 4 pages");
    let tail = f.drv.tail_register();
    origin::scope(Some(RIP), || {
        f.sync(&[encode::iotlb_page(DOMAIN, 0x3000, 1, false)])
    });
    assert_eq!(kinds(&f), vec![Kind::MisalignedInvalidation]);
    let v = &f.vtd.violations()[0];
    assert_eq!((v.iova, v.domain), (Some(0x3000), Some(DOMAIN)));
    assert_eq!(v.descriptor, Some(tail >> IQ_INDEX_SHIFT), "the PSI itself");
    assert_eq!(v.at, Some(Instruction::from(RIP)));
    // A misaligned interrupt-entry-cache index: 6.5.2.7.
    f.sync(&[encode::interrupt_entry_cache(Some((5, 2)))]);
    assert_eq!(f.vtd.violations()[1].index, Some(5));
    assert_eq!(f.vtd.violations()[1].spec, "6.5.2.7");
}

#[test]
fn an_invalidation_of_a_domain_no_entry_carries_is_reported() {
    let mut f = checked(false);
    f.linux_boot();
    // DOMAIN is in DEV's context entry, which the unit never had to read: a scan finds it.
    f.sync(&[encode::iotlb_domain(DOMAIN), encode::context_domain(DOMAIN)]);
    assert!(kinds(&f).is_empty());
    f.sync(&[encode::iotlb_page(77, 0x1000, 0, false)]);
    assert_eq!(kinds(&f), vec![Kind::UnknownDomain]);
    assert_eq!(f.vtd.violations()[0].domain, Some(77));
    // A device-selective context invalidation names the domain of the entry it invalidates
    // (Linux's detach clears the entry first): its domain counts as used.
    f.sync(&[
        encode::context_device(78, SourceId(0x20), 0),
        encode::iotlb_domain(78),
    ]);
    assert_eq!(f.vtd.check_counts().total, 1);
    // Domain 0 is where caching mode tags not-present entries.
    let mut cm = checked(true);
    cm.linux_boot();
    cm.sync(&[encode::iotlb_domain(0)]);
    assert!(kinds(&cm).is_empty());
}

#[test]
fn a_context_entry_changed_without_its_invalidation_is_reported_after_the_next_wait() {
    let mut f = checked(false);
    let (_, pt) = f.linux_boot();
    let mut t = f.tables();
    map(&mut t, pt, 0x1000, 0x5000, 1);
    assert!(f.vtd.translate(DEV, 0x1000, Access::Read).is_ok());
    t.attach_pass_through(DEV, DOMAIN);
    f.sync(&[]);
    assert!(
        kinds(&f).is_empty(),
        "the first wait may race the driver's invalidation"
    );
    f.sync(&[]);
    assert_eq!(kinds(&f), vec![Kind::StaleContext]);
    assert_eq!(f.vtd.violations()[0].source, Some(DEV));
    // Done right: the entry changed, then invalidated before the waits.
    let mut g = checked(false);
    let (_, pt) = g.linux_boot();
    let mut t = g.tables();
    map(&mut t, pt, 0x1000, 0x5000, 1);
    assert!(g.vtd.translate(DEV, 0x1000, Access::Read).is_ok());
    t.attach_pass_through(DEV, DOMAIN);
    g.sync(&[
        encode::context_device(DOMAIN, DEV, 0),
        encode::iotlb_domain(DOMAIN),
    ]);
    g.sync(&[]);
    g.vtd.finish_check();
    assert!(kinds(&g).is_empty());
}

const IRT: u64 = 30 << 20;

fn write_irte(f: &Fixture, index: u64, vector: u8) {
    let lo = 1 | u64::from(vector) << 16 | 1u64 << 40;
    f.mem
        .write_obj(lo, GuestAddress(IRT + index * 16))
        .expect("in memory");
    f.mem
        .write_obj(0u64, GuestAddress(IRT + index * 16 + 8))
        .expect("in memory");
}

#[test]
fn an_irte_changed_without_an_iec_invalidation_is_reported_with_its_index() {
    for invalidate in [false, true] {
        let mut f = checked(false);
        f.drv.enable_qi(&mut f.vtd);
        write_irte(&f, 9, 0x40);
        f.drv.set_interrupt_remapping(&mut f.vtd, IRT | 7, true);
        let msg = MsiMessage::remappable(9);
        assert_eq!(f.vtd.remap_interrupt(DEV, msg).map(|m| m.data), Some(0x40));
        write_irte(&f, 9, 0x41);
        if invalidate {
            f.sync(&[encode::interrupt_entry_cache(Some((9, 0)))]);
        }
        let got = f.vtd.remap_interrupt(DEV, msg).map(|m| m.data);
        f.sync(&[]);
        if invalidate {
            assert_eq!(got, Some(0x41));
            assert!(kinds(&f).is_empty());
        } else {
            assert_eq!(got, Some(0x40), "the stale entry, as on hardware");
            assert_eq!(kinds(&f), vec![Kind::StaleIrte]);
            let v = &f.vtd.violations()[0];
            assert_eq!((v.index, v.source), (Some(9), Some(DEV)));
        }
    }
}

#[test]
fn caching_mode_a_page_made_present_without_its_invalidation_is_reported() {
    let mut f = checked(true);
    let (_, pt) = f.linux_boot();
    f.vtd.translate(DEV, 0x1000, Access::Read).unwrap_err();
    let mut t = f.tables();
    map(&mut t, pt, 0x1000, 0x5000, 1);
    f.vtd.translate(DEV, 0x1000, Access::Read).unwrap_err();
    f.sync(&[]);
    assert_eq!(kinds(&f), vec![Kind::CachingModeNoInvalidation]);
    assert_eq!(f.vtd.violations()[0].iova, Some(0x1000));
    assert_eq!(f.vtd.violations()[0].spec, "6.1");
}

#[test]
fn an_iova_remapped_before_the_wait_of_its_invalidation_is_reported() {
    for wait in [false, true] {
        let mut f = checked(false);
        let (_, pt) = f.linux_boot();
        let mut t = f.tables();
        map(&mut t, pt, 0x8000, 0x5000, 1);
        assert!(f.vtd.translate(DEV, 0x8000, Access::Write).is_ok());
        t.unmap(pt, 0x8000, P);
        let psi = f.drv.tail_register() >> IQ_INDEX_SHIFT;
        if wait {
            f.sync(&[encode::iotlb_page(DOMAIN, 0x8000, 0, false)]);
        } else {
            f.drv.submit(
                &mut f.vtd,
                &f.mem,
                &[encode::iotlb_page(DOMAIN, 0x8000, 0, false)],
            );
        }
        map(&mut t, pt, 0x8000, 0x6000, 1);
        let got = origin::scope(Some(RIP), || f.vtd.translate(DEV, 0x8000, Access::Write));
        assert_eq!(got, Ok((0x6000, P)));
        if wait {
            assert!(kinds(&f).is_empty());
        } else {
            assert_eq!(kinds(&f), vec![Kind::ReuseBeforeWait]);
            let v = &f.vtd.violations()[0];
            assert_eq!((v.iova, v.descriptor), (Some(0x8000), Some(psi)));
            assert_eq!(v.request_at, Some(Instruction::from(RIP)));
        }
    }
}

#[test]
fn dma_to_an_iova_whose_unmap_completed_is_reported() {
    let mut f = checked(false);
    let (_, pt) = f.linux_boot();
    let mut t = f.tables();
    map(&mut t, pt, 0x8000, 0x5000, 1);
    assert!(f.vtd.translate(DEV, 0x8000, Access::Write).is_ok());
    unmap_page(&mut f, &mut t, pt, 0x8000);
    // Never mapped: a fault, but no unmap to blame.
    f.vtd.translate(DEV, 0x9000, Access::Write).unwrap_err();
    assert!(kinds(&f).is_empty());
    f.vtd.translate(DEV, 0x8010, Access::Write).unwrap_err();
    assert_eq!(kinds(&f), vec![Kind::UseAfterUnmap]);
    assert_eq!(f.vtd.violations()[0].iova, Some(0x8010));
    // Mapped again: using it is fine.
    map(&mut t, pt, 0x8000, 0x6000, 1);
    assert!(f.vtd.translate(DEV, 0x8000, Access::Write).is_ok());
    unmap_page(&mut f, &mut t, pt, 0x8000);
    assert_eq!(f.vtd.check_counts().total, 1);
}

#[test]
fn a_wait_whose_status_write_is_not_guest_ram_is_reported() {
    let mut f = checked(false);
    f.linux_boot();
    f.drv.submit(
        &mut f.vtd,
        &f.mem,
        &[encode::wait(Some((1 << 40, 1)), false, false)],
    );
    assert_eq!(kinds(&f), vec![Kind::WaitStatusNotRam]);
    assert_eq!(f.vtd.violations()[0].iova, Some(1 << 40));
    assert!(
        f.r32(FSTS_REG) & FSTS_IQE != 0,
        "and the queue error it always raised"
    );
}

#[test]
fn a_guest_repeating_a_violation_cannot_flood_the_log_and_the_report_is_bounded() {
    use vm_device::ratelimit::{capture::lines_logged_by, BURST};
    let mut f = checked(true);
    f.linux_boot();
    let lines = lines_logged_by(|| {
        for _ in 0..500 {
            f.sync(&[encode::iotlb_page(DOMAIN, 0x3000, 1, false)]);
        }
    });
    let reports = lines
        .iter()
        .filter(|l| l.contains("protocol violation"))
        .count();
    assert!(
        reports <= BURST as usize,
        "{reports} lines for 500 violations"
    );
    assert_eq!(f.vtd.check_counts().total, 500);
    let json = serde_json::to_value(f.vtd.check_report()).expect("serializable");
    assert_eq!(json["counts"]["misaligned-invalidation"], 500);
    assert_eq!(json["violations"][0]["kind"], "misaligned-invalidation");
    assert_eq!(json["violations"][0]["iova"], 0x3000);
    assert_eq!(json["violations"][0]["source"], serde_json::Value::Null);
}

#[test]
fn with_the_checker_off_nothing_is_followed_or_reported() {
    let mut f = unit(VtdConfig {
        caching_mode: false,
        caches: CacheConfig::HARDWARE,
        ..VtdConfig::default()
    });
    let (_, pt) = f.linux_boot();
    let mut t = f.tables();
    map(&mut t, pt, 0x1000, 0x5000, 1);
    assert!(f.vtd.translate(DEV, 0x1000, Access::Read).is_ok());
    map(&mut t, pt, 0x1000, 0x6000, 1);
    assert_eq!(f.vtd.translate(DEV, 0x1000, Access::Read), Ok((0x5000, P)));
    f.sync(&[encode::iotlb_page(DOMAIN, 0x3000, 1, false)]);
    f.vtd.finish_check();
    assert_eq!(f.vtd.check_counts().total, 0);
    assert!(!f.vtd.check_counts().enabled);
}
