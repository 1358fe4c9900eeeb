//! L2 Linux with L1's NVMe controllers passed through by our vmm (`--device path=...`, no
//! vIOMMU): the guest's own nvme driver reads the first 16 MiB of the L0 disk image with O_DIRECT
//! (md5 must match the image), and writes a pattern to a scratch disk that must be in the L0
//! file after shutdown. Two devices on one command line also prove `--device` repeats.

use std::sync::Arc;

use integration::testbed::{self, L2Vmm, Outcome, Scenario, TestbedError};

/// First asks our vmm for the edu device while it is still unbound (one line, exit 1, no VM);
/// then binds every 1b36:0010 (QEMU NVMe) in L1 to vfio-pci and sets `$DEVS` to their paths.
pub const BIND_NVME: &str = r#"
EDU=$(tb-vfio-bind --find 1234:11e8 | tail -n1)
vmm --kernel /testbed/vmlinuz --device path=$EDU 2>/tmp/unbound.err
echo "@@TB L1 unbound-device rc=$? lines=$(wc -l </tmp/unbound.err)"
echo "L1 unbound-device stderr: $(cat /tmp/unbound.err)"
nvmes=$(tb-vfio-bind 1b36:0010) || exit 1
DEVS=""
for d in $nvmes; do
  DEVS="$DEVS --device path=$d"
done
"#;

/// The pattern block the L2 action writes at byte 1 MiB of the scratch disk.
fn pattern() -> Vec<u8> {
    b"tb-pt-pattern\n"
        .iter()
        .copied()
        .cycle()
        .take(4096)
        .collect()
}

const PATTERN_OFFSET: u64 = 1 << 20;

fn outcome() -> Result<Option<(Arc<Outcome>, std::path::PathBuf)>, TestbedError> {
    let Some(tb) = testbed::require() else {
        return Ok(None);
    };
    let _ = tb.vmm_binary()?;
    let boot = Scenario::l2_boot("passthrough-nvme", L2Vmm::Ours)
        .memory_mib(384)
        .action("nvme-pt")
        .vmm_arg("$DEVS");
    let script = format!("{BIND_NVME}{}", boot.l1_script_text());
    // A fresh scratch disk each run: zeros where the pattern goes.
    let scratch = tb.fresh_scratch_disk("passthrough-scratch.img")?;
    let s = Scenario::l1_script("passthrough-nvme", &script)
        .with_vmm()
        .scratch_nvme(&scratch, "nvme1");
    Ok(Some((tb.run_shared(&s)?, scratch)))
}

#[test]
fn vmm_refuses_an_unbound_device_with_one_line_and_no_vm() -> Result<(), TestbedError> {
    let Some((out, _)) = outcome()? else {
        return Ok(());
    };
    let m = out.expect_marker("L1", "unbound-device")?;
    let field = |k: &str| m.fields.get(k).cloned().unwrap_or_default();
    out.ensure(
        field("rc") == "1" && field("lines") == "1",
        format!("want exit 1 and one stderr line: {}", m.raw),
    )?;
    out.ensure(
        out.console_contains("(1234:11e8): bound to no driver, not vfio-pci; bind it with `echo vfio-pci > /sys/bus/pci/devices/")
            && out.console_contains("/driver_override; echo 0000:"),
        "the error line does not give the bind command (driver_override)",
    )
}

#[test]
fn l2_reads_the_passed_through_nvme_with_the_l0_image_md5() -> Result<(), TestbedError> {
    let Some((out, _)) = outcome()? else {
        return Ok(());
    };
    let Some(tb) = testbed::require() else {
        return Ok(());
    };
    let (want, got) = (tb.disk_head_md5(16 << 20)?, out.nvme_read_md5()?);
    out.ensure(
        got == want,
        format!("L2 read md5 {got}, first 16 MiB of disk.img is {want}"),
    )?;
    out.ensure(out.vmm_exit()? == 0, "vmm exited non-zero")
}

#[test]
fn a_pattern_l2_writes_is_in_the_l0_image_after_shutdown() -> Result<(), TestbedError> {
    let Some((out, scratch)) = outcome()? else {
        return Ok(());
    };
    let write = out
        .markers_named("L2", "nvme-pt")
        .find(|m| m.words.first().map(String::as_str) == Some("write"))
        .ok_or_else(|| out.error("no `nvme-pt write` marker"))?;
    out.ensure(
        write.fields.get("ok").map(String::as_str) == Some("1"),
        format!("L2 read-back of its pattern failed: {}", write.raw),
    )?;
    let img = std::fs::read(&scratch)
        .map_err(|e| TestbedError::io(format!("reading {}", scratch.display()), e))?;
    let at = PATTERN_OFFSET as usize;
    out.ensure(
        img.get(at..at + 4096) == Some(&pattern()[..]),
        "the pattern is not at byte 1 MiB of the scratch image",
    )
}
