//! The KVM side of interrupt delivery: one GSI routing table shared by every interrupt source
//! of a VM, and KVM's VFIO pseudo-device.
//!
//! KVM_SET_GSI_ROUTING replaces the whole table, so the table holds all of it: the fixed part
//! the irqchip needs, then one MSI entry per passed-through vector from GSI 24 up.
//!
//! With the in-kernel irqchip the fixed part is KVM's default irqchip entries (what
//! KVM_CREATE_IRQCHIP installs: GSI 0-15 to the PIC and IOAPIC, 16-23 to the IOAPIC).
//!
//! With the split irqchip (KVM_CAP_SPLIT_IRQCHIP) the IOAPIC is the VMM's and KVM refuses
//! irqchip entries and resample irqfds. GSI `pin` (0..24) then carries the message the IOAPIC
//! entry of `pin` makes, masked or not: KVM derives from the level-triggered routes of those
//! GSIs which vectors' EOIs exit to user space (KVM_EXIT_IOAPIC_EOI), so an interrupt in service
//! on a pin the guest masked meanwhile still has its EOI reach the IOAPIC. A line KVM injects
//! from an eventfd (a VFIO INTx, the serial port) gets a GSI of its own from 24 up, whose route
//! carries the pin's message while the entry is unmasked and is absent while it is masked, so
//! KVM drops what the line signals then, as the 82093AA ignores a masked pin. Its resample
//! eventfd, which KVM would signal at EOI, is signalled by [`KvmRouting::ioapic_eoi`] and when
//! a level-triggered pin is unmasked (a level line whose signal was dropped asserts again).

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_create_device, kvm_device_type_KVM_DEV_TYPE_VFIO, kvm_irq_routing_entry,
    kvm_irq_routing_entry__bindgen_ty_1, kvm_irq_routing_irqchip, kvm_irq_routing_msi,
    KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;
use vfio_ioctls::VfioDeviceFd;
use vmm_sys_util::eventfd::EventFd;

use crate::irq::{IrqRoutes, RouteError};
use vm_device::interrupt::MsiMessage;

/// IOAPIC pins (GSIs 0..24) in KVM's default routing, and the GSIs KVM reserves for the
/// user-space IOAPIC with the split irqchip.
pub const IOAPIC_PINS: u32 = 24;
/// KVM_MAX_IRQ_ROUTES on x86.
pub const MAX_ROUTES: u32 = 4096;

/// Where the VM's IOAPIC (and PIC) live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Irqchip {
    /// KVM_CREATE_IRQCHIP: PIC, IOAPIC and local APICs in KVM.
    Kernel,
    /// KVM_CAP_SPLIT_IRQCHIP: local APICs in KVM, the IOAPIC in user space.
    Split,
}

fn irqchip_entry(gsi: u32, chip: u32, pin: u32) -> kvm_irq_routing_entry {
    kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        u: kvm_irq_routing_entry__bindgen_ty_1 {
            irqchip: kvm_irq_routing_irqchip { irqchip: chip, pin },
        },
        ..Default::default()
    }
}

fn msi_entry(gsi: u32, m: MsiMessage) -> kvm_irq_routing_entry {
    kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_MSI,
        u: kvm_irq_routing_entry__bindgen_ty_1 {
            msi: kvm_irq_routing_msi {
                address_lo: m.address as u32,
                address_hi: (m.address >> 32) as u32,
                data: m.data,
                ..Default::default()
            },
        },
        ..Default::default()
    }
}

/// KVM's default x86 routing (virt/kvm/irqchip.c, arch/x86/kvm/irq_comm.c default_routing).
fn default_routes() -> Vec<kvm_irq_routing_entry> {
    let mut v = Vec::new();
    for gsi in 0..IOAPIC_PINS {
        v.push(irqchip_entry(gsi, KVM_IRQCHIP_IOAPIC, gsi));
        if gsi < 16 {
            let chip = if gsi < 8 {
                KVM_IRQCHIP_PIC_MASTER
            } else {
                KVM_IRQCHIP_PIC_SLAVE
            };
            v.push(irqchip_entry(gsi, chip, gsi % 8));
        }
    }
    v
}

/// A line KVM injects for an IOAPIC pin (split irqchip).
struct PinLine {
    /// The caller's eventfd, by number: how detaching finds the line again.
    trigger: RawFd,
    /// The same eventfd, duplicated: the irqfd is deassigned and assigned again through it when
    /// the pin is unmasked (see [`KvmRouting::set_ioapic_pin`]).
    irqfd: EventFd,
    /// Its own GSI, routed to the pin's message while the pin is unmasked.
    gsi: u32,
    resample: Option<EventFd>,
}

