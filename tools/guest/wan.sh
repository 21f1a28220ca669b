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
#   tools/guest/wan.sh [--delay-ms 5[,25,...]] [--rate-mbit 100] [--sizes 4096,65536,262144,1048576]
#                      [--writes 40] [--burst-writes 32] [--burst-depth 16] [--fifo]
set -euo pipefail
prog=wan.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$repo"
. tools/wan-lib.sh

wan_parse_args "$@"

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
          awk -v phase=\$phase -f tools/wan-lag.awk /tmp/lag.txt
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
    wan_read_mode "$mode" <<<"$log"
    printf '%s\n' "$log" | grep -E '^(== |nbd |round-trip|rpo: |\{)' | sed "s/^/$mode: /"
    rm -rf "$run_dir"
  done
  rm -rf "$shared"

  wan_link_table "$delay_ms"
}

wan_run_links
