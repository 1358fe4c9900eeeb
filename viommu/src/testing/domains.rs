//! Host domains several devices can be attached to, as iommufd IOASes are: what
//! [`HostDma::own_domain`] and [`HostDma::use_domain`] need to be tested without a host.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use super::SimHost;
use crate::host::{HostDma, HostDmaError};
use crate::{Perm, PAGE_SIZE};

const EBUSY: i32 = 16;
const ENOENT: i32 = 2;

#[derive(Default)]
struct State {
    /// Each domain's mappings, by id.
    domains: BTreeMap<u32, SimHost>,
    /// The domain each device (named by its own domain's id) is attached to.
    attached: BTreeMap<u32, u32>,
    /// Each switch made: the device, the domain it went to, and how many mappings that domain
    /// held then.
    switches: Vec<(u32, u32, usize)>,
    /// Refuses this many switches (EBUSY).
    refuse: u32,
    /// Whether there is a shared identity domain ([`IDENTITY`]) mapping all guest RAM.
    identity: bool,
}

/// The id of the shared identity domain, when [`HostDomains::with_identity`] made one.
pub const IDENTITY: u32 = u32::MAX;

/// The host's domains; [`HostDomains::device`] makes one device's host DMA.
#[derive(Clone, Default)]
pub struct HostDomains(Arc<Mutex<State>>);

impl HostDomains {
    /// Domains and a shared identity domain, as the VMM's iommufd backend has.
    pub fn with_identity() -> Self {
        let mut identity = SimHost::new();
        identity
            .map(0, 0, super::TEST_MEM_SIZE, Perm::RW)
            .expect("an empty domain maps all test RAM");
        let domains = HostDomains::default();
        let mut s = domains.state();
        s.domains.insert(IDENTITY, identity);
        s.identity = true;
        drop(s);
        domains
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A poisoned lock means another test thread panicked: that test reports the failure.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A device with its own domain `id`, attached to it.
    pub fn device(&self, id: u32) -> DomainHost {
        let mut s = self.state();
        s.domains.insert(id, SimHost::new());
        s.attached.insert(id, id);
        DomainHost {
            own: id,
            all: self.clone(),
        }
    }

    /// What device `id` reaches now: page by page, IOVA to (guest-physical address, permissions).
    pub fn reach(&self, id: u32) -> BTreeMap<u64, (u64, Perm)> {
        let s = self.state();
        let on = s.attached.get(&id).copied().unwrap_or(id);
        s.domains
            .get(&on)
            .map(SimHost::page_map)
            .unwrap_or_default()
    }

    /// Pages device `id` reaches, as (IOVA, guest-physical address) pairs.
    pub fn reach_pages(&self, id: u32) -> Vec<(u64, u64)> {
        self.reach(id)
            .into_iter()
            .map(|(i, (g, _))| (i, g))
            .collect()
    }

    /// The domain device `id` is attached to.
    pub fn attached(&self, id: u32) -> u32 {
        self.state().attached.get(&id).copied().unwrap_or(id)
    }

    /// Host mappings in domain `id`.
    pub fn mappings(&self, id: u32) -> usize {
        self.state().domains.get(&id).map_or(0, SimHost::mappings)
    }

    /// Pages mapped over all domains: what the host pins.
    pub fn pinned_pages(&self) -> u64 {
        let s = self.state();
        s.domains
            .values()
            .flat_map(|d| d.extents())
            .map(|(_, len, _, _)| len / PAGE_SIZE)
            .sum()
    }

    /// Map calls over all domains.
    pub fn map_calls(&self) -> u64 {
        self.state().domains.values().map(|d| d.map_calls).sum()
    }

    /// Each switch made: the device, the domain it went to, how many mappings that held then.
    pub fn switches(&self) -> Vec<(u32, u32, usize)> {
        self.state().switches.clone()
    }

    /// Refuses the next `n` switches.
    pub fn refuse_switches(&self, n: u32) {
        self.state().refuse = n;
    }
}

/// One device's host DMA over [`HostDomains`].
pub struct DomainHost {
    own: u32,
    all: HostDomains,
}

impl HostDma for DomainHost {
    fn map(&mut self, iova: u64, gpa: u64, len: u64, perm: Perm) -> Result<(), HostDmaError> {
        let own = self.own;
        let mut s = self.all.state();
        s.domains.entry(own).or_default().map(iova, gpa, len, perm)
    }

    fn unmap(&mut self, iova: u64, len: u64) -> Result<(), HostDmaError> {
        let own = self.own;
        let mut s = self.all.state();
        s.domains.entry(own).or_default().unmap(iova, len)
    }

    fn use_identity(&mut self, on: bool) -> Result<bool, HostDmaError> {
        let own = self.own;
        let mut s = self.all.state();
        if !s.identity {
            return Ok(false);
        }
        let to = if on { IDENTITY } else { own };
        s.attached.insert(own, to);
        let held = s.domains.get(&to).map_or(0, SimHost::mappings);
        s.switches.push((own, to, held));
        Ok(true)
    }

    fn own_domain(&self) -> Option<u32> {
        Some(self.own)
    }

    fn use_domain(&mut self, domain: Option<u32>) -> Result<bool, HostDmaError> {
        let own = self.own;
        let mut s = self.all.state();
        let to = domain.unwrap_or(own);
        if s.refuse > 0 {
            s.refuse -= 1;
            return Err(HostDmaError::switch_domain(
                domain,
                std::io::Error::from_raw_os_error(EBUSY),
            ));
        }
        let Some(held) = s.domains.get(&to).map(SimHost::mappings) else {
            return Err(HostDmaError::switch_domain(
                domain,
                std::io::Error::from_raw_os_error(ENOENT),
            ));
        };
        s.attached.insert(own, to);
        s.switches.push((own, to, held));
        Ok(true)
    }
}
