//! Guests of real size on both host interfaces (issue 15): an L2 Linux of 5 GiB with L1's two NVMe
//! controllers passed through, both doing DMA at once into buffers whose every page lies above
//! 4 GiB of guest-physical memory, without a vIOMMU (IOVA = GPA), behind our VT-d with
//! `iommu.forcedac=1` (the guest's IOVAs above 4 GiB too) and behind it with `iommu=pt`. One L1 session per
//! backend: the VFIO container on Debian's 6.1, iommufd on the testbed's 6.12 L1 (whose default it
//! is). Data is exact both ways: the disk image's md5 read, a pattern written that lands in the
//! L0 file. Without a vIOMMU the two devices share one host domain, so guest RAM is pinned once;
//! behind the VT-d on iommufd too while their view is identity (boot, `iommu=pt`), and while
//! the guest puts them in one translated domain (the two as functions of one slot, which it
//! groups): the second uses the first one's IOAS.
//! After each power-off no VFIO or iommufd file stays open; on iommufd, neither after a vmm
//! killed mid-I/O, and the container backend then takes the same device on the same kernel.

use std::sync::Arc;

use integration::testbed::{self, L1Kernel, Outcome, Scenario, TestbedError};

/// L2 memory (MiB): more than 4 GiB of RAM puts 2 GiB above the 32-bit hole (RAM ends at 3 GiB
/// below it).
const L2_MIB: u64 = 5120;
/// Where the two runs' patterns go on the 4 MiB scratch disk (the `dma-high` action's
/// `tb.offset=`).
const OFFSET_NO_VIOMMU: usize = 1 << 20;
const OFFSET_VTD: usize = 2 << 20;
const OFFSET_PT: usize = 3 << 20;
/// The two functions of one slot in one guest domain (iommufd only).
const OFFSET_SHARED: usize = 0;
/// The runs of a session, in order: no vIOMMU, behind the VT-d translated, and behind the VT-d
/// with the guest's `iommu=pt` (both devices in its identity domain).
const RUNS: [&str; 3] = ["plain", "vtd", "pt"];
/// The bytes each run writes there.
const PATTERN_BYTES: usize = 1 << 20;

/// The L1 script: binds both NVMe controllers, then boots the 5 GiB L2 twice (no vIOMMU, then
/// behind our VT-d), each time sampling the vmm's pinned memory while it runs; `$EXTRA` (set
/// by the caller's prologue) adds `,backend=...` to every `--device`.
const SCRIPT: &str = r#"
nvmes=$(tb-vfio-bind 1b36:0010) || exit 1
# VFIO and iommufd files any process in L1 holds open.
open_files() { ls -l /proc/[0-9]*/fd 2>/dev/null | grep -c -E '/dev/vfio|/dev/iommu'; }
devs() { for d in $nvmes; do printf ' --device path=%s%s%s' "$d" "$1" "$EXTRA"; done; }
cmdline() { echo "console=ttyS0 panic=-1 quiet tb.action=dma-high tb.offset=$1 $2"; }
# The most memory the vmm had pinned (VmPin: iommufd) and locked (VmLck: type1) while it ran.
watch_pins() {
  pin=0 lck=0
  while kill -0 "$1" 2>/dev/null; do
    p=$(awk '/^VmPin:/ {print $2}' /proc/$1/status 2>/dev/null)
    l=$(awk '/^VmLck:/ {print $2}' /proc/$1/status 2>/dev/null)
    [ "${p:-0}" -gt "$pin" ] && pin=$p
    [ "${l:-0}" -gt "$lck" ] && lck=$l
    sleep 1
  done
  echo "@@TB L1 pinned run=$2 pin_kb=$pin lck_kb=$lck"
}
# While the guest's two devices share one host IOAS: what the vmm pins against what its devices'
# own IOASes map (the --stats-json `host_domains`), at the last moment both held still.
watch_shared() {
  last="" still=""
  while kill -0 "$1" 2>/dev/null; do
    p=$(awk '/^VmPin:/ {print $2}' /proc/$1/status 2>/dev/null)
    j=$(tr -d ' \n' <"$2" 2>/dev/null)
    pages=$(echo "$j" | grep -o '"own_pages":[0-9]*' | cut -d: -f2 | awk '{s += $1} END {print s + 0}')
    follows=$(echo "$j" | grep -o '"on":"00:[^"]*"' | wc -l)
    # What the devices on another's IOAS still map in their own (serde_json sorts the keys).
    extra=$(echo "$j" | grep -o '"on":"00:[^"]*","own_mappings":[0-9]*,"own_pages":[0-9]*' |
      sed 's/.*://' | awk '{s += $1} END {print s + 0}')
    identity=$(echo "$j" | grep -o '"on":"identity"' | wc -l)
    now="pin_kb=${p:-0} own_kb=$((pages * 4)) follows=$follows follower_own_kb=$((extra * 4)) identity=$identity"
    [ "$now" = "$last" ] && [ "$follows" -gt 0 ] && [ "$identity" = 0 ] && still=$now
    last=$now
    sleep 0.5
  done
  echo "@@TB L1 pinned-shared run=$3 $still"
}
run() {
  name=$1; shift
  start=$(cut -d' ' -f1 /proc/uptime)
  RUST_LOG=info vmm --kernel /testbed/vmlinuz --initramfs /testbed/l2.cpio.gz --cpus boot=1 \
    --memory size=5120M --stats-json /tmp/$name.json "$@" 2>/tmp/$name.err &
  pid=$!
  [ "$name" = shared ] && watch_shared $pid /tmp/$name.json $name &
  watch_pins $pid $name
  wait $pid
  rc=$?
  echo "@@TB L1 run=$name rc=$rc start=$start end=$(cut -d' ' -f1 /proc/uptime) open_files=$(open_files)"
  grep -E "backend |guest RAM mapped|address width" /tmp/$name.err | sed "s/^/@@TB L1 log run=$name /"
  tail -n 3 /tmp/$name.err
  echo "@@TB L1 stats run=$name $(tr -d ' \n' </tmp/$name.json)"
}
run plain $(devs "") --cmdline "$(cmdline 1048576)"
run vtd --viommu check=on $(devs ,iommu=on) --cmdline "$(cmdline 2097152 'intel_iommu=on iommu.forcedac=1')"
run pt --viommu check=on $(devs ,iommu=on) --cmdline "$(cmdline 3145728 'intel_iommu=on iommu=pt')"
"#;

