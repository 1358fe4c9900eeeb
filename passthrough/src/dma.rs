//! The host DMA trait (`vm-device`) over a host IOMMU address space: guest-physical addresses
//! become host virtual addresses through guest memory, and each map or unmap is one ioctl of
//! [`DmaIoctls`]: VFIO_IOMMU_MAP_DMA / UNMAP_DMA on a type1 container (here), IOMMU_IOAS_MAP /
//! UNMAP on an iommufd IOAS ([`crate::iommufd::IoasDma`]).
//!
//! One implementation serves every case: without a vIOMMU the VMM maps all guest RAM once
//! with IOVA = GPA ([`HostDmaMappings::map_guest_ram`]); behind the viommu engine, the engine
//! calls `map`/`unmap` as the guest's tables change. Every mapping still held is removed on
//! drop, so no pinned memory outlives the VM.

use std::collections::BTreeMap;
use std::sync::Arc;

use vfio_bindings::bindings::vfio::{
    vfio_iommu_type1_dma_map, vfio_iommu_type1_dma_unmap, VFIO_BASE, VFIO_DMA_MAP_FLAG_READ,
    VFIO_DMA_MAP_FLAG_WRITE, VFIO_TYPE,
};
use vfio_ioctls::VfioContainer;
use vm_device::dma::{HostDma, HostDmaError, HostOp, Perm};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

// linux/vfio.h: VFIO_IOMMU_MAP_DMA = _IO(VFIO_TYPE, VFIO_BASE + 13), UNMAP = + 14.
vmm_sys_util::ioctl_io_nr!(VFIO_IOMMU_MAP_DMA, VFIO_TYPE as u32, VFIO_BASE + 13);
vmm_sys_util::ioctl_io_nr!(VFIO_IOMMU_UNMAP_DMA, VFIO_TYPE as u32, VFIO_BASE + 14);

/// Why the host refused a map or an unmap (the source of a [`HostDmaError`]).
#[derive(Debug, thiserror::Error)]
pub enum MappingError {
    /// A map with no bytes or no permission says nothing to the host.
    #[error("nothing to map ({len:#x} bytes, permissions {perm:?})")]
    Empty { len: u64, perm: Perm },
    /// The guest-physical address is not guest RAM.
    #[error("GPA {gpa:#x} is not guest RAM")]
    NotGuestRam { gpa: u64 },
    /// The range starts in guest RAM but runs past the end of its region.
    #[error("GPA {gpa:#x}+{len:#x} runs past its RAM region ({region_len:#x} bytes at {region_start:#x})")]
    PastRegion {
        gpa: u64,
        len: u64,
        region_start: u64,
        region_len: u64,
    },
    /// The RAM region has no host mapping to hand to the device.
    #[error("GPA {gpa:#x} has no host address: {source}")]
    NoHostAddress {
        gpa: u64,
        source: vm_memory::GuestMemoryError,
    },
    /// The kernel refused the ioctl.
    #[error("{ioctl}: {source}")]
    Ioctl {
        ioctl: &'static str,
        source: std::io::Error,
    },
}

/// The map and unmap ioctls of one host IOMMU address space (a type1 container or an iommufd
/// IOAS implements them; tests fake them). Flags are VFIO's whatever the backend, so the
/// bookkeeping above them is shared.
pub trait DmaIoctls: Send {
    /// The map ioctl's name, for errors.
    const MAP: &'static str;
    /// The unmap ioctl's name, for errors.
    const UNMAP: &'static str;

    /// Maps `size` bytes of our memory at `vaddr` to `iova` with VFIO_DMA_MAP_FLAG_* `flags`.
    ///
    /// # Safety
    /// `vaddr..vaddr + size` must be memory that stays mapped until unmapped here and that
    /// nothing in this process holds a Rust reference to (the device reads and writes it).
    unsafe fn map_dma(&self, iova: u64, vaddr: u64, size: u64, flags: u32) -> std::io::Result<()>;

