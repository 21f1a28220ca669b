#!/usr/bin/env bash
# ordinal over RDMA side by side with perftest, in one soft-RoCE guest, on the same device (rxe0):
#   - order round trip: ordinal's order round trip (the primary posts an order record's SEND
#     until the DR's answer that it holds it, one write at a time) against ib_send_lat of the
#     order message's size (80 B: message header and one record) times 2 (perftest reports half
#     a round trip); the whole write-ack latency, local write included, is printed too;
#   - payload stream: ordinal's write throughput with 64 KiB writes at queue depth 32 against
#     ib_write_bw with 64 KiB messages.
# Prints both figures of each pair and their ratio.
#
#   tools/guest/bench.sh [--samples N] [--seconds S] [--poll-spin-us N]
set -euo pipefail
prog=bench.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$repo"

samples=1000
seconds=5
poll_spin_us=50
while (($#)); do
  case "$1" in
    --samples) samples=$2; shift 2 ;;
    --seconds) seconds=$2; shift 2 ;;
    --poll-spin-us) poll_spin_us=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument $1" ;;
  esac
done

build_log=$(mktemp)
out=$(mktemp)
trap 'rm -f "$build_log" "$out"' EXIT
cargo bench --locked -p ordinal-bench --bench loopback --no-run 2>&1 | tee "$build_log"
bench=$(sed -n 's/.*Executable benches\/loopback.rs (\(.*\))$/\1/p' "$build_log" | tail -n 1)
[ -n "$bench" ] || die "cannot find the loopback benchmark binary in cargo's output"

tools/guest/run.sh --timeout 900 --mem 2G -- "$guest_lib"'
set -e
echo "== perftest ib_send_lat, 80 B"
serve_and_run ib_send_lat -s 80 -n 5000
echo "== perftest ib_write_bw, 64 KiB"
serve_and_run ib_write_bw -s 65536 -n 5000
echo "== ordinal, 4 KiB writes"
./'"$bench"' --transport verbs --device rxe0 --poll-spin-us '"$poll_spin_us"' --write-bytes 4096 --samples '"$samples"' --seconds '"$seconds"' --volumes files --dir /dev/shm
echo "== ordinal, 64 KiB writes"
./'"$bench"' --transport verbs --device rxe0 --poll-spin-us '"$poll_spin_us"' --write-bytes 65536 --samples 100 --seconds '"$seconds"' --volumes files --dir /dev/shm
' 2>&1 | tee "$out"

# perftest rows: latency "80 iterations t_min t_max t_typical t_avg ..."; bandwidth
# "65536 iterations BW_peak BW_average MsgRate", where perftest's MB/sec are MiB/s (its format
# factor for MB is 0x100000): converted to MB/s of 10^6 bytes, ordinal's unit, before the ratio.
# ordinal rows: see bench/benches/loopback.rs.
tr -d '\r' <"$out" | awk '
  $1 == 80 && NF >= 6 && $3 ~ /^[0-9.]+$/ { send_lat = $5 }
  $1 == 65536 && NF >= 5 && $4 ~ /^[0-9.]+$/ { write_bw = $4 * 1.048576 }
  /^== ordinal, 4 KiB/ { part = "latency" }
  /^== ordinal, 64 KiB/ { part = "stream" }
  part == "latency" && /^write-ack, one write at a time/ { for (i = 1; i <= NF; i++) if ($i == "p50") ack_p50 = $(i + 1) }
  part == "latency" && /of which: order round trip/ { for (i = 1; i <= NF; i++) if ($i == "p50") rtt_p50 = $(i + 1) }
  part == "stream" && /^throughput at queue depth/ { for (i = 1; i <= NF; i++) if ($i == "MB/s") stream = $(i - 1) }
  END {
    if (send_lat == "" || write_bw == "" || ack_p50 == "" || rtt_p50 == "" || stream == "") { print "bench: a figure is missing (see above)"; exit 1 }
    printf "order round trip: ordinal p50 %.1f us vs ib_send_lat 80 B typical %.2f us x 2 = %.1f us: ratio %.2fx (target <= 1.25x); whole write-ack p50 %.1f us\n", rtt_p50, send_lat, 2 * send_lat, rtt_p50 / (2 * send_lat), ack_p50
    printf "payload stream: ordinal %.1f MB/s (64 KiB writes, QD 32) vs ib_write_bw 64 KiB %.1f MB/s: ratio %.2fx (target >= 0.9x)\n", stream, write_bw, stream / write_bw
  }'
