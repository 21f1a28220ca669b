#!/usr/bin/env bash
# Every test: unit tests, decoder tests, scenario tests, the 10,000-seed simulator soak and the
# mutation tests (cargo test), then a release soak of 200,000 more seeds through `ordinal sim`,
# the command users run, short runs of the loopback and emulated-WAN benchmarks, and the RDMA
# suite in a soft-RoCE guest (tools/guest/suite.sh). Installs what a fresh machine lacks first.
# Ends with one line that totals what cargo test ran.
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/setup.sh
cargo fmt --all -- --check || { echo "test: code is not formatted (cargo fmt --all)" >&2; exit 1; }
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --workspace --locked 2>&1 | tee "$log"
cargo build --release --locked -p ordinal
./target/release/ordinal sim --first 1000000 --seeds 200000
# The loopback benchmark, briefly: it must run end to end (figures printed, no write failing).
# 10,000 writes one at a time, so that the p99 it prints rests on 100 of them rather than 20.
cargo bench --locked -p ordinal-bench --bench loopback -- --samples 10000 --seconds 1
# And the sweep, on two points: it must measure, compare and write its JSON, .hgrm and plots.
rm -rf target/bench-smoke
./target/release/ordinal bench --modes order-sync --sizes 4096 --queue-depths 1,4 --point-ms 200 --out target/bench-smoke
test -s target/bench-smoke/results.json && test -s target/bench-smoke/throughput-by-size.svg
# And the tuning search, on short trials: it must try every knob and come to a verdict.
./target/release/ordinal tune --queue-depths 1,4 --point-ms 200 --confirm 1 | tee target/tune-smoke.txt
grep -Eq '^(best configuration|the winner of the search did not beat)' target/tune-smoke.txt
# And the WAN measurement, briefly: two network namespaces joined by the emulated link; it must
# carry both modes end to end and print its table.
tools/wan.sh --sizes 4096,1048576 --writes 5 --burst-writes 4 --burst-depth 2 | tee target/wan-smoke.txt
grep -q '^ 1048576 B ' target/wan-smoke.txt
# Real RDMA: the verbs tests and perftest in a soft-RoCE guest (skipped loudly where QEMU cannot run).
tools/guest/suite.sh
awk '/^test result:/ { passed += $4; failed += $6 } END { printf "tests: %d passed, %d failed\n", passed, failed }' "$log"
