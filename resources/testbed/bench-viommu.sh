#!/usr/bin/env bash
# Benchmark (not a test), issue 6: what a vIOMMU costs a passed-through NVMe, ours against QEMU's.
# In ONE L1 session (one L0 boot), the same L2 Linux (2 vCPUs, 512M) runs the same workloads on
# L1's NVMe (bench-viommu-io.sh: dd 4 KiB QD1, dd 128 KiB, fio 2-job random 4 KiB) under five
# configurations:
#   qemu-viommu   QEMU 7.2 (Debian's, in L1), q35 + -device intel-iommu,caching-mode=on + vfio-pci
#   qemu          QEMU, q35 + vfio-pci, no vIOMMU (the ceiling)
#   ours-strict   our vmm --viommu (flush=strict)
#   ours-deferred our vmm --viommu flush=deferred
#   ours          our vmm, no vIOMMU
# Ours uses the VFIO container (backend=container). With --l1 iommufd, L1 runs the testbed's 6.12
# kernel that has both interfaces (build-l1-iommufd.sh) and ours also runs on iommufd, same run:
#   ours-strict-iommufd, ours-deferred-iommufd, ours-iommufd (backend=iommufd)
# For each cell it measures:
#   - throughput: MB/s from L2's clock around the workload (fio's own IOPS too);
#   - VFIO map/unmap calls: ours from --stats-json (rewritten every 100 ms, read by L1 at each
#     marker); QEMU's from `strace -f -X raw -e trace=ioctl` (0x3b71 = VFIO_IOMMU_MAP_DMA, 0x3b72 =
#     VFIO_IOMMU_UNMAP_DMA) in a second, untimed pass of the two QEMU configurations, because
#     strace stops QEMU at every ioctl (KVM_RUN included) and would distort the timed pass;
#   - L2's VM exits (L1 KVM's debugfs counters, read at each marker);
#   - host IOTLB invalidations: L0 QEMU traces every invalidation descriptor L1's kernel sends to
#     its VT-d (-trace 'vtd_inv_desc*' -D, wall-clock timestamps with -msg timestamp=on); this
#     script stamps every console line with the host's clock as it arrives, and a cell's
#     invalidations are the trace lines between the arrival of its begin and end markers (the L2
#     stays idle 1 s after begin and before end, so nothing else falls in the window).
# Writes a table on stdout, RESULTS.json and RESULTS.png (bench-viommu-report.py, matplotlib).
# Every configuration's timed boot runs --rounds times (default 3), interleaved; a cell's time is
# the median over its rounds (the others are in the JSON), its counts those of that round.
# Usage: bench-viommu.sh [--vmm PATH] [--out DIR] [--count4k N] [--count128k N] [--fio-ios N]
#                        [--l1-smp N] [--no-strace] [--queue sync|async] [--rounds N]
#                        [--l1 distro|iommufd] [--configs A,B,...] [--workloads A+B...]
#                        [--sessions N]
#   --vmm PATH  default: cargo build --release -p vmm (target dir target/testbed/cargo)
#   --out DIR   default target/testbed/bench-viommu (log, L0 trace, results.json, results.png)
#   --configs   only these configurations (names as above, without -iommufd: the backends
#               follow --l1), e.g. qemu-viommu,ours-strict; also ours-strict-ir-off (ours strict
#               with intremap=off: no interrupt remapping, in-kernel irqchip, as QEMU's default
#               intel-iommu), and qemu-viommu-ir (QEMU's intel-iommu with intremap=on,eim=on and
#               kernel-irqchip=split: the interrupt remapping ours does by default), which only
#               run when named here
#   --workloads only these workloads, joined by '+' (dd-4k+dd-128k+fio-rand4k)
#   --sessions  at most N L1 sessions (default: rounds + 2); a frozen L1 ends one (see below)
set -euo pipefail
source "$(dirname "$0")/lib.sh"

vmm="" out="$TB_OUT/bench-viommu" count4k=2000 count128k=1024 fioios=1500 l1smp=1 strace_pass=1 queue=""
rounds=3 l1=distro configs=qemu-viommu,ours-strict,ours-deferred,qemu,ours workloads="" sessions=""
while (($#)); do
  case "$1" in
    --vmm) vmm="$(readlink -f "$2")"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --count4k) count4k="$2"; shift 2 ;;
    --count128k) count128k="$2"; shift 2 ;;
    --fio-ios) fioios="$2"; shift 2 ;;
    --l1-smp) l1smp="$2"; shift 2 ;;
    --no-strace) strace_pass=0; shift ;;
    --queue) queue="$2"; shift 2 ;;
    --rounds) rounds="$2"; shift 2 ;;
    --l1) l1="$2"; shift 2 ;;
    --configs) configs="$2"; shift 2 ;;
    --workloads) workloads="$2"; shift 2 ;;
    --sessions) sessions="$2"; shift 2 ;;
    *) tb_die "bench-viommu.sh: unknown argument $1" ;;
  esac
