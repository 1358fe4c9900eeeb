//! Invalidation descriptors (VT-d spec 6.5.2): the legacy ones (types 1-5), valid in both modes,
//! and the PASID-based ones (types 6-8) of scalable mode.
//!
//! A queue of 128-bit descriptors holds [`decode`]'s; in a queue of 256-bit descriptors
//! (IQA.DW), which scalable mode requires, every type defined here uses the low 128 bits and the
//! upper 128 are reserved ([`decode_in`]). Decoding is strict: an unknown type (the PASID-based
//! ones in legacy mode among them) or a reserved bit set makes the descriptor invalid, which the
//! queue reports as FSTS.IQE (6.5.2.10) without acting on it.

use crate::intremap::IecScope;
use crate::regs::MAMV;
use crate::tables::TableMode;
use crate::SourceId;

/// Descriptor type, bits 3:0 (bits 11:9 extend it in newer specs and must be zero here).
const TYPE_MASK: u64 = 0xf | 0x7 << 9;
const TYPE_CONTEXT_CACHE: u64 = 0x1;
const TYPE_IOTLB: u64 = 0x2;
const TYPE_DEVICE_IOTLB: u64 = 0x3;
const TYPE_IEC: u64 = 0x4;
const TYPE_WAIT: u64 = 0x5;
const TYPE_PASID_IOTLB: u64 = 0x6;
const TYPE_PASID_CACHE: u64 = 0x7;
const TYPE_PASID_DEVICE_IOTLB: u64 = 0x8;

const GRANULARITY_SHIFT: u64 = 4;

// 6.5.2.1: context-cache invalidate descriptor.
/// Bits 63:50 and 15:6 (FM is 49:48, SID 47:32, DID 31:16).
const CC_LO_RSVD: u64 = 0xfffc_0000_0000_ffc0;
// 6.5.2.3: IOTLB invalidate descriptor (bits 7:6 are DR and DW).
const IOTLB_LO_RSVD: u64 = 0xffff_ffff_0000_ff00;
const IOTLB_HI_RSVD: u64 = 0xf80;
const IOTLB_HI_IH: u64 = 1 << 6;
// 6.5.2.5: device-TLB invalidate descriptor.
/// Bits 51:48, 31:21 and 8:4 (PFSID is 63:52 and 15:12, SID 47:32, queue depth 20:16).
const DEV_LO_RSVD: u64 = 0x000f_0000_ffe0_01f0;
const DEV_HI_RSVD: u64 = 0xffe;
/// Size (bit 64): the address encodes a range larger than a page.
const DEV_HI_S: u64 = 1 << 0;
// 6.5.2.7: interrupt entry cache invalidate descriptor (G is bit 4, IM 31:27, IIDX 47:32).
const IEC_LO_RSVD: u64 = 0xffff_0000_07ff_ffe0;
const IEC_LO_INDEX_SELECTIVE: u64 = 1 << 4;
const IEC_LO_IM_SHIFT: u64 = 27;
const IEC_LO_IIDX_SHIFT: u64 = 32;
// 6.5.2.8: invalidation wait descriptor. Bit 7 (page-request drain) needs ECAP.PDS: reserved.
const WAIT_LO_IF: u64 = 1 << 4;
const WAIT_LO_SW: u64 = 1 << 5;
const WAIT_LO_FN: u64 = 1 << 6;
const WAIT_LO_RSVD: u64 = 0xffff_ff80;
const WAIT_HI_RSVD: u64 = 0x3;
// 6.5.2.2 and 6.5.2.4: PASID-cache and PASID-based-IOTLB descriptors share their low quadword:
// granularity 5:4, domain id 31:16, PASID 51:32; bits 8:6, 15:12 and 63:52 are reserved.
const PASID_LO_RSVD: u64 = 0xfff0_0000_0000_f1c0;
const PASID_SHIFT: u64 = 32;
const PASID_MASK: u64 = 0xf_ffff;
// 6.5.2.4: the PASID-based-IOTLB high quadword is the IOTLB one's (address, IH, AM).
const PASID_IOTLB_HI_RSVD: u64 = IOTLB_HI_RSVD;
// 6.5.2.6: PASID-based device-TLB: PFSID 63:52 and 15:12, PASID 51:32, SID 31:16, MIP 8:4 in
// the low quadword; address 63:12, S (11) and G (0) in the high one, bits 10:1 reserved.
const PASID_DEV_HI_RSVD: u64 = 0x7fe;
/// Size (bit 75).
const PASID_DEV_HI_S: u64 = 1 << 11;

