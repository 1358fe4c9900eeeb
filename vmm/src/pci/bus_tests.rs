//! Tests of config routing, ECAM/CF8 decoding and BAR registration.

use vm_device::pci::bar::{Bar, BarAllocator};
use vm_device::pci::configuration::{PciConfiguration, PciIds};
use vm_device::pci::spec::{PCI_BASE_ADDRESS_0, PCI_HEADER_TYPE, PCI_HEADER_TYPE_MULTI_FUNCTION};

use super::*;
use crate::pci::root::PciHostBridge;

const REG_BAR0: usize = PCI_BASE_ADDRESS_0 / 4;

type WriteLog = Arc<Mutex<Vec<(u64, u64, Vec<u8>)>>>;

/// A function with one 4 KiB MMIO BAR that echoes the offset on reads and logs writes with the
/// address the BAR decodes at.
struct Fake {
    config: PciConfiguration,
    writes: WriteLog,
}

impl PciDevice for Fake {
    fn read_config_register(&mut self, reg: usize) -> u32 {
        self.config.read_reg(reg)
    }
    fn write_config_register(&mut self, reg: usize, offset: usize, data: &[u8]) -> Vec<BarMove> {
        self.config.write_reg(reg, offset, data)
    }
    fn place_bars(&mut self, alloc: &mut dyn BarAllocator) -> Result<Vec<Bar>, PciDeviceError> {
        self.config
            .add_bar(0, BarKind::Mmio32, 0x1000, false)
            .expect("BAR0 is free");
        Ok(self.config.place_bars(alloc)?)
    }
    fn read_bar(&mut self, _index: usize, offset: u64, data: &mut [u8]) {
        data.fill(offset as u8);
    }
    fn write_bar(&mut self, index: usize, offset: u64, data: &[u8]) {
        let base = self.config.bar(index).map_or(u64::MAX, |b| b.addr);
        self.writes
            .lock()
            .unwrap()
            .push((base, offset, data.to_vec()));
    }
    fn revert_bar(&mut self, index: usize, addr: u64) {
        self.config.revert_bar(index, addr);
    }
}

fn setup() -> (Arc<Mutex<PciBus>>, Arc<Bus>, WriteLog) {
    let mmio = Arc::new(Bus::new());
    let pio = Arc::new(Bus::new());
    let mut bus = PciBus::new(PciAllocator::new(256 << 20), mmio.clone(), pio);
    assert_eq!(
        bus.add_device(Arc::new(Mutex::new(PciHostBridge::new())))
            .unwrap(),
        0
    );
    let writes = Arc::new(Mutex::new(Vec::new()));
    let fake = Fake {
        config: PciConfiguration::new(PciIds {
            vendor: 0x1234,
            device: 0x5678,
            class: 0xff,
            subclass: 0,
            prog_if: 0,
            revision: 0,
        }),
        writes: writes.clone(),
    };
    assert_eq!(bus.add_device(Arc::new(Mutex::new(fake))).unwrap(), 1);
    (Arc::new(Mutex::new(bus)), mmio, writes)
}

#[test]
fn ecam_decoding() {
    let a = decode_ecam((1 << 20) | (3 << 15) | (2 << 12) | 0x10a);
    assert_eq!(
        a,
        ConfigAddress {
            bus: 1,
            device: 3,
            function: 2,
            reg: 0x42,
            offset: 2
        }
    );
    assert_eq!(decode_ecam(0xffc).reg, 1023);
}

#[test]
fn cf8_decoding() {
    assert_eq!(
        decode_config_address(0x0000_0800, 0),
        None,
        "enable bit clear"
    );
    let a = decode_config_address(0x8001_0a14, 3).unwrap();
    assert_eq!(
        (a.bus, a.device, a.function, a.reg, a.offset),
        (1, 1, 2, 5, 3)
    );
    // CONFIG_ADDRESS's low bits select the byte as on QEMU's hosts.
    let a = decode_config_address(0x8000_0802, 0).unwrap();
    assert_eq!((a.device, a.reg, a.offset), (1, 0, 2));
}

