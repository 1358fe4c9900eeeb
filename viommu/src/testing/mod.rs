//! Test doubles shared by unit tests, property tests, benchmarks and fuzz targets: a host that
//! behaves like VFIO type1, writers of the guest's translation tables (legacy in [`Tables`],
//! scalable mode and first-stage in [`ScalableTables`]) and a driver programming the unit the
//! way Linux does ([`Driver`]).

use std::collections::BTreeMap;

use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::host::{HostDma, HostDmaError, HostOp};
use crate::{Perm, PAGE_SIZE};

mod domains;
mod driver;
mod scalable;
mod tables;

pub use domains::{DomainHost, HostDomains, IDENTITY};
pub use driver::{Driver, DRIVER_QUEUE, DRIVER_STATUS};
pub use scalable::{FirstStageFlags, ScalableTables};
pub use tables::Tables;

// The errnos VFIO type1 answers with (Linux include/uapi/asm-generic/errno-base.h).
const EBUSY: i32 = 16;
const EEXIST: i32 = 17;
const EINVAL: i32 = 22;
const ENOSPC: i32 = 28;

/// Guest memory used by tests.
pub type Mem = GuestMemoryMmap<()>;

/// Size of the guest memory [`mem`] makes.
pub const TEST_MEM_SIZE: u64 = 64 << 20;
/// Where [`Tables`] starts allocating table pages; data pages used by tests sit below.
pub const TABLES_BASE: u64 = 40 << 20;

/// A guest memory of [`TEST_MEM_SIZE`] bytes at address 0.
pub fn mem() -> Mem {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), TEST_MEM_SIZE as usize)])
        .expect("anonymous test memory")
}

/// A host that keeps VFIO type1v2's rules: a map may not overlap an existing mapping, an unmap
/// removes whole mappings and refuses to cut one, and the number of mappings is limited.
#[derive(Clone, Debug)]
pub struct SimHost {
    maps: BTreeMap<u64, (u64, u64, Perm)>,
    limit: usize,
    pub map_calls: u64,
    pub unmap_calls: u64,
    /// Host mappings removed: the host IOTLB flushes VFIO type1 would issue.
    pub flushes: u64,
    /// Whether the host has a shared identity domain ([`HostDma::use_identity`]).
    shares_identity: bool,
    /// Whether the device is on the shared identity domain now.
    pub on_identity: bool,
    /// Each switch made: on or off, and how many mappings the device's own domain held then.
    pub switches: Vec<(bool, usize)>,
    /// Refuses this many switches back onto the device's own domain (EBUSY).
    pub refuse_switch_back: u32,
}

impl Default for SimHost {
    fn default() -> Self {
        Self::new()
    }
}

impl SimHost {
    /// A host with VFIO type1's default limit of 65535 mappings.
    pub fn new() -> Self {
        Self::with_limit(65535)
    }

    pub fn with_limit(limit: usize) -> Self {
        SimHost {
            maps: BTreeMap::new(),
            limit,
            map_calls: 0,
            unmap_calls: 0,
            flushes: 0,
            shares_identity: false,
            on_identity: false,
            switches: Vec::new(),
            refuse_switch_back: 0,
        }
    }

    /// A host that also has a shared identity domain, as the VMM's iommufd backend does.
    pub fn with_shared_identity() -> Self {
        SimHost {
            shares_identity: true,
            ..Self::new()
        }
    }

    /// Number of host mappings.
    pub fn mappings(&self) -> usize {
        self.maps.len()
    }

    /// The host mappings as (IOVA, length, guest-physical address, permissions), by IOVA.
    pub fn extents(&self) -> Vec<(u64, u64, u64, Perm)> {
        self.maps
            .iter()
            .map(|(&iova, &(len, gpa, perm))| (iova, len, gpa, perm))
            .collect()
    }

    /// What the host translates, page by page: IOVA to (guest-physical address, permissions).
    pub fn page_map(&self) -> BTreeMap<u64, (u64, Perm)> {
        let mut pages = BTreeMap::new();
        for (&iova, &(len, gpa, perm)) in &self.maps {
            for off in (0..len).step_by(PAGE_SIZE as usize) {
                pages.insert(iova + off, (gpa + off, perm));
            }
        }
        pages
    }

    /// The error VFIO type1 would return, as its errno.
    fn refuse(op: HostOp, iova: u64, len: u64, errno: i32) -> HostDmaError {
        HostDmaError::new(op, iova, len, std::io::Error::from_raw_os_error(errno))
    }
}

/// A host that accepts every call and does nothing, for timing the unit alone.
pub struct NullHost;

