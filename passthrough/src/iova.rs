//! The IOVA ranges a host IOMMU address space can map, as the kernel reports them once a
//! device is in it: a type1 container through VFIO_IOMMU_GET_INFO's
//! VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE capability (here), an iommufd IOAS through
//! IOMMU_IOAS_IOVA_RANGES ([`crate::iommufd::ioas_iova_ranges`]).
//!
//! A host IOMMU's aperture (39, 48 or 57 bits) and reserved regions (the MSI window, RMRRs)
//! bound what a vIOMMU in front of it may let the guest map: a map outside them fails.

use std::fmt;
use std::io;

use vfio_bindings::bindings::vfio::{
    vfio_info_cap_header, vfio_iommu_type1_info, vfio_iommu_type1_info_cap_iova_range,
    vfio_iova_range, VFIO_BASE, VFIO_IOMMU_INFO_CAPS, VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE,
    VFIO_TYPE,
};
use vfio_ioctls::VfioContainer;

// linux/vfio.h: VFIO_IOMMU_GET_INFO = _IO(VFIO_TYPE, VFIO_BASE + 12).
vmm_sys_util::ioctl_io_nr!(VFIO_IOMMU_GET_INFO, VFIO_TYPE as u32, VFIO_BASE + 12);

/// How often a query is repeated when the kernel asks for a bigger buffer: the answer only
/// grows when a device joins the address space meanwhile, which nothing here does.
const MAX_TRIES: usize = 4;
/// Most bytes VFIO_IOMMU_GET_INFO's answer may take (a few ranges and capabilities need far
/// fewer; the bound keeps a confused answer from allocating without limit).
const MAX_INFO_SIZE: usize = 1 << 20;
/// Most capabilities a chain may hold before it counts as a loop.
const MAX_CAPS: usize = 64;

/// One usable range of IOVAs, both ends inclusive.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct IovaRange {
    pub start: u64,
    pub last: u64,
}

/// The usable IOVA ranges of one host address space, in ascending order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IovaRanges(Vec<IovaRange>);

impl IovaRanges {
    /// The ranges `(start, last)`, in any order; an error names a range that ends before it
    /// starts.
    pub fn new(ranges: impl IntoIterator<Item = (u64, u64)>) -> Result<Self, IovaRangesError> {
        let mut out = Vec::new();
        for (start, last) in ranges {
            if last < start {
                return Err(IovaRangesError::Inverted { start, last });
            }
            out.push(IovaRange { start, last });
        }
        out.sort_unstable();
        Ok(Self(out))
    }

    /// The ranges, ascending.
    pub fn ranges(&self) -> &[IovaRange] {
        &self.0
    }

    /// The highest IOVA the host maps; None when it maps none.
    pub fn highest(&self) -> Option<u64> {
        self.0.iter().map(|r| r.last).max()
    }
}

impl fmt::Display for IovaRanges {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("none");
        }
        for (i, r) in self.0.iter().enumerate() {
            let sep = if i == 0 { "" } else { ", " };
            write!(f, "{sep}{:#x}..={:#x}", r.start, r.last)?;
        }
        Ok(())
    }
}

