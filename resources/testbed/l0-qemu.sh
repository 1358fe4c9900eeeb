#!/usr/bin/env bash
# Starts L0 QEMU (TCG, nested SVM, emulated VT-d, an NVMe with the known disk and the edu device)
# booting the L1 kernel with INITRD. The console is on stdio (Ctrl-A X quits when interactive).
# The process execs into QEMU, so its pid is QEMU's: killing it stops the run.
# Usage: l0-qemu.sh --initrd FILE [--kernel FILE] [--smp N] [--mem MB] [--append STR] [-- EXTRA QEMU ARGS...]
#   --kernel: the L1 kernel (default the testbed's, target/testbed/vmlinuz)
# Env: TB_L1_SMP, TB_L1_MEM give the defaults (1 vCPU, 2048 MB).
set -euo pipefail
source "$(dirname "$0")/lib.sh"

initrd="" kernel="$TB_OUT/vmlinuz" smp="${TB_L1_SMP:-1}" mem="${TB_L1_MEM:-2048}" append=""
while (($#)); do
  case "$1" in
    --initrd) initrd="$2"; shift 2 ;;
    --kernel) kernel="$2"; shift 2 ;;
    --smp) smp="$2"; shift 2 ;;
    --mem) mem="$2"; shift 2 ;;
    --append) append="$2"; shift 2 ;;
    --) shift; break ;;
    *) tb_die "l0-qemu.sh: unknown argument $1" ;;
  esac
done
[[ -s "$initrd" ]] || tb_die "l0-qemu.sh: --initrd FILE is required"

# snapshot=on: every run sees the same known disk, whatever L1 or L2 write to it.
# idle=poll: an L1 that halts while running an L2 can miss its wake-up under TCG with nested SVM
# (seen in CI, and in 1 of 3 boots of a repro loop: L0 QEMU at 0% CPU, L1's clock stopped, the L2
# boot frozen); an L1 that never halts went 12 boots out of 12. It costs the tests about 10%
# (a spinning L1 vCPU takes a host core from L0's I/O thread); benchmarks that want L0's cores
# for I/O set TB_L1_IDLE=halt. TB_L1_EXTRA adds L1 kernel arguments.
# TB_L1_HEARTBEAT=FILE: L1's second serial port, where it writes its uptime every 5 s.
heartbeat=()
[[ -n "${TB_L1_HEARTBEAT:-}" ]] && heartbeat=(-serial "file:$TB_L1_HEARTBEAT")
exec qemu-system-x86_64 \
  -accel tcg -cpu qemu64,+svm -smp "$smp" -m "$mem" \
  -machine q35,kernel-irqchip=split -device intel-iommu,intremap=on,caching-mode=on \
  -drive "file=$TB_OUT/disk.img,if=none,id=d0,format=raw,snapshot=on" \
  -device nvme,drive=d0,serial=nvme0 -device edu \
  -kernel "$kernel" -initrd "$initrd" \
  -append "console=ttyS0 panic=-1 intel_iommu=on quiet idle=${TB_L1_IDLE:-poll} ${TB_L1_EXTRA:-} $append" \
  -nodefaults -nographic -serial mon:stdio ${heartbeat[@]+"${heartbeat[@]}"} -no-reboot "$@"
