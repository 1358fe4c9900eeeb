//! Encoders for the descriptors, as a guest driver writes them (used by tests and benchmarks).

use crate::SourceId;

pub fn context_global() -> [u64; 2] {
    [0x1 | 1 << 4, 0]
}

pub fn context_domain(domain: u16) -> [u64; 2] {
    [0x1 | 2 << 4 | u64::from(domain) << 16, 0]
}

pub fn context_device(domain: u16, source: SourceId, function_mask: u8) -> [u64; 2] {
    [
        0x1 | 3 << 4
            | u64::from(domain) << 16
            | u64::from(source.0) << 32
            | u64::from(function_mask & 3) << 48,
        0,
    ]
}

pub fn iotlb_global() -> [u64; 2] {
    [0x2 | 1 << 4, 0]
}

pub fn iotlb_domain(domain: u16) -> [u64; 2] {
    [0x2 | 2 << 4 | u64::from(domain) << 16, 0]
}

pub fn iotlb_page(domain: u16, addr: u64, am: u8, ih: bool) -> [u64; 2] {
    [
        0x2 | 3 << 4 | u64::from(domain) << 16,
        (addr & !0xfff) | u64::from(ih) << 6 | u64::from(am & 0x3f),
    ]
}

pub fn wait(status: Option<(u64, u32)>, interrupt: bool, fence: bool) -> [u64; 2] {
    let mut lo = 0x5 | u64::from(interrupt) << 4 | u64::from(fence) << 6;
    let mut hi = 0;
    if let Some((addr, data)) = status {
        lo |= 1 << 5 | u64::from(data) << 32;
        hi = addr & !0x3;
    }
    [lo, hi]
}

pub fn device_iotlb(source: SourceId, addr: u64, size: bool) -> [u64; 2] {
    [
        0x3 | u64::from(source.0) << 32,
        (addr & !0xfff) | u64::from(size),
    ]
}

/// Global (`None`) or index-selective over the 2^`mask` entries at `index`.
pub fn interrupt_entry_cache(index: Option<(u16, u8)>) -> [u64; 2] {
    match index {
        None => [0x4, 0],
        Some((i, mask)) => [
            0x4 | 1 << 4 | u64::from(mask & 0x1f) << 27 | u64::from(i) << 32,
            0,
        ],
    }
}

/// Linux's `qi_flush_pasid_cache(iommu, 0, QI_PC_GLOBAL, 0)`.
pub fn pasid_cache_global() -> [u64; 2] {
    [0x7 | 3 << 4, 0]
}

/// Every PASID entry of `domain` (`QI_PC_ALL_PASIDS`).
pub fn pasid_cache_domain(domain: u16) -> [u64; 2] {
    [0x7 | u64::from(domain) << 16, 0]
}

/// The entry of `pasid` in `domain` (`QI_PC_PASID_SEL`).
pub fn pasid_cache_pasid(domain: u16, pasid: u32) -> [u64; 2] {
    [
        0x7 | 1 << 4 | u64::from(domain) << 16 | u64::from(pasid & 0xf_ffff) << 32,
        0,
    ]
}

/// Every mapping of `pasid` in `domain` (`qi_flush_piotlb` with `npages == -1`).
pub fn pasid_iotlb_pasid(domain: u16, pasid: u32) -> [u64; 2] {
    [
        0x6 | 2 << 4 | u64::from(domain) << 16 | u64::from(pasid & 0xf_ffff) << 32,
        0,
    ]
}

/// 2^`am` pages at `addr` of `pasid` in `domain`.
pub fn pasid_iotlb_page(domain: u16, pasid: u32, addr: u64, am: u8, ih: bool) -> [u64; 2] {
    [
        0x6 | 3 << 4 | u64::from(domain) << 16 | u64::from(pasid & 0xf_ffff) << 32,
        (addr & !0xfff) | u64::from(ih) << 6 | u64::from(am & 0x3f),
    ]
}

/// A PASID-based device-TLB invalidation (`qi_flush_dev_iotlb_pasid`).
pub fn pasid_device_iotlb(source: SourceId, pasid: u32, addr: u64, size: bool) -> [u64; 2] {
    [
        0x8 | u64::from(source.0) << 16 | u64::from(pasid & 0xf_ffff) << 32,
        (addr & !0xfff) | u64::from(size) << 11,
    ]
}