/// Which context-cache entries a context-cache invalidation covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ContextScope {
    Global,
    Domain(u16),
    /// Device-selective: the source id with the function bits that `function_mask` says to
    /// ignore (0: none, 1: bit 2, 2: bits 2:1, 3: all three).
    Device {
        domain: u16,
        source: SourceId,
        function_mask: u8,
    },
}

impl ContextScope {
    /// Does this invalidation cover `source`, whose cached context is in `domain`?
    pub fn covers(&self, source: SourceId, domain: Option<u16>) -> bool {
        match *self {
            ContextScope::Global => true,
            ContextScope::Domain(d) => domain == Some(d),
            ContextScope::Device {
                source: s,
                function_mask,
                ..
            } => {
                let ignored = match function_mask {
                    0 => 0,
                    1 => 0b100,
                    2 => 0b110,
                    _ => 0b111,
                };
                source.0 | ignored == s.0 | ignored
            }
        }
    }
}

/// Which IOTLB entries an IOTLB invalidation covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IotlbScope {
    Global,
    Domain(u16),
    /// Page-selective: 2^`am` pages at `addr` (aligned down to that size), in `domain`.
    Page {
        domain: u16,
        addr: u64,
        am: u8,
        /// Invalidation hint: only leaf entries changed.
        ih: bool,
    },
}

impl IotlbScope {
    /// The address range a page-selective invalidation covers. A mask of the whole address
    /// space or more (PASID-based invalidations take any AM up to 63) covers everything.
    pub fn page_range(addr: u64, am: u8) -> (u64, u64) {
        let Some(size) = 1u64.checked_shl(crate::PAGE_SHIFT + u32::from(am)) else {
            return (0, u64::MAX);
        };
        let start = addr & !(size - 1);
        (start, start.saturating_add(size))
    }
}

/// Which PASID-cache entries a PASID-cache invalidation covers (6.5.2.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PasidCacheScope {
    /// Every cached PASID entry.
    Global,
    /// The entries with this domain id.
    Domain(u16),
    /// The entry of `pasid` in `domain`.
    Pasid { domain: u16, pasid: u32 },
}

impl PasidCacheScope {
    /// Does this invalidation cover a cached PASID entry of `pasid` in `domain`? An entry the
    /// unit could not resolve (None) is always covered: re-reading more than asked is allowed.
    pub fn covers(&self, domain: Option<u16>, pasid: Option<u32>) -> bool {
        match (*self, domain, pasid) {
            (PasidCacheScope::Global, _, _) | (_, None, _) => true,
            (PasidCacheScope::Domain(d), Some(dom), _) => d == dom,
            (
                PasidCacheScope::Pasid {
                    domain: d,
                    pasid: p,
                },
                Some(dom),
                Some(pas),
            ) => d == dom && p == pas,
            (PasidCacheScope::Pasid { .. }, Some(_), None) => true,
        }
    }
}

/// Which IOTLB entries a PASID-based-IOTLB invalidation covers (6.5.2.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PasidIotlbScope {
    /// Every mapping of `pasid` in `domain`.
    Pasid { domain: u16, pasid: u32 },
    /// 2^`am` pages at `addr` (aligned down to that size) of `pasid` in `domain`.
    Page {
        domain: u16,
        pasid: u32,
        addr: u64,
        am: u8,
        ih: bool,
    },
}

impl PasidIotlbScope {
    pub fn domain(&self) -> u16 {
        match *self {
            PasidIotlbScope::Pasid { domain, .. } | PasidIotlbScope::Page { domain, .. } => domain,
        }
    }

