//! Host PCI functions assigned through VFIO (`--device path=...`): the passthrough crate's
//! function on PCI bus 0 ([`VfioPciDevice`]), its BAR areas as KVM memory slots, its vectors as
//! KVM irqfds, and (without a vIOMMU) all guest RAM mapped for its DMA at IOVA = GPA; behind
//! the virtual VT-d, the VT-d decides what its host domain maps.
//!
//! Each device gets the backend `--device ...,backend=` asks for, by default iommufd where the
//! host has it and the legacy container otherwise; a VM may mix them. Per backend, the devices
//! without a vIOMMU share one host domain (a type1 container, or an IOAS of the VM's one
//! iommufd) where guest RAM is mapped, and pinned, once; each device behind the VT-d gets a
//! domain of its own, as the VT-d engine keeps one host address space per requester id. On
//! iommufd, a device behind the VT-d whose guest view is identity (translation off, or a
//! pass-through entry: Linux's `iommu=pt`) moves onto the shared IOAS instead of mapping all
//! guest RAM in its own ([`passthrough::identity`]); there guest RAM is mapped while some
//! device uses it. A container cannot do that (a group cannot change containers while its
//! devices are open): each device behind the VT-d maps guest RAM in its own then.
//!
//! Assignment has two phases: [`open`] puts each device in its host domain and reads what the
//! domains behind the VT-d can map, before the VT-d exists (its address width must fit them:
//! [`crate::device_manager::address_width`]); [`attach`] then puts them on the bus.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use iommufd_ioctls::IommuFd;
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use passthrough::device::VfioPciDevice;
use passthrough::dma::{DmaIoctls, HostDmaMappings};
use passthrough::function::PciFunction;
use passthrough::host::HostDevice;
use passthrough::identity::{GuestRam, IdentityDomain, IdentityHold, IoasSwitch};
use passthrough::iommufd::{open_iommufd, IommufdHost};
use passthrough::iova::IovaRanges;
use passthrough::irq::{IrqError, IrqRoutes};
use passthrough::kvm::create_kvm_vfio_device;
use passthrough::setup::{select, Backend, HostPaths, Route, Selected, SetupError, VfioHost};
use passthrough::slots::GuestMapper;
use vfio_ioctls::VfioDeviceFd;
use vm_device::dma::{HostDma, HostDmaError};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::config::DeviceConfig;
use crate::device_manager::address_width::HostIova;
use crate::devices::vtd::host_time::TimedHostDma;
use crate::devices::vtd::intremap::{InterruptRemapping, RemappedIrqRoutes};
use crate::devices::vtd::SharedVtd;
use crate::pci::address::PciAddress;
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
    #[error("mapping guest RAM for device DMA in the {domain}: {source}")]
    Dma {
        domain: String,
        source: HostDmaError,
    },
    /// Guest RAM could not be mapped in the shared IOAS.
    #[error("mapping guest RAM for device DMA in the {domain}: {source}")]
    Identity {
        domain: String,
        source: passthrough::identity::IdentityError,
    },
    /// Interrupt set-up of one device failed.
    #[error("device {device}: {source}")]
    Irq { device: String, source: IrqError },
    /// The device could not be put on the PCI bus.
    #[error("device {device}: {source}")]
    Bus { device: String, source: PciBusError },
}

/// Checks every `--device` (for the backend it would get) before anything is built, so a bad
/// one costs nothing.
pub fn check_devices(devices: &[DeviceConfig]) -> Result<(), VfioError> {
    for d in devices {
        select(&HostPaths::default(), &d.path, d.backend)?;
    }
    Ok(())
}

/// One host DMA domain: what devices are opened into and what maps for their DMA.
enum Domain {
    /// A VFIO type1 container.
    Container(VfioHost),
    /// An IOAS of the VM's iommufd.
    Ioas(IommufdHost),
}

impl Domain {
    fn open(&self, s: &Selected) -> Result<HostDevice, SetupError> {
        match (self, &s.route) {
            (Domain::Container(h), Route::Container) => h.open(&s.checked.path),
            (Domain::Ioas(h), Route::Iommufd { cdev }) => h.open(&s.checked, cdev),
            // Domains are made for their device's route ([`Domains::create`]); what
            // vfio-ioctls answers for a device given the other backend's domain.
            _ => Err(SetupError::Vfio {
                bdf: s.checked.bdf.clone(),
                source: vfio_ioctls::VfioError::DowncastVfioOps,
            }),
        }
    }

