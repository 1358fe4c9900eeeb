#!/usr/bin/env bash
# Benchmark (not a test): in ONE L1 session, times the L2 Linux from VMM start to its init
# ("@@TB L2 init") and to VMM exit after power-off, under our vmm and under QEMU+KVM, alternating,
# and prints both and the ratio. Times come from L1's clock (/proc/uptime, 10 ms resolution).
# Usage: bench-boot.sh [--vmm PATH] [--runs N] [--cpus N] [--memory SIZE] [--log FILE]
#   --vmm PATH  default: cargo build --release -p vmm (target dir target/testbed/cargo)
set -euo pipefail
source "$(dirname "$0")/lib.sh"

vmm="" runs=3 cpus=1 memory=512M log="$TB_OUT/logs/bench-boot.log"
while (($#)); do
  case "$1" in
    --vmm) vmm="$(readlink -f "$2")"; shift 2 ;;
    --runs) runs="$2"; shift 2 ;;
    --cpus) cpus="$2"; shift 2 ;;
    --memory) memory="$2"; shift 2 ;;
    --log) log="$2"; shift 2 ;;
    *) tb_die "bench-boot.sh: unknown argument $1" ;;
  esac
done

vmm=$(tb_build_with_vmm "$vmm")

run="$TB_OUT/runs/bench-boot"
mkdir -p "$run" "$(dirname "$log")"
cmdline="console=ttyS0 panic=-1 quiet tb.action=poweroff"
cat >"$run/scenario.sh" <<SCRIPT
now() { cut -d' ' -f1 /proc/uptime; }
# Prints the L2 console and one "@@TB BENCH" line with the seconds to init and to exit.
timed() {
  name=\$1; shift
  t0=\$(now)
  "\$@" | while IFS= read -r line; do
    case "\$line" in *"@@TB L2 init"*) echo "\$(now)" >/tmp/init_at ;; esac
    echo "\$line"
  done
  t1=\$(now)
  ti=\$(cat /tmp/init_at 2>/dev/null || echo -1); rm -f /tmp/init_at
  awk -v n="\$name" -v t0="\$t0" -v ti="\$ti" -v t1="\$t1" 'BEGIN {
    printf "@@TB BENCH vmm=%s init_secs=%.2f exit_secs=%.2f\\n", n, (ti < 0 ? -1 : ti - t0), t1 - t0 }'
}
i=0
while [ \$i -lt $runs ]; do
  timed ours vmm --kernel /testbed/vmlinuz --initramfs /testbed/l2.cpio.gz --cmdline '$cmdline' \
    --cpus boot=$cpus --memory size=$memory
  timed qemu qemu-system-x86_64 -enable-kvm -cpu host -smp $cpus -m $memory -nodefaults \
    -display none -serial stdio -no-reboot -kernel /testbed/vmlinuz -initrd /testbed/l2.cpio.gz \
    -append '$cmdline'
  i=\$((i + 1))
done
SCRIPT
bash "$TB_SRC/mkinitrd.sh" --out "$run/initrd" --vmm "$vmm" --script "$run/scenario.sh"
tb_log "L2 boot benchmark: $runs runs each, $cpus vCPU(s), $memory; console in $log"
bash "$TB_SRC/l0-qemu.sh" --initrd "$run/initrd" </dev/null >"$log" 2>&1 || true

grep -a '@@TB BENCH' "$log" | tr -d '\r' | awk '
  { for (i = 1; i <= NF; i++) { split($i, kv, "="); f[kv[1]] = kv[2] }
    v = f["vmm"]; printf "  %-5s boot-to-init %6.2f s   to exit %6.2f s\n", v, f["init_secs"], f["exit_secs"]
    if (f["init_secs"] >= 0) {
      n[v]++; init[v] += f["init_secs"]
      if (!(v in lo) || f["init_secs"] < lo[v]) lo[v] = f["init_secs"]
    }
    total[v] += f["exit_secs"]; m[v]++ }
  END {
    if (!n["ours"] || !n["qemu"]) { print "bench-boot: a VMM never reached the L2 init, see the log"; exit 1 }
    oi = init["ours"] / n["ours"]; qi = init["qemu"] / n["qemu"]
    printf "L2 boot-to-init, mean: our vmm %.2f s, QEMU+KVM %.2f s, ratio vmm/QEMU %.2f\n", oi, qi, oi / qi
    printf "L2 boot-to-init, best: our vmm %.2f s, QEMU+KVM %.2f s, ratio vmm/QEMU %.2f (best is the least noisy under TCG)\n", lo["ours"], lo["qemu"], lo["ours"] / lo["qemu"]
    printf "L2 start-to-exit, mean: our vmm %.2f s, QEMU+KVM %.2f s\n", total["ours"] / m["ours"], total["qemu"] / m["qemu"]
  }'