    pub fn pasid(&self) -> u32 {
        match *self {
            PasidIotlbScope::Pasid { pasid, .. } | PasidIotlbScope::Page { pasid, .. } => pasid,
        }
    }

    /// The address range the invalidation covers, or None for all of it.
    pub fn range(&self) -> Option<(u64, u64)> {
        match *self {
            PasidIotlbScope::Pasid { .. } => None,
            PasidIotlbScope::Page { addr, am, .. } => Some(IotlbScope::page_range(addr, am)),
        }
    }
}

/// Which translations a device-TLB invalidation removes from a device's device-TLB (6.5.2.5
/// and 6.5.2.6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceTlbScope {
    /// The device (its requester id).
    pub source: SourceId,
    /// The PASID of a PASID-based invalidation; None for translations of requests without one.
    pub pasid: Option<u32>,
    /// The untranslated addresses covered.
    pub range: (u64, u64),
}

impl DeviceTlbScope {
    /// The range an address and size bit name, as ATS invalidation requests encode it: with S
    /// clear the 4 KiB page at `addr`; with S set, 2^(k + 1) bytes where bit k is the lowest
    /// clear bit of the address from bit 12 (all of them: the whole address space).
    pub fn range(addr: u64, size: bool) -> (u64, u64) {
        let addr = addr & !0xfff;
        if !size {
            return (addr, addr.saturating_add(0x1000));
        }
        let shift = 12 + (addr >> 12).trailing_ones() + 1;
        match 1u64.checked_shl(shift) {
            Some(len) if shift < 64 => {
                let base = addr & !(len - 1);
                (base, base.saturating_add(len))
            }
            _ => (0, u64::MAX),
        }
    }
}

/// A decoded invalidation descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Descriptor {
    ContextCache(ContextScope),
    Iotlb(IotlbScope),
    /// Device-TLB invalidation: the translations of one ATS device over a range.
    DeviceIotlb(DeviceTlbScope),
    /// PASID-cache invalidation (scalable mode): cached PASID entries are re-read.
    PasidCache(PasidCacheScope),
    /// PASID-based-IOTLB invalidation (scalable mode).
    PasidIotlb(PasidIotlbScope),
    /// PASID-based device-TLB invalidation (scalable mode): the translations of one ATS device
    /// for one PASID over a range.
    PasidDeviceIotlb(DeviceTlbScope),
    /// Interrupt entry cache invalidation: cached interrupt remappings are dropped.
    InterruptEntryCache(IecScope),
    Wait {
        /// Write `status_data` to `status_addr` when complete.
        status_write: Option<(u64, u32)>,
        /// Signal the invalidation completion event.
        interrupt: bool,
        fence: bool,
    },
}

/// Why a descriptor is invalid.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InvalidDescriptor {
    #[error("unknown descriptor type {0:#x}")]
    UnknownType(u64),
    #[error("reserved bits set in descriptor {lo:#018x}:{hi:#018x}")]
    Reserved { lo: u64, hi: u64 },
    #[error("reserved granularity {0} in descriptor")]
    Granularity(u64),
    #[error("address mask {0} beyond MAMV")]
    AddressMask(u64),
}

/// Decodes the 128-bit descriptor whose low and high quadwords are `lo` and `hi`, as a queue
/// of 128-bit descriptors holds it (legacy mode).
pub fn decode(lo: u64, hi: u64) -> Result<Descriptor, InvalidDescriptor> {
    decode_in(TableMode::Legacy, [lo, hi, 0, 0])
}

