//! The VM's shared identity domain (iommufd only): one IOAS where all guest RAM is mapped at
//! IOVA = GPA, and pinned, once for every device that may reach all of it: the devices without
//! a vIOMMU, and those behind the VT-d while their guest view is identity (translation off, or
//! a pass-through entry). A device behind the VT-d moves between it and its own IOAS by
//! re-attaching (VFIO_DEVICE_ATTACH_IOMMUFD_PT replaces the attachment atomically), through
//! [`IoasSwitch`], the host DMA the VT-d engine gets for it; the same switch moves it onto
//! another device's own IOAS while the guest puts both in one translated domain.
//!
//! Guest RAM is mapped there while anyone uses the domain: mapped for the first user, unmapped
//! after the last, so a guest whose devices all translate pins only what its tables map.
//! Containers have no such switch: a group cannot change containers while its devices are open.

use std::sync::{Arc, Mutex};

use vfio_ioctls::VfioDevice;
use vm_device::dma::{HostDma, HostDmaError, Perm};
use vm_memory::GuestMemoryBackend;

use crate::dma::{DmaIoctls, HostDmaMappings};

/// Why a device could not move between its own IOAS and the shared identity one.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("attaching {bdf} to IOAS {ioas}: {source}")]
    Attach {
        bdf: String,
        ioas: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("mapping guest RAM in the shared identity IOAS {ioas}: {source}")]
    MapRam {
        ioas: u32,
        #[source]
        source: HostDmaError,
    },
}

/// Attaching a device to an iommufd page table object (an IOAS here): the real
/// [`VfioDevice`] implements it; tests fake it.
pub trait AttachPt: Send + Sync {
    /// VFIO_DEVICE_ATTACH_IOMMUFD_PT: from now on the device's DMA goes through `pt_id`
    /// instead of what it was attached to.
    fn attach_pt(&self, pt_id: u32) -> std::io::Result<()>;
}

impl AttachPt for VfioDevice {
    fn attach_pt(&self, pt_id: u32) -> std::io::Result<()> {
        self.attach_hwpt(pt_id).map_err(std::io::Error::other)
    }
}

/// All guest RAM at IOVA = GPA in one host domain, mapped and unmapped as a whole.
pub trait GuestRam: Send {
    fn map_guest_ram(&mut self) -> Result<(), HostDmaError>;
    fn unmap_guest_ram(&mut self) -> Result<(), HostDmaError>;
}

impl<C: DmaIoctls, M: GuestMemoryBackend + Send> GuestRam for HostDmaMappings<C, M> {
    fn map_guest_ram(&mut self) -> Result<(), HostDmaError> {
        HostDmaMappings::map_guest_ram(self)
    }

    fn unmap_guest_ram(&mut self) -> Result<(), HostDmaError> {
        self.unmap_all()
    }
}

/// The shared identity IOAS and how many use it.
pub struct IdentityDomain {
    ioas: u32,
    ram: Mutex<Users>,
}

struct Users {
    ram: Box<dyn GuestRam>,
    count: usize,
}

impl IdentityDomain {
    /// The identity domain of IOAS `ioas`, whose guest RAM `ram` maps (nothing mapped yet).
    pub fn new(ioas: u32, ram: Box<dyn GuestRam>) -> Arc<Self> {
        Arc::new(Self {
            ioas,
            ram: Mutex::new(Users { ram, count: 0 }),
        })
    }

    pub fn ioas_id(&self) -> u32 {
        self.ioas
    }

    fn users(&self) -> std::sync::MutexGuard<'_, Users> {
        // A poisoned lock only means a panic elsewhere; the count is still consistent.
        self.ram.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether guest RAM is mapped in the domain now.
    pub fn mapped(&self) -> bool {
        self.users().count > 0
    }

    /// One more user; guest RAM is mapped for the first.
    fn acquire(&self) -> Result<(), IdentityError> {
        let mut users = self.users();
        if users.count == 0 {
            if let Err(source) = users.ram.map_guest_ram() {
                // Nothing half-mapped stays pinned.
                if let Err(e) = users.ram.unmap_guest_ram() {
                    log::error!("IOAS {}: undoing a partial guest RAM map: {e}", self.ioas);
                }
                return Err(IdentityError::MapRam {
                    ioas: self.ioas,
                    source,
                });
            }
            log::debug!("IOAS {}: guest RAM mapped at IOVA = GPA", self.ioas);
        }
        users.count += 1;
        Ok(())
    }

    /// One user fewer; guest RAM is unmapped after the last.
    fn release(&self) {
        let mut users = self.users();
        users.count = users.count.saturating_sub(1);
        if users.count == 0 {
            match users.ram.unmap_guest_ram() {
                Ok(()) => log::debug!("IOAS {}: guest RAM unmapped, no user left", self.ioas),
                Err(e) => log::error!("IOAS {}: unmapping guest RAM: {e}", self.ioas),
            }
        }
    }

