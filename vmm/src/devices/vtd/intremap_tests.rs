//! The routes behind the unit's interrupt remapping on this machine's KVM (split irqchip): what
//! KVM's table holds, how an invalidation updates it, what happens to a route that faults and
//! to its signals, and the IOAPIC's and emulated devices' requests.

use std::sync::Arc;

use passthrough::kvm::Irqchip;
use viommu::descriptor::encode;
use viommu::intremap::IRTA_EIME;
use viommu::regs::{FRCD_HI_F, FRCD_REG_BASE};
use viommu::testing::{mem, Driver, ManualClock, Mem, RecordingMsi};
use viommu::{FaultReason, SourceId, Vtd, VtdConfig};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::*;
use crate::devices::bus::BusDevice;
use crate::devices::ioapic::kvm::KvmIoapic;
use crate::devices::vtd::blocked::{BlockedSignalHandler, BlockedSignalSet};
use crate::devices::vtd::VtdUnit;
use crate::vstate::vm::Vm;

/// The interrupt remapping table: 256 entries.
const IRT: u64 = 30 << 20;
const IRTA: u64 = IRT | IRTA_EIME | 7;
const DEV: SourceId = SourceId(0x0018); // 00:03.0
/// IRTE SVT = 01b: the requester ID must match SID.
const SVT_REQUESTER_ID: u64 = 1 << 18;

struct Fixture {
    vm: Vm,
    mem: Mem,
    unit: SharedVtd,
    remapping: Arc<InterruptRemapping>,
    set: Arc<BlockedSignalSet>,
    drv: Driver,
    faults: RecordingMsi,
}

/// A split-irqchip VM on this machine's KVM with a VT-d doing interrupt remapping (x2APIC
/// mode, the guest's table at IRT); None (said loudly) without /dev/kvm, a failure under CI.
fn fixture() -> Option<Fixture> {
    if !std::path::Path::new("/dev/kvm").exists() {
        let msg = "/dev/kvm is missing: interrupt remapping route tests cannot run";
        assert_ne!(std::env::var("CI").as_deref(), Ok("true"), "{msg}");
        eprintln!("SKIPPED: {msg}");
        return None;
    }
    let mut vm = Vm::new().expect("a KVM VM");
    vm.setup_irqchip(Irqchip::Split).expect("the split irqchip");
    let mem = mem();
    let faults = RecordingMsi::default();
    let config = VtdConfig {
        interrupt_remapping: true,
        x2apic: true,
        ..VtdConfig::default()
    };
    let vtd = Vtd::new(
        config,
        mem.clone(),
        Box::new(faults.clone()),
        Box::new(ManualClock::default()),
    )
    .expect("config");
    let unit = VtdUnit::new(vtd, None, None);
    let routing = vm.routing().expect("the table").clone();
    let remapping = InterruptRemapping::new(routing.clone());
    let set = BlockedSignalSet::new().expect("epoll");
    assert!(routing.set_blocked_signals(set.clone()).is_ok());
    unit.lock().set_interrupt_routes(remapping.holder());
    let mut drv = Driver::new();
    drv.enable_qi(&mut unit.lock());
    drv.set_interrupt_remapping(&mut unit.lock(), IRTA, true);
    // The fault event goes to the recorder, unmasked.
    Driver::write32(&mut unit.lock(), viommu::regs::FEDATA_REG, 0x77);
    Driver::write32(&mut unit.lock(), viommu::regs::FEADDR_REG, 0xfee0_0000);
    Driver::write32(&mut unit.lock(), viommu::regs::FECTL_REG, 0);
    Some(Fixture {
        vm,
        mem,
        unit,
        remapping,
        set,
        drv,
        faults,
    })
}

impl Fixture {
    /// Writes IRTE `index`: present, `vector` to x2APIC `dest`, checked against `sid`.
    fn irte(&self, index: u64, vector: u8, dest: u32, sid: SourceId) {
        let lo = 1 | u64::from(vector) << 16 | u64::from(dest) << 32;
        let hi = SVT_REQUESTER_ID | u64::from(sid.0);
        self.mem
            .write_obj(lo, GuestAddress(IRT + 16 * index))
            .unwrap();
        self.mem
            .write_obj(hi, GuestAddress(IRT + 16 * index + 8))
            .unwrap();
    }

    fn clear_irte(&self, index: u64) {
        self.mem
            .write_obj([0u64; 2], GuestAddress(IRT + 16 * index))
            .unwrap();
    }

    /// Invalidates the interrupt entry cache (`index` alone, or all), waiting for it.
    fn invalidate(&mut self, index: Option<u16>) {
        let desc = encode::interrupt_entry_cache(index.map(|i| (i, 0)));
        let done = self
            .drv
            .submit_sync(&mut self.unit.lock(), &self.mem, &[desc], 1);
        assert!(done, "the wait completed");
    }

