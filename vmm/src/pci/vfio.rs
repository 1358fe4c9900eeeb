//! Host PCI functions assigned through VFIO (`--device path=...`): the passthrough crate's
//! virtualized function on our PCI bus, its BAR areas as KVM memory slots, its vectors as KVM
//! irqfds, and (without a vIOMMU) all guest RAM mapped for its DMA at IOVA = GPA.

use std::sync::{Arc, Mutex};

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use passthrough::bar::{BarAllocator, BarKind as PtBarKind, BarMove as PtBarMove};
use passthrough::dma::ContainerDma;
use passthrough::function::PciFunction;
use passthrough::host::HostDevice;
use passthrough::kvm::{create_kvm_vfio_device, KvmRouting};
use passthrough::setup::{check, HostPaths, SetupError, VfioHost};
use passthrough::slots::{BarSlots, GuestMapper};
use vfio_ioctls::VfioContainer;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::config::DeviceConfig;
use crate::devices::vtd::SharedVtd;
use crate::pci::allocator::{AllocError, PciAllocator};
use crate::pci::bus::{intx_gsi, PciBus};
use crate::pci::configuration::{Bar, BarKind, BarMove};
use crate::pci::device::{PciDevice, PciDeviceError};
use crate::vstate::vm::{SlotAllocator, Vm};

