# Passthrough proof (issue 4), per NVMe controller by serial: `nvme0` (the L0 disk image) gets
# the md5 of its first 16 MiB read with O_DIRECT; `nvme1` (a scratch disk) gets a 4 KiB pattern
# ("tb-pt-pattern" lines) written with O_DIRECT at byte 1 MiB, read back and compared.
# Prints "@@TB L2 nvme-pt read serial=nvme0 md5=M" and "@@TB L2 nvme-pt write serial=nvme1 ok=1".
for m in $(cat /tb/modules/nvme.list); do insmod "$m" 2>/dev/null; done
i=0
while [ -z "$(ls /sys/class/nvme/*/nvme*n1 -d 2>/dev/null)" ] && [ $i -lt 100 ]; do
  sleep 0.1; i=$((i + 1))
done
n=0
for c in /sys/class/nvme/nvme*; do
  serial=$(tr -d ' ' <"$c/serial")
  ns=$(ls -d "$c"/nvme*n1 2>/dev/null | head -n1)
  dev=/dev/${ns##*/}
  [ -b "$dev" ] || { mark "nvme-pt missing serial=$serial"; continue; }
  case "$serial" in
    nvme0)
      sum=$(dd if="$dev" bs=1M count=16 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
      mark "nvme-pt read serial=$serial dev=$dev md5=$sum"; n=$((n + 1)) ;;
    nvme1)
      yes tb-pt-pattern | head -c 4096 >/tmp/pat
      dd if=/tmp/pat of="$dev" bs=4096 seek=256 count=1 oflag=direct conv=notrunc 2>/dev/null
      wrc=$?
      dd if="$dev" of=/tmp/back bs=4096 skip=256 count=1 iflag=direct 2>/dev/null
      ok=0; cmp -s /tmp/pat /tmp/back && ok=1
      mark "nvme-pt write serial=$serial dev=$dev rc=$wrc ok=$ok"; n=$((n + 1)) ;;
  esac
done
[ $n -gt 0 ]
