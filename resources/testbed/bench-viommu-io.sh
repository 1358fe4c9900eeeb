# L2 action of bench-viommu.sh (installed as /tb/actions/bench-io.sh by its initramfs overlay,
# sourced by l2-init.sh, which defines `mark`). Runs the benchmark's workloads on the
# passed-through NVMe, each between two markers:
#   @@TB L2 bench begin w=NAME
#   @@TB L2 bench end w=NAME rc=RC secs=S bytes=B [iops=N]
# Each marker is followed (begin) or preceded (end) by 1 s of idleness, so that the counters L1
# snapshots when it sees a marker, and the L0 trace lines between the two markers' arrival times,
# belong to that workload alone (the console's latency is far below 1 s; deferred unmaps flush
# after 10 ms, inside the quiet second).
# Sizes (env from the L2 cmdline): tb.count4k= (default 2000), tb.count128k= (default 1024),
# tb.fioios= random reads per fio job (default 1500). tb.workloads= the workloads to run, joined
# by '+' (default dd-4k+dd-128k+fio-rand4k; `none` runs none), tb.exitcost=0 skips the exit cost
# measurement (record-viommu.sh records one workload per boot).
dev=/dev/nvme0n1
n4k="${TB_COUNT4K:-2000}" n128k="${TB_COUNT128K:-1024}" fioios="${TB_FIOIOS:-1500}"
workloads="+${TB_WORKLOADS:-dd-4k+dd-128k+fio-rand4k}+"
wanted() { case "$workloads" in *"+$1+"*) return 0 ;; esac; return 1; }
if [ ! -b "$dev" ]; then
  for m in $(cat /tb/modules/nvme.list); do insmod "$m" 2>/dev/null; done
fi
i=0
while [ ! -b "$dev" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
[ -b "$dev" ] || { mark "bench error no $dev"; return 1; }

now() { cut -d' ' -f1 /proc/uptime; }
# A few untimed reads first: the first I/O after the driver's probe pays one-time costs. Then a
# quiet second, so L1's snapshot at the first marker does not miss them (the vmm rewrites its
# stats file every 100 ms).
dd if="$dev" of=/dev/null bs=4k count=64 iflag=direct 2>/dev/null
# What the guest made of its platform: paravirtual spinlocks, clock, APIC mode, IOMMU mode.
mark "bench guest $(dmesg | grep -o -E 'PV spinlocks [a-z]+|clocksource: Switched to clocksource [a-z-]+|x2apic enabled|Enabled IRQ remapping in [a-z2]+ mode|DMA domain TLB invalidation policy: [a-z]+ mode' | sort -u | tr ' \n' '_ ')"
sleep 1

# bench NAME BYTES COMMAND...: runs COMMAND between the two markers, timed with L2's clock.
bench() {
  w=$1 bytes=$2; shift 2
  mark "bench begin w=$w"
  sleep 1
  t0=$(now)
  "$@" >/tmp/bench.out 2>&1
  rc=$?
  t1=$(now)
  sleep 1
  extra=""
  # fio --minimal (terse v3): field 8 is the read IOPS.
  [ "$w" = fio-rand4k ] && extra="iops=$(awk -F';' 'NR == 1 { print $8 }' /tmp/bench.out)"
  [ $rc -eq 0 ] || head -c 300 /tmp/bench.out
  mark "bench end w=$w rc=$rc secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }') bytes=$bytes $extra"
}

wanted dd-4k && bench dd-4k $((n4k * 4096)) dd if="$dev" of=/dev/null bs=4k count="$n4k" iflag=direct
# The disk holds 512 blocks of 128 KiB: more are read as passes over the whole disk, so the run is
# long enough for /proc/uptime's 10 ms ticks.
dd128k() {
  left=$n128k
  while [ "$left" -gt 0 ]; do
    c=$left && [ "$c" -gt 512 ] && c=512
    dd if="$dev" of=/dev/null bs=128k count="$c" iflag=direct || return 1
    left=$((left - c))
  done
}
wanted dd-128k && bench dd-128k $((n128k * 131072)) dd128k
# Two jobs, one per vCPU (so one NVMe queue each), 4 in flight each, random 4 KiB reads over the
# whole 64 MiB disk; a fixed number of I/Os, so every VMM does the same work.
wanted fio-rand4k && bench fio-rand4k $((2 * fioios * 4096)) fio --name=mq --filename="$dev" --direct=1 --rw=randread \
  --bs=4k --ioengine=libaio --iodepth=4 --numjobs=2 --thread --cpus_allowed=0-1 \
  --cpus_allowed_policy=split --number_ios="$fioios" --norandommap --randrepeat=1 \
  --group_reporting --minimal
# Where the NVMe's queue interrupts landed (per vCPU): with two jobs, one queue each, each
# queue's completions should reach the vCPU that submitted them.
wanted fio-rand4k && mark "bench irqs $(awk '/nvme/ { s = $NF "="; for (i = 2; i <= 3; i++) s = s $i (i < 3 ? "," : ""); printf "%s ", s }' /proc/interrupts)"
# What one exit costs under this VMM, by where it is handled (exit-cost.sh; the bench's L2 runs
# with iomem=relaxed for it): the floor under every vIOMMU row.
[ "${TB_EXITCOST:-1}" = 0 ] || TB_N=5000 . /tb/actions/exit-cost.sh
mark "bench done"
