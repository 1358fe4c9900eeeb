//! Suspend to RAM (ACPI S3): the machine's sleep state, shared by what puts it to sleep (the
//! PM1 control register), the vCPUs (which stop running guest code while it sleeps) and the
//! VMM's event loop (which gets every vCPU out of the guest, then wakes the machine when a wake
//! event comes).
//!
//! A wake is a platform reset that keeps memory: each vCPU comes back in its reset state, the
//! boot vCPU at the waking vector the OS left in the FACS, in real mode, as firmware would jump
//! to it (ACPI 6.4, 16.3.2 "System Resume").

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;

/// How long a parked vCPU waits before looking at its stop flag again.
const PARK_POLL: Duration = Duration::from_millis(50);

/// Where the boot vCPU resumes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resume {
    waking_vector: u32,
}

impl Resume {
    /// Resuming at the FACS firmware waking vector `v`, a real-mode address below 1 MiB (ACPI
    /// 6.4, 5.2.10: CS = v >> 4, IP = v & 0xf). `None` for 0 (the OS left none: firmware
    /// reboots instead) or an address real mode cannot reach.
    pub fn at_waking_vector(v: u32) -> Option<Self> {
        (v != 0 && v < 1 << 20).then_some(Self { waking_vector: v })
    }

    /// The vector.
    pub fn waking_vector(&self) -> u32 {
        self.waking_vector
    }

    /// CS's selector.
    pub fn cs(&self) -> u16 {
        (self.waking_vector >> 4) as u16
    }

    /// IP.
    pub fn ip(&self) -> u16 {
        (self.waking_vector & 0xf) as u16
    }
}

#[derive(Debug, Default)]
struct State {
    asleep: bool,
    /// vCPUs parked in [`SleepHandle::park`].
    parked: usize,
    /// Bumped by every wake, so a parked vCPU knows the wake it saw.
    wakes: u64,
    resume: Option<Resume>,
}

struct Shared {
    /// `state.asleep`, readable without the lock: vCPUs look at it after every exit.
    asleep: AtomicBool,
    state: Mutex<State>,
    changed: Condvar,
    /// Tells the event loop the machine went to sleep.
    event: EventFd,
}

/// A shared handle on the sleep state.
#[derive(Clone)]
pub struct SleepHandle(Arc<Shared>);

impl SleepHandle {
    /// An awake machine; fails only when no eventfd can be created.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self(Arc::new(Shared {
            asleep: AtomicBool::new(false),
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            event: EventFd::new(libc::EFD_NONBLOCK)?,
        })))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.0.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Puts the machine to sleep. The caller (a vCPU in a port write) parks at its next check;
    /// the event loop, woken through [`SleepHandle::event`], gets the other vCPUs out.
    pub fn suspend(&self) {
        let mut s = self.lock();
        if s.asleep {
            return;
        }
        s.asleep = true;
        s.resume = None;
        self.0.asleep.store(true, Ordering::Release);
        drop(s);
        vm_device::info_limited!("guest entered S3");
        if let Err(e) = self.0.event.write(1) {
            log::error!("cannot signal the sleep eventfd: {e}");
        }
    }

    /// Whether the machine sleeps.
    pub fn is_asleep(&self) -> bool {
        self.0.asleep.load(Ordering::Acquire)
    }

    /// How many vCPUs are parked.
    pub fn parked(&self) -> usize {
        self.lock().parked
    }

    /// Wakes the machine: parked vCPUs return from [`SleepHandle::park`] with `resume`.
    pub fn wake(&self, resume: Resume) {
        let mut s = self.lock();
        if !s.asleep {
            return;
        }
        s.asleep = false;
        self.0.asleep.store(false, Ordering::Release);
        s.wakes += 1;
        s.resume = Some(resume);
        drop(s);
        vm_device::info_limited!("guest wakes from S3 at {:#x}", resume.waking_vector());
        self.0.changed.notify_all();
    }

    /// Called by a vCPU thread outside the guest: while the machine sleeps, blocks (until it
    /// wakes or `stop` is set). `None`: the machine was awake, or the VM is stopping; otherwise
    /// where the machine resumes, for the vCPU to reset itself.
    pub fn park(&self, stop: &AtomicBool) -> Option<Resume> {
        let mut s = self.lock();
        if !s.asleep {
            return None;
        }
        let wakes = s.wakes;
        s.parked += 1;
        while s.wakes == wakes && !stop.load(Ordering::Acquire) {
            s = self
                .0
                .changed
                .wait_timeout(s, PARK_POLL)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        s.parked -= 1;
        if s.wakes == wakes {
            return None;
        }
        s.resume
    }

    /// Readable (then drain it) when the machine has gone to sleep.
    pub fn event(&self) -> &EventFd {
        &self.0.event
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vcpus_park_until_the_wake_and_learn_where_to_resume() {
        let sleep = SleepHandle::new().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        assert_eq!(sleep.park(&stop), None, "awake: no parking");
        sleep.suspend();
        assert!(sleep.is_asleep());
        assert_eq!(sleep.event().read().unwrap(), 1);
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let (s, stop) = (sleep.clone(), stop.clone());
                std::thread::spawn(move || s.park(&stop))
            })
            .collect();
        while sleep.parked() < 2 {
            std::thread::sleep(Duration::from_millis(1));
        }
        let resume = Resume::at_waking_vector(0x1000).unwrap();
        assert_eq!((resume.cs(), resume.ip()), (0x100, 0));
        sleep.wake(resume);
        for t in threads {
            assert_eq!(t.join().unwrap(), Some(resume));
        }
        assert!(!sleep.is_asleep());
        assert_eq!(sleep.parked(), 0);
    }

    #[test]
    fn waking_vectors_must_be_real_mode_addresses() {
        assert_eq!(Resume::at_waking_vector(0), None);
        assert_eq!(Resume::at_waking_vector(1 << 20), None);
        let r = Resume::at_waking_vector(0x9_fc05).unwrap();
        assert_eq!((r.cs(), r.ip()), (0x9fc0, 5));
    }

    #[test]
    fn stopping_the_vm_releases_parked_vcpus() {
        let sleep = SleepHandle::new().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        sleep.suspend();
        let (s, st) = (sleep.clone(), stop.clone());
        let t = std::thread::spawn(move || s.park(&st));
        while sleep.parked() < 1 {
            std::thread::sleep(Duration::from_millis(1));
        }
        stop.store(true, Ordering::Release);
        assert_eq!(t.join().unwrap(), None);
        assert!(sleep.is_asleep(), "stopping is not waking");
    }
}
