//! Harness for the workspace integration tests.
//!
//! [`kvm_unit_tests`] builds kvm-unit-tests and runs its multiboot tests through the vmm binary;
//! [`small_guest`] helps run code of our own on this machine's KVM through the vmm library, and
//! [`vtd_guest`] such code that drives our VT-d and the edu behind it;
//! [`testbed`] runs Linux guests in the nested testbed (L0 QEMU TCG -> L1 Linux with real KVM,
//! IOMMU and VFIO -> a VMM -> L2 Linux) and reports what their consoles said.

pub mod kvm_unit_tests;
pub mod small_guest;
pub mod testbed;
pub mod vtd_guest;
