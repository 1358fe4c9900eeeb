//! Builds a VM from a configuration: guest memory, the KVM VM, its devices (through the
//! [`DeviceManager`]), ACPI tables, the boot payload and the vCPUs. Running it is the
//! [`crate::runner`]'s.

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use viommu::SourceId;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::acpi::{AcpiConfig, AcpiTables};
use crate::arch::x86_64::boot::KernelFormat;
use crate::arch::x86_64::multiboot::MULTIBOOT_BOOTLOADER_MAGIC;
use crate::arch::x86_64::{bios, boot, regs};
use crate::config::{DeviceConfig, ViommuConfig, VmConfig, MAX_XAPIC_VCPUS};
use crate::device_manager::{DeviceManager, DeviceManagerError};
use crate::devices::bus::Bus;
use crate::devices::ioapic::SharedIoapic;
use crate::devices::legacy::serial::InputSource;
use crate::devices::vtd::SharedVtd;
use crate::exit::{ExitHandle, VmExit};
use crate::pci::bus::PciBus;
use crate::runner::{self, RunError, S3};
use crate::sleep::SleepHandle;
use crate::vstate::memory::{check_host_memory, create_guest_memory};
use crate::vstate::vcpu::{CpuMode, Vcpu};
use crate::vstate::vm::{Irqchip, Vm};

