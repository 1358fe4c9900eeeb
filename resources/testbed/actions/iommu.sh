# Reports what the guest's IOMMU driver did: its kernel messages (one marker each), the
# capabilities it read from each unit (hex, as sysfs shows them) and the IOMMU groups devices
# were put in.
dmesg | grep -E 'DMAR|iommu|IOMMU' | while IFS= read -r line; do
  mark "dmesg ${line#\[*\] }"
done
for u in /sys/class/iommu/*/intel-iommu; do
  [ -d "$u" ] || continue
  unit=${u%/intel-iommu}
  mark "iommu-unit ${unit##*/} cap=$(cat "$u/cap") ecap=$(cat "$u/ecap")"
done
for g in /sys/kernel/iommu_groups/*; do
  [ -d "$g" ] || continue
  mark "iommu-group ${g##*/} devices=$(ls "$g/devices" | tr '\n' ',')"
done
mark "iommu-groups count=$(ls /sys/kernel/iommu_groups 2>/dev/null | wc -l)"
