//! The KVM side of interrupt delivery: one GSI routing table shared by every passed-through
//! device of a VM, and KVM's VFIO pseudo-device.
//!
//! KVM_SET_GSI_ROUTING replaces the whole table, so the table keeps KVM's default irqchip
//! entries (what KVM_CREATE_IRQCHIP installs: GSI 0-15 to the PIC and IOAPIC, 16-23 to the
//! IOAPIC) and adds one MSI entry per vector from GSI 24 up.

use std::collections::BTreeMap;
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
use crate::msi::MsiMessage;

/// IOAPIC pins (GSIs 0..24) in KVM's default routing.
pub const IOAPIC_PINS: u32 = 24;
/// KVM_MAX_IRQ_ROUTES on x86.
pub const MAX_ROUTES: u32 = 4096;

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

struct Table {
    msi: BTreeMap<u32, MsiMessage>,
    used: std::collections::BTreeSet<u32>,
}

/// The VM's GSI routing table.
pub struct KvmRouting {
    vm: Arc<VmFd>,
    table: Mutex<Table>,
}

impl KvmRouting {
    pub fn new(vm: Arc<VmFd>) -> Arc<Self> {
        Arc::new(Self {
            vm,
            table: Mutex::new(Table {
                msi: BTreeMap::new(),
                used: Default::default(),
            }),
        })
    }

    /// A handle implementing [`IrqRoutes`] for one device.
    pub fn routes(self: &Arc<Self>) -> KvmIrqRoutes {
        KvmIrqRoutes(self.clone())
    }

    fn commit(&self, t: &Table, gsi: u32) -> Result<(), RouteError> {
        let mut entries = default_routes();
        entries.extend(t.msi.iter().map(|(&g, m)| kvm_irq_routing_entry {
            gsi: g,
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
        }));
        let routing = KvmIrqRouting::from_entries(&entries)
            .map_err(|source| RouteError::Table { gsi, source })?;
        self.vm
            .set_gsi_routing(&routing)
            .map_err(|source| RouteError::Kvm {
                what: "KVM_SET_GSI_ROUTING",
                gsi,
                source,
            })
    }
}

/// One device's view of the shared routing table.
pub struct KvmIrqRoutes(Arc<KvmRouting>);

impl IrqRoutes for KvmIrqRoutes {
    fn allocate_gsi(&mut self) -> Result<u32, RouteError> {
        let mut t = self.0.table.lock().unwrap_or_else(|e| e.into_inner());
        let gsi = (IOAPIC_PINS..MAX_ROUTES)
            .find(|g| !t.used.contains(g))
            .ok_or(RouteError::Exhausted { max: MAX_ROUTES })?;
        t.used.insert(gsi);
        Ok(gsi)
    }

    fn free_gsi(&mut self, gsi: u32) {
        let mut t = self.0.table.lock().unwrap_or_else(|e| e.into_inner());
        t.used.remove(&gsi);
        if t.msi.remove(&gsi).is_some() {
            if let Err(e) = self.0.commit(&t, gsi) {
                vm_device::warn_limited!("{e}");
            }
        }
    }

    fn set_msi_route(&mut self, gsi: u32, msg: MsiMessage) -> Result<(), RouteError> {
        let mut t = self.0.table.lock().unwrap_or_else(|e| e.into_inner());
        t.msi.insert(gsi, msg);
        self.0.commit(&t, gsi)
    }

    fn attach_irqfd(
        &mut self,
        fd: &EventFd,
        gsi: u32,
        resample: Option<&EventFd>,
    ) -> Result<(), RouteError> {
        let r = match resample {
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

    /// A VM with an irqchip on this machine's KVM; None (said loudly) without /dev/kvm, and a
    /// failure under CI=true.
    fn kvm_vm() -> Option<VmFd> {
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
        vm.create_irq_chip().expect("KVM_CREATE_IRQCHIP");
        Some(vm)
    }

    #[test]
    fn msi_routes_and_irqfds_on_real_kvm_share_one_table() {
        let Some(vm) = kvm_vm() else { return };
        let routing = KvmRouting::new(Arc::new(vm));
        let (mut a, mut b) = (routing.routes(), routing.routes());
        let ga = a.allocate_gsi().unwrap();
        let gb = b.allocate_gsi().unwrap();
        assert_eq!((ga, gb), (24, 25), "GSIs above the IOAPIC pins, shared");
        let msg = MsiMessage {
            address: 0xfee0_0000,
            data: 0x31,
        };
        a.set_msi_route(ga, msg).unwrap();
        b.set_msi_route(gb, msg).unwrap();
        let fd = EventFd::new(0).unwrap();
        a.attach_irqfd(&fd, ga, None).unwrap();
        fd.write(1).unwrap();
        a.detach_irqfd(&fd, ga).unwrap();
        a.free_gsi(ga);
        assert_eq!(a.allocate_gsi().unwrap(), 24, "freed GSIs are reused");
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
}
