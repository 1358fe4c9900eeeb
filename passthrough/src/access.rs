//! What the virtualization logic needs from a VFIO device: region info and access, interrupt
//! set-up, reset. The real VFIO device implements it ([`crate::host::HostDevice`]); tests use a
//! fake.

use vmm_sys_util::eventfd::EventFd;

/// VFIO region index of BAR 0; BARs 0..5 are indices 0..5 (linux/vfio.h).
pub const BAR0_REGION: u32 = vfio_bindings::bindings::vfio::VFIO_PCI_BAR0_REGION_INDEX;
/// VFIO region index of the configuration space.
pub const CONFIG_REGION: u32 = vfio_bindings::bindings::vfio::VFIO_PCI_CONFIG_REGION_INDEX;

/// The interrupt kinds VFIO exposes for a PCI function (VFIO_PCI_*_IRQ_INDEX).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IrqKind {
    Intx,
    Msi,
    Msix,
}

impl IrqKind {
    /// The VFIO irq index.
    pub fn index(self) -> u32 {
        use vfio_bindings::bindings::vfio::*;
        match self {
            IrqKind::Intx => VFIO_PCI_INTX_IRQ_INDEX,
            IrqKind::Msi => VFIO_PCI_MSI_IRQ_INDEX,
            IrqKind::Msix => VFIO_PCI_MSIX_IRQ_INDEX,
        }
    }
}

impl std::fmt::Display for IrqKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            IrqKind::Intx => "INTx",
            IrqKind::Msi => "MSI",
            IrqKind::Msix => "MSI-X",
        })
    }
}

/// A part of a region the host lets us mmap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmapArea {
    pub offset: u64,
    pub size: u64,
}

/// One VFIO region.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RegionInfo {
    /// Size in bytes (0: the region does not exist).
    pub size: u64,
    /// Offset of the region in the device fd (for mmap).
    pub fd_offset: u64,
    pub readable: bool,
    pub writable: bool,
    /// Areas that may be mmapped; empty when none may.
    pub mmap_areas: Vec<MmapArea>,
    /// The host allows mmapping over the MSI-X table (VFIO_REGION_INFO_CAP_MSIX_MAPPABLE).
    pub msix_mappable: bool,
}

/// An interrupt set-up request VFIO refused.
#[derive(Debug, thiserror::Error)]
#[error("VFIO_DEVICE_SET_IRQS for {kind} ({count} vectors) failed: {source}")]
pub struct IrqSetError {
    pub kind: IrqKind,
    pub count: usize,
    pub source: vfio_ioctls::VfioError,
}

/// Region access, interrupt wiring and reset of one VFIO PCI function.
pub trait VfioAccess: Send {
    /// Information about region `index`; None when it does not exist.
    fn region(&self, index: u32) -> Option<RegionInfo>;

    /// Reads `data.len()` bytes at `offset` of region `index`. Errors read as all ones.
    fn read(&self, index: u32, offset: u64, data: &mut [u8]);

    /// Writes `data` at `offset` of region `index`. Errors are logged and dropped.
    fn write(&self, index: u32, offset: u64, data: &[u8]);

    /// How many vectors VFIO offers for `kind` (0: none).
    fn irq_count(&self, kind: IrqKind) -> u32;

    /// Signals `fds[i]` when vector `i` of `kind` fires (VFIO_IRQ_SET_ACTION_TRIGGER).
    fn enable_irq(&self, kind: IrqKind, fds: &[&EventFd]) -> Result<(), IrqSetError>;

    /// Stops all vectors of `kind`.
    fn disable_irq(&self, kind: IrqKind) -> Result<(), IrqSetError>;

    /// INTx only: VFIO unmasks the line when `fd` is signalled (KVM's resample fd).
    fn set_intx_resample(&self, fd: &EventFd) -> Result<(), IrqSetError>;

    /// Resets the function (VFIO_DEVICE_RESET) when the device supports it.
    fn reset(&self);
}
