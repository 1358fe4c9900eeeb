//! Host DMA: what a DMA remapping model (the viommu crate's VT-d) asks of the host, and what a
//! device-assignment backend (the passthrough crate's VFIO container) provides.
//!
//! The trait has the shape VFIO type1 imposes: a map creates one host mapping, an unmap removes
//! whole host mappings lying in a range (it cannot split one), and every host mapping removed
//! costs one host IOTLB flush. Callers therefore keep host mappings few and large.

/// The direction of a DMA request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Access {
    Read,
    Write,
}

/// DMA permissions of a mapping or a translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Perm {
    pub read: bool,
    pub write: bool,
}

impl Perm {
    pub const NONE: Perm = Perm {
        read: false,
        write: false,
    };
    pub const READ: Perm = Perm {
        read: true,
        write: false,
    };
    pub const WRITE: Perm = Perm {
        read: false,
        write: true,
    };
    pub const RW: Perm = Perm {
        read: true,
        write: true,
    };

    pub fn is_none(self) -> bool {
        !self.read && !self.write
    }

    /// The permissions both allow, as nested paging levels combine them.
    pub fn and(self, other: Perm) -> Perm {
        Perm {
            read: self.read && other.read,
            write: self.write && other.write,
        }
    }

    /// Whether a request in direction `access` is allowed.
    pub fn allows(self, access: Access) -> bool {
        match access {
            Access::Read => self.read,
            Access::Write => self.write,
        }
    }
}

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

/// A host DMA operation was refused. The source is the implementation's own typed error (for
/// VFIO: the ioctl's errno, or why the guest-physical range has no host memory).
#[derive(Debug, thiserror::Error)]
#[error("host DMA {op} of {len:#x} bytes at IOVA {iova:#x} failed: {source}")]
pub struct HostDmaError {
    pub op: HostOp,
    pub iova: u64,
    pub len: u64,
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync + 'static>,
}

impl HostDmaError {
    /// `op` of `len` bytes at `iova` failed because of `source`.
    pub fn new(
        op: HostOp,
        iova: u64,
        len: u64,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self {
            op,
            iova,
            len,
            source: Box::new(source),
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permissions_combine_and_gate_directions() {
        assert!(Perm::NONE.is_none());
        assert_eq!(Perm::RW.and(Perm::READ), Perm::READ);
        assert!(Perm::READ.allows(Access::Read) && !Perm::READ.allows(Access::Write));
        assert!(Perm::WRITE.allows(Access::Write) && !Perm::WRITE.allows(Access::Read));
    }

    #[test]
    fn an_error_names_the_operation_the_range_and_its_typed_cause() {
        let e = HostDmaError::new(
            HostOp::Unmap,
            0x1000,
            0x2000,
            std::io::Error::from_raw_os_error(22),
        );
        let text = e.to_string();
        assert!(
            text.starts_with("host DMA unmap of 0x2000 bytes at IOVA 0x1000 failed: "),
            "{text}"
        );
        let source = std::error::Error::source(&e).expect("a source");
        let io = source
            .downcast_ref::<std::io::Error>()
            .expect("the io::Error itself");
        assert_eq!(io.raw_os_error(), Some(22));
    }
}
