#!/usr/bin/env bash
# Builds the testbed's second L1 kernel, for the iommufd backend: Debian bookworm-backports' Linux
# 6.12 with iommufd (/dev/iommu) and VFIO's device files (/dev/vfio/devices/vfioN), cached under
# target/testbed/l1-iommufd/ {vmlinuz, l1-base.cpio, kernel-version}. The L2 kernel and initramfs
# inside stay the default testbed's (build.sh), so only L1 differs between the two.
#
# Debian builds no kernel with CONFIG_IOMMUFD (checked in their configs: bookworm-backports 6.12.95,
# trixie 6.12.117, trixie-backports 7.3.4, sid 7.2.13 all say "CONFIG_IOMMUFD is not set"). That
# option adds one module (iommufd) and changes only the VFIO modules (vfio gains device_cdev.o and
# iommufd.o), so this script rebuilds exactly those from Debian's own linux-source-6.12 against
# Debian's headers for the same kernel, and keeps Debian's binary kernel and every other module.
# The one core helper iommufd needs that Debian's kernel lacks (lib/interval_tree.c's span
# iterator, built only when an in-kernel user selects it) is compiled into iommufd.ko.
# Packages come from bookworm-backports (install-deps.sh adds it to apt's sources).
# Usage: build-l1-iommufd.sh [--force]
set -euo pipefail
source "$(dirname "$0")/lib.sh"

force=0
[[ "${1:-}" == "--force" ]] && force=1
out="$TB_OUT/l1-iommufd"
mkdir -p "$out/debs"
bash "$TB_SRC/build.sh"
exec 9>"$out/build.lock"
flock 9

# The newest 6.12 in bookworm-backports: its source, image, headers and kbuild share one version.
ver="$(apt-cache madison linux-image-amd64 2>/dev/null |
  awk -F'|' '/bookworm-backports/ { gsub(/ /, "", $2); print $2; exit }')"
[[ -n "$ver" ]] ||
  tb_die "bookworm-backports is not in apt's sources: run resources/testbed/install-deps.sh (adds it)"
image="$(apt-cache show "linux-image-amd64=$ver" | sed -n 's/^Depends: \(linux-image-[^ ,]*\).*/\1/p' | head -1)"
kver="${image#linux-image-}" # e.g. 6.12.95+deb12-amd64
kbase="${kver%-amd64}"
[[ -n "$image" && "$kver" != "$image" ]] || tb_die "cannot find the image package of linux-image-amd64=$ver"
pkgs=("linux-image-$kver" "linux-headers-$kver" "linux-headers-$kbase-common" "linux-kbuild-$kbase" linux-source-6.12)

key="$( {
  cat "$TB_SRC/lib.sh" "$TB_SRC/build-l1-iommufd.sh" "$TB_SRC/l1-init.sh" "$TB_SRC/tb-vfio-bind.sh" "$TB_OUT/build.key"
  echo "$ver"
} | sha256sum | cut -d' ' -f1)"
if ((!force)) && [[ -s "$out/l1-base.cpio" && -s "$out/vmlinuz" && "$(cat "$out/build.key" 2>/dev/null)" == "$key" ]]; then
  tb_log "l1-iommufd: up to date in $out (kernel $kver)"
  exit 0
fi
tb_log "l1-iommufd: building in $out (kernel $kver, package version $ver)"

for p in "${pkgs[@]}"; do
  compgen -G "$out/debs/${p}_*${ver#*:}*.deb" >/dev/null && continue
  (cd "$out/debs" && apt-get download -q "$p=$ver" >/dev/null 2>&1) ||
    tb_die "apt-get download $p=$ver failed (bookworm-backports in apt's sources? run install-deps.sh)"
done

