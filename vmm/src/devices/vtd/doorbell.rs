//! Invalidation-queue tail writes taken by KVM instead of userspace (`--viommu queue=async`).
//!
//! A guest submits descriptors by writing IQT and then polls the wait descriptor's status in
//! its own memory. Trapping that write costs a round trip through the VMM's vCPU thread; with
//! one KVM ioeventfd per possible tail value (datamatch on the written value) the vCPU goes
//! straight back to the guest and the VMM's event loop carries the queue out. That is how
//! hardware behaves too (the queue runs asynchronously to the CPU); the one visible difference
//! is that IQT itself may read back stale until the event loop ran.
//!
//! Order is kept: every path that touches the unit's registers from a trapped write first
//! carries out the tail writes that rang before it (see [`super::VtdUnit::lock_in_order`]).

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};

use kvm_ioctls::{IoEventAddress, VmFd};
use vm_memory::GuestMemoryBackend;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use viommu::regs::{IQT_REG, IQ_INDEX_SHIFT};
use viommu::Vtd;

/// Tail values with a doorbell: the 256 entries of the smallest queue (IQA.QS = 0), the size
/// Linux uses. Tails beyond it still work, trapped as before.
pub const DOORBELL_TAILS: u64 = 256;

/// One eventfd per tail value, gathered in an epoll set whose fd the event loop watches.
pub struct QueueDoorbells {
    fds: Vec<EventFd>,
    epoll: Epoll,
    carried_out: AtomicU64,
}

impl QueueDoorbells {
    /// The eventfds and their epoll set, not yet known to KVM.
    pub fn new() -> io::Result<Self> {
        let epoll = Epoll::new()?;
        let mut fds = Vec::with_capacity(DOORBELL_TAILS as usize);
        for tail in 0..DOORBELL_TAILS {
            let fd = EventFd::new(libc::EFD_NONBLOCK)?;
            epoll.ctl(
                ControlOperation::Add,
                fd.as_raw_fd(),
                EpollEvent::new(EventSet::IN, tail),
            )?;
            fds.push(fd);
        }
        Ok(QueueDoorbells {
            fds,
            epoll,
            carried_out: AtomicU64::new(0),
        })
    }

    /// Asks KVM to signal the doorbell of tail `t` on a guest write of `t << 4` to IQT of the
    /// register block at `regs_base`, instead of exiting: 4-byte writes (Linux's `writel`) and
    /// 8-byte ones alike, since IQT's upper half is reserved and both mean the same tail.
    pub fn register(&self, vm: &VmFd, regs_base: u64) -> Result<(), kvm_ioctls::Error> {
        let addr = IoEventAddress::Mmio(regs_base + IQT_REG);
        for (tail, fd) in (0u32..).zip(&self.fds) {
            let value = tail << IQ_INDEX_SHIFT;
            vm.register_ioevent(fd, &addr, value)?;
            vm.register_ioevent(fd, &addr, u64::from(value))?;
        }
        Ok(())
    }

    /// The epoll set's fd: readable while any doorbell rang.
    pub fn as_raw_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// Tail writes carried out through doorbells so far.
    pub fn carried_out(&self) -> u64 {
        self.carried_out.load(Ordering::Relaxed)
    }

    /// Rings the doorbell of `tail` as KVM would.
    #[cfg(test)]
    fn ring(&self, tail: u64) -> io::Result<()> {
        let fd = self
            .fds
            .get(tail as usize)
            .ok_or(io::ErrorKind::InvalidInput)?;
        fd.write(1)
    }

