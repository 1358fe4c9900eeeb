//! PCI bus 0: device slots, config-access routing, BAR registration on the MMIO and PIO buses,
//! and the two config mechanisms: ports 0xCF8/0xCFC and ECAM.

use std::sync::{Arc, Mutex, Weak};

use vm_device::pci::bar::{BarKind, BarMove};
use vm_device::pci::device::{PciDevice, PciDeviceError};
use vm_device::pci::spec::{PCIE_CONFIG_REGS, PCI_HEADER_TYPE, PCI_HEADER_TYPE_MULTI_FUNCTION};
use vm_device::{debug_limited, error_limited, warn_limited};

use crate::devices::bus::{Bus, BusDevice, BusError};
pub use crate::pci::address::NUM_SLOTS;
use crate::pci::address::{PciAddress, NUM_FUNCTIONS};
use crate::pci::allocator::PciAllocator;

/// Configuration address port (PCI 3.0, 3.2.2.3.2 "Configuration Mechanism #1").
pub const CONFIG_ADDRESS_PORT: u64 = 0xcf8;
/// CONFIG_ADDRESS (4 bytes) and CONFIG_DATA (4 bytes).
pub const CONFIG_IO_LEN: u64 = 8;
const CONFIG_ENABLE: u32 = 1 << 31;

/// First GSI of legacy PCI interrupts: IOAPIC pins 16..24 (0..16 are ISA IRQs).
pub const PCI_INTX_GSI_BASE: u32 = 16;
/// Number of GSIs the INTx lines are swizzled over.
pub const PCI_INTX_GSI_COUNT: u32 = 8;

/// The GSI that INTx `pin` (0 = INTA .. 3 = INTD) of the device in `slot` is wired to, as the
/// DSDT's _PRT says: the usual swizzle (PCI-to-PCI Bridge Architecture 1.2, 9.1) over pins
/// 16..24, level-triggered, active low. A passthrough device registers its INTx irqfd (with a
/// resample fd) on this GSI.
pub fn intx_gsi(slot: u8, pin: u8) -> u32 {
    PCI_INTX_GSI_BASE + (u32::from(slot) + u32::from(pin)) % PCI_INTX_GSI_COUNT
}

/// A shared PCI function.
pub type SharedPciDevice = Arc<Mutex<dyn PciDevice>>;

/// Errors adding devices.
#[derive(Debug, thiserror::Error)]
pub enum PciBusError {
    /// All 32 slots are taken.
    #[error("no free PCI slot (all {NUM_SLOTS} used)")]
    NoFreeSlot,
    /// A slot asked for explicitly already holds a function (the host bridge's slot 0, or an
    /// emulated device's).
    #[error("PCI slot {slot:02x} already holds a function")]
    SlotTaken { slot: u8 },
    /// A function asked for explicitly is already there.
    #[error("PCI {0} is taken")]
    FunctionTaken(PciAddress),
    /// A function other than 0 in a slot without function 0, which a guest would not scan
    /// (it looks for functions 1-7 only when function 0 says multi-function).
    #[error("PCI {0}: slot {slot:02x} has no function 0", slot = .0.slot())]
    NoFunctionZero(PciAddress),
    /// BAR placement failed.
    #[error("PCI device {addr}: {source}")]
    Device {
        addr: PciAddress,
        source: PciDeviceError,
    },
    /// BAR registration on a bus failed.
    #[error("PCI device {addr}: BAR {index} at {bar:#x}: {source}")]
    Register {
        addr: PciAddress,
        index: usize,
        bar: u64,
        source: BusError,
    },
}

/// Why a BAR move the guest asked for was not followed.
#[derive(Debug, thiserror::Error)]
enum MoveError {
    /// Another device decodes there.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// The function could not follow (e.g. a memory slot KVM refused).
    #[error(transparent)]
    Device(#[from] PciDeviceError),
}

/// A decoded configuration access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConfigAddress {
    /// Bus number.
    pub bus: u8,
    /// Device (slot) number.
    pub device: u8,
    /// Function number.
    pub function: u8,
    /// Dword register index, 0..1024.
    pub reg: usize,
    /// Byte offset within the dword.
    pub offset: usize,
}

