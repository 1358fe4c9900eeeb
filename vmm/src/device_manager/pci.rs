//! The PCI root: bus 0 with its host bridge, reached through ports 0xCF8/0xCFC and the ECAM
//! window, and the emulated functions that join it.

use std::sync::{Arc, Mutex};

use viommu::SourceId;
use vm_memory::GuestMemoryMmap;

use super::{DeviceManager, DeviceManagerError};
use crate::arch::x86_64::layout::{PCI_ECAM_SIZE, PCI_ECAM_START};
use crate::devices::bus::Bus;
use crate::devices::edu::Edu;
use crate::devices::vtd::SharedVtd;
use crate::pci::allocator::PciAllocator;
use crate::pci::bus::{
    PciBus, PciBusError, PciConfigIo, PciConfigMmio, CONFIG_ADDRESS_PORT, CONFIG_IO_LEN,
};
use crate::pci::root::PciHostBridge;

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

/// Puts an emulated edu on PCI bus 0, behind `vtd` when given; returns its requester id.
pub(super) fn add_edu(
    pci: &Mutex<PciBus>,
    mem: &GuestMemoryMmap,
    vtd: Option<&SharedVtd>,
) -> Result<SourceId, PciBusError> {
    let mut bus = pci.lock().unwrap_or_else(|e| e.into_inner());
    let slot = bus.free_slot().ok_or(PciBusError::NoFreeSlot)?;
    let source = SourceId::new(0, slot as u8, 0);
    let edu = Edu::new(mem.clone(), vtd.map(|v| (v.clone(), source)));
    let added = bus.add_device(Arc::new(Mutex::new(edu)))?;
    debug_assert_eq!(added, slot);
    Ok(source)
}
