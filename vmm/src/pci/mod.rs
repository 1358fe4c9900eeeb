//! The PCI root complex: bus 0 behind a host bridge, reached through ECAM and ports 0xCF8/0xCFC.
//!
//! Extension points: a passthrough device implements [`device::PciDevice`] (config space
//! virtualization, `allocate_bars`, `bar_is_trapped` false for BARs it maps as KVM memory
//! slots, `move_bar` to remap them) and is added with [`bus::PciBus::add_device`].

pub mod allocator;
pub mod bus;
pub mod configuration;
pub mod device;
pub mod root;
pub mod vfio;
