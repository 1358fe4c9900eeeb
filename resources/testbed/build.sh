#!/usr/bin/env bash
# Builds the nested testbed from Debian packages, cached under target/testbed/ (idempotent: a run
# with unchanged inputs does nothing). Outputs:
#   vmlinuz          the Debian kernel, used for both L1 (under L0 QEMU TCG) and L2 (under the VMM)
#   l1-base.cpio     L1 initramfs: busybox, KVM/VFIO modules, qemu-system-x86_64 + firmware, strace,
#                    fio, the L2 kernel and initramfs under /testbed/
#   l2.cpio.gz       L2 initramfs: busybox, pvpanic, nvme and vfio modules, the action scripts and
#                    tools (mmio-cost, edu-dma)
#   disk.img         64 MiB of known content (sector N says "tb-disk sector N"), md5 in disk.img.md5
# Usage: build.sh [--force]
set -euo pipefail
source "$(dirname "$0")/lib.sh"

force=0
[[ "${1:-}" == "--force" ]] && force=1

for tool in qemu-system-x86_64 busybox cpio strace fio modprobe ldd gzip; do
  command -v "$tool" >/dev/null || tb_die "$tool missing: run resources/testbed/install-deps.sh"
done
kver="$(tb_kernel_version)"
mkdir -p "$TB_OUT"
# One build at a time (tests, the demo and run.sh may start together).
exec 9>"$TB_OUT/build.lock"
flock 9

# The cache key: our scripts, the kernel version and the versions of the packages we copy from.
key="$( {
  cat "$TB_SRC"/lib.sh "$TB_SRC"/build.sh "$TB_SRC"/l1-init.sh "$TB_SRC"/l2-init.sh "$TB_SRC"/actions/*.sh \
    "$TB_SRC"/tb-vfio-bind.sh "$TB_SRC"/tools/*.c
  echo "$kver"
  dpkg-query -W -f='${Package} ${Version}\n' qemu-system-x86 busybox-static strace fio seabios \
    "linux-image-$kver" 2>/dev/null || true
} | sha256sum | cut -d' ' -f1)"

outputs=(vmlinuz l1-base.cpio l2.cpio.gz disk.img disk.img.md5)
up_to_date=1
for f in "${outputs[@]}"; do [[ -s "$TB_OUT/$f" ]] || up_to_date=0; done
[[ "$(cat "$TB_OUT/build.key" 2>/dev/null)" == "$key" ]] || up_to_date=0
if ((up_to_date && !force)); then
  tb_log "up to date in $TB_OUT (kernel $kver)"
  exit 0
fi

tb_log "building in $TB_OUT (kernel $kver)"
work="$(mktemp -d "$TB_OUT/build.XXXXXX")"
trap 'rm -rf "$work"' EXIT

cp "/boot/vmlinuz-$kver" "$work/vmlinuz"

# --- L2 initramfs -------------------------------------------------------------------------------
l2="$work/l2"
mkdir -p "$l2"/{proc,sys,dev,tmp,tb/modules,tb/actions,tb/bin}
tb_install_busybox "$l2"
# Measuring tools the actions run (static: the L2 has no libc).
gcc -static -O2 -Wall -o "$l2/tb/bin/mmio-cost" "$TB_SRC/tools/mmio-cost.c"
gcc -static -O2 -Wall -o "$l2/tb/bin/edu-dma" "$TB_SRC/tools/edu-dma.c"
gcc -static -O2 -Wall -o "$l2/tb/bin/dma-high" "$TB_SRC/tools/dma-high.c"
install -m 0755 "$TB_SRC/l2-init.sh" "$l2/init"
install -m 0644 "$TB_SRC"/actions/*.sh "$l2/tb/actions/"
tb_copy_modules "$l2" "$kver" pvpanic-mmio pvpanic-pci >"$l2/tb/modules/pvpanic.list"
tb_copy_modules "$l2" "$kver" crc64 crc64-rocksoft crct10dif_common crc-t10dif t10-pi nvme-core nvme \
  >"$l2/tb/modules/nvme.list"
tb_copy_modules "$l2" "$kver" vfio-pci vfio_iommu_type1 >"$l2/tb/modules/vfio.list"
tb_cpio "$l2" | gzip -n -6 >"$work/l2.cpio.gz"

# --- L1 base initramfs --------------------------------------------------------------------------
tb_l1_base "$work/l1" "$kver" "$work/vmlinuz" "$work/l2.cpio.gz" "$work/l1-base.cpio" \
  irqbypass kvm ccp kvm-amd vfio vfio_iommu_type1 vfio_virqfd vfio-pci-core vfio-pci

# --- disk image ---------------------------------------------------------------------------------
# 131072 sectors of 512 bytes, each a distinct text line padded with spaces, so a misplaced block
# is easy to see with dd/hexdump and the md5 of the whole disk is fixed.
awk 'BEGIN { for (s = 0; s < 131072; s++) printf "%-511s\n", sprintf("tb-disk sector %d", s) }' \
  >"$work/disk.img"
md5sum "$work/disk.img" | cut -d' ' -f1 >"$work/disk.img.md5"

for f in "${outputs[@]}"; do mv -f "$work/$f" "$TB_OUT/$f"; done
echo "$kver" >"$TB_OUT/kernel-version"
echo "$key" >"$TB_OUT/build.key"
tb_log "built: $(cd "$TB_OUT" && du -sh "${outputs[@]}" | tr '\t\n' '= ')"