/// One user-space IOAPIC pin (split irqchip).
struct Pin {
    /// What the entry makes; None until the IOAPIC first reports the pin.
    message: Option<MsiMessage>,
    masked: bool,
    lines: Vec<PinLine>,
}

impl Pin {
    fn signal_resample(&self, pin: usize) {
        for rfd in self.lines.iter().filter_map(|l| l.resample.as_ref()) {
            if let Err(e) = rfd.write(1) {
                vm_device::warn_limited!("IOAPIC pin {pin}: cannot signal a resample eventfd: {e}");
            }
        }
    }
}

struct Table {
    msi: BTreeMap<u32, MsiMessage>,
    used: BTreeSet<u32>,
    /// The IOAPIC's pins, with the split irqchip; empty with the in-kernel one.
    pins: Vec<Pin>,
}

impl Table {
    fn allocate_gsi(&mut self) -> Result<u32, RouteError> {
        let gsi = (IOAPIC_PINS..MAX_ROUTES)
            .find(|g| !self.used.contains(g))
            .ok_or(RouteError::Exhausted { max: MAX_ROUTES })?;
        self.used.insert(gsi);
        Ok(gsi)
    }

    /// Every entry of the table, for KVM_SET_GSI_ROUTING.
    fn entries(&self, irqchip: Irqchip) -> Vec<kvm_irq_routing_entry> {
        let mut entries = match irqchip {
            Irqchip::Kernel => default_routes(),
            Irqchip::Split => Vec::new(),
        };
        for (gsi, pin) in self.pins.iter().enumerate() {
            let Some(m) = pin.message else { continue };
            entries.push(msi_entry(gsi as u32, m));
            if !pin.masked {
                entries.extend(pin.lines.iter().map(|l| msi_entry(l.gsi, m)));
            }
        }
        entries.extend(self.msi.iter().map(|(&g, &m)| msi_entry(g, m)));
        entries
    }
}

/// The VM's GSI routing table.
pub struct KvmRouting {
    vm: Arc<VmFd>,
    irqchip: Irqchip,
    table: Mutex<Table>,
}

impl KvmRouting {
    /// The table of a VM whose irqchip is `irqchip`.
    pub fn new(vm: Arc<VmFd>, irqchip: Irqchip) -> Arc<Self> {
        let pins = match irqchip {
            Irqchip::Kernel => Vec::new(),
            Irqchip::Split => (0..IOAPIC_PINS)
                .map(|_| Pin {
                    message: None,
                    masked: true,
                    lines: Vec::new(),
                })
                .collect(),
        };
        Arc::new(Self {
            vm,
            irqchip,
            table: Mutex::new(Table {
                msi: BTreeMap::new(),
                used: Default::default(),
                pins,
            }),
        })
    }

    /// The irqchip the table is for.
    pub fn irqchip(&self) -> Irqchip {
        self.irqchip
    }

