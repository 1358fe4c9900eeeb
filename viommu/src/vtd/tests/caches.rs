//! The translation caches emulated devices' requests go through: what fills them, what empties
//! them, and the stale translations a driver that skips an invalidation gets, as on hardware.

use super::*;
use crate::cache::CacheConfig;
use crate::testing::ScalableTables;
use vm_device::interrupt::MsiMessage;

fn no_cm() -> VtdConfig {
    VtdConfig {
        caching_mode: false,
        ..VtdConfig::default()
    }
}

#[test]
fn a_changed_pte_is_not_seen_until_its_iotlb_invalidation() {
    for config in [no_cm(), VtdConfig::default()] {
        let mut f = unit(config);
        let (_, pt) = f.linux_boot();
        let mut t = f.tables();
        map(&mut t, pt, 0x1000, 0x5000, 1);
        assert_eq!(
            f.vtd.translate(DEV, 0x1010, Access::Read),
            Ok((0x5010, P - 0x10))
        );
        map(&mut t, pt, 0x1000, 0x6000, 1);
        assert_eq!(
            f.vtd.translate(DEV, 0x1010, Access::Read),
            Ok((0x5010, P - 0x10)),
            "the IOTLB still holds the old page"
        );
        // An invalidation of another page, or of another domain, changes nothing.
        f.sync(&[
            encode::iotlb_page(DOMAIN, 0x2000, 0, false),
            encode::iotlb_domain(DOMAIN + 1),
        ]);
        assert_eq!(
            f.vtd.translate(DEV, 0x1010, Access::Read),
            Ok((0x5010, P - 0x10))
        );
        f.sync(&[encode::iotlb_page(DOMAIN, 0x1000, 0, false)]);
        assert_eq!(
            f.vtd.translate(DEV, 0x1010, Access::Read),
            Ok((0x6010, P - 0x10))
        );
        let c = f.vtd.stats().caches.iotlb;
        assert_eq!((c.hits, c.misses, c.invalidated), (2, 2, 1), "{c:?}");
    }
}

#[test]
fn a_large_page_is_one_entry_which_a_page_invalidation_inside_it_removes() {
    let mut f = unit(no_cm());
    let (_, pt) = f.linux_boot();
    let mut t = f.tables();
    t.map_large(pt, 0x20_0000, 0x40_0000, 2, Perm::RW);
    assert_eq!(
        f.vtd.translate(DEV, 0x20_0000, Access::Write),
        Ok((0x40_0000, 0x20_0000))
    );
    assert_eq!(
        f.vtd.translate(DEV, 0x3f_f000, Access::Read),
        Ok((0x5f_f000, P)),
        "the same entry"
    );
    assert_eq!(f.vtd.caches().iotlb.len(), 1);
    assert_eq!(f.vtd.stats().caches.iotlb.hits, 1);
    f.sync(&[encode::iotlb_page(DOMAIN, 0x2f_f000, 0, false)]);
    assert!(f.vtd.caches().iotlb.is_empty());
}

#[test]
fn caching_mode_caches_not_present_pages_and_without_it_they_are_walked_again() {
    let mut cm = unit(VtdConfig::default());
    let (_, pt) = cm.linux_boot();
    cm.vtd.translate(DEV, 0x1000, Access::Read).unwrap_err();
    let mut t = cm.tables();
    map(&mut t, pt, 0x1000, 0x5000, 1);
    let e = cm.vtd.translate(DEV, 0x1000, Access::Read).unwrap_err();
    assert_eq!(
        e.reason,
        FaultReason::ReadNotPermitted,
        "the cached not-present page"
    );
    cm.sync(&[encode::iotlb_page(DOMAIN, 0x1000, 0, false)]);
    assert_eq!(cm.vtd.translate(DEV, 0x1000, Access::Read), Ok((0x5000, P)));

    let mut hw = unit(no_cm());
    let (_, pt) = hw.linux_boot();
    hw.vtd.translate(DEV, 0x1000, Access::Read).unwrap_err();
    let mut t = hw.tables();
    map(&mut t, pt, 0x1000, 0x5000, 1);
    assert_eq!(
        hw.vtd.translate(DEV, 0x1000, Access::Read),
        Ok((0x5000, P)),
        "without CM a not-present entry is never cached: no invalidation needed"
    );
}

#[test]
fn a_denied_access_through_a_cached_page_walks_the_tables_again() {
    let mut f = unit(no_cm());
    let (_, pt) = f.linux_boot();
    let mut t = f.tables();
    t.map(pt, 0x1000, 0x5000, P, Perm::READ);
    assert!(f.vtd.translate(DEV, 0x1000, Access::Read).is_ok());
    // The driver grants write and a write comes: the fault, if any, comes from the tables.
    t.map(pt, 0x1000, 0x5000, P, Perm::RW);
    assert_eq!(f.vtd.translate(DEV, 0x1000, Access::Write), Ok((0x5000, P)));
}

