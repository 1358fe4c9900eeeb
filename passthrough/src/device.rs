//! A passed-through function as the VMM's PCI bus sees it: the virtualized function
//! ([`PciFunction`]), plus the BAR areas the host lets us mmap, shown to the guest as memory
//! slots that follow the guest's BAR moves ([`BarSlots`]).

use vm_device::pci::bar::{Bar, BarAllocator, BarMove};
use vm_device::pci::device::{PciDevice, PciDeviceError};

use crate::function::PciFunction;
use crate::host::HostDevice;
use crate::slots::{BarSlots, GuestMapper};

/// One assigned function on the guest's PCI bus.
pub struct VfioPciDevice {
    function: PciFunction<HostDevice>,
    slots: BarSlots,
    mapper: Box<dyn GuestMapper>,
}

impl VfioPciDevice {
    /// `function` on the bus, its mmappable BAR areas shown through `mapper` once placed.
    pub fn new(function: PciFunction<HostDevice>, mapper: Box<dyn GuestMapper>) -> Self {
        let slots = BarSlots::new(&function);
        Self {
            function,
            slots,
            mapper,
        }
    }

    /// The virtualized function.
    pub fn function(&self) -> &PciFunction<HostDevice> {
        &self.function
    }
}

impl PciDevice for VfioPciDevice {
    fn read_config_register(&mut self, reg: usize) -> u32 {
        self.function.read_config(reg)
    }

    fn write_config_register(&mut self, reg: usize, offset: usize, data: &[u8]) -> Vec<BarMove> {
        self.function.write_config(reg, offset, data)
    }

    /// Every BAR goes on the bus: accesses to the areas mapped as memory slots never exit, and
    /// the rest (MSI-X table and PBA, unmappable areas, I/O BARs) come to `read_bar` and
    /// `write_bar`.
    fn place_bars(&mut self, alloc: &mut dyn BarAllocator) -> Result<Vec<Bar>, PciDeviceError> {
        let placed = self.function.place_bars(alloc)?;
        for b in &placed {
            self.slots
                .map_bar(b.index, b.addr, self.mapper.as_mut())
                .map_err(|e| PciDeviceError::MapBar {
                    index: b.index,
                    addr: b.addr,
                    source: Box::new(e),
                })?;
        }
        Ok(placed)
    }

    fn read_bar(&mut self, index: usize, offset: u64, data: &mut [u8]) {
        self.function.read_bar(index, offset, data);
    }

    fn write_bar(&mut self, index: usize, offset: u64, data: &[u8]) {
        self.function.write_bar(index, offset, data);
    }

    fn move_bar(&mut self, mv: &BarMove) -> Result<(), PciDeviceError> {
        self.slots
            .move_bar(mv, self.mapper.as_mut())
            .map_err(|e| PciDeviceError::MoveBar {
                index: mv.index,
                old: mv.old,
                new: mv.new,
                source: Box::new(e),
            })
    }

    fn revert_bar(&mut self, index: usize, addr: u64) {
        self.function.revert_bar(index, addr);
    }
}

impl Drop for VfioPciDevice {
    /// Memory slots, then the mmaps behind them, go before the device; then the function (a
    /// field, dropped after this) resets the device and VFIO releases it.
    fn drop(&mut self) {
        self.slots.release(self.mapper.as_mut());
    }
}
