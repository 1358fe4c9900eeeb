#!/usr/bin/env bash
# Runs kvm-unit-tests' x86 tests (x86/unittests.cfg of the suite in ../shared/kvm-unit-tests,
# built into target/kvm-unit-tests) under our vmm, each with its smp, test_args, qemu_params
# (mapped to our options) and timeout, and prints one table. With --qemu each test also runs
# under qemu-system-x86_64 -accel kvm through the suite's x86/run, one after the other, and the
# table compares results, subtests and times (a full pass with QEMU takes about 15 minutes
# here: many tests time out on this machine's KVM).
#
#   bash resources/kvm-unit-tests.sh                    # every test, ours only
#   bash resources/kvm-unit-tests.sh --pass-list        # the tests QEMU passes here (the bar)
#   bash resources/kvm-unit-tests.sh --qemu --markdown  # the table of docs/kvm-unit-tests.md
#   bash resources/kvm-unit-tests.sh --qemu --refresh-pass-list
#   bash resources/kvm-unit-tests.sh smptest s3         # some tests
#
# Exits 1 when a test on tests/kvm-unit-tests/qemu-passes.txt fails on ours. --help says more.
set -euo pipefail
cd "$(dirname "$0")/.."

# Release builds: the times are compared with QEMU's.
cargo build --quiet --release -p vmm --bin vmm -p integration --bin kvm-unit-tests
export KUT_VMM="$PWD/target/release/vmm"
exec target/release/kvm-unit-tests "$@"
