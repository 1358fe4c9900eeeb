//! x86_64: address map, boot protocol, CPU state.

pub mod boot;
pub mod cpuid;
pub mod interrupts;
pub mod layout;
pub mod msr;
pub mod regs;
