use vm_device::pci::bar::BarKind;
use vm_device::ratelimit::{capture::lines_logged_by, BURST};

use super::*;
use crate::testing::{BumpAllocator, FakeDevice, FakeRoutes};
use vm_device::interrupt::MsiMessage;

const RAM: (u64, u64) = (0, 0x8000_0000);

fn function(dev: &FakeDevice, routes: &FakeRoutes) -> PciFunction<FakeDevice> {
    let mut f = PciFunction::new(
        "0000:00:04.0",
        dev.clone(),
        Box::new(routes.clone()),
        &|pin| Some(9 + u32::from(pin)),
    )
    .unwrap();
    f.place_bars(&mut BumpAllocator::new(0xc000_0000, vec![RAM]))
        .unwrap();
    f
}

fn w32(f: &mut PciFunction<FakeDevice>, off: usize, v: u32) -> Vec<BarMove> {
    f.write_config(off / 4, 0, &v.to_le_bytes())
}

fn w16(f: &mut PciFunction<FakeDevice>, off: usize, v: u16) -> Vec<BarMove> {
    f.write_config(off / 4, off % 4, &v.to_le_bytes())
}

#[test]
fn device_is_reset_when_taken_over_and_when_dropped() {
    let dev = FakeDevice::nvme_like();
    let f = function(&dev, &FakeRoutes::default());
    assert_eq!(dev.state().log.first().map(String::as_str), Some("reset"));
    drop(f);
    assert_eq!(dev.state().log.last().map(String::as_str), Some("reset"));
}

#[test]
fn bars_are_placed_by_the_allocator_and_sized_by_the_guest() {
    let dev = FakeDevice::edu_like();
    let mut f = function(&dev, &FakeRoutes::default());
    assert_eq!(
        f.read_config(4),
        0xc000_0000,
        "BAR0 32-bit at the allocated address"
    );
    assert_eq!(
        f.read_config(6),
        0xc001,
        "BAR2 is I/O at the allocated port"
    );
    assert_eq!(f.read_config(5), 0, "no BAR1");
    assert!(w32(&mut f, 0x10, u32::MAX).is_empty());
    assert_eq!(f.read_config(4), 0xfff0_0000, "1 MiB size mask");
    assert!(w32(&mut f, 0x18, u32::MAX).is_empty());
    assert_eq!(f.read_config(6), 0xffff_ffe1, "32-byte I/O BAR size mask");
    assert!(w32(&mut f, 0x14, u32::MAX).is_empty());
    assert_eq!(f.read_config(5), 0, "an absent BAR stays zero");
}

#[test]
fn bar64_sizing_and_relocation_follow_memory_decode() {
    let dev = FakeDevice::nvme_like();
    let mut f = function(&dev, &FakeRoutes::default());
    assert_eq!(f.read_config(4), 0xc000_0004);
    assert_eq!(f.read_config(5), 0);
    assert!(w32(&mut f, 0x10, u32::MAX).is_empty());
    assert!(w32(&mut f, 0x14, u32::MAX).is_empty());
    assert_eq!(
        (f.read_config(4), f.read_config(5)),
        (0xffff_c004, u32::MAX)
    );
    assert!(w32(&mut f, 0x10, 0x0000_8000).is_empty());
    assert!(
        w32(&mut f, 0x14, 0x1).is_empty(),
        "decode off: nothing moves yet"
    );
    let mv = w16(&mut f, 0x04, PCI_COMMAND_MEMORY | 0x4);
    assert_eq!(
        mv,
        vec![BarMove {
            index: 0,
            kind: BarKind::Mmio64,
            old: 0xc000_0000,
            new: 0x1_0000_8000,
            size: 0x4000
        }]
    );
    assert_eq!(f.bar(0).unwrap().addr, 0x1_0000_8000);
    assert!(
        dev.state().log.iter().any(|l| l.starts_with("write 7 0x4")),
        "command reaches the device"
    );
    assert_eq!(f.read_config(1) & 0x7, 0x6);
    // With decoding on, a write moves the BAR at once.
    let mv = w32(&mut f, 0x10, 0x0001_0000);
    assert_eq!(mv[0].new, 0x1_0001_0000);
}