/// iommufd only: both controllers as functions 0 and 1 of slot 5, without ACS, which the guest
/// puts in one IOMMU group and so in one translated domain; both do DMA above 4 GiB at once.
const SHARED_DOMAIN: &str = r#"
n0=$(echo "$nvmes" | sed -n 1p)
n1=$(echo "$nvmes" | sed -n 2p)
run shared --viommu check=on --device path=$n0,iommu=on,addr=5.0$EXTRA \
  --device path=$n1,iommu=on,addr=5.1$EXTRA --cmdline "$(cmdline 0 'intel_iommu=on iommu.forcedac=1')"
"#;

/// iommufd only: SIGKILL mid-I/O, then the same device under the container backend.
const KILL_THEN_CONTAINER: &str = r#"
nvme=$(echo "$nvmes" | head -n1)
vmm --kernel /testbed/vmlinuz --initramfs /testbed/l2.cpio.gz --memory size=384M --viommu \
  --device path=$nvme,iommu=on \
  --cmdline "console=ttyS0 panic=-1 quiet intel_iommu=on tb.action=dd-loop" >/tmp/kill.log 2>&1 &
pid=$!
i=0
while ! grep -q "io-running" /tmp/kill.log && [ $i -lt 900 ]; do sleep 0.1; i=$((i + 1)); done
grep -q "io-running" /tmp/kill.log && echo "@@TB L1 io-seen run=kill"
sleep 1
kill -9 $pid
wait $pid
echo "@@TB L1 killed rc=$? open_files=$(open_files)"
RUST_LOG=info vmm --kernel /testbed/vmlinuz --initramfs /testbed/l2.cpio.gz --memory size=384M \
  --device path=$nvme,backend=container --cmdline "console=ttyS0 panic=-1 quiet tb.action=md5" \
  2>/tmp/after.err
echo "@@TB L1 after-kill rc=$?"
grep -E "backend " /tmp/after.err | sed "s/^/@@TB L1 log run=after /"
"#;

fn session(kernel: L1Kernel) -> Result<Option<(Arc<Outcome>, std::path::PathBuf)>, TestbedError> {
    let Some(tb) = testbed::require() else {
        return Ok(None);
    };
    let (name, script) = match kernel {
        L1Kernel::Distro => ("large-guests-container", format!("EXTRA=\n{SCRIPT}")),
        L1Kernel::Iommufd => (
            "large-guests-iommufd",
            format!("EXTRA=\n{SCRIPT}{SHARED_DOMAIN}{KILL_THEN_CONTAINER}"),
        ),
    };
    let scratch = tb.fresh_scratch_disk(&format!("{name}-scratch.img"))?;
    let s = Scenario::l1_script(name, &script)
        .with_vmm()
        .l1_kernel(kernel)
        // The 5 GiB L2 pinned whole (no vIOMMU), L1's own memory and QEMU-free headroom.
        .l1_mem_mib(7168)
        .scratch_nvme(&scratch, "nvme1")
        .timeout(std::time::Duration::from_secs(900))
        .silence_timeout(std::time::Duration::from_secs(240));
    Ok(Some((tb.run_shared(&s)?, scratch)))
}

