//! L2 Linux 6.1 and the vmm's edu with Address Translation Services (`--viommu
//! device-iotlb=on`): the guest's PCI core finds edu's ATS capability in extended configuration
//! space, its intel-iommu driver enables ATS (context entries of translation type 01b) and sends
//! a device-TLB invalidation after each IOTLB one; edu's DMA, through VFIO in L2, goes through
//! its device-TLB and copies exactly, and the protocol checker finds no missing device-TLB
//! invalidation. An injected invalidation time-out or completion error (`inject=ite@N`,
//! `ice@N`), which only a device-TLB invalidation can raise, is logged by the driver, which goes
//! on.

use integration::testbed::{self, viommu, Outcome, TestbedError};

/// Rounds of map, copy, unmap, compare; each round maps and unmaps two pages.
const ROUNDS: u64 = 16;

/// ATS Control's Enable bit (PCIe Base 4.0, 10.5.1.3).
const ATS_ENABLE: u64 = 0x8000;

/// Runs the edu rounds with device-TLBs and caching mode off, `more` added to `--viommu`, and
/// checks what every such run shows: the vmm exited 0, the guest left ATS enabled on edu and
/// edu's translation requests went through its device-TLB. Returns the outcome and the rounds
/// run and copied exactly.
fn edu_with_ats(name: &str, more: &str) -> Result<Option<(Outcome, u64, u64)>, TestbedError> {
    let Some(tb) = testbed::require() else {
        return Ok(None);
    };
    let args = format!("caching-mode=off,device-iotlb=on{more}");
    let out = tb.run(&viommu::edu_dma_on_our_vtd(name, &args, ROUNDS))?;
    out.ensure(out.vmm_exit()? == 0, "the vmm did not exit 0")?;
    viommu::ensure_driver_grouped_devices(&out)?;
    let ats = out
        .markers_named("L2", "ats")
        .next()
        .ok_or_else(|| out.error("no ATS capability found on edu in L2"))?;
    let control = ats
        .field("control")
        .and_then(|c| u64::from_str_radix(c, 16).ok())
        .ok_or_else(|| out.error(format!("malformed ats marker: {}", ats.raw)))?;
    out.ensure(
        control & ATS_ENABLE != 0,
        format!("the guest left ATS disabled: {}", ats.raw),
    )?;
    let json = out.vmm_stats()?;
    out.ensure(
        out.stats_counter("caches.device_tlb.misses")? >= 2 * ROUNDS,
        format!("edu sent fewer than one translation request per DMA: {json}"),
    )?;
    let (rounds, ok) = viommu::edu_dma_rounds(&out)?;
    Ok(Some((out, rounds, ok)))
}

#[test]
fn l2_linux_enables_ats_on_our_edu_and_invalidates_its_device_tlb_on_every_unmap(
) -> Result<(), TestbedError> {
    let Some((out, rounds, ok)) = edu_with_ats("viommu-edu-ats", "")? else {
        return Ok(());
    };
    out.ensure(
        rounds == ROUNDS && ok == ROUNDS,
        format!("edu copied {ok} of {rounds} rounds exactly"),
    )?;
    let json = out.vmm_stats()?;
    // One device-TLB invalidation per unmapped page, each after its IOTLB invalidation.
    let devtlb = out.stats_counter("descriptors_by_type.device_iotlb")?;
    out.ensure(
        devtlb >= 2 * ROUNDS,
        format!("{devtlb} device-TLB invalidations for {ROUNDS} rounds of 2 unmaps: {json}"),
    )?;
    out.ensure(
        out.stats_counter("caches.device_tlb.invalidated")? >= 2 * ROUNDS,
        format!("the device-TLB invalidations removed too few entries: {json}"),
    )?;
    out.ensure(
        out.stats_counter("faults")? == 0,
        format!("edu's DMA faulted: {json}"),
    )?;
    viommu::no_violations(&out)
}

/// What Linux 6.1 logs when it finds FSTS.ITE: the error with the requester id the unit put in
/// IQERCD.ITESID (8: edu at 00:01.0), the descriptor before IQH (the aborted wait: IQH stays
/// past it), then, in `qi_check_fault`, that it cleared ITE (and marked the submission's
/// waits aborted, to submit them again).
const ITE_LOG: [&str; 3] = [
    "DMAR: VT-d detected Invalidation Time-out Error: SID 8",
    "DMAR: QI PRIOR: Invalidation Wait",
    "DMAR: Invalidation Time-out Error (ITE) cleared",
];

#[test]
fn l2_linux_logs_and_clears_an_injected_device_tlb_invalidation_time_out_and_edu_copies_exactly(
) -> Result<(), TestbedError> {
    // 6.5.2.10: the first device-TLB invalidation times out: the wait after it is aborted
    // (no status write), IQH stays past it, FSTS.ITE sets.
    let Some((out, rounds, ok)) = edu_with_ats("viommu-edu-ats-ite", ",inject=ite@1")? else {
        return Ok(());
    };
    for needle in ITE_LOG {
        out.ensure(
            out.markers_named("L2", "dmesg")
                .any(|m| m.raw.contains(needle)),
            format!("no '{needle}' in dmesg"),
        )?;
    }
    out.ensure(
        rounds == ROUNDS && ok == ROUNDS,
        format!("edu copied {ok} of {rounds} rounds exactly after the time-out"),
    )?;
    let json = out.vmm_stats()?;
    out.ensure(
        out.stats_counter("injected")? == 1,
        format!("one injected time-out expected: {json}"),
    )?;
    viommu::no_violations(&out)
}

#[test]
fn l2_linux_logs_an_injected_device_tlb_invalidation_completion_error_and_edu_copies_exactly(
) -> Result<(), TestbedError> {
    // 6.5.2.10: the first device-TLB invalidation completes in error: FSTS.ICE and
    // IQERCD.ICESID set, the queue goes on. Linux 6.1 decodes ICE only in `qi_check_fault`,
    // while it polls a wait that has not completed, which never happens here: the unit carries
    // a submission out within its tail write. Its fault handler (`dmar_fault`) logs FSTS with
    // ICE (bit 5) alone, and leaves ICE set, which stops nothing.
    let Some((out, rounds, ok)) = edu_with_ats("viommu-edu-ats-ice", ",inject=ice@1")? else {
        return Ok(());
    };
    let needle = "DMAR: DRHD: handling fault status reg 20";
    out.ensure(
        out.markers_named("L2", "dmesg")
            .any(|m| m.raw.contains(needle)),
        format!("no '{needle}' in dmesg"),
    )?;
    out.ensure(
        rounds == ROUNDS && ok == ROUNDS,
        format!("edu copied {ok} of {rounds} rounds exactly after the error"),
    )?;
    let json = out.vmm_stats()?;
    out.ensure(
        out.stats_counter("injected")? == 1,
        format!("one injected completion error expected: {json}"),
    )?;
    viommu::no_violations(&out)
}