#[test]
fn bar_moved_over_ram_or_another_bar_is_contained_and_keeps_decoding() {
    let dev = FakeDevice::edu_like();
    let mut f = function(&dev, &FakeRoutes::default());
    w16(&mut f, 0x04, PCI_COMMAND_MEMORY | PCI_COMMAND_IO);
    assert!(w32(&mut f, 0x10, 0x1000_0000).is_empty(), "over guest RAM");
    assert_eq!(f.bar(0).unwrap().addr, 0xc000_0000);
    assert_eq!(
        f.read_config(4),
        0x1000_0000,
        "the register keeps the guest's value"
    );
    let mv = w32(&mut f, 0x10, 0xd000_0000);
    assert_eq!(
        (mv[0].old, mv[0].new),
        (0xc000_0000, 0xd000_0000),
        "a good write moves it from its last good place"
    );
    assert!(w32(&mut f, 0x18, 0x1_0000).is_empty(), "I/O past 0xffff");
    assert!(w32(&mut f, 0x10, 0).is_empty(), "address 0");
}

#[test]
fn two_bars_of_one_function_cannot_overlap() {
    let dev = FakeDevice::edu_like();
    dev.add_bar(1, 0x0, 0x1000, true);
    let mut f = function(&dev, &FakeRoutes::default());
    w16(&mut f, 0x04, PCI_COMMAND_MEMORY);
    let bar0 = f.bar(0).unwrap().addr;
    assert!(w32(&mut f, 0x14, bar0 as u32 + 0x1000).is_empty());
    assert_ne!(f.bar(1).unwrap().addr, bar0 + 0x1000);
}

#[test]
fn expansion_rom_is_hidden() {
    let dev = FakeDevice::edu_like();
    dev.put32(0x30, 0xfffe_0001);
    let mut f = function(&dev, &FakeRoutes::default());
    assert_eq!(f.read_config(0x30 / 4), 0);
    w32(&mut f, 0x30, u32::MAX);
    assert_eq!(f.read_config(0x30 / 4), 0);
    assert!(!dev
        .state()
        .log
        .iter()
        .any(|l| l.starts_with("write 7 0x30")));
}

#[test]
fn capability_list_passes_through_with_msix_emulated() {
    let dev = FakeDevice::nvme_like();
    let routes = FakeRoutes::default();
    let mut f = function(&dev, &routes);
    assert_eq!(f.read_config(0x34 / 4) & 0xff, 0x40);
    assert_eq!(
        f.read_config(0x40 / 4),
        0x0003_6011,
        "ID, next pointer and table size"
    );
    assert_eq!(
        f.read_config(0x60 / 4),
        0x0003_0001,
        "PM capability is the device's"
    );
    assert_eq!(
        f.read_config(0x3c / 4) & 0xffff,
        0x010a,
        "INTA on line 10 until MSI-X"
    );
    w16(&mut f, 0x42, PCI_MSIX_FLAGS_ENABLE);
    assert!(dev.state().log.contains(&"enable MSI-X 4".to_string()));
    assert!(
        !dev.state()
            .log
            .iter()
            .any(|l| l.starts_with("write 7 0x42")),
        "MSI-X control never reaches the device"
    );
    assert!(
        routes.state().attached.is_empty(),
        "all vectors start masked"
    );
}

fn program_msix(f: &mut PciFunction<FakeDevice>, vector: u64, addr: u64, data: u32, masked: bool) {
    let table = f.bar(0).unwrap().addr; // offsets are BAR-relative below
    let _ = table;
    let base = 0x2000 + vector * 16;
    f.write_bar(0, base, &addr.to_le_bytes());
    f.write_bar(0, base + 8, &data.to_le_bytes());
    f.write_bar(0, base + 12, &u32::from(masked).to_le_bytes());
}

#[test]
fn msix_vectors_route_unmask_reroute_and_mask() {
    let dev = FakeDevice::nvme_like();
    let routes = FakeRoutes::default();
    let mut f = function(&dev, &routes);
    w16(&mut f, 0x42, PCI_MSIX_FLAGS_ENABLE);
    program_msix(&mut f, 2, 0xfee0_1000, 0x31, false);
    let gsi = f.msix_vectors().gsi(2).unwrap();
    assert_eq!(
        routes.state().routes.get(&gsi),
        Some(&MsiMessage {
            address: 0xfee0_1000,
            data: 0x31
        })
    );
    assert!(routes.state().attached.contains(&gsi));
    // Re-route while live.
    f.write_bar(0, 0x2000 + 2 * 16 + 8, &0x41u32.to_le_bytes());
    assert_eq!(routes.state().routes[&gsi].data, 0x41);
    // Mask: detached; function mask: every vector detached.
    f.write_bar(0, 0x2000 + 2 * 16 + 12, &1u32.to_le_bytes());
    assert!(!routes.state().attached.contains(&gsi));
    f.write_bar(0, 0x2000 + 2 * 16 + 12, &0u32.to_le_bytes());
    w16(&mut f, 0x42, PCI_MSIX_FLAGS_ENABLE | PCI_MSIX_FLAGS_MASKALL);
    assert!(routes.state().attached.is_empty());
    w16(&mut f, 0x42, PCI_MSIX_FLAGS_ENABLE);
    assert!(routes.state().attached.contains(&gsi));
    // Disable: VFIO off, GSIs back.
    w16(&mut f, 0x42, 0);
    assert!(dev.state().log.contains(&"disable MSI-X".to_string()));
    assert_eq!(routes.state().freed.len(), 4);
    assert_eq!(
        routes.state().attached.iter().collect::<Vec<_>>(),
        vec![&10],
        "only INTx again"
    );
}

