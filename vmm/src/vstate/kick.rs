//! Kicking a vCPU thread out of KVM_RUN: a real-time signal whose handler sets the thread's
//! `kvm_run.immediate_exit` (KVM API, 5. "The kvm_run structure"). One kick stops a vCPU
//! whether it is inside KVM_RUN (the ioctl returns EINTR) or about to enter it (KVM_RUN then
//! returns EINTR at once instead of running the guest), so the VMM never has to kick again.

use std::cell::Cell;
use std::marker::PhantomData;
use std::sync::Mutex;

use kvm_bindings::kvm_run;

/// The signal handler could not be installed.
#[derive(Debug, thiserror::Error)]
#[error("cannot install the vCPU kick signal handler (signal {signal}): {source}")]
pub struct KickError {
    pub signal: libc::c_int,
    pub source: vmm_sys_util::errno::Error,
}

thread_local! {
    /// The `kvm_run` of the vCPU this thread runs, while it runs one.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// The signal that kicks vCPU threads out of KVM_RUN.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // `try_with`: a kick landing while the thread tears down its thread-locals does nothing.
    let _ = KVM_RUN.try_with(|run| {
        let run = run.get();
        if !run.is_null() {
            // SAFETY: a non-null pointer is the kvm_run mapping of the vCPU this thread is
            // running (set by `KickTarget::arm`, cleared before the vCPU can go away); the
            // handler runs on that thread, and KVM reads the field only at the next KVM_RUN.
            unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
        }
    });
}

/// Installs the handler for [`kick_signal`] (so the signal interrupts KVM_RUN instead of
/// killing the process). Installed once per process; a failed install is retried on the next
/// call rather than remembered as done.
pub fn install_kick_handler() -> Result<(), KickError> {
    static INSTALLED: Mutex<bool> = Mutex::new(false);
    install_once(&INSTALLED, || {
        vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_handler)
    })
}

fn install_once(
    installed: &Mutex<bool>,
    install: impl FnOnce() -> vmm_sys_util::errno::Result<()>,
) -> Result<(), KickError> {
    let mut done = installed.lock().unwrap_or_else(|e| e.into_inner());
    if !*done {
        install().map_err(|source| KickError {
            signal: kick_signal(),
            source,
        })?;
        *done = true;
    }
    Ok(())
}

/// While alive, kicks of the current thread make its vCPU's next (or current) KVM_RUN return.
pub(crate) struct KickTarget {
    /// Bound to the thread whose thread-local it set.
    _thread: PhantomData<*const ()>,
}

impl KickTarget {
    /// Points this thread's kicks at `run`, which must stay mapped while the target lives.
    pub(crate) fn arm(run: &mut kvm_run) -> Self {
        KVM_RUN.with(|r| r.set(run));
        KickTarget {
            _thread: PhantomData,
        }
    }
}

impl Drop for KickTarget {
    fn drop(&mut self) {
        KVM_RUN.with(|r| r.set(std::ptr::null_mut()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_install_is_retried_not_remembered_as_done() {
        let installed = Mutex::new(false);
        let mut calls = 0;
        let e = install_once(&installed, || {
            calls += 1;
            Err(vmm_sys_util::errno::Error::new(libc::EINVAL))
        })
        .unwrap_err();
        assert_eq!(e.source.errno(), libc::EINVAL);
        install_once(&installed, || {
            calls += 1;
            Ok(())
        })
        .expect("the second call installs");
        install_once(&installed, || {
            calls += 1;
            Ok(())
        })
        .expect("installed already");
        assert_eq!(calls, 2, "installed after the failure, then not again");
    }

    #[test]
    fn a_kick_sets_immediate_exit_of_the_armed_vcpu_only() {
        install_kick_handler().unwrap();
        // SAFETY: kvm_run is plain old data; all zeroes is a valid value.
        let mut run: kvm_run = unsafe { std::mem::zeroed() };
        // SAFETY: raising a signal whose handler is installed.
        unsafe { libc::raise(kick_signal()) };
        assert_eq!(run.immediate_exit, 0, "not armed: nothing to set");
        {
            let _target = KickTarget::arm(&mut run);
            // SAFETY: as above.
            unsafe { libc::raise(kick_signal()) };
        }
        // SAFETY: the handler ran synchronously on this thread (raise returns after it).
        let set = unsafe { std::ptr::addr_of!(run.immediate_exit).read_volatile() };
        assert_eq!(set, 1);
        run.immediate_exit = 0;
        // SAFETY: as above.
        unsafe { libc::raise(kick_signal()) };
        assert_eq!(run.immediate_exit, 0, "disarmed when the target went away");
    }
}
