//! Host PCI functions assigned through VFIO (`--device path=...`): the passthrough crate's
//! function on PCI bus 0 ([`VfioPciDevice`]), its BAR areas as KVM memory slots, its vectors as
//! KVM irqfds, and (without a vIOMMU) all guest RAM mapped for its DMA at IOVA = GPA; behind
//! the virtual VT-d, the VT-d decides what its container maps.

use std::sync::{Arc, Mutex};

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use passthrough::device::VfioPciDevice;
use passthrough::dma::ContainerDma;
use passthrough::function::PciFunction;
use passthrough::irq::{IrqError, IrqRoutes};
use passthrough::kvm::create_kvm_vfio_device;
use passthrough::setup::{check, HostPaths, SetupError, VfioHost};
use passthrough::slots::GuestMapper;
use vfio_ioctls::VfioContainer;
use vm_device::dma::HostDmaError;
use vm_memory::GuestMemoryMmap;

use crate::config::DeviceConfig;
use crate::devices::vtd::intremap::{InterruptRemapping, RemappedIrqRoutes};
use crate::devices::vtd::SharedVtd;
use crate::pci::bus::{intx_gsi, PciBus, PciBusError};
use crate::vstate::vm::{SlotAllocator, Vm};

/// Errors assigning host devices; each names the device and what failed.
#[derive(Debug, thiserror::Error)]
pub enum VfioError {
    /// The host refuses the device (the message says the fix).
    #[error(transparent)]
    Setup(#[from] SetupError),
    /// `iommu=on` without a virtual VT-d to sit behind.
    #[error("device {device}: iommu=on needs --viommu")]
    NoViommu { device: String },
    /// The virtual VT-d refused the device.
    #[error("putting {device} behind the virtual VT-d: {source}")]
    Viommu {
        device: String,
        source: viommu::ConfigError,
    },
    /// MSI routing needs KVM's irqchip (in-kernel or split).
    #[error("--device needs KVM's irqchip (a Linux guest)")]
    NoIrqchip,
    /// KVM's VFIO pseudo-device could not be created.
    #[error("creating the KVM VFIO device: {0}")]
    KvmVfio(#[source] kvm_ioctls::Error),
    /// Guest RAM could not be mapped for DMA.
    #[error("mapping guest RAM for device DMA: {0}")]
    Dma(#[source] HostDmaError),
    /// Interrupt set-up of one device failed.
    #[error("device {device}: {source}")]
    Irq { device: String, source: IrqError },
    /// The device could not be put on the PCI bus.
    #[error("device {device}: {source}")]
    Bus { device: String, source: PciBusError },
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
    /// The requester ids of the devices behind the VT-d.
    behind_vtd: Vec<viommu::SourceId>,
}

impl VfioDevices {
    /// The requester ids of the devices put behind the VT-d, whose host mappings it holds.
    pub fn behind_vtd(&self) -> &[viommu::SourceId] {
        &self.behind_vtd
    }
}

/// Opens each device and puts it on `pci`. A device behind the VT-d gets a container of its
/// own, attached to `vtd`; the others share one that maps all guest RAM for their DMA.
///
/// With `remapping` (the VT-d's interrupt remapping), a device behind the VT-d has its MSI and
/// MSI-X routes translated by it.
pub fn attach(
    vm: &Vm,
    mem: &GuestMemoryMmap,
    pci: &Mutex<PciBus>,
    devices: &[DeviceConfig],
    vtd: Option<&SharedVtd>,
    remapping: Option<&Arc<InterruptRemapping>>,
) -> Result<Option<VfioDevices>, VfioError> {
    if devices.is_empty() {
        return Ok(None);
    }
    let routing = vm.routing().ok_or(VfioError::NoIrqchip)?;
    let kvm_vfio = create_kvm_vfio_device(vm.fd()).map_err(VfioError::KvmVfio)?;
    let kvm_vfio = Arc::new(kvm_vfio);
    let mut shared: Option<VfioHost> = None;
    let mut behind_vtd: Vec<VfioHost> = Vec::new();
    let mut sources = Vec::new();
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
        let bus_error = |source| VfioError::Bus {
            device: name.clone(),
            source,
        };
        let slot = bus
            .free_slot()
            .ok_or_else(|| bus_error(PciBusError::NoFreeSlot))?;
        let intx = |pin: u8| Some(intx_gsi(slot as u8, pin.saturating_sub(1)));
        let source = viommu::SourceId::new(0, slot as u8, 0);
        let routes: Box<dyn IrqRoutes> = match (d.iommu, vtd, remapping) {
            (true, Some(vtd), Some(r)) => {
                Box::new(RemappedIrqRoutes::new(source, vtd.clone(), r.clone()))
            }
            _ => Box::new(routing.routes()),
        };
        let function = PciFunction::new(name.clone(), dev, routes, &intx).map_err(|source| {
            VfioError::Irq {
                device: name.clone(),
                source,
            }
        })?;
        let mapper = SlotMapper {
            vm: vm.shared_fd(),
            slots: vm.slots(),
            free: Vec::new(),
        };
        let device = VfioPciDevice::new(function, Box::new(mapper));
        let slot = bus
            .add_device(Arc::new(Mutex::new(device)))
            .map_err(bus_error)?;
        log::info!("{name}: assigned as PCI 00:{slot:02x}.0");
        if d.iommu {
            // From now on the VT-d decides what this device's container maps: all guest RAM
            // while the guest has translation off, then exactly what its tables say.
            let vtd = vtd.ok_or_else(|| VfioError::NoViommu {
                device: name.clone(),
            })?;
            let dma = ContainerDma::new(host.container().clone(), mem.clone());
            crate::devices::vtd::lock(vtd)
                .attach(source, Box::new(dma))
                .map_err(|source| VfioError::Viommu {
                    device: name.clone(),
                    source,
                })?;
            sources.push(source);
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
        behind_vtd: sources,
    }))
}

/// KVM memory slots for BAR areas, numbered by the VM's allocator; freed numbers are reused.
struct SlotMapper {
    vm: Arc<VmFd>,
    slots: Arc<SlotAllocator>,
    free: Vec<u32>,
}

impl SlotMapper {
    fn set(&self, slot: u32, gpa: u64, size: u64, host: u64) -> Result<(), std::io::Error> {
        let region = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: host,
        };
        // SAFETY: `host..host + size` is a device mmap owned by the device's `BarSlots`, which
        // removes the slot before dropping the mapping; size 0 deletes the slot.
        unsafe { self.vm.set_user_memory_region(region) }.map_err(std::io::Error::from)
    }
}

impl GuestMapper for SlotMapper {
    fn map(&mut self, gpa: u64, size: u64, host: u64) -> Result<u32, std::io::Error> {
        let slot = self.free.pop().unwrap_or_else(|| self.slots.allocate());
        if let Err(e) = self.set(slot, gpa, size, host) {
            self.free.push(slot);
            return Err(e);
        }
        Ok(slot)
    }

    fn unmap(&mut self, slot: u32, gpa: u64, _size: u64) -> Result<(), std::io::Error> {
        self.set(slot, gpa, 0, 0)?;
        self.free.push(slot);
        Ok(())
    }
}