#[test]
fn msix_table_is_trapped_and_the_rest_of_the_bar_reaches_the_device() {
    let dev = FakeDevice::nvme_like();
    let mut f = function(&dev, &FakeRoutes::default());
    program_msix(&mut f, 0, 0xfee0_0000, 0x22, true);
    assert!(dev.state().bar_data[0][0x2000..0x2010]
        .iter()
        .all(|&b| b == 0));
    let mut back = [0u8; 4];
    f.read_bar(0, 0x2008, &mut back);
    assert_eq!(u32::from_le_bytes(back), 0x22);
    f.write_bar(0, 0x1000, &7u32.to_le_bytes());
    assert_eq!(
        dev.state().bar_data[0][0x1000],
        7,
        "doorbell write forwarded"
    );
    f.write_bar(0, 0x3000, &u64::MAX.to_le_bytes());
    assert_eq!(dev.state().bar_data[0][0x3000], 0, "PBA is read only");
    f.write_bar(0, 0x4000, &[1]);
    let mut past = [0u8; 2];
    f.read_bar(0, 0x3fff, &mut past);
    assert_eq!(past, [0xff, 0xff], "past the BAR reads as all ones");
}

#[test]
fn msix_vector_out_of_range_is_ignored() {
    let dev = FakeDevice::nvme_like();
    let routes = FakeRoutes::default();
    let mut f = function(&dev, &routes);
    w16(&mut f, 0x42, PCI_MSIX_FLAGS_ENABLE);
    // Entry 4 of a 4-entry table sits past the table: it is plain BAR space (the device's).
    program_msix(&mut f, 4, 0xfee0_0000, 0x99, false);
    assert_eq!(f.msix_vectors().len(), 4);
    assert!(routes.state().attached.is_empty());
}

#[test]
fn mmap_areas_leave_out_the_msix_table_and_pba_pages() {
    let dev = FakeDevice::nvme_like();
    let f = function(&dev, &FakeRoutes::default());
    assert_eq!(
        f.mmap_areas(0),
        vec![MmapArea {
            offset: 0,
            size: 0x2000
        }]
    );
    let edu = FakeDevice::edu_like();
    let f = function(&edu, &FakeRoutes::default());
    assert_eq!(f.mmap_areas(0).len(), 1);
    assert!(f.mmap_areas(2).is_empty(), "I/O BARs are always trapped");
}

#[test]
fn msi_enable_routes_each_vector_and_bad_addresses_are_not_delivered() {
    let dev = FakeDevice::edu_like();
    let routes = FakeRoutes::default();
    let mut f = function(&dev, &routes);
    w32(&mut f, 0x44, 0x1234_0000); // not an interrupt address
    w16(&mut f, 0x4c, 0x41);
    w16(&mut f, 0x42, PCI_MSI_FLAGS_ENABLE);
    assert!(dev.state().log.contains(&"enable MSI 1".to_string()));
    assert!(
        routes.state().attached.is_empty(),
        "0x12340000 is not routed"
    );
    w32(&mut f, 0x44, 0xfee0_0000);
    let gsi = f.msi_vectors().gsi(0).unwrap();
    assert!(routes.state().attached.contains(&gsi));
    assert_eq!(routes.state().routes[&gsi].data, 0x41);
    w16(&mut f, 0x42, 0);
    assert_eq!(
        routes.state().attached.iter().collect::<Vec<_>>(),
        vec![&10],
        "only INTx again"
    );
}

