# Keeps the passed-through NVMe busy with direct reads until the VM dies: for tests that kill
# the VMM or crash the guest mid-I/O. Prints "@@TB L2 io-running" once I/O is flowing.
for m in $(cat /tb/modules/nvme.list); do insmod "$m" 2>/dev/null; done
i=0
while [ ! -b /dev/nvme0n1 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
dd if=/dev/nvme0n1 of=/dev/null bs=4k count=256 iflag=direct 2>/dev/null
mark "io-running"
while :; do dd if=/dev/nvme0n1 of=/dev/null bs=64k count=256 iflag=direct 2>/dev/null; done
