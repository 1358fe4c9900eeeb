//! Counters of what the remapping unit did, for the VMM to print as JSON.

use serde::Serialize;

/// Invalidation descriptors processed, by type.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DescriptorCounts {
    pub context_cache: u64,
    pub iotlb_global: u64,
    pub iotlb_domain: u64,
    pub iotlb_page: u64,
    pub device_iotlb: u64,
    pub interrupt_entry_cache: u64,
    pub wait: u64,
    /// PASID-cache invalidations (scalable mode).
    pub pasid_cache: u64,
    /// PASID-based-IOTLB invalidations (scalable mode), PASID- and page-selective.
    pub pasid_iotlb: u64,
    /// PASID-based device-TLB invalidations (scalable mode).
    pub pasid_device_iotlb: u64,
    /// Descriptors that set FSTS.IQE.
    pub invalid: u64,
}

/// Everything the remapping unit counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    /// Invalidation descriptors fetched from the queue, valid or not.
    pub descriptors: u64,
    /// Of those, 256-bit descriptors (IQA.DW set, as scalable mode requires).
    pub wide_descriptors: u64,
    pub descriptors_by_type: DescriptorCounts,
    /// Register-based invalidations requested (CCMD.ICC and IOTLB.IVT writes), carried out or
    /// not (they are refused while QI is on).
    pub register_invalidations: u64,
    /// Tail writes that found descriptors to process.
    pub submissions: u64,
    /// Wait descriptors completed.
    pub waits: u64,
    pub host_map_calls: u64,
    pub host_unmap_calls: u64,
    /// Host mappings removed: VFIO type1 flushes the host IOTLB once for each.
    pub host_mappings_removed: u64,
    /// Host calls that failed.
    pub host_errors: u64,
    /// Guest page-table pages read while syncing host mappings.
    pub pages_walked: u64,
    /// Translation faults detected, whether or not a fault record took them.
    pub faults: u64,
    /// Translations of emulated devices' requests through first-stage tables (scalable mode).
    pub first_stage_walks: u64,
    /// Host mappings whose unmap was deferred.
    pub deferred_unmaps: u64,
    /// Deferred unmaps cancelled because the guest mapped the same translation again.
    pub deferred_unmaps_cancelled: u64,
    /// Deferred flushes carried out.
    pub deferred_flushes: u64,
    /// Devices moved onto another device's host domain, the guest having put both in one
    /// translated domain ([`crate::Vtd`]'s domain sharing).
    pub host_domain_joins: u64,
    /// Syncs cut short because the guest's tables held more entries than the walk budget.
    pub walk_budget_exceeded: u64,
    /// Interrupt requests and interrupt routes translated through the guest's IRTE table (a
    /// route delivers many interrupts in KVM for one translation).
    pub interrupts_remapped: u64,
    /// Interrupt requests blocked by a remapping fault, whether or not a record took them.
    pub interrupt_faults: u64,
    /// Interrupt-entry-cache invalidations carried out (descriptors and the implicit ones of
    /// SIRTP, IRE and CFI changes).
    pub iec_invalidations: u64,
    /// What the translation caches of emulated devices' requests did.
    pub caches: crate::cache::CacheStats,
    /// Injected faults carried out.
    pub injected: u64,
}

/// What the sync engine holds in memory for the attached devices: each host mapping is one
/// entry of a B-tree (tens of bytes), each snapshot a copy of a guest last-level table (4 KiB).
/// Both follow what the guest maps: one host mapping per run of contiguous guest leaves, at most
/// one snapshot per last-level table the guest's syncs covered whole (and a fixed bound per
/// device).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Footprint {
    pub host_mappings: usize,
    /// Of those, mappings kept on the host for a deferred unmap.
    pub deferred_mappings: usize,
    pub snapshots: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_serialize_with_the_keys_the_vmm_prints() {
        let stats = Stats {
            descriptors: 3,
            waits: 1,
            host_map_calls: 2,
            ..Stats::default()
        };
        let v = serde_json::to_value(stats).expect("plain struct");
        for key in [
            "descriptors",
            "waits",
            "host_map_calls",
            "host_unmap_calls",
            "host_mappings_removed",
            "faults",
            "wide_descriptors",
            "first_stage_walks",
        ] {
            assert!(v.get(key).is_some_and(|v| v.is_u64()), "{key}");
        }
        assert_eq!(v["host_map_calls"], 2);
        assert_eq!(v["descriptors_by_type"]["wait"], 0);
        for key in ["pasid_cache", "pasid_iotlb", "pasid_device_iotlb"] {
            assert_eq!(v["descriptors_by_type"][key], 0, "{key}");
        }
    }
}
