//! VFIO PCI device assignment: a host PCI function given to a guest.
//!
//! - [`setup`]: the checks of a sysfs path, with errors that say the fix, the host backend's
//!   choice (iommufd or the legacy container), and the container, group and device.
//! - [`iommufd`]: the iommufd backend: /dev/iommu, I/O address spaces, device files.
//! - [`iova`]: the IOVA ranges a host address space can map (its IOMMU's aperture and holes).
//! - [`dma`]: the host-DMA trait ([`vm_device::dma::HostDma`]) over a VFIO container or an
//!   iommufd IOAS, with one bookkeeping for both.
//! - [`function`]: the function as the guest sees it (config space, BARs, MSI/MSI-X/INTx),
//!   written against [`access::VfioAccess`] and [`irq::IrqRoutes`] so it is tested with fakes;
//!   its configuration-space and BAR rules are the shared ones of [`vm_device::pci`].
//! - [`device`]: the function on the VMM's PCI bus ([`vm_device::pci::device::PciDevice`]), its
//!   mmappable BAR areas as memory slots ([`slots`]).
//! - [`kvm`]: the KVM side of interrupt routing.
//! - `testing` (feature `testing`, and in this crate's tests): a fake VFIO device and fake
//!   interrupt routes, for tests and fuzzing.

pub mod access;
pub mod device;
pub mod dma;
pub mod function;
pub mod host;
pub mod identity;
pub mod iommufd;
pub mod iova;
pub mod irq;
pub mod kvm;
pub mod msi;
pub mod msix;
pub mod setup;
pub mod slots;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
