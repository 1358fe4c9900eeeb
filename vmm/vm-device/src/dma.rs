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
    /// [`HostDma::use_identity`]: `true` to move onto the shared identity domain, `false` back
    /// onto the device's own.
    UseIdentity(bool),
    /// [`HostDma::use_domain`]: `Some(id)` to move onto another device's host domain `id`,
    /// `None` back onto the device's own.
    UseDomain(Option<u32>),
}

impl std::fmt::Display for HostOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            HostOp::Map => "map",
            HostOp::Unmap => "unmap",
            HostOp::UseIdentity(true) => "switch to the shared identity domain",
            HostOp::UseIdentity(false) | HostOp::UseDomain(None) => {
                "switch back to the device's own domain"
            }
            HostOp::UseDomain(Some(_)) => "switch to a shared domain",
        })?;
        match self {
            HostOp::UseDomain(Some(id)) => write!(f, " {id}"),
            _ => Ok(()),
        }
    }
}

/// A host DMA operation was refused. The source is the implementation's own typed error (for
/// VFIO: the ioctl's errno, or why the guest-physical range has no host memory).
#[derive(Debug, thiserror::Error)]
#[error("host DMA {}: {source}", self.what())]
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

    /// A [`HostDma::use_identity`] switch (`on` or off) failed because of `source`.
    pub fn switch(on: bool, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self::new(HostOp::UseIdentity(on), 0, 0, source)
    }

    /// A [`HostDma::use_domain`] switch (to `domain`, or back) failed because of `source`.
    pub fn switch_domain(
        domain: Option<u32>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self::new(HostOp::UseDomain(domain), 0, 0, source)
    }

    /// What failed, with the range for a map or an unmap.
    fn what(&self) -> String {
        match self.op {
            HostOp::Map | HostOp::Unmap => format!(
                "{} of {:#x} bytes at IOVA {:#x} failed",
                self.op, self.len, self.iova
            ),
            HostOp::UseIdentity(_) | HostOp::UseDomain(_) => format!("{} failed", self.op),
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

    /// Optional: with `on`, lets the device reach all guest RAM at IOVA = GPA through a host
    /// domain shared by every device that does so (guest RAM mapped, and pinned, once for all
    /// of them); returns whether it did (false: the host cannot, and the caller keeps mapping
    /// through [`HostDma::map`]). With `!on`, puts the device back on its own domain, which
    /// maps what `map` and `unmap` made of it.
    ///
    /// Each switch is atomic for the device: it reaches either all of one domain or all of the
    /// other, never neither. The caller orders around that: before switching on it need not
    /// have unmapped anything (its own mappings stay, unused, until it unmaps them); before
    /// switching back it must already have mapped what the device may reach, since from the
    /// switch on the device reaches exactly its own domain. `map` and `unmap` always act on
    /// the device's own domain, whichever one it uses. The default keeps today's behaviour: no
    /// shared domain, `Ok(false)` on, and nothing to undo off.
    fn use_identity(&mut self, on: bool) -> Result<bool, HostDmaError> {
        let _ = on;
        Ok(false)
    }

    /// Optional: the id of the device's own host domain when other devices of the same host
    /// can use it through [`HostDma::use_domain`] (an iommufd IOAS); `None`, the default,
    /// when it cannot be shared.
    fn own_domain(&self) -> Option<u32> {
        None
    }

    /// Optional: with `Some(id)`, lets the device reach what another device's own domain `id`
    /// (its [`HostDma::own_domain`]) maps instead of its own, so devices a guest puts in one
    /// IOMMU domain share one host domain (guest memory mapped, and pinned, once); returns
    /// whether it did (false: the host cannot). With `None`, puts the device back on its own
    /// domain.
    ///
    /// Each switch is atomic for the device, as [`HostDma::use_identity`]'s: the caller makes
    /// sure the domain switched to already maps what the device may reach. `map` and `unmap`
    /// always act on the device's own domain. The default: no sharing, `Ok(false)`.
    fn use_domain(&mut self, domain: Option<u32>) -> Result<bool, HostDmaError> {
        let _ = domain;
        Ok(false)
    }
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

    #[test]
    fn a_failed_switch_names_the_direction_not_a_range() {
        let on = HostDmaError::switch(true, std::io::Error::from_raw_os_error(16));
        assert!(
            on.to_string()
                .starts_with("host DMA switch to the shared identity domain failed: "),
            "{on}"
        );
        let off = HostDmaError::switch(false, std::io::Error::from_raw_os_error(16));
        assert!(
            off.to_string()
                .starts_with("host DMA switch back to the device's own domain failed: "),
            "{off}"
        );
    }

    #[test]
    fn by_default_a_host_has_no_shared_identity_domain() {
        struct Plain;
        impl HostDma for Plain {
            fn map(&mut self, _: u64, _: u64, _: u64, _: Perm) -> Result<(), HostDmaError> {
                Ok(())
            }
            fn unmap(&mut self, _: u64, _: u64) -> Result<(), HostDmaError> {
                Ok(())
            }
        }
        assert!(!Plain.use_identity(true).unwrap());
        assert!(!Plain.use_identity(false).unwrap());
        assert_eq!(Plain.own_domain(), None);
        assert!(!Plain.use_domain(Some(3)).unwrap());
    }

    #[test]
    fn a_failed_domain_switch_names_the_domain() {
        let to = HostDmaError::switch_domain(Some(7), std::io::Error::from_raw_os_error(16));
        assert!(
            to.to_string()
                .starts_with("host DMA switch to a shared domain 7 failed: "),
            "{to}"
        );
        let back = HostDmaError::switch_domain(None, std::io::Error::from_raw_os_error(16));
        assert!(
            back.to_string()
                .starts_with("host DMA switch back to the device's own domain failed: "),
            "{back}"
        );
    }
}
