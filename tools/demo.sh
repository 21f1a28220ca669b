#!/usr/bin/env bash
# The main job: builds ordinal and runs the fault simulator over 100,000 seeds. Each seed is a
# whole primary/DR/aux run with injected faults, ending in a failover whose outcome is checked
# against the invariants I1-I6. Arguments are passed to `ordinal sim` (try --seed 12946 --trace).
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/setup.sh
cargo build --release --locked -p ordinal
if [ $# -eq 0 ]; then
  set -- --seeds 100000
fi
exec ./target/release/ordinal sim "$@"
