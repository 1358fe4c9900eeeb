#!/usr/bin/env bash
# Demo: builds the nested testbed if needed, boots L1 (Linux under QEMU TCG with real KVM, an
# emulated VT-d and VFIO) and, inside it, our vmm running an L2 Linux with 2 vCPUs and 512 MiB
# with our virtual VT-d (--viommu) and L1's NVMe controller passed through behind it
# (--device ...,iommu=on): the L2 kernel's intel-iommu driver controls what the device can
# reach while its nvme driver reads the first 16 MiB of the disk with O_DIRECT and prints their
# md5, which must match the L0 image. The whole console is shown as it comes; a summary follows
# with the VT-d's counters (--stats-json).
# Usage: bash resources/demo.sh [extra resources/testbed/run.sh arguments, e.g. --timeout 900]
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
# In L1: bind the NVMe (1b36:0010) to vfio-pci, then run the vmm with it.
script="$(mktemp)"
trap 'rm -f "$script"' EXIT
cat >"$script" <<'L1'
nvme=$(tb-vfio-bind --first 1b36:0010) || exit 1
vmm --kernel /testbed/vmlinuz --initramfs /testbed/l2.cpio.gz --cpus boot=2 --memory size=512M \
  --cmdline "console=ttyS0 panic=-1 intel_iommu=on tb.action=nvme-iommu" \
  --viommu --stats-json /tmp/stats.json --device path="$nvme",iommu=on
echo "@@TB VMM exit=$? "
echo "@@TB L1 stats $(tr -d ' \n' </tmp/stats.json)"
L1
bash resources/testbed/run.sh --vmm target/release/vmm --script "$script" --timeout 600 \
  --log "$log" "$@"
set -e
want="$(head -c 16777216 target/testbed/disk.img | md5sum | cut -d' ' -f1)"

marker() { grep -a "@@TB $1" "$log" | head -1 | tr -d '\r' | sed 's/.*@@TB //'; }
l1="$(marker 'L1 ready')" l2="$(marker 'L2 init')" vmm="$(marker 'VMM exit')"
nvme_read="$(marker 'L2 nvme-pt read')"
stats="$(marker 'L1 stats')"
stats="${stats#L1 stats }"
vtd_up="$(grep -a -c 'Intel(R) Virtualization Technology for Directed I/O' "$log" || true)"
counter() { sed -n "s/.*\"$1\":\([0-9]*\).*/\1/p" <<<"$stats"; }
echo
echo "=== demo summary ($((SECONDS - start)) s) ==="
echo "L1 booted with KVM and IOMMU: ${l1:-NO (no '@@TB L1 ready')}"
echo "L2 Linux reached its init:    ${l2:-NO (no '@@TB L2 init')}"
echo "vmm exit:                     ${vmm:-NO (no '@@TB VMM exit')}"
echo "L2 intel-iommu on our VT-d:   $([[ $vtd_up -gt 0 ]] && echo yes || echo NO)"
echo "L2 read the passed-through NVMe: ${nvme_read:-NO (no '@@TB L2 nvme-pt read')}"
echo "first 16 MiB of the L0 image:  md5=$want"
echo "VT-d: $(counter descriptors) descriptors ($(counter waits) waits) -> $(counter host_map_calls) host maps," \
  "$(counter host_unmap_calls) host unmap calls removing $(counter host_mappings_removed) mappings," \
  "$(counter faults) faults"
if [[ "$vmm" == *"exit=0 "* && -n "$l2" && "$nvme_read" == *"md5=$want"* && $vtd_up -gt 0 ]]; then
  echo "demo: OK: our vmm booted Linux with 2 vCPUs, our VT-d and the host's NVMe behind it; the"
  echo "      guest's IOMMU driver mapped what the device may reach, the device read the disk with"
  echo "      the L0 image's md5, and the vmm exited 0 when the guest powered off"
else
  echo "demo: FAILED: see $log"
  exit 1
fi
