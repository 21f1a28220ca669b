#!/usr/bin/env bash
# Machine crashes over real RDMA: three soft-RoCE guests (aux, dr, primary) linked by the guest
# switch, the daemons on --transport verbs, a workload from the DR's guest (`ordinal drive`,
# through the primary's NBD export), and the primary's whole machine killed (kill -9 of its QEMU)
# mid-flight. The aux notices the lost heartbeat, the DR fails over, and `ordinal drive` checks
# the DR's volume and the loss report (I1, I3-I6) against what the client wrote and was told.
#
#   tools/guest/crash.sh [--runs N] [--seed S]      (default 3 runs from seed 1)
#
# Exit status 0 if every run verified.
set -euo pipefail
prog=crash.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$repo"

runs=3
seed=1
while (($#)); do
  case "$1" in
    --runs) runs=$2; shift 2 ;;
    --seed) seed=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument $1" ;;
  esac
done

cargo build --locked --release -p ordinal
# Shared with the guests (target/ is ignored by git): the group's key and the end marker.
shared=target/guest-crash
failed=0
for ((run = 0; run < runs; run++)); do
  s=$((seed + run))
  rm -rf "$shared" && mkdir -p "$shared"
  head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$shared/psk"
  common="--psk-file $shared/psk --ring-mib 16 --table-slots 1024 --max-write-kib 64 --transport verbs --device rxe0"
  bin=./target/release/ordinal
  # The kill comes 20-26 s after the primary's command starts: connected, and writing for a while.
  kill_after=$((20 + s % 7))
  run_dir=$(mktemp -d "${TMPDIR:-/tmp}/ordinal-crash.XXXXXX")
  started=$(now_us)
  tools/guest/cluster.sh --quiet --mem 1536M --timeout 300 --run-dir "$run_dir" \
    --kill "primary@$kill_after" \
    --guest "aux=$bin aux $common --state-dir /tmp/aux --listen 10.77.0.1:7430 & a=\$!
      while [ ! -e $shared/done ]; do sleep 0.5; done; kill \$a; exit 0" \
    --guest "dr=truncate -s 64M /tmp/dr.vol
      $bin dr $common --state-dir /tmp/dr --listen 10.77.0.2:7420 --volume /tmp/dr.vol --aux 10.77.0.1:7430 >/tmp/dr.log 2>&1 & d=\$!
      $bin drive --nbd 10.77.0.3:10809 --dr 10.77.0.2:7420 --psk-file $shared/psk --dr-volume /tmp/dr.vol --seed $s; rc=\$?
      echo '== the DR daemon said:'; tail -n 8 /tmp/dr.log; kill \$d; touch $shared/done; exit \$rc" \
    --guest "primary=truncate -s 64M /tmp/primary.vol
      exec $bin primary $common --volume /tmp/primary.vol --dr 10.77.0.2:7420 --aux 10.77.0.1:7430 --listen 10.77.0.3:7410 --nbd-listen 10.77.0.3:10809" \
    && rc=0 || rc=$?
  verdict=$(tr -d '\r' <"$run_dir/dr.log" | grep -E '^drive: seed' | tail -n 1 || true)
  if ((rc == 0)) && [[ $verdict == *verified ]]; then
    printf 'crash run %d (seed %d, primary machine killed at +%d s): %s (%s s)\n' \
      "$((run + 1))" "$s" "$kill_after" "$verdict" "$(secs "$started" "$(now_us)")"
    # A passed run's consoles are of no further use; a failed run's stay, named above.
    rm -rf "$run_dir"
  else
    failed=$((failed + 1))
    printf 'crash run %d (seed %d): FAILED (exit %d): %s; consoles in %s\n' "$((run + 1))" "$s" "$rc" "${verdict:-no verdict}" "$run_dir"
    tr -d '\r' <"$run_dir/dr.log" | tail -n 30 | sed 's/^/    | /'
  fi
done
rm -rf "$shared"
printf 'crash: %d run(s), %d failed\n' "$runs" "$failed"
((failed == 0))
