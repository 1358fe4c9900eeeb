//! Address allocation for PCI BARs: I/O ports, the 32-bit MMIO window and the 64-bit window,
//! and the guest RAM BARs must stay clear of: the platform side of
//! [`vm_device::pci::bar::BarAllocator`].

use std::collections::BTreeMap;

use vm_device::pci::bar::{AllocError, BarAllocator, BarKind};

use crate::arch::x86_64::layout::{
    pci_mmio64_start, ram_regions, PCI_IO_SIZE, PCI_IO_START, PCI_MMIO32_SIZE, PCI_MMIO32_START,
    PCI_MMIO64_SIZE,
};

/// First-fit allocator over `[start, end)`.
#[derive(Debug)]
pub struct AddressAllocator {
    start: u64,
    end: u64,
    used: BTreeMap<u64, u64>,
}

impl AddressAllocator {
    /// An allocator for `size` bytes from `start`.
    pub fn new(start: u64, size: u64) -> Self {
        Self {
            start,
            end: start.saturating_add(size),
            used: BTreeMap::new(),
        }
    }

    /// Allocates `size` bytes aligned to `align`.
    pub fn allocate(&mut self, size: u64, align: u64) -> Result<u64, AllocError> {
        if !align.is_power_of_two() {
            return Err(AllocError::BadAlignment(align));
        }
        let exhausted = AllocError::Exhausted {
            size,
            align,
            start: self.start,
            end: self.end,
        };
        let mut candidate = self.start.next_multiple_of(align);
        for (&base, &len) in &self.used {
            if candidate.checked_add(size).is_some_and(|e| e <= base) {
                break;
            }
            candidate = candidate.max((base + len).next_multiple_of(align));
        }
        match candidate.checked_add(size) {
            Some(end) if end <= self.end && size > 0 => {
                self.used.insert(candidate, size);
                Ok(candidate)
            }
            _ => Err(exhausted),
        }
    }

    /// Frees the allocation at `addr`; false if there was none.
    pub fn free(&mut self, addr: u64) -> bool {
        self.used.remove(&addr).is_some()
    }
}

/// The three PCI windows of a guest, and its RAM.
#[derive(Debug)]
pub struct PciAllocator {
    io: AddressAllocator,
    mmio32: AddressAllocator,
    mmio64: AddressAllocator,
    ram_size: u64,
}

impl PciAllocator {
    /// Windows from the platform layout for a guest with `ram_size` bytes of RAM.
    pub fn new(ram_size: u64) -> Self {
        Self {
            io: AddressAllocator::new(u64::from(PCI_IO_START), u64::from(PCI_IO_SIZE)),
            mmio32: AddressAllocator::new(PCI_MMIO32_START, PCI_MMIO32_SIZE),
            mmio64: AddressAllocator::new(pci_mmio64_start(ram_size), PCI_MMIO64_SIZE),
            ram_size,
        }
    }

    /// Allocates a naturally aligned BAR (PCI 3.0, 6.2.5.1: BARs are size-aligned).
    pub fn allocate_bar(&mut self, kind: BarKind, size: u64) -> Result<u64, AllocError> {
        let size = size.next_power_of_two();
        match kind {
            BarKind::Io => self.io.allocate(size, size),
            BarKind::Mmio32 => self.mmio32.allocate(size, size),
            // Large 64-bit BARs go high; small ones fit below 4 GiB too, but keep them high so
            // the 32-bit window stays for devices that need it.
            BarKind::Mmio64 => self.mmio64.allocate(size, size),
        }
    }
}

impl BarAllocator for PciAllocator {
    fn allocate(&mut self, kind: BarKind, size: u64) -> Result<u64, AllocError> {
        self.allocate_bar(kind, size)
    }

    fn guest_ram(&self) -> Vec<(u64, u64)> {
        ram_regions(self.ram_size)
            .into_iter()
            .map(|(start, len)| (start, start + len))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_fit_with_alignment_and_free() {
        let mut a = AddressAllocator::new(0x1000, 0x10000);
        assert_eq!(a.allocate(0x100, 0x100), Ok(0x1000));
        assert_eq!(a.allocate(0x1000, 0x1000), Ok(0x2000));
        assert_eq!(a.allocate(0x100, 0x100), Ok(0x1100));
        assert!(a.free(0x1000));
        assert!(!a.free(0x1000));
        assert_eq!(a.allocate(0x100, 0x100), Ok(0x1000));
        assert!(matches!(
            a.allocate(0x10000, 0x1000),
            Err(AllocError::Exhausted { .. })
        ));
        assert_eq!(a.allocate(4, 3), Err(AllocError::BadAlignment(3)));
    }

    #[test]
    fn bars_land_in_their_windows() {
        let mut p = PciAllocator::new(256 << 20);
        let io = p.allocate_bar(BarKind::Io, 0x20).unwrap();
        assert!((0x1000..0x10000).contains(&io));
        let m32 = p.allocate_bar(BarKind::Mmio32, 0x10_0000).unwrap();
        assert_eq!(m32 % 0x10_0000, 0);
        assert!((PCI_MMIO32_START..PCI_MMIO32_START + PCI_MMIO32_SIZE).contains(&m32));
        let m64 = p.allocate_bar(BarKind::Mmio64, 0x4000).unwrap();
        assert!(m64 >= 1 << 32);
    }

    #[test]
    fn guest_ram_is_the_layout_s_regions_as_ranges() {
        assert_eq!(
            PciAllocator::new(256 << 20).guest_ram(),
            vec![(0, 256 << 20)]
        );
        assert_eq!(
            PciAllocator::new(4 << 30).guest_ram(),
            vec![(0, 0xc000_0000), (0x1_0000_0000, 0x1_4000_0000)]
        );
    }
}
