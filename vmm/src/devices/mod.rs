//! Emulated devices: plain state machines behind the [`bus::BusDevice`] trait, testable
//! without KVM.

pub mod acpi_pm;
pub mod bus;
pub mod edu;
pub mod legacy;
pub mod pvpanic;
pub mod vtd;
