//! The L2 Linux on our VT-d with interrupt remapping (issue 11), L1's NVMe passed through behind
//! it. In one L1 session, two boots of the same guest (`intel_iommu=on`, 2 vCPUs):
//!
//! - `--viommu` (interrupt remapping and x2APIC on by default, hence the split irqchip): the
//!   kernel enables IRQ remapping in x2APIC mode, `/proc/interrupts` shows the NVMe's vectors
//!   as `IR-PCI-MSI` and the serial console's IOAPIC line as `IR-IO-APIC`, both taking
//!   interrupts, the NVMe reads the L0 image exactly, and the counters show the remappings
//!   without a fault;
//! - `--viommu intremap=off` (the in-kernel irqchip): the same guest falls back to plain
//!   `PCI-MSI` and `IO-APIC` lines, reads the same data, and the unit remaps nothing.

use std::time::Duration;

use integration::testbed::{self, L2Vmm, Marker, Outcome, Scenario, TestbedError};

/// The two boots: a tag and the `--viommu` options.
const RUNS: [(&str, &str); 2] = [("on", ""), ("off", "intremap=off")];

/// Binds the NVMe, then boots L2 once per entry of [`RUNS`], each between
/// `@@TB L1 intremap-run tag=T start` and `... end exit=RC`, with its stats JSON in
/// `@@TB L1 intremap-stats tag=T JSON`.
fn script() -> String {
    let boot = Scenario::l2_boot("intremap", L2Vmm::Ours)
        .cpus(2)
        .action("irq")
        .l2_cmdline_arg("intel_iommu=on")
        .l2_cmdline_arg("tb.first=nvme-pt");
    let cmdline = testbed::shell_quote(&boot.l2_cmdline().unwrap_or_default());
    let mut s = String::from("nvme=$(tb-vfio-bind --first 1b36:0010) || exit 1\n");
    for (tag, viommu) in RUNS {
        s.push_str(&format!(
            r#"echo "@@TB L1 intremap-run tag={tag} start"
vmm --kernel /testbed/vmlinuz --initramfs /testbed/l2.cpio.gz --cmdline {cmdline} \
  --cpus boot=2 --memory size=384M --viommu {viommu} --stats-json /tmp/stats-{tag}.json \
  --device path=$nvme,iommu=on 2>/tmp/vmm-{tag}.stderr
rc=$?
tail -n 5 /tmp/vmm-{tag}.stderr
echo "@@TB L1 intremap-stats tag={tag} $(tr -d ' \n' </tmp/stats-{tag}.json)"
echo "@@TB L1 intremap-run tag={tag} end exit=$rc"
"#
        ));
    }
    s
}

/// What one boot showed: its markers and console lines, and its counters.
struct Run<'a> {
    tag: &'a str,
    out: &'a Outcome,
    markers: Vec<&'a Marker>,
    text: Vec<&'a str>,
    stats: String,
}

impl<'a> Run<'a> {
    /// The part of `out` between the `start` and `end` markers of boot `tag`.
    fn of(out: &'a Outcome, tag: &'a str) -> Result<Self, TestbedError> {
        let is_run = |m: &Marker, word: &str| {
            m.source == "L1"
                && m.name == "intremap-run"
                && m.field("tag") == Some(tag)
                && m.words.iter().any(|w| w == word)
        };
        let start = out
            .markers
            .iter()
            .find(|m| is_run(m, "start"))
            .ok_or_else(|| out.error(format!("boot {tag} did not start")))?;
        let end = out
            .markers
            .iter()
            .find(|m| is_run(m, "end"))
            .ok_or_else(|| out.error(format!("boot {tag} did not end")))?;
        let rc = end.field_num::<i32>("exit");
        if rc != Some(0) {
            return Err(out.error(format!("boot {tag}: the vmm exited {rc:?}")));
        }
        let within = |at| at >= start.at && at <= end.at;
        let stats = out
            .lines
            .iter()
            .find_map(|l| {
                l.text
                    .split_once(&format!("@@TB L1 intremap-stats tag={tag} "))
                    .map(|(_, j)| j.trim().to_string())
            })
            .ok_or_else(|| out.error(format!("boot {tag}: no stats")))?;
        Ok(Run {
            tag,
            out,
            markers: out.markers.iter().filter(|m| within(m.at)).collect(),
            text: out
                .lines
                .iter()
                .filter(|l| within(l.at))
                .map(|l| l.text.as_str())
                .collect(),
            stats,
        })
    }