done
python3=/usr/bin/python3
"$python3" -c 'import matplotlib' 2>/dev/null ||
  tb_die "the chart needs Debian's matplotlib: apt-get install -y python3-matplotlib"

vmm=$(tb_build_with_vmm "$vmm")
base=() kernel=()
case "$l1" in
  distro) ;;
  iommufd)
    bash "$TB_SRC/build-l1-iommufd.sh" >&2
    base=(--base "$TB_OUT/l1-iommufd/l1-base.cpio") kernel=(--kernel "$TB_OUT/l1-iommufd/vmlinuz") ;;
  *) tb_die "bench-viommu.sh: --l1 distro|iommufd, not $l1" ;;
esac
mkdir -p "$out"
run="$out/run"
rm -rf "$run" && mkdir -p "$run"

tb_bench_l2_initrd "$run/l2-bench.cpio"

l2cmd="console=ttyS0 panic=-1 quiet iomem=relaxed tb.action=bench-io tb.count4k=$count4k tb.count128k=$count128k tb.fioios=$fioios${workloads:+ tb.workloads=$workloads}"
cat >"$run/scenario.sh" <<'SCRIPT'
now() { cut -d' ' -f1 /proc/uptime; }
K=/sys/kernel/debug/kvm
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
nvme=$(tb-vfio-bind --first 1b36:0010) || exit 1
bdf=${nvme##*/}

# One line with every counter L1 can read now: KVM's exit counters (all VMs; one runs at a
# time), our vmm's stats file, and QEMU's VFIO ioctls so far in the strace output.
snap() {
  set -- $1 $(echo "$2" | tr -d '\r' | sed 's/.*@@TB L2 bench //')
  vfio=""
  [ -f /tmp/strace.out ] &&
    vfio="vfio_map=$(grep -c ', 0x3b71' /tmp/strace.out) vfio_unmap=$(grep -c ', 0x3b72' /tmp/strace.out)"
  st=""; [ -f /tmp/stats.json ] && st=$(tr -d ' \n' </tmp/stats.json)
  echo "@@TB BENCH snap cfg=$1 ev=$2 $3 up=$(now) exits=$(cat $K/exits) mmio_exits=$(cat $K/mmio_exits) io_exits=$(cat $K/io_exits) halt_exits=$(cat $K/halt_exits) irq_exits=$(cat $K/irq_exits) $vfio $(cpu | tr '\n' ' ')stats=$st"
}
# Where L1's CPU time went so far, in clock ticks: the running VMM's (its vCPUs' guest time, its
# user space less that, its kernel time: exits, VFIO ioctls) and L1's idle time.
cpu() {
  for p in /proc/[0-9]*; do
    read -r c <"$p/comm" 2>/dev/null || continue
    case "$c" in vmm | qemu-system-x86)
      awk '{ print "vmm_user_ticks=" $14 - $43, "vmm_sys_ticks=" $15, "vmm_guest_ticks=" $43 }' "$p/stat"
      break ;;
    esac
  done
  awk '/^cpu / { print "l1_idle_ticks=" $5 }' /proc/stat
}
# Echoes the L2 console and snapshots the counters at each workload marker.
reader() {
  while IFS= read -r line; do
    echo "$line"
    case "$line" in *"@@TB L2 bench begin"* | *"@@TB L2 bench end"*) snap "$1" "$line" ;; esac
  done
}
# run_cfg NAME COMMAND...: one L2 boot under COMMAND, if --configs asked for NAME's configuration.
run_cfg() {
  cfg=$1; shift
  base=${cfg%%#*}; base=${base%+strace}; base=${base%-iommufd}
  case ",$CONFIGS," in *",$base,"*) ;; *) return 0 ;; esac
  rm -f /tmp/stats.json /tmp/strace.out
  echo "@@TB BENCH cfg=$cfg start up=$(now)"
  { "$@"; echo "@@TB BENCH cfg=$cfg exit=$?"; } </dev/null 2>&1 | reader "$cfg"
  [ -f /tmp/stats.json ] && echo "@@TB BENCH final cfg=$cfg stats=$(tr -d ' \n' </tmp/stats.json)"
  return 0
}
# The vfio-pci device comes last: QEMU puts a device behind intel-iommu only when the IOMMU is
# created first (with it before, L2 ran with translation on but QEMU never mapped its IOVAs).
qemu_l2() {
  timeout $TMO $WRAP qemu-system-x86_64 -enable-kvm -cpu host -smp 2 -m 512M -nodefaults -display none \
    -serial stdio -no-reboot -kernel /testbed/vmlinuz -initrd /testbed/l2-bench.cpio \
    "$@" -device vfio-pci,host=$bdf
}
ours_l2() {
  timeout $TMO vmm --kernel /testbed/vmlinuz --initramfs /testbed/l2-bench.cpio --cpus boot=2 \
    --memory size=512M --stats-json /tmp/stats.json "$@"
}
# One L2 boot that hangs must not sink the others: it is killed (and its cells reported missing).
WRAP="" TMO=150

