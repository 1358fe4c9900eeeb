//! What the testbed tests of our virtual VT-d share: an L1 script that boots L2 under our vmm
//! with `--viommu` (its protocol checker on), optionally with L1's NVMe controllers behind it,
//! and prints the counters the vmm wrote at exit (`--stats-json`) as an `@@TB L1 stats JSON`
//! line, which [`Outcome::vmm_stats`](super::Outcome::vmm_stats) reads back, and the checker's
//! report as an `@@TB L1 check-report JSON` line.

use super::{L2Vmm, Outcome, Scenario, Testbed, TestbedError};

/// Where the vmm writes its counters.
pub const STATS_JSON: &str = "/tmp/stats.json";
/// Where the vmm writes its protocol checker's report.
pub const CHECK_REPORT: &str = "/tmp/check.json";
/// The part of a report a console line carries (the first violations).
const REPORT_BYTES: usize = 3000;

/// Binds L1's NVMe controllers to vfio-pci and sets `$DEVS` to `--device` options putting each
/// behind the VT-d.
pub const BIND_NVME_BEHIND_VTD: &str = r#"
nvmes=$(tb-vfio-bind 1b36:0010) || exit 1
DEVS=""
for d in $nvmes; do
  DEVS="$DEVS --device path=$d,iommu=on"
done
"#;

/// An L1 script that runs `boot` (an L2 boot under our vmm with `--stats-json` [`STATS_JSON`])
/// after `prologue`, then prints the counters on one line.
pub fn printing_stats(name: &str, prologue: &str, boot: &Scenario) -> Scenario {
    let script = format!(
        "{prologue}{}echo \"@@TB L1 stats $(tr -d ' \\n' <{STATS_JSON})\"\n\
         [ -f {CHECK_REPORT} ] && echo \"@@TB L1 check-report \
         $(tr -d ' \\n' <{CHECK_REPORT} | head -c {REPORT_BYTES})\"\n",
        boot.l1_script_text()
    );
    Scenario::l1_script(name, &script).with_vmm()
}

/// `viommu` (`--viommu` options) with the protocol checker on, reporting to [`CHECK_REPORT`].
pub fn checked(viommu: &str) -> String {
    let check = format!("check=on,check-report={CHECK_REPORT}");
    if viommu.is_empty() {
        check
    } else {
        format!("{viommu},{check}")
    }
}

/// The protocol checker was on and found no violation (what it found otherwise, in the error).
pub fn no_violations(out: &Outcome) -> Result<(), TestbedError> {
    let json = out.vmm_stats()?;
    out.ensure(
        json.contains("\"check\":{\"by_kind\"") && json.contains("\"enabled\":true"),
        format!("the protocol checker was not on: {json}"),
    )?;
    let total = out.stats_counter("total")?;
    let report = out
        .lines
        .iter()
        .find_map(|l| l.text.split_once("@@TB L1 check-report ").map(|(_, r)| r))
        .unwrap_or("(no report)");
    out.ensure(
        total == 0,
        format!("the protocol checker found {total} violations: {report}"),
    )
}

/// The L2 boot of [`l2_on_our_vtd`], before it becomes an L1 script: more VMM arguments (an
/// emulated device behind the unit) can still be added, then [`printing_stats`] runs it.
pub fn l2_boot_on_our_vtd(name: &str, viommu: &str, l2_args: &[&str], action: &str) -> Scenario {
    let mut boot = Scenario::l2_boot(name, L2Vmm::Ours)
        .memory_mib(384)
        .action(action)
        .vmm_arg(&format!("--viommu {}", checked(viommu)))
        .vmm_arg(&format!("--stats-json {STATS_JSON}"));
    for a in l2_args {
        boot = boot.l2_cmdline_arg(a);
    }
    boot
}

/// L2 (384 MiB) under `vmm --viommu VIOMMU` (with the protocol checker on, see [`checked`]) with
/// the kernel arguments `l2_args`, running the L2 action `action`; with `nvme`, every L1 NVMe
/// controller is passed through behind the unit.
pub fn l2_on_our_vtd(
    name: &str,
    viommu: &str,
    l2_args: &[&str],
    action: &str,
    nvme: bool,
) -> Scenario {
    let mut boot = l2_boot_on_our_vtd(name, viommu, l2_args, action);
    if nvme {
        boot = boot.vmm_arg("$DEVS");
    }
    let prologue = if nvme { BIND_NVME_BEHIND_VTD } else { "" };
    printing_stats(name, prologue, &boot)
}

/// L2 under `vmm --edu --viommu VIOMMU` (checker on) with `intel_iommu=on`, running the
/// `edu-dma` action: `rounds` rounds of map, copy through edu, unmap, compare, through VFIO in
/// L2; with the counters and the checker's report printed as [`l2_on_our_vtd`] does.
pub fn edu_dma_on_our_vtd(name: &str, viommu: &str, rounds: u64) -> Scenario {
    let rounds = format!("tb.rounds={rounds}");
    let boot =
        l2_boot_on_our_vtd(name, viommu, &["intel_iommu=on", &rounds], "edu-dma").vmm_arg("--edu");
    printing_stats(name, "", &boot)
}

/// The rounds the `edu-dma` action ran and those that copied their page exactly, from its
/// `@@TB L2 edu-dma rounds=N ok=M` marker.
pub fn edu_dma_rounds(out: &Outcome) -> Result<(u64, u64), TestbedError> {
    let summary = out
        .markers_named("L2", "edu-dma")
        .find(|m| m.field("rounds").is_some())
        .ok_or_else(|| out.error("no edu-dma summary marker"))?;
    match (summary.field_num("rounds"), summary.field_num("ok")) {
        (Some(rounds), Some(ok)) => Ok((rounds, ok)),
        _ => Err(out.error(format!("malformed edu-dma marker: {}", summary.raw))),
    }
}

/// The L2's `nvme-pt` action read the first 16 MiB of the L0 disk image exactly, and the vmm
/// exited 0.
pub fn ensure_read_the_disk_exactly(tb: &Testbed, out: &Outcome) -> Result<(), TestbedError> {
    let (want, got) = (tb.disk_head_md5(16 << 20)?, out.nvme_read_md5()?);
    out.ensure(
        got == want,
        format!("L2 read md5 {got}, the image's is {want}"),
    )?;
    out.ensure(out.vmm_exit()? == 0, "the vmm did not exit 0")
}

/// The guest's intel-iommu driver came up and put devices into IOMMU groups.
pub fn ensure_driver_grouped_devices(out: &Outcome) -> Result<(), TestbedError> {
    out.ensure(
        out.console_contains("Intel(R) Virtualization Technology for Directed I/O"),
        "the intel-iommu driver did not come up",
    )?;
    out.ensure(
        out.console_contains("Adding to iommu group"),
        "no device was added to an IOMMU group",
    )
}
