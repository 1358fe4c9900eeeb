//! `resources/testbed/tb-vfio-bind.sh`, the one helper every testbed test and script finds and
//! binds devices with, on a fake sysfs: it finds devices by ID, binds exactly those asked for
//! through driver_override (never new_id), prints their paths on stdout and a marker each on
//! stderr, and fails when there is nothing to bind. Runs with busybox sh, as in L1, when the host
//! has busybox (else with sh).

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;

const SCRIPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../resources/testbed/tb-vfio-bind.sh"
);

/// A sysfs with two NVMe controllers (00:03.0 bound to the nvme driver, 00:04.0 to none) and
/// an edu (00:05.0), in IOMMU groups 5, 6 and 7.
struct FakeSysfs {
    _dir: vmm_sys_util::tempdir::TempDir,
    root: PathBuf,
}

impl FakeSysfs {
    fn new() -> Self {
        Self::build().expect("build the fake sysfs")
    }

    fn build() -> std::io::Result<Self> {
        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/tb-vfio-bind")
            .map_err(std::io::Error::from)?;
        let root = dir.as_path().to_path_buf();
        let drivers = root.join("bus/pci/drivers");
        std::fs::create_dir_all(drivers.join("vfio-pci"))?;
        std::fs::write(drivers.join("vfio-pci/bind"), "")?;
        std::fs::create_dir_all(drivers.join("nvme"))?;
        std::fs::write(drivers.join("nvme/unbind"), "")?;
        let s = FakeSysfs { _dir: dir, root };
        s.device("0000:00:03.0", "0x1b36", "0x0010", Some("nvme"), 5)?;
        s.device("0000:00:04.0", "0x1b36", "0x0010", None, 6)?;
        s.device("0000:00:05.0", "0x1234", "0x11e8", None, 7)?;
        Ok(s)
    }

    fn dev(&self, bdf: &str) -> PathBuf {
        self.root.join("bus/pci/devices").join(bdf)
    }

    fn device(
        &self,
        bdf: &str,
        vendor: &str,
        device: &str,
        driver: Option<&str>,
        group: u32,
    ) -> std::io::Result<()> {
        let d = self.dev(bdf);
        std::fs::create_dir_all(&d)?;
        std::fs::write(d.join("vendor"), format!("{vendor}\n"))?;
        std::fs::write(d.join("device"), format!("{device}\n"))?;
        if let Some(drv) = driver {
            symlink(
                self.root.join("bus/pci/drivers").join(drv),
                d.join("driver"),
            )?;
        }
        let g = self.root.join(format!("kernel/iommu_groups/{group}"));
        std::fs::create_dir_all(&g)?;
        symlink(&g, d.join("iommu_group"))
    }

    fn read(&self, path: impl AsRef<Path>) -> String {
        std::fs::read_to_string(self.root.join(path)).unwrap_or_default()
    }

    fn override_of(&self, bdf: &str) -> String {
        std::fs::read_to_string(self.dev(bdf).join("driver_override")).unwrap_or_default()
    }

    /// Runs the script with `args`: exit status, stdout lines, stderr.
    fn run(&self, args: &[&str]) -> (i32, Vec<String>, String) {
        let mut cmd = if Path::new("/usr/bin/busybox").exists() {
            let mut c = Command::new("/usr/bin/busybox");
            c.arg("sh");
            c
        } else {
            Command::new("sh")
        };
        let out = cmd
            .arg(SCRIPT)
            .args(args)
            .env("TB_SYSFS", &self.root)
            .output()
            .expect("run tb-vfio-bind.sh");
        let stdout = String::from_utf8_lossy(&out.stdout);
        (
            out.status.code().unwrap_or(-1),
            stdout.lines().map(str::to_string).collect(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

#[test]
fn find_lists_the_devices_with_an_id_and_binds_nothing() {
    let s = FakeSysfs::new();
    let (rc, paths, _) = s.run(&["--find", "1b36:0010"]);
    assert_eq!(rc, 0);
    let want: Vec<String> = ["0000:00:03.0", "0000:00:04.0"]
        .iter()
        .map(|b| s.dev(b).display().to_string())
        .collect();
    assert_eq!(paths, want);
    assert_eq!(s.override_of("0000:00:03.0"), "");
    assert_eq!(s.read("bus/pci/drivers/vfio-pci/bind"), "");
}

#[test]
fn first_binds_only_the_first_device_through_driver_override_and_marks_it() {
    let s = FakeSysfs::new();
    let (rc, paths, stderr) = s.run(&["--first", "1b36:0010"]);
    assert_eq!(rc, 0, "{stderr}");
    assert_eq!(paths, vec![s.dev("0000:00:03.0").display().to_string()]);
    assert_eq!(
        s.read("bus/pci/drivers/nvme/unbind").trim(),
        "0000:00:03.0",
        "unbound from its host driver first"
    );
    assert_eq!(s.override_of("0000:00:03.0").trim(), "vfio-pci");
    assert_eq!(
        s.read("bus/pci/drivers/vfio-pci/bind").trim(),
        "0000:00:03.0"
    );
    assert_eq!(
        s.override_of("0000:00:04.0"),
        "",
        "the second is left alone"
    );
    assert!(
        stderr.contains("@@TB L1 vfio-bound bdf=0000:00:03.0 id=1b36:0010 group=/dev/vfio/5"),
        "{stderr}"
    );
    assert!(!s.root.join("bus/pci/drivers/vfio-pci/new_id").exists());
}

#[test]
fn without_an_option_every_device_with_the_id_is_bound_and_no_other() {
    let s = FakeSysfs::new();
    let (rc, paths, stderr) = s.run(&["1b36:0010"]);
    assert_eq!(rc, 0, "{stderr}");
    assert_eq!(paths.len(), 2);
    for bdf in ["0000:00:03.0", "0000:00:04.0"] {
        assert_eq!(s.override_of(bdf).trim(), "vfio-pci", "{bdf}");
    }
    assert_eq!(
        s.override_of("0000:00:05.0"),
        "",
        "the edu keeps no override"
    );
    assert_eq!(stderr.matches("@@TB L1 vfio-bound").count(), 2);
}

#[test]
fn an_id_no_device_has_fails_with_a_message() {
    let s = FakeSysfs::new();
    let (rc, paths, stderr) = s.run(&["8086:1234"]);
    assert_eq!(rc, 1);
    assert!(paths.is_empty());
    assert!(
        stderr.contains("no device 8086:1234 bound to vfio-pci"),
        "{stderr}"
    );
    let (rc, _, stderr) = s.run(&["--find", "8086:1234"]);
    assert_eq!(rc, 1);
    assert!(stderr.contains("no device 8086:1234"), "{stderr}");
}
