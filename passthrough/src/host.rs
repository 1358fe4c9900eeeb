//! The real VFIO device behind [`VfioAccess`], and mmaps of its BAR regions.

use std::os::unix::io::AsRawFd;
use std::sync::Arc;

use vfio_bindings::bindings::vfio::{
    VFIO_REGION_INFO_FLAG_MMAP, VFIO_REGION_INFO_FLAG_READ, VFIO_REGION_INFO_FLAG_WRITE,
};
use vfio_ioctls::{VfioDevice, VfioRegionInfoCap};
use vmm_sys_util::eventfd::EventFd;

use crate::access::{IrqKind, IrqSetError, MmapArea, RegionInfo, VfioAccess, CONFIG_REGION};
use crate::setup::SetupError;

/// Regions a VFIO PCI device has at most (BARs, ROM, config, VGA).
const PCI_REGIONS: u32 = 9;

/// A host PCI function opened through VFIO.
pub struct HostDevice {
    bdf: String,
    /// Shared with the host DMA of the device's domain when that must re-attach it
    /// ([`crate::identity::IoasSwitch`]).
    device: Arc<VfioDevice>,
}

impl HostDevice {
    pub(crate) fn new(bdf: String, device: VfioDevice) -> Result<Self, SetupError> {
        let d = Self {
            bdf,
            device: Arc::new(device),
        };
        if d.region(CONFIG_REGION).is_none() {
            return Err(SetupError::NoConfigRegion { bdf: d.bdf });
        }
        Ok(d)
    }

    /// The host address, DDDD:BB:DD.F.
    pub fn bdf(&self) -> &str {
        &self.bdf
    }

    /// The VFIO device, for what attaches it to another iommufd IOAS later.
    pub fn vfio_device(&self) -> Arc<VfioDevice> {
        self.device.clone()
    }

    /// Maps `area` of region `index` into our address space (shared with the device).
    pub fn mmap(&self, index: u32, area: MmapArea) -> Result<BarMapping, std::io::Error> {
        let region = self
            .region(index)
            .ok_or_else(|| std::io::Error::other(format!("{}: no region {index}", self.bdf)))?;
        let end = area.offset.checked_add(area.size);
        if end.is_none_or(|e| e > region.size) || area.size == 0 {
            return Err(std::io::Error::other(format!(
                "{}: area {:#x}+{:#x} outside region {index} ({:#x} bytes)",
                self.bdf, area.offset, area.size, region.size
            )));
        }
        let len = usize::try_from(area.size).map_err(std::io::Error::other)?;
        let offset =
            libc::off_t::try_from(region.fd_offset + area.offset).map_err(std::io::Error::other)?;
        // SAFETY: a fresh shared mapping of the device fd at an offset VFIO gave us; the
        // kernel checks the range. Nothing in this process aliases it.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                self.device.as_raw_fd(),
                offset,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(BarMapping {
            addr: addr.cast(),
            len,
        })
    }
}

/// A BAR area mapped into this process; unmapped on drop.
#[derive(Debug)]
pub struct BarMapping {
    addr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain shared memory owned by this value.
unsafe impl Send for BarMapping {}

impl BarMapping {
    /// Host virtual address (for a KVM memory slot).
    pub fn host_addr(&self) -> u64 {
        self.addr as u64
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for BarMapping {
    fn drop(&mut self) {
        // SAFETY: we mapped exactly this range and nobody else unmaps it.
        unsafe { libc::munmap(self.addr.cast(), self.len) };
    }
}

fn irq_err(kind: IrqKind, count: usize) -> impl FnOnce(vfio_ioctls::VfioError) -> IrqSetError {
    move |source| IrqSetError {
        kind,
        count,
        source,
    }
}

impl VfioAccess for HostDevice {
    fn region(&self, index: u32) -> Option<RegionInfo> {
        if index >= PCI_REGIONS {
            return None;
        }
        let size = self.device.get_region_size(index);
        if size == 0 {
            return None;
        }
        let flags = self.device.get_region_flags(index);
        let caps = self.device.get_region_caps(index);
        let mut mmap_areas = Vec::new();
        if flags & VFIO_REGION_INFO_FLAG_MMAP != 0 {
            let sparse = caps.iter().find_map(|c| match c {
                VfioRegionInfoCap::SparseMmap(s) => Some(s),
                _ => None,
            });
            match sparse {
                Some(s) => mmap_areas.extend(s.areas.iter().map(|a| MmapArea {
                    offset: a.offset,
                    size: a.size,
                })),
                None => mmap_areas.push(MmapArea { offset: 0, size }),
            }
        }
        Some(RegionInfo {
            size,
            fd_offset: self.device.get_region_offset(index),
            readable: flags & VFIO_REGION_INFO_FLAG_READ != 0,
            writable: flags & VFIO_REGION_INFO_FLAG_WRITE != 0,
            mmap_areas,
            msix_mappable: caps.contains(&VfioRegionInfoCap::MsixMappable),
        })
    }

    fn read(&self, index: u32, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        self.device.region_read(index, data, offset);
    }

    fn write(&self, index: u32, offset: u64, data: &[u8]) {
        self.device.region_write(index, data, offset);
    }

    fn irq_count(&self, kind: IrqKind) -> u32 {
        self.device
            .get_irq_info(kind.index())
            .map_or(0, |i| i.count)
    }

    fn enable_irq(&self, kind: IrqKind, fds: &[&EventFd]) -> Result<(), IrqSetError> {
        self.device
            .enable_irq(kind.index(), fds.to_vec())
            .map_err(irq_err(kind, fds.len()))
    }

    fn disable_irq(&self, kind: IrqKind) -> Result<(), IrqSetError> {
        self.device
            .disable_irq(kind.index())
            .map_err(irq_err(kind, 0))
    }

    fn set_intx_resample(&self, fd: &EventFd) -> Result<(), IrqSetError> {
        self.device
            .set_irq_resample_fd(IrqKind::Intx.index(), vec![fd])
            .map_err(irq_err(IrqKind::Intx, 1))
    }

    fn reset(&self) {
        log::debug!("{}: VFIO_DEVICE_RESET", self.bdf);
        self.device.reset();
    }
}