/// Decodes an ECAM offset (PCI Express Base 4.0, 7.2.2, Table 7-1: bus 27:20, device 19:15,
/// function 14:12, register 11:0).
pub fn decode_ecam(offset: u64) -> ConfigAddress {
    ConfigAddress {
        bus: ((offset >> 20) & 0xff) as u8,
        device: ((offset >> 15) & 0x1f) as u8,
        function: ((offset >> 12) & 0x7) as u8,
        reg: ((offset & 0xfff) >> 2) as usize,
        offset: (offset & 0x3) as usize,
    }
}

/// Decodes CONFIG_ADDRESS plus the CONFIG_DATA byte offset (PCI 3.0, Figure 3-2: enable 31,
/// bus 23:16, device 15:11, function 10:8, register 7:2). None when the enable bit is clear.
/// Bits 1:0, which the spec reserves, are ORed into the byte offset as QEMU's i440FX and Q35
/// hosts do: kvm-unit-tests' `pci_config_readw(dev, PCI_DEVICE_ID)` writes 0x...02 to
/// CONFIG_ADDRESS and reads the word at 0xCFC, and expects the device ID.
pub fn decode_config_address(addr: u32, data_offset: usize) -> Option<ConfigAddress> {
    if addr & CONFIG_ENABLE == 0 {
        return None;
    }
    Some(ConfigAddress {
        bus: ((addr >> 16) & 0xff) as u8,
        device: ((addr >> 11) & 0x1f) as u8,
        function: ((addr >> 8) & 0x7) as u8,
        reg: ((addr & 0xfc) >> 2) as usize,
        offset: (addr & 0x3) as usize | data_offset,
    })
}

/// Forwards accesses to one BAR from a bus to the PCI function owning it. A BAR move relocates
/// the adapter on its bus, so it stays the same BAR wherever it decodes.
struct BarAdapter {
    device: SharedPciDevice,
    index: usize,
}

impl BusDevice for BarAdapter {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        self.device
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .read_bar(self.index, offset, data);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        self.device
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .write_bar(self.index, offset, data);
    }
}

/// One slot of bus 0: its functions, and whether it is held for functions placed explicitly.
#[derive(Clone, Default)]
struct Slot {
    functions: [Option<SharedPciDevice>; NUM_FUNCTIONS],
    /// Asked for by an explicitly placed function: automatic placement passes it over.
    reserved: bool,
}

impl Slot {
    fn is_empty(&self) -> bool {
        self.functions.iter().all(Option::is_none)
    }

    /// `value`, the dword holding the header type as a function of this slot reports it, with
    /// the multi-function bit (PCI Local Bus 3.0, 6.2.1) set when the slot holds more than one
    /// function and clear otherwise.
    fn header_type_dword(&self, value: u32) -> u32 {
        let bit = u32::from(PCI_HEADER_TYPE_MULTI_FUNCTION) << (8 * (PCI_HEADER_TYPE % 4));
        if self.functions.iter().flatten().count() > 1 {
            value | bit
        } else {
            value & !bit
        }
    }
}

/// Bus 0 with its devices, up to eight functions a slot.
pub struct PciBus {
    slots: Vec<Slot>,
    allocator: PciAllocator,
    mmio: Arc<Bus>,
    pio: Arc<Bus>,
}

impl PciBus {
    /// An empty bus placing BARs with `allocator` on `mmio` and `pio`.
    pub fn new(allocator: PciAllocator, mmio: Arc<Bus>, pio: Arc<Bus>) -> Self {
        Self {
            slots: vec![Slot::default(); NUM_SLOTS],
            allocator,
            mmio,
            pio,
        }
    }

    /// Function 0 of the slot [`PciBus::add_device`] will use next: the first one neither
    /// holding functions nor reserved, if any.
    pub fn free_address(&self) -> Option<PciAddress> {
        let slot = self
            .slots
            .iter()
            .position(|s| s.is_empty() && !s.reserved)?;
        // Below NUM_SLOTS, as every index of `slots`.
        PciAddress::new(slot as u8, 0).ok()
    }

