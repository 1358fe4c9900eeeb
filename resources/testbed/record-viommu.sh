#!/usr/bin/env bash
# Records the corpus of `vmm replay` (issue 16): in ONE L1 session, the benchmark's L2 Linux
# (2 vCPUs, 512M, the passed-through NVMe behind our VT-d, strict) boots once per workload of
# bench-viommu-io.sh and runs only that one, with `--viommu record=...`:
#   boot        boot, NVMe probe and the 64 warm-up reads, then power off
#   dd-4k       + dd bs=4k count=2000 iflag=direct (QD1)
#   dd-128k     + dd bs=128k, 1024 blocks
#   fio-2x4     + fio, 2 jobs x QD4, 1500 random 4 KiB reads each
# L1 gzips each recording and prints it base64 on the console with the run's --stats-json; this
# script writes them to OUT (default resources/viommu-corpus) as NAME.vtdrec.gz and
# NAME.stats.json, and the console to OUT/../record-viommu.log under target/testbed.
# Usage: record-viommu.sh [--vmm PATH] [--out DIR] [--only NAME]
set -euo pipefail
source "$(dirname "$0")/lib.sh"

vmm="" out="$TB_REPO/resources/viommu-corpus" only=""
while (($#)); do
  case "$1" in
    --vmm) vmm="$(readlink -f "$2")"; shift 2 ;;
    --out) out="$(mkdir -p "$2" && cd "$2" && pwd)"; shift 2 ;;
    --only) only="$2"; shift 2 ;;
    *) tb_die "record-viommu.sh: unknown argument $1" ;;
  esac
done

vmm=$(tb_build_with_vmm "$vmm")
mkdir -p "$out"
run="$TB_OUT/record-viommu"
rm -rf "$run" && mkdir -p "$run"

tb_bench_l2_initrd "$run/l2-bench.cpio"

l2cmd="console=ttyS0 panic=-1 quiet tb.action=bench-io tb.exitcost=0 intel_iommu=on"
names="boot dd-4k dd-128k fio-2x4"
[[ -n "$only" ]] && names="$only"
cat >"$run/scenario.sh" <<'SCRIPT'
nvme=$(tb-vfio-bind --first 1b36:0010) || exit 1
for name in $NAMES; do
  case $name in
    boot) w=none ;;
    dd-4k) w=dd-4k ;;
    dd-128k) w=dd-128k ;;
    fio-2x4) w=fio-rand4k ;;
  esac
  rm -f /tmp/rec /tmp/rec.gz /tmp/stats.json
  echo "@@TB REC start name=$name"
  timeout 300 vmm --kernel /testbed/vmlinuz --initramfs /testbed/l2-bench.cpio --cpus boot=2 \
    --memory size=512M --stats-json /tmp/stats.json \
    --viommu flush=strict,record=/tmp/rec --device path=$nvme,iommu=on \
    --cmdline "$L2CMD tb.workloads=$w" </dev/null 2>&1
  echo "@@TB REC vmm-exit name=$name rc=$?"
  echo "@@TB REC stats name=$name $(tr -d ' \n' </tmp/stats.json)"
  gzip -9 -c /tmp/rec >/tmp/rec.gz
  echo "@@TB REC data-begin name=$name raw=$(wc -c </tmp/rec) gz=$(wc -c </tmp/rec.gz)"
  base64 /tmp/rec.gz | sed 's/^/@@TB REC d /'
  echo "@@TB REC data-end name=$name"
done
echo "@@TB REC all-done"
SCRIPT
sed -i "1i L2CMD='$l2cmd' NAMES='$names'" "$run/scenario.sh"

bash "$TB_SRC/mkinitrd.sh" --out "$run/initrd" --vmm "$vmm" --script "$run/scenario.sh" \
  --add "$run/l2-bench.cpio=/testbed/l2-bench.cpio"

# The testbed lock keeps other testbed runs off the 2 cores while this one records.
exec 8>"$TB_OUT/run.lock"
tb_log "record-viommu: waiting for the testbed lock" && flock 8
log="$run/console.log"
tb_log "record-viommu: console in $log"
timeout 1500 bash "$TB_SRC/l0-qemu.sh" --initrd "$run/initrd" --smp 1 </dev/null >"$log" 2>&1 || true
flock -u 8

# Decode what L1 printed: NAME.vtdrec.gz and NAME.stats.json for every finished recording.
python3 - "$log" "$out" <<'PY'
import base64, re, sys
log, out = sys.argv[1], sys.argv[2]
cur, data, done = None, [], []
for line in open(log, errors="replace"):
    line = line.replace("\r", "").rstrip("\n")
    m = re.search(r"@@TB REC stats name=(\S+) (.*)$", line)
    if m:
        open(f"{out}/{m.group(1)}.stats.json", "w").write(m.group(2) + "\n")
        continue
    m = re.search(r"@@TB REC data-begin name=(\S+)", line)
    if m:
        cur, data = m.group(1), []
        continue
    m = re.search(r"@@TB REC d (\S+)", line)
    if m and cur:
        data.append(m.group(1))
        continue
    if "@@TB REC data-end" in line and cur:
        raw = base64.b64decode("".join(data))
        open(f"{out}/{cur}.vtdrec.gz", "wb").write(raw)
        done.append(f"{cur} ({len(raw)} bytes)")
        cur = None
print("recorded: " + (", ".join(done) or "nothing (see the console log)"))
PY
grep -h "@@TB REC \(vmm-exit\|data-begin\)\|@@TB L2 bench end" "$log" || true
