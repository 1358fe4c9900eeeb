//! The interface every PCI function implements: emulated ones here, VFIO passthrough and the
//! like later.

use crate::pci::allocator::{AllocError, PciAllocator};
use crate::pci::configuration::{Bar, BarMove};

/// Errors of PCI device set-up.
#[derive(Debug, thiserror::Error)]
pub enum PciDeviceError {
    /// BAR allocation failed.
    #[error("cannot place BAR {index} ({size:#x} bytes): {source}")]
    Allocate {
        index: usize,
        size: u64,
        source: AllocError,
    },
    /// The device could not follow a BAR move (e.g. a VFIO memslot could not be remapped).
    #[error("cannot move BAR {index} from {old:#x} to {new:#x}: {reason}")]
    MoveBar {
        index: usize,
        old: u64,
        new: u64,
        reason: String,
    },
}

/// A PCI function.
///
/// The root complex routes config accesses (CF8/CFC and ECAM) to `read_config_register` /
/// `write_config_register`, and BAR accesses (MMIO or port I/O exits inside a BAR registered
/// on the buses) to `read_bar` / `write_bar` with the BAR's current base.
pub trait PciDevice: Send {
    /// Reads dword register `reg` (0..1024) of the configuration space.
    fn read_config_register(&mut self, reg: usize) -> u32;

    /// Writes `data` at byte `offset` (0..4) within dword register `reg`; returns the BAR moves
    /// the write causes, for the root complex to apply to the buses.
    fn write_config_register(&mut self, reg: usize, offset: u64, data: &[u8]) -> Vec<BarMove>;

    /// Places the device's BARs using `allocator` and returns them with their index. Called
    /// once when the device is added.
    fn allocate_bars(
        &mut self,
        _allocator: &mut PciAllocator,
    ) -> Result<Vec<(usize, Bar)>, PciDeviceError> {
        Ok(Vec::new())
    }

    /// Whether BAR `index` is trapped and emulated (registered on a bus). VFIO devices answer
    /// false for BARs they map straight into the guest with a KVM memory slot.
    fn bar_is_trapped(&self, _index: usize) -> bool {
        true
    }

    /// Guest read inside a BAR based at `base`.
    fn read_bar(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    /// Guest write inside a BAR based at `base`.
    fn write_bar(&mut self, _base: u64, _offset: u64, _data: &[u8]) {}

    /// The guest moved a BAR and the buses follow; the device updates what it mapped itself
    /// (memory slots). An error makes the root complex put the BAR back.
    fn move_bar(&mut self, _mv: &BarMove) -> Result<(), PciDeviceError> {
        Ok(())
    }

    /// Puts BAR `index` back at `addr` in the configuration space after a refused move.
    fn revert_bar(&mut self, _index: usize, _addr: u64) {}
}
