//! What devices and the VMM share, and nothing more: the interface crate of the workspace, as
//! Cloud Hypervisor's `vm-device` is the crate its devices and its VMM both depend on.
//!
//! - [`dma`]: the host-DMA trait a DMA remapping model drives and a device-assignment backend
//!   implements (the viommu crate's VT-d engine and the passthrough crate's VFIO container), so
//!   neither of those crates depends on the other;
//! - [`interrupt`]: the MSI message and its formats (compatibility and remappable), which the
//!   VT-d's interrupt remapping, the passthrough crate's MSI/MSI-X and KVM routes and the VMM's
//!   IOAPIC all speak, and the trait an emulated device raises its MSIs through;
//! - [`pci`]: the PCI configuration-space and BAR model the VMM's emulated functions and the
//!   passthrough crate's VFIO functions share, and the trait the root complex drives them by;
//! - [`ratelimit`]: logging for lines a guest can trigger at will, bounded per call site;
//! - [`origin`]: the vCPU and instruction pointer of the MMIO write a device model is handling,
//!   for models that name the guest code behind what they report.
//!
//! It lives at `vmm/vm-device` because the workspace's top level holds one directory per part of
//! the project (`vmm`, `passthrough`, `viommu`, `tests`, `resources`) and this crate is the part
//! of the VMM that its device crates build on, not a project of its own.

pub mod dma;
pub mod interrupt;
pub mod origin;
pub mod pci;
pub mod ratelimit;