#[test]
fn cf8_low_address_bits_pick_the_word_kvm_unit_tests_reads() {
    let (bus, _, _) = setup();
    let mut io = PciConfigIo::new(Arc::downgrade(&bus));
    let mut id = [0u8; 4];
    io.write(0xcf8, 0, &0x8000_0000u32.to_le_bytes());
    io.read(0xcf8, 4, &mut id);
    // PCI_DEVICE_ID (offset 2) with the offset in CONFIG_ADDRESS, read as a word at 0xCFC.
    io.write(0xcf8, 0, &0x8000_0002u32.to_le_bytes());
    let mut w = [0u8; 2];
    io.read(0xcf8, 4, &mut w);
    assert_eq!(w, [id[2], id[3]]);
}

#[test]
fn cf8_reads_ids_and_absent_slots() {
    let (bus, _, _) = setup();
    let mut io = PciConfigIo::new(Arc::downgrade(&bus));
    io.write(0xcf8, 0, &0x8000_0000u32.to_le_bytes());
    let mut d = [0u8; 4];
    io.read(0xcf8, 4, &mut d);
    assert_eq!(u32::from_le_bytes(d), 0x0d57_8086);
    let mut w = [0u8; 2];
    io.read(0xcf8, 6, &mut w);
    assert_eq!(u16::from_le_bytes(w), 0x0d57, "word read at 0xCFE");
    io.write(0xcf8, 0, &0x8000_0800u32.to_le_bytes());
    io.read(0xcf8, 4, &mut d);
    assert_eq!(u32::from_le_bytes(d), 0x5678_1234);
    io.write(0xcf8, 0, &0x8000_1000u32.to_le_bytes());
    io.read(0xcf8, 4, &mut d);
    assert_eq!(d, [0xff; 4], "slot 2 is empty");
    io.write(0xcf8, 0, &0x0000_0800u32.to_le_bytes());
    io.read(0xcf8, 4, &mut d);
    assert_eq!(d, [0xff; 4], "enable bit clear");
    let mut addr = [0u8; 4];
    io.read(0xcf8, 0, &mut addr);
    assert_eq!(u32::from_le_bytes(addr), 0x800);
}

#[test]
fn ecam_bar_programming_moves_mmio_mapping() {
    let (bus, mmio, writes) = setup();
    let mut ecam = PciConfigMmio::new(Arc::downgrade(&bus));
    let bar0 = (1 << 15) | (REG_BAR0 as u64 * 4);
    let mut d = [0u8; 4];
    ecam.read(0, bar0, &mut d);
    let orig = u32::from_le_bytes(d);
    assert_eq!(orig, 0xc000_0000, "first BAR in the 32-bit window");
    let mut b = [0u8; 1];
    assert!(mmio.read(0xc000_0010, &mut b));
    assert_eq!(b[0], 0x10);
    // Memory decoding on, then size probe, restore, move.
    ecam.write(0, (1 << 15) | 4, &[2, 0]);
    ecam.write(0, bar0, &[0xff; 4]);
    ecam.read(0, bar0, &mut d);
    assert_eq!(u32::from_le_bytes(d), 0xffff_f000);
    ecam.write(0, bar0, &orig.to_le_bytes());
    ecam.write(0, bar0, &0xc100_0000u32.to_le_bytes());
    assert!(!mmio.read(0xc000_0010, &mut b));
    assert!(mmio.write(0xc100_0020, &[9, 9]));
    assert_eq!(writes.lock().unwrap()[0], (0xc100_0000, 0x20, vec![9, 9]));
}

/// A device on the MMIO bus at 0xd000_0000, in the way of BAR moves there.
struct Blocker;

impl BusDevice for Blocker {
    fn read(&mut self, _: u64, _: u64, _: &mut [u8]) {}
    fn write(&mut self, _: u64, _: u64, _: &[u8]) {}
}

/// [`setup`] with a [`Blocker`] at 0xd000_0000 and memory decoding on for 00:01.0; returns its
/// ECAM window, the ECAM offset of its BAR0 and the MMIO bus.
fn setup_with_blocker() -> (Arc<Mutex<PciBus>>, PciConfigMmio, u64, Arc<Bus>) {
    let (bus, mmio, _) = setup();
    mmio.insert(Arc::new(Mutex::new(Blocker)), 0xd000_0000, 0x1000)
        .unwrap();
    let mut ecam = PciConfigMmio::new(Arc::downgrade(&bus));
    ecam.write(0, (1 << 15) | 4, &[2, 0]);
    (bus, ecam, (1 << 15) | (REG_BAR0 as u64 * 4), mmio)
}