/// Errors assigning host devices; each names the device and what failed.
#[derive(Debug, thiserror::Error)]
pub enum VfioError {
    /// The host refuses the device (the message says the fix).
    #[error(transparent)]
    Setup(#[from] SetupError),
    /// Devices behind the virtual VT-d are not wired yet.
    #[error("putting {device} behind the virtual VT-d: {reason}")]
    Viommu { device: String, reason: String },
    /// MSI routing needs KVM's in-kernel irqchip.
    #[error("--device needs the in-kernel irqchip (a Linux guest)")]
    NoIrqchip,
    /// A KVM operation failed.
    #[error("{what}: {reason}")]
    Kvm { what: &'static str, reason: String },
    /// Guest RAM could not be mapped for DMA.
    #[error("mapping guest RAM for device DMA: {0}")]
    Dma(viommu::HostDmaError),
    /// Interrupt set-up of one device failed.
    #[error("device {device}: {reason}")]
    Device { device: String, reason: String },
    /// The device could not be put on the PCI bus.
    #[error(transparent)]
    Bus(#[from] crate::pci::bus::PciBusError),
}

/// Checks every `--device` before anything is built, so a bad one costs nothing.
pub fn check_devices(devices: &[DeviceConfig]) -> Result<(), VfioError> {
    for d in devices {
        check(&HostPaths::default(), &d.path)?;
    }
    Ok(())
}

/// What VFIO holds for the VM's lifetime: the containers and the DMA mappings of guest RAM.
pub struct VfioDevices {
    // The mappings go before the containers (field order).
    /// All guest RAM mapped for the devices not behind the VT-d.
    _dma: Option<ContainerDma<Arc<VfioContainer>, GuestMemoryMmap>>,
    /// One container for those devices, and one for each device behind the VT-d: its own IOVA
    /// space, whose mappings the VT-d owns.
    _hosts: Vec<VfioHost>,
}

/// Opens each device and puts it on `pci`. A device behind the VT-d gets a container of its
/// own, attached to `vtd`; the others share one that maps all guest RAM for their DMA.
pub fn attach(
    vm: &Vm,
    mem: &GuestMemoryMmap,
    pci: &Mutex<PciBus>,
    devices: &[DeviceConfig],
    vtd: Option<&SharedVtd>,
) -> Result<Option<VfioDevices>, VfioError> {
    if devices.is_empty() {
        return Ok(None);
    }
    if !vm.has_irqchip() {
        return Err(VfioError::NoIrqchip);
    }
    let kvm_vfio = create_kvm_vfio_device(vm.fd()).map_err(|e| VfioError::Kvm {
        what: "creating the KVM VFIO device",
        reason: e.to_string(),
    })?;
    let kvm_vfio = Arc::new(kvm_vfio);
    let mut shared: Option<VfioHost> = None;
    let mut behind_vtd: Vec<VfioHost> = Vec::new();
    let routing = KvmRouting::new(vm.shared_fd());
    let ram: Vec<(u64, u64)> = mem
        .iter()
        .map(|r| (r.start_addr().0, r.start_addr().0 + r.len()))
        .collect();
    let mut bus = pci.lock().unwrap_or_else(|e| e.into_inner());
    for d in devices {
        let host = match (d.iommu, &shared) {
            (false, Some(h)) => h,
            (false, None) => {
                shared.insert(VfioHost::new(HostPaths::default(), Some(kvm_vfio.clone()))?)
            }
            (true, _) => {
                behind_vtd.push(VfioHost::new(HostPaths::default(), Some(kvm_vfio.clone()))?);
                behind_vtd.last().expect("just pushed")
            }
        };
        let dev = host.open(&d.path)?;
        let name = dev.bdf().to_string();
        // INTx (for a device with neither MSI nor MSI-X) goes where the DSDT's _PRT says for
        // the slot the device is about to take.
        let slot = bus
            .free_slot()
            .ok_or(crate::pci::bus::PciBusError::NoFreeSlot)?;
        let intx = |pin: u8| Some(intx_gsi(slot as u8, pin.saturating_sub(1)));
        let function = PciFunction::new(
            name.clone(),
            dev,
            Box::new(routing.routes()),
            ram.clone(),
            &intx,
        )
        .map_err(|e| VfioError::Device {
            device: name.clone(),
            reason: e.to_string(),
        })?;
        let slots = BarSlots::new(&function);
        let device = VfioPciDevice {
            function,
            slots,
            mapper: SlotMapper {
                vm: vm.shared_fd(),
                slots: vm.slots(),
                free: Vec::new(),
            },
        };
        let slot = bus.add_device(Arc::new(Mutex::new(device)))?;
        log::info!("{name}: assigned as PCI 00:{slot:02x}.0");
        if d.iommu {
            // From now on the VT-d decides what this device's container maps: all guest RAM
            // while the guest has translation off, then exactly what its tables say.
            let vtd = vtd.ok_or_else(|| VfioError::Viommu {
                device: name.clone(),
                reason: "no --viommu".into(),
            })?;
            let source = viommu::SourceId::new(0, slot as u8, 0);
            let dma = ContainerDma::new(host.container().clone(), mem.clone());
            crate::devices::vtd::lock(vtd)
                .attach(source, Box::new(dma))
                .map_err(|e| VfioError::Viommu {
                    device: name.clone(),
                    reason: e.to_string(),
                })?;
            log::info!("{name}: behind the virtual VT-d as source {source}");
        }
    }
    // The container has an IOMMU (type1) only once a group joined it, i.e. after the first
    // open; the guest has not run yet, so no device can DMA before its RAM is mapped.
    let dma = match &shared {
        Some(host) => {
            let mut dma = ContainerDma::new(host.container().clone(), mem.clone());
            dma.map_guest_ram().map_err(VfioError::Dma)?;
            Some(dma)
        }
        None => None,
    };
    behind_vtd.extend(shared);
    Ok(Some(VfioDevices {
        _dma: dma,
        _hosts: behind_vtd,
    }))
}

/// One assigned function on our bus.
pub struct VfioPciDevice {
    function: PciFunction<HostDevice>,
    slots: BarSlots,
    mapper: SlotMapper,
}

/// KVM memory slots for BAR areas, numbered by the VM's allocator; freed numbers are reused.
struct SlotMapper {
    vm: Arc<VmFd>,
    slots: Arc<SlotAllocator>,
    free: Vec<u32>,
}

impl SlotMapper {
    fn set(&self, slot: u32, gpa: u64, size: u64, host: u64) -> Result<(), String> {
        let region = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: host,
        };
        // SAFETY: `host..host + size` is a device mmap owned by the device's `BarSlots`, which
        // removes the slot before dropping the mapping; size 0 deletes the slot.
        unsafe { self.vm.set_user_memory_region(region) }.map_err(|e| {
            format!("KVM_SET_USER_MEMORY_REGION slot {slot} at {gpa:#x} ({size:#x} bytes): {e}")
        })
    }
}

impl GuestMapper for SlotMapper {
    fn map(&mut self, gpa: u64, size: u64, host: u64) -> Result<u32, String> {
        let slot = self.free.pop().unwrap_or_else(|| self.slots.allocate());
        if let Err(e) = self.set(slot, gpa, size, host) {
            self.free.push(slot);
            return Err(e);
        }
        Ok(slot)
    }

    fn unmap(&mut self, slot: u32, gpa: u64, _size: u64) -> Result<(), String> {
        self.set(slot, gpa, 0, 0)?;
        self.free.push(slot);
        Ok(())
    }
}

fn to_kind(k: PtBarKind) -> BarKind {
    match k {
        PtBarKind::Io => BarKind::Io,
        PtBarKind::Mmio32 => BarKind::Mmio32,
        PtBarKind::Mmio64 => BarKind::Mmio64,
    }
}

fn from_kind(k: BarKind) -> PtBarKind {
    match k {
        BarKind::Io => PtBarKind::Io,
        BarKind::Mmio32 => PtBarKind::Mmio32,
        BarKind::Mmio64 => PtBarKind::Mmio64,
    }
}

/// Our allocator behind the passthrough crate's trait, keeping the error for the caller.
struct Alloc<'a> {
    alloc: &'a mut PciAllocator,
    error: Option<AllocError>,
}

impl BarAllocator for Alloc<'_> {
    fn allocate(&mut self, kind: PtBarKind, size: u64) -> Result<u64, String> {
        self.alloc.allocate_bar(to_kind(kind), size).map_err(|e| {
            let s = e.to_string();
            self.error = Some(e);
            s
        })
    }
}