/// Decodes the descriptor `words` (its quadwords in order; the upper two are zero in a queue of
/// 128-bit descriptors) for a unit translating in `mode`: the PASID-based types exist only in
/// scalable mode.
pub fn decode_in(mode: TableMode, words: [u64; 4]) -> Result<Descriptor, InvalidDescriptor> {
    let [lo, hi, w2, w3] = words;
    let reserved = |lo_mask: u64, hi_mask: u64| {
        if lo & lo_mask != 0 || hi & hi_mask != 0 || w2 != 0 || w3 != 0 {
            Err(InvalidDescriptor::Reserved { lo, hi })
        } else {
            Ok(())
        }
    };
    let granularity = (lo >> GRANULARITY_SHIFT) & 0b11;
    let domain = ((lo >> 16) & 0xffff) as u16;
    let pasid = ((lo >> PASID_SHIFT) & PASID_MASK) as u32;
    let scalable = mode == TableMode::Scalable;
    match lo & TYPE_MASK {
        TYPE_CONTEXT_CACHE => {
            reserved(CC_LO_RSVD, u64::MAX)?;
            let scope = match granularity {
                1 => ContextScope::Global,
                2 => ContextScope::Domain(domain),
                3 => ContextScope::Device {
                    domain,
                    source: SourceId(((lo >> 32) & 0xffff) as u16),
                    function_mask: ((lo >> 48) & 0b11) as u8,
                },
                g => return Err(InvalidDescriptor::Granularity(g)),
            };
            Ok(Descriptor::ContextCache(scope))
        }
        TYPE_IOTLB => {
            reserved(IOTLB_LO_RSVD, IOTLB_HI_RSVD)?;
            let scope = match granularity {
                1 => IotlbScope::Global,
                2 => IotlbScope::Domain(domain),
                3 => {
                    let am = hi & 0x3f;
                    if am > MAMV {
                        return Err(InvalidDescriptor::AddressMask(am));
                    }
                    IotlbScope::Page {
                        domain,
                        addr: hi & !0xfff,
                        am: am as u8,
                        ih: hi & IOTLB_HI_IH != 0,
                    }
                }
                g => return Err(InvalidDescriptor::Granularity(g)),
            };
            Ok(Descriptor::Iotlb(scope))
        }
        TYPE_DEVICE_IOTLB => {
            reserved(DEV_LO_RSVD, DEV_HI_RSVD)?;
            Ok(Descriptor::DeviceIotlb(DeviceTlbScope {
                source: SourceId((lo >> 32) as u16),
                pasid: None,
                range: DeviceTlbScope::range(hi, hi & DEV_HI_S != 0),
            }))
        }
        TYPE_IEC => {
            reserved(IEC_LO_RSVD, u64::MAX)?;
            let scope = if lo & IEC_LO_INDEX_SELECTIVE != 0 {
                IecScope::Index {
                    index: (lo >> IEC_LO_IIDX_SHIFT) as u16,
                    mask: ((lo >> IEC_LO_IM_SHIFT) & 0x1f) as u8,
                }
            } else {
                IecScope::Global
            };
            Ok(Descriptor::InterruptEntryCache(scope))
        }
        TYPE_WAIT => {
            reserved(WAIT_LO_RSVD, WAIT_HI_RSVD)?;
            let status_write = (lo & WAIT_LO_SW != 0).then_some((hi & !0x3, (lo >> 32) as u32));
            Ok(Descriptor::Wait {
                status_write,
                interrupt: lo & WAIT_LO_IF != 0,
                fence: lo & WAIT_LO_FN != 0,
            })
        }
        TYPE_PASID_CACHE if scalable => {
            reserved(PASID_LO_RSVD, u64::MAX)?;
            let scope = match granularity {
                0 => PasidCacheScope::Domain(domain),
                1 => PasidCacheScope::Pasid { domain, pasid },
                3 => PasidCacheScope::Global,
                g => return Err(InvalidDescriptor::Granularity(g)),
            };
            Ok(Descriptor::PasidCache(scope))
        }
        TYPE_PASID_IOTLB if scalable => {
            reserved(PASID_LO_RSVD, PASID_IOTLB_HI_RSVD)?;
            // The address mask is not bounded by CAP.MAMV (which concerns type 2 only).
            let scope = match granularity {
                2 => PasidIotlbScope::Pasid { domain, pasid },
                3 => PasidIotlbScope::Page {
                    domain,
                    pasid,
                    addr: hi & !0xfff,
                    am: (hi & 0x3f) as u8,
                    ih: hi & IOTLB_HI_IH != 0,
                },
                g => return Err(InvalidDescriptor::Granularity(g)),
            };
            Ok(Descriptor::PasidIotlb(scope))
        }
        TYPE_PASID_DEVICE_IOTLB if scalable => {
            reserved(0, PASID_DEV_HI_RSVD)?;
            Ok(Descriptor::PasidDeviceIotlb(DeviceTlbScope {
                source: SourceId((lo >> 16) as u16),
                pasid: Some(pasid),
                range: DeviceTlbScope::range(hi, hi & PASID_DEV_HI_S != 0),
            }))
        }
        t => Err(InvalidDescriptor::UnknownType(t)),
    }
}