#[test]
fn refused_move_keeps_old_place() {
    let (_bus, mut ecam, bar0, mmio) = setup_with_blocker();
    ecam.write(0, bar0, &0xd000_0000u32.to_le_bytes());
    let mut d = [0u8; 4];
    ecam.read(0, bar0, &mut d);
    assert_eq!(u32::from_le_bytes(d), 0xc000_0000);
    assert!(mmio.read(0xc000_0000, &mut [0u8; 4]));
}

/// A function that cannot follow BAR moves (like a VFIO BAR whose memory slot KVM refuses).
struct Stuck(Fake);

impl PciDevice for Stuck {
    fn read_config_register(&mut self, reg: usize) -> u32 {
        self.0.read_config_register(reg)
    }
    fn write_config_register(&mut self, reg: usize, offset: usize, data: &[u8]) -> Vec<BarMove> {
        self.0.write_config_register(reg, offset, data)
    }
    fn place_bars(&mut self, alloc: &mut dyn BarAllocator) -> Result<Vec<Bar>, PciDeviceError> {
        self.0.place_bars(alloc)
    }
    fn read_bar(&mut self, index: usize, offset: u64, data: &mut [u8]) {
        self.0.read_bar(index, offset, data)
    }
    fn move_bar(&mut self, mv: &BarMove) -> Result<(), PciDeviceError> {
        Err(PciDeviceError::MoveBar {
            index: mv.index,
            old: mv.old,
            new: mv.new,
            source: Box::new(std::io::Error::from_raw_os_error(libc::EEXIST)),
        })
    }
    fn revert_bar(&mut self, index: usize, addr: u64) {
        self.0.revert_bar(index, addr)
    }
}

#[test]
fn a_move_the_device_cannot_follow_puts_the_bus_back() {
    let (bus, mmio, writes) = setup();
    let stuck = Stuck(Fake {
        config: PciConfiguration::new(PciIds {
            vendor: 0x1234,
            device: 0x0bad,
            class: 0xff,
            subclass: 0,
            prog_if: 0,
            revision: 0,
        }),
        writes,
    });
    let slot = bus
        .lock()
        .unwrap()
        .add_device(Arc::new(Mutex::new(stuck)))
        .unwrap() as u64;
    let mut ecam = PciConfigMmio::new(Arc::downgrade(&bus));
    let bar0 = (slot << 15) | (REG_BAR0 as u64 * 4);
    let mut d = [0u8; 4];
    ecam.read(0, bar0, &mut d);
    let old = u64::from(u32::from_le_bytes(d));
    ecam.write(0, (slot << 15) | 4, &[2, 0]);
    ecam.write(0, bar0, &0xd000_0000u32.to_le_bytes());
    ecam.read(0, bar0, &mut d);
    assert_eq!(u64::from(u32::from_le_bytes(d)), old, "register reverted");
    assert!(
        mmio.read(old, &mut [0u8; 4]),
        "still decoding at the old place"
    );
    assert!(
        !mmio.read(0xd000_0000, &mut [0u8; 4]),
        "nothing left at the new place"
    );
}

#[test]
fn a_guest_repeating_a_refused_bar_move_cannot_flood_the_log() {
    use vm_device::ratelimit::{capture::lines_logged_by, BURST};
    let (_bus, mut ecam, bar0, _mmio) = setup_with_blocker();
    let lines = lines_logged_by(|| {
        for _ in 0..10_000 {
            ecam.write(0, bar0, &0xd000_0000u32.to_le_bytes());
        }
    });
    assert!(
        lines.len() <= 2 * BURST as usize,
        "{} lines for 10000 refused moves",
        lines.len()
    );
}

