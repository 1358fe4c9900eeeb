//! Interrupt delivery: each VFIO vector signals an eventfd that KVM injects through an irqfd on
//! a GSI whose route carries the guest's MSI message.
//!
//! The KVM side sits behind [`IrqRoutes`] so this logic is tested without KVM. Masking a
//! vector detaches its irqfd: the device may still signal the eventfd, whose count KVM
//! delivers when the irqfd is attached again (KVM_IRQFD checks for a pending event when it
//! registers), so nothing is lost and nothing reaches a masked vector. A message the guest
//! programs outside the x86 interrupt range (0xFEEx_xxxx, Intel SDM Vol. 3, 11.11.1) is not
//! routed: the vector stays detached and a warning is logged.

use vm_device::warn_limited;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::access::{IrqKind, IrqSetError, VfioAccess};
use vm_device::interrupt::MsiMessage;

/// A KVM-side operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    /// A KVM ioctl (KVM_SET_GSI_ROUTING, KVM_IRQFD) failed.
    #[error("{what} for GSI {gsi} failed: {source}")]
    Kvm {
        what: &'static str,
        gsi: u32,
        source: kvm_ioctls::Error,
    },
    /// The routing table does not fit KVM's routing structure.
    #[error("the routing table with GSI {gsi} cannot be built: {source}")]
    Table {
        gsi: u32,
        source: vmm_sys_util::fam::Error,
    },
    /// Every GSI KVM routes is taken.
    #[error("no GSI left for an MSI route: all {max} routes in use")]
    Exhausted { max: u32 },
    /// An IOAPIC pin operation on a VM whose IOAPIC is KVM's.
    #[error("IOAPIC pin {pin}: only the split irqchip has a user-space IOAPIC")]
    NotSplit { pin: u32 },
    /// A pin past the IOAPIC's last.
    #[error(
        "IOAPIC pin {pin} does not exist (pins 0..{})",
        crate::kvm::IOAPIC_PINS
    )]
    NoSuchPin { pin: u32 },
    /// A resample eventfd on a GSI with no EOI to resample at: with the split irqchip only the
    /// IOAPIC's pins have one.
    #[error("GSI {gsi} cannot resample: with the split irqchip only IOAPIC pins (GSI 0..24) do")]
    ResampleNotPin { gsi: u32 },
    /// The eventfd of a pin's line could not be duplicated.
    #[error("IOAPIC pin {pin}: cannot duplicate the line's eventfd: {source}")]
    TriggerFd { pin: u32, source: std::io::Error },
    /// The resample eventfd of a pin's line could not be duplicated.
    #[error("IOAPIC pin {pin}: cannot duplicate the resample eventfd: {source}")]
    ResampleFd { pin: u32, source: std::io::Error },
    /// The eventfd to detach is not a line of the pin.
    #[error("IOAPIC pin {pin}: eventfd {fd} is not attached to it")]
    NotAttached { pin: u32, fd: i32 },
    /// An MSI route takes one irqfd (one eventfd a vector).
    #[error("GSI {gsi} already has an irqfd")]
    IrqfdTaken { gsi: u32 },
    /// The eventfd of a vector could not be duplicated.
    #[error("GSI {gsi}: cannot duplicate the irqfd's eventfd: {source}")]
    IrqfdDup { gsi: u32, source: std::io::Error },
}

