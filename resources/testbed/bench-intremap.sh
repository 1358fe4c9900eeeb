#!/usr/bin/env bash
# Benchmark (not a test), issue 11: what interrupt remapping costs a passed-through NVMe. With
# interrupt remapping the KVM route of each MSI-X vector holds the translated message, so KVM
# delivers from the VFIO eventfd as without it: the cost should be nothing measurable.
# In ONE L1 session, the same L2 Linux (2 vCPUs, 512M, intel_iommu=on, strict) runs
# bench-viommu-io.sh's workloads (dd 4 KiB QD1, dd 128 KiB, fio 2 jobs x QD4 random 4 KiB) on
# L1's NVMe behind our VT-d under three configurations, interleaved over --rounds rounds:
#   ir-on          --viommu                         (intremap=on,eim=on: split irqchip, x2APIC)
#   ir-off-split   --viommu intremap=off --irqchip split  (same irqchip, no remapping)
#   ir-off         --viommu intremap=off            (in-kernel irqchip, as before issue 11)
# Prints, per workload and configuration, the median MB/s (fio: IOPS too) over the rounds with
# every round's figure, and the interrupt counters of the last ir-on round.
# Usage: bench-intremap.sh [--vmm PATH] [--out DIR] [--rounds N] [--count4k N] [--fio-ios N]
#   --vmm PATH  default: cargo build --release -p vmm (target dir target/testbed/cargo)
#   --out DIR   default target/testbed/bench-intremap (console log)
set -euo pipefail
source "$(dirname "$0")/lib.sh"

vmm="" out="$TB_OUT/bench-intremap" rounds=3 count4k=2000 fioios=1500
while (($#)); do
  case "$1" in
    --vmm) vmm="$(readlink -f "$2")"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --rounds) rounds="$2"; shift 2 ;;
    --count4k) count4k="$2"; shift 2 ;;
    --fio-ios) fioios="$2"; shift 2 ;;
    *) tb_die "bench-intremap.sh: unknown argument $1" ;;
  esac
done

vmm=$(tb_build_with_vmm "$vmm")
mkdir -p "$out"
run="$out/run"
rm -rf "$run" && mkdir -p "$run"
tb_bench_l2_initrd "$run/l2-bench.cpio"

# 128 KiB reads: one pass over the disk (512 blocks) is enough to see a difference.
l2cmd="console=ttyS0 panic=-1 quiet iomem=relaxed intel_iommu=on tb.action=bench-io tb.count4k=$count4k tb.count128k=512 tb.fioios=$fioios"
cat >"$run/scenario.sh" <<'SCRIPT'
nvme=$(tb-vfio-bind --first 1b36:0010) || exit 1
# run_cfg NAME VIOMMU-OPTIONS [VMM ARGS...]: one L2 boot; its markers follow this line.
run_cfg() {
  cfg=$1 viommu=$2; shift 2
  rm -f /tmp/stats.json
  echo "@@TB BENCH cfg=$cfg start"
  timeout 200 vmm --kernel /testbed/vmlinuz --initramfs /testbed/l2-bench.cpio --cpus boot=2 \
    --memory size=512M --viommu "$viommu" --stats-json /tmp/stats.json \
    --device path=$nvme,iommu=on --cmdline "$L2CMD" "$@" </dev/null 2>&1
  echo "@@TB BENCH cfg=$cfg exit=$? stats=$(tr -d ' \n' </tmp/stats.json 2>/dev/null)"
}
r=1
while [ "$r" -le "$ROUNDS" ]; do
  run_cfg "ir-on#$r" ""
  run_cfg "ir-off-split#$r" intremap=off --irqchip split
  run_cfg "ir-off#$r" intremap=off
  r=$((r + 1))
done
echo "@@TB BENCH all-done"
SCRIPT
sed -i "1i L2CMD='$l2cmd' ROUNDS=$rounds" "$run/scenario.sh"
bash "$TB_SRC/mkinitrd.sh" --out "$run/initrd" --vmm "$vmm" --script "$run/scenario.sh" \
  --add "$run/l2-bench.cpio=/testbed/l2-bench.cpio"

# Other testbed users take this lock: waiting keeps their runs off the 2 cores meanwhile.
exec 8>"$TB_OUT/run.lock"
tb_log "bench-intremap: waiting for the testbed lock" && flock 8
log="$out/console.log"
tb_log "bench-intremap: $rounds rounds of 3 boots; console in $log"
start=$SECONDS
timeout $((300 + 300 * rounds)) bash "$TB_SRC/l0-qemu.sh" --initrd "$run/initrd" </dev/null \
  >"$log" 2>&1 || true
flock -u 8
tb_log "bench-intremap: L0 ran $((SECONDS - start)) s"

# One row per workload and configuration: median MB/s (and fio IOPS) over the rounds.
/usr/bin/python3 - "$log" <<'REPORT'
import re, statistics, sys
cells, stats, cfg = {}, {}, None
for line in open(sys.argv[1], errors="replace"):
    m = re.search(r"@@TB BENCH cfg=(\S+)#(\d+) (start|exit=\S+)(?: stats=(\S*))?", line)
    if m:
        cfg = m.group(1) if m.group(3) == "start" else None
        if m.group(4):
            stats[m.group(1)] = m.group(4)
        continue
    m = re.search(r"@@TB L2 bench end w=(\S+) rc=0 secs=([\d.]+) bytes=(\d+)(?: iops=([\d.]+))?", line)
    if m and cfg:
        secs = float(m.group(2))
        mbs = int(m.group(3)) / secs / 1e6 if secs > 0 else 0.0
        iops = float(m.group(4)) if m.group(4) else None
        cells.setdefault((m.group(1), cfg), []).append((mbs, iops))
print("| workload | config | MB/s median (rounds) | IOPS median |")
print("| --- | --- | ---: | ---: |")
for w in ["dd-4k", "dd-128k", "fio-rand4k"]:
    for c in ["ir-on", "ir-off-split", "ir-off"]:
        got = cells.get((w, c), [])
        if not got:
            print(f"| {w} | {c} | missing | |")
            continue
        mbs = [g[0] for g in got]
        iops = [g[1] for g in got if g[1] is not None]
        rounds = " / ".join(f"{x:.2f}" for x in mbs)
        med_iops = f"{statistics.median(iops):.0f}" if iops else ""
        print(f"| {w} | {c} | {statistics.median(mbs):.2f} ({rounds}) | {med_iops} |")
for c in ["ir-on", "ir-off-split", "ir-off"]:
    s = stats.get(c, "")
    keys = ["interrupts_remapped", "interrupt_faults", "iec_invalidations"]
    vals = {k: (re.search(rf'"{k}":(\d+)', s) or [None, "?"])[1] for k in keys}
    print(f"{c}: " + " ".join(f"{k}={v}" for k, v in vals.items()))
REPORT
