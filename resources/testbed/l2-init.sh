#!/bin/sh
# /init of the L2 guest (busybox sh), the Linux that runs under the VMM being tested.
# Prints "@@TB L2 init cpus=N mem_kb=M ..." then does what the kernel command line asks:
#   tb.action=NAME   run /tb/actions/NAME.sh (default: poweroff); see resources/testbed/actions/
#   tb.modules=a,b   also load the module groups /tb/modules/<group>.list (e.g. nvme)
#   tb.then=poweroff|reboot|shell|halt   what to do after the action returns (default: poweroff)
# Any other tb.KEY=VALUE is exported to the action as TB_KEY (e.g. tb.md5=... -> TB_MD5).
# More actions or files can be added by appending a cpio archive to the initramfs.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mkdir -p /proc /sys /dev /tmp
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp

# Markers go through printk (/dev/kmsg), not the tty: a tty write is drained later by the serial
# interrupt and can come out after, or inside, a panic message; printk output is synchronous.
echo on >/proc/sys/kernel/printk_devkmsg
mark() {
  if [ -w /dev/kmsg ]; then echo "<2>@@TB L2 $*" >/dev/kmsg; else echo "@@TB L2 $*"; fi
}

action=poweroff
modules=pvpanic
then=poweroff
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    tb.action=*) action=${arg#tb.action=} ;;
    tb.modules=*) modules="$modules,${arg#tb.modules=}" ;;
    tb.then=*) then=${arg#tb.then=} ;;
    tb.*=*)
      key=${arg%%=*}; key=$(echo "${key#tb.}" | tr 'a-z.-' 'A-Z__')
      export "TB_$key=${arg#*=}" ;;
  esac
done

for group in $(echo "$modules" | tr ',' ' '); do
  [ -f "/tb/modules/$group.list" ] || { mark "warn unknown-module-group=$group"; continue; }
  for m in $(cat "/tb/modules/$group.list"); do
    insmod "$m" 2>/dev/null || mark "warn insmod-failed=${m##*/}"
  done
done

# CPUs the kernel brought online, and the memory it manages (MemTotal excludes what the kernel
# reserved, so tests compare it to the requested size with a margin).
cpus=$(grep -c ^processor /proc/cpuinfo)
online=$(cat /sys/devices/system/cpu/online)
mem_kb=$(awk '/^MemTotal:/{print $2}' /proc/meminfo)
iommu=no; [ -n "$(ls /sys/class/iommu 2>/dev/null)" ] && iommu=yes
mark "init cpus=$cpus online=$online mem_kb=$mem_kb iommu=$iommu uptime=$(cut -d' ' -f1 /proc/uptime)"

rc=0
if [ -f "/tb/actions/$action.sh" ]; then
  mark "action=$action start"
  . "/tb/actions/$action.sh"
  rc=$?
else
  mark "warn unknown-action=$action"
  rc=127
fi
mark "action=$action rc=$rc"

case "$then" in
  shell) setsid cttyhack sh ;;
  halt) mark "halting"; while true; do sleep 3600; done ;;
  reboot) mark "rebooting"; reboot -f ;;
esac
mark "powering off"
poweroff -f
