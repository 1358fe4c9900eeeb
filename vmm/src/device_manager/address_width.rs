//! The virtual VT-d's address width (CAP.SAGAW/MGAW, the DMAR table's host address width)
//! against the host IOMMUs of the devices behind it.
//!
//! The engine maps on the host at the IOVAs the guest chose. A guest offered 48 bits may map
//! anywhere below 2^48 (Linux with `iommu.forcedac=1` starts at the top), so a host IOMMU
//! that reaches only 39 bits (QEMU's intel-iommu by default, many client parts) would refuse
//! those maps and the device's DMA would fault. As QEMU does when it checks the host IOMMU's
//! capabilities, the guest is never offered an aperture a device's host cannot map.

use passthrough::iova::IovaRanges;

/// The widths the VT-d model offers (SAGAW: 3-level tables, and 4-level ones at 48), widest
/// first.
pub const WIDTHS: [u32; 2] = [48, 39];

/// The highest IOVA a `bits`-bit guest address width lets the guest map.
const fn top(bits: u32) -> u64 {
    (1 << bits) - 1
}

/// What the host can map for one device behind the VT-d.
#[derive(Clone, Copy, Debug)]
pub struct HostIova<'a> {
    /// The device's host address, DDDD:BB:DD.F.
    pub device: &'a str,
    /// The usable IOVA ranges of its host address space; None when the host does not say.
    pub ranges: Option<&'a IovaRanges>,
}

/// The width the unit gets, and the device whose host reaches least (with its highest IOVA).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fit {
    pub bits: u32,
    pub narrowest: Option<(String, u64)>,
}

/// A width no unit can have with these devices behind it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AddressWidthError {
    /// `aw-bits=` asked for more than a device's host maps.
    #[error(
        "--viommu aw-bits={requested}: device {device}'s host IOMMU maps IOVAs up to \
         {highest:#x} only, short of {:#x}; use --viommu aw-bits={fits}",
        top(*requested)
    )]
    RequestedTooWide {
        requested: u32,
        device: String,
        highest: u64,
        /// The widest width that fits.
        fits: u32,
    },
    /// A device's host maps less than the narrowest width the unit offers.
    #[error(
        "device {device}: its host IOMMU maps IOVAs up to {highest:#x} only, short of the \
         virtual VT-d's narrowest address width (39 bits, up to {:#x}); it cannot be behind \
         the VT-d: assign it without --viommu",
        top(39)
    )]
    HostTooNarrow { device: String, highest: u64 },
    /// A device's host maps no IOVA at all.
    #[error("device {device}: its host IOMMU reports no usable IOVA range; it cannot be behind the virtual VT-d")]
    NoUsableIova { device: String },
}

