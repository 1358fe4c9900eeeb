//! The L2 Linux under our vmm with KVM's split irqchip (issue 11): the local APICs in KVM, the
//! IOAPIC ours, no PIC and no PIT. In one boot, with L1's NVMe passed through: the kernel finds
//! our IOAPIC (version 0x20), the serial console's IO-APIC line takes interrupts both ways (the
//! L1 side types a line the guest reads back), the NVMe's MSI-X vectors work (the guest reads the
//! disk's first 16 MiB with the L0 image's md5), and the guest never touches the PIC or PIT
//! ports, which is why neither is emulated. A second boot with `pci=nomsi` has the NVMe
//! interrupt through its INTx instead: a level-triggered IO-APIC line that only keeps working if
//! our IOAPIC signals VFIO's resample eventfd at each EOI.

use integration::testbed::{self, L2Vmm, Marker, Outcome, Scenario, TestbedError};

/// What the L1 side types into the vmm's stdin once the guest has counted its interrupts.
const INPUT: &str = "tb-serial-input";

/// Ports of the 8259 PICs (0x20, 0x21, 0xa0, 0xa1), the 8254 PIT (0x40..0x43) and port B
/// (0x61, the PIT's gate and speaker).
const PIC_AND_PIT_PORTS: [&str; 9] = [
    "0x20", "0x21", "0xa0", "0xa1", "0x40", "0x41", "0x42", "0x43", "0x61",
];

/// How the NVMe interrupts.
#[derive(Clone, Copy, PartialEq, Eq)]
enum NvmeIrq {
    MsiX,
    /// `pci=nomsi`: INTx, level-triggered, through the IOAPIC.
    Intx,
}

/// Binds the NVMe to vfio-pci, boots L2 with `--irqchip split` and that device, feeds INPUT once
/// the guest's `irq-summary` marker is out, and lists the port accesses the vmm left unhandled
/// as `@@TB L1 unhandled kind=in port=0x2e count=4` (from the tally each vCPU logs when it stops).
fn script(irq: NvmeIrq) -> String {
    let mut boot = Scenario::l2_boot("split-irqchip", L2Vmm::Ours)
        .cpus(2)
        .memory_mib(384)
        .action("irq")
        .l2_cmdline_arg("tb.first=nvme-pt")
        .l2_cmdline_arg(&format!("tb.input={INPUT}"));
    if irq == NvmeIrq::Intx {
        boot = boot.l2_cmdline_arg("pci=nomsi");
    }
    let cmdline = testbed::shell_quote(&boot.l2_cmdline().unwrap_or_default());
    format!(
        r#"dev=$(tb-vfio-bind --first 1b36:0010) || exit 1
: >/tmp/l2.out
t0=$(cut -d' ' -f1 /proc/uptime)
echo "@@TB VMM start vmm=Ours"
(i=0
 while ! grep -q '@@TB L2 irq-summary' /tmp/l2.out && [ ! -e /tmp/rc ] && [ $i -lt 300 ]; do
   sleep 0.5; i=$((i + 1))
 done
 echo {INPUT}) \
 | {{ RUST_LOG=vmm::vstate::vcpu=debug vmm --kernel /testbed/vmlinuz \
       --initramfs /testbed/l2.cpio.gz --cmdline {cmdline} --cpus boot=2 --memory size=384M \
       --irqchip split --device path=$dev 2>/tmp/vmm.stderr
     echo $? >/tmp/rc; }} | tee /tmp/l2.out
rc=$(cat /tmp/rc)
sed -n 's/.*unhandled port \([a-z]*\) \(0x[0-9a-f]*\): \([0-9]*\) accesses.*/\1 \2 \3/p' /tmp/vmm.stderr \
  | awk '{{n[$1 " " $2] += $3}} END {{for (k in n) {{split(k, a, " "); print a[1], a[2], n[k]}}}}' \
  | while read -r kind port n; do echo "@@TB L1 unhandled kind=$kind port=$port count=$n"; done
grep -v 'unhandled' /tmp/vmm.stderr | tail -n 5
echo "@@TB VMM exit=$rc secs=$(awk -v t0=$t0 '{{printf "%.2f", $1 - t0}}' /proc/uptime)"
"#
    )
}

fn field<'a>(m: &'a Marker, key: &str) -> &'a str {
    m.field(key).unwrap_or("")
}

