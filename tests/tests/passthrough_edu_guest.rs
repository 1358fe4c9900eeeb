//! A small guest of ours (not Linux) drives QEMU's `edu` passed through by the vmm library in
//! the testbed's L1: DMA from guest RAM to the device buffer and back, each completion an
//! interrupt taken by the guest's own handler; the data must round-trip exactly
//! (`tests/examples/edu_guest.rs`). Three runs: MSI, INTx (level, through the IOAPIC with
//! KVM's resample fd), MSI again; each later run only works if the one before released the
//! device (group, DMA mappings, interrupts) and left it reset.

use integration::testbed::{self, Scenario, TestbedError};

const SCRIPT: &str = r#"
for d in /sys/bus/pci/devices/*; do
  [ "$(cat $d/vendor):$(cat $d/device)" = "0x1234:0x11e8" ] && edu=$d && break
done
echo vfio-pci >"$edu/driver_override"
echo "${edu##*/}" >/sys/bus/pci/drivers/vfio-pci/bind
for mode in msi intx msi; do
  /testbed/bin/edu_guest "$edu" $mode
  echo "@@TB L1 edu-guest-rc mode=$mode rc=$?"
done
"#;

#[test]
fn small_guest_drives_edu_dma_both_ways_with_msi_and_with_intx() -> Result<(), TestbedError> {
    let Some(tb) = testbed::require() else {
        return Ok(());
    };
    let bin = tb.cargo_release(
        &["-p", "integration", "--example", "edu_guest"],
        "examples/edu_guest",
    )?;
    let out = tb.run(
        &Scenario::l1_script("passthrough-edu-guest", SCRIPT).file(bin, "/testbed/bin/edu_guest"),
    )?;
    let runs: Vec<_> = out.markers_named("L1", "edu-guest").collect();
    let modes: Vec<&str> = runs
        .iter()
        .map(|m| m.fields.get("mode").map_or("?", String::as_str))
        .collect();
    out.ensure(
        modes == ["msi", "intx", "msi"],
        format!("want runs msi, intx, msi; got {modes:?}"),
    )?;
    for m in runs {
        let field = |k: &str| m.fields.get(k).cloned().unwrap_or_default();
        out.ensure(
            field("exit") == "Ok(PowerOff)",
            format!("guest did not power off: {}", m.raw),
        )?;
        out.ensure(
            field("status") == "0x600d",
            format!("guest stopped at a step: {}", m.raw),
        )?;
        out.ensure(
            field("irqs") == "2",
            format!("want 2 completion interrupts: {}", m.raw),
        )?;
        out.ensure(
            field("dma") == "ok",
            format!("data did not round-trip: {}", m.raw),
        )?;
    }
    Ok(())
}
