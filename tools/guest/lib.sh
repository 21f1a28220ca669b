# shellcheck shell=bash
# shellcheck disable=SC2034  # the g_* settings and results are used by the scripts that source this
# Shared by the scripts in tools/guest/ (sourced, not run): where the guest image lives, messages,
# and the engine that boots guests, watches them against their deadlines and reports how each
# one ended. run.sh drives one guest with it, cluster.sh several.
#
# Layout of a run directory ($run_dir), one set of files per guest NAME:
#   NAME/        the guest's control share (9p tag ordinal-ctl, mounted at /run/ordinal):
#                  cmd       shell script the guest runs            (host -> guest)
#                  hosts     /etc/hosts for the guest                (host -> guest)
#                  started   created when the command starts         (guest -> host)
#                  status    the command's exit code                 (guest -> host)
#   NAME.log     the guest's serial console (kernel, /init and the command's stdout/stderr)
#   NAME.pid     the pid of the guest's qemu process (kill -9 it to crash the machine)
#   NAME.qemu    qemu's own stdout/stderr
#   NAME.exit    the harness's verdict: the exit code, then a one-line explanation
#   net/         the unix datagram sockets of the L2 switch (multi-guest runs only)

guest_tools=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
guest_repo=$(cd "$guest_tools/../.." && pwd)
guest_cache=${ORDINAL_GUEST_CACHE:-$HOME/.cache/ordinal-guest}
guest_image=$guest_cache/image

# Exit statuses the harness gives itself (the numbers coreutils' timeout uses): the deadline
# passed; the guest never got as far as the command (or stopped without reporting a status).
readonly GUEST_TIMEOUT=124 GUEST_HARNESS_FAILURE=125

prog=${prog:-$(basename "$0")}
# A script's usage is its header comment (from line 2 to the first line that is not a comment).
usage() { awk 'NR == 1 {next} /^#/ {sub(/^# ?/, ""); print; next} {exit}' "$0"; }
say() { printf '%s: %s\n' "$prog" "$*" >&2; }
die() { say "$*"; exit 1; }

