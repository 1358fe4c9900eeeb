# Issue 14's proof: the guest's IOMMU driver maps and unmaps every page the VMM's emulated edu
# (`vmm --edu`) reaches, through VFIO in the guest (/tb/bin/edu-dma): `tb.rounds=` rounds
# (default 16) of a page copied through edu and compared. Prints "@@TB L2 edu-dma rounds=N ok=M
# bdf=B" (and a marker per failing round or step), edu's ATS Control register if it has ATS,
# then what the IOMMU driver did (iommu.sh).
# allow_unsafe_interrupts: for a unit run with intremap=off, which VFIO's type1 backend refuses
# otherwise; the tool uses none of edu's interrupts, so nothing is unsafe about it.
for m in $(cat /tb/modules/vfio.list); do
  case "$m" in
    */vfio_iommu_type1.ko) insmod "$m" allow_unsafe_interrupts=1 ;;
    *) insmod "$m" ;;
  esac 2>/dev/null || mark "warn insmod-failed=${m##*/}"
done
/tb/bin/edu-dma "${TB_ROUNDS:-16}" >/tmp/edu-dma.out 2>&1
rc=$?
while IFS= read -r line; do mark "$line"; done </tmp/edu-dma.out
# ATS on each edu as the guest left it ("ats bdf=B control=HEX"; none without an ATS capability
# in the config space Linux sized): its extended capabilities walked from 0x100 for ID 0x000f
# (PCIe Base 4.0, 7.6.3 and 10.5.1), the ATS Control register at +6 (bit 15: Enable).
for d in /sys/bus/pci/devices/*; do
  [ "$(cat "$d/vendor"):$(cat "$d/device")" = "0x1234:0x11e8" ] || continue
  pos=256
  while [ "$pos" -ne 0 ]; do
    h=$(od -An -tu4 -j "$pos" -N4 "$d/config" 2>/dev/null | tr -d ' ')
    [ -n "$h" ] || break
    if [ $((h & 0xffff)) -eq 15 ]; then
      mark "ats bdf=${d##*/} control=$(od -An -tx2 -j $((pos + 6)) -N2 "$d/config" | tr -d ' ')"
      break
    fi
    pos=$(((h >> 20) & 0xffc))
  done
done
. /tb/actions/iommu.sh
[ $rc -eq 0 ]
