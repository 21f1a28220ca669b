#!/usr/bin/env bash
# For real Linux hosts whose kernel has soft-RoCE (the rdma_rxe module): gives an Ethernet
# interface an RDMA device, so ordinal runs over RDMA verbs without RDMA hardware. Needs root.
# Idempotent: if the interface already has a soft-RoCE device, it says so and changes nothing.
# (Hosts without rdma_rxe, like the build machines, use tools/guest/run.sh instead.)
#
#   tools/guest/rxe-host.sh [--name NAME] [IFACE]   add NAME (default rxe0) on IFACE
#                                                   (default: the interface of the default route)
#   tools/guest/rxe-host.sh --remove [--name NAME]  delete NAME
#
# Both ends of a RoCE link need one (on each host). RDMA memory registration pins memory: run
# ordinal with a large `ulimit -l` (memlock), e.g. unlimited for root or via limits.conf.
set -euo pipefail
prog=rxe-host.sh
say() { printf '%s: %s\n' "$prog" "$*" >&2; }
die() { say "$*"; exit 1; }
usage() { awk 'NR == 1 {next} /^#/ {sub(/^# ?/, ""); print; next} {exit}' "$0"; }

name=rxe0
iface=""
remove=0
while (($#)); do
  case "$1" in
    --name) name=${2:?--name needs a value}; shift 2 ;;
    --remove) remove=1; shift ;;
    -h|--help) usage; exit 0 ;;
    -*) usage >&2; die "unknown option $1" ;;
    *) [[ -z $iface ]] || die "one interface only"; iface=$1; shift ;;
  esac
done

command -v rdma >/dev/null || die "the rdma command is missing (it is in iproute2)"
((EUID == 0)) || die "needs root (loads a kernel module and adds an RDMA link)"

# "link rxe0/1 state ACTIVE physical_state LINK_UP netdev eth0" -> the netdev of device $1
netdev_of() { rdma link show 2>/dev/null | awk -v dev="$1" '$2 ~ "^" dev "/" {for (i = 1; i < NF; i++) if ($i == "netdev") print $(i + 1)}' | head -n 1; }

if ((remove)); then
  [[ -e /sys/class/infiniband/$name ]] || { say "$name does not exist; nothing to do"; exit 0; }
  rdma link delete "$name" || die "rdma link delete $name failed"
  say "$name deleted"
  exit 0
fi

if [[ -z $iface ]]; then
  iface=$(ip route show default 2>/dev/null | awk '$1 == "default" {for (i = 1; i < NF; i++) if ($i == "dev") {print $(i + 1); exit}}')
  [[ -n $iface ]] || iface=$(ip -6 route show default 2>/dev/null | awk '$1 == "default" {for (i = 1; i < NF; i++) if ($i == "dev") {print $(i + 1); exit}}')
  [[ -n $iface ]] || die "no default route; name the interface: $prog IFACE"
fi
[[ -e /sys/class/net/$iface ]] || die "no network interface $iface"

if [[ ! -d /sys/module/rdma_rxe ]]; then
  modprobe rdma_rxe 2>/dev/null ||
    die "cannot load rdma_rxe: this kernel ($(uname -r)) has no soft-RoCE module (CONFIG_RDMA_RXE; some distributions ship it in a linux-modules-extra package); use tools/guest/run.sh instead"
fi

# Already done? Either the device exists (on this interface or not) or the interface has another rxe.
if [[ -e /sys/class/infiniband/$name ]]; then
  on=$(netdev_of "$name")
  [[ $on == "$iface" ]] || die "$name already exists on ${on:-another interface}, not $iface (remove it with --remove)"
  say "$name already on $iface; nothing to do"
else
  for dev in /sys/class/infiniband/*; do
    [[ -e $dev ]] || continue
    if [[ $(netdev_of "${dev##*/}") == "$iface" ]]; then
      say "$iface already has RDMA device ${dev##*/}; nothing to do (use it, or --remove --name ${dev##*/})"
      exit 0
    fi
  done
  rdma link add "$name" type rxe netdev "$iface" || die "rdma link add $name type rxe netdev $iface failed (see dmesg)"
  say "$name added on $iface"
fi

# The port is usable once ACTIVE (it follows the interface's carrier).
for _ in $(seq 50); do
  grep -q ACTIVE "/sys/class/infiniband/$name/ports/1/state" 2>/dev/null && break
  sleep 0.1
done
state=$(cat "/sys/class/infiniband/$name/ports/1/state" 2>/dev/null || echo unknown)
[[ $state == *ACTIVE* ]] || die "$name port 1 is $state, not ACTIVE: is $iface up with a carrier?"
say "$name port 1: $state; memlock limit here: $(ulimit -l)"
