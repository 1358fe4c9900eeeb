# Times N devmem reads of: RAM (no exit), the IOAPIC (exit handled in L1's kernel), the VT-d
# VER register (exit to the VMM in L1 userspace).
n=${TB_N:-400}
t() { awk '{print $1}' /proc/uptime; }
for what in ram:0x9f000 ioapic:0xfec00000 vtd:0xfed90000; do
  name=${what%%:*}; addr=${what#*:}
  s=$(t); i=0
  while [ $i -lt $n ]; do devmem $addr 32 >/dev/null; i=$((i + 1)); done
  e=$(t)
  mark "exitcost $name n=$n secs=$(awk "BEGIN{print $e - $s}")"
done