# QEMU's vIOMMU as it comes (no interrupt remapping; ours remaps by default, ours-strict-ir-off
# does not), and the same machine without it, so the intel-iommu device is the only difference.
QEMU_VIOMMU="-machine q35 -device intel-iommu,caching-mode=on"
# With interrupt remapping and x2APIC, as ours by default (QEMU needs the split irqchip for it).
QEMU_VIOMMU_IR="-machine q35,kernel-irqchip=split -device intel-iommu,caching-mode=on,intremap=on,eim=on"
QEMU_PLAIN="-machine q35"
# The timed pass, ROUNDS times over: the vIOMMU configurations, then the ceilings, QEMU's next to
# ours, so slow drift in the machine's load hits the pairs being compared alike. Who boots first
# alternates by round (QEMU in odd rounds, ours in even ones): a round's first L2 finds what the one
# before left (L0's TCG translations of L1's KVM and VFIO paths, L1's free memory), and the median
# must not carry that to one side. Round r of a configuration is named CFG#r; the report takes each
# cell's median time over the rounds.
qemu_viommu() {
  run_cfg "qemu-viommu#$r" qemu_l2 $QEMU_VIOMMU -append "$L2CMD intel_iommu=on"
  run_cfg "qemu-viommu-ir#$r" qemu_l2 $QEMU_VIOMMU_IR -append "$L2CMD intel_iommu=on"
}
ours_viommu() {
  for b in $BACKENDS; do
    s=""; [ "$b" = iommufd ] && s=-iommufd
    run_cfg "ours-strict$s#$r" ours_l2 --viommu flush=strict$QUEUE --device path=$nvme,iommu=on,backend=$b --cmdline "$L2CMD intel_iommu=on"
    run_cfg "ours-deferred$s#$r" ours_l2 --viommu flush=deferred$QUEUE --device path=$nvme,iommu=on,backend=$b --cmdline "$L2CMD intel_iommu=on"
    run_cfg "ours-strict-ir-off$s#$r" ours_l2 --viommu flush=strict,intremap=off$QUEUE --device path=$nvme,iommu=on,backend=$b --cmdline "$L2CMD intel_iommu=on"
  done
}
qemu_plain() {
  run_cfg "qemu#$r" qemu_l2 $QEMU_PLAIN -append "$L2CMD"
}
ours_plain() {
  for b in $BACKENDS; do
    s=""; [ "$b" = iommufd ] && s=-iommufd
    run_cfg "ours$s#$r" ours_l2 --device path=$nvme,backend=$b --cmdline "$L2CMD"
  done
}
r=$ROUND0
while [ "$r" -le "$ROUNDS" ]; do
  if [ $((r % 2)) = 1 ]; then
    qemu_viommu; ours_viommu; qemu_plain; ours_plain
  else
    ours_viommu; qemu_viommu; ours_plain; qemu_plain
  fi
  r=$((r + 1))
done
# The counting pass: QEMU's VFIO calls under strace (its times are not used).
if [ "$STRACE_PASS" = 1 ]; then
  # strace stops only at ioctls (seccomp-bpf) and prints their numbers raw, so map and unmap
  # can be told apart whatever strace knows of VFIO.
  TMO=400 WRAP="strace -f -qq --seccomp-bpf -X raw -e trace=ioctl -e signal=none -o /tmp/strace.out"
  run_cfg qemu-viommu+strace qemu_l2 $QEMU_VIOMMU -append "$L2CMD intel_iommu=on"
  run_cfg qemu+strace qemu_l2 $QEMU_PLAIN -append "$L2CMD"
