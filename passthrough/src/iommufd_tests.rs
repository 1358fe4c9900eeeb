use std::collections::BTreeMap;
use std::sync::Mutex;

use vm_device::dma::{HostDma, Perm};
use vm_memory::{GuestAddress, GuestMemoryBackend};

use super::*;
use crate::dma::tests::mem;
use crate::dma::HostDmaMappings;

const FIXED: u32 = iommufd_ioas_map_flags_IOMMU_IOAS_MAP_FIXED_IOVA;
const READABLE: u32 = iommufd_ioas_map_flags_IOMMU_IOAS_MAP_READABLE;
const WRITEABLE: u32 = iommufd_ioas_map_flags_IOMMU_IOAS_MAP_WRITEABLE;

/// An IOAS with the kernel's rules (drivers/iommu/iommufd/io_pagetable.c): a fixed IOVA must
/// be free; an unmap must cover whole areas and find at least one (ENOENT otherwise), and
/// returns the bytes it removed.
#[derive(Default)]
struct FakeIoas {
    /// IOVA -> the IOMMU_IOAS_MAP argument that made it.
    areas: Mutex<BTreeMap<u64, iommu_ioas_map>>,
    unmaps: Mutex<Vec<(u64, u64)>>,
    /// The usable ranges (start, last) IOMMU_IOAS_IOVA_RANGES reports.
    ranges: Vec<(u64, u64)>,
    /// The array length of each IOMMU_IOAS_IOVA_RANGES.
    range_queries: Mutex<Vec<usize>>,
}

impl IoasIoctls for &'static FakeIoas {
    fn id(&self) -> u32 {
        7
    }

    unsafe fn map(&self, map: &iommu_ioas_map) -> io::Result<()> {
        assert_eq!(map.size as usize, std::mem::size_of::<iommu_ioas_map>());
        let mut areas = self.areas.lock().unwrap();
        let end = map.iova + map.length;
        if map.flags & FIXED == 0
            || areas
                .values()
                .any(|a| map.iova < a.iova + a.length && a.iova < end)
        {
            return Err(io::Error::from_raw_os_error(libc::EEXIST));
        }
        areas.insert(map.iova, *map);
        Ok(())
    }

    fn unmap(&self, unmap: &mut iommu_ioas_unmap) -> io::Result<()> {
        assert_eq!(unmap.ioas_id, 7);
        self.unmaps.lock().unwrap().push((unmap.iova, unmap.length));
        let mut areas = self.areas.lock().unwrap();
        let end = unmap.iova + unmap.length;
        let hit: Vec<&iommu_ioas_map> = areas
            .values()
            .filter(|a| a.iova < end && unmap.iova < a.iova + a.length)
            .collect();
        if hit.is_empty()
            || hit
                .iter()
                .any(|a| a.iova < unmap.iova || a.iova + a.length > end)
        {
            return Err(io::Error::from_raw_os_error(libc::ENOENT));
        }
        let gone: Vec<u64> = hit.iter().map(|a| a.iova).collect();
        unmap.length = gone
            .iter()
            .filter_map(|a| areas.remove(a))
            .map(|a| a.length)
            .sum();
        Ok(())
    }

    /// As iommufd_ioas_iova_ranges(): fills what fits, reports the total either way.
    fn iova_ranges(&self, out: &mut [iommu_iova_range]) -> io::Result<u32> {
        self.range_queries.lock().unwrap().push(out.len());
        for (slot, &(start, last)) in out.iter_mut().zip(&self.ranges) {
            *slot = iommu_iova_range { start, last };
        }
        Ok(self.ranges.len() as u32)
    }
}

fn fake() -> &'static FakeIoas {
    Box::leak(Box::default())
}

/// An error with its causes, as the VMM prints them.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s = format!("{s}: {c}");
        cause = c.source();
    }
    s
}

#[test]
fn vfio_permissions_become_ioas_flags_at_a_fixed_iova() {
    let ioas = fake();
    let m = mem();
    let hva = m.get_host_address(GuestAddress(0x2000)).unwrap() as u64;
    let mut dma = HostDmaMappings::new(IoasDma(ioas), m);
    dma.map(0x5000, 0x2000, 0x1000, Perm::READ).unwrap();
    dma.map(0x6000, 0x3000, 0x2000, Perm::WRITE).unwrap();
    dma.map(0x8000, 0x5000, 0x1000, Perm::RW).unwrap();
    let areas = ioas.areas.lock().unwrap().clone();
    let a = areas[&0x5000];
    assert_eq!(
        (a.ioas_id, a.user_va, a.length, a.flags, a.__reserved),
        (7, hva, 0x1000, FIXED | READABLE, 0)
    );
    assert_eq!(
        (areas[&0x6000].length, areas[&0x6000].flags),
        (0x2000, FIXED | WRITEABLE)
    );
    assert_eq!(areas[&0x8000].flags, FIXED | READABLE | WRITEABLE);
}

#[test]
fn guest_ram_maps_once_per_region_at_iova_equal_gpa() {
    let ioas = fake();
    let m = mem();
    let hva = m.get_host_address(GuestAddress(0x1_0000_0000)).unwrap() as u64;
    let mut dma = HostDmaMappings::new(IoasDma(ioas), m);
    dma.map_guest_ram().unwrap();
    let areas = ioas.areas.lock().unwrap().clone();
    assert_eq!(areas.len(), 2);
    let high = areas[&0x1_0000_0000];
    assert_eq!(
        (high.user_va, high.length, high.flags),
        (hva, 0x10_0000, FIXED | READABLE | WRITEABLE)
    );
}