#[test]
fn the_context_cache_keeps_an_entry_until_a_context_invalidation_covers_it() {
    let mut f = unit(no_cm());
    let (_, pt) = f.linux_boot();
    let mut t = f.tables();
    map(&mut t, pt, 0x1000, 0x5000, 1);
    assert!(f.vtd.translate(DEV, 0x1000, Access::Read).is_ok());
    // Pass-through now, in another domain: the cached entry still translates.
    t.attach_pass_through(DEV, DOMAIN + 1);
    assert_eq!(f.vtd.translate(DEV, 0x1000, Access::Read), Ok((0x5000, P)));
    // A device-selective invalidation of another function leaves it.
    let other = SourceId(DEV.0 + 1);
    f.sync(&[encode::context_device(DOMAIN, other, 0)]);
    assert_eq!(f.vtd.translate(DEV, 0x1000, Access::Read), Ok((0x5000, P)));
    f.sync(&[encode::context_device(DOMAIN, DEV, 0)]);
    assert_eq!(
        f.vtd.translate(DEV, 0x7000, Access::Read),
        Ok((0x7000, P)),
        "pass-through"
    );
    assert_eq!(f.vtd.stats().caches.context.invalidated, 1);
}

#[test]
fn setting_the_root_table_pointer_empties_the_translation_caches() {
    let mut f = unit(no_cm());
    let (root, pt) = f.linux_boot();
    let mut t = f.tables();
    map(&mut t, pt, 0x1000, 0x5000, 1);
    assert!(f.vtd.translate(DEV, 0x1000, Access::Read).is_ok());
    assert_eq!(
        (f.vtd.caches().context.len(), f.vtd.caches().iotlb.len()),
        (1, 1)
    );
    map(&mut t, pt, 0x1000, 0x6000, 1);
    // ESRTPS (6.6): the pointer set invalidates every translation cache.
    f.drv.set_root(&mut f.vtd, root);
    assert!(f.vtd.caches().context.is_empty() && f.vtd.caches().iotlb.is_empty());
    assert_eq!(f.vtd.translate(DEV, 0x1000, Access::Read), Ok((0x6000, P)));
}

#[test]
fn disabling_and_enabling_translation_keeps_the_caches() {
    let mut f = unit(no_cm());
    let (_, pt) = f.linux_boot();
    let mut t = f.tables();
    map(&mut t, pt, 0x1000, 0x5000, 1);
    assert!(f.vtd.translate(DEV, 0x1000, Access::Read).is_ok());
    f.drv.set_translation(&mut f.vtd, false);
    assert_eq!(f.vtd.translate(DEV, 0x1000, Access::Read), Ok((0x1000, P)));
    map(&mut t, pt, 0x1000, 0x6000, 1);
    f.drv.set_translation(&mut f.vtd, true);
    // 11.4.4.1: software invalidates before re-enabling; this one did not.
    assert_eq!(f.vtd.translate(DEV, 0x1000, Access::Read), Ok((0x5000, P)));
}

#[test]
fn caches_hold_a_bounded_number_of_entries_and_count_evictions() {
    let config = VtdConfig {
        caches: CacheConfig {
            iotlb: 2,
            ..CacheConfig::HARDWARE
        },
        ..no_cm()
    };
    let mut f = unit(config);
    let (_, pt) = f.linux_boot();
    let mut t = f.tables();
    map(&mut t, pt, 0, 0x10_0000, 16);
    for page in 0..16 {
        assert!(f.vtd.translate(DEV, page * P, Access::Read).is_ok());
    }
    assert_eq!(f.vtd.caches().iotlb.len(), 2);
    assert_eq!(f.vtd.stats().caches.iotlb.evictions, 14);
    // The two last pages are the ones kept.
    map(&mut t, pt, 0, 0x20_0000, 16);
    assert_eq!(
        f.vtd.translate(DEV, 15 * P, Access::Read),
        Ok((0x10_f000, P))
    );
    assert_eq!(f.vtd.translate(DEV, 0, Access::Read), Ok((0x20_0000, P)));
}

#[test]
fn caches_off_read_the_tables_for_every_request() {
    let config = VtdConfig {
        caches: CacheConfig::OFF,
        ..VtdConfig::default()
    };
    let mut f = unit(config);
    let (_, pt) = f.linux_boot();
    let mut t = f.tables();
    map(&mut t, pt, 0x1000, 0x5000, 1);
    assert!(f.vtd.translate(DEV, 0x1000, Access::Read).is_ok());
    map(&mut t, pt, 0x1000, 0x6000, 1);
    assert_eq!(f.vtd.translate(DEV, 0x1000, Access::Read), Ok((0x6000, P)));
    assert_eq!(f.vtd.stats().caches.iotlb.hits, 0);
}

