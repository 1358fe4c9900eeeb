//! x86_64: address map, boot protocols (Linux, multiboot), CPU state.

pub mod bios;
pub mod boot;
pub mod cpuid;
pub mod elf;
pub mod interrupts;
pub mod layout;
pub mod msr;
pub mod multiboot;
pub mod regs;
