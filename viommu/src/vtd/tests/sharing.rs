//! Devices the guest puts in one translated domain share the first one's host domain: what the
//! guest maps is mapped (and pinned, and flushed) on the host once, every device reaches
//! exactly what its own view allows, and a device leaving the view gets its own domain mapped
//! before it is moved back onto it.

use super::*;
use crate::record::Recorder;
use crate::testing::{HostDomains, IDENTITY};
use crate::{DomainUse, HostDomainUse};

const A: SourceId = SourceId(0x0028); // 00:05.0
const B: SourceId = SourceId(0x0029); // 00:05.1
const C: SourceId = SourceId(0x0030); // 00:06.0
/// Their own host domains' ids.
const A_OWN: u32 = 1;
const B_OWN: u32 = 2;
const C_OWN: u32 = 3;
const OTHER: u16 = 2;

struct Guest {
    f: Fixture,
    host: HostDomains,
    /// The tables A and B share, with 0x1000 -> 0x3000 and 0x5000 -> 0x9000 (2 pages).
    pt: PageTable,
}

const SHARED_PAGES: [(u64, u64); 3] = [(0x1000, 0x3000), (0x5000, 0x9000), (0x6000, 0xa000)];

/// A and B (and C, on its own) attached, translation on as Linux does it, A and B in
/// `DOMAIN` over the same tables, which map [`SHARED_PAGES`].
fn guest_with(config: VtdConfig, recording: bool) -> Guest {
    let mut f = unit(config);
    if recording {
        f.vtd
            .start_recording(Recorder::new(Box::new(std::io::sink()), "x", 1 << 20))
            .unwrap();
    }
    let host = HostDomains::default();
    for (dev, own) in [(A, A_OWN), (B, B_OWN), (C, C_OWN)] {
        f.vtd.attach(dev, Box::new(host.device(own))).unwrap();
    }
    let mut t = Tables::new(&f.mem);
    let pt = t.context(A, DOMAIN, 4);
    t.attach(B, DOMAIN, pt);
    let c = t.context(C, OTHER, 4);
    map(&mut t, c, 0x1000, 0x4000, 1);
    f.root = t.root;
    f.drv.enable_qi(&mut f.vtd);
    f.drv.set_root(&mut f.vtd, t.root);
    f.sync(&[encode::context_global(), encode::iotlb_global()]);
    f.drv.set_translation(&mut f.vtd, true);
    let mut t = f.tables();
    map(&mut t, pt, 0x1000, 0x3000, 1);
    map(&mut t, pt, 0x5000, 0x9000, 2);
    f.sync(&[encode::iotlb_domain(DOMAIN)]);
    Guest { f, host, pt }
}

fn guest() -> Guest {
    guest_with(VtdConfig::default(), false)
}

#[test]
fn devices_in_one_guest_domain_reach_its_tables_through_one_host_domain() {
    let g = guest();
    assert_eq!(g.host.attached(B_OWN), A_OWN, "B uses A's host domain");
    assert_eq!(g.host.attached(A_OWN), A_OWN);
    assert_eq!(g.host.attached(C_OWN), C_OWN, "C's domain is another one");
    assert_eq!(g.host.reach_pages(A_OWN), SHARED_PAGES);
    assert_eq!(g.host.reach_pages(B_OWN), SHARED_PAGES);
    assert_eq!(g.host.reach_pages(C_OWN), vec![(0x1000, 0x4000)]);
    assert_eq!(g.host.mappings(B_OWN), 0, "B's own domain maps nothing");
    assert_eq!(g.host.pinned_pages(), 3 + 1, "the shared pages pinned once");
    assert_eq!(g.f.vtd.stats().host_domain_joins, 1);
    assert_eq!(g.f.vtd.stats().host_errors, 0);
    assert_eq!(
        g.f.vtd.host_domains(),
        vec![
            HostDomainUse {
                source: A,
                on: DomainUse::Own,
                own_mappings: 2,
                own_pages: 3
            },
            HostDomainUse {
                source: B,
                on: DomainUse::SharedWith(A),
                own_mappings: 0,
                own_pages: 0
            },
            HostDomainUse {
                source: C,
                on: DomainUse::Own,
                own_mappings: 1,
                own_pages: 1
            },
        ]
    );
}

