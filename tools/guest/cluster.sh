#!/usr/bin/env bash
# Boots several soft-RoCE guests on one Ethernet segment, runs a command in each and reports how
# each one ended. For tests of a primary, a DR and an aux on separate (virtual) machines.
#
#   tools/guest/cluster.sh [options] --guest NAME=COMMAND --guest NAME=COMMAND [...]
#
# Guests are numbered in the order given: the i-th (from 1) is 10.77.0.i/24 with MAC
# 52:54:00:77:00:0i, and every guest's /etc/hosts maps all NAMEs to their addresses. Each
# COMMAND is a shell command line run in /host (DIR, shared read-write by all guests) with
# ORDINAL_GUEST_NAME, ORDINAL_GUEST_IP and ORDINAL_GUEST_GID_INDEX set. Two guests are wired
# to each other; three or more meet in tools/guest/switch.py, a learning L2 switch (both over
# unix datagram sockets in the run directory).
#
# Options:
#   --guest NAME=COMMAND  a guest (1 to 8; NAME: lower-case letters, digits, '-', '_')
#   --smp N               virtual CPUs per guest (default 1: the host has few cores)
#   --mem SIZE            RAM per guest (default 1G)
#   --timeout S           kill every guest still running after S seconds (default 600)
#   --boot-timeout S      a guest whose command has not started after S s is killed (default 120)
#   --share DIR           directory shared at /host (default: the repository root)
#   --run-dir DIR         where pid files, consoles and verdicts go (default: a new /tmp directory)
#   --kill NAME@S         kill -9 NAME's qemu S seconds after NAME's command started (a crash)
#   --switch              use the switch for two guests as well (it costs latency)
#   -q, --quiet           do not stream the consoles (they are in RUN_DIR/NAME.log anyway)
#
# While it runs, RUN_DIR/NAME.pid holds each guest's qemu pid: `kill -9 $(cat RUN_DIR/dr.pid)`
# crashes that machine and the others carry on. RUN_DIR/NAME/started appears when NAME's
# command starts. When all are done, RUN_DIR/NAME.exit holds each verdict (exit code, then a
# line of explanation) and RUN_DIR/summary one line per guest: NAME CODE EXPLANATION (TIMES).
# The run directory is kept; its path is printed first.
#
# Exit status: 0 if every command exited 0 (guests killed by --kill do not count); 124 if any
# guest timed out; 1 otherwise (see RUN_DIR/summary); 2 for usage errors.
set -euo pipefail
prog=cluster.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage_error() { usage >&2; say "$*"; exit 2; }
g_smp=1
kills=()
while (($#)); do
  case "$1" in
    --guest)
      spec=${2:?--guest needs NAME=COMMAND}
      name=${spec%%=*}
      [[ $spec == *=* && $name =~ ^[a-z][a-z0-9_-]{0,15}$ ]] ||
        usage_error "--guest wants NAME=COMMAND with a short lower-case NAME, not: $spec"
      [[ -z ${g_cmd[$name]+x} ]] || usage_error "guest $name given twice"
      g_names+=("$name")
      g_cmd[$name]=${spec#*=}
      shift 2 ;;
    --smp) g_smp=${2:?--smp needs a value}; shift 2 ;;
    --mem) g_mem=${2:?--mem needs a value}; shift 2 ;;
    --timeout) g_timeout=${2:?--timeout needs a value}; shift 2 ;;
    --boot-timeout) g_boot_timeout=${2:?--boot-timeout needs a value}; shift 2 ;;
    --share) g_share=${2:?--share needs a value}; shift 2 ;;
    --run-dir) run_dir=${2:?--run-dir needs a value}; shift 2 ;;
    --kill) kills+=("${2:?--kill needs NAME@SECONDS}"); shift 2 ;;
    --switch) g_switch=on; shift ;;
    -q|--quiet) g_stream=0; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage_error "unknown argument $1" ;;
  esac
done
((${#g_names[@]} >= 1 && ${#g_names[@]} <= 8)) || usage_error "give 1 to 8 guests with --guest NAME=COMMAND"
[[ $g_smp =~ ^[1-9][0-9]*$ ]] || usage_error "--smp must be a positive number, not $g_smp"
[[ $g_timeout =~ ^[1-9][0-9]*$ ]] || usage_error "--timeout must be a positive number of seconds, not $g_timeout"
[[ $g_boot_timeout =~ ^[1-9][0-9]*$ ]] || usage_error "--boot-timeout must be a positive number of seconds, not $g_boot_timeout"
for spec in "${kills[@]}"; do
  name=${spec%@*} after=${spec##*@}
  [[ $spec == *@* && -n ${g_cmd[$name]+x} && $after =~ ^[0-9]+$ ]] ||
    usage_error "--kill wants NAME@SECONDS (whole seconds) for a guest given with --guest, not: $spec"
  g_kill_after[$name]=$after
done
g_share=$(cd "$g_share" 2>/dev/null && pwd) || usage_error "--share: no such directory"
if ((${#g_names[@]} > 2)) || [[ $g_switch == on ]]; then
  command -v python3 >/dev/null || die "python3 is needed for the switch; run tools/guest/setup.sh"
fi

guest_ensure_image
if [[ -n $run_dir ]]; then
  mkdir -p "$run_dir" || die "cannot create --run-dir $run_dir"
  run_dir=$(cd "$run_dir" && pwd)
else
  run_dir=$(mktemp -d "${TMPDIR:-/tmp}/ordinal-cluster.XXXXXX")
fi
rm -f "$run_dir/summary"
say "run dir $run_dir: ${g_names[*]} (pids in NAME.pid, consoles in NAME.log)"
finished=""
trap 'guests_cleanup; [[ -n $finished ]] || say "stopped early; consoles so far in $run_dir"' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

guests_boot
guests_watch
finished=1

status=0
for name in "${g_names[@]}"; do
  line="$name ${g_code[$name]} ${g_note[$name]} ("
  [[ -n ${g_t_cmd[$name]:-} ]] && line+="command started $(secs "${g_t_boot[$name]}" "${g_t_cmd[$name]}") s after boot; "
  line+="ended $(secs "$g_t0" "${g_t_end[$name]}") s into the run)"
  echo "$line" >>"$run_dir/summary"
  say "$line"
  if ((g_code[$name] == GUEST_TIMEOUT)); then
    status=$GUEST_TIMEOUT
  elif ((g_code[$name] != 0)) && [[ -z ${g_expected[$name]:-} ]] && ((status == 0)); then
    status=1
  fi
done
guests_cleanup
[[ -n $g_switch_pid ]] && { wait "$g_switch_pid" 2>/dev/null || true; }
say "all guests done in $(secs "$g_t0" "$(now_us)") s; status $status; details in $run_dir"
exit "$status"