pub mod encode;

#[cfg(test)]
mod tests {
    use super::*;

    fn dec(d: [u64; 2]) -> Result<Descriptor, InvalidDescriptor> {
        decode(d[0], d[1])
    }

    #[test]
    fn every_encoded_descriptor_decodes_to_its_meaning() {
        let sid = SourceId::new(1, 2, 3);
        assert_eq!(
            dec(encode::context_global()),
            Ok(Descriptor::ContextCache(ContextScope::Global))
        );
        assert_eq!(
            dec(encode::context_domain(9)),
            Ok(Descriptor::ContextCache(ContextScope::Domain(9)))
        );
        assert_eq!(
            dec(encode::context_device(9, sid, 2)),
            Ok(Descriptor::ContextCache(ContextScope::Device {
                domain: 9,
                source: sid,
                function_mask: 2
            }))
        );
        assert_eq!(
            dec(encode::iotlb_page(3, 0x12_3456, 5, true)),
            Ok(Descriptor::Iotlb(IotlbScope::Page {
                domain: 3,
                addr: 0x12_3000,
                am: 5,
                ih: true
            }))
        );
        assert_eq!(
            dec(encode::iotlb_domain(3)),
            Ok(Descriptor::Iotlb(IotlbScope::Domain(3)))
        );
        assert_eq!(
            dec(encode::iotlb_global()),
            Ok(Descriptor::Iotlb(IotlbScope::Global))
        );
        assert_eq!(
            dec(encode::wait(Some((0x1004, 7)), true, true)),
            Ok(Descriptor::Wait {
                status_write: Some((0x1004, 7)),
                interrupt: true,
                fence: true
            })
        );
        assert_eq!(
            dec(encode::device_iotlb(sid, 0x5000, true)),
            Ok(Descriptor::DeviceIotlb(DeviceTlbScope {
                source: sid,
                pasid: None,
                range: (0x4000, 0x8000)
            }))
        );
        assert_eq!(
            dec(encode::interrupt_entry_cache(Some((4, 2)))),
            Ok(Descriptor::InterruptEntryCache(IecScope::Index {
                index: 4,
                mask: 2
            }))
        );
        assert_eq!(
            dec(encode::interrupt_entry_cache(None)),
            Ok(Descriptor::InterruptEntryCache(IecScope::Global))
        );
    }

    fn sm(d: [u64; 2]) -> Result<Descriptor, InvalidDescriptor> {
        decode_in(TableMode::Scalable, [d[0], d[1], 0, 0])
    }

    #[test]
    fn pasid_descriptors_decode_to_their_meaning_in_scalable_mode() {
        assert_eq!(
            sm(encode::pasid_cache_global()),
            Ok(Descriptor::PasidCache(PasidCacheScope::Global))
        );
        assert_eq!(
            sm(encode::pasid_cache_domain(5)),
            Ok(Descriptor::PasidCache(PasidCacheScope::Domain(5)))
        );
        assert_eq!(
            sm(encode::pasid_cache_pasid(5, 0xf_ffff)),
            Ok(Descriptor::PasidCache(PasidCacheScope::Pasid {
                domain: 5,
                pasid: 0xf_ffff
            }))
        );
        assert_eq!(
            sm(encode::pasid_iotlb_pasid(3, 9)),
            Ok(Descriptor::PasidIotlb(PasidIotlbScope::Pasid {
                domain: 3,
                pasid: 9
            }))
        );
        assert_eq!(
            sm(encode::pasid_iotlb_page(3, 9, 0x12_3456, 40, true)),
            Ok(Descriptor::PasidIotlb(PasidIotlbScope::Page {
                domain: 3,
                pasid: 9,
                addr: 0x12_3000,
                am: 40,
                ih: true
            })),
            "MAMV does not bound a PASID-based mask"
        );
        assert_eq!(
            sm(encode::pasid_device_iotlb(SourceId(0x18), 2, 0x5000, true)),
            Ok(Descriptor::PasidDeviceIotlb(DeviceTlbScope {
                source: SourceId(0x18),
                pasid: Some(2),
                range: (0x4000, 0x8000)
            }))
        );
        // The legacy types keep their meaning in scalable mode.
        assert_eq!(
            sm(encode::iotlb_page(3, 0x5000, 0, false)),
            dec(encode::iotlb_page(3, 0x5000, 0, false))
        );
        assert_eq!(
            sm(encode::interrupt_entry_cache(None)),
            Ok(Descriptor::InterruptEntryCache(IecScope::Global))
        );
    }

