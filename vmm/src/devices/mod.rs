//! Emulated device models: plain state machines testable without KVM, behind the
//! [`bus::BusDevice`] trait (port I/O and MMIO devices) or, for PCI functions such as [`edu`],
//! [`vm_device::pci::device::PciDevice`]. Which devices a VM has, and where, is the
//! [`crate::device_manager`]'s.

pub mod acpi_pm;
pub mod acpi_pm1;
pub mod bus;
pub mod debug_exit;
pub mod edu;
pub mod fw_cfg;
pub mod interrupt;
pub mod ioapic;
pub mod legacy;
pub mod pc_testdev;
pub mod pvpanic;
pub mod vtd;
