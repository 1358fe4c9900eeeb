//! The PCI root complex: bus 0 behind a host bridge, reached through ECAM and ports 0xCF8/0xCFC.
//!
//! A PCI function (emulated, or the passthrough crate's VFIO function) implements
//! [`vm_device::pci::device::PciDevice`] and joins bus 0 with [`bus::PciBus::add_device`] (function
//! 0 of the first free slot) or [`bus::PciBus::add_device_at`] (at an [`address::PciAddress`]
//! the user asked for, its slot first held with [`bus::PciBus::reserve`]), which places its BARs with [`allocator::PciAllocator`] and registers every BAR on the MMIO or PIO
//! bus. A function that maps parts of a BAR as KVM memory slots (VFIO) follows the guest's moves
//! in `move_bar`; accesses there never exit, the rest of the BAR still reaches it.

pub mod address;
pub mod allocator;
pub mod bus;
pub mod root;