    /// Removes the mappings inside `[iova, iova + size)`; returns the bytes unmapped.
    fn unmap_dma(&self, iova: u64, size: u64) -> std::io::Result<u64>;
}

impl DmaIoctls for Arc<VfioContainer> {
    const MAP: &'static str = "VFIO_IOMMU_MAP_DMA";
    const UNMAP: &'static str = "VFIO_IOMMU_UNMAP_DMA";

    unsafe fn map_dma(&self, iova: u64, vaddr: u64, size: u64, flags: u32) -> std::io::Result<()> {
        let arg = vfio_iommu_type1_dma_map {
            argsz: std::mem::size_of::<vfio_iommu_type1_dma_map>() as u32,
            flags,
            vaddr,
            iova,
            size,
        };
        // SAFETY: the container fd is valid and `arg` is a well-formed argument; the caller
        // vouches for the memory.
        let ret = unsafe {
            vmm_sys_util::ioctl::ioctl_with_ref(self.as_ref(), VFIO_IOMMU_MAP_DMA(), &arg)
        };
        if ret != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    fn unmap_dma(&self, iova: u64, size: u64) -> std::io::Result<u64> {
        let mut arg = vfio_iommu_type1_dma_unmap {
            argsz: std::mem::size_of::<vfio_iommu_type1_dma_unmap>() as u32,
            flags: 0,
            iova,
            size,
            ..Default::default()
        };
        // SAFETY: valid fd, well-formed argument the kernel updates with the size unmapped.
        let ret = unsafe {
            vmm_sys_util::ioctl::ioctl_with_mut_ref(self.as_ref(), VFIO_IOMMU_UNMAP_DMA(), &mut arg)
        };
        if ret != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(arg.size)
    }
}

/// Host DMA mappings of one host IOMMU address space (container or IOAS) over guest memory `M`.
pub struct HostDmaMappings<C: DmaIoctls, M: GuestMemoryBackend> {
    ioctls: C,
    mem: M,
    /// Live mappings: IOVA -> length.
    mappings: BTreeMap<u64, u64>,
}

impl<C: DmaIoctls, M: GuestMemoryBackend + Send> HostDmaMappings<C, M> {
    pub fn new(ioctls: C, mem: M) -> Self {
        Self {
            ioctls,
            mem,
            mappings: BTreeMap::new(),
        }
    }

    /// Maps every guest RAM region at IOVA = GPA, read-write: the device may reach all of
    /// guest RAM, as with no IOMMU at all.
    pub fn map_guest_ram(&mut self) -> Result<(), HostDmaError> {
        let regions: Vec<(u64, u64)> = self
            .mem
            .iter()
            .map(|r| (r.start_addr().0, r.len()))
            .collect();
        for (gpa, len) in regions {
            self.map(gpa, gpa, len, Perm::RW)?;
        }
        Ok(())
    }

    /// Removes every mapping still held (what [`HostDmaMappings::map_guest_ram`] made, say).
    pub fn unmap_all(&mut self) -> Result<(), HostDmaError> {
        let all: Vec<(u64, u64)> = self.mappings().collect();
        for (iova, len) in all {
            self.unmap(iova, len)?;
        }
        Ok(())
    }

    /// Live mappings (IOVA, length), for tests and diagnostics.
    pub fn mappings(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.mappings.iter().map(|(&a, &l)| (a, l))
    }

    /// Whether a live mapping overlaps `[iova, end)`.
    fn intersects(&self, iova: u64, end: u64) -> bool {
        let before = self.mappings.range(..iova).next_back();
        before.is_some_and(|(&a, &l)| a.saturating_add(l) > iova)
            || self.mappings.range(iova..end).next().is_some()
    }