#[test]
fn a_shared_domain_maps_and_unmaps_once_for_all_its_devices() {
    let mut g = guest();
    let maps = g.host.map_calls();
    let unmaps = g.f.vtd.stats().host_unmap_calls;
    let mut t = g.f.tables();
    map(&mut t, g.pt, 0x20_0000, 0x40_0000, 1);
    t.unmap(g.pt, 0x1000, P);
    g.f.sync(&[
        encode::iotlb_page(DOMAIN, 0x20_0000, 0, false),
        encode::iotlb_page(DOMAIN, 0x1000, 0, false),
    ]);
    let expected = vec![(0x5000, 0x9000), (0x6000, 0xa000), (0x20_0000, 0x40_0000)];
    assert_eq!(g.host.reach_pages(A_OWN), expected);
    assert_eq!(g.host.reach_pages(B_OWN), expected);
    assert_eq!(
        g.host.map_calls() - maps,
        1,
        "one host map for both devices"
    );
    assert_eq!(
        g.f.vtd.stats().host_unmap_calls - unmaps,
        1,
        "one host unmap for both devices"
    );
}

#[test]
fn a_leader_moved_elsewhere_first_hands_its_follower_its_own_domain_mapped() {
    let mut g = guest();
    let mut t = g.f.tables();
    let moved = t.context(A, OTHER, 4);
    map(&mut t, moved, 0x7000, 0x8000, 1);
    g.f.sync(&[
        encode::context_device(DOMAIN, A, 0),
        encode::iotlb_domain(OTHER),
    ]);
    assert_eq!(g.host.attached(B_OWN), B_OWN, "B is back on its own domain");
    let back = g.host.switches().into_iter().rfind(|s| s.0 == B_OWN);
    assert_eq!(
        back,
        Some((B_OWN, B_OWN, 2)),
        "B's own domain mapped its view before B moved"
    );
    assert_eq!(g.host.reach_pages(B_OWN), SHARED_PAGES);
    assert_eq!(g.host.reach_pages(A_OWN), vec![(0x7000, 0x8000)]);
    assert_eq!(g.f.vtd.stats().host_errors, 0);
}

#[test]
fn a_follower_moved_elsewhere_gets_its_own_domain_mapped_and_the_leader_keeps_its_view() {
    let mut g = guest();
    let mut t = g.f.tables();
    let moved = t.context(B, 3, 4);
    map(&mut t, moved, 0x7000, 0x8000, 1);
    g.f.sync(&[
        encode::context_device(DOMAIN, B, 0),
        encode::iotlb_domain(3),
    ]);
    assert_eq!(g.host.attached(B_OWN), B_OWN);
    assert_eq!(
        g.host.switches().into_iter().rfind(|s| s.0 == B_OWN),
        Some((B_OWN, B_OWN, 1))
    );
    assert_eq!(g.host.reach_pages(B_OWN), vec![(0x7000, 0x8000)]);
    assert_eq!(g.host.reach_pages(A_OWN), SHARED_PAGES);
}

#[test]
fn a_device_moved_into_a_domain_in_use_joins_it_without_a_host_map() {
    let mut g = guest();
    let maps = g.host.map_calls();
    let mut t = g.f.tables();
    t.attach(C, DOMAIN, g.pt);
    g.f.sync(&[encode::context_device(OTHER, C, 0)]);
    assert_eq!(g.host.attached(C_OWN), A_OWN);
    assert_eq!(g.host.reach_pages(C_OWN), SHARED_PAGES);
    assert_eq!(g.host.map_calls(), maps, "nothing mapped for C");
    assert_eq!(
        g.host.mappings(C_OWN),
        0,
        "C's old mapping no longer pinned"
    );
}

#[test]
fn detaching_the_leader_leaves_its_follower_on_its_own_domain_mapped_first() {
    let mut g = guest();
    g.f.vtd.detach(A);
    assert_eq!(g.host.attached(B_OWN), B_OWN);
    assert_eq!(
        g.host.switches().into_iter().rfind(|s| s.0 == B_OWN),
        Some((B_OWN, B_OWN, 2))
    );
    assert_eq!(g.host.reach_pages(B_OWN), SHARED_PAGES);
    assert_eq!(
        g.host.mappings(A_OWN),
        0,
        "the detached device's domain emptied"
    );
}

#[test]
fn detaching_a_follower_leaves_it_reaching_nothing_and_the_leader_untouched() {
    let mut g = guest();
    g.f.vtd.detach(B);
    assert_eq!(g.host.attached(B_OWN), B_OWN);
    assert!(g.host.reach_pages(B_OWN).is_empty());
    assert_eq!(g.host.reach_pages(A_OWN), SHARED_PAGES);
}

