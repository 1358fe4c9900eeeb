#!/usr/bin/env bash
# Demo: builds the nested testbed if needed, boots L1 (Linux under QEMU TCG with real KVM, an
# emulated VT-d and VFIO) and, inside it, our vmm running an L2 Linux with 2 vCPUs and 512 MiB.
# The whole console is shown as it comes; a summary follows.
# Usage: bash resources/demo.sh [extra resources/testbed/run.sh arguments, e.g. --action shell]
set -euo pipefail
cd "$(dirname "$0")/.."

bash resources/testbed/install-deps.sh
bash resources/testbed/build.sh
echo "demo: building the vmm (cargo build --release -p vmm)"
cargo build --release -q -p vmm --bin vmm

log=target/testbed/logs/demo.log
mkdir -p "$(dirname "$log")"
echo "demo: L0 QEMU -> L1 Linux -> vmm -> L2 Linux (console below; log in $log)"
start=$SECONDS
set +e
# Without `quiet`, so the L2 kernel's boot log shows; the L2 init then prints what it sees.
bash resources/testbed/run.sh --vmm target/release/vmm --cpus 2 --memory 512M \
  --l2-cmdline "console=ttyS0 panic=-1 tb.action=info" --timeout 600 --log "$log" "$@"
set -e

marker() { grep -a "@@TB $1" "$log" | head -1 | tr -d '\r' | sed 's/.*@@TB //'; }
l1="$(marker 'L1 ready')" l2="$(marker 'L2 init')" vmm="$(marker 'VMM exit')"
echo
echo "=== demo summary ($((SECONDS - start)) s) ==="
echo "L1 booted with KVM and IOMMU: ${l1:-NO (no '@@TB L1 ready')}"
echo "L2 Linux reached its init:    ${l2:-NO (no '@@TB L2 init')}"
echo "vmm exit:                     ${vmm:-NO (no '@@TB VMM exit')}"
if [[ "$vmm" == *"exit=0 "* && -n "$l2" ]]; then
  echo "demo: OK: our vmm booted Linux to init with 2 vCPUs and exited 0 when it powered off"
else
  echo "demo: FAILED: see $log"
  exit 1
fi
