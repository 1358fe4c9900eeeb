# DMA above 4 GiB (issue 15), per NVMe controller by serial, both at once: `nvme0` (the L0 disk
# image) is read with O_DIRECT through buffers whose every page is above 4 GiB (tools/dma-high.c)
# and the md5 of its first 16 MiB printed; `nvme1` (a scratch disk) gets 1 MiB of
# "tb-high-pattern" lines written at byte TB_OFFSET (default 2 MiB) from such buffers, read back and compared.
# Markers: "@@TB L2 dma-high op=read serial=nvme0 md5=M bytes=N windows=W minpa=A maxpa=B ok=1"
# and "@@TB L2 dma-high op=write serial=nvme1 bytes=N ... ok=1"; then the `iommu` action's.
for m in $(cat /tb/modules/nvme.list); do insmod "$m" 2>/dev/null; done
i=0
while [ "$(ls -d /sys/class/nvme/*/nvme*n1 2>/dev/null | wc -l)" -lt "${TB_NVMES:-2}" ] && [ $i -lt 100 ]; do
  sleep 0.1; i=$((i + 1))
done
for c in /sys/class/nvme/nvme*; do
  serial=$(tr -d ' ' <"$c/serial")
  ns=$(ls -d "$c"/nvme*n1 2>/dev/null | head -n1)
  dev=/dev/${ns##*/}
  case "$serial" in
    nvme0) (sum=$(/tb/bin/dma-high read "$dev" 16777216 2>/tmp/high-read | md5sum | cut -d' ' -f1)
            head -n -1 /tmp/high-read | while read -r l; do mark "dma-high-error serial=$serial $l"; done
            mark "$(tail -n1 /tmp/high-read | sed "s/op=read/op=read serial=$serial md5=$sum/")") & ;;
    nvme1) (/tb/bin/dma-high write "$dev" "${TB_OFFSET:-2097152}" 1048576 2>/tmp/high-write
            head -n -1 /tmp/high-write | while read -r l; do mark "dma-high-error serial=$serial $l"; done
            mark "$(tail -n1 /tmp/high-write | sed "s/op=write/op=write serial=$serial/")") & ;;
  esac
done
wait
[ -f /tb/actions/iommu.sh ] && . /tb/actions/iommu.sh
true