    fn routes(&self, source: SourceId) -> RemappedIrqRoutes {
        RemappedIrqRoutes::new(source, self.unit.clone(), self.remapping.clone())
    }

    fn routing(&self) -> &Arc<KvmRouting> {
        self.remapping.routing()
    }

    /// The first fault record: (source, reason, interrupt index), if one is pending.
    fn fault_record(&self) -> Option<(u16, u8, u16)> {
        let unit = self.unit.lock();
        let lo = Driver::read64(&unit, FRCD_REG_BASE);
        let hi = Driver::read64(&unit, FRCD_REG_BASE + 8);
        (hi & FRCD_HI_F != 0).then_some((hi as u16, (hi >> 32) as u8, (lo >> 48) as u16))
    }

    fn handler(&self) -> BlockedSignalHandler {
        BlockedSignalHandler {
            set: self.set.clone(),
            remapping: self.remapping.clone(),
            vtd: self.unit.clone(),
            vm: self.vm.shared_fd(),
        }
    }
}

/// The translated message of an x2APIC IRTE: fixed, edge, physical.
fn translated(vector: u8, dest: u32) -> MsiMessage {
    MsiMessage::new(
        0xfee0_0000 | u64::from(dest & 0xff) << 12 | u64::from(dest & !0xff) << 32,
        u32::from(vector),
    )
}

/// Whether KVM has `fd` assigned as an irqfd on `gsi` (assigning it again is refused).
fn assigned(vm: &Vm, fd: &EventFd, gsi: u32) -> bool {
    match vm.fd().register_irqfd(fd, gsi) {
        Err(e) => {
            assert_eq!(e.errno(), libc::EBUSY, "{e}");
            true
        }
        Ok(()) => {
            vm.fd().unregister_irqfd(fd, gsi).unwrap();
            false
        }
    }
}

#[test]
fn msi_routes_hold_the_translation_and_an_invalidation_updates_them_in_one_kvm_call() {
    let Some(mut f) = fixture() else { return };
    let mut routes = f.routes(DEV);
    let gsis: Vec<u32> = (0..3).map(|_| routes.allocate_gsi().unwrap()).collect();
    for (i, &gsi) in gsis.iter().enumerate() {
        f.irte(i as u64, 0x40 + i as u8, 0x100 + i as u32, DEV);
        routes
            .set_msi_route(gsi, MsiMessage::remappable(i as u16))
            .unwrap();
    }
    assert_eq!(
        f.routing().msi_route(gsis[2]),
        Some(translated(0x42, 0x102)),
        "KVM holds the translation, destination bits 31:8 in address bits 63:40"
    );
    let remapped = f.unit.lock().stats().interrupts_remapped;
    assert_eq!(remapped, 3, "each route set-up is a translation");
    // The guest retargets every entry, then invalidates entry 1 alone: only its route follows,
    // as a hardware interrupt-entry cache would.
    for i in 0..3u8 {
        f.irte(u64::from(i), 0x50 + i, 7, DEV);
    }
    let before = f.routing().updates();
    f.invalidate(Some(1));
    assert_eq!(f.routing().msi_route(gsis[1]), Some(translated(0x51, 7)));
    assert_eq!(
        f.routing().msi_route(gsis[0]),
        Some(translated(0x40, 0x100))
    );
    assert_eq!(f.routing().updates(), before + 1);
    // A global invalidation: the other two, in one KVM_SET_GSI_ROUTING.
    f.invalidate(None);
    assert_eq!(f.routing().msi_route(gsis[0]), Some(translated(0x50, 7)));
    assert_eq!(f.routing().msi_route(gsis[2]), Some(translated(0x52, 7)));
    assert_eq!(f.routing().updates(), before + 2);
    // Nothing changed: no KVM call at all.
    f.invalidate(None);
    assert_eq!(f.routing().updates(), before + 2);
    let stats = f.unit.lock().stats();
    assert_eq!(
        stats.iec_invalidations,
        2 + 3,
        "SIRTP, IRE, then three descriptors"
    );
    // The freed GSI's route goes, and no invalidation brings it back.
    routes.free_gsi(gsis[0]);
    assert_eq!(f.routing().msi_route(gsis[0]), None);
    f.invalidate(None);
    assert_eq!(f.routing().msi_route(gsis[0]), None);
}

