//! Command line parsing, in Cloud Hypervisor's style: `--option key=value,key=value`.
//!
//! Parsing is hand written (no clap) so that every bad input yields exactly one line naming the
//! problem. Option lists go through [`OptionList`], which later options (`--device
//! path=...,iommu=on`, `--viommu aw-bits=48,flush=deferred`) reuse.

use std::collections::BTreeMap;
use std::path::PathBuf;

use passthrough::setup::Backend;

use crate::arch::x86_64::interrupts::MAX_XAPIC_ID;
use crate::arch::x86_64::layout::MIN_MEMORY_SIZE;
use crate::pci::address::{PciAddress, PciAddressError};
use crate::vstate::vm::Irqchip;

mod viommu;

use viommu::parse_viommu;
pub use viommu::{ViommuConfig, DEFAULT_RECORD_LIMIT};

/// Default guest memory size when `--memory` is not given.
pub const DEFAULT_MEMORY_SIZE: u64 = 512 << 20;
/// Default vCPU count when `--cpus` is not given.
pub const DEFAULT_VCPUS: u32 = 1;
/// Most vCPUs in xAPIC mode: APIC IDs 0..=254 (255 is the xAPIC broadcast ID). Beyond, a guest
/// needs x2APIC, which Linux uses for APIC IDs above 255 only with interrupt remapping in
/// extended interrupt mode (`--viommu intremap=on,eim=on`). KVM's own limit is checked when
/// the VM is built.
pub const MAX_XAPIC_VCPUS: u32 = MAX_XAPIC_ID + 1;
/// Default command line of a bzImage: serial console, reboot through the triple-fault/ACPI
/// paths we handle, and fail loudly instead of waiting on a panic.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";

/// Errors of command line parsing; each message names the option and the offending value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// An argument that is not an option we know.
    #[error("unknown argument '{0}' (see --help)")]
    UnknownArgument(String),
    /// An option that needs a value was last on the command line.
    #[error("option {0} needs a value")]
    MissingValue(&'static str),
    /// An option given twice.
    #[error("option {0} given more than once")]
    Duplicate(&'static str),
    /// A flag given a value.
    #[error("option {option} takes no value (got '{value}')")]
    UnexpectedValue { option: &'static str, value: String },
    /// `--kernel` absent.
    #[error("missing --kernel PATH (see --help)")]
    MissingKernel,
    /// `vmm replay` without a recording.
    #[error("vmm replay needs at least one recording (see vmm replay --help)")]
    NoRecording,
    /// A `key=value` item without `=`.
    #[error("{option}: expected key=value, got '{item}'")]
    NotKeyValue { option: &'static str, item: String },
    /// A key the option does not know.
    #[error("{option}: unknown key '{key}' (known: {known})")]
    UnknownKey {
        option: &'static str,
        key: String,
        known: String,
    },
    /// A key required by the option is absent.
    #[error("{option}: missing {key}=")]
    MissingKey {
        option: &'static str,
        key: &'static str,
    },
    /// A value that does not parse or is out of range.
    #[error("{option}: invalid {key} '{value}': {reason}")]
    InvalidValue {
        option: &'static str,
        key: &'static str,
        value: String,
        reason: InvalidReason,
    },
}

/// Why a value is invalid.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InvalidReason {
    #[error(transparent)]
    Size(#[from] SizeError),
    #[error("expected a whole number")]
    NotAWholeNumber,
    #[error("must be {min}..={max}")]
    OutOfRange { min: u64, max: u64 },
    /// Not one of the values the key takes (listed).
    #[error("must be {0}")]
    NotOneOf(&'static str),
    #[error("at least {min_mib}M is needed")]
    TooSmall { min_mib: u64 },
    #[error("must be a multiple of 4K")]
    NotPageMultiple,
    #[error("empty path")]
    Empty,
    #[error("iommu=on needs --viommu")]
    NeedsViommu,
    #[error("with --viommu every device must be behind it (add iommu=on)")]
    NotBehindViommu,
    #[error("first-stage=on needs scalable-mode=on")]
    FirstStageNeedsScalableMode,
    #[error("first-stage=on needs aw-bits=48 (first-stage tables are 4-level)")]
    FirstStageNeeds48Bits,
    #[error(
        "first-stage=on cannot have a passed-through device behind the unit: a caching-mode \
         guest sends no invalidation when it maps through first-stage tables, so the host could \
         not follow them"
    )]
    FirstStageWithPassthrough,
    #[error("extended interrupt mode (x2APIC destinations) needs intremap=on")]
    EimNeedsIntremap,
    #[error(
        "an in-kernel IOAPIC's interrupts would bypass the VT-d's interrupt remapping (use \
         --irqchip split, or --viommu intremap=off)"
    )]
    KernelIrqchipWithIntremap,
    #[error(
        "more than {MAX_XAPIC_VCPUS} vCPUs need APIC IDs above 254, which Linux uses only in \
         x2APIC mode with interrupt remapping (add --viommu intremap=on,eim=on)"
    )]
    NeedsX2apicRemapping,
    #[error("record-limit= needs record=PATH")]
    LimitWithoutRecord,
    #[error(
        "caching-mode=off cannot have a passed-through device behind the unit: the host can \
         only follow the guest's tables when the guest invalidates on every change, which is \
         what caching mode asks of it"
    )]
    CachingModeOffWithPassthrough,
    #[error("check-report needs check=on")]
    CheckReportNeedsCheck,
    #[error(
        "a recording replays with the default caches and no injections (the header carries \
         neither): drop inject=, inject-control= and the cache options, or record="
    )]
    RecordWithDriverOptions,
    #[error(transparent)]
    Injection(#[from] ::viommu::inject::InjectionError),
    #[error(transparent)]
    Address(#[from] PciAddressError),
    #[error("slot 0 is the host bridge's")]
    HostBridgeSlot,
    #[error("{} asks for it too", .0.display())]
    AddressTaken(PathBuf),
    #[error(
        "slot {0:02x} has no function 0 (a guest looks for functions 1-7 only when function 0 \
         says multi-function; add a device at addr={0:02x}.0)"
    )]
    NoFunctionZero(u8),
}

