#!/usr/bin/env bash
# The patent's claim on an emulated long-distance link, on this machine at its own speed. Two
# network namespaces stand for the two sites (site: aux, primary and the client; dr: the DR),
# joined by `wan-link` (bench/src/bin/wan-link.rs): a user-space link between a TUN device in
# each, with a delay each way (default 5 ms, so a 10 ms round trip), a rate limit (100 Mbit/s)
# and a bounded queue that serves DSCP EF first, as a WAN router that honours DSCP would: ordinal
# marks its order connection EF, so order records do not wait behind payload bursts. --fifo
# gives one queue for everything instead, to see what that marking is worth. The TCP stacks on
# both sides are the kernel's; only the link between them is emulated.
#
# Why not netem: this kernel has none. tools/guest/wan.sh runs the same measurement across two
# soft-RoCE guests with netem, where the emulated CPU's cost per megabyte (tens of ms) hides the
# claim at short round trips.
#
# For each mode (order-sync, then sync) the primary serves NBD and `ordinal bench --nbd` writes
# one block at a time per payload size; then a burst of --burst-writes writes of 1 MiB with
# --burst-depth in flight. Prints, per size, the p50 of both modes, sync / order-sync, and
# order-sync's p50 in round trips of the link (ping's average over it, in the same run); and the
# recovery point side: the primary's lag sampled every 200 ms (`ordinal status --watch`), whose
# largest value is what a failover at the worst moment would not recover (all of it in the loss
# report, none lost silently). order-sync acknowledges once the local write is done and the DR
# holds the order record: one round trip whatever the payload, while the lag is within the DR's
# ring (each size writes at most 32 MiB, half the default ring). sync waits for the payload too,
# so it grows with payload / bandwidth.
#
# Needs root (network namespaces, TUN devices); removes its namespaces and files when it ends.
#
#   tools/wan.sh [--delay-ms 5[,25,...]] [--rate-mbit 100] [--sizes 4096,65536,262144,1048576]
#                [--writes 40] [--burst-writes 32] [--burst-depth 16] [--fifo]
set -euo pipefail
prog=wan.sh
cd "$(dirname "${BASH_SOURCE[0]}")/.."
usage() { awk 'NR == 1 {next} /^#/ {sub(/^# ?/, ""); print; next} {exit}' "$0"; }
die() { printf '%s: %s\n' "$prog" "$*" >&2; exit 1; }
. tools/wan-lib.sh

wan_parse_args "$@"
[ "$(id -u)" -eq 0 ] || die "needs root: it creates network namespaces and TUN devices"
[ -c /dev/net/tun ] || die "no /dev/net/tun: this kernel cannot give a process a TUN device"

source tools/setup.sh
for need in ip:iproute2 ping:iputils-ping; do
  command -v "${need%%:*}" >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need#*:}"
done
cargo build --locked --release -p ordinal -p ordinal-bench --bin ordinal --bin wan-link
bin=$PWD/target/release/ordinal

