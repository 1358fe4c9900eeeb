//! The wall-clock time the unit's host DMA calls take (VFIO map and unmap ioctls, domain
//! switches), so `--stats-json` can split the VMM's own time per register write into the host's
//! share and the rest (the engine, and waiting for the unit's lock).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use vm_device::dma::{HostDma, HostDmaError, Perm};

/// Host DMA calls made for the devices behind one unit, and the nanoseconds they took.
#[derive(Debug, Default)]
pub struct HostDmaTime {
    calls: AtomicU64,
    ns: AtomicU64,
}

impl HostDmaTime {
    /// Calls so far, and the nanoseconds spent in them.
    pub fn get(&self) -> (u64, u64) {
        (
            self.calls.load(Ordering::Relaxed),
            self.ns.load(Ordering::Relaxed),
        )
    }

    fn add(&self, start: Instant) {
        let ns = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.ns.fetch_add(ns, Ordering::Relaxed);
    }
}

/// A device's host DMA whose calls count into a [`HostDmaTime`].
pub struct TimedHostDma {
    inner: Box<dyn HostDma>,
    time: Arc<HostDmaTime>,
}

impl TimedHostDma {
    pub fn new(inner: Box<dyn HostDma>, time: Arc<HostDmaTime>) -> Self {
        TimedHostDma { inner, time }
    }

    fn timed<T>(&mut self, call: impl FnOnce(&mut dyn HostDma) -> T) -> T {
        let start = Instant::now();
        let result = call(self.inner.as_mut());
        self.time.add(start);
        result
    }
}

impl HostDma for TimedHostDma {
    fn map(&mut self, iova: u64, gpa: u64, len: u64, perm: Perm) -> Result<(), HostDmaError> {
        self.timed(|h| h.map(iova, gpa, len, perm))
    }

    fn unmap(&mut self, iova: u64, len: u64) -> Result<(), HostDmaError> {
        self.timed(|h| h.unmap(iova, len))
    }

    fn use_identity(&mut self, on: bool) -> Result<bool, HostDmaError> {
        self.timed(|h| h.use_identity(on))
    }

    fn own_domain(&self) -> Option<u32> {
        self.inner.own_domain()
    }

    fn use_domain(&mut self, domain: Option<u32>) -> Result<bool, HostDmaError> {
        self.timed(|h| h.use_domain(domain))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A host that takes a known time per call and records what it was asked.
    struct Slow(Vec<&'static str>);

    impl HostDma for Slow {
        fn map(&mut self, _: u64, _: u64, _: u64, _: Perm) -> Result<(), HostDmaError> {
            std::thread::sleep(std::time::Duration::from_millis(2));
            self.0.push("map");
            Ok(())
        }
        fn unmap(&mut self, _: u64, _: u64) -> Result<(), HostDmaError> {
            self.0.push("unmap");
            Err(HostDmaError::new(
                vm_device::dma::HostOp::Unmap,
                0,
                0x1000,
                std::io::Error::from_raw_os_error(22),
            ))
        }
        fn use_identity(&mut self, on: bool) -> Result<bool, HostDmaError> {
            Ok(on)
        }
    }

    #[test]
    fn every_call_is_passed_through_and_counted_with_its_time_failures_too() {
        let time = Arc::new(HostDmaTime::default());
        let mut host = TimedHostDma::new(Box::new(Slow(Vec::new())), time.clone());
        host.map(0, 0, 0x1000, Perm::RW).unwrap();
        assert!(
            host.unmap(0, 0x1000).is_err(),
            "the host's answer, as it was"
        );
        assert!(host.use_identity(true).unwrap());
        let (calls, ns) = time.get();
        assert_eq!(calls, 3);
        assert!(ns >= 2_000_000, "the map's 2 ms are in: {ns} ns");
    }
}
