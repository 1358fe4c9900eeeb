use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use kvm_bindings::{kvm_irq_routing_entry, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_MSI};
use vmm_sys_util::eventfd::EFD_NONBLOCK;

use super::table::{default_routes, Pin};
use super::*;
use crate::irq::IrqRoutes;

/// A VM with `irqchip` on this machine's KVM; None (said loudly) without /dev/kvm, and a
/// failure under CI=true.
fn kvm_vm(irqchip: Irqchip) -> Option<VmFd> {
    if !std::path::Path::new("/dev/kvm").exists() {
        let msg = "/dev/kvm is missing: KVM routing tests cannot run";
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{msg} (CI=true: failing instead of skipping)");
        }
        eprintln!("SKIPPED: {msg}");
        return None;
    }
    let kvm = kvm_ioctls::Kvm::new().expect("open /dev/kvm");
    let vm = kvm.create_vm().expect("KVM_CREATE_VM");
    match irqchip {
        Irqchip::Kernel => vm.create_irq_chip().expect("KVM_CREATE_IRQCHIP"),
        Irqchip::Split => {
            let mut cap = kvm_bindings::kvm_enable_cap {
                cap: kvm_bindings::KVM_CAP_SPLIT_IRQCHIP,
                ..Default::default()
            };
            cap.args[0] = u64::from(IOAPIC_PINS);
            vm.enable_cap(&cap).expect("KVM_CAP_SPLIT_IRQCHIP");
        }
    }
    Some(vm)
}

const MSG: MsiMessage = MsiMessage {
    address: 0xfee0_0000,
    data: 0x31,
};
const LEVEL_MSG: MsiMessage = MsiMessage {
    address: 0xfee0_0000,
    data: 0xc041,
};

/// The (gsi, message) pairs of MSI entries, or None for an irqchip entry.
fn summary(entries: &[kvm_irq_routing_entry]) -> Vec<Option<(u32, MsiMessage)>> {
    entries
        .iter()
        .map(|e| {
            (e.type_ == KVM_IRQ_ROUTING_MSI).then(|| {
                // SAFETY: an MSI entry's union holds the msi member.
                let m = unsafe { e.u.msi };
                let address = u64::from(m.address_lo) | (u64::from(m.address_hi) << 32);
                (
                    e.gsi,
                    MsiMessage {
                        address,
                        data: m.data,
                    },
                )
            })
        })
        .collect()
}

#[test]
fn msi_routes_and_irqfds_on_real_kvm_share_one_table() {
    let Some(vm) = kvm_vm(Irqchip::Kernel) else {
        return;
    };
    let routing = KvmRouting::new(Arc::new(vm), Irqchip::Kernel);
    let (mut a, mut b) = (routing.routes(), routing.routes());
    let ga = a.allocate_gsi().unwrap();
    let gb = b.allocate_gsi().unwrap();
    assert_eq!((ga, gb), (24, 25), "GSIs above the IOAPIC pins, shared");
    a.set_msi_route(ga, MSG).unwrap();
    b.set_msi_route(gb, MSG).unwrap();
    let fd = EventFd::new(0).unwrap();
    a.attach_irqfd(&fd, ga, None).unwrap();
    fd.write(1).unwrap();
    a.detach_irqfd(&fd, ga).unwrap();
    a.free_gsi(ga);
    assert_eq!(a.allocate_gsi().unwrap(), 24, "freed GSIs are reused");
    assert!(
        routing
            .set_ioapic_pin(
                4,
                PinRoute {
                    message: Some(MSG),
                    masked: false,
                    level: false
                }
            )
            .is_err(),
        "no user-space IOAPIC with the in-kernel irqchip"
    );
}

#[test]
fn default_routes_match_kvm_create_irqchip() {
    let r = default_routes();
    assert_eq!(r.len(), 24 + 16);
    assert!(r.iter().all(|e| e.gsi < IOAPIC_PINS));
    // SAFETY: every entry is an irqchip entry.
    let pic_slave: Vec<u32> = r
        .iter()
        .filter(|e| unsafe { e.u.irqchip.irqchip } == KVM_IRQCHIP_PIC_SLAVE)
        .map(|e| unsafe { e.u.irqchip.pin })
        .collect();
    assert_eq!(pic_slave, (0..8).collect::<Vec<_>>());
}

