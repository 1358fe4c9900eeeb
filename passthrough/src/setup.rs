//! Opening a host PCI function for assignment: the checks that turn every usual mistake into
//! one line naming the device and the fix, then the VFIO container, group and device.

use std::fs::OpenOptions;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use vfio_ioctls::{VfioContainer, VfioDevice, VfioDeviceFd, VfioError};

use crate::host::HostDevice;

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

/// Checks that `path` names a PCI function the host lets us assign, without touching it.
/// Run before any VM state exists, so a bad `--device` costs nothing.
pub fn check(paths: &HostPaths, path: &Path) -> Result<Checked, SetupError> {
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
    for node in [vfio_dir.join("vfio"), vfio_dir.join(group.to_string())] {
        open_error(&bdf, group, &node)?;
    }
    Ok(Checked {
        path: path.to_path_buf(),
        bdf,
        group,
    })
}

/// Opens `node` read-write once to turn its failure into a [`SetupError`].
fn open_error(bdf: &str, group: u32, node: &Path) -> Result<(), SetupError> {
    let shown = node.display().to_string();
    match OpenOptions::new().read(true).write(true).open(node) {
        Ok(_) => Ok(()),
        Err(e) => Err(match (e.kind(), e.raw_os_error()) {
            (ErrorKind::NotFound, _) => SetupError::NoVfio {
                bdf: bdf.into(),
                path: shown,
            },
            (ErrorKind::PermissionDenied, _) => SetupError::NoPermission {
                bdf: bdf.into(),
                path: shown,
            },
            (_, Some(libc::EBUSY)) => SetupError::GroupBusy {
                bdf: bdf.into(),
                group,
                path: shown,
            },
            _ => SetupError::Open {
                bdf: bdf.into(),
                path: shown,
                source: e,
            },
        }),
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
