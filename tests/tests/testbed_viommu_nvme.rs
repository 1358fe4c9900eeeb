//! L2 Linux with L1's NVMe passed through behind our virtual VT-d (`--viommu`, `--device
//! ...,iommu=on`): the guest's intel-iommu driver controls what the real device can reach, the
//! device still reads the L0 disk image exactly, and what the guest writes lands in the L0 file.
//! Also with `iommu=pt`, with `intel_iommu=off`, and in deferred mode. Every run has the
//! protocol checker on, which finds no violation.

use integration::testbed::{self, viommu, Outcome, TestbedError};

/// Where the guest's `nvme-pt` action writes its pattern on the scratch disk, and the pattern.
const PATTERN_OFFSET: usize = 1 << 20;

fn pattern() -> Vec<u8> {
    b"tb-pt-pattern\n"
        .iter()
        .copied()
        .cycle()
        .take(4096)
        .collect()
}

fn run(name: &str, viommu: &str, l2_args: &[&str]) -> Result<Option<Outcome>, TestbedError> {
    run_with(name, viommu, l2_args, None)
}

/// As [`run`]; with `scratch`, L0 also attaches that file as a second, writable NVMe
/// (`serial=nvme1`) the guest writes its pattern to.
fn run_with(
    name: &str,
    viommu: &str,
    l2_args: &[&str],
    scratch: Option<&std::path::Path>,
) -> Result<Option<Outcome>, TestbedError> {
    let Some(tb) = testbed::require() else {
        return Ok(None);
    };
    let mut s = viommu::l2_on_our_vtd(name, viommu, l2_args, "nvme-iommu", true);
    if let Some(path) = scratch {
        s = s.scratch_nvme(path, "nvme1");
    }
    Ok(Some(tb.run(&s)?))
}

/// The counter `key` of the stats JSON the run printed.
fn counter(out: &Outcome, key: &str) -> Result<u64, TestbedError> {
    out.stats_counter(key)
}

/// The guest read the first 16 MiB of the L0 disk image exactly, the vmm exited 0, and the
/// protocol checker found no violation.
fn read_the_disk_exactly(out: &Outcome) -> Result<(), TestbedError> {
    let Some(tb) = testbed::require() else {
        return Ok(());
    };
    viommu::ensure_read_the_disk_exactly(tb, out)?;
    // Linux's driver kept the protocol the whole run.
    viommu::no_violations(out)
}

#[test]
fn l2_drives_the_nvme_behind_our_vtd_in_strict_mode_with_exact_data() -> Result<(), TestbedError> {
    let Some(tb) = testbed::require() else {
        return Ok(());
    };
    // A fresh scratch disk each run: zeros where the pattern goes.
    let scratch = tb.fresh_scratch_disk("viommu-scratch.img")?;
    let Some(out) = run_with(
        "viommu-nvme-strict",
        "",
        &["intel_iommu=on"],
        Some(&scratch),
    )?
    else {
        return Ok(());
    };
    read_the_disk_exactly(&out)?;
    // What the guest wrote through our VT-d reached the disk.
    let img = std::fs::read(&scratch)
        .map_err(|e| TestbedError::io(format!("reading {}", scratch.display()), e))?;
    out.ensure(
        img.get(PATTERN_OFFSET..PATTERN_OFFSET + 4096) == Some(&pattern()[..]),
        "the pattern the guest wrote is not at byte 1 MiB of the scratch image",
    )?;
    out.ensure(
        out.console_contains("DMAR: IOMMU batching disallowed due to virtualization"),
        "the guest did not see caching mode",
    )?;
    let groups = out
        .lines
        .iter()
        .filter(|l| l.text.contains("Adding to iommu group"))
        .count();
    out.ensure(groups >= 2, "the NVMe was not put in an IOMMU group")?;
    // The guest's maps and unmaps reached the host, and nothing was refused.
    out.ensure(counter(&out, "host_map_calls")? > 0, "no host map calls")?;
    out.ensure(
        counter(&out, "host_unmap_calls")? > 0,
        "no host unmap calls",
    )?;
    out.ensure(counter(&out, "waits")? > 0, "no waits")?;
    out.ensure(
        counter(&out, "host_errors")? == 0,
        "the host refused a call",
    )?;
    out.ensure(counter(&out, "faults")? == 0, "the unit recorded faults")
}

#[test]
fn l2_drives_the_nvme_behind_our_vtd_with_iommu_pt() -> Result<(), TestbedError> {
    let Some(out) = run("viommu-nvme-pt", "", &["intel_iommu=on", "iommu=pt"])? else {
        return Ok(());
    };
    read_the_disk_exactly(&out)?;
    out.ensure(
        out.console_contains("iommu: Default domain type: Passthrough"),
        "the guest did not choose pass-through",
    )
}

#[test]
fn l2_drives_the_nvme_behind_our_vtd_with_intel_iommu_off() -> Result<(), TestbedError> {
    // Without its IOMMU drivers: neither DMA nor interrupt remapping.
    let Some(out) = run("viommu-nvme-off", "", &["intel_iommu=off", "intremap=off"])? else {
        return Ok(());
    };
    read_the_disk_exactly(&out)?;
    out.ensure(
        counter(&out, "descriptors")? == 0,
        "a guest without its IOMMU driver sent descriptors",
    )
}

#[test]
fn l2_drives_the_nvme_behind_our_vtd_in_deferred_mode() -> Result<(), TestbedError> {
    let Some(out) = run(
        "viommu-nvme-deferred",
        "flush=deferred",
        &["intel_iommu=on"],
    )?
    else {
        return Ok(());
    };
    read_the_disk_exactly(&out)?;
    out.ensure(
        counter(&out, "host_errors")? == 0,
        "the host refused a call",
    )
}

#[test]
fn l2_drives_the_nvme_behind_our_vtd_with_queue_tail_writes_taken_by_kvm(
) -> Result<(), TestbedError> {
    let Some(out) = run(
        "viommu-nvme-async-queue",
        "queue=async",
        &["intel_iommu=on"],
    )?
    else {
        return Ok(());
    };
    read_the_disk_exactly(&out)?;
    // Linux's submissions went through the doorbells, and strict mode's work still reached
    // the host before each wait completed (the data is exact, nothing was refused).
    let (waits, rung) = (counter(&out, "waits")?, counter(&out, "queue_doorbells")?);
    out.ensure(
        rung > 0 && rung * 2 >= waits,
        format!("{rung} doorbells for {waits} waits: the tail writes were trapped"),
    )?;
    out.ensure(
        counter(&out, "host_unmap_calls")? > 0,
        "no host unmap calls",
    )?;
    out.ensure(
        counter(&out, "host_errors")? == 0,
        "the host refused a call",
    )?;
    out.ensure(counter(&out, "faults")? == 0, "the unit recorded faults")
}
