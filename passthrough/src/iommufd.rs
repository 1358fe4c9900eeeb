//! The iommufd backend: one /dev/iommu per VM, I/O address spaces (IOAS) in it, and devices
//! opened through their own VFIO file (/dev/vfio/devices/vfioN), bound to the iommufd and
//! attached to an IOAS (the kernel gives each attachment a hardware page table of the IOAS).
//!
//! The IOAS's mappings go through the shared bookkeeping of [`crate::dma::HostDmaMappings`]:
//! [`IoasDma`] is its [`DmaIoctls`], IOMMU_IOAS_MAP / IOMMU_IOAS_UNMAP through the
//! `iommufd-ioctls` crate.

use std::io;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::Arc;

use iommufd_bindings::iommufd::{
    iommu_ioas_map, iommu_ioas_unmap, iommufd_ioas_map_flags_IOMMU_IOAS_MAP_FIXED_IOVA,
    iommufd_ioas_map_flags_IOMMU_IOAS_MAP_READABLE,
    iommufd_ioas_map_flags_IOMMU_IOAS_MAP_WRITEABLE,
};
use iommufd_ioctls::{IommuFd, IommufdError, IommufdIoas};
use vfio_bindings::bindings::vfio::{VFIO_DMA_MAP_FLAG_READ, VFIO_DMA_MAP_FLAG_WRITE};
use vfio_ioctls::{VfioDevice, VfioDeviceFd, VfioError, VfioIommufd};

use crate::dma::DmaIoctls;
use crate::host::HostDevice;
use crate::setup::{
    open_error as open_node_error, open_node, Backend, Checked, HostPaths, SetupError,
};

/// Opens the VM's /dev/iommu (for `c`, the first device that needs it: errors name it).
/// Every IOAS of the VM lives in this one iommufd.
pub fn open_iommufd(paths: &HostPaths, c: &Checked) -> Result<Arc<IommuFd>, SetupError> {
    let node = paths.dev.join("iommu");
    let file = open_node(&node).map_err(|e| open_node_error(c, &node, Backend::Iommufd, e))?;
    Ok(Arc::new(IommuFd::new_from_fd(file)))
}

/// One IOAS (one host I/O address space) and the devices opened into it.
pub struct IommufdHost {
    vfio: Arc<VfioIommufd>,
}

impl IommufdHost {
    /// Allocates a fresh IOAS in `iommufd` (for `c`, named in errors). With `kvm_vfio`, each
    /// device file joins KVM's VFIO device, as groups do with the container.
    pub fn new(
        iommufd: Arc<IommuFd>,
        kvm_vfio: Option<Arc<VfioDeviceFd>>,
        c: &Checked,
    ) -> Result<Self, SetupError> {
        let ioas = IommufdIoas::new(iommufd.clone()).map_err(|source| SetupError::Iommufd {
            bdf: c.bdf.clone(),
            source,
        })?;
        let vfio = VfioIommufd::new(iommufd, Some(Arc::new(ioas)), kvm_vfio).map_err(|source| {
            SetupError::Vfio {
                bdf: c.bdf.clone(),
                source,
            }
        })?;
        Ok(Self {
            vfio: Arc::new(vfio),
        })
    }

    /// The IOAS's id in its iommufd.
    pub fn ioas_id(&self) -> u32 {
        self.vfio.ioas().id()
    }

    /// The IOAS's map and unmap, for [`crate::dma::HostDmaMappings`].
    pub fn dma(&self) -> IoasDma<Ioas> {
        IoasDma(Ioas {
            iommufd: self.vfio.iommufd().clone(),
            ioas: self.vfio.ioas().clone(),
        })
    }

    /// Opens the checked device through its file `cdev`, binds it to the iommufd and attaches
    /// it to this IOAS. Until something is mapped in the IOAS the device reaches nothing.
    pub fn open(&self, c: &Checked, cdev: &Path) -> Result<HostDevice, SetupError> {
        let file = open_node(cdev).map_err(|e| open_node_error(c, cdev, Backend::Iommufd, e))?;
        let device = VfioDevice::new_from_fd(file, self.vfio.clone(), true)
            .map_err(|source| bind_error(c, cdev, source))?;
        log::info!(
            "{}: bound to iommufd (fd {}) as device {}, attached to IOAS {}",
            c.bdf,
            self.vfio.iommufd().as_raw_fd(),
            device
                .iommufd_dev_id()
                .map_or_else(|| "?".to_string(), |id| id.to_string()),
            self.ioas_id()
        );
        HostDevice::new(c.bdf.clone(), device)
    }
}

