use std::cell::RefCell;

use super::*;

/// VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION, a capability that is not the ranges.
const CAP_MIGRATION: u16 = 2;

/// A container answering VFIO_IOMMU_GET_INFO as vfio_iommu_type1_get_info() does: the header
/// always; the capability chain (shifted to follow the header, each `next` an offset from the
/// answer's start) only when argsz holds it, else argsz raised to what it needs.
struct FakeContainer {
    /// Each capability: its id and what follows its header.
    caps: Vec<(u16, Vec<u8>)>,
    /// The argsz of each call.
    calls: RefCell<Vec<usize>>,
}

impl FakeContainer {
    fn new(caps: Vec<(u16, Vec<u8>)>) -> Self {
        Self {
            caps,
            calls: RefCell::new(Vec::new()),
        }
    }

    /// The chain as the kernel lays it out after the header.
    fn chain(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for (i, (id, body)) in self.caps.iter().enumerate() {
            let at = INFO_SIZE + out.len();
            let next = if i + 1 == self.caps.len() {
                0
            } else {
                (at + CAP_HEADER_SIZE + body.len()) as u32
            };
            out.extend_from_slice(&id.to_ne_bytes());
            out.extend_from_slice(&1u16.to_ne_bytes());
            out.extend_from_slice(&next.to_ne_bytes());
            out.extend_from_slice(body);
        }
        out
    }
}

