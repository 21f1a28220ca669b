#!/usr/bin/env bash
# The main job: builds ordinal and runs `ordinal demo`: aux, DR and primary as separate processes
# on loopback, writes through NBD, the primary killed with SIGKILL mid-flight, failover, and a
# byte-for-byte check of the DR volume. Arguments are passed to `ordinal demo` (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/setup.sh
cargo build --release --locked -p ordinal
exec ./target/release/ordinal demo "$@"