/// Why a size does not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SizeError {
    #[error("expected a number with an optional K, M, G or T suffix")]
    NotANumber,
    #[error("size overflows 64 bits")]
    Overflow,
}

/// What the command line asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    /// Print usage and exit 0.
    Help,
    /// Print the version and exit 0.
    Version,
    /// Boot a VM (boxed: the configuration is much larger than the other variants).
    Run(Box<VmConfig>),
    /// Print `vmm replay`'s usage and exit 0.
    ReplayHelp,
    /// Replay VT-d recordings (`vmm replay`).
    Replay(crate::replay::ReplayConfig),
}

/// The whole VM configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmConfig {
    /// Path of the bzImage or multiboot kernel.
    pub kernel: PathBuf,
    /// Optional initramfs (a multiboot kernel's first module).
    pub initramfs: Option<PathBuf>,
    /// Kernel command line, when given; otherwise the kernel format's default applies
    /// (`arch::x86_64::boot::KernelFormat::default_cmdline`).
    pub cmdline: Option<String>,
    /// Number of vCPUs; vCPU `n` has APIC ID `n`.
    pub vcpus: u32,
    /// Guest RAM in bytes.
    pub memory_size: u64,
    /// The virtual VT-d, when `--viommu` asks for one.
    pub viommu: Option<ViommuConfig>,
    /// Where to write the VT-d counters as JSON when the VM stops.
    pub stats_json: Option<PathBuf>,
    /// Host PCI functions to assign (`--device path=/sys/bus/pci/devices/DDDD:BB:DD.F`).
    pub devices: Vec<DeviceConfig>,
    /// Where the IOAPIC lives (`--irqchip kernel|split`).
    pub irqchip: Irqchip,
    /// QEMU's `edu` test device on PCI bus 0 (`--edu`).
    pub edu: bool,
}

/// The irqchip when `--irqchip` is not given and the VT-d does not remap interrupts (with
/// interrupt remapping it is [`Irqchip::Split`]: the IOAPIC's interrupts must reach the unit).
pub const DEFAULT_IRQCHIP: Irqchip = Irqchip::Kernel;

