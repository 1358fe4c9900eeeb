# Prints what the guest sees: kernel, CPUs, memory, PCI devices, ACPI devices. For the demo.
echo "kernel: $(uname -r)  cmdline: $(cat /proc/cmdline)"
grep -m1 'model name' /proc/cpuinfo
grep -E '^(MemTotal|MemFree):' /proc/meminfo
for d in /sys/bus/pci/devices/*; do
  [ -e "$d" ] && echo "pci ${d##*/} $(cat "$d/vendor"):$(cat "$d/device") class=$(cat "$d/class")"
done
ls /sys/bus/acpi/devices 2>/dev/null | tr '\n' ' '; echo

# Let the console drain: tty output is written out after later printk markers otherwise.
sleep 0.3
