//! Builds a VM from a configuration and runs it: memory, irqchip, devices, PCI, ACPI, boot
//! payload, vCPU threads and the event loop.

use std::io::Write;
use std::os::unix::io::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::Killable;

use crate::acpi::{AcpiConfig, AcpiTables};
use crate::arch::x86_64::layout::{PCI_ECAM_SIZE, PCI_ECAM_START, VTD_REGS_SIZE, VTD_REGS_START};
use crate::arch::x86_64::{boot, regs};
use crate::config::{DeviceConfig, ViommuConfig, VmConfig};
use crate::devices::acpi_pm::{AcpiPm, ACPI_PM_LEN, ACPI_PM_PORT};
use crate::devices::bus::{Bus, SharedDevice};
use crate::devices::legacy::i8042::{I8042, I8042_DATA_PORT, I8042_LEN};
use crate::devices::legacy::serial::{
    InputSource, SerialDevice, SerialInput, COM1_IRQ, COM1_LEN, COM1_PORT,
};
use crate::devices::pvpanic::{PvPanic, PVPANIC_LEN, PVPANIC_PORT};
use crate::devices::vtd::doorbell::QueueDoorbells;
use crate::devices::vtd::mirror::RegisterMirror;
use crate::devices::vtd::{
    self, DeferredFlushTimer, DoorbellWatcher, KvmMsi, SharedVtd, VtdRegisters, VtdUnit,
};
use crate::exit::{ExitHandle, VmExit};
use crate::pci::allocator::PciAllocator;
use crate::pci::bus::{PciBus, PciConfigIo, PciConfigMmio, CONFIG_ADDRESS_PORT, CONFIG_IO_LEN};
use crate::pci::root::PciHostBridge;
use crate::vstate::kick::{install_kick_handler, kick_signal};
use crate::vstate::memory::{check_host_memory, create_guest_memory};
use crate::vstate::vcpu::{CpuMode, Vcpu, VcpuBuses};
use crate::vstate::vm::Vm;

