//! BAR areas mapped straight into the guest: each mmappable area of a memory BAR (minus the
//! MSI-X pages) is mmapped from the VFIO device once and shown to the guest as a memory slot
//! at the BAR's current address; a BAR move re-slots it. Guest accesses there never exit.

use vm_device::error_limited;
use vm_device::pci::bar::BarMove;

use crate::access::MmapArea;
use crate::function::PciFunction;
use crate::host::{BarMapping, HostDevice};

/// The hypervisor's memory slots (for KVM: KVM_SET_USER_MEMORY_REGION, whose errno is the
/// error).
pub trait GuestMapper: Send {
    /// Shows `size` bytes of our memory at `host` to the guest at `gpa`; returns a slot id.
    fn map(&mut self, gpa: u64, size: u64, host: u64) -> Result<u32, std::io::Error>;
    /// Removes slot `slot` (which was at `gpa`).
    fn unmap(&mut self, slot: u32, gpa: u64, size: u64) -> Result<(), std::io::Error>;
}

/// A BAR area could not be shown to the guest.
#[derive(Debug, thiserror::Error)]
#[error("{device}: BAR{index} area {offset:#x}+{size:#x} at {gpa:#x}: {source}")]
pub struct SlotError {
    pub device: String,
    pub index: usize,
    pub offset: u64,
    pub size: u64,
    pub gpa: u64,
    pub source: std::io::Error,
}

struct Area {
    index: usize,
    area: MmapArea,
    mapping: BarMapping,
    /// Slot and guest address while shown to the guest.
    slot: Option<(u32, u64)>,
}

/// The directly mapped areas of one function's BARs.
pub struct BarSlots {
    device: String,
    areas: Vec<Area>,
}

impl BarSlots {
    /// Mmaps every area [`PciFunction::mmap_areas`] allows. An area the host refuses to mmap
    /// stays trapped (logged), which is slower but correct.
    pub fn new(f: &PciFunction<HostDevice>) -> Self {
        let mut areas = Vec::new();
        let indices: Vec<usize> = f.bars().map(|b| b.index).collect();
        for index in indices {
            for area in f.mmap_areas(index) {
                match f.device().mmap(index as u32, area) {
                    Ok(mapping) => areas.push(Area {
                        index,
                        area,
                        mapping,
                        slot: None,
                    }),
                    Err(e) => log::warn!(
                        "{}: BAR{index} area {:#x}+{:#x} not mmappable ({e}); trapped instead",
                        f.name(),
                        area.offset,
                        area.size
                    ),
                }
            }
        }
        Self {
            device: f.name().to_string(),
            areas,
        }
    }

    /// Whether BAR `index` has directly mapped areas.
    pub fn maps_bar(&self, index: usize) -> bool {
        self.areas.iter().any(|a| a.index == index)
    }

    fn err(&self, a: &Area, gpa: u64, source: std::io::Error) -> SlotError {
        SlotError {
            device: self.device.clone(),
            index: a.index,
            offset: a.area.offset,
            size: a.area.size,
            gpa,
            source,
        }
    }

    /// Shows BAR `index`'s areas at `base`.
    pub fn map_bar(
        &mut self,
        index: usize,
        base: u64,
        mapper: &mut dyn GuestMapper,
    ) -> Result<(), SlotError> {
        for i in 0..self.areas.len() {
            let a = &self.areas[i];
            if a.index != index || a.slot.is_some() {
                continue;
            }
            let gpa = base + a.area.offset;
            let slot = mapper
                .map(gpa, a.area.size, a.mapping.host_addr())
                .map_err(|e| self.err(a, gpa, e))?;
            self.areas[i].slot = Some((slot, gpa));
        }
        Ok(())
    }

    /// Hides BAR `index`'s areas.
    pub fn unmap_bar(&mut self, index: usize, mapper: &mut dyn GuestMapper) {
        for a in self.areas.iter_mut().filter(|a| a.index == index) {
            if let Some((slot, gpa)) = a.slot.take() {
                if let Err(e) = mapper.unmap(slot, gpa, a.area.size) {
                    error_limited!("{}: BAR{index} slot {slot} at {gpa:#x}: {e}", self.device);
                }
            }
        }
    }

    /// Follows a BAR move: hide at the old address, show at the new; on failure the BAR is
    /// shown at the old address again and the error returned (the caller reverts the BAR).
    pub fn move_bar(
        &mut self,
        mv: &BarMove,
        mapper: &mut dyn GuestMapper,
    ) -> Result<(), SlotError> {
        if !self.maps_bar(mv.index) {
            return Ok(());
        }
        self.unmap_bar(mv.index, mapper);
        if let Err(e) = self.map_bar(mv.index, mv.new, mapper) {
            self.unmap_bar(mv.index, mapper);
            if let Err(back) = self.map_bar(mv.index, mv.old, mapper) {
                error_limited!("{back}");
            }
            return Err(e);
        }
        Ok(())
    }

    /// Hides every area from the guest, then unmaps it from this process: in that order, so no
    /// memory slot ever points at a gone mapping, and before the device goes, so no mapping
    /// keeps the device file busy when VFIO releases its group.
    pub fn release(&mut self, mapper: &mut dyn GuestMapper) {
        let indices: Vec<usize> = self.areas.iter().map(|a| a.index).collect();
        for i in indices {
            self.unmap_bar(i, mapper);
        }
        self.areas.clear();
    }
}
