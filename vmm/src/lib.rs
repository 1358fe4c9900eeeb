//! A minimal KVM VMM whose purpose is PCI device passthrough behind a virtual Intel VT-d.
//!
//! Layout after Firecracker: [`vstate`] (VM, vCPUs, memory), [`devices`] (bus and device
//! models), [`pci`] (root complex), [`acpi`], [`arch`] (x86_64 layout, boot, CPU state),
//! [`builder`] (assembles and runs a VM) and [`config`] (command line).
//!
//! Extension points for passthrough and the virtual VT-d:
//! - a PCI function implements [`vm_device::pci::device::PciDevice`] (its configuration space
//!   and BARs on the shared model of [`vm_device::pci`]) and joins bus 0 through
//!   [`Vmm::pci_bus`]: BARs come from [`pci::allocator::PciAllocator`] and are dispatched from
//!   the MMIO/PIO [`devices::bus::Bus`]; areas a function maps itself as KVM memory slots
//!   ([`vstate::vm::Vm::slots`]) follow the guest's BAR moves in `move_bar`; INTx lines map to
//!   GSIs by [`pci::bus::intx_gsi`] (the DSDT's _PRT);
//! - MSI routes and irqfds use [`vstate::vm::Vm::shared_fd`];
//! - an MMIO device such as the VT-d registers goes on [`Vmm::mmio_bus`] at
//!   [`arch::x86_64::layout::VTD_REGS_START`] (kept free), and its DMAR table into
//!   [`MachineConfig::extra_acpi_tables`];
//! - new command line options reuse [`config::OptionList`] (`key=value,...`).

pub mod acpi;
pub mod arch;
pub mod builder;
pub mod config;
pub mod devices;
pub mod exit;
pub mod pci;
pub mod vstate;

pub use builder::{BootSource, BuildError, MachineConfig, SerialIn, Vmm};
pub use exit::VmExit;
pub use vstate::vcpu::CpuMode;
