//! The PCI root: bus 0 with its host bridge, reached through ports 0xCF8/0xCFC and the ECAM
//! window, and the emulated functions that join it.

use std::sync::{Arc, Mutex};

use viommu::SourceId;
use vm_device::pci::spec::{
    PCI_COMMAND, PCI_COMMAND_IO, PCI_COMMAND_MEMORY, PCI_INTERRUPT_LINE, PCI_INTERRUPT_PIN,
};
use vm_memory::GuestMemoryMmap;

use super::{DeviceManager, DeviceManagerError};
use crate::arch::x86_64::layout::{PCI_ECAM_SIZE, PCI_ECAM_START};
use crate::devices::bus::Bus;
use crate::devices::edu::{Edu, EduInterrupts};
use crate::devices::interrupt::IrqLine;
use crate::devices::vtd::SharedVtd;
use crate::pci::allocator::PciAllocator;
use crate::pci::bus::{
    intx_gsi, ConfigAddress, PciBus, PciBusError, PciConfigIo, PciConfigMmio, CONFIG_ADDRESS_PORT,
    CONFIG_IO_LEN,
};
use crate::pci::root::PciHostBridge;
use vm_device::interrupt::MsiSender;

/// Bus 0 with its host bridge at 00:00.0, its BARs placed in the windows of a guest with
/// `ram_size` bytes of RAM, its config mechanisms on `pio` and `mmio`.
pub(super) fn create_pci_root(
    ram_size: u64,
    mmio: &Arc<Bus>,
    pio: &Arc<Bus>,
) -> Result<Arc<Mutex<PciBus>>, DeviceManagerError> {
    let mut pci = PciBus::new(PciAllocator::new(ram_size), mmio.clone(), pio.clone());
    pci.add_device(Arc::new(Mutex::new(PciHostBridge::new())))?;
    let pci = Arc::new(Mutex::new(pci));
    // The config mechanisms hold the bus weakly: the bus holds the buses they sit on.
    DeviceManager::register(
        pio,
        "PCI config ports",
        Arc::new(Mutex::new(PciConfigIo::new(Arc::downgrade(&pci)))),
        CONFIG_ADDRESS_PORT,
        CONFIG_IO_LEN,
    )?;
    DeviceManager::register(
        mmio,
        "PCI ECAM",
        Arc::new(Mutex::new(PciConfigMmio::new(Arc::downgrade(&pci)))),
        PCI_ECAM_START,
        PCI_ECAM_SIZE,
    )?;
    Ok(pci)
}

/// Puts an emulated edu on PCI bus 0, behind `vtd` when given, sending its MSIs through the
/// sender `msi` makes for its requester ID and its INTA# to the wire `intx` makes for the GSI
/// the `_PRT` gives it; returns its requester id. Its BAR is placed and its interrupt line set, as firmware leaves them.
pub(super) fn add_edu(
    pci: &Mutex<PciBus>,
    mem: &GuestMemoryMmap,
    vtd: Option<&SharedVtd>,
    msi: impl FnOnce(SourceId) -> Arc<dyn MsiSender>,
    intx: impl FnOnce(u32) -> Option<Box<dyn IrqLine>>,
) -> Result<SourceId, PciBusError> {
    let mut bus = pci.lock().unwrap_or_else(|e| e.into_inner());
    let addr = bus.free_address().ok_or(PciBusError::NoFreeSlot)?;
    let slot = addr.slot();
    let source = SourceId::new(0, slot, addr.function());
    let interrupts = EduInterrupts {
        msi: msi(source),
        intx: intx(intx_gsi(slot, 0)),
    };
    let edu = Edu::new(mem.clone(), source, vtd.cloned(), interrupts);
    bus.add_device_at(addr, Arc::new(Mutex::new(edu)))?;
    firmware_init(&bus, slot);
    Ok(source)
}

/// What PC firmware does to a function it finds at boot (SeaBIOS's `pci_bios_init_device`):
/// sets its interrupt line to the GSI the `_PRT` routes its pin to, and turns on decoding of
/// its BARs, which the bus placed. Bus mastering stays off: that is the driver's to turn on.
/// Programs written for QEMU's PC, such as kvm-unit-tests, rely on both.
fn firmware_init(bus: &PciBus, slot: u8) {
    let at = |offset: usize| ConfigAddress {
        bus: 0,
        device: slot,
        function: 0,
        reg: offset / 4,
        offset: offset % 4,
    };
    let mut pin = [0u8];
    bus.config_read(at(PCI_INTERRUPT_PIN), &mut pin);
    if let Some(intx) = pin[0].checked_sub(1).filter(|i| *i < 4) {
        // GSIs 16..24: a byte.
        bus.config_write(at(PCI_INTERRUPT_LINE), &[intx_gsi(slot, intx) as u8]);
    }
    let mut command = [0u8; 2];
    bus.config_read(at(PCI_COMMAND), &mut command);
    let command = u16::from_le_bytes(command) | PCI_COMMAND_MEMORY | PCI_COMMAND_IO;
    bus.config_write(at(PCI_COMMAND), &command.to_le_bytes());
}
