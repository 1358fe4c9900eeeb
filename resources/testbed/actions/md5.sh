# md5 of a block device (tb.dev=, default /dev/nvme0n1), e.g. the passed-through NVMe whose known
# content is target/testbed/disk.img; loads the NVMe modules if the device is not there yet.
dev="${TB_DEV:-/dev/nvme0n1}"
if [ ! -b "$dev" ]; then
  for m in $(cat /tb/modules/nvme.list); do insmod "$m" 2>/dev/null; done
fi
# The namespace appears asynchronously after the controller probe.
i=0
while [ ! -b "$dev" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
if [ -b "$dev" ]; then
  sum="$(md5sum "$dev" | cut -d' ' -f1)"
  mark "md5 dev=$dev md5=$sum bytes=$(cat /sys/class/block/${dev##*/}/size 2>/dev/null | awk '{print $1 * 512}')"
else
  mark "md5 dev=$dev missing"
  false
fi
