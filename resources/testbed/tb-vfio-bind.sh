#!/bin/sh
# In L1: binds every PCI device VENDOR:DEVICE (hex, e.g. 1b36:0010 for the NVMe, 1234:11e8 for
# edu) to vfio-pci and prints one marker per device:
#   @@TB L1 vfio-bound bdf=0000:00:03.0 id=1b36:0010 group=/dev/vfio/N
# Exits non-zero if no such device ends up bound.
set -u
id="${1:?usage: tb-vfio-bind VENDOR:DEVICE}"
vendor="0x${id%%:*}" device="0x${id##*:}"
found=0
for d in /sys/bus/pci/devices/*; do
  [ "$(cat "$d/vendor")" = "$vendor" ] && [ "$(cat "$d/device")" = "$device" ] || continue
  bdf="${d##*/}"
  [ -e "$d/driver" ] && echo "$bdf" >"$d/driver/unbind"
  # driver_override binds exactly this device (new_id would grab every device with the id).
  echo vfio-pci >"$d/driver_override"
  echo "$bdf" >/sys/bus/pci/drivers/vfio-pci/bind || { echo "tb-vfio-bind: binding $bdf failed" >&2; continue; }
  group="$(basename "$(readlink "$d/iommu_group")")"
  echo "@@TB L1 vfio-bound bdf=$bdf id=$id group=/dev/vfio/$group"
  found=$((found + 1))
done
[ "$found" -gt 0 ] || { echo "tb-vfio-bind: no device $id bound to vfio-pci" >&2; exit 1; }
