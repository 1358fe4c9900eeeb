# Crashes the kernel (sysrq 'c'). The pvpanic driver reports the panic to the VMM first.
ls /sys/bus/platform/drivers/pvpanic-mmio 2>/dev/null | grep -q : && mark "pvpanic=bound" \
  || mark "pvpanic=unbound"
mark "panicking"
echo 1 >/proc/sys/kernel/sysrq
echo c >/proc/sysrq-trigger
