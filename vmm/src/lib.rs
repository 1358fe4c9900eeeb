//! The VMM library.
