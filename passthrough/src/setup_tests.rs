use std::os::unix::fs::symlink;

use vmm_sys_util::tempdir::TempDir;

use super::*;

/// A fake sysfs and /dev: one NVMe at 0000:00:04.0 in group 5.
struct Tree {
    _dir: TempDir,
    root: PathBuf,
}

impl Tree {
    fn new() -> Tree {
        let dir = TempDir::new_with_prefix("/tmp/passthrough-setup").unwrap();
        let root = dir.as_path().to_path_buf();
        let t = Tree { _dir: dir, root };
        t.device("0000:00:04.0", Some("vfio-pci"));
        std::fs::create_dir_all(t.root.join("kernel/iommu_groups/5/devices")).unwrap();
        t.join_group("0000:00:04.0", 5);
        std::fs::create_dir_all(t.root.join("dev/vfio")).unwrap();
        std::fs::write(t.root.join("dev/vfio/vfio"), b"").unwrap();
        std::fs::write(t.root.join("dev/vfio/5"), b"").unwrap();
        t
    }

    fn dev(&self, bdf: &str) -> PathBuf {
        self.root.join("devices").join(bdf)
    }

    fn device(&self, bdf: &str, driver: Option<&str>) {
        let d = self.dev(bdf);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("config"), [0u8; 256]).unwrap();
        std::fs::write(d.join("vendor"), "0x1b36\n").unwrap();
        std::fs::write(d.join("device"), "0x0010\n").unwrap();
        self.bind(bdf, driver);
    }

    fn bind(&self, bdf: &str, driver: Option<&str>) {
        let link = self.dev(bdf).join("driver");
        let _ = std::fs::remove_file(&link);
        if let Some(drv) = driver {
            let target = self.root.join("drivers").join(drv);
            std::fs::create_dir_all(&target).unwrap();
            symlink(target, link).unwrap();
        }
    }

    fn join_group(&self, bdf: &str, group: u32) {
        let g = self.root.join(format!("kernel/iommu_groups/{group}"));
        symlink(&g, self.dev(bdf).join("iommu_group")).unwrap();
        symlink(self.dev(bdf), g.join("devices").join(bdf)).unwrap();
    }

    fn paths(&self) -> HostPaths {
        HostPaths {
            dev: self.root.join("dev"),
        }
    }

    fn check(&self, bdf: &str) -> Result<Checked, SetupError> {
        check(&self.paths(), &self.dev(bdf))
    }
}

#[test]
fn a_vfio_bound_device_in_a_viable_group_passes() {
    let t = Tree::new();
    let c = t.check("0000:00:04.0").unwrap();
    assert_eq!((c.bdf.as_str(), c.group), ("0000:00:04.0", 5));
}

#[test]
fn missing_path_says_how_to_list_devices() {
    let t = Tree::new();
    let e = t.check("0000:00:09.0").unwrap_err();
    assert!(matches!(e, SetupError::PathMissing { .. }), "{e}");
    assert!(e.to_string().contains("ls /sys/bus/pci/devices"), "{e}");
}

#[test]
fn a_path_that_is_not_a_pci_address_is_refused() {
    let t = Tree::new();
    let e = check(&t.paths(), &t.root.join("dev")).unwrap_err();
    assert!(matches!(e, SetupError::NotPciAddress { .. }), "{e}");
}

#[test]
fn a_device_on_its_host_driver_gets_the_bind_commands() {
    let t = Tree::new();
    t.bind("0000:00:04.0", Some("nvme"));
    let e = t.check("0000:00:04.0").unwrap_err().to_string();
    assert!(e.contains("bound to nvme, not vfio-pci"), "{e}");
    assert!(e.contains("(1b36:0010)"), "names the device's ID: {e}");
    assert!(
        e.contains(
            "echo vfio-pci > /sys/bus/pci/devices/0000:00:04.0/driver_override; \
             echo 0000:00:04.0 > /sys/bus/pci/drivers/vfio-pci/bind"
        ),
        "{e}"
    );
    assert!(
        !e.contains("new_id"),
        "new_id would grab every device with the ID: {e}"
    );
    assert!(
        e.contains("/sys/bus/pci/devices/0000:00:04.0/driver/unbind"),
        "{e}"
    );
    t.bind("0000:00:04.0", None);
    let e = t.check("0000:00:04.0").unwrap_err().to_string();
    assert!(e.contains("bound to no driver"), "{e}");
    assert!(!e.contains("unbind"), "nothing to unbind: {e}");
}

#[test]
fn a_group_shared_with_a_host_driver_is_not_viable() {
    let t = Tree::new();
    t.device("0000:00:04.1", Some("e1000e"));
    t.join_group("0000:00:04.1", 5);
    t.device("0000:00:04.2", Some("vfio-pci"));
    t.join_group("0000:00:04.2", 5);
    let e = t.check("0000:00:04.0").unwrap_err();
    assert!(
        matches!(e, SetupError::GroupNotViable { group: 5, .. }),
        "{e}"
    );
    assert!(
        e.to_string().contains("0000:00:04.1 (bound to e1000e)"),
        "{e}"
    );
    assert!(!e.to_string().contains("0000:00:04.2"), "{e}");
}