#[test]
fn a_route_that_faults_is_not_delivered_its_signals_record_the_fault_and_it_comes_back() {
    let Some(mut f) = fixture() else { return };
    let mut routes = f.routes(DEV);
    let gsi = routes.allocate_gsi().unwrap();
    f.irte(5, 0x45, 0, DEV);
    routes
        .set_msi_route(gsi, MsiMessage::remappable(5))
        .unwrap();
    let fd = EventFd::new(EFD_NONBLOCK).unwrap();
    routes.attach_irqfd(&fd, gsi, None).unwrap();
    assert!(assigned(&f.vm, &fd, gsi));
    // The guest takes the entry away: KVM must not deliver it any more.
    f.clear_irte(5);
    f.invalidate(Some(5));
    assert_eq!(f.routing().msi_route(gsi), None);
    assert!(!assigned(&f.vm, &fd, gsi), "KVM let go of the vector");
    assert_eq!(f.set.watched(), [gsi]);
    assert_eq!(f.fault_record(), None, "no request yet, no fault");
    // The device raises it: the signal is a request the unit blocks and records.
    fd.write(1).unwrap();
    assert_eq!(f.handler().handle_pending(), 1);
    assert_eq!(
        f.fault_record(),
        Some((DEV.0, FaultReason::IrEntryNotPresent as u8, 5))
    );
    assert_eq!(f.faults.take(), [(0xfee0_0000, 0x77)], "the fault event");
    assert_eq!(f.unit.lock().stats().interrupt_faults, 1);
    assert_eq!(f.handler().handle_pending(), 0, "one signal, one request");
    // The guest puts an entry back: KVM delivers the vector again.
    f.irte(5, 0x46, 0, DEV);
    f.invalidate(None);
    assert_eq!(f.routing().msi_route(gsi), Some(translated(0x46, 0)));
    assert!(f.set.watched().is_empty());
    assert!(assigned(&f.vm, &fd, gsi));
    // A route whose entry names another requester is blocked too (source-ID mismatch).
    f.irte(5, 0x46, 0, SourceId::new(0, 4, 0));
    f.invalidate(Some(5));
    assert_eq!(f.routing().msi_route(gsi), None);
    routes.detach_irqfd(&fd, gsi).unwrap();
    assert!(f.set.watched().is_empty(), "detached: not watched either");
    routes.free_gsi(gsi);
}

#[test]
fn the_ioapic_pins_are_remapped_as_requests_of_its_own_requester_id() {
    let Some(mut f) = fixture() else { return };
    let routing = f.routing().clone();
    let ioapic = KvmIoapic::new(f.vm.shared_fd(), routing.clone()).unwrap();
    let remap = IoapicRemapping {
        vtd: f.unit.clone(),
        remapping: f.remapping.clone(),
    };
    assert!(ioapic.set_remapping(remap.clone()).is_ok());
    assert!(ioapic.set_remapping(remap).is_err(), "once");
    // Pin 4 in remappable format, index 9 (bits 63:49), format bit 48, unmasked, edge; the
    // vector field holds the pin, as Linux programs it.
    let rte: u64 = 9 << 49 | 1 << 48 | 4;
    let mut dev = crate::devices::ioapic::lock(ioapic.shared());
    let mut write = |reg: u32, value: u32| {
        dev.write(0, 0x00, &reg.to_le_bytes());
        dev.write(0, 0x10, &value.to_le_bytes());
    };
    f.irte(9, 0x61, 0x203, IOAPIC_SOURCE_ID);
    write(0x11 + 8, (rte >> 32) as u32);
    write(0x10 + 8, rte as u32);
    drop(dev);
    assert_eq!(routing.pin_route(4), Some(translated(0x61, 0x203)));
    // An entry that only another requester may use blocks the pin.
    f.irte(9, 0x61, 0x203, DEV);
    f.invalidate(Some(9));
    assert_eq!(routing.pin_route(4), None);
    // A delivery of the IOAPIC's own is a request: blocked, recorded with the IOAPIC's ID.
    crate::devices::ioapic::lock(ioapic.shared())
        .pulse(4)
        .unwrap();
    assert_eq!(
        f.fault_record(),
        Some((IOAPIC_SOURCE_ID.0, FaultReason::IrSourceIdMismatch as u8, 9))
    );
    f.irte(9, 0x62, 0x203, IOAPIC_SOURCE_ID);
    f.invalidate(None);
    assert_eq!(routing.pin_route(4), Some(translated(0x62, 0x203)));
}

#[test]
fn emulated_devices_msis_are_requests_of_their_requester_id() {
    let Some(f) = fixture() else { return };
    let msi = DeviceMsi::new(DEV, Some(f.unit.clone()), f.vm.shared_fd());
    f.irte(3, 0x33, 0, DEV);
    msi.send(MsiMessage::remappable(3));
    assert_eq!(f.unit.lock().stats().interrupts_remapped, 1);
    assert_eq!(f.fault_record(), None);
    // A handle past the table's 256 entries.
    msi.send(MsiMessage::remappable(300));
    assert_eq!(
        f.fault_record(),
        Some((DEV.0, FaultReason::IrIndexBeyondTable as u8, 300))
    );
    // Without a VT-d the message goes to KVM as it is (nothing to observe but no fault).
    DeviceMsi::new(DEV, None, f.vm.shared_fd()).send(MsiMessage::new(0xfee0_0000, 0x30));
    assert_eq!(f.unit.lock().stats().interrupt_faults, 1);
}
