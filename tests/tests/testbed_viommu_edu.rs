//! L2 Linux 6.1 drives the vmm's emulated edu (`--edu`) behind our VT-d with caching mode off,
//! the path its intel-iommu driver takes on hardware: a VFIO user in L2 (`/tb/bin/edu-dma`, the
//! `edu-dma` action) maps a source and a destination page, has edu copy one into the other, and
//! unmaps them, round after round at the same IOVAs. edu's DMA goes through the unit's IOTLB;
//! the driver invalidates on unmap only, and the protocol checker finds nothing to report. The
//! same run in caching mode shows the difference: the driver invalidates every map too.

use integration::testbed::{self, viommu, Outcome, TestbedError};

/// Rounds of map, copy, unmap, compare; each round maps and unmaps two pages.
const ROUNDS: u64 = 64;

/// CAP.CM, caching mode (VT-d spec 11.4.2).
const CAP_CM: u64 = 1 << 7;

/// What Linux 6.1's intel-iommu driver logs when it finds caching mode (and goes strict).
const CM_PATH_MESSAGE: &str = "IOMMU batching disallowed due to virtualization";

/// Boots L2 under `vmm --edu --viommu VIOMMU_ARGS` running the edu-dma action, and checks what
/// every run must show: the vmm exited 0, the driver grouped edu, each round copied its page
/// exactly, no DMA faulted and the protocol checker found no violation. Returns the outcome and
/// the page-selective IOTLB invalidations counted.
fn run_rounds(name: &str, viommu_args: &str) -> Result<Option<(Outcome, u64)>, TestbedError> {
    let Some(tb) = testbed::require() else {
        return Ok(None);
    };
    let out = tb.run(&viommu::edu_dma_on_our_vtd(name, viommu_args, ROUNDS))?;
    out.ensure(out.vmm_exit()? == 0, "the vmm did not exit 0")?;
    viommu::ensure_driver_grouped_devices(&out)?;
    let (rounds, ok) = viommu::edu_dma_rounds(&out)?;
    out.ensure(
        rounds == ROUNDS && ok == ROUNDS,
        format!("edu copied {ok} of {rounds} rounds exactly"),
    )?;

    let json = out.vmm_stats()?;
    // edu's requests went through the IOTLB: each unmap emptied it, so each DMA missed and
    // walked the tables the driver had just written.
    let misses = out.stats_counter("caches.iotlb.misses")?;
    out.ensure(
        misses >= 2 * ROUNDS,
        format!("{misses} IOTLB misses for {ROUNDS} rounds of 2 DMAs: {json}"),
    )?;
    out.ensure(
        out.stats_counter("faults")? == 0,
        format!("edu's DMA faulted: {json}"),
    )?;
    viommu::no_violations(&out)?;
    let psi = out.stats_counter("descriptors_by_type.iotlb_page")?;
    Ok(Some((out, psi)))
}

/// CAP as the guest's driver read it (the `iommu-unit` marker).
fn cap_read(out: &Outcome) -> Result<u64, TestbedError> {
    let unit = out.expect_marker("L2", "iommu-unit")?;
    unit.field("cap")
        .and_then(|c| u64::from_str_radix(c.trim_start_matches("0x"), 16).ok())
        .ok_or_else(|| out.error(format!("no CAP in {}", unit.raw)))
}

#[test]
fn l2_linux_maps_for_our_edu_without_invalidating_when_caching_mode_is_off_and_dma_is_exact(
) -> Result<(), TestbedError> {
    let Some((out, psi)) = run_rounds("viommu-edu-cm-off", "caching-mode=off")? else {
        return Ok(());
    };
    // The guest read a unit without caching mode, and its driver did not take the
    // virtualization path.
    let cap = cap_read(&out)?;
    out.ensure(
        cap & CAP_CM == 0,
        format!("the guest read CAP.CM set: {cap:#x}"),
    )?;
    out.ensure(
        !out.console_contains(CM_PATH_MESSAGE),
        "the driver took the caching-mode path",
    )?;
    let json = out.vmm_stats()?;
    out.ensure(
        json.contains("\"caching_mode\":false"),
        format!("caching mode not reported off: {json}"),
    )?;
    // One page-selective invalidation per unmapped page and none for the maps (a few more
    // for the rest of the boot): caching mode would add one per map, 4 per round in all.
    out.ensure(
        (2 * ROUNDS..3 * ROUNDS).contains(&psi),
        format!(
            "{psi} page-selective IOTLB invalidations for {ROUNDS} rounds of 2 maps and 2 \
             unmaps (expected one per unmap): {json}"
        ),
    )
}

#[test]
fn l2_linux_invalidates_every_map_for_our_edu_in_caching_mode() -> Result<(), TestbedError> {
    let Some((out, psi)) = run_rounds("viommu-edu-cm-on", "")? else {
        return Ok(());
    };
    out.ensure(cap_read(&out)? & CAP_CM != 0, "the guest read CAP.CM clear")?;
    out.ensure(
        out.console_contains(CM_PATH_MESSAGE),
        "the driver did not take the caching-mode path",
    )?;
    out.ensure(
        psi >= 4 * ROUNDS,
        format!(
            "{psi} page-selective IOTLB invalidations for {ROUNDS} rounds of 2 maps and 2 \
             unmaps (expected one per map and one per unmap): {}",
            out.vmm_stats()?
        ),
    )
}
