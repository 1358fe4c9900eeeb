//! L2 Linux with Intel's IOMMU driver on our virtual VT-d (`--viommu`), in the nested testbed:
//! the driver finds the unit through our DMAR table, enables queued invalidation and
//! translation, puts the PCI devices into IOMMU groups, and every invalidation it sends goes
//! through our queue (the counters `--stats-json` writes at exit say so), keeping the protocol
//! the checker follows.

use integration::testbed::{self, viommu, Outcome, TestbedError};
use vmm::arch::x86_64::layout::VTD_REGS_START;

/// Boots L2 with `intel_iommu=on` under `vmm --viommu VIOMMU_ARGS` and prints the stats JSON.
fn run(name: &str, viommu_args: &str, l2_args: &[&str]) -> Result<Option<Outcome>, TestbedError> {
    let Some(tb) = testbed::require() else {
        return Ok(None);
    };
    let s = viommu::l2_on_our_vtd(name, viommu_args, l2_args, "iommu", false);
    Ok(Some(tb.run(&s)?))
}

/// The JSON the vmm wrote, from the `@@TB L1 stats` marker.
fn stats(out: &Outcome) -> Result<String, TestbedError> {
    out.vmm_stats()
}

#[test]
fn l2_linux_enables_intel_iommu_on_our_vtd_and_invalidates_through_its_queue(
) -> Result<(), TestbedError> {
    let Some(out) = run("viommu-linux-strict", "", &["intel_iommu=on"])? else {
        return Ok(());
    };
    out.ensure(out.vmm_exit()? == 0, "the vmm did not exit 0")?;
    // Linux prints the unit's register base as %#016Lx.
    let drhd = format!("DMAR: DRHD base: {VTD_REGS_START:#016x} flags: 0x1");
    for needle in [
        "DMAR: IOMMU enabled",
        "DMAR: Host address width 48",
        drhd.as_str(),
        "Using Queued invalidation",
        "Intel(R) Virtualization Technology for Directed I/O",
    ] {
        out.ensure(
            out.console_contains(needle),
            format!("no '{needle}' in dmesg"),
        )?;
    }
    viommu::ensure_driver_grouped_devices(&out)?;
    let json = stats(&out)?;
    let descriptors = out.stats_counter("descriptors").unwrap_or(0);
    let waits = out.stats_counter("waits").unwrap_or(0);
    out.ensure(descriptors > 0, format!("no descriptors counted: {json}"))?;
    out.ensure(waits > 0, format!("no waits counted: {json}"))?;
    out.ensure(
        json.contains("\"flush\":\"strict\""),
        "flush mode not reported",
    )?;
    viommu::no_violations(&out)
}

#[test]
fn l2_linux_boots_on_our_vtd_in_deferred_mode_and_with_iommu_off() -> Result<(), TestbedError> {
    let Some(out) = run(
        "viommu-linux-deferred",
        "flush=deferred,aw-bits=39",
        &["intel_iommu=on"],
    )?
    else {
        return Ok(());
    };
    out.ensure(out.vmm_exit()? == 0, "the vmm did not exit 0")?;
    out.ensure(
        out.console_contains("DMAR: Host address width 39"),
        "39-bit width not announced",
    )?;
    out.ensure(
        out.console_contains("Intel(R) Virtualization Technology for Directed I/O"),
        "the driver did not come up",
    )?;
    out.ensure(
        stats(&out)?.contains("\"flush\":\"deferred\""),
        "flush mode not reported",
    )?;
    viommu::no_violations(&out)?;

    // Without its IOMMU drivers: neither DMA nor interrupt remapping.
    let Some(off) = run("viommu-linux-off", "", &["intel_iommu=off", "intremap=off"])? else {
        return Ok(());
    };
    off.ensure(
        off.vmm_exit()? == 0,
        "the vmm did not exit 0 with intel_iommu=off",
    )?;
    let json = stats(&off)?;
    off.ensure(
        off.stats_counter("descriptors").ok() == Some(0),
        format!("a guest with intel_iommu=off sent descriptors: {json}"),
    )
}