impl HostDma for NullHost {
    fn map(&mut self, _: u64, _: u64, _: u64, _: Perm) -> Result<(), HostDmaError> {
        Ok(())
    }
    fn unmap(&mut self, _: u64, _: u64) -> Result<(), HostDmaError> {
        Ok(())
    }
}

impl HostDma for SimHost {
    fn map(&mut self, iova: u64, gpa: u64, len: u64, perm: Perm) -> Result<(), HostDmaError> {
        self.map_calls += 1;
        let end = iova
            .checked_add(len)
            .ok_or_else(|| Self::refuse(HostOp::Map, iova, len, EINVAL))?;
        if len == 0 || !(iova | gpa | len).is_multiple_of(PAGE_SIZE) || perm.is_none() {
            return Err(Self::refuse(HostOp::Map, iova, len, EINVAL));
        }
        let overlaps = self
            .maps
            .range(..end)
            .next_back()
            .is_some_and(|(&k, &(l, _, _))| k + l > iova);
        if overlaps {
            return Err(Self::refuse(HostOp::Map, iova, len, EEXIST));
        }
        if self.maps.len() >= self.limit {
            return Err(Self::refuse(HostOp::Map, iova, len, ENOSPC));
        }
        self.maps.insert(iova, (len, gpa, perm));
        Ok(())
    }

    fn unmap(&mut self, iova: u64, len: u64) -> Result<(), HostDmaError> {
        self.unmap_calls += 1;
        let end = iova.saturating_add(len);
        let cut_start = self
            .maps
            .range(..iova)
            .next_back()
            .is_some_and(|(&k, &(l, _, _))| k + l > iova);
        let cut_end = self
            .maps
            .range(..end)
            .next_back()
            .is_some_and(|(&k, &(l, _, _))| k + l > end);
        if cut_start || cut_end {
            // Type1 refuses an unmap that would split a mapping.
            return Err(Self::refuse(HostOp::Unmap, iova, len, EINVAL));
        }
        let keys: Vec<u64> = self.maps.range(iova..end).map(|(&k, _)| k).collect();
        for k in &keys {
            self.maps.remove(k);
        }
        self.flushes += keys.len() as u64;
        Ok(())
    }

    fn use_identity(&mut self, on: bool) -> Result<bool, HostDmaError> {
        if !self.shares_identity {
            return Ok(false);
        }
        if !on && self.refuse_switch_back > 0 {
            self.refuse_switch_back -= 1;
            return Err(HostDmaError::switch(
                on,
                std::io::Error::from_raw_os_error(EBUSY),
            ));
        }
        self.on_identity = on;
        self.switches.push((on, self.maps.len()));
        Ok(true)
    }
}

/// A [`SimHost`] the test keeps a handle to after giving the unit a [`HostDma`].
#[derive(Clone, Default)]
pub struct SharedHost(pub std::sync::Arc<std::sync::Mutex<SimHost>>);

impl SharedHost {
    pub fn new(host: SimHost) -> Self {
        SharedHost(std::sync::Arc::new(std::sync::Mutex::new(host)))
    }

    pub fn get(&self) -> std::sync::MutexGuard<'_, SimHost> {
        // A poisoned lock means another test thread panicked: that test reports the failure.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl HostDma for SharedHost {
    fn map(&mut self, iova: u64, gpa: u64, len: u64, perm: Perm) -> Result<(), HostDmaError> {
        self.get().map(iova, gpa, len, perm)
    }

    fn unmap(&mut self, iova: u64, len: u64) -> Result<(), HostDmaError> {
        self.get().unmap(iova, len)
    }

    fn use_identity(&mut self, on: bool) -> Result<bool, HostDmaError> {
        self.get().use_identity(on)
    }
}

/// An [`crate::MsiSink`] that records the messages sent.
#[derive(Clone, Default)]
pub struct RecordingMsi(pub std::sync::Arc<std::sync::Mutex<Vec<(u64, u32)>>>);

impl RecordingMsi {
    pub fn take(&self) -> Vec<(u64, u32)> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl crate::MsiSink for RecordingMsi {
    fn send(&self, addr: u64, data: u32) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((addr, data));
    }
}

/// A [`crate::Clock`] that moves only when told to.
#[derive(Clone, Default)]
pub struct ManualClock(pub std::sync::Arc<std::sync::atomic::AtomicU64>);

impl ManualClock {
    pub fn advance(&self, d: std::time::Duration) {
        self.0
            .fetch_add(d.as_nanos() as u64, std::sync::atomic::Ordering::SeqCst);
    }
}

impl crate::Clock for ManualClock {
    fn now(&self) -> std::time::Duration {
        std::time::Duration::from_nanos(self.0.load(std::sync::atomic::Ordering::SeqCst))
    }
}
