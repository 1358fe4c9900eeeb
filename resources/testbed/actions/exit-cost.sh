# What one VM exit costs the L2, by where it is handled: TB_N (default 20000) 4-byte accesses each
# (resources/testbed/tools/mmio-cost.c), printed as "@@TB L2 exitcost what=... ns=N":
#   ioapic-write  IOAPIC IOREGSEL: an exit handled in L1's kernel (in-kernel irqchip)
#   vtd-read      VT-d VER: a plain load where the VMM maps the registers read-only, else an exit
#                 to the VMM
#   vtd-write     VT-d FEDATA, its own value written back: an exit handled by the VMM (user space)
# Needs `iomem=relaxed` on the L2 command line: the kernel keeps /dev/mem off claimed MMIO.
n=${TB_N:-20000}
cost() { /tb/bin/mmio-cost "$@" 2>&1 | sed -n 's/^ns_per_access=\([0-9]*\).*/\1/p'; }
fedata=$(devmem 0xfed9003c 32)
mark "exitcost what=ioapic-write n=$n ns=$(cost 0xfec00000 w "$n" 0)"
mark "exitcost what=vtd-read n=$n ns=$(cost 0xfed90000 r "$n")"
mark "exitcost what=vtd-write n=$n ns=$(cost 0xfed9003c w "$n" "$fedata")"