    #[test]
    fn pasid_descriptors_are_unknown_types_in_legacy_mode() {
        for d in [
            encode::pasid_cache_global(),
            encode::pasid_iotlb_pasid(1, 1),
            encode::pasid_device_iotlb(SourceId(0), 0, 0, false),
        ] {
            assert!(matches!(dec(d), Err(InvalidDescriptor::UnknownType(_))));
            let wide = [d[0], d[1], 0, 0];
            assert!(matches!(
                decode_in(TableMode::Legacy, wide),
                Err(InvalidDescriptor::UnknownType(_))
            ));
        }
        // Page group responses need ECAP.PRS: unknown in both modes.
        assert!(sm([0x9, 0]).is_err());
    }

    #[test]
    fn reserved_granularities_and_bits_of_pasid_descriptors_are_invalid() {
        assert_eq!(
            sm([0x7 | 2 << 4, 0]),
            Err(InvalidDescriptor::Granularity(2))
        );
        for g in [0, 1] {
            assert_eq!(
                sm([0x6 | g << 4, 0]),
                Err(InvalidDescriptor::Granularity(g))
            );
        }
        let cases = [
            (encode::pasid_cache_global(), 1 << 6, 0),
            (encode::pasid_cache_global(), 1 << 52, 0),
            (encode::pasid_cache_global(), 0, 1),
            (encode::pasid_iotlb_page(1, 1, 0, 0, false), 1 << 12, 0),
            (encode::pasid_iotlb_page(1, 1, 0, 0, false), 0, 1 << 7),
            (
                encode::pasid_device_iotlb(SourceId(0), 0, 0, false),
                0,
                1 << 1,
            ),
        ];
        for ([lo, hi], bad_lo, bad_hi) in cases {
            assert!(sm([lo, hi]).is_ok());
            assert!(
                matches!(
                    sm([lo | bad_lo, hi | bad_hi]),
                    Err(InvalidDescriptor::Reserved { .. })
                ),
                "{lo:#x}|{bad_lo:#x} {hi:#x}|{bad_hi:#x}"
            );
        }
    }

    #[test]
    fn the_upper_half_of_a_256_bit_descriptor_is_reserved_for_every_type() {
        for d in [
            encode::context_global(),
            encode::iotlb_global(),
            encode::wait(None, true, false),
            encode::interrupt_entry_cache(None),
            encode::pasid_cache_global(),
            encode::pasid_iotlb_pasid(1, 1),
        ] {
            for mode in [TableMode::Legacy, TableMode::Scalable] {
                for upper in [[1, 0], [0, 1 << 63]] {
                    let r = decode_in(mode, [d[0], d[1], upper[0], upper[1]]);
                    assert!(r.is_err(), "{d:x?} {upper:x?} in {mode:?}");
                }
            }
        }
    }

    #[test]
    fn pasid_cache_scopes_cover_what_they_name_and_unresolved_entries() {
        let p = PasidCacheScope::Pasid {
            domain: 2,
            pasid: 7,
        };
        assert!(p.covers(Some(2), Some(7)));
        assert!(!p.covers(Some(2), Some(8)));
        assert!(!p.covers(Some(3), Some(7)));
        assert!(p.covers(None, None));
        assert!(PasidCacheScope::Domain(2).covers(Some(2), Some(99)));
        assert!(!PasidCacheScope::Domain(2).covers(Some(3), Some(7)));
        assert!(PasidCacheScope::Global.covers(Some(3), Some(7)));
    }

