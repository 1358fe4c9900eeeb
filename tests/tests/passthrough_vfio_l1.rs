//! The passthrough crate on real VFIO, in the testbed's L1 (no VM): the set-up error cases each
//! give their one-line fix, and QEMU's edu device does a DMA round trip through a container
//! mapped by `HostDmaMappings`, with its completion MSI on a VFIO eventfd.
//!
//! One L1 run serves every test (`run_shared`). L0 adds a PCIe-to-PCI bridge with a second
//! edu and a serial card behind it: one IOMMU group where the serial card keeps its host
//! driver, so the edu there cannot be assigned.

use std::sync::Arc;

use integration::testbed::{self, Outcome, Scenario, TestbedError};

const SCRIPT: &str = r#"
NVME=$(tb-vfio-bind --find 1b36:0010 | head -n1)
EDU=$(tb-vfio-bind --find 1234:11e8 | grep 0000:00: | head -n1)
EDU2=$(tb-vfio-bind --find 1234:11e8 | grep -v 0000:00: | head -n1)
echo "@@TB L1 probe-devices nvme=$NVME edu=$EDU edu2=$EDU2"
for d in /sys/bus/pci/devices/*; do
  echo "L1 pci ${d##*/} $(cat $d/vendor):$(cat $d/device) driver=$(basename "$(readlink $d/driver)") group=$(basename "$(readlink $d/iommu_group)")"
done
case_() {
  name=$1; shift
  out=$(/testbed/bin/vfio_probe "$@" 2>&1)
  rc=$?
  echo "@@TB L1 probe case=$name rc=$rc"
  echo "L1 probe $name: $out"
}
case_ missing check /sys/bus/pci/devices/0000:00:1f.7
case_ unbound check "$NVME"
tb-vfio-bind 1b36:0010 >/dev/null
tb-vfio-bind 1234:11e8 >/dev/null
case_ bound check "$NVME"
case_ noperm check "$NVME" 1000
case_ group check "$EDU2"
mount -t tmpfs tmpfs /dev/vfio
case_ novfio check "$NVME"
umount /dev/vfio
case_ edu edu "$EDU"
case_ edu-again edu "$EDU"
"#;

fn outcome() -> Result<Option<Arc<Outcome>>, TestbedError> {
    let Some(tb) = testbed::require() else {
        return Ok(None);
    };
    let probe = tb.cargo_release(
        &["-p", "passthrough", "--example", "vfio_probe"],
        "examples/vfio_probe",
    )?;
    let s = Scenario::l1_script("passthrough-vfio-probe", SCRIPT)
        .file(probe, "/testbed/bin/vfio_probe")
        .l0_arg("-device")
        .l0_arg("pcie-pci-bridge,id=br1,bus=pcie.0")
        .l0_arg("-device")
        .l0_arg("edu,bus=br1,addr=1")
        .l0_arg("-device")
        .l0_arg("pci-serial,bus=br1,addr=2");
    tb.run_shared(&s).map(Some)
}

/// The probe's output line for case `name`, and its exit code.
fn case(out: &Outcome, name: &str) -> Result<(i32, String), TestbedError> {
    let m = out
        .markers_named("L1", "probe")
        .find(|m| m.fields.get("case").map(String::as_str) == Some(name))
        .ok_or_else(|| out.error(format!("no probe case={name} marker")))?;
    let rc = m
        .fields
        .get("rc")
        .and_then(|r| r.parse().ok())
        .unwrap_or(-1);
    let prefix = format!("L1 probe {name}: ");
    let line = out
        .lines
        .iter()
        .find_map(|l| {
            l.text
                .find(&prefix)
                .map(|i| l.text[i + prefix.len()..].to_string())
        })
        .unwrap_or_default();
    Ok((rc, line))
}

fn expect_error(name: &str, needles: &[&str]) -> Result<(), TestbedError> {
    let Some(out) = outcome()? else { return Ok(()) };
    let (rc, line) = case(&out, name)?;
    out.ensure(rc == 1, format!("case {name}: exit {rc}, want 1 ({line})"))?;
    for n in needles {
        out.ensure(
            line.contains(n),
            format!("case {name}: {line:?} lacks {n:?}"),
        )?;
    }
    Ok(())
}

#[test]
fn missing_device_path_names_it_and_how_to_list() -> Result<(), TestbedError> {
    expect_error(
        "missing",
        &[
            "0000:00:1f.7",
            "no such PCI device",
            "ls /sys/bus/pci/devices",
        ],
    )
}

#[test]
fn device_not_bound_to_vfio_gets_the_bind_commands() -> Result<(), TestbedError> {
    expect_error(
        "unbound",
        &[
            "(1b36:0010)",
            "not vfio-pci",
            "/driver_override; echo 0000:",
            "> /sys/bus/pci/drivers/vfio-pci/bind",
        ],
    )
}

#[test]
fn bound_device_passes_the_checks() -> Result<(), TestbedError> {
    let Some(out) = outcome()? else { return Ok(()) };
    let (rc, line) = case(&out, "bound")?;
    out.ensure(
        rc == 0 && line.contains("probe ok"),
        format!("bound: {rc} {line}"),
    )
}

#[test]
fn unprivileged_user_is_told_about_permissions() -> Result<(), TestbedError> {
    expect_error(
        "noperm",
        &["no permission to open /dev/vfio/", "run as root"],
    )
}

#[test]
fn group_shared_with_a_host_driver_is_not_viable() -> Result<(), TestbedError> {
    expect_error("group", &["is not viable", "bound to serial"])
}

#[test]
fn absent_dev_vfio_says_to_load_vfio() -> Result<(), TestbedError> {
    expect_error("novfio", &["/dev/vfio/vfio is absent", "modprobe vfio-pci"])
}

#[test]
fn edu_dma_round_trips_through_container_dma_with_its_msi() -> Result<(), TestbedError> {
    let Some(out) = outcome()? else { return Ok(()) };
    for name in ["edu", "edu-again"] {
        let (rc, line) = case(&out, name)?;
        out.ensure(
            rc == 0 && line.contains("dma=ok msi=ok"),
            format!(
                "{name}: exit {rc}: {line} (a second run proves set-up and teardown are clean)"
            ),
        )?;
    }
    Ok(())
}