#[test]
fn split_table_routes_pins_masked_or_not_and_their_lines_only_unmasked() {
    let line = |gsi| PinLine {
        irqfd: Irqfd {
            trigger: -1,
            fd: EventFd::new(0).unwrap(),
        },
        gsi,
        resample: None,
    };
    let mut pins: Vec<Pin> = (0..IOAPIC_PINS).map(|_| Pin::reset()).collect();
    pins[4].message = Some(MSG);
    pins[4].lines.push(line(30));
    pins[16] = Pin {
        message: Some(LEVEL_MSG),
        masked: false,
        lines: vec![line(31)],
    };
    // Pin 5 is unmasked but blocked by interrupt remapping, as is MSI route 41.
    pins[5] = Pin {
        message: None,
        masked: false,
        lines: vec![line(32)],
    };
    let mut t = Table {
        msi: BTreeMap::from([(40, Some(MSG)), (41, None)]),
        irqfds: BTreeMap::new(),
        used: BTreeSet::new(),
        pins,
    };
    assert_eq!(
        summary(&t.entries(Irqchip::Split)),
        [
            Some((4, MSG)),
            Some((16, LEVEL_MSG)),
            Some((31, LEVEL_MSG)),
            Some((40, MSG))
        ],
        "masked pin 4: its own GSI only; unmasked pin 16: its line too; blocked pin 5 and \
         route 41: nothing; no irqchip entry"
    );
    t.pins[4].masked = false;
    assert!(summary(&t.entries(Irqchip::Split)).contains(&Some((30, MSG))));
    let mut kernel = Table::new(Irqchip::Kernel);
    kernel.msi.insert(40, Some(MSG));
    let s = summary(&kernel.entries(Irqchip::Kernel));
    assert_eq!(s.len(), 24 + 16 + 1);
    assert_eq!(s.last(), Some(&Some((40, MSG))));
    assert!(
        s[..40].iter().all(Option::is_none),
        "KVM's irqchip entries first"
    );
}

/// A level-triggered pin's route to `message`, `masked` or not.
fn pin(message: MsiMessage, masked: bool) -> PinRoute {
    PinRoute {
        message: Some(message),
        masked,
        level: true,
    }
}

fn drained(fd: &EventFd) -> bool {
    fd.read().is_ok()
}

#[test]
fn split_irqchip_lines_resample_at_eoi_and_unmask_on_real_kvm() {
    let Some(vm) = kvm_vm(Irqchip::Split) else {
        return;
    };
    let routing = KvmRouting::new(Arc::new(vm), Irqchip::Split);
    let mut routes = routing.routes();
    let trigger = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
    let resample = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
    // An INTx on pin 16: a line of the pin, with the resample fd kept in user space.
    routes
        .attach_irqfd(&trigger, 16, Some(&resample))
        .expect("KVM refuses resample irqfds with the split irqchip; ours are lines");
    routing.set_ioapic_pin(16, pin(LEVEL_MSG, true)).unwrap();
    assert!(!drained(&resample));
    routing.set_ioapic_pin(16, pin(LEVEL_MSG, false)).unwrap();
    assert!(drained(&resample), "unmasking a level pin resamples");
    let line_gsi = routing.lock().pins[16].lines[0].gsi;
    assert_eq!(
        routing
            .vm
            .register_irqfd(&trigger, line_gsi)
            .map_err(|e| e.errno()),
        Err(libc::EBUSY),
        "the line's irqfd is assigned after the unmask, which deassigned it to flush it"
    );
    routing.set_ioapic_pin(16, pin(LEVEL_MSG, false)).unwrap();
    assert!(!drained(&resample), "only the unmask does");
    routing.ioapic_eoi(16);
    assert!(drained(&resample), "the pin's EOI resamples");
    routing.ioapic_eoi(17);
    assert!(!drained(&resample), "another pin's EOI does not");
    {
        let t = routing.lock();
        assert_eq!(t.pins[16].lines.len(), 1);
        let gsi = t.pins[16].lines[0].gsi;
        assert!(gsi >= IOAPIC_PINS, "the line's own GSI, {gsi}");
        assert!(summary(&t.entries(Irqchip::Split)).contains(&Some((gsi, LEVEL_MSG))));
    }
    trigger.write(1).unwrap();
    routes.detach_irqfd(&trigger, 16).unwrap();
    assert!(routing.lock().pins[16].lines.is_empty());
    assert!(
        routes.detach_irqfd(&trigger, 16).is_err(),
        "already detached"
    );
    // A resample fd on a GSI that is no pin has no EOI to come from.
    let gsi = routes.allocate_gsi().unwrap();
    assert!(routes.attach_irqfd(&trigger, gsi, Some(&resample)).is_err());
    routes.attach_irqfd(&trigger, gsi, None).unwrap();
    assert!(routing.attach_ioapic_line(24, &trigger, None).is_err());
}

/// What a watcher of blocked signals was told, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Watched {
    Watch(u32, SignalSource),
    Unwatch(u32),
}