    /// A user for as long as the guard lives (the devices without a vIOMMU: the VM's lifetime).
    pub fn hold(self: &Arc<Self>) -> Result<IdentityHold, IdentityError> {
        self.acquire()?;
        Ok(IdentityHold(self.clone()))
    }
}

/// A use of the identity domain, released on drop.
pub struct IdentityHold(Arc<IdentityDomain>);

impl Drop for IdentityHold {
    fn drop(&mut self) {
        self.0.release();
    }
}

/// Which IOAS a device behind the VT-d is attached to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Attached {
    /// Its own, which its maps and unmaps fill.
    Own,
    /// The shared identity IOAS.
    Identity,
    /// Another device's own IOAS: the guest put both in one domain.
    Other(u32),
}

/// The host DMA of a device behind the VT-d on iommufd: maps and unmaps go to its own IOAS
/// (`own`, IOAS `own_ioas`); [`HostDma::use_identity`] moves the device onto the shared
/// identity domain and back, [`HostDma::use_domain`] onto another device's own IOAS and back.
pub struct IoasSwitch<D: AttachPt> {
    bdf: String,
    device: Arc<D>,
    own: Box<dyn HostDma>,
    own_ioas: u32,
    shared: Arc<IdentityDomain>,
    attached: Attached,
}

impl<D: AttachPt> IoasSwitch<D> {
    /// The device `bdf` (`device`), attached to its own IOAS `own_ioas` whose mappings `own`
    /// makes, able to use `shared`.
    pub fn new(
        bdf: String,
        device: Arc<D>,
        own: Box<dyn HostDma>,
        own_ioas: u32,
        shared: Arc<IdentityDomain>,
    ) -> Self {
        Self {
            bdf,
            device,
            own,
            own_ioas,
            shared,
            attached: Attached::Own,
        }
    }

    fn attach(&self, ioas: u32) -> Result<(), IdentityError> {
        self.device
            .attach_pt(ioas)
            .map_err(|source| IdentityError::Attach {
                bdf: self.bdf.clone(),
                ioas,
                source,
            })
    }

    /// Attaches the device to `to` (whose IOAS is `ioas`), releasing the identity domain when
    /// it leaves it. Acquiring it is the caller's business: guest RAM must be mapped first.
    fn move_to(&mut self, to: Attached, ioas: u32) -> Result<(), IdentityError> {
        self.attach(ioas)?;
        if self.attached == Attached::Identity {
            self.shared.release();
        }
        log::debug!(
            "{}: on IOAS {ioas} ({to:?}; own IOAS {})",
            self.bdf,
            self.own_ioas
        );
        self.attached = to;
        Ok(())
    }
}

impl<D: AttachPt> HostDma for IoasSwitch<D> {
    fn map(&mut self, iova: u64, gpa: u64, len: u64, perm: Perm) -> Result<(), HostDmaError> {
        self.own.map(iova, gpa, len, perm)
    }

    fn unmap(&mut self, iova: u64, len: u64) -> Result<(), HostDmaError> {
        self.own.unmap(iova, len)
    }

    fn use_identity(&mut self, on: bool) -> Result<bool, HostDmaError> {
        let to = if on {
            Attached::Identity
        } else {
            Attached::Own
        };
        if to == self.attached {
            return Ok(true);
        }
        if on {
            // Guest RAM is mapped there before the device can reach the domain.
            self.shared
                .acquire()
                .map_err(|e| HostDmaError::switch(on, e))?;
            if let Err(e) = self.attach(self.shared.ioas_id()) {
                self.shared.release();
                return Err(HostDmaError::switch(on, e));
            }
            if let Attached::Other(ioas) = self.attached {
                log::debug!("{}: left IOAS {ioas}", self.bdf);
            }
            log::debug!(
                "{}: on the shared identity IOAS {} (own IOAS {} unused)",
                self.bdf,
                self.shared.ioas_id(),
                self.own_ioas
            );
            self.attached = Attached::Identity;
        } else {
            // The caller mapped the own IOAS first: the device reaches it from here on.
            self.move_to(Attached::Own, self.own_ioas)
                .map_err(|e| HostDmaError::switch(on, e))?;
        }
        Ok(true)
    }

    fn own_domain(&self) -> Option<u32> {
        Some(self.own_ioas)
    }

    fn use_domain(&mut self, domain: Option<u32>) -> Result<bool, HostDmaError> {
        let (to, ioas) = match domain {
            Some(ioas) if ioas != self.own_ioas => (Attached::Other(ioas), ioas),
            _ => (Attached::Own, self.own_ioas),
        };
        if to != self.attached {
            self.move_to(to, ioas)
                .map_err(|e| HostDmaError::switch_domain(domain, e))?;
        }
        Ok(true)
    }
}

impl<D: AttachPt> Drop for IoasSwitch<D> {
    fn drop(&mut self) {
        if self.attached == Attached::Identity {
            self.shared.release();
        }
    }
}

#[cfg(test)]
#[path = "identity_tests.rs"]
mod tests;
