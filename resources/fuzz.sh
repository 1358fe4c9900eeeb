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

# Runs target $1 once on each input in folder $2 (the inputs that once broke it). Fails, with
# libFuzzer's report, when any of them breaks it again.
replay() {
  local t=$1 dir=$2 log
  echo "fuzz: $t: replaying $(ls "$dir" | wc -l) regression input(s)"
  log=$(mktemp)
  if ! cargo fuzz run "$t" "$dir"/* -- -runs=1 >"$log" 2>&1; then
    tail -n 60 "$log"
    rm -f "$log"
    echo "fuzz: $t FAILED: an input under $dir/ breaks it again" >&2
    return 1
  fi
  sed -n "s/^\(Executed .*\)/fuzz: $t: \1/p" "$log"
  rm -f "$log"
}

targets=$(cargo fuzz list)
for t in $targets; do
  cargo fuzz build "$t" >/dev/null
done
for t in $targets; do
  regressions="fuzz/regressions/$t"
  if compgen -G "$regressions/*" >/dev/null; then
    replay "$t" "$regressions"
  fi
  corpus=$(mktemp -d)
  echo "fuzz: $t: fuzzing for ${seconds}s"
  log=$(mktemp)
  if ! cargo fuzz run "$t" "$corpus" -- -max_total_time="$seconds" >"$log" 2>&1; then
    tail -n 60 "$log"
    echo "fuzz: $t FAILED: a crashing input is under fuzz/artifacts/$t/; add it to $regressions/" >&2
    exit 1
  fi
  sed -n "s/^\(Done .*\)/fuzz: $t: \1/p" "$log"
  rm -rf "$corpus" "$log"
done
