//! PC legacy devices.

pub mod i8042;
pub mod rtc;
pub mod serial;
