#!/usr/bin/env bash
# Every test: unit tests, decoder tests, scenario tests, the 10,000-seed simulator soak and the
# mutation tests (cargo test), then a release soak of 200,000 more seeds through `ordinal sim`,
# the command users run. Installs what a fresh machine lacks first.
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/setup.sh
cargo fmt --all -- --check || { echo "test: code is not formatted (cargo fmt --all)" >&2; exit 1; }
cargo test --workspace --locked
cargo build --release --locked -p ordinal
./target/release/ordinal sim --first 1000000 --seeds 200000
