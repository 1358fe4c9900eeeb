#!/usr/bin/env bash
# Runs one testbed scenario by hand: L0 QEMU (TCG) -> L1 Linux -> an L2 VMM -> the L2 Linux.
# The whole console (L1 and L2) is shown; with --log it is also saved.
#
#   run.sh [--vmm PATH | --qemu] [--cpus N] [--memory SIZE] [--action NAME] [--l2-cmdline STR]
#          [--vmm-args STR] [--vmm-wrap STR] [--script FILE] [--l1-shell] [--l1-smp N]
#          [--log FILE] [--timeout SECS]
#
#   --vmm PATH       our vmm binary (e.g. target/release/vmm) runs the L2 guest (default: --qemu)
#   --qemu           QEMU+KVM inside L1 runs the L2 guest instead (validates the testbed itself)
#   --cpus N         L2 vCPUs (default 1); --memory SIZE L2 memory (default 512M)
#   --action NAME    L2 init action: poweroff (default), reboot, panic, info, shell
#   --l2-cmdline STR the whole L2 kernel command line (default: "console=ttyS0 panic=-1 quiet")
#                    tb.action=NAME is appended unless STR already has a tb.action
#   --vmm-args STR   extra arguments for vmm; --vmm-wrap STR runs vmm under e.g. "strace -f"
#   --script FILE    a custom L1 scenario script instead of the generated one
#   --l1-shell       no scenario: an L1 shell with vmm at /testbed/bin/vmm, the L2 kernel at
#                    /testbed/vmlinuz and initramfs at /testbed/l2.cpio.gz
# Markers: "@@TB L1 ready", "@@TB L2 init cpus=N mem_kb=M", "@@TB VMM exit=RC", ...
set -euo pipefail
source "$(dirname "$0")/lib.sh"

vmm="" cpus=1 memory=512M action=poweroff l2cmd="console=ttyS0 panic=-1 quiet" vmm_args="" wrap=""
script="" l1_shell=0 l1_smp="${TB_L1_SMP:-1}" log="" timeout=0
while (($#)); do
  case "$1" in
    --vmm) vmm="$(readlink -f "$2")"; shift 2 ;;
    --qemu) vmm=""; shift ;;
    --cpus) cpus="$2"; shift 2 ;;
    --memory) memory="$2"; shift 2 ;;
    --action) action="$2"; shift 2 ;;
    --l2-cmdline) l2cmd="$2"; shift 2 ;;
    --vmm-args) vmm_args="$2"; shift 2 ;;
    --vmm-wrap) wrap="$2"; shift 2 ;;
    --script) script="$(readlink -f "$2")"; shift 2 ;;
    --l1-shell) l1_shell=1; shift ;;
    --l1-smp) l1_smp="$2"; shift 2 ;;
    --log) log="$2"; shift 2 ;;
    --timeout) timeout="$2"; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) tb_die "run.sh: unknown argument $1 (see --help)" ;;
  esac
done
[[ "$l2cmd" == *tb.action=* ]] || l2cmd+=" tb.action=$action"

bash "$TB_SRC/build.sh"
run="$TB_OUT/runs/manual"
mkdir -p "$run"
args=(--out "$run/initrd")
[[ -z "$vmm" ]] || args+=(--vmm "$vmm")
if ((l1_shell)); then
  append="tb.l1=shell"
else
  append=""
  if [[ -z "$script" ]]; then
    script="$run/scenario.sh"
    if [[ -n "$vmm" ]]; then
      l2vmm="$wrap vmm --kernel /testbed/vmlinuz --initramfs /testbed/l2.cpio.gz --cmdline '$l2cmd' --cpus boot=$cpus --memory size=$memory $vmm_args"
    else
      l2vmm="$wrap qemu-system-x86_64 -enable-kvm -cpu host -smp $cpus -m $memory -nodefaults -display none -serial stdio -no-reboot -device pvpanic -action panic=exit-failure -kernel /testbed/vmlinuz -initrd /testbed/l2.cpio.gz -append '$l2cmd' $vmm_args"
    fi
    cat >"$script" <<SCRIPT
t0=\$(cut -d' ' -f1 /proc/uptime)
echo "@@TB VMM start: $l2vmm"
$l2vmm
rc=\$?
echo "@@TB VMM exit=\$rc secs=\$(awk -v t0=\$t0 '{printf "%.2f", \$1 - t0}' /proc/uptime)"
SCRIPT
  fi
  args+=(--script "$script")
fi
bash "$TB_SRC/mkinitrd.sh" "${args[@]}"

cmd=(bash "$TB_SRC/l0-qemu.sh" --initrd "$run/initrd" --smp "$l1_smp" --append "$append")
((timeout > 0)) && cmd=(timeout --foreground "$timeout" "${cmd[@]}")
if [[ -n "$log" ]]; then
  "${cmd[@]}" 2>&1 | tee "$log"
else
  "${cmd[@]}"
fi
