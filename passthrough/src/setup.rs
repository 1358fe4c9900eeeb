//! Opening a host PCI function for assignment: the checks that turn every usual mistake into
//! one line naming the device and the fix, the choice of host backend ([`Backend`]: iommufd or
//! the legacy container), then the VFIO container, group and device (the iommufd side is
//! [`crate::iommufd`]).

use std::fmt;
use std::fs::OpenOptions;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use vfio_ioctls::{VfioContainer, VfioDevice, VfioDeviceFd, VfioError};

use crate::host::HostDevice;
use crate::iova::{type1_iova_ranges, IovaRanges, IovaRangesError};

/// The driver a device must be bound to.
pub const VFIO_PCI_DRIVER: &str = "vfio-pci";
/// Drivers the kernel lets other members of the group keep (a group is viable when every
/// device is bound to VFIO, pci-stub, a PCIe port driver, or nothing).
const GROUP_FRIENDLY_DRIVERS: [&str; 3] = [VFIO_PCI_DRIVER, "pci-stub", "pcieport"];

/// Why a device cannot be assigned.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("device {path}: no such PCI device; give /sys/bus/pci/devices/DDDD:BB:DD.F (list them with `ls /sys/bus/pci/devices`)")]
    PathMissing { path: String },
    #[error("device {path}: not a PCI device address; give /sys/bus/pci/devices/DDDD:BB:DD.F")]
    NotPciAddress { path: String },
    /// The fix binds this one device (driver_override), not every device with its ID as
    /// `new_id` would.
    #[error("device {bdf} ({vendor}:{device}): bound to {driver}, not vfio-pci; bind it with `{unbind}echo vfio-pci > /sys/bus/pci/devices/{bdf}/driver_override; echo {bdf} > /sys/bus/pci/drivers/vfio-pci/bind` (modprobe vfio-pci first)")]
    NotBoundToVfio {
        bdf: String,
        driver: String,
        /// The unbind command, when the device has a driver.
        unbind: String,
        vendor: String,
        device: String,
    },
    #[error("device {bdf}: has no IOMMU group; enable the host IOMMU (intel_iommu=on or amd_iommu=on on the kernel command line)")]
    NoIommuGroup { bdf: String },
    #[error("device {bdf}: {path} is absent; load VFIO with `modprobe vfio-pci`")]
    NoVfio { bdf: String, path: String },
    #[error("device {bdf}: IOMMU group {group} is not viable: {others} must be bound to vfio-pci too (or unbound); bind each the same way, or pass them through together")]
    GroupNotViable {
        bdf: String,
        group: u32,
        others: String,
    },
    #[error("device {bdf}: no permission to open {path}; run as root or give this user the file (chown USER {path})")]
    NoPermission { bdf: String, path: String },
    #[error("device {bdf}: {path} is busy: another process (a VMM?) holds IOMMU group {group}")]
    GroupBusy {
        bdf: String,
        group: u32,
        path: String,
    },
    #[error("device {bdf}: cannot open {path}: {source}")]
    Open {
        bdf: String,
        path: String,
        source: std::io::Error,
    },
    #[error("device {bdf}: VFIO set-up failed: {source}")]
    Vfio { bdf: String, source: VfioError },
    #[error("device {bdf}: VFIO exposes no PCI configuration region")]
    NoConfigRegion { bdf: String },
    /// `backend=iommufd` on a host (or for a device) without it.
    #[error("device {bdf}: no iommufd: {reason}; or use backend=container")]
    NoIommufd { bdf: String, reason: NoIommufd },
    /// The device file is bound to an iommufd already: cdev binding is exclusive, and the
    /// kernel refuses it while the group is open through /dev/vfio/N.
    #[error("device {bdf}: {path} is busy: another process (a VMM?) has the device, through it or through IOMMU group {group} (/dev/vfio/{group})")]
    DeviceBusy {
        bdf: String,
        group: u32,
        path: String,
    },
    #[error("device {bdf}: iommufd set-up failed: {source}")]
    Iommufd {
        bdf: String,
        source: iommufd_ioctls::IommufdError,
    },
    /// The host would not say which IOVAs the device's address space can map.
    #[error("device {bdf}: cannot read the IOVA ranges its host IOMMU maps: {source}")]
    IovaRanges {
        bdf: String,
        source: IovaRangesError,
    },
}

