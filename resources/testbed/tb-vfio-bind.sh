#!/bin/sh
# In L1: the one place that finds PCI devices by ID and binds them to vfio-pci.
#
#   tb-vfio-bind [--first] VENDOR:DEVICE   binds every device VENDOR:DEVICE (hex, e.g. 1b36:0010
#                                          for the NVMe, 1234:11e8 for edu), or only the first
#   tb-vfio-bind --find VENDOR:DEVICE      binds nothing
#
# Prints the sysfs path of each device found on stdout, one a line, so scripts take them with
# `nvme=$(tb-vfio-bind --first 1b36:0010) || exit 1`; when binding, it also prints one marker per
# device on stderr (the console), e.g.
#   @@TB L1 vfio-bound bdf=0000:00:03.0 id=1b36:0010 group=/dev/vfio/N
# Exits non-zero if no such device is found (or, when binding, none ends up bound).
# TB_SYSFS (default /sys) is where sysfs is, for the harness's test of this script.
set -u
sys="${TB_SYSFS:-/sys}"
mode=all
case "${1:-}" in
  --first | --find) mode="${1#--}"; shift ;;
esac
id="${1:?usage: tb-vfio-bind [--first | --find] VENDOR:DEVICE}"
vendor="0x${id%%:*}" device="0x${id##*:}"
found=0
for d in "$sys"/bus/pci/devices/*; do
  [ "$(cat "$d/vendor")" = "$vendor" ] && [ "$(cat "$d/device")" = "$device" ] || continue
  if [ "$mode" != find ]; then
    bdf="${d##*/}"
    [ -e "$d/driver" ] && echo "$bdf" >"$d/driver/unbind"
    # driver_override binds exactly this device (new_id would grab every device with the id).
    echo vfio-pci >"$d/driver_override"
    echo "$bdf" >"$sys/bus/pci/drivers/vfio-pci/bind" || { echo "tb-vfio-bind: binding $bdf failed" >&2; continue; }
    group="$(basename "$(readlink "$d/iommu_group")")"
    echo "@@TB L1 vfio-bound bdf=$bdf id=$id group=/dev/vfio/$group" >&2
  fi
  echo "$d"
  found=$((found + 1))
  [ "$mode" = first ] && break
done
if [ "$found" -eq 0 ]; then
  [ "$mode" = find ] && echo "tb-vfio-bind: no device $id" >&2 || echo "tb-vfio-bind: no device $id bound to vfio-pci" >&2
  exit 1
fi