    /// The domain's host DMA over `mem`; with `all_ram`, every guest RAM region mapped at
    /// IOVA = GPA.
    fn dma(&self, mem: &GuestMemoryMmap, all_ram: bool) -> Result<Box<dyn HostDma>, HostDmaError> {
        fn build<C: DmaIoctls + 'static>(
            ioctls: C,
            mem: &GuestMemoryMmap,
            all_ram: bool,
        ) -> Result<Box<dyn HostDma>, HostDmaError> {
            let mut dma = HostDmaMappings::new(ioctls, mem.clone());
            if all_ram {
                dma.map_guest_ram()?;
            }
            Ok(Box::new(dma))
        }
        match self {
            Domain::Container(h) => build(h.container().clone(), mem, all_ram),
            Domain::Ioas(h) => build(h.dma(), mem, all_ram),
        }
    }

    /// For an IOAS: its id, and mapping guest RAM in it at IOVA = GPA, as the shared identity
    /// domain.
    fn identity(&self, mem: &GuestMemoryMmap) -> Option<Arc<IdentityDomain>> {
        match self {
            Domain::Container(_) => None,
            Domain::Ioas(h) => {
                let ram: Box<dyn GuestRam> = Box::new(HostDmaMappings::new(h.dma(), mem.clone()));
                Some(IdentityDomain::new(h.ioas_id(), ram))
            }
        }
    }

    /// What the domain can map now (its devices' host IOMMUs' reach, less their reserved
    /// regions), for the device `bdf` just opened in it; None when the host does not say.
    fn iova_ranges(&self, bdf: &str) -> Result<Option<IovaRanges>, SetupError> {
        let ranges = match self {
            Domain::Container(h) => h.iova_ranges(),
            Domain::Ioas(h) => h.iova_ranges().map(Some),
        };
        ranges.map_err(|source| SetupError::IovaRanges {
            bdf: bdf.to_string(),
            source,
        })
    }

    fn describe(&self) -> String {
        match self {
            Domain::Container(_) => "VFIO container".to_string(),
            Domain::Ioas(h) => format!("iommufd IOAS {}", h.ioas_id()),
        }
    }
}

/// The VM's host domains, made as devices need them.
struct Domains {
    kvm_vfio: Arc<VfioDeviceFd>,
    /// The VM's one iommufd, opened for the first iommufd device.
    iommufd: Option<Arc<IommuFd>>,
    /// Shared by the devices without a vIOMMU, one per backend; on iommufd, also by those
    /// behind the VT-d whose view is identity.
    shared_container: Option<Domain>,
    shared_ioas: Option<Domain>,
    /// Whether a device without a vIOMMU uses the shared IOAS (which then maps guest RAM for
    /// the VM's lifetime).
    ioas_without_viommu: bool,
    /// One per device behind the VT-d, once it is on the bus.
    own: Vec<Domain>,
}

impl Domains {
    /// A new domain for the device `s`: a container, or an IOAS in the VM's iommufd.
    fn create(&mut self, s: &Selected) -> Result<Domain, SetupError> {
        let kvm_vfio = Some(self.kvm_vfio.clone());
        Ok(match s.route {
            Route::Container => Domain::Container(VfioHost::new(HostPaths::default(), kvm_vfio)?),
            Route::Iommufd { .. } => {
                let iommufd = match &self.iommufd {
                    Some(fd) => fd.clone(),
                    None => self
                        .iommufd
                        .insert(open_iommufd(&HostPaths::default(), &s.checked)?)
                        .clone(),
                };
                Domain::Ioas(IommufdHost::new(iommufd, kvm_vfio, &s.checked)?)
            }
        })
    }

    /// The domain the devices of `s`'s backend without a vIOMMU share, made on first use.
    fn shared(&mut self, s: &Selected) -> Result<&Domain, SetupError> {
        let slot = match s.route.backend() {
            Backend::Container => &mut self.shared_container,
            Backend::Iommufd => &mut self.shared_ioas,
        };
        let domain = match slot.take() {
            Some(d) => d,
            None => self.create(s)?,
        };
        let slot = match s.route.backend() {
            Backend::Container => &mut self.shared_container,
            Backend::Iommufd => &mut self.shared_ioas,
        };
        Ok(slot.insert(domain))
    }
}

/// One device opened in its host domain, not yet on the bus.
struct OpenDevice {
    dev: HostDevice,
    /// Its own domain (behind the VT-d), or None for its backend's shared one.
    own: Option<Domain>,
    /// What its own domain can map (None: the host does not say).
    iova: Option<IovaRanges>,
    /// Where on bus 0 the user asked for it (`addr=`), if anywhere.
    addr: Option<PciAddress>,
}