/// Errors building a VM; each says which step failed and with what.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// KVM VM creation.
    #[error(transparent)]
    Vm(#[from] crate::vstate::vm::VmError),
    /// vCPU set-up.
    #[error(transparent)]
    Vcpu(#[from] crate::vstate::vcpu::VcpuError),
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] crate::vstate::memory::MemoryError),
    /// Kernel loading.
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    /// Boot structures.
    #[error(transparent)]
    Regs(#[from] regs::RegsError),
    /// BIOS state for multiboot kernels.
    #[error(transparent)]
    Bios(#[from] bios::BiosError),
    /// ACPI tables.
    #[error(transparent)]
    Acpi(#[from] crate::acpi::AcpiError),
    /// Devices (legacy, PCI, the VT-d, `--device`).
    #[error(transparent)]
    Devices(#[from] DeviceManagerError),
    /// A raw image does not fit.
    #[error("raw image of {len} bytes at {addr:#x} does not fit in guest memory")]
    RawImage { addr: u64, len: usize },
    /// The exit eventfd could not be created.
    #[error("cannot create the exit eventfd: {0}")]
    ExitEvent(#[source] std::io::Error),
    /// The sleep eventfd could not be created.
    #[error("cannot create the sleep eventfd: {0}")]
    SleepEvent(#[source] std::io::Error),
    /// Interrupt remapping asked for with KVM's IOAPIC.
    #[error(
        "the VT-d's interrupt remapping needs the split irqchip: an in-kernel IOAPIC's \
         interrupts would bypass remapping"
    )]
    IntremapNeedsSplit,
    /// More vCPUs than xAPIC IDs without x2APIC remapping.
    #[error(
        "{0} vCPUs need APIC IDs above 254, which Linux uses only in x2APIC mode with interrupt \
         remapping: the VT-d needs intremap and eim"
    )]
    NeedsX2apicRemapping(u32),
}

/// What the guest boots.
pub enum BootSource {
    /// A kernel file: a Linux bzImage or a multiboot kernel, told apart by its header.
    Kernel {
        /// Kernel path.
        kernel: PathBuf,
        /// Optional initramfs (a multiboot kernel's first module).
        initramfs: Option<PathBuf>,
        /// Command line; `None` takes the format's default
        /// ([`boot::KernelFormat::default_cmdline`]).
        cmdline: Option<String>,
    },
    /// Code of our own (tests): copied to `load_addr`, started at `mode`'s entry. No in-kernel
    /// irqchip, so HLT exits to us and ends the run.
    Raw {
        /// The bytes.
        image: Vec<u8>,
        /// Guest address to copy them to.
        load_addr: u64,
        /// Start state.
        mode: CpuMode,
    },
    /// Code of our own that takes interrupts (e.g. a passed-through device's MSIs): like `Raw`
    /// but with KVM's irqchip (as [`MachineConfig::irqchip`] says), so HLT waits for an
    /// interrupt instead of ending the run; the guest ends it with an ACPI power-off.
    RawWithIrqchip {
        /// The bytes.
        image: Vec<u8>,
        /// Guest address to copy them to.
        load_addr: u64,
        /// Start state.
        mode: CpuMode,
    },
}

/// Everything needed to build a VM.
pub struct MachineConfig {
    /// vCPU count; vCPU `n` has APIC ID `n`.
    pub vcpus: u32,
    /// RAM bytes.
    pub memory_size: u64,
    /// Boot payload.
    pub boot: BootSource,
    /// Where the guest's serial output goes.
    pub serial_out: Box<dyn Write + Send>,
    /// What feeds the guest's serial input.
    pub serial_in: SerialIn,
    /// Complete ACPI tables to add to the XSDT (e.g. the DMAR table of a virtual VT-d).
    pub extra_acpi_tables: Vec<Vec<u8>>,
    /// A virtual VT-d at [`crate::arch::x86_64::layout::VTD_REGS_START`], announced by a DMAR
    /// table.
    pub viommu: Option<ViommuConfig>,
    /// Host PCI functions to assign (VFIO): opened while the VM is built, before the VT-d,
    /// whose address width must fit what their host IOMMUs map; [`Vmm::assign_devices`] puts
    /// them on the bus. Check them first with
    /// [`crate::device_manager::vfio::check_devices`] so bad input fails before anything is
    /// built.
    pub devices: Vec<DeviceConfig>,
    /// Where the IOAPIC lives (not for [`BootSource::Raw`], which has no irqchip).
    pub irqchip: Irqchip,
}

/// The source of the guest's serial input.
pub enum SerialIn {
    /// None: the guest reads nothing.
    None,
    /// The VMM's stdin (a terminal is put in raw mode while the guest runs).
    Stdin,
    /// Any pollable stream, e.g. a pipe in tests.
    Stream(Box<dyn InputSource>),
}

impl MachineConfig {
    /// The configuration the command line asks for: its kernel, console on stdout, stdin as
    /// input.
    pub fn from_vm_config(c: &VmConfig) -> Self {
        Self {
            vcpus: c.vcpus,
            memory_size: c.memory_size,
            boot: BootSource::Kernel {
                kernel: c.kernel.clone(),
                initramfs: c.initramfs.clone(),
                cmdline: c.cmdline.clone(),
            },
            serial_out: Box::new(std::io::stdout()),
            serial_in: SerialIn::Stdin,
            extra_acpi_tables: Vec::new(),
            viommu: c.viommu.clone(),
            devices: c.devices.clone(),
            irqchip: c.irqchip,
        }
    }
}

/// A built VM, ready to run. Devices can still be added before [`Vmm::run`].
pub struct Vmm {
    // Field order matters: vCPUs, then the devices (assigned devices' DMA mappings, memory
    // slots), then the VM, go before the memory they map.
    vcpus: Vec<Vcpu>,
    devices: DeviceManager,
    vm: Vm,
    mem: GuestMemoryMmap,
    exit: ExitHandle,
    sleep: SleepHandle,
    /// Where the FACS is: the S3 waking vector is read from it.
    facs_addr: u64,
    serial_in: Option<SerialIn>,
}

impl Vmm {
    /// Builds the VM described by `cfg`.
    pub fn build(cfg: MachineConfig) -> Result<Self, BuildError> {
        let irqchip = match cfg.boot {
            BootSource::Raw { .. } => None,
            _ => Some(cfg.irqchip),
        };
        let format = match &cfg.boot {
            BootSource::Kernel {
                kernel, initramfs, ..
            } => Some(boot::check_boot_files(kernel, initramfs.as_deref())?),
            _ => None,
        };
        check_host_memory(cfg.memory_size)?;
        if cfg.viommu.as_ref().is_some_and(|v| v.intremap) && irqchip == Some(Irqchip::Kernel) {
            return Err(BuildError::IntremapNeedsSplit);
        }
        let eim = cfg.viommu.as_ref().is_some_and(|v| v.intremap && v.eim);
        if cfg.vcpus > MAX_XAPIC_VCPUS && !eim {
            return Err(BuildError::NeedsX2apicRemapping(cfg.vcpus));
        }
        let mut vm = Vm::new()?;
        vm.check_vcpus(cfg.vcpus)?;
        let mem = create_guest_memory(cfg.memory_size)?;
        vm.register_memory(&mem)?;
        if let Some(irqchip) = irqchip {
            vm.setup_irqchip(irqchip)?;
            // Remapped interrupts may name x2APIC destinations above 255.
            if eim {
                vm.enable_x2apic_api()?;
            }
        }
        let exit = ExitHandle::new().map_err(BuildError::ExitEvent)?;
        let sleep = SleepHandle::new().map_err(BuildError::SleepEvent)?;

        let mut devices = DeviceManager::new(
            &vm,
            cfg.memory_size,
            cfg.vcpus,
            cfg.serial_out,
            &exit,
            &sleep,
        )?;
        devices.open_devices(&vm, &cfg.devices)?;
        if let Some(c) = cfg.viommu.clone() {
            devices.add_vtd(c, &vm, &mem)?;
        }

        let mut extra_tables = cfg.extra_acpi_tables;
        extra_tables.extend(devices.acpi_tables());
        regs::write_boot_structures(&mem)?;
        boot::write_reset_stub(&mem)?;
        let tables = AcpiTables::build(&AcpiConfig {
            vcpus: cfg.vcpus,
            ram_size: cfg.memory_size,
            extra_tables,
            pcat_compat: vm.irqchip() != Some(Irqchip::Split),
        })?;
        let rsdp = tables.write(&mem)?;
        // A multiboot kernel comes from a BIOS boot loader and finds what POST left: the IVT,
        // and the PICs and the PIT where KVM has them (the split irqchip has neither).
        if matches!(format, Some(KernelFormat::Multiboot(_))) {
            bios::write_ivt(&mem)?;
            if vm.irqchip() == Some(Irqchip::Kernel) {
                bios::program_pic_and_pit(vm.fd())?;
            }
        }

        let mode = load_payload(&mem, &cfg.boot, format, cfg.memory_size, rsdp)?;

        let mut vcpus = Vec::new();
        for id in 0..cfg.vcpus {
            let mut vcpu = Vcpu::new(&vm, id)?;
            vcpu.configure(&vm, cfg.vcpus, mode)?;
            vcpus.push(vcpu);
        }

        Ok(Self {
            vcpus,
            devices,
            vm,
            mem,
            exit,
            sleep,
            facs_addr: tables.facs_addr,
            serial_in: Some(cfg.serial_in),
        })
    }

    /// The user-space IOAPIC, with the split irqchip.
    pub fn ioapic(&self) -> Option<&SharedIoapic> {
        self.devices.ioapic().map(|io| io.shared())
    }

    /// The virtual VT-d, when the configuration asked for one: devices to put behind it attach
    /// to it, and its counters are read from it.
    pub fn vtd(&self) -> Option<&SharedVtd> {
        self.devices.vtd()
    }

    /// Puts the host PCI functions of [`MachineConfig::devices`] on the bus and maps guest RAM
    /// for their DMA (or puts them behind the VT-d). Call once, before [`Vmm::run`], after the
    /// emulated devices that are to take the first slots.
    pub fn assign_devices(&mut self) -> Result<(), BuildError> {
        self.devices.assign_devices(&self.vm, &self.mem)?;
        Ok(())
    }

    /// Puts QEMU's `edu` test device on PCI bus 0 (behind the VT-d when there is one), as
    /// firmware leaves it; returns its requester id. Call before [`Vmm::run`].
    pub fn add_edu(&self) -> Result<SourceId, BuildError> {
        Ok(self.devices.add_edu(&self.vm, &self.mem)?)
    }

    /// The devices.
    pub fn devices(&self) -> &DeviceManager {
        &self.devices
    }

    /// The port I/O bus.
    pub fn pio_bus(&self) -> &Arc<Bus> {
        self.devices.pio_bus()
    }

    /// The MMIO bus (platform devices, BARs, ECAM; the VT-d registers go here).
    pub fn mmio_bus(&self) -> &Arc<Bus> {
        self.devices.mmio_bus()
    }

    /// PCI bus 0.
    pub fn pci_bus(&self) -> &Arc<Mutex<PciBus>> {
        self.devices.pci_bus()
    }

    /// Guest RAM.
    pub fn guest_memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// The VM, for devices needing KVM (memory slots, irqfds, GSI routes).
    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    /// A handle to request the VM to stop.
    pub fn exit_handle(&self) -> ExitHandle {
        self.exit.clone()
    }

    /// Runs the guest until it powers off, resets, panics, halts (raw guests) or fails; then
    /// tears the VM down (devices first: host DMA mappings, assigned devices, then the VM).
    pub fn run(self) -> Result<VmExit, RunError> {
        self.run_with(|_| {})
    }

    /// As [`Vmm::run`], with `on_stop` called once the vCPUs have stopped and before the
    /// teardown, e.g. to read the VT-d's counters of the guest's run.
    pub fn run_with(mut self, on_stop: impl FnOnce(&Vmm)) -> Result<VmExit, RunError> {
        let vcpus = std::mem::take(&mut self.vcpus);
        let s3 = S3 {
            sleep: &self.sleep,
            mem: &self.mem,
            facs_addr: self.facs_addr,
        };
        let outcome = runner::run(vcpus, &self.devices, &self.exit, self.serial_in.take(), s3);
        // What the VT-d's protocol checker still follows is settled now that the guest stopped.
        if let Some(vtd) = self.vtd() {
            crate::devices::vtd::lock(vtd).finish_check();
        }
        on_stop(&self);
        outcome
    }
}

/// Loads the boot payload (`format` is a kernel's, from [`boot::check_boot_files`]); returns
/// how the boot vCPU starts.
fn load_payload(
    mem: &GuestMemoryMmap,
    boot: &BootSource,
    format: Option<KernelFormat>,
    ram_size: u64,
    rsdp: u64,
) -> Result<CpuMode, BuildError> {
    match boot {
        BootSource::Kernel {
            kernel,
            initramfs,
            cmdline,
        } => {
            // `build` checked the file, so its format is known.
            let format = format.unwrap_or(KernelFormat::BzImage);
            let cmdline = cmdline.as_deref().unwrap_or(format.default_cmdline());
            match format {
                KernelFormat::BzImage => {
                    let entry = boot::load_linux(
                        mem,
                        ram_size,
                        kernel,
                        initramfs.as_deref(),
                        cmdline,
                        rsdp,
                    )?;
                    log::info!("kernel entry {:#x}", entry.entry);
                    Ok(CpuMode::LongMode { rip: entry.entry })
                }
                KernelFormat::Multiboot(header) => {
                    let entry = boot::load_multiboot(
                        mem,
                        ram_size,
                        kernel,
                        &header,
                        initramfs.as_deref(),
                        cmdline,
                    )?;
                    log::info!(
                        "multiboot entry {:#x}, information at {:#x}",
                        entry.eip,
                        entry.info_addr
                    );
                    Ok(CpuMode::ProtectedMode32 {
                        eip: entry.eip,
                        eax: MULTIBOOT_BOOTLOADER_MAGIC,
                        ebx: entry.info_addr,
                    })
                }
            }
        }
        BootSource::Raw {
            image,
            load_addr,
            mode,
        }
        | BootSource::RawWithIrqchip {
            image,
            load_addr,
            mode,
        } => {
            mem.write_slice(image, GuestAddress(*load_addr))
                .map_err(|_| BuildError::RawImage {
                    addr: *load_addr,
                    len: image.len(),
                })?;
            Ok(*mode)
        }
    }
}