impl Type1Info for FakeContainer {
    fn iommu_info(&self, buf: &mut [u8]) -> io::Result<()> {
        let argsz = buf.len();
        self.calls.borrow_mut().push(argsz);
        if argsz < INFO_SIZE {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let chain = self.chain();
        let mut flags = 1; // VFIO_IOMMU_INFO_PGSIZES
        let mut cap_offset = 0u32;
        let mut out_argsz = argsz as u32;
        if !chain.is_empty() {
            flags |= VFIO_IOMMU_INFO_CAPS;
            if argsz < INFO_SIZE + chain.len() {
                out_argsz = (INFO_SIZE + chain.len()) as u32;
            } else {
                buf[INFO_SIZE..INFO_SIZE + chain.len()].copy_from_slice(&chain);
                cap_offset = INFO_SIZE as u32;
            }
        }
        buf[INFO_ARGSZ..INFO_ARGSZ + 4].copy_from_slice(&out_argsz.to_ne_bytes());
        buf[INFO_FLAGS..INFO_FLAGS + 4].copy_from_slice(&flags.to_ne_bytes());
        buf[8..16].copy_from_slice(&0x1000u64.to_ne_bytes());
        buf[INFO_CAP_OFFSET..INFO_CAP_OFFSET + 4].copy_from_slice(&cap_offset.to_ne_bytes());
        Ok(())
    }
}

/// The body of a VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE (after its header).
fn iova_cap(ranges: &[(u64, u64)]) -> (u16, Vec<u8>) {
    let mut body = Vec::new();
    body.extend_from_slice(&(ranges.len() as u32).to_ne_bytes());
    body.extend_from_slice(&0u32.to_ne_bytes());
    for &(start, end) in ranges {
        body.extend_from_slice(&start.to_ne_bytes());
        body.extend_from_slice(&end.to_ne_bytes());
    }
    (VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE as u16, body)
}

/// A 39-bit VT-d with the x86 MSI window reserved, as Linux reports it.
const VTD_39: [(u64, u64); 2] = [(0, 0xfedf_ffff), (0xfef0_0000, 0x7f_ffff_ffff)];

#[test]
fn ranges_after_another_capability_are_read_with_a_second_bigger_query() {
    let host = FakeContainer::new(vec![(CAP_MIGRATION, vec![0; 24]), iova_cap(&VTD_39)]);
    let ranges = type1_iova_ranges(&host).unwrap().expect("ranges reported");
    assert_eq!(
        ranges.ranges(),
        &[
            IovaRange {
                start: 0,
                last: 0xfedf_ffff
            },
            IovaRange {
                start: 0xfef0_0000,
                last: 0x7f_ffff_ffff
            }
        ]
    );
    assert_eq!(ranges.highest(), Some(0x7f_ffff_ffff));
    let calls = host.calls.borrow();
    assert_eq!(calls[0], INFO_SIZE, "first the bare header");
    assert_eq!(calls.len(), 2);
    assert_eq!(
        calls[1],
        INFO_SIZE + 32 + 16 + 32,
        "then what argsz asked for"
    );
}

#[test]
fn a_kernel_without_the_capability_reports_nothing() {
    assert_eq!(
        type1_iova_ranges(&FakeContainer::new(vec![])).unwrap(),
        None
    );
    let only_migration = FakeContainer::new(vec![(CAP_MIGRATION, vec![0; 24])]);
    assert_eq!(type1_iova_ranges(&only_migration).unwrap(), None);
}

#[test]
fn the_highest_iova_is_the_last_of_the_highest_range_whatever_the_order() {
    let host = FakeContainer::new(vec![iova_cap(&[(1 << 32, (1 << 48) - 1), (0, 0xffff)])]);
    let ranges = type1_iova_ranges(&host).unwrap().unwrap();
    assert_eq!(ranges.highest(), Some((1 << 48) - 1));
    assert_eq!(ranges.ranges()[0].start, 0, "sorted");
    assert_eq!(
        ranges.to_string(),
        "0x0..=0xffff, 0x100000000..=0xffffffffffff"
    );
    let none = FakeContainer::new(vec![iova_cap(&[])]);
    let ranges = type1_iova_ranges(&none).unwrap().unwrap();
    assert_eq!(ranges.highest(), None);
    assert_eq!(ranges.to_string(), "none");
}

/// A complete answer: header with flags and cap_offset, then `chain`.
fn answer(cap_offset: u32, chain: &[u8]) -> Vec<u8> {
    let mut buf = vec![0u8; INFO_SIZE];
    buf[INFO_FLAGS..INFO_FLAGS + 4].copy_from_slice(&(VFIO_IOMMU_INFO_CAPS | 1).to_ne_bytes());
    buf[INFO_CAP_OFFSET..INFO_CAP_OFFSET + 4].copy_from_slice(&cap_offset.to_ne_bytes());
    buf.extend_from_slice(chain);
    let len = buf.len() as u32;
    buf[..4].copy_from_slice(&len.to_ne_bytes());
    buf
}

fn header(id: u16, next: u32) -> Vec<u8> {
    let mut h = id.to_ne_bytes().to_vec();
    h.extend_from_slice(&1u16.to_ne_bytes());
    h.extend_from_slice(&next.to_ne_bytes());
    h
}

#[test]
fn malformed_chains_are_errors_naming_the_offset_not_panics_or_loops() {
    let reason = |buf: &[u8]| match parse_type1_info(buf) {
        Err(IovaRangesError::Malformed { offset, reason }) => (offset, reason),
        other => panic!("{other:?}"),
    };
    // A capability pointing back at itself.
    let looped = answer(INFO_SIZE as u32, &header(CAP_MIGRATION, INFO_SIZE as u32));
    assert_eq!(reason(&looped).0, INFO_SIZE);
    // A chain starting outside the answer, or inside the header.
    assert!(reason(&answer(0x1000, &[])).1.contains("outside"));
    assert!(reason(&answer(8, &[0; 8])).1.contains("outside"));
    // More ranges than the answer holds.
    let (id, mut body) = iova_cap(&VTD_39);
    body[..4].copy_from_slice(&3u32.to_ne_bytes());
    let mut chain = header(id, 0);
    chain.extend_from_slice(&body);
    assert!(reason(&answer(INFO_SIZE as u32, &chain))
        .1
        .contains("runs past"));
    let mut chain = header(id, 0);
    chain.extend_from_slice(&u32::MAX.to_ne_bytes());
    chain.extend_from_slice(&[0; 4]);
    assert!(reason(&answer(INFO_SIZE as u32, &chain))
        .1
        .contains("runs past"));
    // A range ending before it starts.
    let (id, body) = iova_cap(&[(0x2000, 0x1000)]);
    let mut chain = header(id, 0);
    chain.extend_from_slice(&body);
    let e = parse_type1_info(&answer(INFO_SIZE as u32, &chain)).unwrap_err();
    assert_eq!(
        e.to_string(),
        "IOVA range 0x2000..=0x1000 ends before it starts"
    );
    // Too short even for the header.
    assert!(parse_type1_info(&[0; 8]).is_err());
}

/// A container whose answer needs more room at every query.
struct GrowingContainer;

impl Type1Info for GrowingContainer {
    fn iommu_info(&self, buf: &mut [u8]) -> io::Result<()> {
        let needed = (buf.len() + 8) as u32;
        buf[INFO_ARGSZ..INFO_ARGSZ + 4].copy_from_slice(&needed.to_ne_bytes());
        buf[INFO_FLAGS..INFO_FLAGS + 4].copy_from_slice(&VFIO_IOMMU_INFO_CAPS.to_ne_bytes());
        Ok(())
    }
}

#[test]
fn an_answer_that_never_fits_or_a_refused_query_is_an_error() {
    let e = type1_iova_ranges(&GrowingContainer).unwrap_err();
    assert!(matches!(e, IovaRangesError::Unsettled { .. }), "{e}");
    struct Refusing;
    impl Type1Info for Refusing {
        fn iommu_info(&self, _: &mut [u8]) -> io::Result<()> {
            Err(io::Error::from_raw_os_error(libc::EINVAL))
        }
    }
    let e = type1_iova_ranges(&Refusing).unwrap_err();
    assert!(e.to_string().starts_with("VFIO_IOMMU_GET_INFO: "), "{e}");
}