/// The `--device`s opened in their host domains (phase one of assignment): what the VT-d's
/// address width must fit ([`OpenDevices::behind_vtd`]) before [`attach`] puts them on the bus.
pub struct OpenDevices {
    // The devices go before the domains they were opened in (field order).
    devices: Vec<OpenDevice>,
    domains: Domains,
}

impl OpenDevices {
    /// What the host can map for each device behind the VT-d.
    pub fn behind_vtd(&self) -> Vec<HostIova<'_>> {
        self.devices
            .iter()
            .filter(|d| d.own.is_some())
            .map(|d| HostIova {
                device: d.dev.bdf(),
                ranges: d.iova.as_ref(),
            })
            .collect()
    }
}

/// Opens each device in its host domain: one of its own when it goes behind the VT-d (whose
/// usable IOVA ranges are read once it is in), else the one its backend's devices share.
/// Before the VT-d exists, so that its address width can fit what the hosts map.
pub fn open(vm: &Vm, devices: &[DeviceConfig]) -> Result<Option<OpenDevices>, VfioError> {
    if devices.is_empty() {
        return Ok(None);
    }
    vm.routing().ok_or(VfioError::NoIrqchip)?;
    let kvm_vfio = create_kvm_vfio_device(vm.fd()).map_err(VfioError::KvmVfio)?;
    let mut domains = Domains {
        kvm_vfio: Arc::new(kvm_vfio),
        iommufd: None,
        shared_container: None,
        shared_ioas: None,
        ioas_without_viommu: false,
        own: Vec::new(),
    };
    let mut opened = Vec::new();
    for d in devices {
        let selected = select(&HostPaths::default(), &d.path, d.backend)?;
        let iommufd = selected.route.backend() == Backend::Iommufd;
        domains.ioas_without_viommu |= iommufd && !d.iommu;
        let (dev, own, iova, home) = if d.iommu {
            if iommufd {
                // Made now: where the device goes while its guest view is identity.
                domains.shared(&selected)?;
            }
            let domain = domains.create(&selected)?;
            let dev = domain.open(&selected)?;
            let iova = domain.iova_ranges(dev.bdf())?;
            match &iova {
                Some(r) => log::info!("{}: its host domain maps IOVAs {r}", dev.bdf()),
                None => log::warn!(
                    "{}: the host does not say which IOVAs its IOMMU maps (no \
                     VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE: Linux before 5.4?); the VT-d's \
                     address width is not checked against it",
                    dev.bdf()
                ),
            }
            let home = format!("{} of its own", domain.describe());
            (dev, Some(domain), iova, home)
        } else {
            let domain = domains.shared(&selected)?;
            let home = format!(
                "{} shared by the devices without a vIOMMU",
                domain.describe()
            );
            (domain.open(&selected)?, None, None, home)
        };
        log::info!(
            "{}: backend {} ({}), in the {home}",
            dev.bdf(),
            selected.route.backend(),
            selected.why,
        );
        opened.push(OpenDevice {
            dev,
            own,
            iova,
            addr: d.addr,
        });
    }
    Ok(Some(OpenDevices {
        devices: opened,
        domains,
    }))
}

/// What VFIO holds for the VM's lifetime: the host domains and the DMA mappings of guest RAM.
pub struct VfioDevices {
    // The mappings go before the domains (field order); the devices, which keep their
    // domain's container or IOAS alive, go with the PCI bus after both.
    /// All guest RAM mapped, once per shared domain, for the devices not behind the VT-d.
    _dma: Vec<Box<dyn HostDma>>,
    /// The shared IOAS's guest RAM held mapped for the iommufd devices not behind the VT-d.
    _identity: Option<IdentityHold>,
    /// The shared domains and one for each device behind the VT-d: its own IOVA space, whose
    /// mappings the VT-d owns.
    _domains: Vec<Domain>,
    /// The requester ids of the devices behind the VT-d.
    behind_vtd: Vec<viommu::SourceId>,
}

impl VfioDevices {
    /// The requester ids of the devices put behind the VT-d, whose host mappings it holds.
    pub fn behind_vtd(&self) -> &[viommu::SourceId] {
        &self.behind_vtd
    }
}