fn check(out: &Outcome, want_md5: &str, irq: NvmeIrq) -> Result<(), TestbedError> {
    let init = out.l2_init()?;
    out.ensure(init.cpus == 2, format!("L2 sees {} CPUs, not 2", init.cpus))?;
    out.ensure(
        out.console_contains("IOAPIC[0]: apic_id 0, version 32, address 0xfec00000, GSI 0-23"),
        "the kernel did not find our IOAPIC (version 0x20 at 0xfec00000, 24 pins)",
    )?;
    let serial = out
        .markers_named("L2", "irq")
        .find(|m| field(m, "name") == "ttyS0")
        .ok_or_else(|| out.error("no IO-APIC line for ttyS0 in /proc/interrupts"))?;
    out.ensure(
        field(serial, "pin") == "4"
            && field(serial, "trigger") == "edge"
            && serial.field_num::<u64>("count").is_some_and(|c| c > 0),
        format!(
            "ttyS0 is not an IO-APIC pin-4 edge line with interrupts: {}",
            serial.raw
        ),
    )?;
    let summary = out.expect_marker("L2", "irq-summary")?;
    out.ensure(
        field(summary, "legacy-irqs") == "0",
        format!("the kernel reserved IRQs for an 8259 PIC: {}", summary.raw),
    )?;
    out.ensure(
        summary
            .field_num::<u64>("local-timer")
            .is_some_and(|c| c > 0),
        format!("no local timer interrupts: {}", summary.raw),
    )?;
    let msi = summary.field_num::<u64>("msi-count").unwrap_or(0);
    match irq {
        NvmeIrq::MsiX => out.ensure(msi > 0, format!("no MSI interrupts: {}", summary.raw))?,
        NvmeIrq::Intx => {
            out.ensure(msi == 0, format!("MSI despite pci=nomsi: {}", summary.raw))?;
            let nvme = out
                .markers_named("L2", "irq")
                .find(|m| field(m, "name").starts_with("nvme"))
                .ok_or_else(|| out.error("the NVMe has no IO-APIC line"))?;
            // A line whose resample never came would take one interrupt and then leave the
            // driver polling after its timeouts: 16 MiB of reads take dozens.
            out.ensure(
                field(nvme, "trigger") == "fasteoi"
                    && nvme.field_num::<u64>("count").is_some_and(|c| c >= 10),
                format!(
                    "the NVMe's INTx is no level-triggered line with interrupts: {}",
                    nvme.raw
                ),
            )?;
        }
    }
    let input = out.expect_marker("L2", "irq-input")?;
    out.ensure(
        field(input, "got") == INPUT,
        format!(
            "the guest read {:?} from its console, not {INPUT:?}",
            input.raw
        ),
    )?;
    let got = out.nvme_read_md5()?;
    out.ensure(
        got == want_md5,
        format!("L2 read md5 {got} from the NVMe, the image's first 16 MiB are {want_md5}"),
    )?;
    let touched: Vec<&str> = out
        .markers_named("L1", "unhandled")
        .map(|m| field(m, "port"))
        .filter(|p| PIC_AND_PIT_PORTS.contains(p))
        .collect();
    out.ensure(
        touched.is_empty(),
        format!("the guest touched PIC/PIT ports {touched:?}"),
    )?;
    out.ensure(
        out.markers_named("L1", "unhandled").next().is_some(),
        "no unhandled-port list: the vCPUs' tallies were not read",
    )?;
    let rc = out.vmm_exit()?;
    out.ensure(rc == 0, format!("vmm exited {rc}"))
}

fn run(name: &str, irq: NvmeIrq) -> Result<(), TestbedError> {
    let Some(tb) = testbed::require() else {
        return Ok(());
    };
    let _ = tb.vmm_binary()?;
    let out = tb.run(&Scenario::l1_script(name, &script(irq)).with_vmm())?;
    check(&out, &tb.disk_head_md5(16 << 20)?, irq)
}

#[test]
fn linux_boots_with_the_split_irqchip_its_serial_line_and_passed_through_nvme_work(
) -> Result<(), TestbedError> {
    run("split-irqchip", NvmeIrq::MsiX)
}

#[test]
fn passed_through_nvme_works_on_its_intx_through_our_ioapic() -> Result<(), TestbedError> {
    run("split-irqchip-intx", NvmeIrq::Intx)
}
