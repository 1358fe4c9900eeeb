//! A minimal KVM VMM whose purpose is PCI device passthrough behind a virtual Intel VT-d.
//!
//! Layout after Firecracker: [`vstate`] (VM, vCPUs, memory, the vCPU kick), [`devices`] (bus
//! and device models), [`pci`] (root complex), [`device_manager`] (which devices a VM has and
//! how they are wired), [`acpi`], [`arch`] (x86_64 layout, boot, CPU state), [`builder`]
//! (assembles a VM), [`runner`] (vCPU threads, event loop, stop), [`sleep`] (the machine's
//! ACPI S3 state) and [`config`] (command line).
//! What devices share with the VMM (PCI model, host-DMA trait, rate-limited logging) is the
//! `vm-device` crate's.
//!
//! Extension points:
//! - a device joins in [`device_manager`] (see there): a port I/O or platform MMIO device with
//!   [`device_manager::DeviceManager::register`], a PCI function with
//!   [`pci::bus::PciBus::add_device`];
//! - a PCI function implements [`vm_device::pci::device::PciDevice`] (its configuration space
//!   and BARs on the shared model of [`vm_device::pci`]): BARs come from
//!   [`pci::allocator::PciAllocator`] and are dispatched from the MMIO/PIO
//!   [`devices::bus::Bus`]; areas a function maps itself as KVM memory slots
//!   ([`vstate::vm::Vm::slots`]) follow the guest's BAR moves in `move_bar`; INTx lines map to
//!   GSIs by [`pci::bus::intx_gsi`] (the DSDT's _PRT);
//! - MSI routes and irqfds go through the VM's one GSI routing table,
//!   [`vstate::vm::Vm::routing`] (KVM_SET_GSI_ROUTING replaces the whole table); with the split
//!   irqchip ([`vstate::vm::Irqchip::Split`]) the IOAPIC is [`devices::ioapic`] on the MMIO bus,
//!   its pins' routes live in that table and an irqfd on a pin's GSI follows the pin's mask;
//! - ACPI tables a device needs come from [`device_manager::DeviceManager::acpi_tables`] (or
//!   [`MachineConfig::extra_acpi_tables`] for callers building a VM by hand);
//! - new command line options reuse [`config::OptionList`] (`key=value,...`).

pub mod acpi;
pub mod arch;
pub mod builder;
pub mod config;
pub mod device_manager;
pub mod devices;
pub mod exit;
pub mod pci;
pub mod replay;
pub mod runner;
pub mod sleep;
pub mod vstate;

pub use builder::{BootSource, BuildError, MachineConfig, SerialIn, Vmm};
pub use exit::VmExit;
pub use runner::RunError;
pub use vstate::vcpu::CpuMode;
pub use vstate::vm::Irqchip;
