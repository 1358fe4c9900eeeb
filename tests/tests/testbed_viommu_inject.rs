//! Faults injected into our virtual VT-d (`--viommu inject=...`) while L2 Linux 6.1 drives a
//! device behind it (the passed-through NVMe, or the vmm's edu through VFIO in L2): the guest's
//! intel-iommu driver logs the error it logs for each on hardware, recovers, and the device
//! goes on working.

use integration::testbed::{self, viommu, Outcome, TestbedError};

#[test]
fn l2_linux_logs_and_clears_an_injected_invalidation_queue_error_and_keeps_reading_the_nvme(
) -> Result<(), TestbedError> {
    let Some(tb) = testbed::require() else {
        return Ok(());
    };
    // The first descriptor Linux submits (its global context-cache invalidation) fails to fetch
    // (FSTS.IQE, IQERCD.IQEI = 2, IQH at it); the driver dumps IQERCD and the descriptor at IQH
    // (qi_dump_fault), finds IQH at the first descriptor of its submission, replaces it with
    // its wait descriptor, clears IQE and goes on (qi_check_fault). Dropping a global
    // invalidation of empty caches at boot costs nothing: the device works.
    let s = viommu::l2_on_our_vtd(
        "viommu-inject-iqe",
        "inject=iqe@1",
        &["intel_iommu=on", "loglevel=6"],
        "nvme-iommu",
        true,
    );
    let out = tb.run(&s)?;
    for needle in [
        "DMAR: VT-d detected Invalidation Queue Error: Reason 2",
        "DMAR: QI HEAD: Context-cache Invalidation qw0 = 0x31, qw1 = 0x0",
        "DMAR: Invalidation Queue Error (IQE) cleared",
    ] {
        out.ensure(
            out.console_contains(needle),
            format!("no '{needle}' in dmesg"),
        )?;
    }
    viommu::ensure_read_the_disk_exactly(tb, &out)?;
    let json = out.vmm_stats()?;
    out.ensure(
        out.stats_counter("injected")? == 1 && out.stats_counter("invalid")? == 1,
        format!("one injected queue error expected: {json}"),
    )?;
    viommu::no_violations(&out)
}

/// Rounds of the edu runs; the injected fault hits the first DMA of the second.
const EDU_ROUNDS: u64 = 8;

/// How Linux 6.1 logs the fault of edu (00:01.0) reading its source page (IOVA 0x100000) that
/// the injection makes: legacy mode, a read, reason 6 (7.1.3: read access not set), no PASID.
const EDU_READ_FAULT: &str = "[DMA Read NO_PASID] Request device [00:01.0] fault addr 0x100000 \
                              [fault reason 0x06] PTE Read access is not set";

/// Runs the edu rounds under `inject`, and checks what every such run shows: the vmm exited 0,
/// the faulted round (the second) copied nothing and every other round copied exactly, one
/// fault counted and no protocol violation. Returns the outcome and the number of the guest's
/// log lines for the injected fault.
fn edu_with_injected_fault(
    name: &str,
    inject: &str,
) -> Result<Option<(Outcome, usize)>, TestbedError> {
    let Some(tb) = testbed::require() else {
        return Ok(None);
    };
    let out = tb.run(&viommu::edu_dma_on_our_vtd(
        name,
        &format!("caching-mode=off,inject={inject}"),
        EDU_ROUNDS,
    ))?;
    out.ensure(out.vmm_exit()? == 0, "the vmm did not exit 0")?;
    let (rounds, ok) = viommu::edu_dma_rounds(&out)?;
    out.ensure(
        rounds == EDU_ROUNDS && ok == EDU_ROUNDS - 1,
        format!("edu copied {ok} of {rounds} rounds exactly, expected all but the faulted one"),
    )?;
    out.ensure(
        out.markers_named("L2", "edu-dma").any(|m| {
            m.words.first().is_some_and(|w| w == "mismatch") && m.field("round") == Some("1")
        }),
        "no mismatch marker for the faulted round 1",
    )?;
    let json = out.vmm_stats()?;
    out.ensure(
        out.stats_counter("faults")? == 1,
        format!("one DMA fault expected: {json}"),
    )?;
    viommu::no_violations(&out)?;
    // The driver's log as the iommu action re-prints it after the rounds (one marker a line).
    let logged = out
        .markers_named("L2", "dmesg")
        .filter(|m| m.raw.contains(EDU_READ_FAULT))
        .count();
    Ok(Some((out, logged)))
}

#[test]
fn l2_linux_logs_an_injected_dma_fault_of_our_edu_and_the_next_rounds_copy_exactly(
) -> Result<(), TestbedError> {
    let Some((out, logged)) = edu_with_injected_fault("viommu-inject-edu-fault", "dma-fault@3")?
    else {
        return Ok(());
    };
    // 7.2.1: one record, FSTS.PPF (2) with FRI 0; the driver reads it, clears F and PPF.
    out.ensure(
        out.console_contains("DMAR: DRHD: handling fault status reg 2"),
        "the driver did not handle a primary pending fault",
    )?;
    out.ensure(
        logged == 1,
        format!("the fault logged {logged} times, expected once"),
    )?;
    let json = out.vmm_stats()?;
    out.ensure(
        out.stats_counter("injected")? == 1,
        format!("one injection expected: {json}"),
    )
}

#[test]
fn l2_linux_drains_every_fault_record_of_an_overflow_injected_on_our_edu_and_keeps_running(
) -> Result<(), TestbedError> {
    let Some((out, logged)) = edu_with_injected_fault(
        "viommu-inject-edu-records-full",
        "dma-fault@3+records-full@1",
    )?
    else {
        return Ok(());
    };
    // 7.2.1: the burst fills all 8 records (CAP.NFR) and overflows: FSTS.PFO (1) and PPF (2);
    // the driver logs each record, clears them and both bits.
    out.ensure(
        out.console_contains("DMAR: DRHD: handling fault status reg 3"),
        "the driver did not see the overflow with pending faults",
    )?;
    out.ensure(
        logged == 8,
        format!("the driver logged {logged} fault records, expected all 8"),
    )?;
    let json = out.vmm_stats()?;
    out.ensure(
        out.stats_counter("injected")? == 2,
        format!("two injections expected (the fault and the overflow): {json}"),
    )
}
