//! The VM's devices and their wiring, after Firecracker's `device_manager/`: the port I/O and
//! MMIO buses, the split irqchip's IOAPIC ([`ioapic`]), the legacy devices ([`legacy`]), the
//! PCI root with its emulated and assigned functions ([`pci`], [`vfio`]) and the virtual VT-d
//! ([`vtd`]). The builder asks for devices here; the device models themselves live in
//! [`crate::devices`].
//!
//! Adding a device:
//! - a port I/O or platform MMIO device: a row in [`legacy`]'s table, or one
//!   [`DeviceManager::register`] call with its bus, base and length;
//! - an emulated PCI function: a `DeviceManager` method that builds it and puts it on bus 0
//!   (as [`DeviceManager::add_edu`] does), its BARs placed and dispatched by the PCI bus; it
//!   raises MSIs through the [`vm_device::interrupt::MsiSender`] that
//!   [`DeviceManager::msi_sender`] gives for its requester ID (remapped by the VT-d when there
//!   is one);
//! - its ACPI description: a table from [`DeviceManager::acpi_tables`].

pub mod address_width;
pub mod ioapic;
pub mod legacy;
pub mod pci;
pub mod vfio;
pub mod vtd;

use std::io::Write;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use kvm_ioctls::VmFd;
use viommu::SourceId;
use vm_device::interrupt::MsiSender;
use vm_memory::GuestMemoryMmap;

use crate::config::{DeviceConfig, ViommuConfig};
use crate::devices::acpi_pm1::Pm1Block;
use crate::devices::bus::{Bus, BusError, SharedDevice};
use crate::devices::fw_cfg::FwCfgConfig;
use crate::devices::interrupt::{IoapicLine, IrqLine, KvmIrqLine};
use crate::devices::ioapic::kvm::KvmIoapic;
use crate::devices::legacy::rtc::Rtc;
use crate::devices::legacy::serial::SerialDevice;
use crate::devices::vtd::intremap::DeviceMsi;
use crate::devices::vtd::SharedVtd;
use crate::exit::ExitHandle;
use crate::pci::bus::{PciBus, PciBusError};
use crate::sleep::SleepHandle;
use crate::vstate::vm::{Irqchip, Vm, VmError};

