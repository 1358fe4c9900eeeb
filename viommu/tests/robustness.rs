//! Robustness of the unit under guests that push it to its limits: full queues, huge
//! submissions, tables yanked away while the host maps through them, a host that says no.

use viommu::descriptor::encode;
use viommu::regs::*;
use viommu::testing::{mem, Driver, ManualClock, Mem, RecordingMsi, SharedHost, SimHost, Tables};
use viommu::{Perm, SourceId, Vtd, VtdConfig};
use vm_memory::{Bytes, GuestAddress};

const P: u64 = 0x1000;
const DEV: SourceId = SourceId(0x0018);

struct Setup {
    mem: Mem,
    vtd: Vtd<Mem>,
    host: SharedHost,
    drv: Driver,
    tables: Tables,
    pt: viommu::walk::PageTable,
}

fn setup(queue_entries: u64, host: SimHost) -> Setup {
    let mem = mem();
    let mut vtd = Vtd::new(
        VtdConfig::default(),
        mem.clone(),
        Box::new(RecordingMsi::default()),
        Box::new(ManualClock::default()),
    )
    .expect("config");
    let host = SharedHost::new(host);
    vtd.attach(DEV, Box::new(host.clone())).expect("attach");
    let mut drv = Driver::new();
    drv.queue = 20 << 20;
    drv.queue_entries = queue_entries;
    let mut tables = Tables::new(&mem);
    let pt = tables.context(DEV, 1, 4);
    drv.enable_qi(&mut vtd);
    drv.set_root(&mut vtd, tables.root);
    drv.set_translation(&mut vtd, true);
    Setup {
        mem,
        vtd,
        host,
        drv,
        tables,
        pt,
    }
}

#[test]
fn a_full_queue_of_descriptors_is_processed_in_one_tail_write() {
    // The largest queue (QS = 7): 32768 entries, of which 32767 can be pending at once.
    let mut s = setup(32768, SimHost::new());
    for k in 0..1024u64 {
        s.tables
            .map(s.pt, k * 2 * P, 0x10_0000 + k * P, P, Perm::RW);
    }
    let mut descs: Vec<[u64; 2]> = (0..32766u64)
        .map(|k| encode::iotlb_page(1, (k % 1024) * 2 * P, 0, false))
        .collect();
    descs.push(encode::wait(Some((s.drv.status, 7)), false, false));
    s.drv.submit(&mut s.vtd, &s.mem, &descs);
    assert_eq!(
        s.mem.read_obj::<u32>(GuestAddress(s.drv.status)).unwrap(),
        7
    );
    assert_eq!(Driver::read32(&s.vtd, FSTS_REG) & FSTS_IQE, 0);
    assert_eq!(s.host.get().page_map().len(), 1024);
    // One sync for the whole submission: each page mapped once.
    assert_eq!(
        s.vtd.stats().host_map_calls,
        1024 + 1,
        "plus the identity map at attach"
    );
}

#[test]
fn sixty_four_thousand_descriptors_back_to_back_complete_with_exact_host_state() {
    let mut s = setup(32768, SimHost::new());
    let mut waits = 0;
    for round in 0..2u64 {
        for k in 0..256u64 {
            s.tables
                .map(s.pt, k * P, 0x20_0000 + (k + round) * P, P, Perm::RW);
        }
        let mut descs: Vec<[u64; 2]> = (0..32767u64 - 1)
            .map(|k| encode::iotlb_page(1, (k % 256) * P, 0, false))
            .collect();
        descs.push(encode::wait(
            Some((s.drv.status, round as u32 + 1)),
            false,
            false,
        ));
        s.drv.submit(&mut s.vtd, &s.mem, &descs);
        waits += 1;
        assert_eq!(
            s.mem.read_obj::<u32>(GuestAddress(s.drv.status)).unwrap(),
            round as u32 + 1
        );
    }
    assert!(s.vtd.stats().descriptors >= 65534);
    assert_eq!(s.vtd.stats().waits, waits);
    let pages = s.host.get().page_map();
    assert_eq!(pages.len(), 256);
    assert_eq!(pages[&0].0, 0x20_1000, "the second round's translation");
}

#[test]
fn moving_the_root_table_removes_every_host_mapping_it_no_longer_gives() {
    let mut s = setup(256, SimHost::new());
    s.tables.map(s.pt, 0, 0x10_0000, 64 * P, Perm::RW);
    assert!(s
        .drv
        .submit_sync(&mut s.vtd, &s.mem, &[encode::iotlb_domain(1)], 1));
    assert_eq!(s.host.get().page_map().len(), 64);
    // A new, empty root table: the device no longer has a context.
    let empty = Tables::at(&s.mem, 30 << 20);
    s.drv.set_root(&mut s.vtd, empty.root);
    assert!(s.host.get().page_map().is_empty(), "nothing leaked");
    assert!(s.vtd.host_mappings(DEV).is_empty());
}

#[test]
fn disabling_translation_replaces_the_guest_mappings_with_guest_ram_and_back() {
    let mut s = setup(256, SimHost::new());
    s.tables.map(s.pt, 0x100_0000, 0x10_0000, 8 * P, Perm::READ);
    assert!(s
        .drv
        .submit_sync(&mut s.vtd, &s.mem, &[encode::iotlb_domain(1)], 1));
    s.drv.set_translation(&mut s.vtd, false);
    let pages = s.host.get().page_map();
    assert_eq!(pages.len() as u64, viommu::testing::TEST_MEM_SIZE / P);
    assert!(!pages.contains_key(&0x100_0000) || pages[&0x100_0000].0 == 0x100_0000);
    s.drv.set_translation(&mut s.vtd, true);
    assert_eq!(s.host.get().page_map().len(), 8);
}

#[test]
fn a_host_at_its_mapping_limit_gives_faults_not_crashes_and_recovers() {
    let mut s = setup(256, SimHost::with_limit(16));
    // 64 scattered pages: the host takes 16 and refuses the rest.
    for k in 0..64u64 {
        s.tables
            .map(s.pt, k * 2 * P, 0x10_0000 + k * 2 * P, P, Perm::RW);
    }
    assert!(s
        .drv
        .submit_sync(&mut s.vtd, &s.mem, &[encode::iotlb_domain(1)], 1));
    let stats = s.vtd.stats();
    assert_eq!(stats.host_errors, 48);
    assert!(stats.faults >= 1);
    assert!(Driver::read32(&s.vtd, FSTS_REG) & FSTS_PPF != 0);
    assert_eq!(s.host.get().mappings(), 16);
    // The guest unmaps most of them; the next sync maps what fits again.
    s.tables.unmap(s.pt, 0, 120 * P);
    assert!(s
        .drv
        .submit_sync(&mut s.vtd, &s.mem, &[encode::iotlb_domain(1)], 2));
    assert_eq!(s.host.get().mappings(), 4);
    assert_eq!(s.host.get().page_map().len(), 4);
}