#[derive(Default)]
struct FakeWatcher(Mutex<Vec<Watched>>);

impl FakeWatcher {
    fn take(&self) -> Vec<Watched> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

impl BlockedSignals for FakeWatcher {
    fn watch(&self, gsi: u32, source: SignalSource, fd: &EventFd) {
        assert!(fd.as_raw_fd() >= 0);
        self.0.lock().unwrap().push(Watched::Watch(gsi, source));
    }

    fn unwatch(&self, gsi: u32) {
        self.0.lock().unwrap().push(Watched::Unwatch(gsi));
    }
}

/// Whether KVM has `fd` assigned as an irqfd on `gsi`: assigning it again is refused with
/// EBUSY; when it was not, the probe's assignment is undone.
fn assigned(routing: &KvmRouting, fd: &EventFd, gsi: u32) -> bool {
    match routing.vm.register_irqfd(fd, gsi) {
        Err(e) => {
            assert_eq!(e.errno(), libc::EBUSY, "{e}");
            true
        }
        Ok(()) => {
            routing.vm.unregister_irqfd(fd, gsi).unwrap();
            false
        }
    }
}

#[test]
fn a_batch_of_route_changes_is_one_kvm_set_gsi_routing_on_real_kvm() {
    let Some(vm) = kvm_vm(Irqchip::Split) else {
        return;
    };
    let routing = KvmRouting::new(Arc::new(vm), Irqchip::Split);
    let mut routes = routing.routes();
    let gsis: Vec<u32> = (0..3).map(|_| routes.allocate_gsi().unwrap()).collect();
    let before = routing.updates();
    let mut batch = RouteBatch::default();
    for (i, &gsi) in gsis.iter().enumerate() {
        batch.msi(gsi, Some(MsiMessage::new(0xfee0_0000, 0x40 + i as u32)));
    }
    batch.pin(3, pin(LEVEL_MSG, false)).pin(4, pin(MSG, true));
    // Named again: the last change counts.
    batch.msi(gsis[0], Some(MSG));
    routing.apply(&batch).unwrap();
    assert_eq!(routing.updates(), before + 1, "five routes, one update");
    assert_eq!(routing.msi_route(gsis[0]), Some(MSG));
    assert_eq!(routing.msi_route(gsis[2]).map(|m| m.data), Some(0x42));
    assert_eq!(routing.pin_route(3), Some(LEVEL_MSG));
    routing.apply(&batch).unwrap();
    assert_eq!(routing.updates(), before + 1, "nothing changed, no update");
    assert!(RouteBatch::default().is_empty() && !batch.is_empty());
}

#[test]
fn a_blocked_msi_route_hands_its_irqfd_to_the_watcher_until_it_translates_again() {
    let Some(vm) = kvm_vm(Irqchip::Split) else {
        return;
    };
    let routing = KvmRouting::new(Arc::new(vm), Irqchip::Split);
    let watcher = Arc::new(FakeWatcher::default());
    assert!(routing.set_blocked_signals(watcher.clone()).is_ok());
    assert!(routing
        .set_blocked_signals(Arc::new(FakeWatcher::default()))
        .is_err());
    let mut routes = routing.routes();
    let fd = EventFd::new(EFD_NONBLOCK).unwrap();
    let gsi = routes.allocate_gsi().unwrap();
    routes.set_msi_route(gsi, MSG).unwrap();
    routes.attach_irqfd(&fd, gsi, None).unwrap();
    assert!(assigned(&routing, &fd, gsi));
    assert_eq!(
        routes
            .attach_irqfd(&fd, gsi, None)
            .map_err(|e| e.to_string()),
        Err(format!("GSI {gsi} already has an irqfd"))
    );

    routing.apply(RouteBatch::default().msi(gsi, None)).unwrap();
    assert_eq!(
        routing.msi_route(gsi),
        None,
        "no route for a blocked message"
    );
    assert_eq!(watcher.take(), [Watched::Watch(gsi, SignalSource::Msi)]);
    assert!(!assigned(&routing, &fd, gsi), "KVM let go of the eventfd");
    // Blocked again (another invalidation): nothing moves.
    routing.apply(RouteBatch::default().msi(gsi, None)).unwrap();
    assert_eq!(watcher.take(), []);

    routing
        .apply(RouteBatch::default().msi(gsi, Some(LEVEL_MSG)))
        .unwrap();
    assert_eq!(routing.msi_route(gsi), Some(LEVEL_MSG));
    assert_eq!(watcher.take(), [Watched::Unwatch(gsi)]);
    assert!(assigned(&routing, &fd, gsi), "back with KVM");

    // Attached while blocked: straight to the watcher; detached: away from it.
    routes.detach_irqfd(&fd, gsi).unwrap();
    assert!(!assigned(&routing, &fd, gsi));
    routing.apply(RouteBatch::default().msi(gsi, None)).unwrap();
    routes.attach_irqfd(&fd, gsi, None).unwrap();
    assert!(!assigned(&routing, &fd, gsi));
    routes.detach_irqfd(&fd, gsi).unwrap();
    assert_eq!(
        watcher.take(),
        [
            Watched::Watch(gsi, SignalSource::Msi),
            Watched::Unwatch(gsi)
        ]
    );
    // Freeing a GSI whose irqfd is still attached detaches it.
    routes.set_msi_route(gsi, MSG).unwrap();
    routes.attach_irqfd(&fd, gsi, None).unwrap();
    routes.free_gsi(gsi);
    assert!(!assigned(&routing, &fd, gsi));
    assert_eq!(routing.msi_route(gsi), None);
}

#[test]
fn lines_of_an_unmasked_blocked_pin_are_watched_and_resample_once_it_translates_again() {
    let Some(vm) = kvm_vm(Irqchip::Split) else {
        return;
    };
    let routing = KvmRouting::new(Arc::new(vm), Irqchip::Split);
    let watcher = Arc::new(FakeWatcher::default());
    assert!(routing.set_blocked_signals(watcher.clone()).is_ok());
    let mut routes = routing.routes();
    let trigger = EventFd::new(EFD_NONBLOCK).unwrap();
    let resample = EventFd::new(EFD_NONBLOCK).unwrap();
    routes.attach_irqfd(&trigger, 16, Some(&resample)).unwrap();
    let line = routing.lock().pins[16].lines[0].gsi;
    let blocked = |masked| PinRoute {
        message: None,
        masked,
        level: true,
    };
    // Blocked while masked: a masked pin sends nothing, its line stays with KVM.
    routing.set_ioapic_pin(16, blocked(true)).unwrap();
    assert_eq!(watcher.take(), []);
    assert!(assigned(&routing, &trigger, line));
    // Unmasked while blocked: the line's signals are the watcher's, no resample (nothing can
    // be delivered to end in an EOI).
    routing.set_ioapic_pin(16, blocked(false)).unwrap();
    assert_eq!(
        watcher.take(),
        [Watched::Watch(line, SignalSource::IoapicPin(16))]
    );
    assert!(!assigned(&routing, &trigger, line));
    assert!(!drained(&resample));
    assert_eq!(routing.pin_route(16), None);
    // A line attached meanwhile goes to the watcher too, and leaves it when detached.
    let other = EventFd::new(EFD_NONBLOCK).unwrap();
    routes.attach_irqfd(&other, 16, None).unwrap();
    let other_line = routing.lock().pins[16].lines[1].gsi;
    routes.detach_irqfd(&other, 16).unwrap();
    assert_eq!(
        watcher.take(),
        [
            Watched::Watch(other_line, SignalSource::IoapicPin(16)),
            Watched::Unwatch(other_line)
        ]
    );
    // Translating again: back to KVM, and a level line asserts again through its resample.
    routing.set_ioapic_pin(16, pin(LEVEL_MSG, false)).unwrap();
    assert_eq!(watcher.take(), [Watched::Unwatch(line)]);
    assert!(assigned(&routing, &trigger, line));
    assert!(drained(&resample));
    assert_eq!(routing.pin_route(16), Some(LEVEL_MSG));
    // Unmasked and blocked, then masked: back to KVM without a resample.
    routing.set_ioapic_pin(16, blocked(false)).unwrap();
    routing.set_ioapic_pin(16, blocked(true)).unwrap();
    assert_eq!(
        watcher.take(),
        [
            Watched::Watch(line, SignalSource::IoapicPin(16)),
            Watched::Unwatch(line)
        ]
    );
    assert!(assigned(&routing, &trigger, line));
    assert!(!drained(&resample));
}

#[test]
fn without_a_watcher_blocked_signals_stay_with_kvm_which_drops_them() {
    let Some(vm) = kvm_vm(Irqchip::Split) else {
        return;
    };
    let routing = KvmRouting::new(Arc::new(vm), Irqchip::Split);
    let mut routes = routing.routes();
    let fd = EventFd::new(EFD_NONBLOCK).unwrap();
    let gsi = routes.allocate_gsi().unwrap();
    routes.set_msi_route(gsi, MSG).unwrap();
    routes.attach_irqfd(&fd, gsi, None).unwrap();
    routing.apply(RouteBatch::default().msi(gsi, None)).unwrap();
    assert_eq!(routing.msi_route(gsi), None);
    assert!(assigned(&routing, &fd, gsi));
}
