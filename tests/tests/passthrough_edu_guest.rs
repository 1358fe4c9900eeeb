//! A small guest of ours (not Linux) drives QEMU's `edu` passed through by the vmm library in
//! the testbed's L1: DMA from guest RAM to the device buffer and back, each completion an MSI
//! taken by the guest's own interrupt handler; the data must round-trip exactly
//! (`tests/examples/edu_guest.rs`). It runs twice: the second run only works if the first
//! released the device (group, DMA mappings, interrupts) and left it reset.

use integration::testbed::{self, Scenario, TestbedError};

const SCRIPT: &str = r#"
for d in /sys/bus/pci/devices/*; do
  [ "$(cat $d/vendor):$(cat $d/device)" = "0x1234:0x11e8" ] && edu=$d && break
done
echo vfio-pci >"$edu/driver_override"
echo "${edu##*/}" >/sys/bus/pci/drivers/vfio-pci/bind
for run in 1 2; do
  /testbed/bin/edu_guest "$edu"
  echo "@@TB L1 edu-guest-rc run=$run rc=$?"
done
"#;

#[test]
fn small_guest_drives_edu_dma_both_ways_with_completion_msis() -> Result<(), TestbedError> {
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
    out.ensure(
        runs.len() == 2,
        format!("want 2 edu-guest runs, got {}", runs.len()),
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
            field("msis") == "2",
            format!("want 2 completion MSIs: {}", m.raw),
        )?;
        out.ensure(
            field("dma") == "ok",
            format!("data did not round-trip: {}", m.raw),
        )?;
    }
    Ok(())
}