    /// Carries out, on the locked unit, every tail write whose doorbell rang, in queue order
    /// from the current head (two writes can be pending when vCPUs submit concurrently; the
    /// later one is further from the head). Returns how many were carried out.
    pub fn drain<M: GuestMemoryBackend>(&self, vtd: &mut Vtd<M>) -> usize {
        let mut events = [EpollEvent::default(); DOORBELL_TAILS as usize];
        let ready = match self.epoll.wait(0, &mut events) {
            Ok(n) => n,
            Err(e) => {
                log::warn!("VT-d: cannot poll the queue doorbells: {e}");
                return 0;
            }
        };
        let mut tails: Vec<u64> = events[..ready]
            .iter()
            .map(|e| e.data())
            // Another thread may have taken it since the poll: only a successful read counts.
            .filter(|&t| self.fds.get(t as usize).is_some_and(|fd| fd.read().is_ok()))
            .collect();
        let (head, len) = vtd.queue_head_and_len();
        // Tails outside the queue go last, where the model reports them (IQE).
        tails.sort_by_key(|&t| {
            if t < len {
                (t + len).wrapping_sub(head) % len
            } else {
                len
            }
        });
        for &tail in &tails {
            vtd.mmio_write(IQT_REG, &(tail << IQ_INDEX_SHIFT).to_le_bytes());
        }
        self.carried_out
            .fetch_add(tails.len() as u64, Ordering::Relaxed);
        tails.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use viommu::descriptor::encode;
    use viommu::regs::IQH_REG;
    use viommu::testing::{mem, Driver, Mem, RecordingMsi, DRIVER_QUEUE, DRIVER_STATUS};
    use viommu::VtdConfig;
    use vm_memory::{Bytes, GuestAddress};

    /// A unit with queued invalidation on, and `n` wait descriptors queued (not submitted),
    /// wait `i` writing `i + 1` to its own status word.
    fn unit_with_waits(n: u64) -> (Vtd<Mem>, Mem) {
        let m = mem();
        let mut vtd = Vtd::new(
            VtdConfig::default(),
            m.clone(),
            Box::new(RecordingMsi::default()),
            Box::new(viommu::SystemClock::default()),
        )
        .expect("config");
        Driver::new().enable_qi(&mut vtd);
        for i in 0..n {
            let wait = encode::wait(Some((DRIVER_STATUS + 4 * i, i as u32 + 1)), false, false);
            m.write_obj(wait, GuestAddress(DRIVER_QUEUE + 16 * i))
                .expect("queue");
        }
        (vtd, m)
    }

    fn status(m: &Mem, i: u64) -> u32 {
        m.read_obj(GuestAddress(DRIVER_STATUS + 4 * i))
            .expect("status")
    }

    #[test]
    fn rung_tails_run_the_queue_in_order_whatever_order_they_are_polled() {
        let (mut vtd, m) = unit_with_waits(4);
        let bells = QueueDoorbells::new().expect("eventfds");
        // Two submissions (tails 2 then 4) rung before the event loop runs.
        bells.ring(4).expect("ring");
        bells.ring(2).expect("ring");
        assert_eq!(bells.drain(&mut vtd), 2);
        assert_eq!(Driver::read64(&vtd, IQH_REG) >> IQ_INDEX_SHIFT, 4);
        assert_eq!(
            (0..4).map(|i| status(&m, i)).collect::<Vec<_>>(),
            [1, 2, 3, 4]
        );
        assert_eq!(bells.drain(&mut vtd), 0, "nothing rings twice");
        assert_eq!(bells.carried_out(), 2);
    }

    #[test]
    fn a_doorbell_is_the_same_tail_write_as_a_trapped_one() {
        let (mut trapped, tm) = unit_with_waits(3);
        Driver::write64(&mut trapped, IQT_REG, 3 << IQ_INDEX_SHIFT);
        let (mut rung, rm) = unit_with_waits(3);
        let bells = QueueDoorbells::new().expect("eventfds");
        bells.ring(3).expect("ring");
        bells.drain(&mut rung);
        assert_eq!(trapped.stats(), rung.stats());
        for i in 0..3 {
            assert_eq!(status(&tm, i), status(&rm, i));
        }
        assert_eq!(
            Driver::read64(&trapped, IQH_REG),
            Driver::read64(&rung, IQH_REG)
        );
    }
}
