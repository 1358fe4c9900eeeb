#!/bin/sh
# /init of the L1 guest (busybox sh). Loads KVM and VFIO, prints "@@TB L1 ready", runs the
# scenario script the per-run overlay put at /testbed/scenario.sh, prints its exit code and powers
# off (L0 QEMU runs with -no-reboot, so it exits). Markers are single lines starting "@@TB ".
export PATH=/testbed/bin:/usr/sbin:/usr/bin:/sbin:/bin
mkdir -p /proc /sys /dev /tmp /run
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
mkdir -p /dev/pts && mount -t devpts devpts /dev/pts

for m in $(cat /testbed/l1-modules.list); do
  # Soft dependencies that do not apply to this CPU may fail; KVM itself is checked below.
  insmod "$m" 2>/dev/null || echo "@@TB L1 warn insmod-failed=${m##*/}"
done

kvm=no; [ -c /dev/kvm ] && kvm=yes
iommu=no; [ -n "$(ls /sys/class/iommu 2>/dev/null)" ] && iommu=yes
cpus=$(grep -c ^processor /proc/cpuinfo)
echo "@@TB L1 ready kernel=$(uname -r) cpus=$cpus kvm=$kvm iommu=$iommu uptime=$(cut -d' ' -f1 /proc/uptime)"

# A heartbeat on the second serial port (a file on the host when the harness asks for one): lets
# the harness tell a frozen L1 (TCG nested-SVM weakness, see README) from a hung L2 or VMM.
if [ -c /dev/ttyS1 ]; then
  ( while sleep 5; do cut -d' ' -f1 /proc/uptime >/dev/ttyS1; done ) 2>/dev/null &
fi

rc=0
if grep -q 'tb.l1=shell' /proc/cmdline || [ ! -f /testbed/scenario.sh ]; then
  echo "@@TB L1 shell (exit the shell to power off)"
  setsid cttyhack sh
else
  cd /tmp && sh /testbed/scenario.sh
  rc=$?
fi
echo "@@TB L1 scenario-exit=$rc uptime=$(cut -d' ' -f1 /proc/uptime)"
sync
poweroff -f
