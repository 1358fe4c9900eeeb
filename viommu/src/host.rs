//! The host side of DMA remapping: what the VMM must provide for caching mode to work.
//!
//! The trait and its error live in the `vm-device` crate, which the device-assignment backend
//! (the passthrough crate's VFIO container) implements without depending on this crate; they are
//! re-exported here so users of the model find them beside it.

pub use vm_device::dma::{HostDma, HostDmaError, HostOp};