/// Usage text for `--help`.
pub const USAGE: &str = "\
vmm: a minimal KVM VMM for PCI passthrough behind a virtual Intel VT-d

Usage: vmm --kernel PATH [--initramfs PATH] [--cmdline STR] [--cpus boot=N] [--memory size=SIZE]
           [--viommu [aw-bits=39|48][,flush=strict|deferred][,queue=sync|async]
                     [,scalable-mode=on|off][,first-stage=on|off]
                     [,intremap=on|off][,eim=on|off][,ioapic-sid-check=on|off]
                     [,record=PATH[,record-limit=SIZE]][,caching-mode=on|off]
                     [,caches=on|off][,iotlb-entries=N][,context-entries=N]
                     [,pasid-entries=N][,iec-entries=N][,device-iotlb=on|off]
                     [,check=on|off][,check-report=PATH][,inject=SPEC[+SPEC...]]
                     [,inject-control=PATH]]
           [--stats-json PATH]
           [--device path=/sys/bus/pci/devices/DDDD:BB:DD.F[,iommu=on]
                     [,backend=iommufd|container][,addr=SLOT[.FUNCTION]]]...
           [--edu] [--irqchip kernel|split]
       vmm replay PATH... [OPTIONS]   (see vmm replay --help)

Options:
  --kernel PATH        kernel to boot: a Linux bzImage (64-bit boot protocol) or a multiboot
                       kernel (ELF or a.out kludge, e.g. a kvm-unit-tests .flat file)
  --initramfs PATH     initramfs loaded for a bzImage; a multiboot kernel's first module
  --cmdline STR        kernel command line (default for a bzImage: \"console=ttyS0 reboot=k
                       panic=1\"; a multiboot kernel gets its path, then STR if given)
  --cpus boot=N        number of vCPUs (default 1): up to 255, or up to what KVM allows
                       (KVM_CAP_MAX_VCPUS) with --viommu intremap=on,eim=on, as a Linux
                       guest needs interrupt remapping for x2APIC IDs above 255
  --memory size=SIZE   guest RAM, e.g. 256M or 2G (default 512M, at least 32M)
  --viommu [OPTS]      expose a virtual Intel VT-d (DMAR table) at 0xfed90000;
                       aw-bits=39|48 (default 48, or 39 where a --device's host IOMMU
                       maps no IOVA up to 2^48 - 1; a width a device's host cannot map is
                       refused), flush=strict|deferred (default strict:
                       deferred lets a device reach unmapped memory for up to 10 ms),
                       queue=sync|async (default sync; async: a queue tail write returns to
                       the guest at once and the VMM runs the queue, as hardware does, so
                       IQT may read back stale until it ran), scalable-mode=on|off (default
                       off; PASID tables, 256-bit descriptors; devices behind second-stage
                       or pass-through PASID entries), first-stage=on|off (default off;
                       needs scalable-mode=on, aw-bits=48 and no --device behind the unit:
                       a caching-mode guest sends no invalidation when it maps through
                       first-stage tables, so only emulated devices, which translate on
                       demand, can follow them; hardware nesting through iommufd is what
                       would lift this), intremap=on|off (default on:
                       interrupt remapping, as real VT-d has, of passed-through MSI/MSI-X,
                       the IOAPIC and emulated devices; implies --irqchip split), eim=on|off
                       (default: as intremap; x2APIC destinations, needed beyond 255 vCPUs),
                       ioapic-sid-check=on|off (default on: the IOAPIC's interrupts are
                       checked against their IRTE's source-id fields, as the spec says; off
                       skips that for the IOAPIC as QEMU does, for guests written against
                       QEMU such as kvm-unit-tests' intel_iommu),
                       record=PATH (write what the guest makes the unit do, for
                       `vmm replay`; record-limit=SIZE caps it, default 256M)
                       For driver developers (emulated devices such as edu go through the
                       unit's caches, as on hardware):
                       caching-mode=on|off (default on; off sends the guest driver down its
                       hardware path, no invalidation on map; refused with --device: the host
                       follows the guest's tables only when it invalidates on every change),
                       caches=on|off and iotlb-entries, context-entries, pasid-entries,
                       iec-entries=N (default on: 512, 64, 64, 128 entries, 0 to 65536; a
                       missing invalidation leaves the stale translation in use),
                       device-iotlb=on|off (default off; ECAP.DT: emulated ATS devices cache
                       translations), check=on|off (default off; the protocol checker: each
                       violation logged, counted in --stats-json and, with
                       check-report=PATH, listed as JSON when the VM stops, with its spec
                       section, device, domain, IOVA or index, descriptor, register write and
                       the vCPU's RIP), inject=SPEC[+SPEC...] (faults for the driver's error
                       paths, SPEC = iqe@N: the Nth descriptor fails to fetch; ite@N: the Nth
                       device-TLB invalidation times out; ice@N: it completes in error;
                       dma-fault@N: the Nth emulated DMA translation faults; records-full@N:
                       the Nth fault fills every fault record and overflows; N counts from
                       the start, default 1), inject-control=PATH (a file of SPECs, one per
                       line, armed and counted from each time the file changes)
  --stats-json PATH    write the VT-d counters as JSON when the VM stops (and every
                       100 ms while it runs)
  --device path=PATH[,iommu=on][,backend=iommufd|container][,addr=SLOT[.FUNCTION]]
                       assign a host PCI function bound to vfio-pci (repeatable); without
                       --viommu all guest RAM is mapped for its DMA; with --viommu it must
                       say iommu=on and its DMA follows the guest's VT-d tables.
                       backend= (default: iommufd where the host has /dev/iommu and the
                       device's /dev/vfio/devices/vfioN, else container): iommufd maps
                       through an I/O address space (one shared by the devices without
                       --viommu; behind it one per guest domain, devices the guest puts in
                       one domain sharing it, and one shared while the guest's view is
                       identity), container through VFIO type1 containers (one shared by
                       the devices without --viommu, one per device behind it;
                       /dev/vfio/vfio and the group's /dev/vfio/N).
                       addr= (QEMU's; hex, slot 1..1f, function 0..7, default 0) puts it at
                       00:SLOT.FUNCTION of the guest's bus 0, e.g. addr=05.0 and addr=05.1
                       make one multi-function device of two; a slot with functions needs
                       function 0. Without addr=, a device takes function 0 of the first
                       slot neither in use (host bridge, --edu) nor named by an addr=
  --edu                add QEMU's edu test device (1234:11e8: factorial, interrupt raise and
                       acknowledge, DMA engine, MSI or INTx) in the first free PCI slot
                       (one no --device addr= names),
                       as firmware leaves it (BAR0 placed and decoding, interrupt line set);
                       with --viommu its DMA and interrupts go through the VT-d. QEMU's
                       -device edu; a flag of its own, as Cloud Hypervisor names each emulated
                       device by an option (--pvpanic), because --device is for host functions
  --irqchip kernel|split
                       kernel (default without interrupt remapping): PIC, IOAPIC and PIT in
                       KVM; split (default with --viommu intremap=on): only the local APICs
                       in KVM, the IOAPIC in the VMM (no PIC, no PIT: the guest needs the
                       TSC-deadline timer, as Linux uses it under KVM)
  -h, --help           print this help
  -V, --version        print the version

Exit status: 0 when the guest powers off or reboots, 1 when the guest kernel panics or on any
error (one line on stderr says which), (V << 1) | 1 when the guest writes V to the
isa-debug-exit port 0xf4 (as QEMU's isa-debug-exit). RUST_LOG=debug shows diagnostics.";

/// A parsed `key=value,key=value` list of one option.
#[derive(Debug)]
pub struct OptionList {
    option: &'static str,
    values: BTreeMap<String, String>,
}

impl OptionList {
    /// Parses `input` for `option`, accepting only the keys in `known`.
    pub fn parse(
        option: &'static str,
        input: &str,
        known: &'static [&'static str],
    ) -> Result<Self, ConfigError> {
        let mut values = BTreeMap::new();
        for item in input.split(',').filter(|s| !s.is_empty()) {
            let (key, value) = item.split_once('=').ok_or(ConfigError::NotKeyValue {
                option,
                item: item.to_string(),
            })?;
            if !known.contains(&key) {
                return Err(ConfigError::UnknownKey {
                    option,
                    key: key.to_string(),
                    known: known.join(", "),
                });
            }
            values.insert(key.to_string(), value.to_string());
        }
        Ok(Self { option, values })
    }

    /// The raw value of `key`, if given.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.values.get(key).map(String::as_str)
    }

    /// The value of `key`, required.
    pub fn require(&self, key: &'static str) -> Result<&str, ConfigError> {
        self.get(key).ok_or(ConfigError::MissingKey {
            option: self.option,
            key,
        })
    }

    /// Builds an `InvalidValue` error for `key`.
    pub fn invalid(
        &self,
        key: &'static str,
        value: &str,
        reason: impl Into<InvalidReason>,
    ) -> ConfigError {
        ConfigError::InvalidValue {
            option: self.option,
            key,
            value: value.to_string(),
            reason: reason.into(),
        }
    }
}

/// Parses a size such as `256M`, `2G`, `1048576` or `512K` into bytes.
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    let s = s.trim();
    let (digits, shift) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 30),
        Some('T' | 't') => (&s[..s.len() - 1], 40),
        _ => (s, 0),
    };
    let n: u64 = digits.parse().map_err(|_| SizeError::NotANumber)?;
    n.checked_mul(1u64 << shift).ok_or(SizeError::Overflow)
}

fn parse_cpus(input: &str) -> Result<u32, ConfigError> {
    let list = OptionList::parse("--cpus", input, &["boot"])?;
    let raw = list.require("boot")?;
    let n: u32 = raw
        .parse()
        .map_err(|_| list.invalid("boot", raw, InvalidReason::NotAWholeNumber))?;
    if n == 0 {
        let range = InvalidReason::OutOfRange {
            min: 1,
            max: u32::MAX.into(),
        };
        return Err(list.invalid("boot", raw, range));
    }
    Ok(n)
}

fn parse_irqchip(input: &str) -> Result<Irqchip, ConfigError> {
    match input {
        "kernel" => Ok(Irqchip::Kernel),
        "split" => Ok(Irqchip::Split),
        _ => Err(ConfigError::InvalidValue {
            option: "--irqchip",
            key: "mode",
            value: input.to_string(),
            reason: InvalidReason::NotOneOf("kernel or split"),
        }),
    }
}

fn parse_memory(input: &str) -> Result<u64, ConfigError> {
    let list = OptionList::parse("--memory", input, &["size"])?;
    let raw = list.require("size")?;
    let size = parse_size(raw).map_err(|e| list.invalid("size", raw, e))?;
    if size < MIN_MEMORY_SIZE {
        let min_mib = MIN_MEMORY_SIZE >> 20;
        return Err(list.invalid("size", raw, InvalidReason::TooSmall { min_mib }));
    }
    if size % 4096 != 0 {
        return Err(list.invalid("size", raw, InvalidReason::NotPageMultiple));
    }
    Ok(size)
}

/// `--device path=PATH[,iommu=on|off][,backend=iommufd|container][,addr=SLOT[.FUNCTION]]`
/// (Cloud Hypervisor's form, with QEMU's `addr=`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceConfig {
    /// The host PCI function's sysfs path.
    pub path: PathBuf,
    /// Behind the virtual VT-d: its DMA mappings follow the guest's IOMMU tables.
    pub iommu: bool,
    /// The host backend asked for; `None` takes iommufd where the host has it, else the
    /// container.
    pub backend: Option<Backend>,
    /// Where on the guest's bus 0 it goes; `None` takes function 0 of the first free slot.
    pub addr: Option<PciAddress>,
}

/// Parses `--device path=PATH[,iommu=on|off][,backend=iommufd|container][,addr=SLOT[.FUNCTION]]`.
fn parse_device(input: &str) -> Result<DeviceConfig, ConfigError> {
    let list = OptionList::parse("--device", input, &["path", "iommu", "backend", "addr"])?;
    let path = list.require("path")?;
    if path.is_empty() {
        return Err(list.invalid("path", path, InvalidReason::Empty));
    }
    let iommu = match list.get("iommu") {
        None | Some("off") => false,
        Some("on") => true,
        Some(raw) => return Err(list.invalid("iommu", raw, InvalidReason::NotOneOf("on or off"))),
    };
    let backend = match list.get("backend") {
        None => None,
        Some("iommufd") => Some(Backend::Iommufd),
        Some("container") => Some(Backend::Container),
        Some(raw) => {
            return Err(list.invalid(
                "backend",
                raw,
                InvalidReason::NotOneOf("iommufd or container"),
            ))
        }
    };
    let addr = match list.get("addr") {
        None => None,
        Some(raw) => {
            let addr: PciAddress = raw.parse().map_err(|e| list.invalid("addr", raw, e))?;
            if addr.slot() == 0 {
                return Err(list.invalid("addr", raw, InvalidReason::HostBridgeSlot));
            }
            Some(addr)
        }
    };
    Ok(DeviceConfig {
        path: PathBuf::from(path),
        iommu,
        backend,
        addr,
    })
}

/// The addresses the devices ask for must be distinct, and a slot with functions must have
/// function 0.
fn check_device_addresses(devices: &[DeviceConfig]) -> Result<(), ConfigError> {
    let invalid = |d: &DeviceConfig, addr: PciAddress, reason| ConfigError::InvalidValue {
        option: "--device",
        key: "addr",
        value: format!(
            "{:02x}.{} for {}",
            addr.slot(),
            addr.function(),
            d.path.display()
        ),
        reason,
    };
    let mut taken: BTreeMap<PciAddress, &DeviceConfig> = BTreeMap::new();
    for d in devices {
        let Some(addr) = d.addr else { continue };
        if let Some(other) = taken.insert(addr, d) {
            return Err(invalid(
                d,
                addr,
                InvalidReason::AddressTaken(other.path.clone()),
            ));
        }
    }
    for (&addr, d) in &taken {
        if !taken.contains_key(&addr.function_zero()) {
            return Err(invalid(d, addr, InvalidReason::NoFunctionZero(addr.slot())));
        }
    }
    Ok(())
}

/// Devices and the VT-d must agree: the DMAR table puts every PCI device behind the unit, so a
/// device it does not remap would have the guest program IOVAs the host never learns of.
fn check_devices_and_viommu(
    devices: &[DeviceConfig],
    viommu: Option<&ViommuConfig>,
) -> Result<(), ConfigError> {
    for d in devices {
        let invalid = |reason: InvalidReason| ConfigError::InvalidValue {
            option: "--device",
            key: "iommu",
            value: format!(
                "{} for {}",
                if d.iommu { "on" } else { "off" },
                d.path.display()
            ),
            reason,
        };
        match (d.iommu, viommu.is_some()) {
            (true, false) => return Err(invalid(InvalidReason::NeedsViommu)),
            (false, true) => return Err(invalid(InvalidReason::NotBehindViommu)),
            _ => {}
        }
        if viommu.is_some_and(|v| v.first_stage) {
            return Err(ConfigError::InvalidValue {
                option: "--viommu",
                key: "first-stage",
                value: format!("on with --device {}", d.path.display()),
                reason: InvalidReason::FirstStageWithPassthrough,
            });
        }
        if viommu.is_some_and(|v| !v.caching_mode) {
            return Err(ConfigError::InvalidValue {
                option: "--viommu",
                key: "caching-mode",
                value: format!("off with --device {}", d.path.display()),
                reason: InvalidReason::CachingModeOffWithPassthrough,
            });
        }
    }
    Ok(())
}

/// Parses the arguments after the program name.
pub fn parse_args<I, S>(args: I) -> Result<Command, ConfigError>
where
    I: IntoIterator<Item = S>,
    S: Into<String>,
{
    let mut kernel = None;
    let mut initramfs = None;
    let mut cmdline = None;
    let mut vcpus = None;
    let mut memory = None;
    let mut viommu = None;
    let mut stats_json = None;
    let mut devices = Vec::new();
    let mut irqchip = None;
    let mut edu = false;

    let mut it = args.into_iter().map(Into::into).peekable();
    if it.peek().is_some_and(|a| a == "replay") {
        let rest: Vec<String> = it.skip(1).collect();
        if rest.iter().any(|a| a == "-h" || a == "--help") {
            return Ok(Command::ReplayHelp);
        }
        return crate::replay::parse_replay_args(&rest).map(Command::Replay);
    }
    while let Some(arg) = it.next() {
        // Accept both `--opt value` and `--opt=value`.
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let name: &'static str = match name.as_str() {
            "-h" | "--help" => return Ok(Command::Help),
            "-V" | "--version" => return Ok(Command::Version),
            "--kernel" => "--kernel",
            "--initramfs" => "--initramfs",
            "--cmdline" => "--cmdline",
            "--cpus" => "--cpus",
            "--memory" => "--memory",
            "--viommu" => "--viommu",
            "--stats-json" => "--stats-json",
            "--device" => "--device",
            "--irqchip" => "--irqchip",
            "--edu" => "--edu",
            _ => return Err(ConfigError::UnknownArgument(arg)),
        };
        if name == "--edu" {
            if let Some(value) = inline {
                return Err(ConfigError::UnexpectedValue {
                    option: name,
                    value,
                });
            }
            if std::mem::replace(&mut edu, true) {
                return Err(ConfigError::Duplicate(name));
            }
            continue;
        }
        let value = match inline {
            Some(v) => v,
            // `--viommu` alone takes the defaults.
            None if name == "--viommu" && it.peek().is_none_or(|a| a.starts_with('-')) => {
                String::new()
            }
            None => it.next().ok_or(ConfigError::MissingValue(name))?,
        };
        let dup = match name {
            "--kernel" => kernel.replace(PathBuf::from(&value)).is_some(),
            "--initramfs" => initramfs.replace(PathBuf::from(&value)).is_some(),
            "--cmdline" => cmdline.replace(value).is_some(),
            "--cpus" => vcpus.replace(parse_cpus(&value)?).is_some(),
            "--viommu" => viommu.replace(parse_viommu(&value)?).is_some(),
            "--stats-json" => stats_json.replace(PathBuf::from(&value)).is_some(),
            "--irqchip" => irqchip.replace(parse_irqchip(&value)?).is_some(),
            "--device" => {
                devices.push(parse_device(&value)?);
                false
            }
            _ => memory.replace(parse_memory(&value)?).is_some(),
        };
        if dup {
            return Err(ConfigError::Duplicate(name));
        }
    }

    check_device_addresses(&devices)?;
    check_devices_and_viommu(&devices, viommu.as_ref())?;
    let intremap = viommu.as_ref().is_some_and(|v| v.intremap);
    let irqchip = match irqchip {
        Some(Irqchip::Kernel) if intremap => {
            return Err(ConfigError::InvalidValue {
                option: "--irqchip",
                key: "mode",
                value: "kernel".into(),
                reason: InvalidReason::KernelIrqchipWithIntremap,
            })
        }
        Some(chip) => chip,
        None if intremap => Irqchip::Split,
        None => DEFAULT_IRQCHIP,
    };
    let vcpus = vcpus.unwrap_or(DEFAULT_VCPUS);
    if vcpus > MAX_XAPIC_VCPUS && !viommu.as_ref().is_some_and(|v| v.intremap && v.eim) {
        return Err(ConfigError::InvalidValue {
            option: "--cpus",
            key: "boot",
            value: vcpus.to_string(),
            reason: InvalidReason::NeedsX2apicRemapping,
        });
    }
    Ok(Command::Run(Box::new(VmConfig {
        kernel: kernel.ok_or(ConfigError::MissingKernel)?,
        initramfs,
        cmdline,
        vcpus,
        memory_size: memory.unwrap_or(DEFAULT_MEMORY_SIZE),
        viommu,
        stats_json,
        devices,
        irqchip,
        edu,
    })))
}

#[cfg(test)]
mod tests;
