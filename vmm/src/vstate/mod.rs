//! KVM state: the VM, its vCPUs and guest memory.

pub mod kick;
pub mod memory;
pub mod vcpu;
pub mod vm;