/// The unit's width for the devices `hosts` behind it: `requested` (`aw-bits=`) when every
/// host reaches its top, else an error; without it the widest of [`WIDTHS`] every host
/// reaches. A host that does not report its ranges is taken to map everything.
pub fn fit(requested: Option<u32>, hosts: &[HostIova<'_>]) -> Result<Fit, AddressWidthError> {
    let mut narrowest: Option<(&str, u64)> = None;
    for h in hosts {
        let Some(ranges) = h.ranges else { continue };
        let highest = ranges
            .highest()
            .ok_or_else(|| AddressWidthError::NoUsableIova {
                device: h.device.to_string(),
            })?;
        if narrowest.is_none_or(|(_, n)| highest < n) {
            narrowest = Some((h.device, highest));
        }
    }
    let Some((device, highest)) = narrowest else {
        return Ok(Fit {
            bits: requested.unwrap_or(WIDTHS[0]),
            narrowest: None,
        });
    };
    let reaches = |bits: u32| highest >= top(bits);
    let bits = match (requested, WIDTHS.into_iter().find(|&w| reaches(w))) {
        (Some(r), _) if reaches(r) => r,
        (None, Some(widest)) => widest,
        (Some(requested), Some(fits)) => {
            return Err(AddressWidthError::RequestedTooWide {
                requested,
                device: device.to_string(),
                highest,
                fits,
            })
        }
        (_, None) => {
            return Err(AddressWidthError::HostTooNarrow {
                device: device.to_string(),
                highest,
            })
        }
    };
    Ok(Fit {
        bits,
        narrowest: Some((device.to_string(), highest)),
    })
}

/// [`fit`], and the log line that says which width and why when the user left it to us.
pub fn choose(requested: Option<u32>, hosts: &[HostIova<'_>]) -> Result<u32, AddressWidthError> {
    let f = fit(requested, hosts)?;
    match (&f.narrowest, requested) {
        (Some((device, highest)), None) if f.bits < WIDTHS[0] => log::info!(
            "VT-d: address width {} bits: {device}'s host IOMMU maps IOVAs up to {highest:#x} \
             only, short of {} bits",
            f.bits,
            WIDTHS[0]
        ),
        (Some((device, highest)), None) => log::info!(
            "VT-d: address width {} bits: every device's host IOMMU reaches {:#x} (the \
             narrowest, {device}'s, up to {highest:#x})",
            f.bits,
            top(f.bits)
        ),
        _ => log::debug!("VT-d: address width {} bits", f.bits),
    }
    Ok(f.bits)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ranges(r: &[(u64, u64)]) -> IovaRanges {
        IovaRanges::new(r.iter().copied()).unwrap()
    }

    /// QEMU's intel-iommu at its default 39 bits, with the MSI window reserved.
    fn host39() -> IovaRanges {
        ranges(&[(0, 0xfedf_ffff), (0xfef0_0000, top(39))])
    }

    fn host48() -> IovaRanges {
        ranges(&[(0, 0xfedf_ffff), (0xfef0_0000, top(48))])
    }

    fn host57() -> IovaRanges {
        ranges(&[(0, top(57))])
    }

    fn bits(requested: Option<u32>, hosts: &[HostIova<'_>]) -> Result<u32, AddressWidthError> {
        fit(requested, hosts).map(|f| f.bits)
    }

    #[test]
    fn without_aw_bits_the_width_is_48_where_every_host_reaches_it_else_39() {
        assert_eq!(bits(None, &[]), Ok(48), "no device: the default");
        let (h48, h57, h39) = (host48(), host57(), host39());
        let a = HostIova {
            device: "0000:01:00.0",
            ranges: Some(&h48),
        };
        let b = HostIova {
            device: "0000:02:00.0",
            ranges: Some(&h57),
        };
        let c = HostIova {
            device: "0000:03:00.0",
            ranges: Some(&h39),
        };
        assert_eq!(
            fit(None, &[a, b]),
            Ok(Fit {
                bits: 48,
                narrowest: Some(("0000:01:00.0".into(), top(48)))
            })
        );
        assert_eq!(
            fit(None, &[b, c, a]),
            Ok(Fit {
                bits: 39,
                narrowest: Some(("0000:03:00.0".into(), top(39)))
            }),
            "one 39-bit host narrows the unit"
        );
        assert_eq!(choose(None, &[a, c]), Ok(39));
    }

    #[test]
    fn a_host_that_does_not_report_its_ranges_constrains_nothing() {
        let unknown = HostIova {
            device: "0000:01:00.0",
            ranges: None,
        };
        assert_eq!(bits(None, &[unknown]), Ok(48));
        assert_eq!(bits(Some(39), &[unknown]), Ok(39));
    }

    #[test]
    fn an_explicit_width_is_kept_when_it_fits_and_refused_in_one_line_when_not() {
        let (h39, h48) = (host39(), host48());
        let narrow = HostIova {
            device: "0000:00:03.0",
            ranges: Some(&h39),
        };
        let wide = HostIova {
            device: "0000:00:04.0",
            ranges: Some(&h48),
        };
        assert_eq!(bits(Some(39), &[wide, narrow]), Ok(39));
        assert_eq!(bits(Some(48), &[wide]), Ok(48));
        let e = fit(Some(48), &[wide, narrow]).unwrap_err();
        assert_eq!(
            e,
            AddressWidthError::RequestedTooWide {
                requested: 48,
                device: "0000:00:03.0".into(),
                highest: top(39),
                fits: 39
            }
        );
        assert_eq!(
            e.to_string(),
            "--viommu aw-bits=48: device 0000:00:03.0's host IOMMU maps IOVAs up to \
             0x7fffffffff only, short of 0xffffffffffff; use --viommu aw-bits=39"
        );
    }

    #[test]
    fn a_host_short_of_39_bits_or_with_no_range_is_an_error_whatever_was_asked() {
        // A 36-bit aperture (some embedded IOMMUs); the highest counts, not the first range.
        let h36 = ranges(&[(0, 0xfedf_ffff), (0xfef0_0000, top(36))]);
        let host = HostIova {
            device: "0000:05:00.0",
            ranges: Some(&h36),
        };
        for requested in [None, Some(39), Some(48)] {
            let e = fit(requested, &[host]).unwrap_err();
            assert_eq!(
                e,
                AddressWidthError::HostTooNarrow {
                    device: "0000:05:00.0".into(),
                    highest: top(36)
                },
                "{requested:?}"
            );
            let msg = e.to_string();
            assert!(msg.contains("up to 0xfffffffff only"), "{msg}");
            assert!(!msg.contains('\n'), "{msg}");
        }
        // Just short of 2^39 - 1 (the top page reserved) is short too.
        let almost = ranges(&[(0, top(39) - 0x1000)]);
        let host = HostIova {
            device: "0000:06:00.0",
            ranges: Some(&almost),
        };
        assert!(matches!(
            fit(None, &[host]),
            Err(AddressWidthError::HostTooNarrow { .. })
        ));
        let empty = ranges(&[]);
        let host = HostIova {
            device: "0000:07:00.0",
            ranges: Some(&empty),
        };
        assert_eq!(
            fit(None, &[host]),
            Err(AddressWidthError::NoUsableIova {
                device: "0000:07:00.0".into()
            })
        );
    }
}
