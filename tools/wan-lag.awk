# The recovery point side of a WAN run: reads `ordinal status --watch --interval-ms 200` of the
# primary (columns: acked/s, last seq, lag ops, lag MiB, ...; the first sample at 0 s, then
# one every 200 ms) and prints a sample a second, then the largest lag seen, which is what a
# failover at that moment would not recover (every such write is then in the loss report, none
# lost silently).
# Run as: awk -v phase=NAME -f tools/wan-lag.awk LAG_FILE (busybox awk in the guests too).
$3 ~ /^[0-9]+$/ {
  t = n * 0.2
  if (n == 0 || $3 > ops) { ops = $3; at = t }
  if ($4 > mib) mib = $4
  if (n % 5 == 0) printf "rpo: %s: at %5.1f s lag %6d ops %8.1f MiB\n", phase, t, $3, $4
  n++
}
END {
  printf "rpo: %s: largest lag seen %d ops (at %.1f s), %.1f MiB: what a failover at that moment would lose\n", phase, ops, at, mib
}