# Microseconds since the epoch, without forking (bash 5's EPOCHREALTIME).
now_us() { local t=$EPOCHREALTIME; echo $(( ${t%.*} * 1000000 + 10#${t#*.} )); }
# Seconds with one decimal between two now_us values.
secs() { local d=$(( ($2 - $1) / 100000 )); printf '%d.%d' $((d / 10)) $((d % 10)); }

# Quote words for a POSIX shell (the guest runs busybox sh), one word per argument.
shell_quote() {
  local out=() w
  for w in "$@"; do out+=("'${w//\'/\'\\\'\'}'"); done
  printf '%s' "${out[*]}"
}

# True while the process runs. A child that exited but is not yet reaped is a zombie and
# still answers kill -0, so read its state from /proc instead (builtin read: no fork).
alive() {
  local stat
  read -r stat 2>/dev/null <"/proc/$1/stat" || return 1
  stat=${stat##*) }
  [[ ${stat:0:1} != Z ]]
}

# The guest's clock: under TCG the kernel does not trust the TSC and reads the emulated HPET, a
# device access that QEMU serves under its global lock; clock_gettime then cannot stay in the
# vDSO. Profiled in a guest (perf, ordinal bench, verbs, async, 64 KiB, QD 16): read_hpet took
# 6.5% of both CPUs in the DR alone, its pollers reading the time on every pass. A server's
# clock is the TSC, and TCG's TSC is the host's, so the guests use it ("tsc=reliable" skips the
# watchdog that would measure it against the HPET). Three runs each: 4 KiB order-sync writes at
# QD 1 went from 727-834 us to 631-701 us p50; perftest's latencies did not move (it reads
# the TSC itself).

# ---- settings the runners may change before guests_boot ---------------------------------------
g_smp=2 g_mem=1G g_timeout=600 g_boot_timeout=120 g_share=$guest_repo g_stream=1
g_append=${ORDINAL_GUEST_APPEND:-}   # extra kernel command line words, for debugging
g_switch=auto                   # auto: a direct link for two guests, the switch for three or more
run_dir=""
# Per guest, by name. g_code, g_note (the verdict) and g_expected (killed on request) are read by
# run.sh and cluster.sh.
g_names=()                      # in order; guest i gets 10.77.0.(i+1) and MAC 52:54:00:77:00:(i+1)
declare -A g_cmd=() g_kill_after=() g_pid=() g_state=() g_t_boot=() g_t_cmd=() g_code=()
declare -A g_note=() g_expected=() g_tail=() g_wrapper=() g_t_end=()
g_switch_pid=""
g_t0=""

# Check that the image exists; build it (setup.sh is idempotent and quick when up to date).
guest_ensure_image() {
  "$guest_tools/setup.sh" >&2 || die "setup.sh failed; the guest image is not ready"
  [[ -f $guest_image/vmlinux && -f $guest_image/initrd.img ]] || die "no guest image in $guest_image"
}

# Start the switch (multi-guest runs) and every guest's qemu. Sets g_t0.
guests_boot() {
  local n=${#g_names[@]} i name net hosts
  [[ -d $g_share ]] || die "share directory $g_share does not exist"
  command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 not found; run tools/guest/setup.sh"
  g_t0=$(now_us)

  hosts="127.0.0.1 localhost"$'\n'
  for i in "${!g_names[@]}"; do hosts+="10.77.0.$((i + 1)) ${g_names[$i]}"$'\n'; done

  # The guests' Ethernet: unix datagram sockets in the run directory (nothing listens on the
  # network; no port numbers to allocate, so concurrent runs cannot collide). qemu's datagram
  # netdev is point to point: two guests are wired to each other directly; three or more each
  # get a port of switch.py, a small learning L2 switch. The switch is one more process that
  # needs the CPU for every frame (measured on 2 cores, two guests: ib_send_lat typical ~370 ->
  # ~480 us, ib_write_bw ~10.5 -> ~9.5 MB/s), hence the direct link when it is not needed.
  local use_switch=0
  if ((n > 2)) || { ((n == 2)) && [[ $g_switch == on ]]; }; then use_switch=1; fi
  if ((n > 1)); then
    rm -rf "$run_dir/net"
    mkdir -p "$run_dir/net"
    local probe="$run_dir/net/${g_names[0]}.switch"
    ((${#probe} < 100)) || die "run directory path too long for unix sockets: $run_dir"
  fi
  if ((use_switch)); then
    setpriv --pdeathsig TERM -- python3 "$guest_tools/switch.py" --dir "$run_dir/net" "${g_names[@]}" \
      >"$run_dir/switch.log" 2>&1 &
    g_switch_pid=$!
    echo "$g_switch_pid" >"$run_dir/switch.pid"
    local deadline=$(( $(now_us) + 10000000 ))
    until [[ -e $run_dir/net/ready ]]; do
      alive "$g_switch_pid" || die "the switch failed to start: $(tail -n 3 "$run_dir/switch.log")"
      (( $(now_us) < deadline )) || die "the switch did not come up within 10 s"
      sleep 0.05
    done
  fi

  for i in "${!g_names[@]}"; do
    name=${g_names[$i]}
    mkdir -p "$run_dir/$name"
    rm -f "$run_dir/$name/started" "$run_dir/$name/status" "$run_dir/$name.exit"
    printf '%s\n' "${g_cmd[$name]}" >"$run_dir/$name/cmd"
    printf '%s' "$hosts" >"$run_dir/$name/hosts"
    if ((use_switch)); then
      net=(-netdev "dgram,id=net0,local.type=unix,local.path=$run_dir/net/$name.nic,remote.type=unix,remote.path=$run_dir/net/$name.switch")
    elif ((n == 2)); then
      net=(-netdev "dgram,id=net0,local.type=unix,local.path=$run_dir/net/$name.nic,remote.type=unix,remote.path=$run_dir/net/${g_names[$((1 - i))]}.nic")
    else
      # A lone guest still needs an Ethernet device for rxe0; rxe loops traffic to its own
      # addresses back internally, so the NIC is attached to an otherwise empty hub.
      net=(-netdev "hubport,id=net0,hubid=0")
    fi
    : >"$run_dir/$name.log"
    # -nodefaults: no VGA, floppy or default NIC. The uncompressed vmlinux boots through its PVH
    # entry point (no firmware real mode, no in-guest decompression). KVM cannot run Debian's
    # kernel on these hosts, so it is always TCG. romfile= skips the NIC's iPXE option ROM.
    # qemu runs under a small wrapper shell that reaps it and exits with its status. The harness
    # waits for the wrapper (so bash prints no "Killed" notice when qemu is killed), and both
    # get SIGKILL when their parent dies (setpriv --pdeathsig): if the harness itself is
    # killed, its guests do not live on.
    rm -f "$run_dir/$name.pid"
    setpriv --pdeathsig KILL -- bash -c '
      pidfile=$1
      shift
      setpriv --pdeathsig KILL -- "$@" &
      echo "$!" >"$pidfile.tmp" && mv "$pidfile.tmp" "$pidfile"
      wait "$!"' wrapper "$run_dir/$name.pid" \
      qemu-system-x86_64 -name "ordinal-$name" -nodefaults -no-user-config -display none -no-reboot \
        -accel tcg,thread=multi -cpu max -smp "$g_smp" -m "$g_mem" \
        -kernel "$guest_image/vmlinux" -initrd "$guest_image/initrd.img" \
        -append "console=ttyS0 quiet panic=-1 tsc=reliable clocksource=tsc ordinal.name=$name ordinal.ip=10.77.0.$((i + 1))/24 $g_append" \
        -chardev "file,id=console,path=$run_dir/$name.log,append=on" -serial chardev:console \
        "${net[@]}" -device "virtio-net-pci,netdev=net0,mac=52:54:00:77:00:$(printf '%02x' $((i + 1))),romfile=" \
        -virtfs "local,path=$run_dir/$name,mount_tag=ordinal-ctl,security_model=none,multidevs=remap" \
        -virtfs "local,path=$g_share,mount_tag=ordinal-host,security_model=none,multidevs=remap" \
      </dev/null >"$run_dir/$name.qemu" 2>&1 &
    g_wrapper[$name]=$!
    local deadline=$(( $(now_us) + 10000000 ))
    until [[ -s $run_dir/$name.pid ]]; do
      (( $(now_us) < deadline )) || die "qemu for $name did not start"
      sleep 0.01
    done
    read -r "g_pid[$name]" <"$run_dir/$name.pid"
    g_state[$name]=booting
    g_t_boot[$name]=$(now_us)
    if ((g_stream)); then
      # Stream the console as it is written; with several guests, each line names its guest.
      local prefix=""
      ((n > 1)) && prefix="[$name] "
      tail -n +1 -F -s 0.2 --pid="${g_pid[$name]}" "$run_dir/$name.log" 2>/dev/null |
        sed -u "s/\r\$//; s/^/${prefix//\//\\/}/" &
      g_tail[$name]=$!
    fi
  done
}

# Record how a guest ended: exit code and one line of explanation.
guest_verdict() {
  local name=$1 code=$2 note=$3
  g_state[$name]="done" g_code[$name]=$code g_note[$name]=$note g_t_end[$name]=$(now_us)
  printf '%s\n%s\n' "$code" "$note" >"$run_dir/$name.exit"
}

# The exit code the guest reported, from the control share or else the console marker.
guest_reported_code() {
  local name=$1 code=""
  [[ -f $run_dir/$name/status ]] && read -r code <"$run_dir/$name/status"
  if [[ ! $code =~ ^[0-9]+$ ]]; then
    code=$(sed -n 's/^ordinal-guest: exit \([0-9][0-9]*\)\r\{0,1\}$/\1/p' "$run_dir/$name.log" | tail -n 1)
  fi
  [[ $code =~ ^[0-9]+$ ]] && echo "$code"
}

guest_kill() { kill -9 "${g_pid[$1]}" 2>/dev/null || true; wait "${g_wrapper[$1]}" 2>/dev/null || true; }

# Look at one guest once: did its command start, did qemu stop, is a deadline or a kill due?
guest_poll() {
  local name=$1 pid=${g_pid[$1]} now code rc reason
  now=$(now_us)
  if [[ ${g_state[$name]} == booting && -e $run_dir/$name/started ]]; then
    g_state[$name]=running g_t_cmd[$name]=$now
    say "$name: command started $(secs "${g_t_boot[$name]}" "$now") s after qemu started"
  fi
  if ! alive "$pid"; then
    wait "${g_wrapper[$name]}" 2>/dev/null && rc=0 || rc=$?
    if code=$(guest_reported_code "$name"); then
      guest_verdict "$name" "$code" "exit $code"
    elif ((rc > 128)); then
      guest_verdict "$name" "$rc" "qemu was killed by signal $((rc - 128)) ($(
        [[ ${g_state[$name]} == running ]] && echo "while the command ran" || echo "before the command started"))"
    elif [[ ${g_state[$name]} == booting ]]; then
      reason=$(sed -n 's/^ordinal-guest: setup failed: \(.*\)$/\1/p' "$run_dir/$name.log" | tr -d '\r' | tail -n 1)
      [[ -n $reason ]] || reason="qemu exited with status $rc: $(tail -n 2 "$run_dir/$name.qemu" | tr '\n' ' ')"
      guest_verdict "$name" "$GUEST_HARNESS_FAILURE" "the guest never reached the command: $reason"
    else
      guest_verdict "$name" "$GUEST_HARNESS_FAILURE" "the guest stopped while the command ran, without reporting its exit status (crash? see $run_dir/$name.log)"
    fi
    return
  fi
  if (( now - g_t0 >= g_timeout * 1000000 )); then
    guest_kill "$name"
    guest_verdict "$name" "$GUEST_TIMEOUT" "timed out after $g_timeout s ($([[ ${g_state[$name]} == running ]] && echo "the command was still running" || echo "the guest was still booting")); qemu killed"
  elif [[ ${g_state[$name]} == booting ]] && (( now - g_t_boot[$name] >= g_boot_timeout * 1000000 )); then
    guest_kill "$name"
    guest_verdict "$name" "$GUEST_HARNESS_FAILURE" "the guest never reached the command within $g_boot_timeout s; qemu killed"
  elif [[ ${g_state[$name]} == running && -n ${g_kill_after[$name]:-} ]] &&
       (( now - g_t_cmd[$name] >= g_kill_after[$name] * 1000000 )); then
    guest_kill "$name"
    say "$name: qemu killed with SIGKILL ${g_kill_after[$name]} s after its command started, as asked ($(secs "$g_t0" "$now") s into the run)"
    g_expected[$name]=1
    guest_verdict "$name" 137 "killed with SIGKILL by the harness, as asked"
  fi
}

# Poll every guest until each has a verdict. Bounded: every guest has a deadline.
guests_watch() {
  local name pending
  while :; do
    pending=0
    for name in "${g_names[@]}"; do
      [[ ${g_state[$name]} == "done" ]] && continue
      guest_poll "$name"
      [[ ${g_state[$name]} == "done" ]] || pending=1
    done
    ((pending)) || break
    sleep 0.1
  done
  # Let the console streams print their last lines (tail notices its qemu is gone within 0.2 s).
  local deadline=$(( $(now_us) + 2000000 )) pid
  for name in "${!g_tail[@]}"; do
    pid=${g_tail[$name]}
    while alive "$pid" && (( $(now_us) < deadline )); do sleep 0.05; done
  done
}

# Kill whatever this harness started and is still running (on any exit, Ctrl-C included).
guests_cleanup() {
  local name pid
  for name in "${!g_pid[@]}"; do
    pid=${g_pid[$name]}
    alive "$pid" && kill -9 "$pid" 2>/dev/null && { wait "${g_wrapper[$name]}" 2>/dev/null || true; }
  done
  [[ -n $g_switch_pid ]] && alive "$g_switch_pid" && kill "$g_switch_pid" 2>/dev/null
  for name in "${!g_tail[@]}"; do
    pid=${g_tail[$name]}
    alive "$pid" && kill "$pid" 2>/dev/null
  done
  return 0
}

# Shell functions for the guests (busybox sh). GID is the RoCE v2 GID index /init found.
guest_lib='
pt() { "$@" -d rxe0 -x "$ORDINAL_GUEST_GID_INDEX" -F; }
# serve_and_run TEST ARGS: server in the background, client here against our own address.
serve_and_run() {
  b=$1; shift
  $b -d rxe0 -x "$ORDINAL_GUEST_GID_INDEX" -F "$@" >/tmp/server.log 2>&1 &
  server=$!
  n=0
  until netstat -ltn | grep -q ":18515 "; do
    n=$((n + 1)); [ $n -le 100 ] || { echo "server $b never listened"; cat /tmp/server.log; return 1; }
    sleep 0.1
  done
  $b -d rxe0 -x "$ORDINAL_GUEST_GID_INDEX" -F "$@" "$ORDINAL_GUEST_IP"; rc=$?
  wait $server || { echo "server $b failed:"; cat /tmp/server.log; return 1; }
  return $rc
}
# client TEST PEER ARGS: retry while the peer server is not up yet (fails within 3 s), 60 tries.
client() {
  b=$1; peer=$2; shift 2
  for try in $(seq 60); do
    start=$(cut -d. -f1 /proc/uptime)
    $b -d rxe0 -x "$ORDINAL_GUEST_GID_INDEX" -F "$@" "$peer" && return 0
    rc=$?
    [ $(( $(cut -d. -f1 /proc/uptime) - start )) -lt 3 ] || return $rc
    sleep 0.5
  done
  return $rc
}
'