#[test]
fn no_iommu_group_says_to_enable_the_iommu() {
    let t = Tree::new();
    std::fs::remove_file(t.dev("0000:00:04.0").join("iommu_group")).unwrap();
    let e = t.check("0000:00:04.0").unwrap_err().to_string();
    assert!(e.contains("intel_iommu=on"), "{e}");
}

#[test]
fn absent_dev_vfio_says_to_load_vfio() {
    let t = Tree::new();
    std::fs::remove_dir_all(t.root.join("dev/vfio")).unwrap();
    let e = t.check("0000:00:04.0").unwrap_err();
    assert!(matches!(e, SetupError::NoVfio { .. }), "{e}");
    assert!(e.to_string().contains("modprobe vfio-pci"), "{e}");
}

#[test]
fn an_unreadable_group_node_is_a_permission_error() {
    // Root ignores file modes; the check is only meaningful for other users.
    // SAFETY: geteuid only reads the process's credentials.
    if unsafe { libc::geteuid() } == 0 {
        eprintln!("skipping: running as root, file modes do not apply");
        return;
    }
    let t = Tree::new();
    use std::os::unix::fs::PermissionsExt;
    let node = t.root.join("dev/vfio/5");
    std::fs::set_permissions(&node, std::fs::Permissions::from_mode(0o000)).unwrap();
    let e = t.check("0000:00:04.0").unwrap_err();
    assert!(matches!(e, SetupError::NoPermission { .. }), "{e}");
}

#[test]
fn a_missing_group_node_is_reported_as_vfio_absent() {
    let t = Tree::new();
    std::fs::remove_file(t.root.join("dev/vfio/5")).unwrap();
    let e = t.check("0000:00:04.0").unwrap_err();
    assert!(matches!(e, SetupError::NoVfio { .. }), "{e}");
}

#[test]
fn bdf_syntax() {
    assert!(is_bdf("0000:00:04.0"));
    assert!(!is_bdf("0000:00:04.8"));
    assert!(!is_bdf("00:04.0"));
    assert!(!is_bdf("0000:0g:04.0"));
}

impl Tree {
    /// What a host with iommufd shows: /dev/iommu, the device's sysfs `vfio-dev/vfio0` and
    /// its node /dev/vfio/devices/vfio0.
    fn with_iommufd(self) -> Tree {
        std::fs::write(self.root.join("dev/iommu"), b"").unwrap();
        std::fs::create_dir_all(self.dev("0000:00:04.0").join("vfio-dev/vfio0")).unwrap();
        std::fs::create_dir_all(self.root.join("dev/vfio/devices")).unwrap();
        std::fs::write(self.root.join("dev/vfio/devices/vfio0"), b"").unwrap();
        self
    }

    fn select(&self, requested: Option<Backend>) -> Result<Selected, SetupError> {
        select(&self.paths(), &self.dev("0000:00:04.0"), requested)
    }
}

#[test]
fn the_default_takes_iommufd_where_the_host_has_it_for_the_device() {
    let t = Tree::new().with_iommufd();
    let s = t.select(None).unwrap();
    let cdev = t.root.join("dev/vfio/devices/vfio0");
    assert_eq!(s.route, Route::Iommufd { cdev: cdev.clone() });
    assert_eq!(s.route.backend(), Backend::Iommufd);
    assert_eq!(
        (s.checked.bdf.as_str(), s.checked.group),
        ("0000:00:04.0", 5)
    );
    assert!(s.why.contains(&cdev.display().to_string()), "{}", s.why);
}

#[test]
fn iommufd_needs_no_group_node_nor_container() {
    // A kernel without CONFIG_VFIO_GROUP has neither /dev/vfio/vfio nor /dev/vfio/N.
    let t = Tree::new().with_iommufd();
    std::fs::remove_file(t.root.join("dev/vfio/vfio")).unwrap();
    std::fs::remove_file(t.root.join("dev/vfio/5")).unwrap();
    assert_eq!(
        t.select(Some(Backend::Iommufd)).unwrap().route.backend(),
        Backend::Iommufd
    );
    let e = t.select(Some(Backend::Container)).unwrap_err();
    assert!(matches!(e, SetupError::NoVfio { .. }), "{e}");
}

#[test]
fn the_default_falls_back_to_the_container_saying_why() {
    let t = Tree::new().with_iommufd();
    std::fs::remove_file(t.root.join("dev/iommu")).unwrap();
    let s = t.select(None).unwrap();
    assert_eq!(s.route, Route::Container);
    assert!(s.why.contains("modprobe iommufd"), "{}", s.why);
    assert!(s.why.contains("CONFIG_IOMMUFD"), "{}", s.why);

    let t = Tree::new().with_iommufd();
    std::fs::remove_dir_all(t.dev("0000:00:04.0").join("vfio-dev")).unwrap();
    let s = t.select(None).unwrap();
    assert_eq!(s.route, Route::Container);
    assert!(s.why.contains("CONFIG_VFIO_DEVICE_CDEV"), "{}", s.why);

    // The fallback still runs the container's checks.
    std::fs::remove_file(t.root.join("dev/vfio/5")).unwrap();
    let e = t.select(None).unwrap_err();
    assert!(matches!(e, SetupError::NoVfio { .. }), "{e}");
}

