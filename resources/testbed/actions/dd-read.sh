# Times direct 4 KiB reads from a block device (tb.dev=, default /dev/nvme0n1; tb.count=, default
# 2000): the reference passthrough workload. Prints "@@TB L2 dd-read ... secs=S".
dev="${TB_DEV:-/dev/nvme0n1}" count="${TB_COUNT:-2000}"
if [ ! -b "$dev" ]; then
  for m in $(cat /tb/modules/nvme.list); do insmod "$m" 2>/dev/null; done
fi
i=0
while [ ! -b "$dev" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
t0=$(cut -d' ' -f1 /proc/uptime)
dd if="$dev" of=/dev/null bs=4k count="$count" iflag=direct 2>/dev/null
rc=$?
mark "dd-read dev=$dev count=$count rc=$rc secs=$(awk -v t0=$t0 '{printf "%.2f", $1 - t0}' /proc/uptime)"
[ $rc -eq 0 ]
