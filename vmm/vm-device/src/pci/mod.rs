//! One PCI function model for emulated and passed-through functions alike, so that each rule
//! of configuration space and BARs is written and tested once:
//!
//! - [`spec`]: configuration-space constants named after the specifications;
//! - [`bar`]: the BAR registers (declaring or discovering BARs, placement through an allocator,
//!   sizing, 64-bit halves, decoding from the command register, moves and their refusal);
//! - [`configuration`]: the configuration space of an emulated function, built on [`bar`];
//! - [`pcie`]: the PCI Express capability and extended capabilities (ATS) of such a function;
//! - [`device`]: the trait every function implements for the root complex.

pub mod bar;
pub mod configuration;
pub mod device;
pub mod pcie;
pub mod spec;