/// Errors setting devices up; each names the device and what failed.
#[derive(Debug, thiserror::Error)]
pub enum DeviceManagerError {
    /// A device's range is taken on its bus.
    #[error("cannot register {what} at {base:#x}: {source}")]
    Register {
        what: &'static str,
        base: u64,
        source: BusError,
    },
    /// A device's eventfd could not be created.
    #[error("cannot create the {what} eventfd: {source}")]
    EventFd {
        what: &'static str,
        source: std::io::Error,
    },
    /// A device's timerfd could not be created.
    #[error("cannot create the {what} timer: {source}")]
    Timer {
        what: &'static str,
        source: std::io::Error,
    },
    /// A KVM operation a device needs failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// A device's interrupt line could not be wired to its GSI.
    #[error("cannot wire the {what} interrupt: {source}")]
    IrqLine {
        what: &'static str,
        source: passthrough::irq::RouteError,
    },
    /// A PCI function could not join bus 0.
    #[error(transparent)]
    Pci(#[from] PciBusError),
    /// The virtual VT-d could not be set up.
    #[error(transparent)]
    Vtd(#[from] vtd::VtdSetupError),
    /// A host device could not be assigned.
    #[error(transparent)]
    Vfio(#[from] vfio::VfioError),
    /// The VT-d's address width does not fit what a device's host IOMMU maps.
    #[error(transparent)]
    AddressWidth(#[from] address_width::AddressWidthError),
}

/// The devices of one VM.
pub struct DeviceManager {
    // Field order matters: the assigned devices' DMA mappings and containers go first.
    vfio: Option<vfio::VfioDevices>,
    /// The host devices opened before the VT-d was made, until they are assigned.
    opened: Option<vfio::OpenDevices>,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    pci: Arc<Mutex<PciBus>>,
    serial: Arc<Mutex<SerialDevice>>,
    rtc: Arc<Mutex<Rtc>>,
    pm1: Arc<Mutex<Pm1Block>>,
    vtd: Option<SharedVtd>,
    /// The VT-d's interrupt remapping, when it does that.
    remapping: Option<vtd::Remapping>,
    ioapic: Option<KvmIoapic>,
    /// For emulated devices' MSIs (KVM_SIGNAL_MSI).
    vm_fd: Arc<VmFd>,
}

impl DeviceManager {
    /// The buses, the IOAPIC when `vm` has the split irqchip, the legacy devices (COM1 writing
    /// to `serial_out`, i8042, pvpanic, the ACPI PM register, fw_cfg, isa-debug-exit, the RTC,
    /// the PM1 block, pc-testdev; those that end the VM do so through `exit`, the PM1 block
    /// suspends it through `sleep`) and the PCI root with its host bridge, for a VM with
    /// `vcpus` vCPUs and `ram_size` bytes of RAM.
    pub fn new(
        vm: &Vm,
        ram_size: u64,
        vcpus: u32,
        serial_out: Box<dyn Write + Send>,
        exit: &ExitHandle,
        sleep: &SleepHandle,
    ) -> Result<Self, DeviceManagerError> {
        let pio = Arc::new(Bus::new());
        let mmio = Arc::new(Bus::new());
        let ioapic = ioapic::create_ioapic(vm, &mmio)?;
        // fw_cfg's CPU counts are 16 bits; KVM allows far fewer vCPUs.
        let cpus = u16::try_from(vcpus).unwrap_or(u16::MAX);
        let fw_cfg = FwCfgConfig {
            boot_cpus: cpus,
            max_cpus: cpus,
            ram_size,
        };
        let legacy = legacy::add_legacy_devices(&pio, &mmio, vm, serial_out, exit, sleep, fw_cfg)?;
        let pci = pci::create_pci_root(ram_size, &mmio, &pio)?;
        Ok(Self {
            vfio: None,
            opened: None,
            pio,
            mmio,
            pci,
            serial: legacy.serial,
            rtc: legacy.rtc,
            pm1: legacy.pm1,
            vtd: None,
            remapping: None,
            ioapic,
            vm_fd: vm.shared_fd(),
        })
    }

    /// Registers `device` at `base..base + len` of `bus` (the port I/O or the MMIO bus), named
    /// `what` in errors.
    pub fn register(
        bus: &Bus,
        what: &'static str,
        device: SharedDevice,
        base: u64,
        len: u64,
    ) -> Result<(), DeviceManagerError> {
        bus.insert(device, base, len)
            .map_err(|source| DeviceManagerError::Register { what, base, source })
    }

    /// Opens the host PCI functions `devices` (VFIO) in their host domains, and reads what
    /// the domains of those going behind the VT-d can map. Once, before [`Self::add_vtd`],
    /// whose address width must fit them; [`Self::assign_devices`] puts them on the bus.
    /// The slots they ask for (`addr=`) are held from now on, so that the devices placed
    /// before them, such as edu, take other slots.
    pub fn open_devices(
        &mut self,
        vm: &Vm,
        devices: &[DeviceConfig],
    ) -> Result<(), DeviceManagerError> {
        {
            let mut pci = lock(&self.pci);
            for d in devices {
                if let Some(addr) = d.addr {
                    pci.reserve(addr).map_err(|source| vfio::VfioError::Bus {
                        device: d.path.display().to_string(),
                        source,
                    })?;
                }
            }
        }
        self.opened = vfio::open(vm, devices)?;
        Ok(())
    }

    /// Adds the virtual VT-d described by `config`; its registers go on the MMIO bus. Its
    /// address width is `config`'s, or the widest the opened devices' hosts map
    /// ([`address_width::choose`]). With interrupt remapping, every interrupt source behind
    /// it (the IOAPIC, the devices assigned later, emulated devices' MSIs) is remapped by it.
    /// Once, after [`Self::open_devices`] and before [`Self::assign_devices`].
    pub fn add_vtd(
        &mut self,
        config: ViommuConfig,
        vm: &Vm,
        mem: &GuestMemoryMmap,
    ) -> Result<&SharedVtd, DeviceManagerError> {
        let hosts = self
            .opened
            .as_ref()
            .map(vfio::OpenDevices::behind_vtd)
            .unwrap_or_default();
        let aw_bits = address_width::choose(config.aw_bits, &hosts)?;
        let intremap = config.intremap;
        let unit = vtd::create_vtd(config, aw_bits, vm, mem, &self.mmio)?;
        if intremap {
            self.remapping = vtd::wire_interrupt_remapping(&unit, vm, self.ioapic.as_ref())?;
        }
        Ok(self.vtd.insert(unit))
    }

    /// How an emulated device with requester ID `source` raises its MSIs: through the VT-d's
    /// interrupt remapping when there is a VT-d (which every PCI device sits behind), then
    /// KVM_SIGNAL_MSI.
    pub fn msi_sender(&self, source: SourceId) -> Arc<dyn MsiSender> {
        Arc::new(DeviceMsi::new(source, self.vtd.clone(), self.vm_fd.clone()))
    }

    /// The VT-d's interrupt remapping, when it does that: its routes, and the signals it
    /// blocks, which the event loop takes.
    pub fn interrupt_remapping(&self) -> Option<&vtd::Remapping> {
        self.remapping.as_ref()
    }

    /// Puts an emulated `edu` on PCI bus 0 of `vm`, behind the VT-d when there is one, its BAR
    /// placed and its interrupt line set as firmware leaves them; returns its requester id.
    pub fn add_edu(&self, vm: &Vm, mem: &GuestMemoryMmap) -> Result<SourceId, DeviceManagerError> {
        let intx = |gsi| self.intx_line(vm, gsi);
        Ok(pci::add_edu(
            &self.pci,
            mem,
            self.vtd.as_ref(),
            |source| self.msi_sender(source),
            intx,
        )?)
    }

    /// An emulated function's INTx wire to GSI `gsi` (an IOAPIC pin, 16..24 for PCI): KVM's
    /// IOAPIC with the in-kernel irqchip, ours with the split one (whose messages the VT-d
    /// remaps); None without an irqchip.
    fn intx_line(&self, vm: &Vm, gsi: u32) -> Option<Box<dyn IrqLine>> {
        match (vm.irqchip()?, &self.ioapic) {
            (Irqchip::Kernel, _) => Some(Box::new(KvmIrqLine::new(vm.shared_fd(), gsi))),
            (Irqchip::Split, Some(ioapic)) => {
                let line = IoapicLine::new(ioapic.shared().clone(), gsi);
                if line.is_none() {
                    log::warn!("GSI {gsi} is no pin of the IOAPIC: INTx not wired");
                }
                line.map(|l| Box::new(l) as Box<dyn IrqLine>)
            }
            (Irqchip::Split, None) => None,
        }
    }

    /// Puts the host PCI functions [`Self::open_devices`] opened on the bus and maps guest
    /// RAM for their DMA (or puts them behind the VT-d). Call once.
    pub fn assign_devices(
        &mut self,
        vm: &Vm,
        mem: &GuestMemoryMmap,
    ) -> Result<(), DeviceManagerError> {
        let Some(opened) = self.opened.take() else {
            return Ok(());
        };
        let remapping = self.remapping.as_ref().map(vtd::Remapping::routes);
        let vtd = self.vtd.as_ref();
        self.vfio = Some(vfio::attach(opened, vm, mem, &self.pci, vtd, remapping)?);
        Ok(())
    }

    /// The ACPI tables the devices bring (the DMAR table of the VT-d).
    pub fn acpi_tables(&self) -> Vec<Vec<u8>> {
        self.vtd
            .as_ref()
            .map(|v| crate::devices::vtd::dmar_table(crate::devices::vtd::lock(v).config()))
            .into_iter()
            .collect()
    }

    /// The port I/O bus.
    pub fn pio_bus(&self) -> &Arc<Bus> {
        &self.pio
    }

    /// The MMIO bus (platform devices, BARs, ECAM, the VT-d registers).
    pub fn mmio_bus(&self) -> &Arc<Bus> {
        &self.mmio
    }

    /// PCI bus 0.
    pub fn pci_bus(&self) -> &Arc<Mutex<PciBus>> {
        &self.pci
    }

    /// COM1, whose input the event loop feeds.
    pub fn serial(&self) -> &Arc<Mutex<SerialDevice>> {
        &self.serial
    }

    /// The virtual VT-d, if added.
    pub fn vtd(&self) -> Option<&SharedVtd> {
        self.vtd.as_ref()
    }

    /// While the guest sleeps in S3: when its wake event comes, as host time since the Unix
    /// epoch. The one wake event is the RTC alarm, when the guest enabled it (PM1_EN.RTC_EN);
    /// `None` when there is none, and the machine sleeps until the VMM stops.
    pub fn s3_wake_time(&self) -> Option<Duration> {
        let rtc_wake = lock(&self.pm1).rtc_wake_enabled();
        rtc_wake.then(|| lock(&self.rtc).next_alarm()).flatten()
    }

    /// Records the wake from S3 by the RTC alarm in PM1 status (WAK_STS, RTC_STS).
    pub fn note_s3_wake_by_rtc(&self) {
        lock(&self.pm1).note_wake(true);
    }

    /// The user-space IOAPIC, with the split irqchip: the vCPUs hand it EOIs, the event loop
    /// runs its storm guard's timer.
    pub fn ioapic(&self) -> Option<&KvmIoapic> {
        self.ioapic.as_ref()
    }
}

/// Locks a device; one that panicked holding its lock left it usable (its accesses complete or
/// are dropped whole).
fn lock<T>(device: &Mutex<T>) -> MutexGuard<'_, T> {
    device.lock().unwrap_or_else(|e| e.into_inner())
}

impl Drop for DeviceManager {
    /// Host DMA mappings go before the devices and VFIO groups they serve: the VT-d lets go of
    /// the devices behind it (unmapping what their containers map), then the mappings of the
    /// other devices go with [`vfio::VfioDevices`]. The devices themselves go with the buses.
    fn drop(&mut self) {
        if let (Some(vfio), Some(vtd)) = (&self.vfio, &self.vtd) {
            let mut unit = crate::devices::vtd::lock(vtd);
            for &source in vfio.behind_vtd() {
                unit.detach(source);
            }
        }
        self.vfio = None;
    }
}