    fn host_address(&self, gpa: u64, len: u64) -> Result<u64, MappingError> {
        let region = self
            .mem
            .find_region(GuestAddress(gpa))
            .ok_or(MappingError::NotGuestRam { gpa })?;
        let off = gpa - region.start_addr().0;
        if off.checked_add(len).is_none_or(|end| end > region.len()) {
            return Err(MappingError::PastRegion {
                gpa,
                len,
                region_start: region.start_addr().0,
                region_len: region.len(),
            });
        }
        region
            .get_host_address(MemoryRegionAddress(off))
            .map(|p| p as u64)
            .map_err(|source| MappingError::NoHostAddress { gpa, source })
    }
}

impl<C: DmaIoctls, M: GuestMemoryBackend + Send> HostDma for HostDmaMappings<C, M> {
    fn map(&mut self, iova: u64, gpa: u64, len: u64, perm: Perm) -> Result<(), HostDmaError> {
        let err = |source: MappingError| HostDmaError::new(HostOp::Map, iova, len, source);
        if len == 0 || perm.is_none() {
            return Err(err(MappingError::Empty { len, perm }));
        }
        let vaddr = self.host_address(gpa, len).map_err(err)?;
        let mut flags = 0;
        if perm.read {
            flags |= VFIO_DMA_MAP_FLAG_READ;
        }
        if perm.write {
            flags |= VFIO_DMA_MAP_FLAG_WRITE;
        }
        // SAFETY: `vaddr..vaddr + len` lies inside one guest RAM region, mapped for the VM's
        // lifetime; guest memory is only ever accessed through volatile copies, and every
        // mapping is removed before this value (and the memory it borrows) goes away.
        unsafe { self.ioctls.map_dma(iova, vaddr, len, flags) }.map_err(|source| {
            err(MappingError::Ioctl {
                ioctl: C::MAP,
                source,
            })
        })?;
        self.mappings.insert(iova, len);
        Ok(())
    }

    fn unmap(&mut self, iova: u64, len: u64) -> Result<(), HostDmaError> {
        let end = iova.saturating_add(len);
        // Every host mapping went through `map`: a range holding none of them has nothing to
        // remove, and IOMMU_IOAS_UNMAP fails such a range with ENOENT where type1 returns 0.
        if !self.intersects(iova, end) {
            return Ok(());
        }
        let done = self.ioctls.unmap_dma(iova, len).map_err(|source| {
            let cause = MappingError::Ioctl {
                ioctl: C::UNMAP,
                source,
            };
            HostDmaError::new(HostOp::Unmap, iova, len, cause)
        })?;
        let inside: Vec<u64> = self
            .mappings
            .range(iova..end)
            .filter(|(&a, &l)| a.saturating_add(l) <= end)
            .map(|(&a, _)| a)
            .collect();
        let expected: u64 = inside.iter().filter_map(|a| self.mappings.remove(a)).sum();
        if done != expected {
            // The guest's IOMMU programming drives unmaps: bound what it can make us log.
            vm_device::warn_limited!(
                "{} {iova:#x}+{len:#x} removed {done:#x} bytes, we tracked {expected:#x}",
                C::UNMAP
            );
        }
        Ok(())
    }
}

impl<C: DmaIoctls, M: GuestMemoryBackend> Drop for HostDmaMappings<C, M> {
    fn drop(&mut self) {
        for (iova, len) in std::mem::take(&mut self.mappings) {
            if let Err(e) = self.ioctls.unmap_dma(iova, len) {
                log::error!("{} {iova:#x}+{len:#x} at exit: {e}", C::UNMAP);
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Mutex;

    use vm_memory::GuestMemoryMmap;

    use super::*;

    /// IOVA -> (size, vaddr, flags).
    type Type1Map = BTreeMap<u64, (u64, u64, u32)>;

    /// Type1 rules: no overlap on map; unmap removes whole mappings inside the range.
    #[derive(Clone, Default)]
    struct FakeType1(Arc<Mutex<Type1Map>>);

    impl DmaIoctls for FakeType1 {
        const MAP: &'static str = "MAP";
        const UNMAP: &'static str = "UNMAP";

        unsafe fn map_dma(
            &self,
            iova: u64,
            vaddr: u64,
            size: u64,
            flags: u32,
        ) -> std::io::Result<()> {
            let mut m = self.0.lock().unwrap();
            if m.iter()
                .any(|(&a, &(l, _, _))| iova < a + l && a < iova + size)
            {
                return Err(std::io::Error::from_raw_os_error(libc::EEXIST));
            }
            m.insert(iova, (size, vaddr, flags));
            Ok(())
        }

        fn unmap_dma(&self, iova: u64, size: u64) -> std::io::Result<u64> {
            let mut m = self.0.lock().unwrap();
            let gone: Vec<u64> = m
                .iter()
                .filter(|(&a, &(l, _, _))| a >= iova && a + l <= iova + size)
                .map(|(&a, _)| a)
                .collect();
            Ok(gone
                .iter()
                .filter_map(|a| m.remove(a))
                .map(|(l, _, _)| l)
                .sum())
        }
    }

    /// Two RAM regions, below and above 4 GiB.
    pub(crate) fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x10_0000),
            (GuestAddress(0x1_0000_0000), 0x10_0000),
        ])
        .unwrap()
    }

