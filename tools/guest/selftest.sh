#!/usr/bin/env bash
# Proves the guest harness end to end and prints what it measured:
#   a  one guest: rxe0 is PORT_ACTIVE; ib_send_lat and ib_write_bw, server and client in the guest
#   b  exit codes: a command's status comes back (3), arguments keep their quoting, a command
#      that outlives --timeout gives 124
#   c  three guests on the switch: aux reaches both others, dr runs ib_send_lat and ib_write_bw
#      against primary
#   d  a crash: primary's qemu is killed with SIGKILL mid-transfer; the harness still ends within
#      its deadline and reports every guest (dr's perftest fails or is timed out, never hangs)
#
#   tools/guest/selftest.sh [-v|--verbose] [STEP...]      (steps: a b c d; default all)
#
# Each step's full output is kept in a work directory (printed at the end). Exit status 0 if
# every step passed. Runs one qemu at a time, except steps c (three) and d (two).
set -euo pipefail
prog=selftest.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

verbose=0
steps=()
for arg in "$@"; do
  case "$arg" in
    -v|--verbose) verbose=1 ;;
    a|b|c|d) steps+=("$arg") ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument $arg (steps are a b c d)" ;;
  esac
done
((${#steps[@]})) || steps=(a b c d)

work=$(mktemp -d "${TMPDIR:-/tmp}/ordinal-selftest.XXXXXX")
t_all=$(now_us)
failures=()
pass() { printf '  PASS  %s\n' "$*"; }
fail() { printf '  FAIL  %s\n' "$*"; failures+=("$*"); }
show_tail() { tr -d '\r' <"$1" | tail -n "${2:-15}" | sed 's/^/        | /'; }

# Run a harness command with its output in a log (and on the terminal with --verbose).
# Sets $rc and $took (seconds).
logged() {
  local log=$1 t
  shift
  t=$(now_us)
  if ((verbose)); then
    "$@" 2>&1 | tee "$log" && rc=0 || rc=${PIPESTATUS[0]}
  else
    "$@" >"$log" 2>&1 && rc=0 || rc=$?
  fi
  took=$(secs "$t" "$(now_us)")
}

# perftest's result rows: latency "#bytes #iterations t_min t_max t_typical t_avg ...";
# bandwidth "#bytes #iterations BW_peak BW_average MsgRate" (MB/s).
lat_of() { tr -d '\r' <"$1" | awk '$1 == 2 && NF >= 6 && $3 ~ /^[0-9.]+$/ {printf "typical %s us, avg %s us, min %s us", $5, $6, $3; exit}'; }
bw_of() { tr -d '\r' <"$1" | awk '$1 == 65536 && NF >= 5 && $4 ~ /^[0-9.]+$/ {printf "%s MB/s average (peak %s)", $4, $3; exit}'; }


step_a() {
  echo "a) one guest: rxe0 state, ib_send_lat and ib_write_bw in the guest"
  logged "$work/a.log" "$guest_tools/run.sh" --share "$work" --timeout 300 -- "$guest_lib
    ibv_devinfo -d rxe0 | grep -q PORT_ACTIVE || { echo 'rxe0 is not PORT_ACTIVE'; exit 10; }
    echo 'rxe0 PORT_ACTIVE'
    serve_and_run ib_send_lat -n 2000 || exit 11
    serve_and_run ib_write_bw -n 2000 || exit 12"
  local boot
  boot=$(sed -n 's/.*boot to command \([0-9.]*\) s.*/\1/p' "$work/a.log")
  if ((rc == 0)) && grep -q 'rxe0 PORT_ACTIVE' "$work/a.log"; then
    pass "rxe0 PORT_ACTIVE; whole run ${took} s, boot to command ${boot:-?} s"
    pass "in-guest ib_send_lat (2 bytes): $(lat_of "$work/a.log")"
    pass "in-guest ib_write_bw (64 KiB): $(bw_of "$work/a.log")"
  else
    fail "a) single guest (exit $rc)"; show_tail "$work/a.log"
  fi
}

step_b() {
  echo "b) exit codes"
  logged "$work/b1.log" "$guest_tools/run.sh" --share "$work" --timeout 120 -- 'echo about to exit 3; exit 3'
  if ((rc == 3)); then pass "'exit 3' gives 3 (${took} s)"; else fail "'exit 3' gave $rc"; show_tail "$work/b1.log"; fi

  logged "$work/b2.log" "$guest_tools/run.sh" --share "$work" --timeout 120 -- \
    sh -c 'test "$1" = "two words" && test "$2" = "it'\''s"; exit $((4 + $?))' sh "two words" "it's"
  if ((rc == 4)); then pass "several arguments keep their quoting (exit 4, ${took} s)"; else fail "argument quoting: exit $rc, wanted 4"; show_tail "$work/b2.log"; fi

  logged "$work/b3.log" "$guest_tools/run.sh" --share "$work" --timeout 30 -- 'sleep 600'
  if ((rc == 124)) && grep -q 'timed out after 30 s' "$work/b3.log"; then
    pass "a command outliving --timeout 30 gives 124 after ${took} s"
  else
    fail "timeout: exit $rc after ${took} s, wanted 124"; show_tail "$work/b3.log"
  fi
}

step_c() {
  echo "c) three guests on the switch"
  logged "$work/c.log" "$guest_tools/cluster.sh" --share "$work" --run-dir "$work/c" --timeout 300 \
    --guest "primary=$guest_lib pt ib_send_lat -n 2000 && pt ib_write_bw -n 1000" \
    --guest "dr=$guest_lib client ib_send_lat primary -n 2000 && client ib_write_bw primary -n 1000" \
    --guest "aux=for peer in primary dr; do
               n=0; until ping -c 1 -W 1 \$peer >/dev/null; do n=\$((n + 1)); [ \$n -lt 60 ] || exit 1; done
               echo \"aux reached \$peer\"
             done"
  if ((rc == 0)) && grep -q 'aux reached dr' "$work/c/aux.log"; then
    pass "primary, dr and aux all exit 0; aux reached both; ${took} s in all"
    pass "guest-to-guest ib_send_lat (2 bytes): $(lat_of "$work/c/dr.log")"
    pass "guest-to-guest ib_write_bw (64 KiB): $(bw_of "$work/c/dr.log")"
    pass "switch: $(grep -h 'rx ' "$work/c/switch.log" | sed 's/switch: //' | tr '\n' ';' | sed 's/;$//')"
  else
    fail "c) three guests (exit $rc)"; show_tail "$work/c.log" 25
  fi
}

step_d() {
  echo "d) kill -9 of primary's qemu while dr writes to it"
  # rdma_cm (-R) with --retry_count=3: the client's QP gives up ~9 s after its peer vanished.
  # (With the default retry count of 7, rxe retries forever and only the timeout ends dr.)
  local timeout=90
  logged "$work/d.log" "$guest_tools/cluster.sh" --share "$work" --run-dir "$work/d" --timeout $timeout \
    --kill primary@12 \
    --guest "primary=ib_write_bw -d rxe0 -x \$ORDINAL_GUEST_GID_INDEX -F -R --retry_count=3 -D 60" \
    --guest "dr=$guest_lib client ib_write_bw primary -R --retry_count=3 -D 60"
  local primary dr
  primary=$(awk '$1 == "primary" {print $2}' "$work/d/summary" 2>/dev/null)
  dr=$(awk '$1 == "dr" {$1 = ""; print}' "$work/d/summary" 2>/dev/null)
  if [[ $primary == 137 && -n $dr ]] && [[ ${took%.*} -le $((timeout + 15)) ]]; then
    local t_kill t_dr
    t_kill=$(sed -n 's/^primary .*ended \([0-9.]*\) s into the run.*/\1/p' "$work/d/summary")
    t_dr=$(sed -n 's/^dr .*ended \([0-9.]*\) s into the run.*/\1/p' "$work/d/summary")
    pass "primary killed as asked; dr:${dr}"
    pass "dr ended $(awk -v a="$t_kill" -v b="$t_dr" 'BEGIN {printf "%.1f", b - a}') s after the kill; harness done in ${took} s (deadline ${timeout} s)"
    local err
    err=$(tr -d '\r' <"$work/d/dr.log" | grep -m 1 -E 'Completion with error|Failed status' || true)
    [[ -n $err ]] && pass "dr saw: $err"
  else
    fail "d) peer kill: primary '$primary', dr '$dr', harness ${took} s"; show_tail "$work/d.log" 25
  fi
}

"$guest_tools/setup.sh"
for step in "${steps[@]}"; do "step_$step"; done

echo "selftest: ${#steps[@]} steps in $(secs "$t_all" "$(now_us)") s; logs in $work"
if ((${#failures[@]})); then
  echo "selftest: FAILED: ${failures[*]}"
  exit 1
fi
echo "selftest: all passed"
