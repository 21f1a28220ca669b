#!/usr/bin/env bash
# The patent's claim on an emulated long-distance link: two soft-RoCE guests (site: aux, primary
# and the client; dr: the DR) whose link gets netem's delay and rate limit on both sides
# (default 5 ms each way, so a 10 ms round trip, and 100 Mbit/s). For each mode (order-sync,
# then sync) the primary serves NBD and `ordinal bench --nbd` writes one block at a time per
# payload size. Prints, per size, the p50 of both modes, sync / order-sync, and order-sync's p50
# in round trips of the link (ping's average, measured in the same run).
#
# order-sync acknowledges once the local write is done and the DR holds the order record: one
# round trip of a small message whatever the payload, while the lag is within the DR's ring
# (each size writes at most 32 MiB, half the default ring). sync waits for the payload too, so it
# grows with payload / bandwidth. The transport is TCP: long links are often plain TCP, and
# netem shapes both alike. The RPO side: `ordinal status --watch` samples the primary's lag every
# 200 ms during the run; the lag series (ops and MiB, about one sample a second) is printed, and
# the largest lag seen is what a failover at the worst moment would not recover (every such
# write is then listed in the loss report, none is lost silently). One write at a time keeps
# the lag within a write or two, so a burst follows: --burst-writes of 1 MiB with
# --burst-depth in flight (`ordinal bench --nbd` writes at most 32 MiB per size, half the
# ring), sampled until the lag has drained. Where order-sync acknowledges faster than the link
# carries the payloads its lag grows past the writes in flight; sync's cannot.
#
# The link is a delay (netem) followed by a rate-limited bottleneck (tbf) that serves a
# strict-priority queue (prio), as a WAN router that honours DSCP would: ordinal marks its order
# connection EF / priority 6, so order records do not wait behind payload bursts.
# --fifo gives one queue for everything instead, to see what that marking is worth.
#
# --delay-ms takes a list (--delay-ms 5,25,100): the whole run is repeated per delay and a last
# table puts the links side by side. The CPU cost of a megabyte under emulation (a 1 MiB
# order-sync write takes about 21 ms in one guest with no link at all) is paid at every delay,
# so the round trips at which order-sync's 1 MiB p50 comes within 1.2x of the link's are the
# longer ones.
#
#   tools/guest/wan.sh [--delay-ms 5[,25,...]] [--rate 100mbit] [--sizes 4096,65536,262144,1048576]
#                      [--writes 40] [--burst-writes 32] [--burst-depth 16] [--fifo]
set -euo pipefail
prog=wan.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$repo"

delays=5
rate=100mbit
sizes=4096,65536,262144,1048576
writes=40
burst_writes=32
burst_depth=16
fifo=0
while (($#)); do
  case "$1" in
    --delay-ms) delays=$2; shift 2 ;;
    --rate) rate=$2; shift 2 ;;
    --sizes) sizes=$2; shift 2 ;;
    --writes) writes=$2; shift 2 ;;
    --burst-writes) burst_writes=$2; shift 2 ;;
    --burst-depth) burst_depth=$2; shift 2 ;;
    --fifo) fifo=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument $1" ;;
  esac
done