    /// A handle implementing [`IrqRoutes`] for one device.
    pub fn routes(self: &Arc<Self>) -> KvmIrqRoutes {
        KvmIrqRoutes(self.clone())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn commit(&self, t: &Table, gsi: u32) -> Result<(), RouteError> {
        let routing = KvmIrqRouting::from_entries(&t.entries(self.irqchip))
            .map_err(|source| RouteError::Table { gsi, source })?;
        self.vm
            .set_gsi_routing(&routing)
            .map_err(|source| RouteError::Kvm {
                what: "KVM_SET_GSI_ROUTING",
                gsi,
                source,
            })
    }

    /// Split irqchip: the IOAPIC entry of `pin` now makes `message`, is `masked` or not and
    /// level-triggered or not. Routes GSI `pin` and the pin's lines accordingly; unmasking a
    /// level-triggered pin signals its lines' resample eventfds.
    pub fn set_ioapic_pin(
        &self,
        pin: u32,
        message: MsiMessage,
        masked: bool,
        level: bool,
    ) -> Result<(), RouteError> {
        if self.irqchip != Irqchip::Split {
            return Err(RouteError::NotSplit { pin });
        }
        let mut t = self.lock();
        let p = t
            .pins
            .get_mut(pin as usize)
            .ok_or(RouteError::NoSuchPin { pin })?;
        let unmasked = p.masked && !masked;
        let changed = p.message != Some(message) || p.masked != masked;
        p.message = Some(message);
        p.masked = masked;
        // A signal that finds no route is injected later by a KVM work item that looks the
        // route up again, so an edge a line gave while the pin was masked would arrive once it
        // is unmasked. Deassigning the irqfds first waits for those items, which still find no
        // route: the edge is lost, as the 82093AA loses an edge on a masked pin.
        let lines = &t.pins[pin as usize].lines;
        let mut result = Ok(());
        if unmasked {
            for line in lines {
                result = result.and(self.set_line_irqfd(line, false));
            }
        }
        if changed {
            result = result.and(self.commit(&t, pin));
        }
        if unmasked {
            for line in &t.pins[pin as usize].lines {
                result = result.and(self.set_line_irqfd(line, true));
            }
        }
        // After the routes: the line may signal again at once, and its route must be there.
        if unmasked && level {
            t.pins[pin as usize].signal_resample(pin as usize);
        }
        result
    }

    /// Assigns the irqfd of `line` to its GSI, or deassigns it (which returns once KVM injected
    /// what it had pending).
    fn set_line_irqfd(&self, line: &PinLine, assign: bool) -> Result<(), RouteError> {
        let (done, what) = if assign {
            (self.vm.register_irqfd(&line.irqfd, line.gsi), "KVM_IRQFD")
        } else {
            (
                self.vm.unregister_irqfd(&line.irqfd, line.gsi),
                "KVM_IRQFD deassign",
            )
        };
        done.map_err(|source| RouteError::Kvm {
            what,
            gsi: line.gsi,
            source,
        })
    }

    /// Split irqchip: the EOI of level-triggered `pin` arrived; its lines' resample eventfds
    /// are signalled (what KVM does for resample irqfds with its own IOAPIC).
    pub fn ioapic_eoi(&self, pin: u32) {
        if let Some(p) = self.lock().pins.get(pin as usize) {
            p.signal_resample(pin as usize);
        }
    }

    /// Split irqchip: KVM injects IOAPIC pin `pin` whenever `fd` is signalled, while the pin
    /// is unmasked; `resample` is signalled at the pin's EOI.
    pub fn attach_ioapic_line(
        &self,
        pin: u32,
        fd: &EventFd,
        resample: Option<&EventFd>,
    ) -> Result<(), RouteError> {
        if self.irqchip != Irqchip::Split {
            return Err(RouteError::NotSplit { pin });
        }
        let resample = resample
            .map(EventFd::try_clone)
            .transpose()
            .map_err(|source| RouteError::ResampleFd { pin, source })?;
        let irqfd = fd
            .try_clone()
            .map_err(|source| RouteError::TriggerFd { pin, source })?;
        let mut t = self.lock();
        if t.pins.get(pin as usize).is_none() {
            return Err(RouteError::NoSuchPin { pin });
        }
        let gsi = t.allocate_gsi()?;
        t.pins[pin as usize].lines.push(PinLine {
            trigger: fd.as_raw_fd(),
            irqfd,
            gsi,
            resample,
        });
        // The route first: KVM injects what `fd` already holds when the irqfd is registered.
        let attached = self.commit(&t, gsi).and_then(|()| {
            self.vm
                .register_irqfd(fd, gsi)
                .map_err(|source| RouteError::Kvm {
                    what: "KVM_IRQFD",
                    gsi,
                    source,
                })
        });
        if attached.is_err() {
            t.pins[pin as usize].lines.retain(|l| l.gsi != gsi);
            t.used.remove(&gsi);
            if let Err(e) = self.commit(&t, gsi) {
                vm_device::warn_limited!("{e}");
            }
        }
        attached
    }

    /// Split irqchip: stops injecting `fd` (attached with [`Self::attach_ioapic_line`]).
    pub fn detach_ioapic_line(&self, pin: u32, fd: &EventFd) -> Result<(), RouteError> {
        let mut t = self.lock();
        let p = t
            .pins
            .get_mut(pin as usize)
            .ok_or(RouteError::NoSuchPin { pin })?;
        let at = p
            .lines
            .iter()
            .position(|l| l.trigger == fd.as_raw_fd())
            .ok_or(RouteError::NotAttached {
                pin,
                fd: fd.as_raw_fd(),
            })?;
        let line = p.lines.remove(at);
        t.used.remove(&line.gsi);
        let unregistered =
            self.vm
                .unregister_irqfd(fd, line.gsi)
                .map_err(|source| RouteError::Kvm {
                    what: "KVM_IRQFD deassign",
                    gsi: line.gsi,
                    source,
                });
        self.commit(&t, line.gsi)?;
        unregistered
    }
}

/// One device's view of the shared routing table. With the split irqchip, an irqfd on an
/// IOAPIC pin's GSI (INTx) becomes a line of that pin.
pub struct KvmIrqRoutes(Arc<KvmRouting>);

impl KvmIrqRoutes {
    fn is_ioapic_line(&self, gsi: u32) -> bool {
        self.0.irqchip == Irqchip::Split && gsi < IOAPIC_PINS
    }
}

impl IrqRoutes for KvmIrqRoutes {
    fn allocate_gsi(&mut self) -> Result<u32, RouteError> {
        self.0.lock().allocate_gsi()
    }

