#!/usr/bin/env bash
# Searches the primary's knobs on this machine's link and prints the best configuration next
# to the defaults measured in the same run (`ordinal tune`; its --help lists the options).
#
#   tools/tune.sh [--mode order-sync] [--size 4096] [--queue-depths 1,8,32,64] [--p99-max-us N]
#
# Over soft-RoCE, in the guest: tools/guest/run.sh -- ./target/release/ordinal tune --transport verbs
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/setup.sh
cargo build --release --locked -p ordinal
exec ./target/release/ordinal tune "$@"