cargo build --locked --release -p ordinal
bin=./target/release/ordinal
shared=target/guest-wan
# iproute2's tc (busybox's knows no netem); queues long enough that the rate limit delays
# packets instead of dropping them.
tc=/sbin/tc
# One link: both modes across it, then its table. Figures are kept for the last table, keyed by
# delay (all_p50[delay,mode,size], all_rtt[delay]).
declare -A all_p50 all_rtt
run_link() {
  local delay_ms=$1
  if ((fifo)); then
    netem="$tc qdisc add dev eth0 root netem delay ${delay_ms}ms rate $rate limit 100000"
  else
    netem="$tc qdisc add dev eth0 root handle 1: netem delay ${delay_ms}ms limit 100000
      $tc qdisc add dev eth0 parent 1:1 handle 10: tbf rate $rate burst 64kb latency 10s
      $tc qdisc add dev eth0 parent 10:1 handle 20: prio"
  fi
  local -A p50 rtt burst_lag burst_line
  for mode in order-sync sync; do
    rm -rf "$shared" && mkdir -p "$shared"
    head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$shared/psk"
    common="--psk-file $shared/psk --ring-mib 64 --table-slots 4096 --max-write-kib 1024 --transport tcp"
    run_dir=$(mktemp -d "${TMPDIR:-/tmp}/ordinal-wan.XXXXXX")
    tools/guest/cluster.sh --quiet --mem 2G --timeout 900 --run-dir "$run_dir" \
      --guest "site=$netem
        $bin aux $common --state-dir /tmp/aux --listen 10.77.0.1:7430 >/tmp/aux.log 2>&1 &
        truncate -s 256M /tmp/primary.vol
        $bin primary $common --mode $mode --volume /tmp/primary.vol --dr 10.77.0.2:7420 --aux 10.77.0.1:7430 --listen 10.77.0.1:7410 --nbd-listen 127.0.0.1:10809 >/tmp/primary.log 2>&1 &
        n=0; until netstat -ltn | grep -q ':10809 '; do n=\$((n + 1)); [ \$n -le 300 ] || exit 3; sleep 0.1; done
        echo '== link'; ping -c 10 10.77.0.2 | tail -n 1
        # Unmeasured: connects the DR and warms both sides up.
        $bin bench --nbd 127.0.0.1:10809 --sizes 4096 --queue-depths 1 --writes 20 >/dev/null; rc=\$?
        # Two phases, each with the lag sampled: one write at a time per size (the latencies
        # above), then a burst of $burst_writes writes of 1 MiB, $burst_depth in flight, faster than
        # the link drains them.
        for phase in latency burst; do
          [ \$rc -eq 0 ] || break
          echo \"== $mode \$phase\"
          $bin status --watch --interval-ms 200 --node 10.77.0.1:7410 --psk-file $shared/psk >/tmp/lag.txt 2>&1 & w=\$!
          if [ \$phase = latency ]; then
            $bin bench --nbd 127.0.0.1:10809 --sizes $sizes --queue-depths 1 --writes $writes; rc=\$?
          else
            $bin bench --nbd 127.0.0.1:10809 --sizes 1048576 --queue-depths $burst_depth --writes $burst_writes; rc=\$?
            # The lag drains after the last acknowledgement too: keep sampling until it is gone.
            n=0; until $bin status --json --node 10.77.0.1:7410 --psk-file $shared/psk | grep -q '\"lag_ops\":0,'; do
              n=\$((n + 1)); [ \$n -le 600 ] || break; sleep 0.2; done
          fi
          kill \$w
          # Columns of status --watch: acked/s, last seq, lag ops, lag MiB, ... One sample every
          # 200 ms; the series prints every fifth (about one a second).
          awk -v phase=\$phase '\$3 ~ /^[0-9]+\$/ { n++; if (\$3 > ops) { ops = \$3; at = n * 0.2 }; if (\$4 > mib) mib = \$4
                 if (n % 5 == 0) printf \"rpo: %s: at %5.1f s lag %6d ops %8.1f MiB\\n\", phase, n * 0.2, \$3, \$4 }
               END { printf \"rpo: %s: largest lag seen %d ops (at %.1f s), %.1f MiB: what a failover at that moment would lose\\n\", phase, ops, at, mib }' /tmp/lag.txt
        done
        echo '== primary status'; $bin status --json --node 10.77.0.1:7410 --psk-file $shared/psk
        [ \$rc -eq 0 ] || tail -n 20 /tmp/primary.log
        touch $shared/done; exit \$rc" \
      --guest "dr=$netem
        truncate -s 256M /tmp/dr.vol
        $bin dr $common --state-dir /tmp/dr --listen 10.77.0.2:7420 --volume /tmp/dr.vol --aux 10.77.0.1:7430 --no-auto-failover >/tmp/dr.log 2>&1 &
        while [ ! -e $shared/done ]; do sleep 0.5; done; exit 0" \
      && rc=0 || rc=$?
    log=$(tr -d '\r' <"$run_dir/site.log")
    if ((rc != 0)); then
      printf '%s\n' "$log" | tail -n 30 | sed 's/^/    | /'
      die "$mode run failed (exit $rc); consoles in $run_dir"
    fi
    # busybox ping: "round-trip min/avg/max = 10.4/10.9/11.8 ms"
    rtt[$mode]=$(printf '%s\n' "$log" | sed -n 's|^round-trip min/avg/max = [0-9.]*/\([0-9.]*\)/.*|\1|p' | tail -n 1)
    burst_lag[$mode]=$(printf '%s\n' "$log" | sed -n 's/^rpo: burst: largest lag seen \([0-9]* ops\) (at [0-9.]* s), \([0-9.]* MiB\).*/\1, \2/p' | tail -n 1)
    burst_line[$mode]=$(printf '%s\n' "$log" | sed -n 's/^nbd 1048576 B QD [0-9]*: \(.*\)/\1/p' | tail -n 1)
    while read -r size value; do p50[$mode,$size]=$value; done < <(
      printf '%s\n' "$log" | sed -n 's/^nbd \([0-9]*\) B QD 1: .* p50 \([0-9]*\) us.*/\1 \2/p')
    printf '%s\n' "$log" | grep -E '^(== |nbd |round-trip|rpo: |\{)' | sed "s/^/$mode: /"
    rm -rf "$run_dir"
  done
  rm -rf "$shared"

  printf '\nlink: delay %s ms each way, rate %s, %s; ping round trip %s ms (order-sync run), %s ms (sync run)\n' \
    "$delay_ms" "$rate" "$( ((fifo)) && echo 'one FIFO queue' || echo 'order traffic in a priority band')" "${rtt[order-sync]:-?}" "${rtt[sync]:-?}"
  printf '%10s %16s %12s %12s %20s\n' "payload" "order-sync p50" "sync p50" "sync / o-s" "o-s p50 / RTT"
  IFS=, read -r -a size_list <<<"$sizes"
  for size in "${size_list[@]}"; do
    os=${p50[order-sync,$size]:-} sy=${p50[sync,$size]:-}
    [[ -n $os && -n $sy ]] || die "no figure for $size B"
    awk -v size="$size" -v os="$os" -v sy="$sy" -v rtt="${rtt[order-sync]}" 'BEGIN {
      printf "%10s %13.1f ms %9.1f ms %11.2fx %19.2fx\n", size " B", os / 1000, sy / 1000, sy / os, os / 1000 / rtt }'
  done
  echo "(target: order-sync p50 for 1 MiB <= 1.2x the link round trip)"
  printf '\nburst of %s writes of 1 MiB, %s in flight:\n' "$burst_writes" "$burst_depth"
  for mode in order-sync sync; do
    printf '%10s: %s; largest lag %s\n' "$mode" "${burst_line[$mode]:-?}" "${burst_lag[$mode]:-?}"
  done
  for size in "${size_list[@]}"; do
    all_p50[$delay_ms,order-sync,$size]=${p50[order-sync,$size]}
    all_p50[$delay_ms,sync,$size]=${p50[sync,$size]}
  done
  all_rtt[$delay_ms]=${rtt[order-sync]}
}