    #[test]
    fn unknown_types_are_invalid() {
        for t in [0x0, 0x6, 0x7, 0x8, 0xf, 0x5 | 1 << 9] {
            assert!(decode(t, 0).is_err(), "type {t:#x}");
        }
    }

    #[test]
    fn reserved_bits_make_every_type_invalid() {
        let cases = [
            (encode::context_global(), 1 << 8, 0),
            (encode::context_global(), 0, 1),
            (encode::iotlb_global(), 1 << 40, 0),
            (encode::iotlb_page(1, 0, 0, false), 0, 1 << 8),
            (encode::device_iotlb(SourceId(0), 0, false), 1 << 4, 0),
            (encode::interrupt_entry_cache(None), 1 << 5, 0),
            (encode::wait(None, true, false), 1 << 8, 0),
            (encode::wait(Some((0x1000, 0)), false, false), 0, 1),
        ];
        for ([lo, hi], bad_lo, bad_hi) in cases {
            assert!(decode(lo, hi).is_ok());
            assert!(
                matches!(
                    decode(lo | bad_lo, hi | bad_hi),
                    Err(InvalidDescriptor::Reserved { .. })
                ),
                "{lo:#x}|{bad_lo:#x} {hi:#x}|{bad_hi:#x}"
            );
        }
    }

    #[test]
    fn zero_granularity_and_address_mask_beyond_mamv_are_invalid() {
        assert_eq!(decode(0x1, 0), Err(InvalidDescriptor::Granularity(0)));
        assert_eq!(decode(0x2, 0), Err(InvalidDescriptor::Granularity(0)));
        let [lo, hi] = encode::iotlb_page(1, 0, 19, false);
        assert_eq!(decode(lo, hi), Err(InvalidDescriptor::AddressMask(19)));
    }

    #[test]
    fn page_range_aligns_down_to_the_mask() {
        assert_eq!(IotlbScope::page_range(0x5000, 0), (0x5000, 0x6000));
        assert_eq!(IotlbScope::page_range(0x5000, 2), (0x4000, 0x8000));
        let (s, e) = IotlbScope::page_range(!0xfff, 18);
        assert!(s < e, "no overflow at the top of the address space");
        assert_eq!(IotlbScope::page_range(0x5000, 63), (0, u64::MAX));
    }

    #[test]
    fn device_scope_honours_the_function_mask() {
        let s = ContextScope::Device {
            domain: 0,
            source: SourceId::new(0, 3, 0),
            function_mask: 3,
        };
        assert!(s.covers(SourceId::new(0, 3, 7), None));
        assert!(!s.covers(SourceId::new(0, 4, 0), None));
        let exact = ContextScope::Device {
            domain: 0,
            source: SourceId::new(0, 3, 1),
            function_mask: 0,
        };
        assert!(!exact.covers(SourceId::new(0, 3, 0), None));
    }

    #[test]
    fn a_device_tlb_range_is_a_page_or_the_size_its_lowest_clear_address_bit_gives() {
        assert_eq!(DeviceTlbScope::range(0x5123, false), (0x5000, 0x6000));
        // S set, bit 12 clear: 8 KiB.
        assert_eq!(DeviceTlbScope::range(0x4000, true), (0x4000, 0x6000));
        // Linux's mask 3 (8 pages): bits 13:12 set, bit 14 clear: 32 KiB... aligned down.
        assert_eq!(DeviceTlbScope::range(0x1_3000, true), (0x1_0000, 0x1_8000));
        // Linux's whole-address-space flush: every bit below 63 set.
        assert_eq!(DeviceTlbScope::range((1 << 63) - 1, true), (0, u64::MAX));
        assert_eq!(DeviceTlbScope::range(u64::MAX, true), (0, u64::MAX));
    }
}