impl VfioPciDevice {
    fn bar_at(&self, base: u64) -> Option<usize> {
        self.function
            .bars()
            .find(|b| b.addr == base)
            .map(|b| b.index)
    }
}

impl PciDevice for VfioPciDevice {
    fn read_config_register(&mut self, reg: usize) -> u32 {
        self.function.read_config(reg)
    }

    fn write_config_register(&mut self, reg: usize, offset: u64, data: &[u8]) -> Vec<BarMove> {
        let Ok(offset) = usize::try_from(offset) else {
            return Vec::new();
        };
        self.function
            .write_config(reg, offset, data)
            .into_iter()
            .map(|m| BarMove {
                index: m.index,
                kind: to_kind(m.kind),
                old: m.old,
                new: m.new,
                size: m.size,
            })
            .collect()
    }

    fn allocate_bars(
        &mut self,
        allocator: &mut PciAllocator,
    ) -> Result<Vec<(usize, Bar)>, PciDeviceError> {
        let mut alloc = Alloc {
            alloc: allocator,
            error: None,
        };
        let placed =
            self.function
                .place_bars(&mut alloc)
                .map_err(|e| match alloc.error.take() {
                    Some(source) => PciDeviceError::Allocate {
                        index: e.index,
                        size: e.size,
                        source,
                    },
                    None => PciDeviceError::MoveBar {
                        index: e.index,
                        old: 0,
                        new: 0,
                        reason: e.to_string(),
                    },
                })?;
        for b in &placed {
            self.slots
                .map_bar(b.index, b.addr, &mut self.mapper)
                .map_err(|e| PciDeviceError::MoveBar {
                    index: b.index,
                    old: 0,
                    new: b.addr,
                    reason: e.to_string(),
                })?;
        }
        Ok(placed
            .into_iter()
            .map(|b| {
                (
                    b.index,
                    Bar {
                        kind: to_kind(b.kind),
                        size: b.size,
                        addr: b.addr,
                        prefetchable: b.prefetchable,
                    },
                )
            })
            .collect())
    }

    /// Every BAR is on the bus: accesses to the areas mapped as memory slots never exit, and
    /// the rest (MSI-X table and PBA, unmappable areas, I/O BARs) come here.
    fn bar_is_trapped(&self, _index: usize) -> bool {
        true
    }

    fn read_bar(&mut self, base: u64, offset: u64, data: &mut [u8]) {
        match self.bar_at(base) {
            Some(i) => self.function.read_bar(i, offset, data),
            None => data.fill(0xff),
        }
    }

    fn write_bar(&mut self, base: u64, offset: u64, data: &[u8]) {
        if let Some(i) = self.bar_at(base) {
            self.function.write_bar(i, offset, data);
        }
    }

    fn move_bar(&mut self, mv: &BarMove) -> Result<(), PciDeviceError> {
        let pt = PtBarMove {
            index: mv.index,
            kind: from_kind(mv.kind),
            old: mv.old,
            new: mv.new,
            size: mv.size,
        };
        self.slots
            .move_bar(&pt, &mut self.mapper)
            .map_err(|e| PciDeviceError::MoveBar {
                index: mv.index,
                old: mv.old,
                new: mv.new,
                reason: e.to_string(),
            })
    }

    fn revert_bar(&mut self, index: usize, addr: u64) {
        self.function.revert_bar(index, addr);
    }
}

impl Drop for VfioPciDevice {
    /// Memory slots go before the mmaps behind them; then the function resets the device.
    fn drop(&mut self) {
        self.slots.unmap_all(&mut self.mapper);
    }
}
