//! A minimal KVM VMM whose purpose is PCI device passthrough behind a virtual Intel VT-d.
//!
//! Layout after Firecracker: [`vstate`] (VM, vCPUs, memory), [`devices`] (bus and device
//! models), [`pci`] (root complex), [`acpi`], [`arch`] (x86_64 layout, boot, CPU state),
//! [`builder`] (assembles and runs a VM) and [`config`] (command line).

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
