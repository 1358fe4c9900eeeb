//! Host domains shared by devices the guest puts in one IOMMU domain: a device whose view is the
//! same translated tables as another's (same domain, same table; a multi-function device whose
//! functions have no ACS, devices behind a PCIe-to-PCI bridge, a VFIO user in the guest putting
//! several in one container) uses that device's host domain instead of mirroring the tables in
//! its own, so what the guest maps is mapped, pinned and flushed on the host once.
//!
//! The first device synced into a view leads: its own domain mirrors the view, as it would
//! alone. Later devices with the same view follow: they are attached to the leader's domain,
//! which already maps what they may reach, and their own domain is emptied. Invalidations still
//! reach every device; a follower's are carried out by its leader's sync. When the leader
//! leaves the view (a context entry moves it, it is detached), its followers move to another
//! leader of the view or back to their own domain, mapped in full first, before the leader's
//! domain changes; a follower leaving the view does the same. All of it happens within the sync
//! of the invalidation that changed the view, so before the guest's wait completes.

use vm_memory::GuestMemoryBackend;

use super::{FlushMode, SyncStrategy, Vtd};
use crate::space::{Sharing, View, FULL};
use crate::{SourceId, PAGE_SIZE};

/// The host domain an attached device uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DomainUse {
    /// Its own.
    Own,
    /// The host's identity domain shared by every device whose view is identity.
    SharedIdentity,
    /// The own domain of that device, whose view is the same translated tables.
    SharedWith(SourceId),
}

/// What [`Vtd::host_domains`] says of one device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostDomainUse {
    pub source: SourceId,
    pub on: DomainUse,
    /// Host mappings in the device's own domain.
    pub own_mappings: usize,
    /// The 4 KiB pages they map: what the host pins for them.
    pub own_pages: u64,
}

impl<M: GuestMemoryBackend> Vtd<M> {
    /// Settles which devices share whose host domain, after views changed, and syncs the
    /// devices that must go back to their own domain before any other device's sync, while
    /// their leader's domain still maps their view.
    pub(super) fn settle_sharing(&mut self) {
        if !std::mem::take(&mut self.sharing_dirty) {
            return;
        }
        // One leader per view: a device that leads already, else the first synced into it.
        let mut leaders: Vec<(View, SourceId, u32)> = Vec::new();
        for s in self.spaces.values() {
            let Some(domain) = s.leader_domain() else {
                continue;
            };
            match leaders.iter_mut().find(|(v, ..)| *v == s.view) {
                None => leaders.push((s.view, s.source, domain)),
                Some(l) if self.has_followers(s.source) => *l = (s.view, s.source, domain),
                Some(_) => {}
            }
        }
        let mut reports = Vec::new();
        let mut leaving = false;
        for space in self.spaces.values_mut() {
            let leader = leaders
                .iter()
                .find(|(v, ..)| *v == space.view)
                .map(|&(_, s, d)| (s, d));
            match (space.sharing(), leader) {
                (Sharing::Off, _) => continue,
                (_, Some((l, _))) if l == space.source => {}
                (Sharing::Follows { leader: now }, Some((l, _))) if now == l => {}
                (_, Some((l, d))) if space.may_follow() => {
                    let report = space.follow(l, d);
                    let joined = space.sharing() == Sharing::Follows { leader: l };
                    reports.push((space.source, report, joined));
                }
                _ => space.must_leave_or(Sharing::Own),
            }
            leaving |= space.sharing() == Sharing::Leaving;
            // Not synced into its view yet: it may lead, or follow, at the next settle.
            self.sharing_dirty |= space.may_follow() && space.view_changed();
        }
        for (source, report, joined) in reports {
            self.stats.host_domain_joins += u64::from(joined);
            self.account(source, report);
        }
        if !leaving {
            return;
        }
        let per_leaf = self.config.strategy == SyncStrategy::PerLeaf;
        let defer = matches!(self.config.flush, FlushMode::Deferred { .. });
        self.each_space(|env, space| {
            (space.sharing() == Sharing::Leaving).then(|| match per_leaf {
                true => space.sync_per_leaf(env, FULL),
                false => space.sync(env, defer),
            })
        });
    }

    /// Which host domain each attached device uses now, and how many host mappings its own
    /// holds.
    pub fn host_domains(&self) -> Vec<HostDomainUse> {
        self.spaces
            .values()
            .map(|s| HostDomainUse {
                source: s.source,
                on: match s.sharing() {
                    _ if s.on_shared_identity() => DomainUse::SharedIdentity,
                    Sharing::Follows { leader } => DomainUse::SharedWith(leader),
                    _ => DomainUse::Own,
                },
                own_mappings: s.shadow.len(),
                own_pages: s.shadow.mappings().map(|(_, m)| m.len / PAGE_SIZE).sum(),
            })
            .collect()
    }

    /// Whether some device is on `source`'s domain.
    fn has_followers(&self, source: SourceId) -> bool {
        self.spaces
            .values()
            .any(|s| matches!(s.sharing(), Sharing::Follows { leader, .. } if leader == source))
    }
}