/// Errors building or running a VM; each says which step failed and with what.
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
    /// ACPI tables.
    #[error(transparent)]
    Acpi(#[from] crate::acpi::AcpiError),
    /// Device assignment (`--device`).
    #[error(transparent)]
    Vfio(#[from] crate::pci::vfio::VfioError),
    /// Device registration.
    #[error("cannot register {what}: {source}")]
    Bus {
        what: &'static str,
        source: crate::devices::bus::BusError,
    },
    /// PCI set-up.
    #[error(transparent)]
    Pci(#[from] crate::pci::bus::PciBusError),
    /// A raw image does not fit.
    #[error("raw image of {len} bytes at {addr:#x} does not fit in guest memory")]
    RawImage { addr: u64, len: usize },
    /// Host resources (eventfds, threads, epoll).
    #[error("{what}: {reason}")]
    Host { what: &'static str, reason: String },
}

fn host(what: &'static str) -> impl FnOnce(std::io::Error) -> BuildError {
    move |e| BuildError::Host {
        what,
        reason: e.to_string(),
    }
}

/// What the guest boots.
pub enum BootSource {
    /// A Linux bzImage.
    Linux {
        /// bzImage path.
        kernel: PathBuf,
        /// Optional initramfs.
        initramfs: Option<PathBuf>,
        /// Command line.
        cmdline: String,
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
    /// but with the in-kernel irqchip, so HLT waits for an interrupt instead of ending the run;
    /// the guest ends it with an ACPI power-off.
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
    /// vCPU count.
    pub vcpus: u8,
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
    /// A virtual VT-d at [`VTD_REGS_START`], announced by a DMAR table.
    pub viommu: Option<ViommuConfig>,
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
    /// The configuration the command line asks for: Linux, console on stdout, stdin as input.
    pub fn from_vm_config(c: &VmConfig) -> Self {
        Self {
            vcpus: c.vcpus,
            memory_size: c.memory_size,
            boot: BootSource::Linux {
                kernel: c.kernel.clone(),
                initramfs: c.initramfs.clone(),
                cmdline: c.cmdline.clone(),
            },
            serial_out: Box::new(std::io::stdout()),
            serial_in: SerialIn::Stdin,
            extra_acpi_tables: Vec::new(),
            viommu: c.viommu,
        }
    }
}

/// A built VM, ready to run. Devices can still be added before [`Vmm::run`].
pub struct Vmm {
    // Field order matters: vCPUs and the VM go before the memory they map.
    vcpus: Vec<Vcpu>,
    // Assigned devices' DMA mappings go before the guest memory they pin.
    vfio: Option<crate::pci::vfio::VfioDevices>,
    vm: Vm,
    mem: GuestMemoryMmap,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    pci: Arc<Mutex<PciBus>>,
    serial: Arc<Mutex<SerialDevice>>,
    exit: ExitHandle,
    serial_in: Option<SerialIn>,
    vtd: Option<SharedVtd>,
}

impl Vmm {
    /// Builds the VM described by `cfg`.
    pub fn build(cfg: MachineConfig) -> Result<Self, BuildError> {
        let irqchip = !matches!(cfg.boot, BootSource::Raw { .. });
        if let BootSource::Linux {
            kernel, initramfs, ..
        } = &cfg.boot
        {
            boot::check_boot_files(kernel, initramfs.as_deref())?;
        }
        check_host_memory(cfg.memory_size)?;
        let mut vm = Vm::new()?;
        let mem = create_guest_memory(cfg.memory_size)?;
        vm.register_memory(&mem)?;
        if irqchip {
            vm.setup_irqchip()?;
        }
        let exit = ExitHandle::new().map_err(host("cannot create the exit eventfd"))?;
        let pio = Arc::new(Bus::new());
        let mmio = Arc::new(Bus::new());

        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(host("serial eventfd"))?;
        if vm.has_irqchip() {
            vm.register_irqfd(&serial_irq, COM1_IRQ)?;
        }
        let serial = Arc::new(Mutex::new(
            SerialDevice::new(serial_irq, cfg.serial_out).map_err(host("serial eventfd"))?,
        ));
        register_legacy_devices(&pio, serial.clone(), &exit)?;
        let pci = create_pci_root(cfg.memory_size, &mmio, &pio)?;

        let mut extra_tables = cfg.extra_acpi_tables;
        let vtd = match cfg.viommu {
            Some(c) => {
                extra_tables.push(vtd::dmar_table(c.aw_bits));
                Some(create_vtd(c, &vm, &mem, &mmio)?)
            }
            None => None,
        };

        regs::write_boot_structures(&mem)?;
        boot::write_reset_stub(&mem)?;
        let rsdp = AcpiTables::build(&AcpiConfig {
            vcpus: cfg.vcpus,
            ram_size: cfg.memory_size,
            extra_tables,
        })?
        .write(&mem)?;

        let mode = load_payload(&mem, &cfg.boot, cfg.memory_size, rsdp)?;

        let mut vcpus = Vec::new();
        for id in 0..cfg.vcpus {
            let vcpu = Vcpu::new(&vm, id)?;
            vcpu.configure(&vm, cfg.vcpus, mode)?;
            vcpus.push(vcpu);
        }

        Ok(Self {
            vcpus,
            vfio: None,
            vm,
            mem,
            pio,
            mmio,
            pci,
            serial,
            exit,
            serial_in: Some(cfg.serial_in),
            vtd,
        })
    }

    /// The virtual VT-d, when the configuration asked for one: devices to put behind it attach
    /// to it, and its counters are read from it.
    pub fn vtd(&self) -> Option<&SharedVtd> {
        self.vtd.as_ref()
    }

    /// Assigns the host PCI functions at `paths` (VFIO) and maps all guest RAM for their DMA.
    /// Call once, before [`Vmm::run`]; check the paths first with
    /// [`crate::pci::vfio::check_devices`] so bad input fails before anything is built.
    pub fn assign_devices(&mut self, devices: &[DeviceConfig]) -> Result<(), BuildError> {
        self.vfio =
            crate::pci::vfio::attach(&self.vm, &self.mem, &self.pci, devices, self.vtd.as_ref())?;
        Ok(())
    }

    /// The port I/O bus.
    pub fn pio_bus(&self) -> &Arc<Bus> {
        &self.pio
    }

    /// The MMIO bus (platform devices, BARs, ECAM; the VT-d registers go here).
    pub fn mmio_bus(&self) -> &Arc<Bus> {
        &self.mmio
    }

    /// PCI bus 0.
    pub fn pci_bus(&self) -> &Arc<Mutex<PciBus>> {
        &self.pci
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

    /// Runs the guest until it powers off, resets, panics, halts (raw guests) or fails.
    pub fn run(mut self) -> Result<VmExit, BuildError> {
        install_kick_handler().map_err(|e| BuildError::Host {
            what: "signal handler",
            reason: e.to_string(),
        })?;
        let stop = Arc::new(AtomicBool::new(false));
        let buses = VcpuBuses {
            pio: self.pio.clone(),
            mmio: self.mmio.clone(),
        };
        let mut threads: Vec<JoinHandle<()>> = Vec::new();
        let mut spawn_error = None;
        for (id, vcpu) in self.vcpus.drain(..).enumerate() {
            let (b, e, s) = (buses.clone(), self.exit.clone(), stop.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || {
                    // A panicking vCPU thread must still end the run, not leave it waiting.
                    let _guard = PanicGuard(e.clone());
                    vcpu.run(b, e, s)
                });
            match spawned {
                Ok(t) => threads.push(t),
                Err(e) => {
                    spawn_error = Some(host("cannot spawn a vCPU thread")(e));
                    break;
                }
            }
        }

        let result = match spawn_error {
            Some(e) => Err(e),
            None => self.event_loop(),
        };
        let panicked = stop_vcpus(threads, &stop);
        // No device may keep reaching memory the guest unmapped once the VM is gone.
        if let Some(vtd) = &self.vtd {
            vtd::lock(vtd).flush_deferred();
        }
        if panicked {
            return Ok(VmExit::Failed("a vCPU thread panicked".into()));
        }
        result
    }

    fn event_loop(&mut self) -> Result<VmExit, BuildError> {
        let epoll = |e: event_manager::Error| BuildError::Host {
            what: "event manager",
            reason: format!("{e:?}"),
        };
        let mut em = EventManager::<Box<dyn MutEventSubscriber + Send>>::new().map_err(epoll)?;
        let exit_evt = self
            .exit
            .event()
            .try_clone()
            .map_err(host("cannot clone the exit eventfd"))?;
        em.add_subscriber(Box::new(ExitWatcher(exit_evt)));
        if let Some(vtd) = &self.vtd {
            if let Some(timer) = DeferredFlushTimer::new(vtd.clone())
                .map_err(host("cannot create the VT-d deferred-flush timer"))?
            {
                em.add_subscriber(Box::new(timer));
            }
            if vtd.doorbells().is_some() {
                em.add_subscriber(Box::new(DoorbellWatcher(vtd.clone())));
            }
        }
        let serial_in = self.serial_in.take();
        let is_stdin = matches!(serial_in, Some(SerialIn::Stdin));
        let input: Option<Box<dyn InputSource>> = match serial_in {
            Some(SerialIn::Stdin) => Some(Box::new(std::io::stdin())),
            Some(SerialIn::Stream(s)) => Some(s),
            Some(SerialIn::None) | None => None,
        };
        let _raw = match input {
            Some(input) => {
                let sub = SerialInput::new(input, self.serial.clone())
                    .map_err(host("cannot set up serial input"))?;
                em.add_subscriber(Box::new(sub));
                if is_stdin {
                    RawTerminal::enter()
                } else {
                    None
                }
            }
            None => None,
        };
        loop {
            if let Some(reason) = self.exit.reason() {
                return Ok(reason);
            }
            em.run_with_timeout(200).map_err(epoll)?;
        }
    }
}

/// Creates the virtual VT-d and puts its registers on `mmio` at [`VTD_REGS_START`]. Caching
/// mode is always on: devices whose DMA the host remaps need it.
fn create_vtd(
    c: ViommuConfig,
    vm: &Vm,
    mem: &GuestMemoryMmap,
    mmio: &Bus,
) -> Result<SharedVtd, BuildError> {
    let config = viommu::VtdConfig {
        aw_bits: c.aw_bits,
        caching_mode: true,
        flush: if c.deferred {
            viommu::FlushMode::DEFERRED_DEFAULT
        } else {
            viommu::FlushMode::Strict
        },
        ..viommu::VtdConfig::default()
    };
    let unit = viommu::Vtd::new(
        config,
        mem.clone(),
        Box::new(KvmMsi(vm.shared_fd())),
        Box::new(viommu::SystemClock::default()),
    )
    .map_err(|e| BuildError::Host {
        what: "virtual VT-d",
        reason: e.to_string(),
    })?;
    // Register reads as memory loads where KVM can map a read-only page; writes still trap.
    let mirror = if vm.has_readonly_mem() {
        Some(
            RegisterMirror::map(vm, VTD_REGS_START).map_err(|e| BuildError::Host {
                what: "virtual VT-d",
                reason: e.to_string(),
            })?,
        )
    } else {
        log::info!("KVM cannot map read-only memory: VT-d register reads will exit");
        None
    };
    let shared = VtdUnit::new(unit, mirror);
    if c.async_queue {
        let bells =
            QueueDoorbells::new().map_err(host("cannot create the VT-d queue doorbells"))?;
        bells
            .register(vm.fd(), VTD_REGS_START)
            .map_err(|source| BuildError::Host {
                what: "VT-d queue doorbells (KVM_IOEVENTFD)",
                reason: source.to_string(),
            })?;
        // A fresh unit has no doorbells yet.
        let _ = shared.set_doorbells(bells);
    }
    mmio.insert(
        Arc::new(Mutex::new(VtdRegisters(shared.clone()))),
        VTD_REGS_START,
        VTD_REGS_SIZE,
    )
    .map_err(|source| BuildError::Bus {
        what: "VT-d registers",
        source,
    })?;
    Ok(shared)
}

/// Puts the legacy port I/O devices on `pio`: COM1, i8042, pvpanic, the ACPI PM register.
fn register_legacy_devices(
    pio: &Bus,
    serial: SharedDevice,
    exit: &ExitHandle,
) -> Result<(), BuildError> {
    let legacy: [(&'static str, SharedDevice, u64, u64); 4] = [
        ("COM1", serial, COM1_PORT, COM1_LEN),
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
    for (what, dev, base, len) in legacy {
        pio.insert(dev, base, len)
            .map_err(|source| BuildError::Bus { what, source })?;
    }
    Ok(())
}

/// Bus 0 with its host bridge, reachable through ports 0xCF8/0xCFC and ECAM.
fn create_pci_root(
    ram_size: u64,
    mmio: &Arc<Bus>,
    pio: &Arc<Bus>,
) -> Result<Arc<Mutex<PciBus>>, BuildError> {
    let mut pci = PciBus::new(PciAllocator::new(ram_size), mmio.clone(), pio.clone());
    pci.add_device(Arc::new(Mutex::new(PciHostBridge::new())))?;
    let pci = Arc::new(Mutex::new(pci));
    pio.insert(
        Arc::new(Mutex::new(PciConfigIo::new(pci.clone()))),
        CONFIG_ADDRESS_PORT,
        CONFIG_IO_LEN,
    )
    .map_err(|source| BuildError::Bus {
        what: "PCI config ports",
        source,
    })?;
    mmio.insert(
        Arc::new(Mutex::new(PciConfigMmio::new(pci.clone()))),
        PCI_ECAM_START,
        PCI_ECAM_SIZE,
    )
    .map_err(|source| BuildError::Bus {
        what: "PCI ECAM",
        source,
    })?;
    Ok(pci)
}

/// Loads the boot payload; returns how the boot vCPU starts.
fn load_payload(
    mem: &GuestMemoryMmap,
    boot: &BootSource,
    ram_size: u64,
    rsdp: u64,
) -> Result<CpuMode, BuildError> {
    match boot {
        BootSource::Linux {
            kernel,
            initramfs,
            cmdline,
        } => {
            let entry =
                boot::load_linux(mem, ram_size, kernel, initramfs.as_deref(), cmdline, rsdp)?;
            log::info!("kernel entry {:#x}", entry.entry);
            Ok(CpuMode::LongMode { rip: entry.entry })
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

/// Stops and joins the vCPU threads; true if one of them panicked. One kick each suffices: a
/// kick makes KVM_RUN return even when it lands just before the thread enters it.
fn stop_vcpus(threads: Vec<JoinHandle<()>>, stop: &AtomicBool) -> bool {
    stop.store(true, Ordering::Release);
    for t in threads.iter().filter(|t| !t.is_finished()) {
        // A thread that ends meanwhile is still joinable, so the signal goes nowhere harmful.
        if let Err(e) = t.kill(kick_signal()) {
            log::warn!("cannot kick vCPU thread {:?}: {e}", t.thread().name());
        }
    }
    threads.into_iter().any(|t| t.join().is_err())
}

/// Reports a vCPU thread that unwinds as a failed run.
struct PanicGuard(ExitHandle);

impl Drop for PanicGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0
                .request(VmExit::Failed("a vCPU thread panicked".into()));
        }
    }
}

/// Drains the exit eventfd so the loop wakes to check the exit reason.
struct ExitWatcher(EventFd);

impl MutEventSubscriber for ExitWatcher {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.0.read();
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.0, EventSet::IN)) {
            log::error!("cannot poll the exit eventfd: {e:?}");
        }
    }
}

/// Puts an interactive terminal in raw mode for the guest console; restores it on drop.
struct RawTerminal;

impl RawTerminal {
    fn enter() -> Option<Self> {
        use vmm_sys_util::terminal::Terminal;
        let stdin = std::io::stdin();
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(stdin.as_raw_fd()) } != 1 {
            return None;
        }
        match stdin.lock().set_raw_mode() {
            Ok(()) => Some(RawTerminal),
            Err(e) => {
                log::warn!("cannot set the terminal to raw mode: {e}");
                None
            }
        }
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        use vmm_sys_util::terminal::Terminal;
        if let Err(e) = std::io::stdin().lock().set_canon_mode() {
            log::warn!("cannot restore the terminal: {e}");
        }
    }
}
