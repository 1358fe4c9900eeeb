//! The host's shared identity domain: a device whose view is identity (translation off, or a
//! pass-through entry) uses it instead of its own domain mapping all guest RAM, and is moved
//! back only once its own domain maps what the guest's tables say.

use super::*;
use crate::record::Recorder;

fn shared_identity_fixture() -> Fixture {
    fixture_with(VtdConfig::default(), SimHost::with_shared_identity())
}

/// Boots as Linux does, but with `0x1000 -> 0x3000` in DEV's tables before translation is on.
fn boot_with_a_mapping(f: &mut Fixture) -> PageTable {
    let mut t = Tables::new(&f.mem);
    let pt = t.context(DEV, DOMAIN, 4);
    t.map(pt, 0x1000, 0x3000, P, Perm::RW);
    f.root = t.root;
    f.drv.enable_qi(&mut f.vtd);
    f.drv.set_root(&mut f.vtd, t.root);
    f.sync(&[encode::context_global(), encode::iotlb_global()]);
    f.drv.set_translation(&mut f.vtd, true);
    pt
}

#[test]
fn translation_off_puts_the_device_on_the_shared_domain_without_a_host_map() {
    let f = shared_identity_fixture();
    let host = f.host.get();
    assert!(host.on_identity);
    assert_eq!(host.switches, vec![(true, 0)]);
    assert_eq!(host.mappings(), 0, "its own domain maps nothing");
    assert_eq!(host.map_calls, 0);
    assert_eq!(f.vtd.stats().host_map_calls, 0);
    assert!(f.vtd.host_mappings(DEV).is_empty());
}

#[test]
fn enabling_translation_maps_the_tables_before_moving_the_device_back() {
    let mut f = shared_identity_fixture();
    boot_with_a_mapping(&mut f);
    let host = f.host.get();
    assert!(!host.on_identity);
    // The switch back found the table's page already mapped in the device's own domain.
    assert_eq!(host.switches, vec![(true, 0), (false, 1)]);
    drop(host);
    assert_eq!(f.host_pages(), vec![(0x1000, 0x3000)]);
    assert_eq!(f.vtd.stats().host_map_calls, 1);
    assert_eq!(f.vtd.stats().host_errors, 0);
}

#[test]
fn a_pass_through_entry_drops_the_own_mappings_and_a_translated_one_restores_them_first() {
    let mut f = shared_identity_fixture();
    let pt = boot_with_a_mapping(&mut f);
    let mut t = f.tables();
    t.attach_pass_through(DEV, DOMAIN);
    f.sync(&[encode::context_device(DOMAIN, DEV, 0)]);
    {
        let host = f.host.get();
        assert!(host.on_identity);
        assert_eq!(host.switches.last(), Some(&(true, 1)));
        assert_eq!(
            host.mappings(),
            0,
            "the unused own mappings no longer pin memory"
        );
        assert_eq!(
            host.map_calls, 1,
            "nothing of guest RAM mapped for the identity view"
        );
    }
    let stats = f.vtd.stats();
    assert_eq!((stats.host_map_calls, stats.host_unmap_calls), (1, 1));
    t.attach(DEV, DOMAIN, pt);
    f.sync(&[encode::context_device(DOMAIN, DEV, 0)]);
    let host = f.host.get();
    assert!(!host.on_identity);
    assert_eq!(host.switches.last(), Some(&(false, 1)));
    drop(host);
    assert_eq!(f.host_pages(), vec![(0x1000, 0x3000)]);
}

#[test]
fn turning_translation_off_again_returns_to_the_shared_domain() {
    let mut f = shared_identity_fixture();
    boot_with_a_mapping(&mut f);
    f.drv.set_translation(&mut f.vtd, false);
    let host = f.host.get();
    assert!(host.on_identity);
    assert_eq!(host.switches, vec![(true, 0), (false, 1), (true, 1)]);
    assert_eq!(host.mappings(), 0);
}

#[test]
fn a_refused_switch_back_is_counted_and_retried_at_the_next_sync() {
    let mut host = SimHost::with_shared_identity();
    host.refuse_switch_back = 1;
    let mut f = fixture_with(VtdConfig::default(), host);
    boot_with_a_mapping(&mut f);
    assert!(f.host.get().on_identity, "the host refused the switch");
    assert_eq!(f.vtd.stats().host_errors, 1);
    f.sync(&[]);
    let host = f.host.get();
    assert!(!host.on_identity, "retried at the next wait's sync");
    assert_eq!(host.switches.last(), Some(&(false, 1)));
}

#[test]
fn detaching_moves_the_device_back_onto_its_own_empty_domain() {
    let mut f = shared_identity_fixture();
    f.vtd.detach(DEV);
    let host = f.host.get();
    assert!(!host.on_identity);
    assert_eq!(host.switches, vec![(true, 0), (false, 0)]);
}

#[test]
fn a_recording_unit_keeps_identity_views_in_the_devices_own_domain() {
    let mut f = unit(VtdConfig::default());
    f.vtd
        .start_recording(Recorder::new(Box::new(std::io::sink()), "x", 1 << 20))
        .unwrap();
    let host = SharedHost::new(SimHost::with_shared_identity());
    f.vtd.attach(DEV, Box::new(host.clone())).unwrap();
    let host = host.get();
    assert!(host.switches.is_empty(), "never asked");
    assert_eq!(
        host.mappings(),
        1,
        "all guest RAM in its own domain, as replay does"
    );
}

#[test]
fn the_per_leaf_baseline_uses_the_shared_domain_too() {
    let config = VtdConfig {
        strategy: SyncStrategy::PerLeaf,
        ..VtdConfig::default()
    };
    let mut f = fixture_with(config, SimHost::with_shared_identity());
    assert!(f.host.get().on_identity);
    assert_eq!(f.host.get().map_calls, 0);
    boot_with_a_mapping(&mut f);
    assert_eq!(f.host.get().switches, vec![(true, 0), (false, 1)]);
    assert_eq!(f.host_pages(), vec![(0x1000, 0x3000)]);
}