IFS=, read -r -a delay_list <<<"$delays"
for delay_ms in "${delay_list[@]}"; do
  [[ $delay_ms =~ ^[0-9]+$ ]] || die "--delay-ms takes whole milliseconds, comma-separated: $delays"
  run_link "$delay_ms"
done
if ((${#delay_list[@]} > 1)); then
  printf '
every link (rate %s, %s):
' "$rate" "$( ((fifo)) && echo 'one FIFO queue' || echo 'order traffic in a priority band')"
  printf '%9s %10s %10s %16s %12s %12s %16s
' "each way" "RTT" "payload" "order-sync p50" "sync p50" "sync / o-s" "o-s p50 / RTT"
  for delay_ms in "${delay_list[@]}"; do
    for size in "${size_list[@]}"; do
      awk -v d="$delay_ms" -v size="$size" -v os="${all_p50[$delay_ms,order-sync,$size]}" \
        -v sy="${all_p50[$delay_ms,sync,$size]}" -v rtt="${all_rtt[$delay_ms]}" 'BEGIN {
        printf "%6s ms %7.1f ms %10s %13.1f ms %9.1f ms %11.2fx %15.2fx\n", d, rtt, size " B", os / 1000, sy / 1000, sy / os, os / 1000 / rtt }'
    done
  done
  echo "(target: order-sync p50 for 1 MiB <= 1.2x the link round trip)"
fi
