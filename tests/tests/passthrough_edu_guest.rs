//! A small guest of ours (not Linux) drives QEMU's `edu` passed through by the vmm library in
//! the testbed's L1: DMA from guest RAM to the device buffer and back, each completion an
//! interrupt taken by the guest's own handler; the data must round-trip exactly
//! (`tests/examples/edu_guest.rs`). Three runs: MSI, INTx (level, through the IOAPIC with
//! KVM's resample fd), MSI again; each later run only works if the one before released the
//! device (group, DMA mappings, interrupts) and left it reset. A fourth run puts edu behind our
//! virtual VT-d: the guest's tables decide what the device reaches, a write to an IOVA they do
//! not map leaves guest memory untouched (L1's IOMMU blocks it), and the device works after.
//! Then INTx and MSI once more with the split irqchip: the IOAPIC the guest programs is the
//! vmm's, which routes the line and signals its resample eventfd at each EOI (issue 11).

use integration::testbed::{self, Scenario, TestbedError};

const SCRIPT: &str = r#"
edu=$(tb-vfio-bind --first 1234:11e8) || exit 1
for mode in msi intx msi viommu intx-split msi-split; do
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
    let want = ["msi", "intx", "msi", "viommu", "intx-split", "msi-split"];
    out.ensure(modes == want, format!("want runs {want:?}; got {modes:?}"))?;
    for m in runs {
        let behind_vtd = m.fields.get("mode").map(String::as_str) == Some("viommu");
        let field = |k: &str| m.fields.get(k).cloned().unwrap_or_default();
        out.ensure(
            field("exit") == "Ok(PowerOff)",
            format!("guest did not power off: {}", m.raw),
        )?;
        out.ensure(
            field("status") == "0x600d",
            format!("guest stopped at a step: {}", m.raw),
        )?;
        let want_irqs = if behind_vtd { "5" } else { "2" };
        out.ensure(
            field("irqs") == want_irqs,
            format!("want {want_irqs} completion interrupts: {}", m.raw),
        )?;
        if behind_vtd {
            out.ensure(
                field("canary") == "ok",
                format!("a DMA to an unmapped IOVA reached guest memory: {}", m.raw),
            )?;
            out.ensure(
                field("dma2") == "ok",
                format!("the device did not work after the blocked DMA: {}", m.raw),
            )?;
        }
        out.ensure(
            field("dma") == "ok",
            format!("data did not round-trip: {}", m.raw),
        )?;
    }
    // L1's IOMMU recorded the blocked write of the viommu run, at the canary's address.
    out.ensure(
        out.console_contains("fault addr 0x320000"),
        "L1's IOMMU logged no fault for the DMA to the unmapped IOVA",
    )?;
    Ok(())
}