fi
echo "@@TB BENCH all-done"
SCRIPT
# The scenario's parameters, ahead of its (quoted, so literal) body; ROUND0, the first round
# this L1 session runs, is set per session below.
backends=container
[[ "$l1" == iommufd ]] && backends="container iommufd"
sed -i "1i L2CMD='$l2cmd' STRACE_PASS=$strace_pass QUEUE='${queue:+,queue=$queue}' ROUNDS=$rounds BACKENDS='$backends' CONFIGS='$configs'" "$run/scenario.sh"

# Other testbed users (tests, demo) take this lock: waiting for it keeps their runs from
# sharing the 2 cores with ours and skewing the figures.
exec 8>"$TB_OUT/run.lock"
tb_log "bench-viommu: waiting for the testbed lock" && flock 8
log="$out/console.log" trace="$out/vtd-trace.log"
tb_log "bench-viommu: L1 with $l1smp vCPU(s); console in $log, L0 VT-d trace in $trace"
start=$SECONDS
# L1 has one vCPU and polls when idle (l0-qemu.sh's default): the configuration that ran clean. With
# `--l1-smp 2` the L2's two vCPUs get an L1 CPU each (fio runs 2x faster), but two L1 vCPUs that
# poll take both host cores from L0's I/O thread (every cell ~40% slower), and two that halt
# (TB_L1_IDLE=halt) froze L1 in both of the last two runs (resources/testbed/README.md).
# Every console line gets the host's wall clock (EPOCHREALTIME, us), the clock of QEMU's trace.
# The nested testbed's L1 can freeze (resources/testbed/README.md; it struck two of the last
# long runs in a QEMU L2's boot): a console silent for $stall s ends the session, and a new L1
# session runs again from the round that was under way (its cells from before the freeze are
# replaced: the report keeps a configuration's last boot of each round). At most --sessions
# sessions (default rounds + 2: the freezes strike QEMU's L2s, one in every few of their boots).
stall=180 round0=1 session=1 sessions=${sessions:-$((rounds + 2))}
: >"$log"
while :; do
  sed "1i ROUND0=$round0" "$run/scenario.sh" >"$run/scenario-session.sh"
  bash "$TB_SRC/mkinitrd.sh" --out "$run/initrd" ${base[@]+"${base[@]}"} --vmm "$vmm" \
    --script "$run/scenario-session.sh" --add "$run/l2-bench.cpio=/testbed/l2-bench.cpio" >&2
  (
    while sleep 20; do
      age=$(($(date +%s) - $(stat -c %Y "$log")))
      if ((age > stall)); then
        tb_log "bench-viommu: no console output for $age s: L1 froze; ending session $session"
        pkill -f "qemu-system-x86_64.*$run/initrd" || true
        break
      fi
    done
  ) &
  watchdog=$!
  timeout $((600 + 450 * rounds)) bash "$TB_SRC/l0-qemu.sh" --initrd "$run/initrd" ${kernel[@]+"${kernel[@]}"} --smp "$l1smp" -- \
    -trace 'vtd_inv_desc*' -D "$trace.$session" -msg timestamp=on </dev/null 2>&1 |
    while IFS= read -r line; do printf '%s %s\n' "$EPOCHREALTIME" "$line"; done >>"$log" || true
  kill "$watchdog" 2>/dev/null || true
  grep -q "@@TB BENCH all-done" "$log" && break
  ((session < sessions)) || { tb_log "bench-viommu: L1 froze in $session sessions; reporting what ran"; break; }
  round0=$(grep -a -o 'BENCH cfg=[a-z-]*#[0-9]* start' "$log" | sed 's/.*#\([0-9]*\) start/\1/' | sort -n | tail -1)
  round0=${round0:-1} session=$((session + 1))
  tb_log "bench-viommu: session $session runs rounds $round0..$rounds"
done
# One trace, in session order (the report reads only the merged one).
for ((i = 1; i <= session; i++)); do cat "$trace.$i" 2>/dev/null || true; done >"$trace"
rm -f "$trace".[0-9]*
flock -u 8
tb_log "bench-viommu: L0 ran $((SECONDS - start)) s"

"$python3" "$TB_SRC/bench-viommu-report.py" --log "$log" --trace "$trace" \
  --json "$out/results.json" --png "$out/results.png"
