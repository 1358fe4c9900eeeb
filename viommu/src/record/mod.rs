//! Recording a guest's traffic to the unit, to replay it without the guest (see
//! [`crate::replay`] and docs/recording.md).
//!
//! A recording holds what the unit needs to behave again exactly as it did: the guest's register
//! writes in order, the other calls that change it (the VMM's deferred-flush polls, devices
//! attached and detached, emulated devices' requests) with the time of each by the unit's
//! clock, and the guest memory it read while handling each one, as the bytes that changed since
//! it last read (or wrote) them. Queue descriptors, root, context and PASID entries, page
//! tables and IRTEs are all guest memory the unit reads, so all of them are in it.
//!
//! The unit reads guest memory through a [`Tap`], which hands every read to the [`Recorder`]
//! when one is attached ([`crate::Vtd::start_recording`]).

mod format;
mod recorder;
mod seen;
mod stopwatch;
mod tap;

pub use format::{Change, Ending, Event, Header, ParseError, Recording, Step, MAGIC, VERSION};
pub use recorder::{RecordSummary, Recorder};
pub use tap::Tap;

#[cfg(test)]
mod tests;