#[test]
fn intx_is_live_until_the_guest_enables_msi_and_comes_back_after() {
    let dev = FakeDevice::edu_like();
    let routes = FakeRoutes::default();
    let mut f = function(&dev, &routes);
    assert_eq!(f.read_config(0x3c / 4) & 0xffff, 0x010a, "pin A, line 10");
    assert_eq!(
        routes.state().resampled,
        vec![10],
        "level-triggered with a resample fd"
    );
    assert!(routes.state().attached.contains(&10));
    w32(&mut f, 0x44, 0xfee0_0000);
    w16(&mut f, 0x42, PCI_MSI_FLAGS_ENABLE);
    {
        let log = &dev.state().log;
        let off = log.iter().position(|l| l == "disable INTx");
        let msi = log.iter().position(|l| l == "enable MSI 1");
        assert!(
            off.is_some() && off < msi,
            "VFIO wants INTx off before MSI: {log:?}"
        );
    }
    assert!(!routes.state().attached.contains(&10));
    w16(&mut f, 0x42, 0);
    assert_eq!(
        routes.state().resampled,
        vec![10, 10],
        "INTx back after MSI"
    );
    assert!(routes.state().attached.contains(&10));
    drop(f);
    assert_eq!(
        dev.state()
            .log
            .iter()
            .filter(|l| *l == "disable INTx")
            .count(),
        2
    );
}

#[test]
fn a_device_without_an_interrupt_pin_gets_no_intx() {
    let dev = FakeDevice::edu_like();
    dev.put32(0x3c, 0);
    let routes = FakeRoutes::default();
    let f = function(&dev, &routes);
    assert_eq!(f.read_config(0x3c / 4) & 0xffff, 0);
    assert!(routes.state().resampled.is_empty());
    let only = FakeDevice::intx_only();
    let routes = FakeRoutes::default();
    let _f = function(&only, &routes);
    assert_eq!(routes.state().resampled, vec![10], "INTx-only device");
}

#[test]
fn drop_releases_every_vector() {
    let dev = FakeDevice::nvme_like();
    let routes = FakeRoutes::default();
    let mut f = function(&dev, &routes);
    w16(&mut f, 0x42, PCI_MSIX_FLAGS_ENABLE);
    program_msix(&mut f, 0, 0xfee0_0000, 0x30, false);
    drop(f);
    assert!(routes.state().attached.is_empty());
    assert!(routes.state().routes.is_empty());
    assert_eq!(routes.state().freed.len(), 4);
}

#[test]
fn arbitrary_guest_traffic_never_panics() {
    for dev in [
        FakeDevice::nvme_like(),
        FakeDevice::edu_like(),
        FakeDevice::intx_only(),
    ] {
        let mut f = function(&dev, &FakeRoutes::default());
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = [1usize, 2, 4, 8, 3, 0][(x % 6) as usize];
            let bytes = x.to_le_bytes();
            let data = &bytes[..len];
            match (x >> 8) % 5 {
                0 => {
                    let _ = f.read_config((x >> 16) as usize % 1100);
                }
                1 => {
                    f.write_config((x >> 16) as usize % 1100, (x >> 32) as usize % 5, data);
                }
                2 => {
                    // Mostly the interesting registers: command, BARs, capabilities.
                    let reg =
                        [1usize, 4, 5, 6, 0x10, 0x11, 0x12, 0x13, 0x14][(x >> 20) as usize % 9];
                    f.write_config(reg, (x >> 40) as usize % 4, &bytes[..len.min(4)]);
                }
                3 => f.write_bar((x >> 16) as usize % 7, (x >> 24) % 0x5000, data),
                _ => {
                    let mut buf = vec![0u8; len];
                    f.read_bar((x >> 16) as usize % 7, x >> 24, &mut buf);
                }
            }
        }
    }
}

#[test]
fn a_guest_repeating_bad_accesses_cannot_flood_the_log() {
    let dev = FakeDevice::nvme_like();
    let mut f = function(&dev, &FakeRoutes::default());
    w16(&mut f, 0x04, PCI_COMMAND_MEMORY);
    let lines = lines_logged_by(|| {
        for _ in 0..10_000 {
            f.write_bar(0, 0x2001, &[1]); // a byte write into the MSI-X table
            f.write_bar(0, 0x4000, &[1]); // past the BAR
            f.write_config(3, 3, &[1, 2]); // past the dword
            w32(&mut f, 0x10, 0x1000_0000); // BAR0 over guest RAM
        }
    });
    assert!(
        lines.len() <= 4 * BURST as usize,
        "{} lines for 40000 bad accesses: {:?}",
        lines.len(),
        &lines[..lines.len().min(8)]
    );
}
