//! The address of a function on bus 0 (slot and function), and its command-line spelling,
//! QEMU's `addr=SLOT[.FUNCTION]` in hex (`addr=05.1`, `addr=5.0`, `addr=5`).

use std::fmt;
use std::str::FromStr;

/// Device slots on a bus (PCI Local Bus 3.0, 3.2.2.3.2: 5-bit device number).
pub const NUM_SLOTS: usize = 32;
/// Functions of a device (PCI Local Bus 3.0, 3.2.2.3.2: 3-bit function number).
pub const NUM_FUNCTIONS: usize = 8;

/// Why an address does not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PciAddressError {
    /// Not `SLOT[.FUNCTION]` in hex digits.
    #[error("expected SLOT[.FUNCTION] in hex, e.g. 05.1")]
    Malformed,
    /// A slot past the bus's 32.
    #[error("slot {0:#x} is past the last, {last:#x}", last = NUM_SLOTS - 1)]
    SlotOutOfRange(u32),
    /// A function past the device's 8.
    #[error("function {0} is past the last, {last}", last = NUM_FUNCTIONS - 1)]
    FunctionOutOfRange(u32),
}

/// A function on bus 0: its slot (device number, 0..32) and function (0..8).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PciAddress {
    slot: u8,
    function: u8,
}

impl PciAddress {
    /// Function `function` of slot `slot`, when both are in range.
    pub fn new(slot: u8, function: u8) -> Result<Self, PciAddressError> {
        if usize::from(slot) >= NUM_SLOTS {
            return Err(PciAddressError::SlotOutOfRange(slot.into()));
        }
        if usize::from(function) >= NUM_FUNCTIONS {
            return Err(PciAddressError::FunctionOutOfRange(function.into()));
        }
        Ok(Self { slot, function })
    }

    /// The slot (device number).
    pub fn slot(self) -> u8 {
        self.slot
    }

    /// The function number.
    pub fn function(self) -> u8 {
        self.function
    }

    /// Function 0 of the same slot.
    pub fn function_zero(self) -> Self {
        Self {
            slot: self.slot,
            function: 0,
        }
    }
}

/// As Linux names it: `00:SS.F` (bus 0).
impl fmt::Display for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "00:{:02x}.{:x}", self.slot, self.function)
    }
}

/// Parses hex digits only (`u32::from_str_radix` would also take a sign).
fn hex(s: &str) -> Result<u32, PciAddressError> {
    if s.is_empty() || s.len() > 8 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(PciAddressError::Malformed);
    }
    u32::from_str_radix(s, 16).map_err(|_| PciAddressError::Malformed)
}

/// `SLOT[.FUNCTION]`, both hex; the function is 0 when absent.
impl FromStr for PciAddress {
    type Err = PciAddressError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (slot, function) = match s.split_once('.') {
            Some((slot, function)) => (hex(slot)?, hex(function)?),
            None => (hex(s)?, 0),
        };
        Self::new(
            u8::try_from(slot).map_err(|_| PciAddressError::SlotOutOfRange(slot))?,
            u8::try_from(function).map_err(|_| PciAddressError::FunctionOutOfRange(function))?,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<(u8, u8), PciAddressError> {
        s.parse::<PciAddress>().map(|a| (a.slot(), a.function()))
    }

    #[test]
    fn slot_and_function_parse_in_hex_as_qemu_spells_them() {
        assert_eq!(parse("05.1"), Ok((5, 1)));
        assert_eq!(parse("5.0"), Ok((5, 0)));
        assert_eq!(parse("5"), Ok((5, 0)), "function 0 when absent");
        assert_eq!(parse("1f.7"), Ok((31, 7)));
        assert_eq!(parse("0A.3"), Ok((10, 3)));
    }

    #[test]
    fn malformed_addresses_are_refused() {
        for bad in [
            "", ".", "5.", ".1", "5.1.2", "+5", "5.-1", "g", "0x5", "5,1", " 5",
        ] {
            assert_eq!(parse(bad), Err(PciAddressError::Malformed), "{bad:?}");
        }
    }

    #[test]
    fn slots_past_1f_and_functions_past_7_are_refused_with_the_value() {
        assert_eq!(parse("20"), Err(PciAddressError::SlotOutOfRange(0x20)));
        assert_eq!(parse("100.0"), Err(PciAddressError::SlotOutOfRange(0x100)));
        assert_eq!(parse("5.8"), Err(PciAddressError::FunctionOutOfRange(8)));
        assert_eq!(
            PciAddressError::SlotOutOfRange(0x20).to_string(),
            "slot 0x20 is past the last, 0x1f"
        );
        assert_eq!(
            PciAddressError::FunctionOutOfRange(8).to_string(),
            "function 8 is past the last, 7"
        );
        assert_eq!(
            PciAddress::new(32, 0),
            Err(PciAddressError::SlotOutOfRange(32))
        );
        assert_eq!(
            PciAddress::new(0, 8),
            Err(PciAddressError::FunctionOutOfRange(8))
        );
    }

    #[test]
    fn addresses_display_as_linux_names_them_on_bus_0() {
        assert_eq!(PciAddress::new(5, 1).unwrap().to_string(), "00:05.1");
        assert_eq!(PciAddress::new(0x1f, 7).unwrap().to_string(), "00:1f.7");
    }
}
