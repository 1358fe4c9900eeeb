//! The IOAPIC over KVM's split irqchip: the model's output (the routes of its pins in the VM's
//! routing table, KVM_SIGNAL_MSI, resample eventfds at EOI) and the storm guard's timer, which
//! the run loop polls. The device manager puts it on the MMIO bus
//! ([`crate::device_manager::DeviceManager`]); the vCPUs hand it KVM_EXIT_IOAPIC_EOI.
//!
//! Behind a VT-d with interrupt remapping ([`KvmIoapic::set_remapping`]) the pins' routes carry
//! the translations of the entries' messages and each delivery is a request to the unit, from
//! [`super::IOAPIC_SOURCE_ID`]; otherwise messages go to KVM as the IOAPIC makes them.

use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use kvm_ioctls::VmFd;
use passthrough::kvm::{KvmRouting, PinRoute, IOAPIC_PINS};
use vm_device::interrupt::MsiMessage;
use vm_device::{debug_limited, warn_limited};
use vmm_sys_util::timerfd::TimerFd;

use crate::devices::vtd::intremap::IoapicRemapping;
use crate::vstate::vm::signal_msi;

use super::{lock, Ioapic, IoapicOutput, PinState, SharedIoapic, TriggerMode, IOAPIC_NUM_PINS};

// The model's pins are the GSIs the split irqchip reserves (KVM_CAP_SPLIT_IRQCHIP's argument).
const _: () = assert!(IOAPIC_NUM_PINS as u32 == IOAPIC_PINS);

/// The IOAPIC's output over KVM.
struct KvmIoapicOutput {
    vm: Arc<VmFd>,
    routing: Arc<KvmRouting>,
    timer: Arc<Mutex<TimerFd>>,
    /// The VT-d's interrupt remapping, once the unit that does it is added.
    remapping: Arc<OnceLock<IoapicRemapping>>,
}

impl IoapicOutput for KvmIoapicOutput {
    fn pin_changed(&mut self, pin: u8, state: PinState) {
        let routed = match self.remapping.get() {
            Some(r) => r.pin_changed(pin, state),
            None => {
                let route = PinRoute {
                    message: Some(state.message),
                    masked: state.masked,
                    level: state.trigger == TriggerMode::Level,
                };
                self.routing.set_ioapic_pin(u32::from(pin), route)
            }
        };
        if let Err(e) = routed {
            warn_limited!("IOAPIC pin {pin}: {e}");
        }
    }

    fn deliver(&mut self, pin: u8, message: MsiMessage) {
        let message = match self.remapping.get() {
            Some(r) => match r.request(message) {
                Some(m) => m,
                None => return debug_limited!("IOAPIC pin {pin}: {message:x?} blocked"),
            },
            None => message,
        };
        signal_msi(&self.vm, message, "IOAPIC");
    }

    fn end_of_interrupt(&mut self, pin: u8) {
        self.routing.ioapic_eoi(u32::from(pin));
    }

    fn schedule_deferred_service(&mut self, delay: Duration) {
        if let Err(e) = lock_timer(&self.timer).reset(delay, None) {
            warn_limited!("IOAPIC: cannot arm the storm guard's timer: {e}");
        }
    }
}

fn lock_timer(timer: &Mutex<TimerFd>) -> MutexGuard<'_, TimerFd> {
    timer.lock().unwrap_or_else(|e| e.into_inner())
}

/// The IOAPIC of a VM with the split irqchip, and the storm guard's timer its output arms.
#[derive(Clone)]
pub struct KvmIoapic {
    ioapic: SharedIoapic,
    timer: Arc<Mutex<TimerFd>>,
    remapping: Arc<OnceLock<IoapicRemapping>>,
}

impl KvmIoapic {
    /// An IOAPIC in its reset state over `routing` (a split irqchip's table) and `vm`'s
    /// KVM_SIGNAL_MSI. Fails only when no timerfd can be created.
    pub fn new(vm: Arc<VmFd>, routing: Arc<KvmRouting>) -> std::io::Result<Self> {
        let timer = Arc::new(Mutex::new(TimerFd::new()?));
        let remapping = Arc::new(OnceLock::new());
        let output = KvmIoapicOutput {
            vm,
            routing,
            timer: timer.clone(),
            remapping: remapping.clone(),
        };
        let ioapic = Arc::new(Mutex::new(Ioapic::new(Box::new(output))));
        Ok(Self {
            ioapic,
            timer,
            remapping,
        })
    }

    /// Puts the IOAPIC behind the VT-d's interrupt remapping (once; Err when it already is),
    /// and routes every pin through it.
    pub fn set_remapping(&self, remapping: IoapicRemapping) -> Result<(), IoapicRemapping> {
        self.remapping.set(remapping)?;
        lock(&self.ioapic).refresh_routes();
        Ok(())
    }

    /// The model, shared by the MMIO bus, the vCPUs (EOI exits) and the timer.
    pub fn shared(&self) -> &SharedIoapic {
        &self.ioapic
    }

    /// The storm guard's timer, for the event loop to poll.
    pub fn storm_timer(&self) -> IoapicTimer {
        let fd = lock_timer(&self.timer).as_raw_fd();
        IoapicTimer {
            timer: self.timer.clone(),
            fd,
            ioapic: self.ioapic.clone(),
        }
    }
}

/// Runs the IOAPIC's deferred service when the storm guard's timer fires.
pub struct IoapicTimer {
    timer: Arc<Mutex<TimerFd>>,
    /// The timer's descriptor, polled; it lives as long as `timer`.
    fd: RawFd,
    ioapic: SharedIoapic,
}

impl MutEventSubscriber for IoapicTimer {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        // Not under the IOAPIC's lock: the output arms the timer while holding it.
        if let Err(e) = lock_timer(&self.timer).wait() {
            warn_limited!("IOAPIC: reading the storm guard's timer failed: {e}");
        }
        lock(&self.ioapic).service_deferred();
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new_raw(self.fd, EventSet::IN)) {
            log::error!("cannot poll the IOAPIC's timer: {e:?}");
        }
    }
}
