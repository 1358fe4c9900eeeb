//! Faults injected into our virtual VT-d (`--viommu inject=...`) while L2 Linux 6.1 drives the
//! passed-through NVMe behind it: the guest's intel-iommu driver logs the error it logs for each
//! on hardware, recovers, and the device still reads the L0 image exactly.

use integration::testbed::{self, viommu, TestbedError};

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
    let (want, got) = (tb.disk_head_md5(16 << 20)?, out.nvme_read_md5()?);
    out.ensure(
        got == want,
        format!("L2 read md5 {got}, the image's is {want}"),
    )?;
    out.ensure(out.vmm_exit()? == 0, "the vmm did not exit 0")?;
    let json = out.vmm_stats()?;
    out.ensure(
        out.stats_counter("injected")? == 1 && out.stats_counter("invalid")? == 1,
        format!("one injected queue error expected: {json}"),
    )?;
    viommu::no_violations(&out)
}