    fn ensure(&self, cond: bool, what: impl std::fmt::Display) -> Result<(), TestbedError> {
        self.out.ensure(cond, format!("boot {}: {what}", self.tag))
    }

    fn contains(&self, needle: &str) -> bool {
        self.text.iter().any(|t| t.contains(needle))
    }

    /// The `irq` markers of lines whose name starts with `name`.
    fn lines(&self, name: &str) -> Vec<&'a Marker> {
        self.markers
            .iter()
            .copied()
            .filter(|m| m.source == "L2" && m.name == "irq")
            .filter(|m| m.field("name").is_some_and(|n| n.starts_with(name)))
            .collect()
    }

    /// The unsigned counter `key` of the stats JSON.
    fn counter(&self, key: &str) -> Result<u64, TestbedError> {
        self.stats
            .split_once(&format!("\"{key}\":"))
            .and_then(|(_, rest)| rest.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| {
                self.out
                    .error(format!("no counter {key} in {}", self.stats))
            })
    }

    /// Every line named `name` is on `chip` and they took interrupts.
    fn interrupts_on(&self, name: &str, chip: &str) -> Result<(), TestbedError> {
        let lines = self.lines(name);
        let count: u64 = lines
            .iter()
            .filter_map(|m| m.field_num::<u64>("count"))
            .sum();
        let raw: Vec<&str> = lines.iter().map(|m| m.raw.as_str()).collect();
        self.ensure(
            !lines.is_empty() && lines.iter().all(|m| m.field("chip") == Some(chip)) && count > 0,
            format!("{name} is not on {chip} with interrupts: {raw:?}"),
        )
    }

    /// The guest read the L0 image's first 16 MiB exactly.
    fn read_exactly(&self, want: &str) -> Result<(), TestbedError> {
        let got = self
            .markers
            .iter()
            .find(|m| {
                m.source == "L2"
                    && m.name == "nvme-pt"
                    && m.words.first().map(String::as_str) == Some("read")
            })
            .and_then(|m| m.field("md5"));
        self.ensure(
            got == Some(want),
            format!("read md5 {got:?}, the image's is {want}"),
        )
    }
}

#[test]
fn linux_remaps_the_nvme_msi_and_ioapic_lines_through_our_vtd_and_falls_back_without_it(
) -> Result<(), TestbedError> {
    let Some(tb) = testbed::require() else {
        return Ok(());
    };
    let _ = tb.vmm_binary()?;
    let s = Scenario::l1_script("intremap", &script())
        .with_vmm()
        .timeout(Duration::from_secs(480));
    let out = tb.run(&s)?;
    let md5 = tb.disk_head_md5(16 << 20)?;

    let on = Run::of(&out, "on")?;
    on.ensure(
        on.contains("DMAR-IR: Enabled IRQ remapping in x2apic mode"),
        "the kernel did not enable IRQ remapping in x2APIC mode",
    )?;
    on.interrupts_on("nvme", "IR-PCI-MSI")?;
    on.interrupts_on("ttyS0", "IR-IO-APIC")?;
    on.read_exactly(&md5)?;
    on.ensure(
        on.counter("interrupts_remapped")? > 0,
        "no interrupt remapped",
    )?;
    on.ensure(
        on.counter("iec_invalidations")? > 0,
        "no interrupt-entry-cache invalidation",
    )?;
    on.ensure(
        on.counter("interrupt_faults")? == 0,
        "the unit blocked interrupts",
    )?;
    on.ensure(
        on.stats.contains("\"intremap\":true") && on.stats.contains("\"eim\":true"),
        format!("the stats do not say intremap and eim: {}", on.stats),
    )?;

    let off = Run::of(&out, "off")?;
    off.ensure(
        !off.contains("Enabled IRQ remapping"),
        "the kernel enabled IRQ remapping on a unit without it",
    )?;
    off.interrupts_on("nvme", "PCI-MSI")?;
    off.interrupts_on("ttyS0", "IO-APIC")?;
    off.read_exactly(&md5)?;
    off.ensure(
        off.counter("interrupts_remapped")? == 0 && off.counter("iec_invalidations")? == 0,
        format!(
            "the unit remapped without interrupt remapping: {}",
            off.stats
        ),
    )
}