site=ordwan$$s
dr=ordwan$$d
work=$(mktemp -d /dev/shm/ordinal-wan.XXXXXX)
link_pid= pids=()
stop_daemons() {
  local pid
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  pids=()
}
stop_link() {
  [ -n "$link_pid" ] || return 0
  kill "$link_pid" 2>/dev/null || true
  wait "$link_pid" 2>/dev/null || true
  link_pid=
}
cleanup() {
  stop_daemons
  stop_link
  ip netns del "$site" 2>/dev/null || true
  ip netns del "$dr" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
ip netns add "$site"
ip netns add "$dr"
ip -n "$site" link set lo up
ip -n "$dr" link set lo up
# `ip netns exec` replaces itself with the command, so `$!` of one started in the background is
# the daemon itself, which stop_daemons can then end.
in_site=(ip netns exec "$site")

# Waits up to 30 s for a TCP port to listen in the site namespace.
wait_listening() {
  local n=0
  until "${in_site[@]}" bash -c "exec 3<>/dev/tcp/$1/$2" 2>/dev/null; do
    n=$((n + 1)); ((n <= 300)) || return 1; sleep 0.1
  done
}

declare -A all_p50 all_rtt
run_link() {
  local delay_ms=$1 mode phase watch rc
  local -A p50 rtt burst_lag burst_line
  "$PWD/target/release/wan-link" --near-netns "$site" --far-netns "$dr" --device wan0 \
    --delay-ms "$delay_ms" --rate-mbit "$rate_mbit" $( ((fifo)) && echo --fifo) >"$work/link.log" 2>&1 &
  link_pid=$!
  local n=0
  until grep -q '^wan-link: ready' "$work/link.log"; do
    kill -0 "$link_pid" 2>/dev/null || die "wan-link failed: $(cat "$work/link.log")"
    n=$((n + 1)); ((n <= 100)) || die "wan-link did not start"; sleep 0.1
  done
  ip -n "$site" addr add 10.77.0.1/24 dev wan0
  ip -n "$site" link set wan0 up
  ip -n "$dr" addr add 10.77.0.2/24 dev wan0
  ip -n "$dr" link set wan0 up

  for mode in order-sync sync; do
    # Fresh state per link and mode: a DR keeps its log across restarts, and a new primary must
    # not meet the history of the last one.
    local dir=$work/$delay_ms/$mode
    mkdir -p "$dir"
    head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$dir/psk"
    local common=(--psk-file "$dir/psk" --ring-mib 64 --table-slots 4096 --max-write-kib 1024 --transport tcp)
    truncate -s 256M "$dir/primary.vol" "$dir/dr.vol"
    "${in_site[@]}" "$bin" aux "${common[@]}" --state-dir "$dir/aux" --listen 10.77.0.1:7430 >"$dir/aux.log" 2>&1 &
    pids+=($!)
    ip netns exec "$dr" "$bin" dr "${common[@]}" --state-dir "$dir/dr" --listen 10.77.0.2:7420 \
      --volume "$dir/dr.vol" --aux 10.77.0.1:7430 --no-auto-failover >"$dir/dr.log" 2>&1 &
    pids+=($!)
    "${in_site[@]}" "$bin" primary "${common[@]}" --mode "$mode" --volume "$dir/primary.vol" \
      --dr 10.77.0.2:7420 --aux 10.77.0.1:7430 --listen 10.77.0.1:7410 \
      --nbd-listen 127.0.0.1:10809 >"$dir/primary.log" 2>&1 &
    pids+=($!)
    wait_listening 127.0.0.1 10809 || { tail -n 20 "$dir/primary.log" >&2; die "$mode: the primary never served NBD"; }
    # A subshell, so that a failed step ends the run here (exit) with its status.
    (
      echo '== link'
      "${in_site[@]}" ping -q -c 10 -i 0.2 10.77.0.2 | tail -n 1
      # Unmeasured: connects the DR and warms both sides up.
      "${in_site[@]}" "$bin" bench --nbd 127.0.0.1:10809 --sizes 4096 --queue-depths 1 --writes 20 >/dev/null || exit
      for phase in latency burst; do
        echo "== $mode $phase"
        "${in_site[@]}" "$bin" status --watch --interval-ms 200 --node 10.77.0.1:7410 --psk-file "$dir/psk" >"$dir/lag.txt" 2>&1 &
        watch=$!
        if [ "$phase" = latency ]; then
          "${in_site[@]}" "$bin" bench --nbd 127.0.0.1:10809 --sizes "$sizes" --queue-depths 1 --writes "$writes" && rc=0 || rc=$?
        else
          "${in_site[@]}" "$bin" bench --nbd 127.0.0.1:10809 --sizes 1048576 --queue-depths "$burst_depth" --writes "$burst_writes" && rc=0 || rc=$?
        fi
        # The lag drains after the last acknowledgement too: keep sampling until it is gone,
        # so that the burst starts from an empty ring and the series shows the drain.
        n=0
        while ((rc == 0)) && ! "${in_site[@]}" "$bin" status --json --node 10.77.0.1:7410 --psk-file "$dir/psk" | grep -q '"lag_ops":0,'; do
          n=$((n + 1)); ((n <= 600)) || break; sleep 0.2
        done
        kill "$watch"; wait "$watch" 2>/dev/null || true
        ((rc == 0)) || exit "$rc"
        awk -v phase="$phase" -f tools/wan-lag.awk "$dir/lag.txt"
      done
      echo '== primary status'
      "${in_site[@]}" "$bin" status --json --node 10.77.0.1:7410 --psk-file "$dir/psk"
    ) >"$dir/run.log" 2>&1 && rc=0 || rc=$?
    stop_daemons
    if ((rc != 0)); then
      tail -n 30 "$dir/run.log" | sed 's/^/    | /' >&2
      tail -n 10 "$dir/primary.log" | sed 's/^/    primary | /' >&2
      die "$mode run failed (exit $rc)"
    fi
    # iputils ping: "rtt min/avg/max/mdev = 10.2/10.3/10.6/0.1 ms"
    rtt[$mode]=$(sed -n 's|^rtt min/avg/max/mdev = [0-9.]*/\([0-9.]*\)/.*|\1|p' "$dir/run.log" | tail -n 1)
    [ -n "${rtt[$mode]}" ] || die "$mode: no round trip measured over the link"
    wan_read_mode "$mode" <"$dir/run.log"
    grep -E '^(== |nbd |rtt |rpo: |\{)' "$dir/run.log" | sed "s/^/$mode: /"
  done
  stop_link
  sed -n 's/^wan-link: \(.*->.*\)/link: \1/p' "$work/link.log"
  wan_link_table "$delay_ms"
}

wan_run_links