    /// Holds the slot of `addr` for functions placed there with [`PciBus::add_device_at`]:
    /// [`PciBus::add_device`] passes it over. Refused when the slot already holds a function.
    pub fn reserve(&mut self, addr: PciAddress) -> Result<(), PciBusError> {
        let slot = &mut self.slots[usize::from(addr.slot())];
        if !slot.is_empty() {
            return Err(PciBusError::SlotTaken { slot: addr.slot() });
        }
        slot.reserved = true;
        Ok(())
    }

    /// Adds `device` as function 0 of the first free slot ([`PciBus::free_address`]), placing
    /// and registering its BARs. Returns the slot.
    pub fn add_device(&mut self, device: SharedPciDevice) -> Result<usize, PciBusError> {
        let addr = self.free_address().ok_or(PciBusError::NoFreeSlot)?;
        self.add_device_at(addr, device)?;
        Ok(usize::from(addr.slot()))
    }

    /// Adds `device` at `addr`, placing and registering its BARs. Function 0 of a slot comes
    /// first: a guest scans the others only once function 0 is there.
    pub fn add_device_at(
        &mut self,
        addr: PciAddress,
        device: SharedPciDevice,
    ) -> Result<(), PciBusError> {
        let slot = &self.slots[usize::from(addr.slot())];
        if slot.functions[usize::from(addr.function())].is_some() {
            return Err(PciBusError::FunctionTaken(addr));
        }
        if addr.function() != 0 && slot.functions[0].is_none() {
            return Err(PciBusError::NoFunctionZero(addr));
        }
        let bars = device
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .place_bars(&mut self.allocator)
            .map_err(|source| PciBusError::Device { addr, source })?;
        for bar in bars {
            let adapter = Arc::new(Mutex::new(BarAdapter {
                device: device.clone(),
                index: bar.index,
            }));
            self.bus_for(bar.kind)
                .insert(adapter, bar.addr, bar.size)
                .map_err(|source| PciBusError::Register {
                    addr,
                    index: bar.index,
                    bar: bar.addr,
                    source,
                })?;
            log::debug!(
                "PCI {addr} BAR{} {:?} at {:#x} size {:#x}",
                bar.index,
                bar.kind,
                bar.addr,
                bar.size
            );
        }
        self.slots[usize::from(addr.slot())].functions[usize::from(addr.function())] = Some(device);
        Ok(())
    }

    /// The allocator, for devices placing extra resources.
    pub fn allocator(&mut self) -> &mut PciAllocator {
        &mut self.allocator
    }

    fn bus_for(&self, kind: BarKind) -> &Bus {
        match kind {
            BarKind::Io => &self.pio,
            _ => &self.mmio,
        }
    }

    /// The function `a` addresses, with its slot.
    fn function(&self, a: &ConfigAddress) -> Option<(&Slot, &SharedPciDevice)> {
        // Bus 0 only.
        if a.bus != 0 || a.reg >= PCIE_CONFIG_REGS {
            return None;
        }
        let slot = self.slots.get(usize::from(a.device))?;
        Some((slot, slot.functions.get(usize::from(a.function))?.as_ref()?))
    }

