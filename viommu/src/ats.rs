//! Device-TLBs (VT-d spec 6.3): the translation caches of emulated endpoint devices that use
//! Address Translation Services. Such a device keeps the translations the unit answered its
//! translation requests with, and then issues translated requests that the unit does not
//! translate again; only device-TLB invalidations (6.5.2.5, 6.5.2.6), which the unit forwards
//! to the device, remove them. The device owns its [`DeviceTlb`] and hands the unit a shared
//! handle ([`crate::Vtd::attach_device_tlb`]); the unit fills it as it answers translation
//! requests and empties it as the guest invalidates. Lock order: the unit, then the device-TLB.

use std::sync::{Arc, Mutex, MutexGuard};

use crate::cache::iotlb::{Table, Tag};
use crate::cache::Lru;
use crate::Perm;

/// One cached translation of the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AtcEntry {
    /// log2 of the page size the translation completion gave.
    pub shift: u8,
    pub gpa: u64,
    pub perm: Perm,
    /// What the unit's IOTLB would tag the translation with (for invalidation checks).
    pub tag: Tag,
    /// The table it came from; None for a pass-through translation.
    pub table: Option<Table>,
}

/// An endpoint's address translation cache.
#[derive(Debug)]
pub struct DeviceTlb {
    /// ATS Enable in the device's ATS capability: translated requests only while set.
    enabled: bool,
    /// By PASID (None: requests without one) and page address.
    entries: Lru<(Option<u32>, u64), AtcEntry>,
}

/// Page sizes a lookup tries, smallest first.
const SHIFTS: [u8; 3] = [12, 21, 30];

impl DeviceTlb {
    pub fn new(capacity: usize) -> Self {
        DeviceTlb {
            enabled: false,
            entries: Lru::new(capacity),
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Sets ATS Enable; clearing it drops every cached translation (the device may not use them
    /// once software turned ATS off).
    pub fn set_enabled(&mut self, on: bool) {
        if !on {
            self.entries.clear();
        }
        self.enabled = on;
    }

    /// The cached translation of `iova` for requests with `pasid`, and its page address.
    pub fn lookup(&mut self, pasid: Option<u32>, iova: u64) -> Option<(u64, AtcEntry)> {
        SHIFTS.iter().find_map(|&shift| {
            let base = iova & !((1u64 << shift) - 1);
            self.entries
                .get(&(pasid, base))
                .filter(|e| e.shift == shift)
                .map(|e| (base, *e))
        })
    }

    /// The cached translation of the page at `base`, its use not counted.
    pub fn peek(&self, pasid: Option<u32>, base: u64) -> Option<AtcEntry> {
        self.entries.peek(&(pasid, base)).copied()
    }

    /// Caches a translation completion for the page at `base`; true when an entry was evicted.
    pub fn insert(&mut self, pasid: Option<u32>, base: u64, entry: AtcEntry) -> bool {
        self.entries.insert((pasid, base), entry).is_some()
    }

    /// Removes the translations of `pasid` overlapping `range`; returns their page addresses.
    pub fn invalidate(&mut self, pasid: Option<u32>, (start, end): (u64, u64)) -> Vec<u64> {
        self.entries
            .remove_where(|&(p, base), e| {
                p == pasid && base < end && start < base.saturating_add(1 << e.shift)
            })
            .into_iter()
            .map(|((_, base), _)| base)
            .collect()
    }

    /// Every cached translation: (PASID, page address, entry).
    pub fn entries(&self) -> Vec<(Option<u32>, u64, AtcEntry)> {
        self.entries.iter().map(|(&(p, b), e)| (p, b, *e)).collect()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// A device-TLB shared between its device and the unit.
#[derive(Clone, Debug)]
pub struct SharedDeviceTlb(Arc<Mutex<DeviceTlb>>);

impl SharedDeviceTlb {
    pub fn new(capacity: usize) -> Self {
        SharedDeviceTlb(Arc::new(Mutex::new(DeviceTlb::new(capacity))))
    }

    /// Locks it. Every operation completes or is dropped whole, so a lock a panicking thread
    /// poisoned holds consistent state and is taken over.
    pub fn lock(&self) -> MutexGuard<'_, DeviceTlb> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::iotlb::Stage;

    fn entry(shift: u8, gpa: u64) -> AtcEntry {
        AtcEntry {
            shift,
            gpa,
            perm: Perm::RW,
            tag: Tag {
                domain: 1,
                pasid: None,
                stage: Stage::Second,
                privileged: false,
            },
            table: None,
        }
    }

    #[test]
    fn lookups_find_pages_of_any_size_and_invalidations_remove_overlaps_of_their_pasid() {
        let mut t = DeviceTlb::new(8);
        t.set_enabled(true);
        t.insert(None, 0x20_0000, entry(21, 0x80_0000));
        t.insert(None, 0x1000, entry(12, 0x5000));
        t.insert(Some(3), 0x1000, entry(12, 0x6000));
        assert_eq!(
            t.lookup(None, 0x2f_f000),
            Some((0x20_0000, entry(21, 0x80_0000)))
        );
        assert_eq!(t.lookup(Some(3), 0x1234), Some((0x1000, entry(12, 0x6000))));
        assert_eq!(t.invalidate(None, (0x30_0000, 0x30_1000)), vec![0x20_0000]);
        assert_eq!(t.invalidate(None, (0, 0x1000)), Vec::<u64>::new());
        assert_eq!(t.invalidate(None, (0, u64::MAX)), vec![0x1000]);
        assert_eq!(t.len(), 1, "the PASID 3 translation stays");
        t.set_enabled(false);
        assert!(t.is_empty(), "disabling ATS drops the cache");
    }
}
