//! Why a VM stopped, and the shared handle through which devices and vCPUs say so.

use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

/// The reason a VM run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmExit {
    /// The guest powered off (ACPI S5 or a KVM shutdown system event).
    PowerOff,
    /// The guest asked for a reset; `cause` says through which path.
    Reboot {
        /// e.g. "ACPI reset register", "i8042 reset", "triple fault".
        cause: &'static str,
    },
    /// The guest kernel panicked (pvpanic or a KVM crash event).
    GuestPanic,
    /// A vCPU executed HLT with no in-kernel irqchip to wake it (small test guests).
    Halted,
    /// The guest wrote `value` to the isa-debug-exit port (test kernels report their result so).
    DebugExit {
        /// The value written.
        value: u32,
    },
    /// The VMM failed; the message says what and with which value.
    Failed(String),
}

impl VmExit {
    /// The process exit code for this outcome. isa-debug-exit gives QEMU's `(value << 1) | 1`,
    /// of which a process status keeps the low 8 bits.
    pub fn exit_code(&self) -> i32 {
        match self {
            VmExit::PowerOff | VmExit::Reboot { .. } | VmExit::Halted => 0,
            VmExit::GuestPanic | VmExit::Failed(_) => 1,
            VmExit::DebugExit { value } => ((value << 1 | 1) & 0xff) as i32,
        }
    }
}

/// Records the first exit request and wakes the VMM's event loop.
#[derive(Clone)]
pub struct ExitHandle {
    reason: Arc<Mutex<Option<VmExit>>>,
    event: Arc<EventFd>,
}

impl ExitHandle {
    /// A new handle; fails only when no eventfd can be created.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            reason: Arc::new(Mutex::new(None)),
            event: Arc::new(EventFd::new(libc::EFD_NONBLOCK)?),
        })
    }

    /// Requests the VM to stop. The first request wins: a panic that leads to a reset is
    /// reported as the panic.
    pub fn request(&self, exit: VmExit) {
        let mut reason = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if reason.is_none() {
            log::info!("VM exit requested: {exit:?}");
            *reason = Some(exit);
        }
        drop(reason);
        if let Err(e) = self.event.write(1) {
            log::error!("cannot signal the exit eventfd: {e}");
        }
    }

    /// The recorded exit, if any.
    pub fn reason(&self) -> Option<VmExit> {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The eventfd the event loop polls.
    pub fn event(&self) -> &EventFd {
        &self.event
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_request_wins() {
        let h = ExitHandle::new().unwrap();
        assert_eq!(h.reason(), None);
        h.request(VmExit::GuestPanic);
        h.request(VmExit::Reboot {
            cause: "triple fault",
        });
        assert_eq!(h.reason(), Some(VmExit::GuestPanic));
        assert_eq!(h.event().read().unwrap(), 2);
        assert_eq!(VmExit::PowerOff.exit_code(), 0);
        assert_eq!(VmExit::Failed("x".into()).exit_code(), 1);
    }
}