    fn free_gsi(&mut self, gsi: u32) {
        let mut t = self.0.lock();
        t.used.remove(&gsi);
        if t.msi.remove(&gsi).is_some() {
            if let Err(e) = self.0.commit(&t, gsi) {
                vm_device::warn_limited!("{e}");
            }
        }
    }

    fn set_msi_route(&mut self, gsi: u32, msg: MsiMessage) -> Result<(), RouteError> {
        let mut t = self.0.lock();
        t.msi.insert(gsi, msg);
        self.0.commit(&t, gsi)
    }

    fn attach_irqfd(
        &mut self,
        fd: &EventFd,
        gsi: u32,
        resample: Option<&EventFd>,
    ) -> Result<(), RouteError> {
        if self.is_ioapic_line(gsi) {
            return self.0.attach_ioapic_line(gsi, fd, resample);
        }
        let r = match resample {
            Some(_) if self.0.irqchip == Irqchip::Split => {
                return Err(RouteError::ResampleNotPin { gsi })
            }
            Some(rfd) => self.0.vm.register_irqfd_with_resample(fd, rfd, gsi),
            None => self.0.vm.register_irqfd(fd, gsi),
        };
        r.map_err(|source| RouteError::Kvm {
            what: "KVM_IRQFD",
            gsi,
            source,
        })
    }

    fn detach_irqfd(&mut self, fd: &EventFd, gsi: u32) -> Result<(), RouteError> {
        if self.is_ioapic_line(gsi) {
            return self.0.detach_ioapic_line(gsi, fd);
        }
        self.0
            .vm
            .unregister_irqfd(fd, gsi)
            .map_err(|source| RouteError::Kvm {
                what: "KVM_IRQFD deassign",
                gsi,
                source,
            })
    }
}

/// Creates KVM's VFIO pseudo-device (KVM_DEV_TYPE_VFIO), which VFIO groups join so KVM
/// knows about assigned devices (coherency, posted interrupts).
pub fn create_kvm_vfio_device(vm: &VmFd) -> Result<VfioDeviceFd, kvm_ioctls::Error> {
    let mut dev = kvm_create_device {
        type_: kvm_device_type_KVM_DEV_TYPE_VFIO,
        fd: 0,
        flags: 0,
    };
    let fd = vm.create_device(&mut dev)?;
    Ok(VfioDeviceFd::new_from_kvm(fd))
}

#[cfg(test)]
mod tests {
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
            routing.set_ioapic_pin(4, MSG, false, false).is_err(),
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
        let mut pins: Vec<Pin> = (0..IOAPIC_PINS)
            .map(|_| Pin {
                message: None,
                masked: true,
                lines: Vec::new(),
            })
            .collect();
        pins[4].message = Some(MSG);
        pins[4].lines.push(PinLine {
            trigger: -1,
            irqfd: EventFd::new(0).unwrap(),
            gsi: 30,
            resample: None,
        });
        pins[16] = Pin {
            message: Some(LEVEL_MSG),
            masked: false,
            lines: vec![PinLine {
                trigger: -1,
                irqfd: EventFd::new(0).unwrap(),
                gsi: 31,
                resample: None,
            }],
        };
        let mut t = Table {
            msi: BTreeMap::from([(40, MSG)]),
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
            "masked pin 4: its own GSI only; unmasked pin 16: its line too; no irqchip entry"
        );
        t.pins[4].masked = false;
        assert!(summary(&t.entries(Irqchip::Split)).contains(&Some((30, MSG))));
        let kernel = Table {
            msi: BTreeMap::from([(40, MSG)]),
            used: BTreeSet::new(),
            pins: Vec::new(),
        };
        let s = summary(&kernel.entries(Irqchip::Kernel));
        assert_eq!(s.len(), 24 + 16 + 1);
        assert_eq!(s.last(), Some(&Some((40, MSG))));
        assert!(
            s[..40].iter().all(Option::is_none),
            "KVM's irqchip entries first"
        );
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
        routing.set_ioapic_pin(16, LEVEL_MSG, true, true).unwrap();
        assert!(!drained(&resample));
        routing.set_ioapic_pin(16, LEVEL_MSG, false, true).unwrap();
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
        routing.set_ioapic_pin(16, LEVEL_MSG, false, true).unwrap();
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
}
