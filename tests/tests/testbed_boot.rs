//! Linux boots in the nested testbed: first under QEMU+KVM inside L1 (proving the testbed itself),
//! then under our vmm: reaching init with the vCPUs and memory asked for, and exiting with the
//! code that says how the guest ended. See resources/testbed/README.md; logs land in
//! target/testbed/logs/<scenario>.log.

use integration::testbed::{self, L2Init, L2Vmm, Outcome, Scenario, TestbedError};

/// Memory the L2 kernel keeps for itself (its image, page structures, reserved firmware ranges)
/// and so never reports in MemTotal: about 55 MiB at 512 MiB under QEMU. The margin is generous
/// but still tells 384 MiB from 512 MiB.
const KERNEL_RESERVE_MARGIN_KB: u64 = 96 * 1024;

fn check_memory(out: &Outcome, init: L2Init, requested_mib: u64) -> Result<(), TestbedError> {
    let requested_kb = requested_mib * 1024;
    out.ensure(
        init.mem_kb <= requested_kb && init.mem_kb + KERNEL_RESERVE_MARGIN_KB >= requested_kb,
        format!(
            "L2 MemTotal is {} kB; expected a little under the {requested_kb} kB asked for",
            init.mem_kb
        ),
    )
}

fn check_cpus(out: &Outcome, init: L2Init, cpus: u32) -> Result<(), TestbedError> {
    out.ensure(
        init.cpus == cpus,
        format!("L2 sees {} CPUs, {cpus} were asked for", init.cpus),
    )
}

fn check_l1(out: &Outcome) -> Result<(), TestbedError> {
    let ready = out.l1_ready()?;
    out.ensure(ready.field("kvm") == Some("yes"), "L1 has no /dev/kvm")?;
    out.ensure(ready.field("iommu") == Some("yes"), "L1 has no IOMMU")
}

fn panic_checks(out: &Outcome) -> Result<i32, TestbedError> {
    out.expect_marker("L2", "panicking")?;
    out.ensure(
        out.markers_named("L2", "pvpanic")
            .any(|m| m.field("pvpanic") == Some("bound")),
        "the L2 kernel found no pvpanic device (ACPI QEMU0001 at port 0x505)",
    )?;
    out.vmm_exit()
}

// --- The testbed itself, with QEMU as the L2 VMM --------------------------------------------------

#[test]
fn testbed_l2_linux_boots_under_qemu_kvm_inside_l1() -> Result<(), TestbedError> {
    let Some(tb) = testbed::require() else {
        return Ok(());
    };
    let out = tb.run(&Scenario::l2_boot("qemu-l2-poweroff", L2Vmm::Qemu))?;
    check_l1(&out)?;
    let init = out.l2_init()?;
    check_cpus(&out, init, 1)?;
    check_memory(&out, init, 512)?;
    let rc = out.vmm_exit()?;
    out.ensure(rc == 0, format!("QEMU exited {rc} after the L2 power-off"))
}

#[test]
fn testbed_l2_panic_is_reported_through_pvpanic_under_qemu() -> Result<(), TestbedError> {
    let Some(tb) = testbed::require() else {
        return Ok(());
    };
    let out = tb.run(&Scenario::l2_boot("qemu-l2-panic", L2Vmm::Qemu).action("panic"))?;
    let rc = panic_checks(&out)?;
    out.ensure(rc != 0, "QEMU exited 0 although the L2 kernel panicked")
}

/// L1 binds the NVMe to vfio-pci and QEMU passes it to the L2 guest (behind QEMU's own virtual
/// VT-d when `viommu`), whose init prints the md5 of the whole disk: the chain the passthrough
/// issues build on, validated with QEMU.
fn qemu_nvme_passthrough(name: &str, viommu: bool) -> Scenario {
    let (machine, l2_iommu) = if viommu {
        (
            "-machine q35,kernel-irqchip=split -device intel-iommu,intremap=on,caching-mode=on",
            " intel_iommu=on",
        )
    } else {
        ("", "")
    };
    let script = format!(
        "nvme=$(tb-vfio-bind --first 1b36:0010) || exit 1\n\
         bdf=${{nvme##*/}}\n\
         qemu-system-x86_64 -enable-kvm -cpu host {machine} -smp 1 -m 512M -nodefaults \
         -display none -serial stdio -no-reboot -device vfio-pci,host=$bdf \
         -kernel /testbed/vmlinuz -initrd /testbed/l2.cpio.gz \
         -append 'console=ttyS0 panic=-1 quiet{l2_iommu} tb.action=md5'\n\
         echo \"@@TB VMM exit=$?\"\n"
    );
    Scenario::l1_script(name, &script)
}

fn check_passthrough_md5(tb: &testbed::Testbed, out: &Outcome) -> Result<(), TestbedError> {
    out.expect_marker("L1", "vfio-bound")?;
    let md5 = out.expect_marker("L2", "md5")?;
    let want = tb.disk_md5()?;
    out.ensure(
        md5.field("md5") == Some(want.as_str()),
        format!(
            "L2 read md5 {:?} from the NVMe, the disk image has {want}",
            md5.field("md5")
        ),
    )?;
    let rc = out.vmm_exit()?;
    out.ensure(rc == 0, format!("QEMU exited {rc}"))
}

