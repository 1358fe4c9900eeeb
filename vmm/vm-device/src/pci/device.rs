//! The interface between a PCI function and the root complex that routes config and BAR
//! accesses to it: implemented by the VMM's emulated functions and by the passthrough crate's
//! VFIO function alike.

use crate::pci::bar::{Bar, BarAllocator, BarMove, PlaceError};

/// A boxed error of the device's own kind (why a memory slot or a host mapping failed).
pub type DeviceErrorSource = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Errors of a PCI function's BAR set-up and moves.
#[derive(Debug, thiserror::Error)]
pub enum PciDeviceError {
    /// The platform had no room for a BAR.
    #[error(transparent)]
    Place(#[from] PlaceError),
    /// What the device maps itself for a BAR (e.g. a VFIO area as a KVM memory slot) could not
    /// be set up where the BAR was placed.
    #[error("cannot map BAR{index} at {addr:#x}: {source}")]
    MapBar {
        index: usize,
        addr: u64,
        source: DeviceErrorSource,
    },
    /// The device could not follow a BAR move.
    #[error("cannot move BAR{index} from {old:#x} to {new:#x}: {source}")]
    MoveBar {
        index: usize,
        old: u64,
        new: u64,
        source: DeviceErrorSource,
    },
}

/// A PCI function.
///
/// The root complex routes config accesses (0xCF8/0xCFC and ECAM) to `read_config_register` /
/// `write_config_register`, and BAR accesses (MMIO or port I/O exits inside a BAR it registered
/// on its buses) to `read_bar` / `write_bar` with the BAR's index and the offset into it. A
/// function with BARs keeps them in a [`crate::pci::bar::Bars`] (directly or through a
/// [`crate::pci::configuration::PciConfiguration`]), which decides when they move.
pub trait PciDevice: Send {
    /// Reads dword register `reg` (0..1024) of the configuration space.
    fn read_config_register(&mut self, reg: usize) -> u32;

    /// Writes `data` at byte `offset` (0..4) within dword register `reg`; returns the BAR moves
    /// the write causes, for the root complex to apply to its buses.
    fn write_config_register(&mut self, reg: usize, offset: usize, data: &[u8]) -> Vec<BarMove>;

    /// Places the function's BARs with `alloc` and returns them. Called once, when the function
    /// joins the bus.
    fn place_bars(&mut self, _alloc: &mut dyn BarAllocator) -> Result<Vec<Bar>, PciDeviceError> {
        Ok(Vec::new())
    }

    /// Guest read at `offset` inside BAR `index`.
    fn read_bar(&mut self, _index: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    /// Guest write at `offset` inside BAR `index`.
    fn write_bar(&mut self, _index: usize, _offset: u64, _data: &[u8]) {}

    /// The guest moved a BAR and the buses followed; the function updates what it maps itself
    /// (memory slots). An error makes the root complex put the BAR back.
    fn move_bar(&mut self, _mv: &BarMove) -> Result<(), PciDeviceError> {
        Ok(())
    }

    /// Puts BAR `index` back at `addr` after a move the platform refused. A function with BARs
    /// must implement it (with [`crate::pci::bar::Bars::revert`]).
    fn revert_bar(&mut self, _index: usize, _addr: u64) {}
}