work="$(mktemp -d "$out/build.XXXXXX")"
trap 'rm -rf "$work"' EXIT
root="$work/root"
for p in "${pkgs[@]:0:4}"; do dpkg-deb -x "$out/debs/${p}_"*.deb "$root"; done
hdr="$root/usr/src/linux-headers-$kver"
# The headers' Makefile includes the common part by its absolute path.
sed -i "s|include /usr/src/|include $root/usr/src/|" "$hdr/Makefile"

src="$work/src"
mkdir -p "$src"
dpkg-deb --fsys-tarfile "$out/debs/linux-source-6.12_"*.deb |
  tar -xO --wildcards '*/linux-source-6.12.tar.xz' |
  tar -xJ -C "$src" --strip-components=1 linux-source-6.12/drivers/iommu linux-source-6.12/drivers/vfio \
    linux-source-6.12/lib/interval_tree.c

m="$work/mod"
mkdir -p "$m/drivers/iommu"
cp -r "$src/drivers/iommu/iommufd" "$m/drivers/iommu/"
cp "$src"/drivers/iommu/*.h "$m/drivers/iommu/"
cp -r "$src/drivers/vfio" "$m/drivers/"
# The span iterator, without its exports (iommufd is its only user).
{
  sed -n '1,/^#define LAST/p' "$src/lib/interval_tree.c"
  sed -n '/^#ifdef CONFIG_INTERVAL_TREE_SPAN_ITER/,/^#endif/p' "$src/lib/interval_tree.c" |
    sed '1d;$d' | grep -v '^EXPORT_SYMBOL'
} >"$m/drivers/iommu/iommufd/span_iter.c"
echo 'iommufd-y += span_iter.o' >>"$m/drivers/iommu/iommufd/Makefile"
echo 'obj-m += drivers/iommu/iommufd/ drivers/vfio/' >"$m/Kbuild"
# Kconfig's answers for the rebuilt modules, as make variables (which objects) and as the
# defines the sources test (IS_ENABLED). Everything else is Debian's .config.
opts=(CONFIG_IOMMUFD=m CONFIG_VFIO=m CONFIG_VFIO_DEVICE_CDEV=y CONFIG_VFIO_GROUP=y CONFIG_VFIO_CONTAINER=y
  CONFIG_VFIO_VIRQFD=y CONFIG_VFIO_IOMMU_TYPE1=m CONFIG_VFIO_PCI_CORE=m CONFIG_VFIO_PCI=m CONFIG_VFIO_PCI_IGD=y
  CONFIG_VFIO_MDEV= CONFIG_DEBUG_INFO_BTF_MODULES=)
make -s -j"$(nproc)" -C "$hdr" M="$m" "${opts[@]}" \
  KCFLAGS="-DCONFIG_IOMMUFD_MODULE=1 -DCONFIG_VFIO_DEVICE_CDEV=1" modules >"$work/make.log" 2>&1 ||
  { tail -30 "$work/make.log" >&2; tb_die "building iommufd and VFIO modules failed (log above)"; }

# Debian's VFIO modules replaced by ours at the same paths, iommufd added, dependencies recomputed.
mods="$root/lib/modules/$kver"
for ko in $(cd "$m" && find drivers -name '*.ko'); do
  rm -f "$mods/kernel/$ko".*
  install -D -m 0644 "$m/$ko" "$mods/kernel/$ko"
done
depmod -b "$root" "$kver"

TB_MODROOT="$root" tb_l1_base "$work/l1" "$kver" "$TB_OUT/vmlinuz" "$TB_OUT/l2.cpio.gz" "$work/l1-base.cpio" \
  irqbypass kvm ccp kvm-amd iommufd vfio vfio_iommu_type1 vfio-pci-core vfio-pci
cp "$root/boot/vmlinuz-$kver" "$work/vmlinuz"
mv -f "$work/vmlinuz" "$work/l1-base.cpio" "$out/"
echo "$kver" >"$out/kernel-version"
echo "$key" >"$out/build.key"
tb_log "l1-iommufd: built: $(cd "$out" && du -sh vmlinuz l1-base.cpio | tr '\t\n' '= ')"
