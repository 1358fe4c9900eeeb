//! What the routing table holds, and the entries KVM_SET_GSI_ROUTING gets from it.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::io::RawFd;

use kvm_bindings::{
    kvm_irq_routing_entry, kvm_irq_routing_entry__bindgen_ty_1, kvm_irq_routing_irqchip,
    kvm_irq_routing_msi, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use vm_device::interrupt::MsiMessage;
use vmm_sys_util::eventfd::EventFd;

use super::{Irqchip, IOAPIC_PINS, MAX_ROUTES};
use crate::irq::RouteError;

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

pub(super) fn msi_entry(gsi: u32, m: MsiMessage) -> kvm_irq_routing_entry {
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
pub(super) fn default_routes() -> Vec<kvm_irq_routing_entry> {
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

/// An eventfd KVM injects on a GSI, kept so the table can move it between KVM and the
/// watcher of blocked signals (see [`super::BlockedSignals`]).
pub(super) struct Irqfd {
    /// The caller's eventfd, by number: how detaching finds it again.
    pub trigger: RawFd,
    /// The same eventfd, duplicated: assigned and deassigned through it.
    pub fd: EventFd,
}

/// A line KVM injects for an IOAPIC pin (split irqchip).
pub(super) struct PinLine {
    pub irqfd: Irqfd,
    /// Its own GSI, routed to the pin's message while the pin is unmasked.
    pub gsi: u32,
    pub resample: Option<EventFd>,
}

/// One user-space IOAPIC pin (split irqchip).
pub(super) struct Pin {
    /// What KVM delivers for the pin: None until the IOAPIC first reports the pin, and while
    /// interrupt remapping blocks its message.
    pub message: Option<MsiMessage>,
    pub masked: bool,
    pub lines: Vec<PinLine>,
}

impl Pin {
    pub fn reset() -> Self {
        Pin {
            message: None,
            masked: true,
            lines: Vec::new(),
        }
    }

    /// Its lines' signals are the watcher's: unmasked, and nothing KVM could deliver.
    pub fn watched(&self) -> bool {
        !self.masked && self.message.is_none()
    }

    pub fn signal_resample(&self, pin: u32) {
        for rfd in self.lines.iter().filter_map(|l| l.resample.as_ref()) {
            if let Err(e) = rfd.write(1) {
                vm_device::warn_limited!("IOAPIC pin {pin}: cannot signal a resample eventfd: {e}");
            }
        }
    }
}

/// The whole table.
pub(super) struct Table {
    /// MSI routes by GSI: the message KVM delivers, None while interrupt remapping blocks it.
    pub msi: BTreeMap<u32, Option<MsiMessage>>,
    /// The irqfds on GSIs from [`IOAPIC_PINS`] up (MSI vectors), at most one a GSI.
    pub irqfds: BTreeMap<u32, Irqfd>,
    pub used: BTreeSet<u32>,
    /// The IOAPIC's pins, with the split irqchip; empty with the in-kernel one.
    pub pins: Vec<Pin>,
}

impl Table {
    pub fn new(irqchip: Irqchip) -> Self {
        let pins = match irqchip {
            Irqchip::Kernel => Vec::new(),
            Irqchip::Split => (0..IOAPIC_PINS).map(|_| Pin::reset()).collect(),
        };
        Table {
            msi: BTreeMap::new(),
            irqfds: BTreeMap::new(),
            used: BTreeSet::new(),
            pins,
        }
    }

    pub fn allocate_gsi(&mut self) -> Result<u32, RouteError> {
        let gsi = (IOAPIC_PINS..MAX_ROUTES)
            .find(|g| !self.used.contains(g))
            .ok_or(RouteError::Exhausted { max: MAX_ROUTES })?;
        self.used.insert(gsi);
        Ok(gsi)
    }

    /// Is the MSI route of `gsi` blocked by interrupt remapping?
    pub fn msi_blocked(&self, gsi: u32) -> bool {
        matches!(self.msi.get(&gsi), Some(None))
    }

    /// Every entry of the table, for KVM_SET_GSI_ROUTING.
    pub fn entries(&self, irqchip: Irqchip) -> Vec<kvm_irq_routing_entry> {
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
        entries.extend(
            self.msi
                .iter()
                .filter_map(|(&g, m)| m.map(|m| msi_entry(g, m))),
        );
        entries
    }
}
