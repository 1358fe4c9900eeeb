//! Nothing outlives a VM whose device sits behind our VT-d: killing the vmm (SIGKILL) or
//! crashing the guest kernel in the middle of NVMe I/O leaves no VFIO file open in L1, and the
//! same device then works for a new VM, which reads the L0 disk image exactly.

use integration::testbed::{self, Outcome, Scenario, TestbedError};

const SCRIPT: &str = r#"
nvme=$(tb-vfio-bind --first 1b36:0010) || exit 1
# Runs the vmm itself (not in a subshell), so that `$!` after `run ... &` is the vmm's pid.
vmm_args() {
  echo "--kernel /testbed/vmlinuz --initramfs /testbed/l2.cpio.gz --memory size=384M --viommu"
  echo "--device path=$nvme,iommu=on"
}
cmdline() { echo "console=ttyS0 panic=-1 quiet intel_iommu=on tb.action=$1"; }
vfio_fds() { ls -l /proc/[0-9]*/fd 2>/dev/null | grep -c /dev/vfio; }

# 1. SIGKILL while the guest reads.
vmm $(vmm_args) --cmdline "$(cmdline dd-loop)" >/tmp/run1.log 2>&1 &
pid=$!
i=0
while ! grep -q "io-running" /tmp/run1.log && [ $i -lt 900 ]; do
  sleep 0.1; i=$((i + 1))
  # Progress, so the harness can tell a slow boot from a silent one, and what the guest printed.
  [ $((i % 150)) -eq 0 ] && echo "@@TB L1 waiting run=1 secs=$((i / 10)) log_lines=$(wc -l </tmp/run1.log)"
done
if grep -q "io-running" /tmp/run1.log; then
  echo "@@TB L1 io-seen run=1"
else
  echo "@@TB L1 no-io run=1: the guest's console follows"; tail -n 40 /tmp/run1.log
fi
sleep 1
kill -9 $pid
wait $pid
echo "@@TB L1 killed rc=$? vfio_fds=$(vfio_fds)"

# 2. The guest kernel panics while it reads.
vmm $(vmm_args) --cmdline "$(cmdline io-panic)" >/tmp/run2.log 2>&1
rc=$?
grep -q "panicking mid-io" /tmp/run2.log && echo "@@TB L1 io-seen run=2"
echo "@@TB L1 guest-panicked rc=$rc vfio_fds=$(vfio_fds)"

# 3. The same device in a new VM.
vmm $(vmm_args) --cmdline "$(cmdline nvme-pt)"
echo "@@TB VMM exit=$?"
"#;

fn outcome() -> Result<Option<Outcome>, TestbedError> {
    let Some(tb) = testbed::require() else {
        return Ok(None);
    };
    let s = Scenario::l1_script("viommu-teardown", SCRIPT).with_vmm();
    Ok(Some(tb.run(&s)?))
}

#[test]
fn killed_vmm_or_crashed_guest_mid_io_leaves_the_device_free_and_whole() -> Result<(), TestbedError>
{
    let Some(out) = outcome()? else {
        return Ok(());
    };
    let seen: Vec<String> = out
        .markers_named("L1", "io-seen")
        .filter_map(|m| m.fields.get("run").cloned())
        .collect();
    out.ensure(
        seen == ["1", "2"],
        format!("I/O was not running when the VMs died (runs seen: {seen:?})"),
    )?;
    let killed = out.expect_marker("L1", "killed")?;
    out.ensure(
        killed.fields.get("rc").map(String::as_str) == Some("137")
            && killed.fields.get("vfio_fds").map(String::as_str) == Some("0"),
        format!("after SIGKILL: {}", killed.raw),
    )?;
    let panicked = out.expect_marker("L1", "guest-panicked")?;
    out.ensure(
        panicked.fields.get("rc").map(String::as_str) == Some("1")
            && panicked.fields.get("vfio_fds").map(String::as_str) == Some("0"),
        format!("after the guest panic: {}", panicked.raw),
    )?;
    let Some(tb) = testbed::require() else {
        return Ok(());
    };
    let (want, got) = (tb.disk_head_md5(16 << 20)?, out.nvme_read_md5()?);
    out.ensure(
        got == want,
        format!("the third VM read md5 {got}, the image's is {want}"),
    )?;
    out.ensure(out.vmm_exit()? == 0, "the third vmm did not exit 0")
}