#[test]
fn backend_container_keeps_the_container_on_an_iommufd_host() {
    let t = Tree::new().with_iommufd();
    let s = t.select(Some(Backend::Container)).unwrap();
    assert_eq!(s.route, Route::Container);
    assert_eq!(s.why, "backend=container");
}

#[test]
fn backend_iommufd_without_dev_iommu_says_load_it_or_use_the_container() {
    let t = Tree::new();
    let e = t.select(Some(Backend::Iommufd)).unwrap_err();
    assert!(
        matches!(
            e,
            SetupError::NoIommufd {
                reason: NoIommufd::NoDevIommu { .. },
                ..
            }
        ),
        "{e}"
    );
    let e = e.to_string();
    assert!(e.starts_with("device 0000:00:04.0: no iommufd: "), "{e}");
    assert!(e.contains("modprobe iommufd"), "{e}");
    assert!(e.contains("CONFIG_IOMMUFD"), "{e}");
    assert!(e.ends_with("or use backend=container"), "{e}");
}

#[test]
fn backend_iommufd_for_a_device_without_a_device_file_names_the_kernel_option() {
    let t = Tree::new().with_iommufd();
    std::fs::remove_dir_all(t.dev("0000:00:04.0").join("vfio-dev")).unwrap();
    let e = t.select(Some(Backend::Iommufd)).unwrap_err();
    assert!(
        matches!(
            e,
            SetupError::NoIommufd {
                reason: NoIommufd::NoDeviceFile { .. },
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("CONFIG_VFIO_DEVICE_CDEV"), "{e}");
    assert!(e.to_string().contains("vfio-dev"), "{e}");
}

#[test]
fn a_device_file_sysfs_lists_but_dev_lacks_says_to_have_udev_create_it() {
    let t = Tree::new().with_iommufd();
    std::fs::remove_file(t.root.join("dev/vfio/devices/vfio0")).unwrap();
    let e = t.select(Some(Backend::Iommufd)).unwrap_err();
    assert!(
        matches!(
            e,
            SetupError::NoIommufd {
                reason: NoIommufd::NoDeviceNode { .. },
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("devices/vfio0 is absent"), "{e}");
    assert!(e.to_string().contains("udevadm trigger"), "{e}");
}

#[test]
fn iommufd_still_needs_vfio_pci_and_a_viable_group() {
    let t = Tree::new().with_iommufd();
    t.device("0000:00:04.1", Some("e1000e"));
    t.join_group("0000:00:04.1", 5);
    let e = t.select(Some(Backend::Iommufd)).unwrap_err();
    assert!(
        matches!(e, SetupError::GroupNotViable { group: 5, .. }),
        "{e}"
    );
    let t = Tree::new().with_iommufd();
    t.bind("0000:00:04.0", Some("nvme"));
    let e = t.select(None).unwrap_err();
    assert!(matches!(e, SetupError::NotBoundToVfio { .. }), "{e}");
}

#[test]
fn unreadable_iommufd_nodes_are_permission_errors_naming_the_file() {
    // SAFETY: geteuid only reads the process's credentials.
    if unsafe { libc::geteuid() } == 0 {
        eprintln!("skipping: running as root, file modes do not apply");
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    for node in ["dev/iommu", "dev/vfio/devices/vfio0"] {
        let t = Tree::new().with_iommufd();
        let path = t.root.join(node);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o000)).unwrap();
        let e = t.select(None).unwrap_err();
        assert!(matches!(e, SetupError::NoPermission { .. }), "{e}");
        assert!(
            e.to_string()
                .contains(&format!("chown USER {}", path.display())),
            "{e}"
        );
    }
}

#[test]
fn a_busy_device_file_names_the_other_holder() {
    let t = Tree::new().with_iommufd();
    let c = t.check("0000:00:04.0").unwrap();
    let cdev = t.root.join("dev/vfio/devices/vfio0");
    let busy = std::io::Error::from_raw_os_error(libc::EBUSY);
    let e = open_error(&c, &cdev, Backend::Iommufd, busy);
    assert!(matches!(e, SetupError::DeviceBusy { group: 5, .. }), "{e}");
    let e = e.to_string();
    assert!(e.contains("is busy: another process"), "{e}");
    assert!(e.contains("/dev/vfio/5"), "{e}");
    let denied = std::io::Error::from_raw_os_error(libc::EACCES);
    let e = open_error(&c, &cdev, Backend::Iommufd, denied);
    assert!(matches!(e, SetupError::NoPermission { .. }), "{e}");
}
