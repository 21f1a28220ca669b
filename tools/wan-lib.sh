# shellcheck shell=bash
# Shared by tools/wan.sh (this machine, a user-space link between network namespaces) and
# tools/guest/wan.sh (soft-RoCE guests, netem): reading one mode's run and printing the tables.
# The caller keeps, per link, the associative arrays p50[mode,size] (order-sync and sync p50 in
# us), rtt[mode] (ping's average in ms), burst_line[mode] and burst_lag[mode], and across links
# all_p50[delay,mode,size] and all_rtt[delay]; the settings come from wan_parse_args.

# The flags both scripts take, with their defaults: sets delays, rate_mbit and rate (as tc
# writes it), sizes, writes, burst_writes, burst_depth and fifo. Needs the caller's usage and die.
wan_parse_args() {
  delays=5 rate_mbit=100 sizes=4096,65536,262144,1048576 writes=40 burst_writes=32 burst_depth=16 fifo=0
  while (($#)); do
    case "$1" in
      --delay-ms) delays=$2; shift 2 ;;
      --rate-mbit) rate_mbit=$2; shift 2 ;;
      --sizes) sizes=$2; shift 2 ;;
      --writes) writes=$2; shift 2 ;;
      --burst-writes) burst_writes=$2; shift 2 ;;
      --burst-depth) burst_depth=$2; shift 2 ;;
      --fifo) fifo=1; shift ;;
      -h|--help) usage; exit 0 ;;
      *) die "unknown argument $1 (--help lists them)" ;;
    esac
  done
  [[ $rate_mbit =~ ^[0-9]+$ ]] || die "--rate-mbit takes a whole number: $rate_mbit"
  [[ $delays =~ ^[0-9]+(,[0-9]+)*$ ]] || die "--delay-ms takes whole milliseconds, comma-separated: $delays"
  rate="${rate_mbit}mbit"
}

# Keeps one mode's figures from the lines its run printed (on standard input): the p50 of each
# size at queue depth 1, the burst's line and its largest lag. The round trip is the caller's
# (ping's summary differs between iputils and busybox).
wan_read_mode() {
  local mode=$1 log size value
  log=$(cat)
  burst_lag[$mode]=$(printf '%s\n' "$log" | sed -n 's/^rpo: burst: largest lag seen \([0-9]* ops\) (at [0-9.]* s), \([0-9.]* MiB\).*/\1, \2/p' | tail -n 1)
  burst_line[$mode]=$(printf '%s\n' "$log" | sed -n 's/^nbd 1048576 B QD [0-9]*: \(.*\)/\1/p' | tail -n 1)
  while read -r size value; do p50[$mode,$size]=$value; done < <(
    printf '%s\n' "$log" | sed -n 's/^nbd \([0-9]*\) B QD 1: .* p50 \([0-9]*\) us.*/\1 \2/p')
}

wan_queuing() { ((fifo)) && echo 'one FIFO queue' || echo 'order traffic in a priority band'; }

# The table of one link (delay $1 ms each way), and its figures kept for the last table.
wan_link_table() {
  local delay_ms=$1 size os sy size_list mode
  printf '\nlink: delay %s ms each way, rate %s, %s; ping round trip %s ms (order-sync run), %s ms (sync run)\n' \
    "$delay_ms" "$rate" "$(wan_queuing)" "${rtt[order-sync]:-?}" "${rtt[sync]:-?}"
  printf '%10s %16s %12s %12s %20s\n' "payload" "order-sync p50" "sync p50" "sync / o-s" "o-s p50 / RTT"
  IFS=, read -r -a size_list <<<"$sizes"
  for size in "${size_list[@]}"; do
    os=${p50[order-sync,$size]:-} sy=${p50[sync,$size]:-}
    [[ -n $os && -n $sy ]] || die "no figure for $size B"
    awk -v size="$size" -v os="$os" -v sy="$sy" -v rtt="${rtt[order-sync]}" 'BEGIN {
      printf "%10s %13.1f ms %9.1f ms %11.2fx %19.2fx\n", size " B", os / 1000, sy / 1000, sy / os, os / 1000 / rtt }'
    all_p50[$delay_ms,order-sync,$size]=$os
    all_p50[$delay_ms,sync,$size]=$sy
  done
  all_rtt[$delay_ms]=${rtt[order-sync]}
  echo "(target: order-sync p50 for 1 MiB <= 1.2x the link round trip)"
  printf '\nburst of %s writes of 1 MiB, %s in flight:\n' "$burst_writes" "$burst_depth"
  for mode in order-sync sync; do
    printf '%10s: %s; largest lag %s\n' "$mode" "${burst_line[$mode]:-?}" "${burst_lag[$mode]:-?}"
  done
}

# One table of every link run (delays given as arguments), when there was more than one.
wan_all_links_table() {
  local delay_ms size size_list
  (($# > 1)) || return 0
  IFS=, read -r -a size_list <<<"$sizes"
  printf '\nevery link (rate %s, %s):\n' "$rate" "$(wan_queuing)"
  printf '%9s %10s %10s %16s %12s %12s %16s\n' "each way" "RTT" "payload" "order-sync p50" "sync p50" "sync / o-s" "o-s p50 / RTT"
  for delay_ms in "$@"; do
    for size in "${size_list[@]}"; do
      awk -v d="$delay_ms" -v size="$size" -v os="${all_p50[$delay_ms,order-sync,$size]}" \
        -v sy="${all_p50[$delay_ms,sync,$size]}" -v rtt="${all_rtt[$delay_ms]}" 'BEGIN {
        printf "%6s ms %7.1f ms %10s %13.1f ms %9.1f ms %11.2fx %15.2fx\n", d, rtt, size " B", os / 1000, sy / 1000, sy / os, os / 1000 / rtt }'
    done
  done
  echo "(target: order-sync p50 for 1 MiB <= 1.2x the link round trip)"
}

# The caller's run_link once per delay of --delay-ms, then the table of them all.
wan_run_links() {
  local delay_ms delay_list
  IFS=, read -r -a delay_list <<<"$delays"
  for delay_ms in "${delay_list[@]}"; do run_link "$delay_ms"; done
  wan_all_links_table "${delay_list[@]}"
}
