#!/usr/bin/env bash
# Boots one soft-RoCE guest (QEMU, TCG), runs a command in it and exits with the command's status.
#
#   tools/guest/run.sh [options] -- COMMAND...
#
# The guest has rxe0 on eth0 (10.77.0.1/24) and DIR shared read-write at /host, where the command
# starts; by default DIR is the repository root, so host-built binaries are /host/target/...
# One argument is a shell command line (`run.sh -- 'ibv_devinfo | grep state'`); several are a
# program and its arguments, passed as they are. The guest's console (kernel, /init, the
# command's stdout and stderr) is streamed to stdout. The command sees ORDINAL_GUEST_NAME,
# ORDINAL_GUEST_IP and ORDINAL_GUEST_GID_INDEX (the RoCE v2 GID index, perftest's -x).
#
# Options:
#   --smp N            virtual CPUs (default 2)
#   --mem SIZE         guest RAM, as qemu's -m takes it (default 1G)
#   --timeout S        kill the guest after S seconds in all (default 600)
#   --boot-timeout S   give up if the command has not started after S seconds (default 120)
#   --share DIR        directory shared at /host (default: the repository root)
#   --keep             keep the run directory (console log, control share) even on success
#   -q, --quiet        do not stream the console (it is still kept on failure)
#
# Exit status: the command's; 124 if the timeout expired (qemu is killed); 125 if the guest
# never reached the command or stopped without reporting a status; 1 for usage errors.
# The image is built or checked first (tools/guest/setup.sh).
set -euo pipefail
prog=run.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

keep=0
while (($#)); do
  case "$1" in
    --smp) g_smp=${2:?--smp needs a value}; shift 2 ;;
    --mem) g_mem=${2:?--mem needs a value}; shift 2 ;;
    --timeout) g_timeout=${2:?--timeout needs a value}; shift 2 ;;
    --boot-timeout) g_boot_timeout=${2:?--boot-timeout needs a value}; shift 2 ;;
    --share) g_share=${2:?--share needs a value}; shift 2 ;;
    --keep) keep=1; shift ;;
    -q|--quiet) g_stream=0; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) usage >&2; die "unknown option $1" ;;
  esac
done
(($#)) || { usage >&2; die "no command given (put it after --)"; }
[[ $g_smp =~ ^[1-9][0-9]*$ ]] || die "--smp must be a positive number, not $g_smp"
[[ $g_timeout =~ ^[1-9][0-9]*$ ]] || die "--timeout must be a positive number of seconds, not $g_timeout"
[[ $g_boot_timeout =~ ^[1-9][0-9]*$ ]] || die "--boot-timeout must be a positive number of seconds, not $g_boot_timeout"
g_share=$(cd "$g_share" 2>/dev/null && pwd) || die "--share: no such directory"

if (($# == 1)); then command_line=$1; else command_line=$(shell_quote "$@"); fi

guest_ensure_image
run_dir=$(mktemp -d "${TMPDIR:-/tmp}/ordinal-guest.XXXXXX")
g_names=(guest)
g_cmd[guest]=$command_line
finished=""
trap 'guests_cleanup; [[ -n $finished ]] || say "stopped early; console and control files kept in $run_dir"' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

guests_boot
guests_watch
finished=1

code=${g_code[guest]}
summary="${g_note[guest]}"
if [[ -n ${g_t_cmd[guest]:-} ]]; then
  summary+="; boot to command $(secs "${g_t_boot[guest]}" "${g_t_cmd[guest]}") s"
fi
summary+=", total $(secs "$g_t0" "$(now_us)") s"
if [[ ${g_note[guest]} == "exit $code" ]]; then
  say "$summary"
else
  say "FAILED: $summary"
  ((g_stream)) || tail -n 20 "$run_dir/guest.log" | tr -d '\r' >&2
  keep=1
fi
if ((keep)); then say "console and control files kept in $run_dir"; else rm -rf "$run_dir"; fi
exit "$code"
