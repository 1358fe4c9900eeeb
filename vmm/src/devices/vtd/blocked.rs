//! Signals KVM cannot deliver: while interrupt remapping blocks a route, KVM's routing table
//! hands the route's eventfds here ([`BlockedSignals`]) instead of letting KVM drop what they
//! signal. An epoll set of its own holds them; the event loop polls that set's descriptor and
//! [`BlockedSignalHandler`] turns each signal into the request it stands for, which the unit
//! blocks and records as a fault (or delivers, when the route translates again by then), as
//! the VT-d spec wants for every blocked request.

use std::collections::BTreeMap;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use kvm_ioctls::VmFd;
use passthrough::kvm::{BlockedSignals, SignalSource};
use vm_device::warn_limited;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet as EpollSet};
use vmm_sys_util::eventfd::EventFd;

use super::intremap::InterruptRemapping;
use super::SharedVtd;

/// Ready eventfds taken from the set at a time.
const EVENTS_AT_ONCE: usize = 32;

/// The eventfds of blocked routes, by GSI, in an epoll set.
pub struct BlockedSignalSet {
    epoll: Epoll,
    /// Duplicates of the eventfds (the table may drop its own meanwhile) and what each is for.
    watched: Mutex<BTreeMap<u32, (EventFd, SignalSource)>>,
}

impl BlockedSignalSet {
    pub fn new() -> std::io::Result<Arc<Self>> {
        Ok(Arc::new(BlockedSignalSet {
            epoll: Epoll::new()?,
            watched: Mutex::new(BTreeMap::new()),
        }))
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<u32, (EventFd, SignalSource)>> {
        self.watched.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// GSIs watched now.
    pub fn watched(&self) -> Vec<u32> {
        self.lock().keys().copied().collect()
    }

    /// Takes the signal pending on `gsi`'s eventfd, if any (several coalesced in its count
    /// are one request, as KVM's irqfd injects them once); returns what it was for.
    fn take(&self, gsi: u32) -> Option<SignalSource> {
        let watched = self.lock();
        let (fd, from) = watched.get(&gsi)?;
        fd.read().ok().map(|_| *from)
    }

    /// GSIs whose eventfds are readable now, without waiting.
    fn ready(&self) -> Vec<u32> {
        let mut events = [EpollEvent::default(); EVENTS_AT_ONCE];
        match self.epoll.wait(0, &mut events) {
            Ok(n) => events[..n].iter().map(|e| e.data() as u32).collect(),
            Err(e) => {
                warn_limited!("blocked interrupt signals: epoll_wait: {e}");
                Vec::new()
            }
        }
    }
}

impl AsRawFd for BlockedSignalSet {
    fn as_raw_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }
}

impl BlockedSignals for BlockedSignalSet {
    fn watch(&self, gsi: u32, source: SignalSource, fd: &EventFd) {
        let fd = match fd.try_clone() {
            Ok(fd) => fd,
            Err(e) => {
                warn_limited!("GSI {gsi}: cannot watch a blocked route's eventfd: {e}");
                return;
            }
        };
        let event = EpollEvent::new(EpollSet::IN, u64::from(gsi));
        if let Err(e) = self.epoll.ctl(ControlOperation::Add, fd.as_raw_fd(), event) {
            warn_limited!("GSI {gsi}: cannot watch a blocked route's eventfd: {e}");
            return;
        }
        self.lock().insert(gsi, (fd, source));
    }

    fn unwatch(&self, gsi: u32) {
        let Some((fd, _)) = self.lock().remove(&gsi) else {
            return;
        };
        let event = EpollEvent::default();
        if let Err(e) = self
            .epoll
            .ctl(ControlOperation::Delete, fd.as_raw_fd(), event)
        {
            warn_limited!("GSI {gsi}: cannot stop watching a blocked route's eventfd: {e}");
        }
    }
}

/// Takes the blocked signals on the event loop: each is a request through the unit.
pub struct BlockedSignalHandler {
    pub set: Arc<BlockedSignalSet>,
    pub remapping: Arc<InterruptRemapping>,
    pub vtd: SharedVtd,
    pub vm: Arc<VmFd>,
}

impl BlockedSignalHandler {
    /// Handles what is pending now; returns how many requests went to the unit.
    pub fn handle_pending(&self) -> usize {
        let mut requests = 0;
        for gsi in self.set.ready() {
            // Not under the set's lock: the unit's lock comes first (see `intremap`).
            if let Some(from) = self.set.take(gsi) {
                self.remapping
                    .request_blocked(&self.vtd, &self.vm, gsi, from);
                requests += 1;
            }
        }
        requests
    }
}

impl MutEventSubscriber for BlockedSignalHandler {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        self.handle_pending();
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new_raw(self.set.as_raw_fd(), EventSet::IN)) {
            log::error!("cannot watch blocked interrupt signals: {e:?}");
        }
    }
}
