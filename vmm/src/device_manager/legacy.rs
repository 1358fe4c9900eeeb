//! The legacy port I/O devices, each at its fixed port: those every PC guest expects (COM1, the
//! i8042's reset line, the pvpanic port, the ACPI PM register for S5 and reset) and those that
//! programs written for QEMU's PC drive directly (kvm-unit-tests): fw_cfg, isa-debug-exit, the
//! RTC/CMOS, the PM1 block with the PM timer (S3) and pc-testdev (its register, and its MMIO
//! area on the MMIO bus).

use std::io::Write;
use std::sync::{Arc, Mutex};

use passthrough::irq::IrqRoutes;
use vmm_sys_util::eventfd::EventFd;

use super::{DeviceManager, DeviceManagerError};
use crate::devices::acpi_pm::{AcpiPm, ACPI_PM_LEN, ACPI_PM_PORT};
use crate::devices::acpi_pm1::{Pm1Block, PM_BLOCK_LEN, PM_BLOCK_PORT};
use crate::devices::bus::{Bus, SharedDevice};
use crate::devices::debug_exit::{DebugExit, DEBUG_EXIT_LEN, DEBUG_EXIT_PORT};
use crate::devices::fw_cfg::{FwCfg, FwCfgConfig, FW_CFG_LEN, FW_CFG_PORT};
use crate::devices::legacy::i8042::{I8042, I8042_DATA_PORT, I8042_LEN};
use crate::devices::legacy::rtc::{Rtc, RTC_LEN, RTC_PORT};
use crate::devices::legacy::serial::{SerialDevice, COM1_IRQ, COM1_LEN, COM1_PORT};
use crate::devices::pc_testdev::{
    PcTestdev, PcTestdevIomem, PC_TESTDEV_IOMEM_SIZE, PC_TESTDEV_IOMEM_START, PC_TESTDEV_LEN,
    PC_TESTDEV_PORT,
};
use crate::devices::pvpanic::{PvPanic, PVPANIC_LEN, PVPANIC_PORT};
use crate::exit::ExitHandle;
use crate::sleep::SleepHandle;
use crate::vstate::vm::Vm;

/// The legacy devices the VMM reaches after set-up: COM1, whose input the event loop feeds, and
/// the RTC and PM1 block, whose wake event the run loop reads while the guest sleeps in S3.
pub(super) struct LegacyDevices {
    pub serial: Arc<Mutex<SerialDevice>>,
    pub rtc: Arc<Mutex<Rtc>>,
    pub pm1: Arc<Mutex<Pm1Block>>,
}

/// Puts the legacy devices on `pio`. COM1 writes to `serial_out` and interrupts on IRQ 4 when
/// `vm` has an irqchip: GSI 4 of its routing table, which is pin 4 of KVM's IOAPIC or, with the
/// split irqchip, a line of pin 4 of ours. The devices that end the VM do so through `exit`;
/// the PM1 block suspends it through `sleep`; fw_cfg serves `fw_cfg`. pc-testdev's MMIO area
/// goes on `mmio`.
pub(super) fn add_legacy_devices(
    pio: &Bus,
    mmio: &Bus,
    vm: &Vm,
    serial_out: Box<dyn Write + Send>,
    exit: &ExitHandle,
    sleep: &SleepHandle,
    fw_cfg: FwCfgConfig,
) -> Result<LegacyDevices, DeviceManagerError> {
    let eventfd = |source| DeviceManagerError::EventFd {
        what: "COM1",
        source,
    };
    let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(eventfd)?;
    if let Some(routing) = vm.routing() {
        routing
            .routes()
            .attach_irqfd(&serial_irq, COM1_IRQ, None)
            .map_err(|source| DeviceManagerError::IrqLine {
                what: "COM1",
                source,
            })?;
    }
    let serial = Arc::new(Mutex::new(
        SerialDevice::new(serial_irq, serial_out).map_err(eventfd)?,
    ));
    let rtc = Arc::new(Mutex::new(Rtc::new()));
    let pm1 = Arc::new(Mutex::new(Pm1Block::new(exit.clone(), Some(sleep.clone()))));
    // One row a device: name, device, first port, number of ports.
    let devices: [(&'static str, SharedDevice, u64, u64); 9] = [
        ("COM1", serial.clone(), COM1_PORT, COM1_LEN),
        (
            "i8042",
            Arc::new(Mutex::new(I8042::new(exit.clone()))),
            I8042_DATA_PORT,
            I8042_LEN,
        ),
        (
            "pvpanic",
            Arc::new(Mutex::new(PvPanic::new(exit.clone()))),
            PVPANIC_PORT,
            PVPANIC_LEN,
        ),
        (
            "ACPI PM register",
            Arc::new(Mutex::new(AcpiPm::new(exit.clone()))),
            ACPI_PM_PORT,
            ACPI_PM_LEN,
        ),
        (
            "fw_cfg",
            Arc::new(Mutex::new(FwCfg::new(fw_cfg))),
            FW_CFG_PORT,
            FW_CFG_LEN,
        ),
        (
            "isa-debug-exit",
            Arc::new(Mutex::new(DebugExit::new(exit.clone()))),
            DEBUG_EXIT_PORT,
            DEBUG_EXIT_LEN,
        ),
        ("RTC", rtc.clone(), RTC_PORT, RTC_LEN),
        ("ACPI PM1 block", pm1.clone(), PM_BLOCK_PORT, PM_BLOCK_LEN),
        (
            "pc-testdev",
            Arc::new(Mutex::new(PcTestdev::default())),
            PC_TESTDEV_PORT,
            PC_TESTDEV_LEN,
        ),
    ];
    for (what, device, base, len) in devices {
        DeviceManager::register(pio, what, device, base, len)?;
    }
    DeviceManager::register(
        mmio,
        "pc-testdev MMIO area",
        Arc::new(Mutex::new(PcTestdevIomem::default())),
        PC_TESTDEV_IOMEM_START,
        PC_TESTDEV_IOMEM_SIZE,
    )?;
    Ok(LegacyDevices { serial, rtc, pm1 })
}
