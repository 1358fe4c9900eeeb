//! The host side of DMA remapping: what the VMM must provide for caching mode to work.
//!
//! The trait has the shape VFIO type1 imposes: a map creates one host mapping, an unmap removes
//! whole host mappings lying in a range (it cannot split one), and every host mapping removed
//! costs one host IOTLB flush. The model therefore keeps host mappings few and large.

use crate::Perm;

/// Which host operation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostOp {
    Map,
    Unmap,
}

impl std::fmt::Display for HostOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            HostOp::Map => "map",
            HostOp::Unmap => "unmap",
        })
    }
}

/// A host DMA operation was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("host DMA {op} of {len:#x} bytes at IOVA {iova:#x} failed: {cause}")]
pub struct HostDmaError {
    pub op: HostOp,
    pub iova: u64,
    pub len: u64,
    pub cause: String,
}

/// DMA mappings of one device's host address space (for VFIO: one container).
pub trait HostDma: Send {
    /// Lets the device reach `len` bytes of guest-physical memory at `gpa` through `iova`.
    /// `gpa..gpa + len` always lies within one guest RAM region.
    fn map(&mut self, iova: u64, gpa: u64, len: u64, perm: Perm) -> Result<(), HostDmaError>;

    /// Removes every host mapping lying within `[iova, iova + len)`. The range never cuts a
    /// host mapping in two.
    fn unmap(&mut self, iova: u64, len: u64) -> Result<(), HostDmaError>;
}