#[test]
fn testbed_l2_reads_known_disk_from_nvme_passed_through_by_qemu_vfio() -> Result<(), TestbedError> {
    let Some(tb) = testbed::require() else {
        return Ok(());
    };
    let out = tb.run(&qemu_nvme_passthrough("qemu-l2-nvme-vfio", false))?;
    check_passthrough_md5(tb, &out)
}

#[test]
fn testbed_l2_reads_known_disk_from_nvme_behind_qemu_viommu() -> Result<(), TestbedError> {
    let Some(tb) = testbed::require() else {
        return Ok(());
    };
    let out = tb.run(&qemu_nvme_passthrough("qemu-l2-nvme-viommu", true))?;
    let init = out.expect_marker("L2", "init")?;
    out.ensure(
        init.field("iommu") == Some("yes"),
        "the L2 kernel found no IOMMU behind QEMU's intel-iommu",
    )?;
    check_passthrough_md5(tb, &out)
}

// --- Our vmm --------------------------------------------------------------------------------------

/// Shared by the tests that check "reaches init with 1 vCPU" and "exits 0 on power-off".
fn vmm_1_vcpu_poweroff() -> Scenario {
    Scenario::l2_boot("vmm-l2-1cpu-poweroff", L2Vmm::Ours)
        .cpus(1)
        .memory_mib(512)
}

#[test]
fn l2_linux_reaches_init_under_vmm_with_1_vcpu() -> Result<(), TestbedError> {
    let Some(tb) = testbed::require() else {
        return Ok(());
    };
    let out = tb.run_shared(&vmm_1_vcpu_poweroff())?;
    check_l1(&out)?;
    let init = out.l2_init()?;
    check_cpus(&out, init, 1)?;
    check_memory(&out, init, 512)
}

#[test]
fn vmm_exits_0_when_l2_powers_off() -> Result<(), TestbedError> {
    let Some(tb) = testbed::require() else {
        return Ok(());
    };
    let out = tb.run_shared(&vmm_1_vcpu_poweroff())?;
    out.expect_marker("L2", "powering")?;
    let rc = out.vmm_exit()?;
    out.ensure(rc == 0, format!("vmm exited {rc} after the L2 power-off"))
}

#[test]
fn l2_linux_reaches_init_under_vmm_with_2_vcpus_and_requested_memory() -> Result<(), TestbedError> {
    let Some(tb) = testbed::require() else {
        return Ok(());
    };
    let out = tb.run(
        &Scenario::l2_boot("vmm-l2-2cpu-384m", L2Vmm::Ours)
            .cpus(2)
            .memory_mib(384),
    )?;
    let init = out.l2_init()?;
    check_cpus(&out, init, 2)?;
    let online = out.expect_marker("L2", "init")?.field("online");
    out.ensure(
        online == Some("0-1"),
        format!("L2 CPUs online: {online:?}, expected 0-1"),
    )?;
    check_memory(&out, init, 384)?;
    let rc = out.vmm_exit()?;
    out.ensure(rc == 0, format!("vmm exited {rc} after the L2 power-off"))
}

#[test]
fn vmm_exits_0_when_l2_reboots() -> Result<(), TestbedError> {
    let Some(tb) = testbed::require() else {
        return Ok(());
    };
    let out = tb.run(&Scenario::l2_boot("vmm-l2-reboot", L2Vmm::Ours).action("reboot"))?;
    out.expect_marker("L2", "rebooting")?;
    let rc = out.vmm_exit()?;
    out.ensure(rc == 0, format!("vmm exited {rc} after the L2 reboot"))
}

#[test]
fn vmm_exits_nonzero_when_l2_kernel_panics() -> Result<(), TestbedError> {
    let Some(tb) = testbed::require() else {
        return Ok(());
    };
    let out = tb.run(&Scenario::l2_boot("vmm-l2-panic", L2Vmm::Ours).action("panic"))?;
    let rc = panic_checks(&out)?;
    out.ensure(rc != 0, "vmm exited 0 although the L2 kernel panicked")?;
    let said = out.vmm_stderr_last().unwrap_or_default();
    out.ensure(
        said.to_lowercase().contains("panic"),
        format!("vmm's last stderr line does not say the guest panicked: {said:?}"),
    )
}

// --- The harness ----------------------------------------------------------------------------------

/// A run that goes silent while L1 lives (what a hung VMM or L2 looks like) fails as such: only a
/// frozen L1, whose heartbeat stops too, is taken for a testbed freeze and run again.
#[test]
fn a_silent_run_with_l1_alive_fails_as_a_hang_not_as_a_testbed_freeze() -> Result<(), TestbedError>
{
    let Some(tb) = testbed::require() else {
        return Ok(());
    };
    let silent = Scenario::l1_script("harness-silent-l1", "sleep 120\n")
        .silence_timeout(std::time::Duration::from_secs(30));
    match tb.run(&silent) {
        Err(TestbedError::Run { what, .. }) if what.contains("no console output") => Ok(()),
        Err(e) => Err(e),
        Ok(_) => Err(TestbedError::Unavailable(
            "a scenario silent for 120 s finished inside a 30 s silence limit".into(),
        )),
    }
}
