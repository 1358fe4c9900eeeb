//! The host bridge at 00:00.0, the function every PC root complex has first.

use vm_device::pci::bar::BarMove;
use vm_device::pci::configuration::{PciConfiguration, PciIds};
use vm_device::pci::device::PciDevice;

/// Vendor ID: Intel.
pub const HOST_BRIDGE_VENDOR: u16 = 0x8086;
/// Device ID: Cloud Hypervisor's and Firecracker's host bridge choice.
pub const HOST_BRIDGE_DEVICE: u16 = 0x0d57;
/// Class 06h (bridge), subclass 00h (host bridge) (PCI Code and ID Assignment, 1.7).
const CLASS_BRIDGE: u8 = 0x06;
const SUBCLASS_HOST: u8 = 0x00;

/// The host bridge: identification only, no BARs.
pub struct PciHostBridge {
    config: PciConfiguration,
}

impl Default for PciHostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl PciHostBridge {
    /// A host bridge.
    pub fn new() -> Self {
        Self {
            config: PciConfiguration::new(PciIds {
                vendor: HOST_BRIDGE_VENDOR,
                device: HOST_BRIDGE_DEVICE,
                class: CLASS_BRIDGE,
                subclass: SUBCLASS_HOST,
                prog_if: 0,
                revision: 0,
            }),
        }
    }
}

impl PciDevice for PciHostBridge {
    fn read_config_register(&mut self, reg: usize) -> u32 {
        self.config.read_reg(reg)
    }

    fn write_config_register(&mut self, reg: usize, offset: usize, data: &[u8]) -> Vec<BarMove> {
        self.config.write_reg(reg, offset, data)
    }
}
