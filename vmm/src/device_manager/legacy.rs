//! The legacy port I/O devices every PC guest expects: COM1, the i8042 (its reset line), the
//! pvpanic port and the ACPI PM register (S5 and reset), each at its fixed port.

use std::io::Write;
use std::sync::{Arc, Mutex};

use passthrough::irq::IrqRoutes;
use vmm_sys_util::eventfd::EventFd;

use super::{DeviceManager, DeviceManagerError};
use crate::devices::acpi_pm::{AcpiPm, ACPI_PM_LEN, ACPI_PM_PORT};
use crate::devices::bus::{Bus, SharedDevice};
use crate::devices::legacy::i8042::{I8042, I8042_DATA_PORT, I8042_LEN};
use crate::devices::legacy::serial::{SerialDevice, COM1_IRQ, COM1_LEN, COM1_PORT};
use crate::devices::pvpanic::{PvPanic, PVPANIC_LEN, PVPANIC_PORT};
use crate::exit::ExitHandle;
use crate::vstate::vm::Vm;

/// Puts the legacy devices on `pio`; COM1 writes to `serial_out` and interrupts on IRQ 4 when
/// `vm` has an irqchip: GSI 4 of its routing table, which is pin 4 of KVM's IOAPIC or, with
/// the split irqchip, a line of pin 4 of ours. Returns COM1, whose input the event loop feeds.
pub(super) fn add_legacy_devices(
    pio: &Bus,
    vm: &Vm,
    serial_out: Box<dyn Write + Send>,
    exit: &ExitHandle,
) -> Result<Arc<Mutex<SerialDevice>>, DeviceManagerError> {
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
    // One row a device: name, device, first port, number of ports.
    let devices: [(&'static str, SharedDevice, u64, u64); 4] = [
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
    ];
    for (what, device, base, len) in devices {
        DeviceManager::register(pio, what, device, base, len)?;
    }
    Ok(serial)
}