/// The `dma-high` marker of `op` (read or write) in run `run` (the markers come in run order).
fn dma_marker(out: &Outcome, run: usize, op: &str) -> Result<testbed::Marker, TestbedError> {
    out.markers_named("L2", "dma-high")
        .filter(|m| m.field("op") == Some(op))
        .nth(run)
        .cloned()
        .ok_or_else(|| out.error(format!("no dma-high op={op} marker for run {run}")))
}

fn hex(out: &Outcome, m: &testbed::Marker, key: &str) -> Result<u64, TestbedError> {
    m.field(key)
        .and_then(|v| u64::from_str_radix(v.trim_start_matches("0x"), 16).ok())
        .ok_or_else(|| out.error(format!("no hex {key} in {}", m.raw)))
}

/// Whether the `dma-high` action's pattern is at byte `at` of the L0 scratch file `scratch`.
fn patterns_in(scratch: &std::path::Path) -> Result<impl Fn(usize) -> bool, TestbedError> {
    let img = std::fs::read(scratch)
        .map_err(|e| TestbedError::io(format!("reading {}", scratch.display()), e))?;
    let pattern: Vec<u8> = b"tb-high-pattern\n"
        .iter()
        .copied()
        .cycle()
        .take(PATTERN_BYTES)
        .collect();
    Ok(move |at: usize| img.get(at..at + PATTERN_BYTES) == Some(&pattern[..]))
}

/// Both runs: the image read exactly and the pattern written, every buffer page above 4 GiB.
fn dma_lands_above_4_gib(kernel: L1Kernel) -> Result<(), TestbedError> {
    let Some((out, scratch)) = session(kernel)? else {
        return Ok(());
    };
    let Some(tb) = testbed::require() else {
        return Ok(());
    };
    let want = tb.disk_head_md5(16 << 20)?;
    for (run, name) in RUNS.iter().enumerate() {
        let exit = out
            .markers_named("L1", "run")
            .find(|m| m.field("run") == Some(name))
            .ok_or_else(|| out.error(format!("run {name} did not finish")))?;
        out.ensure(
            exit.field("rc") == Some("0"),
            format!("run {name}: vmm failed: {}", exit.raw),
        )?;
        for op in ["read", "write"] {
            let m = dma_marker(&out, run, op)?;
            out.ensure(
                m.field("ok") == Some("1"),
                format!("run {name}: {op} failed: {}", m.raw),
            )?;
            let minpa = hex(&out, &m, "minpa")?;
            out.ensure(
                minpa >= 1 << 32,
                format!("run {name}: a {op} buffer page below 4 GiB: {}", m.raw),
            )?;
        }
        let read = dma_marker(&out, run, "read")?;
        out.ensure(
            read.field("md5") == Some(want.as_str()),
            format!(
                "run {name}: read md5 {:?}, the image's is {want}",
                read.field("md5")
            ),
        )?;
    }
    let patterns = patterns_in(&scratch)?;
    for at in [OFFSET_NO_VIOMMU, OFFSET_VTD, OFFSET_PT] {
        out.ensure(
            patterns(at),
            format!("the pattern written from above 4 GiB is not at byte {at} of the L0 file"),
        )?;
    }
    // Behind the VT-d the guest's driver kept the protocol and the host refused nothing.
    let stats = out
        .markers_named("L1", "stats")
        .find(|m| m.field("run") == Some("vtd"))
        .ok_or_else(|| out.error("no stats of the vtd run"))?;
    for (key, want) in [("\"host_errors\":0", true), ("\"faults\":0", true)] {
        out.ensure(
            stats.raw.contains(key) == want,
            format!("vtd run: want {key}: {}", stats.raw),
        )?;
    }
    // The testbed's host IOMMU (L0 QEMU's intel-iommu) maps 39 bits: the unit was given the width
    // that fits it, so the guest's IOVAs (forcedac: from the top down) stay mappable.
    out.ensure(
        stats.raw.contains("\"aw_bits\":39"),
        format!(
            "vtd run: the unit's width does not fit the 39-bit host: {}",
            stats.raw
        ),
    )?;
    out.ensure(
        stats.raw.contains("\"total\":0"),
        format!(
            "vtd run: the protocol checker found violations: {}",
            stats.raw
        ),
    )
}