#[test]
fn the_bus_and_its_functions_go_away_with_the_vm_though_its_config_mechanisms_sit_on_its_buses() {
    struct Tracked(Arc<std::sync::atomic::AtomicBool>);
    impl PciDevice for Tracked {
        fn read_config_register(&mut self, _: usize) -> u32 {
            0
        }
        fn write_config_register(&mut self, _: usize, _: usize, _: &[u8]) -> Vec<BarMove> {
            Vec::new()
        }
    }
    impl Drop for Tracked {
        fn drop(&mut self) {
            self.0.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }
    let dropped = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (mmio, pio) = (Arc::new(Bus::new()), Arc::new(Bus::new()));
    let mut pci = PciBus::new(PciAllocator::new(256 << 20), mmio.clone(), pio.clone());
    pci.add_device(Arc::new(Mutex::new(Tracked(dropped.clone()))))
        .unwrap();
    let pci = Arc::new(Mutex::new(pci));
    let io = PciConfigIo::new(Arc::downgrade(&pci));
    pio.insert(Arc::new(Mutex::new(io)), CONFIG_ADDRESS_PORT, CONFIG_IO_LEN)
        .unwrap();
    let ecam = PciConfigMmio::new(Arc::downgrade(&pci));
    mmio.insert(Arc::new(Mutex::new(ecam)), 0xe000_0000, 0x1000_0000)
        .unwrap();
    let mut d = [0u8; 4];
    assert!(mmio.read(0xe000_0000, &mut d));
    drop((pci, mmio));
    assert!(dropped.load(std::sync::atomic::Ordering::SeqCst));
    pio.write(CONFIG_ADDRESS_PORT, &0x8000_0000u32.to_le_bytes());
    assert!(pio.read(CONFIG_ADDRESS_PORT + 4, &mut d));
    assert_eq!(d, [0xff; 4], "a bus that is gone reads as absent");
}

#[test]
fn intx_swizzle_covers_pins_16_to_23() {
    assert_eq!(intx_gsi(0, 0), 16);
    assert_eq!(intx_gsi(1, 0), 17);
    assert_eq!(intx_gsi(1, 3), 20);
    assert_eq!(intx_gsi(7, 1), 16);
    assert!((0..32).all(|s| (0..4).all(|p| (16..24).contains(&intx_gsi(s, p)))));
}

/// A [`Fake`] with device ID `device` whose own header type says multi-function when
/// `multi_function` (as a host device's may).
fn fake(device: u16, multi_function: bool) -> SharedPciDevice {
    let mut config = PciConfiguration::new(PciIds {
        vendor: 0x1234,
        device,
        class: 0xff,
        subclass: 0,
        prog_if: 0,
        revision: 0,
    });
    let header = if multi_function {
        u32::from(PCI_HEADER_TYPE_MULTI_FUNCTION) << 16
    } else {
        0
    };
    config.set_reg(PCI_HEADER_TYPE / 4, header, 0);
    Arc::new(Mutex::new(Fake {
        config,
        writes: Arc::new(Mutex::new(Vec::new())),
    }))
}

fn at(slot: u8, function: u8) -> PciAddress {
    PciAddress::new(slot, function).unwrap()
}

/// The config dword at `offset` of 00:`slot`.`function`, through ECAM.
fn read_dword(bus: &PciBus, slot: u8, function: u8, offset: usize) -> u32 {
    let mut d = [0u8; 4];
    let ecam = (u64::from(slot) << 15) | (u64::from(function) << 12) | offset as u64;
    bus.config_read(decode_ecam(ecam), &mut d);
    u32::from_le_bytes(d)
}

/// The header type byte of 00:`slot`.`function`.
fn header_type(bus: &PciBus, slot: u8, function: u8) -> u8 {
    let mut b = [0u8];
    let ecam = (u64::from(slot) << 15) | (u64::from(function) << 12) | PCI_HEADER_TYPE as u64;
    bus.config_read(decode_ecam(ecam), &mut b);
    b[0]
}

/// A bus with the host bridge at 00:00.0.
fn bridge_only() -> PciBus {
    let mut bus = PciBus::new(
        PciAllocator::new(256 << 20),
        Arc::new(Bus::new()),
        Arc::new(Bus::new()),
    );
    bus.add_device(Arc::new(Mutex::new(PciHostBridge::new())))
        .unwrap();
    bus
}

#[test]
fn devices_placed_at_an_address_take_it_and_automatic_ones_pass_reserved_slots_over() {
    let mut bus = bridge_only();
    bus.reserve(at(1, 0)).unwrap();
    bus.reserve(at(1, 1)).unwrap();
    bus.reserve(at(3, 0)).unwrap();
    assert_eq!(bus.free_address(), Some(at(2, 0)));
    assert_eq!(bus.add_device(fake(0xa, false)).unwrap(), 2, "1 is held");
    bus.add_device_at(at(1, 0), fake(0x10, false)).unwrap();
    bus.add_device_at(at(1, 1), fake(0x11, false)).unwrap();
    bus.add_device_at(at(3, 0), fake(0x30, false)).unwrap();
    assert_eq!(bus.add_device(fake(0xb, false)).unwrap(), 4, "3 is held");
    for (slot, function, device) in [(1, 0, 0x10u16), (1, 1, 0x11), (2, 0, 0xa), (3, 0, 0x30)] {
        assert_eq!(
            read_dword(&bus, slot, function, 0),
            u32::from(device) << 16 | 0x1234,
            "00:{slot:02x}.{function}"
        );
    }
}

#[test]
fn an_address_taken_a_slot_in_use_or_a_function_without_function_0_is_refused() {
    let mut bus = bridge_only();
    assert!(matches!(
        bus.reserve(at(0, 1)),
        Err(PciBusError::SlotTaken { slot: 0 })
    ));
    assert_eq!(bus.add_device(fake(1, false)).unwrap(), 1);
    assert!(matches!(
        bus.reserve(at(1, 0)),
        Err(PciBusError::SlotTaken { slot: 1 })
    ));
    let err = bus.add_device_at(at(5, 1), fake(0x51, false)).unwrap_err();
    assert!(matches!(err, PciBusError::NoFunctionZero(a) if a == at(5, 1)));
    assert_eq!(err.to_string(), "PCI 00:05.1: slot 05 has no function 0");
    bus.add_device_at(at(5, 0), fake(0x50, false)).unwrap();
    let err = bus.add_device_at(at(5, 0), fake(0x52, false)).unwrap_err();
    assert!(matches!(err, PciBusError::FunctionTaken(a) if a == at(5, 0)));
    assert_eq!(err.to_string(), "PCI 00:05.0 is taken");
    assert_eq!(read_dword(&bus, 5, 0, 0), 0x0050_1234, "the first stays");
}

#[test]
fn every_function_of_a_two_function_slot_says_multi_function_whatever_its_own_header_says() {
    let mut bus = bridge_only();
    bus.add_device_at(at(5, 0), fake(0x50, false)).unwrap();
    bus.add_device_at(at(5, 1), fake(0x51, false)).unwrap();
    assert_eq!(header_type(&bus, 5, 0), PCI_HEADER_TYPE_MULTI_FUNCTION);
    assert_eq!(header_type(&bus, 5, 1), PCI_HEADER_TYPE_MULTI_FUNCTION);
    // The rest of the dword (cache line size, latency timer, BIST) is the function's.
    let dword = read_dword(&bus, 5, 1, PCI_HEADER_TYPE & !3);
    assert_eq!(dword, u32::from(PCI_HEADER_TYPE_MULTI_FUNCTION) << 16);
    // Function 2 is absent: all ones, and writes there go nowhere.
    assert_eq!(read_dword(&bus, 5, 2, 0), 0xffff_ffff);
    assert_eq!(read_dword(&bus, 5, 2, PCI_HEADER_TYPE & !3), 0xffff_ffff);
    bus.config_write(decode_ecam((5 << 15) | (2 << 12) | 4), &[2, 0]);
    assert_eq!(read_dword(&bus, 5, 2, 4), 0xffff_ffff);
}

#[test]
fn a_single_function_slot_says_single_function_though_its_device_says_otherwise() {
    let mut bus = bridge_only();
    let device = fake(0x60, true);
    let own = device
        .lock()
        .unwrap()
        .read_config_register(PCI_HEADER_TYPE / 4);
    assert_ne!(own & u32::from(PCI_HEADER_TYPE_MULTI_FUNCTION) << 16, 0);
    let slot = bus.add_device(device).unwrap() as u8;
    assert_eq!(header_type(&bus, slot, 0), 0, "bit 7 cleared");
    assert_eq!(
        read_dword(&bus, slot, 1, 0),
        0xffff_ffff,
        "no phantom function"
    );
    assert_eq!(header_type(&bus, 0, 0), 0, "the host bridge is alone too");
}