/// Why the usable IOVA ranges could not be read.
#[derive(Debug, thiserror::Error)]
pub enum IovaRangesError {
    /// The kernel refused the query.
    #[error("{ioctl}: {source}")]
    Ioctl {
        ioctl: &'static str,
        #[source]
        source: io::Error,
    },
    /// The answer's size kept growing between queries.
    #[error("{ioctl}: the answer's size kept changing ({size} after {MAX_TRIES} tries)")]
    Unsettled { ioctl: &'static str, size: usize },
    /// VFIO_IOMMU_GET_INFO's capability chain does not hold together.
    #[error("VFIO_IOMMU_GET_INFO: malformed capability chain at offset {offset:#x}: {reason}")]
    Malformed { offset: usize, reason: &'static str },
    /// A range ends before it starts.
    #[error("IOVA range {start:#x}..={last:#x} ends before it starts")]
    Inverted { start: u64, last: u64 },
}

/// VFIO_IOMMU_GET_INFO on a type1 container (the real container implements it; tests fake it).
pub trait Type1Info {
    /// Fills `buf` with the container's `struct vfio_iommu_type1_info` and, when it fits, its
    /// capability chain; the implementation sets `argsz` to `buf.len()` first.
    fn iommu_info(&self, buf: &mut [u8]) -> io::Result<()>;
}

impl Type1Info for VfioContainer {
    fn iommu_info(&self, buf: &mut [u8]) -> io::Result<()> {
        if buf.len() < INFO_SIZE {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let argsz =
            u32::try_from(buf.len()).map_err(|_| io::Error::from_raw_os_error(libc::E2BIG))?;
        buf[..4].copy_from_slice(&argsz.to_ne_bytes());
        // SAFETY: the container fd is valid, and `buf` holds `argsz` bytes, all the kernel
        // writes (it copies the chain only when it fits in argsz).
        let ret = unsafe {
            vmm_sys_util::ioctl::ioctl_with_mut_ptr(self, VFIO_IOMMU_GET_INFO(), buf.as_mut_ptr())
        };
        if ret != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

const INFO_SIZE: usize = std::mem::size_of::<vfio_iommu_type1_info>();
const CAP_HEADER_SIZE: usize = std::mem::size_of::<vfio_info_cap_header>();
const IOVA_CAP_SIZE: usize = std::mem::size_of::<vfio_iommu_type1_info_cap_iova_range>();
const RANGE_SIZE: usize = std::mem::size_of::<vfio_iova_range>();
// Field offsets of struct vfio_iommu_type1_info and struct vfio_info_cap_header (linux/vfio.h).
const INFO_ARGSZ: usize = std::mem::offset_of!(vfio_iommu_type1_info, argsz);
const INFO_FLAGS: usize = std::mem::offset_of!(vfio_iommu_type1_info, flags);
const INFO_CAP_OFFSET: usize = std::mem::offset_of!(vfio_iommu_type1_info, cap_offset);
const CAP_ID: usize = std::mem::offset_of!(vfio_info_cap_header, id);
const CAP_NEXT: usize = std::mem::offset_of!(vfio_info_cap_header, next);
const CAP_NR_IOVAS: usize = std::mem::offset_of!(vfio_iommu_type1_info_cap_iova_range, nr_iovas);

fn read_u16(buf: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(buf.get(at..at + 2)?.try_into().ok()?))
}

fn read_u32(buf: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(buf.get(at..at + 4)?.try_into().ok()?))
}

fn read_u64(buf: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_ne_bytes(buf.get(at..at + 8)?.try_into().ok()?))
}

/// The container's usable IOVA ranges; None when the kernel does not report them (before
/// Linux 5.4, VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE did not exist).
pub fn type1_iova_ranges(info: &impl Type1Info) -> Result<Option<IovaRanges>, IovaRangesError> {
    let ioctl_error = |source| IovaRangesError::Ioctl {
        ioctl: "VFIO_IOMMU_GET_INFO",
        source,
    };
    let mut size = INFO_SIZE;
    for _ in 0..MAX_TRIES {
        let mut buf = vec![0u8; size];
        info.iommu_info(&mut buf).map_err(ioctl_error)?;
        let flags = read_u32(&buf, INFO_FLAGS).unwrap_or(0);
        if flags & VFIO_IOMMU_INFO_CAPS == 0 {
            return Ok(None);
        }
        // The chain did not fit: the kernel wrote the size it needs to argsz.
        let needed = read_u32(&buf, INFO_ARGSZ).map_or(size, |n| n as usize);
        if needed > size {
            if needed > MAX_INFO_SIZE {
                return Err(IovaRangesError::Malformed {
                    offset: INFO_ARGSZ,
                    reason: "argsz asks for more than 1 MiB",
                });
            }
            size = needed;
            continue;
        }
        return parse_type1_info(&buf);
    }
    Err(IovaRangesError::Unsettled {
        ioctl: "VFIO_IOMMU_GET_INFO",
        size,
    })
}

/// The IOVA ranges in a complete VFIO_IOMMU_GET_INFO answer (`struct vfio_iommu_type1_info`
/// and its capability chain, each `next` an offset from the answer's start, 0 at the end);
/// None when the chain has no VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE.
pub fn parse_type1_info(buf: &[u8]) -> Result<Option<IovaRanges>, IovaRangesError> {
    let malformed = |offset, reason| IovaRangesError::Malformed { offset, reason };
    let mut offset = read_u32(buf, INFO_CAP_OFFSET).ok_or(malformed(
        INFO_CAP_OFFSET,
        "the answer is shorter than its header",
    ))? as usize;
    for _ in 0..MAX_CAPS {
        if offset == 0 {
            return Ok(None);
        }
        if offset < INFO_SIZE || offset + CAP_HEADER_SIZE > buf.len() {
            return Err(malformed(offset, "capability outside the answer"));
        }
        let id = read_u16(buf, offset + CAP_ID).unwrap_or(0);
        let next = read_u32(buf, offset + CAP_NEXT).unwrap_or(0) as usize;
        if u32::from(id) == VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE {
            return parse_iova_cap(buf, offset).map(Some);
        }
        // The kernel lays the chain out in ascending order; anything else would loop.
        if next != 0 && next <= offset {
            return Err(malformed(
                offset,
                "next capability does not lie beyond this one",
            ));
        }
        offset = next;
    }
    Err(malformed(
        offset,
        "more capabilities than any kernel reports",
    ))
}

/// `struct vfio_iommu_type1_info_cap_iova_range` at `offset` of `buf`; each
/// `struct vfio_iova_range`'s `end` is inclusive, as type1's own checks take it.
fn parse_iova_cap(buf: &[u8], offset: usize) -> Result<IovaRanges, IovaRangesError> {
    let truncated = || IovaRangesError::Malformed {
        offset,
        reason: "IOVA range capability runs past the answer",
    };
    let count = read_u32(buf, offset + CAP_NR_IOVAS).ok_or_else(truncated)?;
    let first = offset + IOVA_CAP_SIZE;
    let end = (count as usize)
        .checked_mul(RANGE_SIZE)
        .and_then(|n| n.checked_add(first))
        .filter(|&e| e <= buf.len())
        .ok_or_else(truncated)?;
    let ranges = (first..end).step_by(RANGE_SIZE).map(|at| {
        let start = read_u64(buf, at).unwrap_or(0);
        let last = read_u64(buf, at + 8).unwrap_or(0);
        (start, last)
    });
    IovaRanges::new(ranges)
}

#[cfg(test)]
#[path = "iova_tests.rs"]
mod tests;