#[test]
fn container_5_gib_guest_dma_lands_above_4_gib_without_and_behind_our_vtd(
) -> Result<(), TestbedError> {
    dma_lands_above_4_gib(L1Kernel::Distro)
}

#[test]
fn iommufd_5_gib_guest_dma_lands_above_4_gib_without_and_behind_our_vtd() -> Result<(), TestbedError>
{
    dma_lands_above_4_gib(L1Kernel::Iommufd)
}

/// In run `run` the two devices shared one domain: the vmm pinned guest RAM once, not twice.
fn ram_pinned_once(
    kernel: L1Kernel,
    run: &str,
    field: &str,
    backend: &str,
) -> Result<(), TestbedError> {
    let Some((out, _)) = session(kernel)? else {
        return Ok(());
    };
    let pinned = out
        .markers_named("L1", "pinned")
        .find(|m| m.field("run") == Some(run))
        .ok_or_else(|| out.error(format!("no pinned marker for the {run} run")))?;
    let kb = pinned
        .field_num::<u64>(field)
        .ok_or_else(|| out.error(format!("no {field}: {}", pinned.raw)))?;
    let ram_kb = L2_MIB * 1024;
    out.ensure(
        kb >= ram_kb && kb < ram_kb + ram_kb / 10,
        format!(
            "pinned {kb} KiB for {ram_kb} KiB of guest RAM and two devices: {}",
            pinned.raw
        ),
    )?;
    out.ensure(
        out.console_contains(&format!("backend {backend}")),
        format!("the devices did not get the {backend} backend"),
    )
}

#[test]
fn container_two_devices_without_a_viommu_pin_guest_ram_once() -> Result<(), TestbedError> {
    ram_pinned_once(L1Kernel::Distro, "plain", "lck_kb", "container")
}

#[test]
fn iommufd_two_devices_without_a_viommu_pin_guest_ram_once() -> Result<(), TestbedError> {
    ram_pinned_once(L1Kernel::Iommufd, "plain", "pin_kb", "iommufd")
}

/// Behind the VT-d on iommufd, devices whose view is identity (translation off at boot; the
/// guest's `iommu=pt` for the whole run) share one IOAS: guest RAM is pinned once, not once per
/// device (the container backend pins it per device: a group cannot change containers).
#[test]
fn iommufd_two_devices_behind_our_vtd_share_one_identity_ioas_and_pin_guest_ram_once(
) -> Result<(), TestbedError> {
    ram_pinned_once(L1Kernel::Iommufd, "vtd", "pin_kb", "iommufd")?;
    ram_pinned_once(L1Kernel::Iommufd, "pt", "pin_kb", "iommufd")
}

/// Once the guest powered off and the vmm exited, no VFIO or iommufd file is open in L1 (the
/// devices and their domains went with it: the next run takes the same devices).
fn released_after_power_off(kernel: L1Kernel) -> Result<(), TestbedError> {
    let Some((out, _)) = session(kernel)? else {
        return Ok(());
    };
    let shared = matches!(kernel, L1Kernel::Iommufd).then_some("shared");
    for name in RUNS.into_iter().chain(shared) {
        let exit = out
            .markers_named("L1", "run")
            .find(|m| m.field("run") == Some(name))
            .ok_or_else(|| out.error(format!("run {name} did not finish")))?;
        out.ensure(
            exit.field("rc") == Some("0") && exit.field("open_files") == Some("0"),
            format!("run {name}: files left open after power-off: {}", exit.raw),
        )?;
    }
    Ok(())
}

#[test]
fn container_devices_are_released_when_the_guest_powers_off() -> Result<(), TestbedError> {
    released_after_power_off(L1Kernel::Distro)
}

#[test]
fn iommufd_devices_are_released_when_the_guest_powers_off() -> Result<(), TestbedError> {
    released_after_power_off(L1Kernel::Iommufd)
}