    #[test]
    fn guest_ram_is_mapped_at_iova_equal_gpa_to_its_host_address() {
        let host = FakeType1::default();
        let m = mem();
        let hva = m.get_host_address(GuestAddress(0x1_0000_0000)).unwrap() as u64;
        let mut dma = HostDmaMappings::new(host.clone(), m);
        dma.map_guest_ram().unwrap();
        let maps = host.0.lock().unwrap().clone();
        assert_eq!(maps.len(), 2);
        assert_eq!(
            maps[&0x1_0000_0000],
            (
                0x10_0000,
                hva,
                VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE
            )
        );
    }

    #[test]
    fn unmap_all_removes_guest_ram_and_it_can_be_mapped_again() {
        let host = FakeType1::default();
        let mut dma = HostDmaMappings::new(host.clone(), mem());
        dma.map_guest_ram().unwrap();
        dma.unmap_all().unwrap();
        assert!(host.0.lock().unwrap().is_empty());
        assert_eq!(dma.mappings().count(), 0);
        dma.map_guest_ram().unwrap();
        assert_eq!(host.0.lock().unwrap().len(), 2);
    }

    #[test]
    fn permissions_become_map_flags_and_none_is_refused() {
        let host = FakeType1::default();
        let mut dma = HostDmaMappings::new(host.clone(), mem());
        dma.map(0x5000, 0x2000, 0x1000, Perm::READ).unwrap();
        assert_eq!(host.0.lock().unwrap()[&0x5000].2, VFIO_DMA_MAP_FLAG_READ);
        assert!(dma.map(0x9000, 0x2000, 0x1000, Perm::NONE).is_err());
    }

    #[test]
    fn gpa_outside_ram_or_across_a_region_end_is_an_error_naming_it() {
        let mut dma = HostDmaMappings::new(FakeType1::default(), mem());
        let e = dma.map(0, 0x8000_0000, 0x1000, Perm::RW).unwrap_err();
        assert!(
            e.to_string().contains("GPA 0x80000000 is not guest RAM"),
            "{e}"
        );
        let e = dma.map(0, 0xff000, 0x2000, Perm::RW).unwrap_err();
        assert!(e.to_string().contains("runs past"), "{e}");
        assert_eq!(dma.mappings().count(), 0);
    }

    #[test]
    fn unmap_removes_whole_mappings_in_range_and_drop_releases_the_rest() {
        let host = FakeType1::default();
        let mut dma = HostDmaMappings::new(host.clone(), mem());
        for i in 0..4u64 {
            dma.map(i * 0x1000, i * 0x1000, 0x1000, Perm::RW).unwrap();
        }
        dma.unmap(0x1000, 0x2000).unwrap();
        assert_eq!(
            dma.mappings().collect::<Vec<_>>(),
            vec![(0, 0x1000), (0x3000, 0x1000)]
        );
        assert_eq!(host.0.lock().unwrap().len(), 2);
        drop(dma);
        assert!(host.0.lock().unwrap().is_empty(), "nothing stays pinned");
    }
}
