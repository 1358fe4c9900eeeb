//! Emulated Intel VT-d.
