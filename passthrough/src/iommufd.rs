//! The iommufd backend: one /dev/iommu per VM, I/O address spaces (IOAS) in it, and devices
//! opened through their own VFIO file (/dev/vfio/devices/vfioN), bound to the iommufd and
//! attached to an IOAS (the kernel gives each attachment a hardware page table of the IOAS).
//!
//! The IOAS's mappings go through the shared bookkeeping of [`crate::dma::HostDmaMappings`]:
//! [`IoasDma`] is its [`DmaIoctls`], IOMMU_IOAS_MAP / IOMMU_IOAS_UNMAP through the
//! `iommufd-ioctls` crate. What an IOAS can map, IOMMU_IOAS_IOVA_RANGES, has no wrapper there:
//! [`ioas_iova_ranges`] issues it.

use std::io;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::Arc;

use iommufd_bindings::iommufd::{
    iommu_ioas_iova_ranges, iommu_ioas_map, iommu_ioas_unmap, iommu_iova_range,
    iommufd_ioas_map_flags_IOMMU_IOAS_MAP_FIXED_IOVA,
    iommufd_ioas_map_flags_IOMMU_IOAS_MAP_READABLE,
    iommufd_ioas_map_flags_IOMMU_IOAS_MAP_WRITEABLE, IOMMUFD_CMD_IOAS_IOVA_RANGES, IOMMUFD_TYPE,
};
use iommufd_ioctls::{IommuFd, IommufdError, IommufdIoas};
use vfio_bindings::bindings::vfio::{VFIO_DMA_MAP_FLAG_READ, VFIO_DMA_MAP_FLAG_WRITE};
use vfio_ioctls::{VfioDevice, VfioDeviceFd, VfioError, VfioIommufd};

use crate::dma::DmaIoctls;
use crate::host::HostDevice;
use crate::iova::{IovaRanges, IovaRangesError};
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

    /// The IOVA ranges the IOAS can map now: what every attached device's host IOMMU reaches,
    /// less its reserved regions. Ask once the device is attached ([`IommufdHost::open`]).
    pub fn iova_ranges(&self) -> Result<IovaRanges, IovaRangesError> {
        ioas_iova_ranges(&self.ioas())
    }

    /// The IOAS's map and unmap, for [`crate::dma::HostDmaMappings`].
    pub fn dma(&self) -> IoasDma<Ioas> {
        IoasDma(self.ioas())
    }

    fn ioas(&self) -> Ioas {
        Ioas {
            iommufd: self.vfio.iommufd().clone(),
            ioas: self.vfio.ioas().clone(),
        }
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

// include/uapi/linux/iommufd.h: IOMMU_IOAS_IOVA_RANGES = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_IOAS_IOVA_RANGES).
vmm_sys_util::ioctl_io_nr!(
    IOMMU_IOAS_IOVA_RANGES,
    IOMMUFD_TYPE as u32,
    IOMMUFD_CMD_IOAS_IOVA_RANGES
);

/// How often IOMMU_IOAS_IOVA_RANGES is repeated when the ranges outgrow the array given: they
/// only change when a device attaches or detaches meanwhile, which nothing here does.
const MAX_RANGE_QUERIES: usize = 4;
/// Most ranges an IOAS may report (a handful of reserved regions make a handful of holes).
const MAX_RANGES: usize = 1 << 12;

/// The IOAS ioctls of one IOAS (the real [`Ioas`] implements them; tests fake them).
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
    /// IOMMU_IOAS_IOVA_RANGES: fills `out` with as many of the usable ranges as it holds and
    /// returns how many there are (more than `out.len()` where the kernel says EMSGSIZE).
    fn iova_ranges(&self, out: &mut [iommu_iova_range]) -> io::Result<u32>;
}

/// The IOVA ranges `ioas` can map, asked again with a bigger array as long as they do not fit.
pub fn ioas_iova_ranges<I: IoasIoctls>(ioas: &I) -> Result<IovaRanges, IovaRangesError> {
    const IOCTL: &str = "IOMMU_IOAS_IOVA_RANGES";
    let mut out = Vec::new();
    for _ in 0..MAX_RANGE_QUERIES {
        let count = ioas
            .iova_ranges(&mut out)
            .map_err(|source| IovaRangesError::Ioctl {
                ioctl: IOCTL,
                source,
            })? as usize;
        if count <= out.len() {
            out.truncate(count);
            return IovaRanges::new(out.iter().map(|r| (r.start, r.last)));
        }
        if count > MAX_RANGES {
            break;
        }
        out.resize(count, iommu_iova_range::default());
    }
    Err(IovaRangesError::Unsettled {
        ioctl: IOCTL,
        size: out.len(),
    })
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

    fn iova_ranges(&self, out: &mut [iommu_iova_range]) -> io::Result<u32> {
        let mut arg = iommu_ioas_iova_ranges {
            size: std::mem::size_of::<iommu_ioas_iova_ranges>() as u32,
            ioas_id: self.ioas.id(),
            num_iovas: u32::try_from(out.len()).map_err(io::Error::other)?,
            __reserved: 0,
            allowed_iovas: out.as_mut_ptr() as u64,
            out_iova_alignment: 0,
        };
        // SAFETY: the iommufd is valid and `arg` well-formed: the kernel writes at most
        // `num_iovas` ranges to `allowed_iovas`, which is `out`, and the count back to `arg`.
        let ret = unsafe {
            vmm_sys_util::ioctl::ioctl_with_mut_ref(
                self.iommufd.as_ref(),
                IOMMU_IOAS_IOVA_RANGES(),
                &mut arg,
            )
        };
        if ret != 0 {
            let e = io::Error::last_os_error();
            // The array was too short: the kernel wrote how many ranges there are.
            if e.raw_os_error() != Some(libc::EMSGSIZE) {
                return Err(e);
            }
        }
        Ok(arg.num_iovas)
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
