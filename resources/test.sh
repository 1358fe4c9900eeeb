#!/usr/bin/env bash
# Runs every test of the workspace: formatting, lints, unit and property tests, direct KVM tests and
# the nested-testbed tests. Installs the Debian packages the testbed needs when they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."

bash resources/testbed/install-deps.sh

cargo fmt --all -- --check
cargo fmt --manifest-path fuzz/Cargo.toml -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace

# A short run of every fuzz target, after replaying the inputs that once broke something.
bash resources/fuzz.sh "${FUZZ_SECONDS:-60}"
