#!/usr/bin/env bash
# Benchmark (not a test): in ONE L1 session, L2 Linux reads L1's NVMe passed through without a
# vIOMMU, `dd if=/dev/nvme0n1 bs=4k count=2000 iflag=direct` (the dd-read action), under our vmm
# (--device) and under QEMU+KVM (-device vfio-pci), alternating; prints each time and the means.
# Times are the dd's alone, from L2's clock.
# Usage: bench-passthrough.sh [--vmm PATH] [--runs N] [--memory SIZE] [--log FILE]
#   --vmm PATH  default: cargo build --release -p vmm (target dir target/testbed/cargo)
set -euo pipefail
source "$(dirname "$0")/lib.sh"

vmm="" runs=2 memory=512M log="$TB_OUT/logs/bench-passthrough.log"
while (($#)); do
  case "$1" in
    --vmm) vmm="$(readlink -f "$2")"; shift 2 ;;
    --runs) runs="$2"; shift 2 ;;
    --memory) memory="$2"; shift 2 ;;
    --log) log="$2"; shift 2 ;;
    *) tb_die "bench-passthrough.sh: unknown argument $1" ;;
  esac
done

vmm=$(tb_build_with_vmm "$vmm")

run="$TB_OUT/runs/bench-passthrough"
mkdir -p "$run" "$(dirname "$log")"
cmdline="console=ttyS0 panic=-1 quiet tb.action=dd-read"
cat >"$run/scenario.sh" <<SCRIPT
nvme=\$(tb-vfio-bind --first 1b36:0010) || exit 1
i=0
while [ \$i -lt $runs ]; do
  echo "@@TB BENCH-VMM ours"
  vmm --kernel /testbed/vmlinuz --initramfs /testbed/l2.cpio.gz --cmdline '$cmdline' \
    --memory size=$memory --device path=\$nvme
  echo "@@TB BENCH-VMM qemu"
  qemu-system-x86_64 -enable-kvm -cpu host -m $memory -nodefaults -display none -serial stdio \
    -no-reboot -kernel /testbed/vmlinuz -initrd /testbed/l2.cpio.gz -append '$cmdline' \
    -device vfio-pci,host=\${nvme##*/}
  i=\$((i + 1))
done
SCRIPT
bash "$TB_SRC/mkinitrd.sh" --out "$run/initrd" --vmm "$vmm" --script "$run/scenario.sh"
tb_log "passthrough dd benchmark: $runs runs each, $memory; console in $log"
bash "$TB_SRC/l0-qemu.sh" --initrd "$run/initrd" </dev/null >"$log" 2>&1 || true

grep -a -e '@@TB BENCH-VMM' -e '@@TB L2 dd-read' "$log" | tr -d '\r' | awk '
  /BENCH-VMM/ { v = $NF; next }
  { for (i = 1; i <= NF; i++) { split($i, kv, "="); f[kv[1]] = kv[2] }
    printf "  %-5s dd bs=4k count=2000 iflag=direct: %s s (rc=%s)\n", v, f["secs"], f["rc"]
    if (f["rc"] == 0) { n[v]++; t[v] += f["secs"] } }
  END {
    if (!n["ours"] || !n["qemu"]) { print "bench-passthrough: a VMM never finished the dd, see the log"; exit 1 }
    printf "mean: ours %.2f s, qemu %.2f s (ours/qemu %.2f)\n", t["ours"] / n["ours"], t["qemu"] / n["qemu"],
      (t["ours"] / n["ours"]) / (t["qemu"] / n["qemu"]) }'