/// Errors wiring a vector.
#[derive(Debug, thiserror::Error)]
pub enum IrqError {
    #[error(transparent)]
    Route(#[from] RouteError),
    #[error(transparent)]
    Vfio(#[from] IrqSetError),
    #[error("cannot create an eventfd for {kind} vector {vector}: {source}")]
    EventFd {
        kind: IrqKind,
        vector: usize,
        source: std::io::Error,
    },
}

/// The hypervisor's interrupt routing (KVM: GSI routing table and irqfds).
pub trait IrqRoutes: Send {
    /// A GSI free for an MSI route.
    fn allocate_gsi(&mut self) -> Result<u32, RouteError>;
    /// Gives back a GSI (its route is removed).
    fn free_gsi(&mut self, gsi: u32);
    /// Makes `gsi` deliver `msg`.
    fn set_msi_route(&mut self, gsi: u32, msg: MsiMessage) -> Result<(), RouteError>;
    /// Injects `gsi` whenever `fd` is signalled; with `resample`, level-triggered with the
    /// resample fd signalled at EOI.
    fn attach_irqfd(
        &mut self,
        fd: &EventFd,
        gsi: u32,
        resample: Option<&EventFd>,
    ) -> Result<(), RouteError>;
    /// Stops injecting for `fd`.
    fn detach_irqfd(&mut self, fd: &EventFd, gsi: u32) -> Result<(), RouteError>;
}

/// One vector: its eventfd, GSI, the message routed and whether KVM listens.
#[derive(Debug)]
struct Vector {
    fd: EventFd,
    gsi: u32,
    routed: Option<MsiMessage>,
    attached: bool,
}

/// The vectors of one interrupt kind (MSI or MSI-X) while it is enabled.
#[derive(Debug)]
pub struct Vectors {
    kind: IrqKind,
    vectors: Vec<Vector>,
}

impl Vectors {
    /// No vectors.
    pub fn new(kind: IrqKind) -> Self {
        Self {
            kind,
            vectors: Vec::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.vectors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.vectors.is_empty()
    }

    /// The GSI of vector `i` (for tests and diagnostics).
    pub fn gsi(&self, i: usize) -> Option<u32> {
        self.vectors.get(i).map(|v| v.gsi)
    }

    /// Whether vector `i` is attached to KVM.
    pub fn attached(&self, i: usize) -> bool {
        self.vectors.get(i).is_some_and(|v| v.attached)
    }

    /// Enables `count` vectors (VFIO_DEVICE_SET_IRQS with one eventfd each); each is then
    /// routed and attached per `state(i) -> (message, masked)`. Count is capped by what
    /// VFIO offers.
    pub fn enable(
        &mut self,
        dev: &dyn VfioAccess,
        routes: &mut dyn IrqRoutes,
        count: usize,
        state: impl Fn(usize) -> (MsiMessage, bool),
    ) -> Result<(), IrqError> {
        self.disable(dev, routes);
        let offered = dev.irq_count(self.kind) as usize;
        let count = if count > offered {
            warn_limited!(
                "{}: {count} vectors asked, VFIO offers {offered}",
                self.kind
            );
            offered
        } else {
            count
        };
        for vector in 0..count {
            let fd = EventFd::new(EFD_NONBLOCK).map_err(|source| IrqError::EventFd {
                kind: self.kind,
                vector,
                source,
            })?;
            let gsi = routes.allocate_gsi()?;
            self.vectors.push(Vector {
                fd,
                gsi,
                routed: None,
                attached: false,
            });
        }
        if count == 0 {
            return Ok(());
        }
        let fds: Vec<&EventFd> = self.vectors.iter().map(|v| &v.fd).collect();
        dev.enable_irq(self.kind, &fds)?;
        for i in 0..count {
            let (msg, masked) = state(i);
            self.update(routes, i, msg, masked)?;
        }
        Ok(())
    }

    /// Routes and attaches (or detaches) vector `i` to match the guest's state.
    pub fn update(
        &mut self,
        routes: &mut dyn IrqRoutes,
        i: usize,
        msg: MsiMessage,
        masked: bool,
    ) -> Result<(), IrqError> {
        let kind = self.kind;
        let Some(v) = self.vectors.get_mut(i) else {
            warn_limited!("{kind} vector {i} is not enabled; update ignored");
            return Ok(());
        };
        let deliverable = !masked && msg.is_interrupt();
        if !masked && !msg.is_interrupt() {
            warn_limited!(
                "{kind} vector {i}: address {:#x} is not an interrupt address; not delivered",
                msg.address
            );
        }
        if !deliverable {
            if v.attached {
                routes.detach_irqfd(&v.fd, v.gsi)?;
                v.attached = false;
            }
            return Ok(());
        }
        if v.routed != Some(msg) {
            routes.set_msi_route(v.gsi, msg)?;
            v.routed = Some(msg);
        }
        if !v.attached {
            routes.attach_irqfd(&v.fd, v.gsi, None)?;
            v.attached = true;
        }
        Ok(())
    }

    /// Disables every vector in VFIO and frees its GSI.
    pub fn disable(&mut self, dev: &dyn VfioAccess, routes: &mut dyn IrqRoutes) {
        if self.vectors.is_empty() {
            return;
        }
        if let Err(e) = dev.disable_irq(self.kind) {
            warn_limited!("{e}");
        }
        for v in self.vectors.drain(..) {
            if v.attached {
                if let Err(e) = routes.detach_irqfd(&v.fd, v.gsi) {
                    warn_limited!("{e}");
                }
            }
            routes.free_gsi(v.gsi);
        }
    }
}

/// Legacy INTx: a level-triggered line through an irqfd with a resample fd (KVM deasserts
/// at EOI and VFIO unmasks the device's line).
#[derive(Debug)]
pub struct Intx {
    trigger: EventFd,
    resample: EventFd,
    gsi: u32,
    enabled: bool,
}

impl Intx {
    /// Wires the device's INTx to `gsi` (the interrupt line the guest sees).
    pub fn enable(
        dev: &dyn VfioAccess,
        routes: &mut dyn IrqRoutes,
        gsi: u32,
    ) -> Result<Self, IrqError> {
        let new_fd = |vector| {
            EventFd::new(EFD_NONBLOCK).map_err(|source| IrqError::EventFd {
                kind: IrqKind::Intx,
                vector,
                source,
            })
        };
        let intx = Intx {
            trigger: new_fd(0)?,
            resample: new_fd(0)?,
            gsi,
            enabled: true,
        };
        dev.enable_irq(IrqKind::Intx, &[&intx.trigger])?;
        dev.set_intx_resample(&intx.resample)?;
        routes.attach_irqfd(&intx.trigger, gsi, Some(&intx.resample))?;
        Ok(intx)
    }

    pub fn gsi(&self) -> u32 {
        self.gsi
    }

    /// Stops INTx (when the guest switches to MSI or MSI-X, or at exit).
    pub fn disable(&mut self, dev: &dyn VfioAccess, routes: &mut dyn IrqRoutes) {
        if !self.enabled {
            return;
        }
        self.enabled = false;
        if let Err(e) = routes.detach_irqfd(&self.trigger, self.gsi) {
            warn_limited!("{e}");
        }
        if let Err(e) = dev.disable_irq(IrqKind::Intx) {
            warn_limited!("{e}");
        }
    }
}
