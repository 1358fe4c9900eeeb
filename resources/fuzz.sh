#!/usr/bin/env bash
# Replays every fuzz target's committed regression inputs, then fuzzes each for a while.
# Usage: resources/fuzz.sh [SECONDS_PER_TARGET]   (default 60)
#
# cargo-fuzz needs nightly-only compiler flags (-Zsanitizer=address); on the stable toolchain
# RUSTC_BOOTSTRAP=1 lets rustc accept them.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-60}
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz"
  cargo install cargo-fuzz --locked --quiet
fi

targets=$(cargo fuzz list)
for t in $targets; do
  cargo fuzz build "$t" >/dev/null
done
for t in $targets; do
  regressions="fuzz/regressions/$t"
  if compgen -G "$regressions/*" >/dev/null; then
    echo "fuzz: $t: replaying $(ls "$regressions" | wc -l) regression input(s)"
    cargo fuzz run "$t" "$regressions"/* -- -runs=1 2>&1 | grep -E "Executed|panicked|SUMMARY" || true
  fi
  corpus=$(mktemp -d)
  echo "fuzz: $t: fuzzing for ${seconds}s"
  log=$(mktemp)
  if ! cargo fuzz run "$t" "$corpus" -- -max_total_time="$seconds" >"$log" 2>&1; then
    tail -n 60 "$log"
    echo "fuzz: $t FAILED: a crashing input is under fuzz/artifacts/$t/; add it to $regressions/" >&2
    exit 1
  fi
  grep -E "^Done" "$log" | sed "s/^/fuzz: $t: /"
  rm -rf "$corpus" "$log"
done