#[test]
fn unmap_removes_whole_areas_and_drop_releases_the_rest() {
    let ioas = fake();
    let mut dma = HostDmaMappings::new(IoasDma(ioas), mem());
    for i in 0..4u64 {
        dma.map(i * 0x1000, i * 0x1000, 0x1000, Perm::RW).unwrap();
    }
    dma.unmap(0x1000, 0x2000).unwrap();
    assert_eq!(
        dma.mappings().collect::<Vec<_>>(),
        vec![(0, 0x1000), (0x3000, 0x1000)]
    );
    assert_eq!(ioas.areas.lock().unwrap().len(), 2);
    drop(dma);
    assert!(
        ioas.areas.lock().unwrap().is_empty(),
        "nothing stays pinned"
    );
}

#[test]
fn a_range_holding_no_mapping_makes_no_unmap_call() {
    // IOMMU_IOAS_UNMAP fails it with ENOENT where type1 returns 0 bytes.
    let ioas = fake();
    let mut dma = HostDmaMappings::new(IoasDma(ioas), mem());
    dma.map(0x4000, 0x4000, 0x2000, Perm::RW).unwrap();
    dma.unmap(0x1_0000, 0x1000).unwrap();
    dma.unmap(0, 0x4000).unwrap();
    assert!(ioas.unmaps.lock().unwrap().is_empty());
    // A range that reaches into a mapping does go to the host (and fails there: it would
    // cut the mapping, which HostDma's callers never ask).
    let e = chain(&dma.unmap(0x5000, 0x1000).unwrap_err());
    assert!(e.contains("IOMMU_IOAS_UNMAP"), "{e}");
    assert_eq!(*ioas.unmaps.lock().unwrap(), vec![(0x5000, 0x1000)]);
    assert_eq!(dma.mappings().count(), 1);
}

#[test]
fn a_refused_map_names_the_ioctl_and_the_errno() {
    let ioas = fake();
    let mut dma = HostDmaMappings::new(IoasDma(ioas), mem());
    dma.map(0x4000, 0x4000, 0x2000, Perm::RW).unwrap();
    let e = chain(&dma.map(0x5000, 0x8000, 0x1000, Perm::RW).unwrap_err());
    assert!(e.contains("IOMMU_IOAS_MAP: File exists"), "{e}");
    assert_eq!(dma.mappings().count(), 1);
}

#[test]
fn ioctl_errnos_come_back_as_os_errors() {
    let e = os_error(IommufdError::IommuIoasUnmap(
        vmm_sys_util::errno::Error::new(libc::ENOENT),
    ));
    assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
}

#[test]
fn a_refused_bind_is_a_busy_device_naming_its_group() {
    let c = Checked {
        path: "/sys/bus/pci/devices/0000:00:04.0".into(),
        bdf: "0000:00:04.0".into(),
        group: 5,
    };
    let cdev = Path::new("/dev/vfio/devices/vfio0");
    for errno in [libc::EBUSY, libc::EINVAL] {
        let bind = VfioError::VfioDeviceBindIommufd(vmm_sys_util::errno::Error::new(errno));
        let e = bind_error(&c, cdev, bind);
        assert!(matches!(e, SetupError::DeviceBusy { group: 5, .. }), "{e}");
        assert!(
            e.to_string().contains("/dev/vfio/devices/vfio0 is busy"),
            "{e}"
        );
    }
    let attach = VfioError::VfioDeviceAttachIommufdPt(vmm_sys_util::errno::Error::new(libc::EBUSY));
    let e = bind_error(&c, cdev, attach);
    assert!(matches!(e, SetupError::Vfio { .. }), "{e}");
}

#[test]
fn iova_ranges_are_asked_again_with_room_for_all_of_them() {
    let ioas: &'static FakeIoas = Box::leak(Box::new(FakeIoas {
        ranges: vec![(0xfef0_0000, (1 << 39) - 1), (0, 0xfedf_ffff)],
        ..FakeIoas::default()
    }));
    let ranges = ioas_iova_ranges(&ioas).unwrap();
    assert_eq!(ranges.highest(), Some((1 << 39) - 1));
    assert_eq!(ranges.ranges()[0].start, 0);
    assert_eq!(ranges.ranges().len(), 2);
    assert_eq!(*ioas.range_queries.lock().unwrap(), [0, 2]);
}

/// An IOAS whose ranges multiply at every query, or that refuses it.
struct Restless(std::sync::atomic::AtomicU32, Option<i32>);

impl IoasIoctls for Restless {
    fn id(&self) -> u32 {
        1
    }
    unsafe fn map(&self, _: &iommu_ioas_map) -> io::Result<()> {
        unreachable!()
    }
    fn unmap(&self, _: &mut iommu_ioas_unmap) -> io::Result<()> {
        unreachable!()
    }
    fn iova_ranges(&self, _: &mut [iommu_iova_range]) -> io::Result<u32> {
        if let Some(errno) = self.1 {
            return Err(io::Error::from_raw_os_error(errno));
        }
        Ok(self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1)
    }
}

#[test]
fn iova_ranges_that_never_settle_or_a_refused_query_are_errors() {
    let e = ioas_iova_ranges(&Restless(Default::default(), None)).unwrap_err();
    assert!(matches!(e, IovaRangesError::Unsettled { .. }), "{e}");
    let e = ioas_iova_ranges(&Restless(Default::default(), Some(libc::ENOENT))).unwrap_err();
    assert!(e.to_string().starts_with("IOMMU_IOAS_IOVA_RANGES: "), "{e}");
}
