# Crashes the guest kernel while the passed-through NVMe is busy with direct reads.
( . /tb/actions/dd-loop.sh ) &
i=0
while ! dmesg | grep -q "@@TB L2 io-running" && [ $i -lt 200 ]; do sleep 0.1; i=$((i + 1)); done
sleep 0.5
mark "panicking mid-io"
echo c >/proc/sysrq-trigger