#[test]
fn the_same_tables_under_two_domain_ids_are_not_shared() {
    // Invalidations name a domain id: a device under another id must see only its own.
    let mut g = guest();
    let mut t = g.f.tables();
    t.attach(C, OTHER, g.pt);
    g.f.sync(&[
        encode::context_device(OTHER, C, 0),
        encode::iotlb_domain(OTHER),
    ]);
    assert_eq!(g.host.attached(C_OWN), C_OWN);
    assert_eq!(g.host.reach_pages(C_OWN), SHARED_PAGES);
}

#[test]
fn a_refused_switch_leaves_the_device_on_its_own_domain_with_its_view_mapped() {
    let mut f = unit(VtdConfig::default());
    let host = HostDomains::default();
    f.vtd.attach(A, Box::new(host.device(A_OWN))).unwrap();
    f.vtd.attach(B, Box::new(host.device(B_OWN))).unwrap();
    let mut t = Tables::new(&f.mem);
    let pt = t.context(A, DOMAIN, 4);
    map(&mut t, pt, 0x1000, 0x3000, 1);
    t.attach(B, DOMAIN, pt);
    f.root = t.root;
    f.drv.enable_qi(&mut f.vtd);
    f.drv.set_root(&mut f.vtd, t.root);
    f.sync(&[encode::context_global(), encode::iotlb_global()]);
    f.drv.set_translation(&mut f.vtd, true);
    host.refuse_switches(1);
    f.sync(&[encode::iotlb_domain(DOMAIN)]);
    assert_eq!(host.attached(B_OWN), B_OWN);
    assert_eq!(host.reach_pages(B_OWN), vec![(0x1000, 0x3000)]);
    assert_eq!(f.vtd.stats().host_errors, 1);
    assert_eq!(f.vtd.stats().host_domain_joins, 0);
}

#[test]
fn the_per_leaf_baseline_shares_domains_too() {
    let config = VtdConfig {
        strategy: SyncStrategy::PerLeaf,
        ..VtdConfig::default()
    };
    let g = guest_with(config, false);
    assert_eq!(g.host.attached(B_OWN), A_OWN);
    assert_eq!(g.host.reach_pages(B_OWN), SHARED_PAGES);
    assert_eq!(g.host.mappings(B_OWN), 0);
}

#[test]
fn a_recording_unit_keeps_every_device_on_its_own_domain() {
    let g = guest_with(VtdConfig::default(), true);
    assert!(g.host.switches().is_empty(), "never asked");
    assert_eq!(g.host.reach_pages(B_OWN), SHARED_PAGES);
    assert_eq!(
        g.host.mappings(B_OWN),
        2,
        "mirrored in its own, as replay does"
    );
}

#[test]
fn a_device_goes_from_the_identity_domain_to_a_leaders_and_back_to_all_guest_ram() {
    let mut f = unit(VtdConfig::default());
    let host = HostDomains::with_identity();
    f.vtd.attach(A, Box::new(host.device(A_OWN))).unwrap();
    f.vtd.attach(B, Box::new(host.device(B_OWN))).unwrap();
    assert_eq!(host.attached(B_OWN), IDENTITY, "translation off");
    let mut t = Tables::new(&f.mem);
    let pt = t.context(A, DOMAIN, 4);
    map(&mut t, pt, 0x1000, 0x3000, 1);
    t.attach_pass_through(B, DOMAIN + 1);
    f.root = t.root;
    f.drv.enable_qi(&mut f.vtd);
    f.drv.set_root(&mut f.vtd, t.root);
    f.sync(&[encode::context_global(), encode::iotlb_global()]);
    f.drv.set_translation(&mut f.vtd, true);
    f.sync(&[encode::iotlb_global()]);
    assert_eq!(host.attached(A_OWN), A_OWN);
    assert_eq!(host.attached(B_OWN), IDENTITY, "a pass-through entry");
    // Into A's domain: straight from the identity domain onto A's.
    let mut t = f.tables();
    t.attach(B, DOMAIN, pt);
    f.sync(&[encode::context_device(DOMAIN + 1, B, 0)]);
    assert_eq!(host.attached(B_OWN), A_OWN);
    assert_eq!(host.reach_pages(B_OWN), vec![(0x1000, 0x3000)]);
    // Back to pass-through: all guest RAM again, through the identity domain.
    t.attach_pass_through(B, DOMAIN + 1);
    f.sync(&[encode::context_device(DOMAIN, B, 0)]);
    assert_eq!(host.attached(B_OWN), IDENTITY);
    assert_eq!(
        host.reach(B_OWN).len() as u64,
        crate::testing::TEST_MEM_SIZE / P
    );
    assert_eq!(
        host.mappings(B_OWN),
        0,
        "its own domain never mapped anything"
    );
    assert_eq!(f.vtd.stats().host_errors, 0);
}