/// Why iommufd cannot serve a device (the default then takes the container).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoIommufd {
    #[error(
        "{path} is absent: load iommufd (`modprobe iommufd`), or the kernel lacks CONFIG_IOMMUFD"
    )]
    NoDevIommu { path: String },
    #[error("vfio-pci gives it no device file ({sysfs} is absent): the kernel lacks CONFIG_VFIO_DEVICE_CDEV")]
    NoDeviceFile { sysfs: String },
    #[error("{path} is absent though {sysfs} lists it: have udev create it (`udevadm trigger`)")]
    NoDeviceNode { path: String, sysfs: String },
}

/// How a device's DMA is isolated on the host (`--device ...,backend=`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// iommufd: /dev/iommu, the device's own file /dev/vfio/devices/vfioN, I/O address spaces.
    Iommufd,
    /// The legacy VFIO type1 container: /dev/vfio/vfio and the group's /dev/vfio/N.
    Container,
}

impl Backend {
    /// The name `backend=` takes.
    pub const fn name(self) -> &'static str {
        match self {
            Backend::Iommufd => "iommufd",
            Backend::Container => "container",
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How the host gives us a checked device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// Through its group, into a type1 container.
    Container,
    /// Through its device file `cdev`, bound to an iommufd.
    Iommufd { cdev: PathBuf },
}

impl Route {
    pub fn backend(&self) -> Backend {
        match self {
            Route::Container => Backend::Container,
            Route::Iommufd { .. } => Backend::Iommufd,
        }
    }
}

/// A device that passed the checks of the backend it gets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Selected {
    pub checked: Checked,
    pub route: Route,
    /// Why this backend, for the log (the lead's testbed reads it).
    pub why: String,
}

/// Where the host's sysfs and /dev are (tests use a fake tree).
#[derive(Clone, Debug)]
pub struct HostPaths {
    pub dev: PathBuf,
}

impl Default for HostPaths {
    fn default() -> Self {
        Self {
            dev: PathBuf::from("/dev"),
        }
    }
}

/// A device that passed [`check`]: its address and IOMMU group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checked {
    pub path: PathBuf,
    pub bdf: String,
    pub group: u32,
}

/// Whether `s` reads as DDDD:BB:DD.F.
fn is_bdf(s: &str) -> bool {
    let b = s.as_bytes();
    let hex = |r: std::ops::Range<usize>| {
        b.get(r)
            .is_some_and(|x| x.iter().all(u8::is_ascii_hexdigit))
    };
    b.len() == 12
        && hex(0..4)
        && b[4] == b':'
        && hex(5..7)
        && b[7] == b':'
        && hex(8..10)
        && b[10] == b'.'
        && (b'0'..=b'7').contains(&b[11])
}

fn link_name(p: &Path) -> Option<String> {
    let target = std::fs::read_link(p).ok()?;
    Some(target.file_name()?.to_string_lossy().into_owned())
}

fn read_id(p: &Path) -> String {
    std::fs::read_to_string(p)
        .map(|s| s.trim().trim_start_matches("0x").to_string())
        .unwrap_or_else(|_| "VVVV".into())
}

/// Checks that `path` names a PCI function the host lets us assign through a container,
/// without touching it. Run before any VM state exists, so a bad `--device` costs nothing.
pub fn check(paths: &HostPaths, path: &Path) -> Result<Checked, SetupError> {
    let c = check_function(paths, path)?;
    check_container_nodes(paths, &c)?;
    Ok(c)
}

/// Picks the backend for the device at `path` and runs its checks: `requested` when given
/// (an error when the host lacks it), else iommufd where the host has it for this device and
/// the container otherwise.
pub fn select(
    paths: &HostPaths,
    path: &Path,
    requested: Option<Backend>,
) -> Result<Selected, SetupError> {
    let checked = check_function(paths, path)?;
    let (route, why) = match requested {
        Some(Backend::Container) => {
            check_container_nodes(paths, &checked)?;
            (Route::Container, "backend=container".to_string())
        }
        Some(Backend::Iommufd) => {
            let cdev = iommufd_nodes(paths, &checked).map_err(|reason| SetupError::NoIommufd {
                bdf: checked.bdf.clone(),
                reason,
            })?;
            check_iommufd_nodes(paths, &checked, &cdev)?;
            (Route::Iommufd { cdev }, "backend=iommufd".to_string())
        }
        None => match iommufd_nodes(paths, &checked) {
            Ok(cdev) => {
                check_iommufd_nodes(paths, &checked, &cdev)?;
                let why = format!(
                    "default: the host has {} and {}",
                    paths.dev.join("iommu").display(),
                    cdev.display()
                );
                (Route::Iommufd { cdev }, why)
            }
            Err(reason) => {
                check_container_nodes(paths, &checked)?;
                (Route::Container, format!("default: no iommufd: {reason}"))
            }
        },
    };
    Ok(Selected {
        checked,
        route,
        why,
    })
}