/// Puts each device [`open`] opened on `pci` (phase two). A device behind the VT-d has its
/// own host domain attached to `vtd`; the others share one per backend that maps all guest
/// RAM for their DMA.
///
/// With `remapping` (the VT-d's interrupt remapping), a device behind the VT-d has its MSI and
/// MSI-X routes translated by it.
pub fn attach(
    opened: OpenDevices,
    vm: &Vm,
    mem: &GuestMemoryMmap,
    pci: &Mutex<PciBus>,
    vtd: Option<&SharedVtd>,
    remapping: Option<&Arc<InterruptRemapping>>,
) -> Result<VfioDevices, VfioError> {
    let routing = vm.routing().ok_or(VfioError::NoIrqchip)?;
    let OpenDevices {
        mut devices,
        mut domains,
    } = opened;
    // The devices placed explicitly first, by address, so that function 0 of a slot joins
    // the bus before its other functions; then the others, in command-line order.
    devices.sort_by_key(|d| (d.addr.is_none(), d.addr));
    let mut sources = Vec::new();
    let identity = domains.shared_ioas.as_ref().and_then(|d| d.identity(mem));
    let mut bus = pci.lock().unwrap_or_else(|e| e.into_inner());
    for OpenDevice { dev, own, addr, .. } in devices {
        let name = dev.bdf().to_string();
        // Behind the VT-d, the domain's host DMA goes to the VT-d, which from then on decides
        // what it maps: all guest RAM while the guest has translation off, then exactly what
        // its tables say. Made once the device is in: a container has an IOMMU only then.
        let own_dma = match &own {
            Some(domain) => {
                let dma = domain.dma(mem, false).map_err(|source| VfioError::Dma {
                    domain: domain.describe(),
                    source,
                })?;
                Some(match (domain, &identity) {
                    // The VT-d moves it to the shared IOAS while its view is identity.
                    (Domain::Ioas(h), Some(shared)) => Box::new(IoasSwitch::new(
                        name.clone(),
                        dev.vfio_device(),
                        dma,
                        h.ioas_id(),
                        shared.clone(),
                    )) as Box<dyn HostDma>,
                    _ => dma,
                })
            }
            None => None,
        };
        let iommu = own.is_some();
        domains.own.extend(own);
        // INTx (for a device with neither MSI nor MSI-X) goes where the DSDT's _PRT says for
        // the slot the device is about to take (the functions of a slot share its entries).
        let bus_error = |source| VfioError::Bus {
            device: name.clone(),
            source,
        };
        let addr = match addr {
            Some(a) => a,
            None => bus
                .free_address()
                .ok_or_else(|| bus_error(PciBusError::NoFreeSlot))?,
        };
        let intx = |pin: u8| Some(intx_gsi(addr.slot(), pin.saturating_sub(1)));
        let source = viommu::SourceId::new(0, addr.slot(), addr.function());
        let routes: Box<dyn IrqRoutes> = match (iommu, vtd, remapping) {
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
        bus.add_device_at(addr, Arc::new(Mutex::new(device)))
            .map_err(bus_error)?;
        log::info!("{name}: assigned as PCI {addr}");
        if let Some(dma) = own_dma {
            let vtd = vtd.ok_or_else(|| VfioError::NoViommu {
                device: name.clone(),
            })?;
            let dma = Box::new(TimedHostDma::new(dma, vtd.host_time().clone()));
            crate::devices::vtd::lock(vtd)
                .attach(source, dma)
                .map_err(|source| VfioError::Viommu {
                    device: name.clone(),
                    source,
                })?;
            sources.push(source);
            log::info!("{name}: behind the virtual VT-d as source {source}");
        }
    }
    // The guest has not run yet, so no device can DMA before its RAM is mapped.
    let mut dma = Vec::new();
    let mut hold = None;
    let shared = [domains.shared_container.take(), domains.shared_ioas.take()];
    for domain in shared.into_iter().flatten() {
        let start = Instant::now();
        match (&identity, &domain) {
            (Some(identity), Domain::Ioas(_)) => {
                if !domains.ioas_without_viommu {
                    // Only devices behind the VT-d use it, while their view is identity.
                    domains.own.push(domain);
                    continue;
                }
                hold = Some(identity.hold().map_err(|source| VfioError::Identity {
                    domain: domain.describe(),
                    source,
                })?);
            }
            _ => dma.push(domain.dma(mem, true).map_err(|source| VfioError::Dma {
                domain: domain.describe(),
                source,
            })?),
        }
        log::info!(
            "guest RAM mapped at IOVA = GPA in the {}: {} regions, {} MiB, in {} ms",
            domain.describe(),
            mem.num_regions(),
            mem.iter().map(|r| r.len()).sum::<u64>() >> 20,
            start.elapsed().as_millis()
        );
        domains.own.push(domain);
    }
    Ok(VfioDevices {
        _dma: dma,
        _identity: hold,
        _domains: domains.own,
        behind_vtd: sources,
    })
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
