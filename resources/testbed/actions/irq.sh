# The interrupt controllers as the guest kernel set them up (issue 11). With tb.first=ACTION it
# runs that action first (e.g. nvme-pt, so its device's interrupts are counted). Then the
# kernel's messages about the PIC, IOAPIC, timers, interrupt remapping and the serial port,
# /proc/interrupts, one marker per IO-APIC or PCI MSI line (chip IO-APIC or PCI-MSI, IR-IO-APIC
# or IR-PCI-MSI when interrupt remapping translates it; pin is the hwirq for MSI):
#   "@@TB L2 irq line=N chip=CHIP pin=P trigger=edge|fasteoi count=C name=NAME"
# and a summary (legacy-irqs: the IRQs the kernel reserved for 8259 PICs, 0 when it has none):
#   "@@TB L2 irq-summary ioapic-lines=N ioapic-count=C msi-count=C local-timer=C legacy-irqs=N"
# With tb.input=TEXT it then waits (60 s at most) for a line on the console and prints
#   "@@TB L2 irq-input got=LINE" (the L1 side types TEXT into the VMM's stdin).
if [ -n "$TB_FIRST" ]; then
  . "/tb/actions/$TB_FIRST.sh" || mark "irq first=$TB_FIRST failed"
fi
dmesg | grep -iE 'pic|ioapic|io-apic|timer|tsc|clocksource|ttyS|legacy|irq|hpet|8254|lapic|remap' \
  | sed 's/^/L2 dmesg: /'
cat /proc/interrupts
sleep 0.3
# Lines look like " 4:  123  IO-APIC   4-edge  ttyS0" or
# " 25:  456  IR-PCI-MSI 65536-edge  nvme0q0" (one count column per CPU).
ncpu=$(grep -c ^processor /proc/cpuinfo)
awk -v n="$ncpu" '$2 ~ /^[0-9]+$/ && $(n + 2) ~ /^(IR-)?(IO-APIC|PCI-MSI)$/ {
  c = 0; for (i = 2; i <= n + 1; i++) c += $i
  split($(n + 3), pt, "-"); name = ""
  for (i = n + 4; i <= NF; i++) name = name (name == "" ? "" : "_") $i
  sub(":", "", $1)
  print $1, $(n + 2), pt[1], pt[2], c, name
}' /proc/interrupts >/tmp/irq-lines
while read -r line chip pin trig count name; do
  mark "irq line=$line chip=$chip pin=$pin trigger=$trig count=$count name=$name"
done </tmp/irq-lines
grep -E '^[0-9]+ (IR-)?IO-APIC ' /tmp/irq-lines >/tmp/ioapic-lines
lines=$(wc -l </tmp/ioapic-lines)
total=$(awk '{s += $5} END {print s + 0}' /tmp/ioapic-lines)
loc=$(awk -v n="$ncpu" '$1 == "LOC:" {c = 0; for (i = 2; i <= n + 1; i++) c += $i; print c}' \
  /proc/interrupts)
msi=$(awk -v n="$ncpu" '$(n + 2) ~ /MSI/ {for (i = 2; i <= n + 1; i++) c += $i} END {print c + 0}' \
  /proc/interrupts)
legacy=$(dmesg | sed -n 's/.*preallocated irqs: \([0-9]*\).*/\1/p')
mark "irq-summary ioapic-lines=$lines ioapic-count=$total msi-count=$msi local-timer=$loc legacy-irqs=$legacy"
if [ -n "$TB_INPUT" ]; then
  got=""
  read -t 60 -r got </dev/console
  mark "irq-input got=$got"
fi
true