#[test]
fn pasid_and_iotlb_invalidations_select_their_stage_in_scalable_mode() {
    let config = VtdConfig {
        scalable_mode: true,
        first_stage: true,
        caching_mode: false,
        ..VtdConfig::default()
    };
    let mut f = unit(config);
    let mut t = ScalableTables::at(&f.mem, f.next_tables);
    t.context(DEV, 2, 0, true);
    let fs = t.first_stage_table();
    t.map_first_stage(
        fs,
        0x1000,
        0x5000,
        P,
        crate::testing::FirstStageFlags::USER_RW,
    );
    t.first_stage(DEV, 0, DOMAIN, fs);
    f.drv.wide = true;
    f.drv.enable_qi(&mut f.vtd);
    f.drv.set_scalable_root(&mut f.vtd, t.root);
    f.drv.set_translation(&mut f.vtd, true);
    assert_eq!(f.vtd.translate(DEV, 0x1000, Access::Read), Ok((0x5000, P)));
    t.map_first_stage(
        fs,
        0x1000,
        0x6000,
        P,
        crate::testing::FirstStageFlags::USER_RW,
    );
    // A type-2 invalidation concerns second-stage translations only (6.5.2.3).
    f.sync(&[encode::iotlb_page(DOMAIN, 0x1000, 0, false)]);
    assert_eq!(f.vtd.translate(DEV, 0x1000, Access::Read), Ok((0x5000, P)));
    f.sync(&[encode::pasid_iotlb_page(DOMAIN, 0, 0x1000, 0, false)]);
    assert_eq!(f.vtd.translate(DEV, 0x1000, Access::Read), Ok((0x6000, P)));
    // The PASID entry is cached until a PASID-cache invalidation.
    t.pass_through(DEV, 0, DOMAIN);
    assert_eq!(f.vtd.translate(DEV, 0x1000, Access::Read), Ok((0x6000, P)));
    f.sync(&[encode::pasid_cache_pasid(DOMAIN, 0)]);
    assert_eq!(f.vtd.translate(DEV, 0x9000, Access::Read), Ok((0x9000, P)));
}

#[test]
fn a_first_stage_write_through_a_page_read_before_walks_again_to_set_dirty() {
    let config = VtdConfig {
        scalable_mode: true,
        first_stage: true,
        ..VtdConfig::default()
    };
    let mut f = unit(config);
    let mut t = ScalableTables::at(&f.mem, f.next_tables);
    t.context(DEV, 2, 0, false);
    let fs = t.first_stage_table();
    t.map_first_stage(
        fs,
        0x1000,
        0x5000,
        P,
        crate::testing::FirstStageFlags::USER_RW,
    );
    t.first_stage(DEV, 0, DOMAIN, fs);
    f.drv.wide = true;
    f.drv.enable_qi(&mut f.vtd);
    f.drv.set_scalable_root(&mut f.vtd, t.root);
    f.drv.set_translation(&mut f.vtd, true);
    let leaf = t.first_stage_entry_addr(fs, 0x1000, 1);
    assert!(f.vtd.translate(DEV, 0x1000, Access::Read).is_ok());
    assert!(f.vtd.translate(DEV, 0x1000, Access::Read).is_ok());
    assert_eq!(t.read_u64(leaf) & 1 << 6, 0, "not dirty after reads");
    assert!(f.vtd.translate(DEV, 0x1000, Access::Write).is_ok());
    assert_ne!(t.read_u64(leaf) & 1 << 6, 0, "dirty");
    assert_eq!(f.vtd.stats().first_stage_walks, 2);
    assert!(f.vtd.translate(DEV, 0x1000, Access::Write).is_ok());
    assert_eq!(
        f.vtd.stats().first_stage_walks,
        2,
        "then served from the IOTLB"
    );
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

fn ir_unit() -> Fixture {
    unit(VtdConfig {
        interrupt_remapping: true,
        ..no_cm()
    })
}

#[test]
fn the_interrupt_entry_cache_keeps_an_irte_until_invalidated_and_sirtp_empties_it() {
    let mut f = ir_unit();
    f.drv.enable_qi(&mut f.vtd);
    write_irte(&f, 3, 0x40);
    f.drv.set_interrupt_remapping(&mut f.vtd, IRT | 7, true);
    let vector = |f: &mut Fixture| {
        f.vtd
            .remap_interrupt(DEV, MsiMessage::remappable(3))
            .map(|m| m.data & 0xff)
    };
    assert_eq!(vector(&mut f), Some(0x40));
    write_irte(&f, 3, 0x41);
    assert_eq!(vector(&mut f), Some(0x40), "the cached entry");
    f.sync(&[encode::interrupt_entry_cache(Some((2, 0)))]);
    assert_eq!(vector(&mut f), Some(0x40), "another index");
    f.sync(&[encode::interrupt_entry_cache(Some((2, 1)))]);
    assert_eq!(
        vector(&mut f),
        Some(0x41),
        "index 3 is in the block of 2 at 2"
    );
    write_irte(&f, 3, 0x42);
    f.drv.set_interrupt_remapping(&mut f.vtd, IRT | 7, true);
    assert_eq!(vector(&mut f), Some(0x42), "ESIRTPS");
    let c = f.vtd.stats().caches.iec;
    assert_eq!((c.hits, c.misses), (2, 3), "{c:?}");
}
