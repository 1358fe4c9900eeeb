//! Caching mode: how guest invalidations become host DMA work, strict and deferred.

use std::time::Duration;

use super::*;

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

/// A booted deferred-mode unit whose guest mapped page 0 and unmapped it again, so the host
/// unmap waits; the guest's tables and its device's page table.
fn one_deferred_unmap() -> (Fixture, Tables, PageTable) {
    let mut f = deferred_fixture();
    let (_, pt) = f.linux_boot();
    let mut t = f.tables();
    map(&mut t, pt, 0, 0x10_0000, 1);
    f.sync(&[encode::iotlb_page(DOMAIN, 0, 0, false)]);
    t.unmap(pt, 0, P);
    f.sync(&[encode::iotlb_page(DOMAIN, 0, 0, false)]);
    assert_eq!(f.vtd.deferred_pending(), 1);
    (f, t, pt)
}

#[test]
fn deferred_unmaps_wait_for_the_time_bound() {
    let (mut f, ..) = one_deferred_unmap();
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
fn no_deadline_once_no_deferred_unmap_waits() {
    let (mut f, ..) = one_deferred_unmap();
    f.clock.advance(Duration::from_millis(4));
    assert_eq!(f.vtd.next_deadline(), Some(Duration::from_millis(6)));
    // Detaching the device unmaps everything it had, the unmap that waited included.
    f.vtd.detach(DEV);
    assert_eq!(f.vtd.deferred_pending(), 0);
    assert_eq!(f.vtd.next_deadline(), None);
}

#[test]
fn the_age_bound_starts_afresh_once_the_last_waiting_unmap_is_cancelled() {
    let (mut f, mut t, pt) = one_deferred_unmap();
    f.clock.advance(Duration::from_millis(8));
    map(&mut t, pt, 0, 0x10_0000, 1);
    f.sync(&[encode::iotlb_page(DOMAIN, 0, 0, false)]);
    assert_eq!(f.vtd.deferred_pending(), 0, "the remap cancelled it");
    assert_eq!(f.vtd.next_deadline(), None);
    f.clock.advance(Duration::from_millis(5));
    t.unmap(pt, 0, P);
    f.sync(&[encode::iotlb_page(DOMAIN, 0, 0, false)]);
    // 13 ms after the first unmap, but the one waiting now is new.
    assert_eq!(f.vtd.next_deadline(), Some(Duration::from_millis(10)));
    f.clock.advance(Duration::from_millis(9));
    f.vtd.poll();
    assert_eq!(f.host_pages().len(), 1, "not due yet");
    f.clock.advance(Duration::from_millis(1));
    f.vtd.poll();
    assert!(f.host_pages().is_empty());
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
    let (mut f, mut t, _) = one_deferred_unmap();
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
fn turning_translation_off_leaves_no_mapping_above_ram_under_either_strategy() {
    for strategy in [SyncStrategy::Batched, SyncStrategy::PerLeaf] {
        let config = VtdConfig {
            strategy,
            ..VtdConfig::default()
        };
        let mut f = fixture_with(config, SimHost::new());
        let (_, pt) = f.linux_boot();
        let mut t = f.tables();
        // An IOVA above guest RAM, as Linux hands them out from the top of 32 bits.
        map(&mut t, pt, 0xfff0_0000, 0x30_0000, 2);
        f.sync(&[encode::iotlb_page(DOMAIN, 0xfff0_0000, 1, false)]);
        assert_eq!(f.host_pages().len(), 2);
        f.drv.set_translation(&mut f.vtd, false);
        let pages = f.host.get().page_map();
        assert_eq!(
            pages.len() as u64,
            crate::testing::TEST_MEM_SIZE / P,
            "{strategy:?}: all of RAM, identity, and nothing else"
        );
        assert!(pages.iter().all(|(&i, &(g, _))| i == g), "{strategy:?}");
    }
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
fn tables_beyond_the_walk_budget_lose_their_host_mappings_rather_than_keep_stale_ones() {
    let config = VtdConfig {
        walk_budget: 4096,
        ..VtdConfig::default()
    };
    let mut f = fixture_with(config, SimHost::new());
    let (_, pt) = f.linux_boot();
    let mut t = f.tables();
    map(&mut t, pt, 0x1000, 0x5000, 4);
    f.sync(&[encode::iotlb_domain(DOMAIN)]);
    assert_eq!(f.host_pages().len(), 4);
    // The guest unmaps its pages and turns the rest of its tables into a loop.
    t.unmap(pt, 0x1000, 4 * P);
    for i in 1..512 {
        t.write_u64(pt.root + i * 8, pt.root | 3);
    }
    f.sync(&[encode::iotlb_domain(DOMAIN)]);
    assert_eq!(f.vtd.stats().walk_budget_exceeded, 1);
    assert!(
        f.host_pages().is_empty(),
        "the device must not keep reaching pages the guest unmapped"
    );
}

#[test]
fn one_submission_shares_one_walk_budget_however_many_waits_it_holds() {
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
    // 100 global invalidations, each followed by a wait: one tail write.
    let status = f.drv.status;
    let descs: Vec<[u64; 2]> = (0..100)
        .flat_map(|_| {
            [
                encode::iotlb_global(),
                encode::wait(Some((status, 1)), false, false),
            ]
        })
        .collect();
    let before = f.vtd.stats().pages_walked;
    f.drv.submit(&mut f.vtd, &f.mem, &descs);
    assert_eq!(
        f.vtd.stats().waits,
        100 + 1,
        "every wait completed (plus the boot one)"
    );
    // The first sync reads about a dozen tables before the shared budget runs out; the others
    // stop after one descent of 4 levels. With a budget per sync, each would read a dozen.
    let read = f.vtd.stats().pages_walked - before;
    assert!(read < 100 * 6, "{read} tables read");
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
