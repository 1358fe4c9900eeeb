//! The hardware-reduced ACPI power management register: one I/O port that is both the FADT's
//! sleep control/status register and its reset register, as Cloud Hypervisor does.

use crate::devices::bus::BusDevice;
use crate::exit::{ExitHandle, VmExit};

/// The port (Cloud Hypervisor's choice; free on a PC).
pub const ACPI_PM_PORT: u64 = 0x3c0;
/// One byte.
pub const ACPI_PM_LEN: u64 = 1;
/// Value the FADT names as RESET_VALUE.
pub const ACPI_RESET_VALUE: u8 = 1;
/// SLP_TYP for S5, the value of the DSDT's `_S5_` package.
pub const ACPI_S5_SLP_TYP: u8 = 5;
// Sleep control register layout (ACPI 6.4, 4.8.3.7): SLP_TYP bits 4:2, SLP_EN bit 5.
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0x7 << SLP_TYP_SHIFT;
const SLP_EN: u8 = 1 << 5;
// Sleep status register (ACPI 6.4, 4.8.3.8): WAK_STS bit 7, write 1 to clear. Linux clears it
// right before it writes the sleep control register.
const WAK_STS: u8 = 1 << 7;

/// The register.
pub struct AcpiPm {
    exit: ExitHandle,
}

impl AcpiPm {
    /// A PM register reporting power-off and reset through `exit`.
    pub fn new(exit: ExitHandle) -> Self {
        Self { exit }
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        // Sleep status: WAK_STS (bit 7) never set, we do not resume.
        data.fill(0);
    }

    fn write(&mut self, _base: u64, _offset: u64, data: &[u8]) {
        let v = data.first().copied().unwrap_or(0);
        if v & SLP_EN != 0 && (v & SLP_TYP_MASK) >> SLP_TYP_SHIFT == ACPI_S5_SLP_TYP {
            self.exit.request(VmExit::PowerOff);
        } else if v == ACPI_RESET_VALUE {
            self.exit.request(VmExit::Reboot {
                cause: "ACPI reset register",
            });
        } else if v != WAK_STS {
            vm_device::debug_limited!("ACPI PM register write {v:#x} ignored");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s5_and_reset() {
        let exit = ExitHandle::new().unwrap();
        let mut pm = AcpiPm::new(exit.clone());
        pm.write(ACPI_PM_PORT, 0, &[3 << 2 | SLP_EN]); // S3: not supported, ignored
        assert_eq!(exit.reason(), None);
        pm.write(ACPI_PM_PORT, 0, &[(5 << 2) | SLP_EN]);
        assert_eq!(exit.reason(), Some(VmExit::PowerOff));
        let exit = ExitHandle::new().unwrap();
        AcpiPm::new(exit.clone()).write(ACPI_PM_PORT, 0, &[1]);
        assert!(matches!(exit.reason(), Some(VmExit::Reboot { .. })));
    }
}