#[test]
fn killed_iommufd_vmm_leaves_no_file_open_and_the_container_backend_takes_the_device_next(
) -> Result<(), TestbedError> {
    let Some((out, _)) = session(L1Kernel::Iommufd)? else {
        return Ok(());
    };
    out.expect_marker("L1", "io-seen")?;
    let killed = out.expect_marker("L1", "killed")?;
    out.ensure(
        killed.field("open_files") == Some("0"),
        format!(
            "VFIO or iommufd files still open after SIGKILL: {}",
            killed.raw
        ),
    )?;
    let after = out.expect_marker("L1", "after-kill")?;
    out.ensure(
        after.field("rc") == Some("0"),
        format!("the container-backend vmm failed: {}", after.raw),
    )?;
    out.ensure(
        out.console_contains("backend container (asked)")
            || out.console_contains("backend container"),
        "the device did not get the container backend",
    )?;
    let Some(tb) = testbed::require() else {
        return Ok(());
    };
    let want = tb.disk_md5()?;
    let got = out
        .markers_named("L2", "md5")
        .last()
        .and_then(|m| m.field("md5").map(str::to_string))
        .ok_or_else(|| out.error("no md5 marker after the kill"))?;
    out.ensure(
        got == want,
        format!("read md5 {got}, the image's is {want}"),
    )
}

/// Behind the VT-d on iommufd, two functions of one slot without ACS, which the guest puts in
/// one IOMMU group and so in one translated domain (`iommu.forcedac=1`), share one host IOAS:
/// the second function's own IOAS maps nothing while both do DMA above 4 GiB at once with
/// exact data, and what L1 pins for the vmm is exactly what the first one's IOAS maps (the
/// guest's domain pinned once, not once per device).
#[test]
fn iommufd_two_functions_in_one_guest_domain_share_one_host_ioas_and_pin_it_once(
) -> Result<(), TestbedError> {
    let Some((out, scratch)) = session(L1Kernel::Iommufd)? else {
        return Ok(());
    };
    let Some(tb) = testbed::require() else {
        return Ok(());
    };
    let exit = out
        .markers_named("L1", "run")
        .find(|m| m.field("run") == Some("shared"))
        .ok_or_else(|| out.error("the shared run did not finish"))?;
    out.ensure(
        exit.field("rc") == Some("0"),
        format!("shared run: vmm failed: {}", exit.raw),
    )?;
    let grouped = out.markers_named("L2", "iommu-group").any(|m| {
        m.field("devices")
            .is_some_and(|d| d.contains("0000:00:05.0") && d.contains("0000:00:05.1"))
    });
    out.ensure(
        grouped,
        "the guest did not put 00:05.0 and 00:05.1 in one IOMMU group",
    )?;
    let shared_run = RUNS.len();
    for op in ["read", "write"] {
        let m = dma_marker(&out, shared_run, op)?;
        out.ensure(
            m.field("ok") == Some("1") && hex(&out, &m, "minpa")? >= 1 << 32,
            format!("shared run: {op} failed or below 4 GiB: {}", m.raw),
        )?;
    }
    let want = tb.disk_head_md5(16 << 20)?;
    let read = dma_marker(&out, shared_run, "read")?;
    out.ensure(
        read.field("md5") == Some(want.as_str()),
        format!(
            "shared run: read md5 {:?}, the image's is {want}",
            read.field("md5")
        ),
    )?;
    let patterns = patterns_in(&scratch)?;
    out.ensure(
        patterns(OFFSET_SHARED),
        format!("the shared run's pattern is not at byte {OFFSET_SHARED} of the L0 file"),
    )?;

    let stats = out
        .markers_named("L1", "stats")
        .find(|m| m.field("run") == Some("shared"))
        .ok_or_else(|| out.error("no stats of the shared run"))?;
    let json: serde_json::Value = stats
        .raw
        .find('{')
        .and_then(|at| serde_json::from_str(&stats.raw[at..]).ok())
        .ok_or_else(|| out.error(format!("shared run: stats are not JSON: {}", stats.raw)))?;
    for key in ["host_errors", "faults"] {
        out.ensure(json[key] == 0, format!("shared run: {key} = {}", json[key]))?;
    }
    out.ensure(
        json["host_domain_joins"].as_u64() >= Some(1),
        format!("shared run: no device joined another's host domain: {json}"),
    )?;
    // Sampled while the guest translated (the stats at power-off find translation off).
    let pinned = out
        .markers_named("L1", "pinned-shared")
        .next()
        .ok_or_else(|| out.error("no pinned-shared marker"))?;
    let field = |key| pinned.field_num::<u64>(key);
    out.ensure(
        field("follows") == Some(1) && field("follower_own_kb") == Some(0),
        format!(
            "shared run: no moment with one device on the other's IOAS and its own empty: {}",
            pinned.raw
        ),
    )?;
    out.ensure(
        field("pin_kb").is_some()
            && field("pin_kb") == field("own_kb")
            && field("own_kb") > Some(0),
        format!(
            "shared run: the vmm pinned other than the shared IOAS maps (want pin_kb = own_kb > \
             0): {}",
            pinned.raw
        ),
    )
}