    /// Reads `data.len()` bytes of config space; absent functions read as all ones. The
    /// header type's multi-function bit is the bus's to say, as only the bus knows the slot's
    /// population: set in every function of a slot holding more than one, clear otherwise,
    /// whatever the function's own header says (a host device may have it set, and a guest
    /// would then scan functions that are not there).
    pub fn config_read(&self, a: ConfigAddress, data: &mut [u8]) {
        let value = match self.function(&a) {
            Some((slot, d)) => {
                let value = d
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .read_config_register(a.reg);
                if a.reg == PCI_HEADER_TYPE / 4 {
                    slot.header_type_dword(value)
                } else {
                    value
                }
            }
            None => 0xffff_ffff,
        };
        let bytes = value.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = bytes.get(a.offset + i).copied().unwrap_or(0xff);
        }
    }

    /// Writes config space and applies the BAR moves the write causes.
    pub fn config_write(&self, a: ConfigAddress, data: &[u8]) {
        let Some((_, dev)) = self.function(&a) else {
            return;
        };
        let mut d = dev.lock().unwrap_or_else(|e| e.into_inner());
        for mv in d.write_config_register(a.reg, a.offset, data) {
            self.apply_move(&a, &mut *d, &mv);
        }
    }

    /// Moves BAR `mv.index` of the function at `a` on its bus and has the function follow;
    /// when either cannot, the BAR goes back where it was.
    fn apply_move(&self, a: &ConfigAddress, dev: &mut dyn PciDevice, mv: &BarMove) {
        let (slot, function) = (a.device, a.function);
        let bus = self.bus_for(mv.kind);
        let result = bus
            .relocate(mv.old, mv.new)
            .map_err(MoveError::from)
            .and_then(|()| {
                dev.move_bar(mv).map_err(|e| {
                    // The bus moved but the device could not follow: put the bus back too.
                    if let Err(back) = bus.relocate(mv.new, mv.old) {
                        error_limited!("BAR{} back to {:#x}: {back}", mv.index, mv.old);
                    }
                    MoveError::from(e)
                })
            });
        match result {
            Ok(()) => debug_limited!(
                "PCI 00:{slot:02x}.{function} BAR{} moved {:#x} -> {:#x}",
                mv.index,
                mv.old,
                mv.new
            ),
            Err(e) => {
                // Real hardware would decode the overlap ambiguously; we keep the old place.
                warn_limited!(
                    "PCI 00:{slot:02x}.{function} BAR{} move {:#x} -> {:#x} refused: {e}",
                    mv.index,
                    mv.old,
                    mv.new
                );
                dev.revert_bar(mv.index, mv.old);
            }
        }
    }
}

/// Runs `f` on `bus` if it still exists. The config mechanisms sit on the buses the PCI bus
/// holds, so they hold it weakly (a strong reference would keep the VM's devices alive
/// forever); once it is gone, config space reads as absent.
fn with_bus<R>(bus: &Weak<Mutex<PciBus>>, f: impl FnOnce(&PciBus) -> R) -> Option<R> {
    let bus = bus.upgrade()?;
    let guard = bus.lock().unwrap_or_else(|e| e.into_inner());
    Some(f(&guard))
}

/// The legacy configuration ports 0xCF8 (address) and 0xCFC..0xCFF (data).
pub struct PciConfigIo {
    bus: Weak<Mutex<PciBus>>,
    address: u32,
}

impl PciConfigIo {
    /// Config ports for `bus`.
    pub fn new(bus: Weak<Mutex<PciBus>>) -> Self {
        Self { bus, address: 0 }
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        if offset < 4 {
            // CONFIG_ADDRESS reads back (only as a whole dword in practice).
            let bytes = self.address.to_le_bytes();
            for (i, b) in data.iter_mut().enumerate() {
                *b = bytes.get(offset as usize + i).copied().unwrap_or(0);
            }
            return;
        }
        let read = decode_config_address(self.address, offset as usize - 4)
            .and_then(|a| with_bus(&self.bus, |bus| bus.config_read(a, data)));
        if read.is_none() {
            data.fill(0xff);
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if offset == 0 && data.len() == 4 {
            let mut b = [0u8; 4];
            b.copy_from_slice(data);
            self.address = u32::from_le_bytes(b);
            return;
        }
        if offset < 4 {
            // Byte/word writes to 0xCF8..0xCFB are not config cycles (0xCF9 is a reset
            // control register on some chipsets); ignore them.
            return;
        }
        if let Some(a) = decode_config_address(self.address, offset as usize - 4) {
            with_bus(&self.bus, |bus| bus.config_write(a, data));
        }
    }
}

/// The ECAM window (MCFG).
pub struct PciConfigMmio {
    bus: Weak<Mutex<PciBus>>,
}

impl PciConfigMmio {
    /// ECAM for `bus`.
    pub fn new(bus: Weak<Mutex<PciBus>>) -> Self {
        Self { bus }
    }
}

impl BusDevice for PciConfigMmio {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        let a = decode_ecam(offset);
        if a.offset + data.len() > 4
            || with_bus(&self.bus, |bus| bus.config_read(a, data)).is_none()
        {
            data.fill(0xff);
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        let a = decode_ecam(offset);
        if a.offset + data.len() <= 4 {
            with_bus(&self.bus, |bus| bus.config_write(a, data));
        }
    }
}

#[cfg(test)]
#[path = "bus_tests.rs"]
mod tests;
