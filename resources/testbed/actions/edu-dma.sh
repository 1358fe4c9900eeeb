# Issue 14's proof: the guest's IOMMU driver maps and unmaps every page the VMM's emulated edu
# (`vmm --edu`) reaches, through VFIO in the guest (/tb/bin/edu-dma): `tb.rounds=` rounds
# (default 16) of a page copied through edu and compared. Prints "@@TB L2 edu-dma rounds=N ok=M
# bdf=B" (and a marker per failing round or step), then what the IOMMU driver did (iommu.sh).
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
. /tb/actions/iommu.sh
[ $rc -eq 0 ]