/// Where iommufd would reach the device: /dev/iommu present and the device's VFIO file
/// (sysfs `vfio-dev/vfioN`, the node /dev/vfio/devices/vfioN). Only looks.
fn iommufd_nodes(paths: &HostPaths, c: &Checked) -> Result<PathBuf, NoIommufd> {
    let iommu = paths.dev.join("iommu");
    if !iommu.exists() {
        return Err(NoIommufd::NoDevIommu {
            path: iommu.display().to_string(),
        });
    }
    let sysfs = c.path.join("vfio-dev");
    let name = std::fs::read_dir(&sysfs)
        .ok()
        .and_then(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .find(|n| {
                    n.strip_prefix("vfio")
                        .is_some_and(|i| i.parse::<u32>().is_ok())
                })
        })
        .ok_or_else(|| NoIommufd::NoDeviceFile {
            sysfs: sysfs.display().to_string(),
        })?;
    let cdev = paths.dev.join("vfio/devices").join(&name);
    if !cdev.exists() {
        return Err(NoIommufd::NoDeviceNode {
            path: cdev.display().to_string(),
            sysfs: sysfs.join(&name).display().to_string(),
        });
    }
    Ok(cdev)
}

/// Opens /dev/iommu and the device file once, to turn their failures into [`SetupError`]s.
fn check_iommufd_nodes(paths: &HostPaths, c: &Checked, cdev: &Path) -> Result<(), SetupError> {
    for node in [paths.dev.join("iommu").as_path(), cdev] {
        open_node(node).map_err(|e| open_error(c, node, Backend::Iommufd, e))?;
    }
    Ok(())
}

/// The container's nodes: /dev/vfio/vfio and the group's /dev/vfio/N.
fn check_container_nodes(paths: &HostPaths, c: &Checked) -> Result<(), SetupError> {
    let vfio_dir = paths.dev.join("vfio");
    for node in [vfio_dir.join("vfio"), vfio_dir.join(c.group.to_string())] {
        open_node(&node).map_err(|e| open_error(c, &node, Backend::Container, e))?;
    }
    Ok(())
}

/// What both backends need: a PCI function bound to vfio-pci in a viable IOMMU group, with
/// VFIO loaded.
fn check_function(paths: &HostPaths, path: &Path) -> Result<Checked, SetupError> {
    let shown = path.display().to_string();
    let bdf = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if !path.exists() {
        return Err(SetupError::PathMissing { path: shown });
    }
    if !is_bdf(&bdf) || !path.join("config").exists() {
        return Err(SetupError::NotPciAddress { path: shown });
    }
    let driver = link_name(&path.join("driver"));
    if driver.as_deref() != Some(VFIO_PCI_DRIVER) {
        let unbind = match &driver {
            Some(_) => format!("echo {bdf} > /sys/bus/pci/devices/{bdf}/driver/unbind; "),
            None => String::new(),
        };
        return Err(SetupError::NotBoundToVfio {
            driver: driver.unwrap_or_else(|| "no driver".into()),
            unbind,
            vendor: read_id(&path.join("vendor")),
            device: read_id(&path.join("device")),
            bdf,
        });
    }
    let group = link_name(&path.join("iommu_group"))
        .and_then(|g| g.parse::<u32>().ok())
        .ok_or_else(|| SetupError::NoIommuGroup { bdf: bdf.clone() })?;
    let vfio_dir = paths.dev.join("vfio");
    if !vfio_dir.is_dir() {
        return Err(SetupError::NoVfio {
            bdf,
            path: vfio_dir.display().to_string(),
        });
    }
    let mut others = Vec::new();
    if let Ok(members) = std::fs::read_dir(path.join("iommu_group").join("devices")) {
        for m in members.flatten() {
            let name = m.file_name().to_string_lossy().into_owned();
            if name == bdf {
                continue;
            }
            if let Some(d) = link_name(&m.path().join("driver")) {
                if !GROUP_FRIENDLY_DRIVERS.contains(&d.as_str()) {
                    others.push(format!("{name} (bound to {d})"));
                }
            }
        }
    }
    if !others.is_empty() {
        others.sort();
        return Err(SetupError::GroupNotViable {
            bdf,
            group,
            others: others.join(", "),
        });
    }
    Ok(Checked {
        path: path.to_path_buf(),
        bdf,
        group,
    })
}