/// A device file's bind or attach failure as a [`SetupError`].
fn bind_error(c: &Checked, cdev: &Path, source: VfioError) -> SetupError {
    match &source {
        // Binding is exclusive (EINVAL once another file bound the device) and is refused
        // while the group is open through /dev/vfio/N (EBUSY).
        VfioError::VfioDeviceBindIommufd(e) if matches!(e.errno(), libc::EBUSY | libc::EINVAL) => {
            SetupError::DeviceBusy {
                bdf: c.bdf.clone(),
                group: c.group,
                path: cdev.display().to_string(),
            }
        }
        _ => SetupError::Vfio {
            bdf: c.bdf.clone(),
            source,
        },
    }
}

/// The two IOAS ioctls of one IOAS (the real [`Ioas`] implements them; tests fake them).
pub trait IoasIoctls: Send {
    /// The IOAS's id, which the arguments carry.
    fn id(&self) -> u32;
    /// IOMMU_IOAS_MAP.
    ///
    /// # Safety
    /// `map.user_va..+map.length` must be memory that stays mapped until unmapped here and that
    /// nothing in this process holds a Rust reference to (the device reads and writes it).
    unsafe fn map(&self, map: &iommu_ioas_map) -> io::Result<()>;
    /// IOMMU_IOAS_UNMAP; the kernel writes the bytes unmapped to `unmap.length`.
    fn unmap(&self, unmap: &mut iommu_ioas_unmap) -> io::Result<()>;
}

/// A live IOAS: its iommufd and the IOAS object, kept alive as long as mappings use them.
pub struct Ioas {
    iommufd: Arc<IommuFd>,
    ioas: Arc<IommufdIoas>,
}

/// The errno an iommufd ioctl failed with.
fn os_error(e: IommufdError) -> io::Error {
    match e {
        IommufdError::IommuIoasMap(e) | IommufdError::IommuIoasUnmap(e) => {
            io::Error::from_raw_os_error(e.errno())
        }
        e => io::Error::other(e),
    }
}

impl IoasIoctls for Ioas {
    fn id(&self) -> u32 {
        self.ioas.id()
    }

    unsafe fn map(&self, map: &iommu_ioas_map) -> io::Result<()> {
        self.iommufd.map_iommu_ioas(map).map_err(os_error)
    }

    fn unmap(&self, unmap: &mut iommu_ioas_unmap) -> io::Result<()> {
        self.iommufd.unmap_iommu_ioas(unmap).map_err(os_error)
    }
}

/// [`DmaIoctls`] over an IOAS: VFIO's map flags become IOMMU_IOAS_MAP's, always at the IOVA
/// asked for (FIXED_IOVA), as type1 maps.
pub struct IoasDma<I: IoasIoctls>(pub I);

/// IOMMU_IOAS_MAP flags for VFIO_DMA_MAP_FLAG_* `flags` (include/uapi/linux/iommufd.h, enum
/// iommufd_ioas_map_flags).
fn ioas_map_flags(flags: u32) -> u32 {
    let mut out = iommufd_ioas_map_flags_IOMMU_IOAS_MAP_FIXED_IOVA;
    if flags & VFIO_DMA_MAP_FLAG_READ != 0 {
        out |= iommufd_ioas_map_flags_IOMMU_IOAS_MAP_READABLE;
    }
    if flags & VFIO_DMA_MAP_FLAG_WRITE != 0 {
        out |= iommufd_ioas_map_flags_IOMMU_IOAS_MAP_WRITEABLE;
    }
    out
}

impl<I: IoasIoctls> DmaIoctls for IoasDma<I> {
    const MAP: &'static str = "IOMMU_IOAS_MAP";
    const UNMAP: &'static str = "IOMMU_IOAS_UNMAP";

    unsafe fn map_dma(&self, iova: u64, vaddr: u64, size: u64, flags: u32) -> io::Result<()> {
        let map = iommu_ioas_map {
            size: std::mem::size_of::<iommu_ioas_map>() as u32,
            flags: ioas_map_flags(flags),
            ioas_id: self.0.id(),
            __reserved: 0,
            user_va: vaddr,
            length: size,
            iova,
        };
        // SAFETY: the caller vouches for the memory, as `map_dma` requires.
        unsafe { self.0.map(&map) }
    }

    fn unmap_dma(&self, iova: u64, size: u64) -> io::Result<u64> {
        let mut unmap = iommu_ioas_unmap {
            size: std::mem::size_of::<iommu_ioas_unmap>() as u32,
            ioas_id: self.0.id(),
            iova,
            length: size,
        };
        self.0.unmap(&mut unmap)?;
        Ok(unmap.length)
    }
}

#[cfg(test)]
#[path = "iommufd_tests.rs"]
mod tests;