/// Opens `node` read-write (the file is closed again at once by the caller's drop).
pub(crate) fn open_node(node: &Path) -> std::io::Result<std::fs::File> {
    OpenOptions::new().read(true).write(true).open(node)
}

/// A failure to open `node`, a file of `backend` (container: /dev/vfio/vfio, /dev/vfio/N;
/// iommufd: /dev/iommu, /dev/vfio/devices/vfioN), as a [`SetupError`].
pub(crate) fn open_error(
    c: &Checked,
    node: &Path,
    backend: Backend,
    e: std::io::Error,
) -> SetupError {
    let (bdf, path) = (c.bdf.clone(), node.display().to_string());
    match (e.kind(), e.raw_os_error(), backend) {
        (ErrorKind::NotFound, _, Backend::Container) => SetupError::NoVfio { bdf, path },
        (ErrorKind::PermissionDenied, _, _) => SetupError::NoPermission { bdf, path },
        (_, Some(libc::EBUSY), Backend::Container) => SetupError::GroupBusy {
            bdf,
            group: c.group,
            path,
        },
        (_, Some(libc::EBUSY), Backend::Iommufd) => SetupError::DeviceBusy {
            bdf,
            group: c.group,
            path,
        },
        _ => SetupError::Open {
            bdf,
            path,
            source: e,
        },
    }
}

/// One VFIO container (one host IOMMU domain) and the devices opened in it.
pub struct VfioHost {
    paths: HostPaths,
    container: Arc<VfioContainer>,
}

impl VfioHost {
    /// Opens /dev/vfio/vfio. With `kvm_vfio`, every group joins KVM's VFIO device (KVM then
    /// knows the guest does non-coherent DMA and the like); KVM has one such device per VM,
    /// which every container shares.
    pub fn new(paths: HostPaths, kvm_vfio: Option<Arc<VfioDeviceFd>>) -> Result<Self, SetupError> {
        let container = VfioContainer::new(kvm_vfio).map_err(|source| {
            let path = paths.dev.join("vfio/vfio").display().to_string();
            match &source {
                VfioError::OpenContainer(e) if e.kind() == ErrorKind::PermissionDenied => {
                    SetupError::NoPermission {
                        bdf: "-".into(),
                        path,
                    }
                }
                VfioError::OpenContainer(e) if e.kind() == ErrorKind::NotFound => {
                    SetupError::NoVfio {
                        bdf: "-".into(),
                        path,
                    }
                }
                _ => SetupError::Vfio {
                    bdf: "-".into(),
                    source,
                },
            }
        })?;
        Ok(Self {
            paths,
            container: Arc::new(container),
        })
    }

    /// The container, for DMA mappings.
    pub fn container(&self) -> &Arc<VfioContainer> {
        &self.container
    }

    /// The IOVA ranges the container can map: what the IOMMUs of its groups reach, less their
    /// reserved regions; None where the kernel does not report them (before Linux 5.4). Ask
    /// once a device is open in it ([`VfioHost::open`]).
    pub fn iova_ranges(&self) -> Result<Option<IovaRanges>, IovaRangesError> {
        type1_iova_ranges(self.container.as_ref())
    }

    /// Checks and opens the device at `path` in this container.
    pub fn open(&self, path: &Path) -> Result<HostDevice, SetupError> {
        let c = check(&self.paths, path)?;
        let device =
            VfioDevice::new(&c.path, self.container.clone(), false).map_err(
                |source| match source {
                    VfioError::GroupViable => SetupError::GroupNotViable {
                        bdf: c.bdf.clone(),
                        group: c.group,
                        others: "another device of the group".into(),
                    },
                    source => SetupError::Vfio {
                        bdf: c.bdf.clone(),
                        source,
                    },
                },
            )?;
        HostDevice::new(c.bdf, device)
    }
}

#[cfg(test)]
#[path = "setup_tests.rs"]
mod tests;
