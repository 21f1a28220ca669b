#!/usr/bin/env bash
# Builds the soft-RoCE guest: a Debian kernel booted straight from its uncompressed vmlinux and
# an initramfs holding busybox, rdma-core's libraries and tools, perftest, the kernel modules for
# virtio, rdma_rxe, rdma_cm and 9p, and tools/guest/init as /init. Everything comes from Debian
# packages fetched with `apt-get download` and unpacked with `dpkg-deb -x`; nothing is installed
# on the host except the tools the harness itself runs (qemu, cpio, xz, python3).
#
# Idempotent: the image is rebuilt only when its inputs change. Its key is the exact versions of
# the guest packages plus the hashes of this script and of the guest's init; while apt's lists
# and those two files are unchanged, the check does not even ask apt (image/fast-key).
#
#   tools/guest/setup.sh            build or check the image (prints where it is and how long it took)
#   tools/guest/setup.sh --force    rebuild the initramfs even if it looks up to date
#
# Cache: ${ORDINAL_GUEST_CACHE:-$HOME/.cache/ordinal-guest}
#   debs/           the downloaded .deb files
#   stage/PKG_VER/  each package unpacked (the kernel's modules.dep is generated there)
#   image/          vmlinux, initrd.img, key and fast-key (what it was built from), manifest
# Extra guest packages (their shared libraries go into the image): ORDINAL_GUEST_EXTRA_PACKAGES.
set -euo pipefail
prog=setup.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

force=0
case "${1:-}" in
  "") ;;
  --force) force=1 ;;
  -h|--help) usage; exit 0 ;;
  *) die "unknown argument $1 (try --help)" ;;
esac

t_start=$(now_us)

# ---- host tools -----------------------------------------------------------------------------
# Command -> Debian package. busybox comes from the guest's own busybox-static .deb.
declare -A host_tools=([qemu-system-x86_64]=qemu-system-x86 [cpio]=cpio [xz]=xz-utils
                       [python3]=python3 [flock]=util-linux [setpriv]=util-linux [dpkg-deb]=dpkg [apt-get]=apt)
missing=()
for tool in "${!host_tools[@]}"; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("${host_tools[$tool]}")
done
if ((${#missing[@]})); then
  ((EUID == 0)) || die "need root to install ${missing[*]} (install them and run again)"
  say "installing host packages: ${missing[*]}"
  # Note: on a host with qemu-utils from backports this replaces it with bookworm's version.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2 ||
    { apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2; } ||
    die "could not install ${missing[*]}"
fi

mkdir -p "$guest_cache"/{debs,stage,image}
# One build at a time per cache (several runners may call setup.sh together).
exec 9>"$guest_cache/lock"
flock -w 600 9 || die "another setup.sh held $guest_cache/lock for 10 minutes"

# ---- guest packages -------------------------------------------------------------------------
# Packages whose programs go into the image, and which of their files: all of perftest's,
# ibverbs-utils' and rdmacm-utils' programs, iproute2's `rdma` and `tc` (busybox provides `ip`;
# its `tc` knows no netem, which tools/guest/wan.sh needs), and bash for commands written in bash
# (the project's own scripts are). Busybox is handled below. Several paths are space-separated.
declare -A tool_files=([perftest]=usr/bin [ibverbs-utils]=usr/bin [rdmacm-utils]=usr/bin
                       [iproute2]="usr/bin/rdma sbin/tc" [bash]=bin/bash)
tool_packages=(busybox-static perftest ibverbs-utils rdmacm-utils iproute2 bash)
# Packages whose shared libraries go into the image: rdma-core's libraries and providers, and the
# closure of everything above (checked below with the guest's own ld.so; a library that is still
# missing stops the build and is named). Host-built Rust binaries need libc6 and libgcc-s1 only,
# plus libibverbs1/librdmacm1 when they use verbs; libstdc++ is not needed by anything here.
library_packages=(libc6 libgcc-s1 libibverbs1 ibverbs-providers libibumad3 librdmacm1
                  libnl-3-200 libnl-route-3-200 libpci3 libudev1 zlib1g libmnl0 libbsd0 libmd0 libcap2 libtinfo6
                  libbpf1 libelf1 libxtables12)
read -r -a extra_packages <<<"${ORDINAL_GUEST_EXTRA_PACKAGES:-}"
library_packages+=("${extra_packages[@]}")
# Kernel modules to load, with their modules.dep closure. crc32_generic is not in modules.dep but
# rdma_rxe asks for the crc32 algorithm at run time ("failed to init crc32 algorithm err:-2").
wanted_modules=(crc32_generic virtio_pci virtio_net rdma_rxe ib_uverbs ib_umad rdma_ucm 9pnet_virtio 9p
                sch_netem)

# Fast path: the candidate versions can only change when apt's lists or pinning change. If neither
# they nor the scripts changed since the last build, the image is current (no apt-cache: ~1 s).
fast_key=$(
  { stat -c '%n %s %Y' /var/lib/apt/lists/*_Packages* /etc/apt/preferences* /etc/apt/preferences.d/* 2>/dev/null || true
    sha256sum "$guest_tools/setup.sh" "$guest_tools/init"
    echo "${ORDINAL_GUEST_EXTRA_PACKAGES:-}"; } | sha256sum | cut -d' ' -f1
)
if ((!force)) && [[ -f $guest_image/fast-key && -f $guest_image/initrd.img && -f $guest_image/vmlinux ]] &&
   [[ $(cat "$guest_image/fast-key") == "$fast_key" ]]; then
  say "guest image up to date in $guest_image ($(secs "$t_start" "$(now_us)") s)"
  exit 0
fi

candidate_versions() {   # prints "package version" for each argument, from apt's current lists
  apt-cache policy "$@" 2>/dev/null | awk '/^[^ ].*:$/ {p=$1; sub(/:$/,"",p)} /^  Candidate:/ {print p, $2}'
}
kernel_package() {
  apt-cache show --no-all-versions linux-image-amd64 2>/dev/null |
    sed -n 's/^Depends:.*\(linux-image-[0-9][^ ,]*-amd64\).*/\1/p' | head -n 1
}

kernel=$(kernel_package)
if [[ -z $kernel ]]; then
  ((EUID == 0)) || die "apt knows no linux-image-amd64; run apt-get update as root"
  say "apt lists are empty; running apt-get update"
  apt-get update -q >&2 || die "apt-get update failed"
  kernel=$(kernel_package)
  [[ -n $kernel ]] || die "apt knows no linux-image-amd64 even after apt-get update"
fi
all_packages=("$kernel" "${tool_packages[@]}" "${library_packages[@]}")
declare -A version=()
while read -r pkg ver; do version[$pkg]=$ver; done < <(candidate_versions "${all_packages[@]}")
for pkg in "${all_packages[@]}"; do
  [[ -n ${version[$pkg]:-} && ${version[$pkg]} != "(none)" ]] || die "apt has no candidate version of guest package $pkg"
done

# apt-get download names a file PKG_VERSION_ARCH.deb with the epoch's ':' written as %3a.
deb_of() { local f; for f in "$guest_cache/debs/${1}_${version[$1]//:/%3a}_"*.deb; do [[ -f $f ]] && echo "$f"; done; }
to_fetch=()
for pkg in "${all_packages[@]}"; do [[ -n $(deb_of "$pkg") ]] || to_fetch+=("$pkg=${version[$pkg]}"); done
if ((${#to_fetch[@]})); then
  say "downloading ${#to_fetch[@]} guest packages"
  (cd "$guest_cache/debs" && apt-get download -q -o APT::Sandbox::User=root "${to_fetch[@]}" >&2) ||
    die "apt-get download failed for: ${to_fetch[*]}"
fi

# Unpack each package once, into a directory named after its exact version.
stage_of() { echo "$guest_cache/stage/${1}_${version[$1]//:/%3a}"; }
for pkg in "${all_packages[@]}"; do
  dir=$(stage_of "$pkg")
  [[ -f $dir/.unpacked ]] && continue
  rm -rf "$dir" "$dir.tmp"
  dpkg-deb -x "$(deb_of "$pkg")" "$dir.tmp" || die "dpkg-deb -x failed for $pkg"
  touch "$dir.tmp/.unpacked"
  mv "$dir.tmp" "$dir"
done
kstage=$(stage_of "$kernel")
kver=$(ls "$kstage/lib/modules")
[[ $kver =~ ^[0-9][^[:space:]]*$ ]] || die "expected one kernel version in $kstage/lib/modules, found: $kver"
busybox_bin=$(stage_of busybox-static)/bin/busybox
# The kernel package has no modules.dep (its postinst makes it); make it with the guest's busybox.
if [[ ! -s $kstage/lib/modules/$kver/modules.dep ]]; then
  "$busybox_bin" depmod -b "$kstage" "$kver" || die "busybox depmod failed for $kver"
fi

# ---- is the image up to date? ---------------------------------------------------------------
key=$(
  for pkg in "${all_packages[@]}"; do echo "$pkg ${version[$pkg]}"; done | LC_ALL=C sort
  sha256sum "$guest_tools/setup.sh" "$guest_tools/init" | awk '{print $1}'
)
if ((!force)) && [[ -f $guest_image/key && -f $guest_image/initrd.img && -f $guest_image/vmlinux ]] &&
   [[ $(cat "$guest_image/key") == "$key" ]]; then
  echo "$fast_key" >"$guest_image/fast-key"
  say "guest image up to date in $guest_image ($(secs "$t_start" "$(now_us)") s)"
  exit 0
fi
say "building the guest image (kernel $kver)"

# ---- the kernel: uncompressed vmlinux for a PVH boot ----------------------------------------
# vmlinuz is a bzImage with an xz payload; the ELF inside has a PVH note (CONFIG_PVH=y), so qemu
# can jump straight to it: no firmware real-mode setup, no decompression under TCG (~3 s saved).
vmlinux=$guest_cache/stage/vmlinux-$kver
if [[ ! -f $vmlinux ]]; then
  vmlinuz=$kstage/boot/vmlinuz-$kver
  offset=$(LC_ALL=C grep -abo -m 1 $'\xfd7zXZ' "$vmlinuz" | head -n 1 | cut -d: -f1)
  [[ -n $offset ]] || die "no xz stream in $vmlinuz"
  { tail -c +$((offset + 1)) "$vmlinuz" || true; } | xz -dc --single-stream >"$vmlinux.tmp" ||
    die "could not decompress the kernel from $vmlinuz"
  [[ $(head -c 4 "$vmlinux.tmp" | od -An -c | tr -d ' ') == '177ELF' ]] || die "the kernel extracted from $vmlinuz is not an ELF file"
  mv "$vmlinux.tmp" "$vmlinux"
fi

# ---- the initramfs tree ---------------------------------------------------------------------
tree=$(mktemp -d "$guest_cache/tree.XXXXXX")
trap 'rm -rf "$tree"' EXIT
mkdir -p "$tree"/{bin,sbin,usr/bin,usr/sbin,lib/modules,etc/libibverbs.d,proc,sys,dev,tmp,run,host,root,mnt}

for pkg in "${!tool_files[@]}"; do
  for path in ${tool_files[$pkg]}; do
    if [[ -d $(stage_of "$pkg")/$path ]]; then
      mkdir -p "$tree/$path" && cp -a "$(stage_of "$pkg")/$path/." "$tree/$path/"
    else
      cp -a "$(stage_of "$pkg")/$path" "$tree/$path"
    fi || die "could not copy $path from $pkg"
  done
done
# Shared libraries (with their symlinks) and the loader, keeping Debian's paths; no gconv.
for pkg in "${library_packages[@]}"; do
  dirs=()
  for d in lib lib64 usr/lib; do [[ -d $(stage_of "$pkg")/$d ]] && dirs+=("$d"); done
  ((${#dirs[@]})) || die "guest package $pkg has no libraries"
  (cd "$(stage_of "$pkg")" &&
   find "${dirs[@]}" -path '*/gconv' -prune -o \( -name '*.so' -o -name '*.so.*' \) -print |
     cpio -pdm --quiet "$tree") || die "could not copy the libraries of $pkg"
done
cp -a "$(stage_of ibverbs-providers)/etc/libibverbs.d/." "$tree/etc/libibverbs.d/"
[[ -f $tree/etc/libibverbs.d/rxe.driver ]] || die "rxe.driver missing from ibverbs-providers"

# Busybox and its applets as symlinks, made here rather than at every boot. Real programs win.
cp "$busybox_bin" "$tree/bin/busybox"
while read -r applet; do
  [[ $applet == bin/busybox || -e $tree/$applet || -L $tree/$applet ]] && continue
  mkdir -p "$tree/$(dirname "$applet")"
  ln -s /bin/busybox "$tree/$applet"
done < <("$busybox_bin" --list-full)

# Kernel modules in load order: each module after everything modules.dep says it needs.
moddir=$kstage/lib/modules/$kver
declare -A seen=()
load_order=()
add_module() {
  local name=$1 line path dep deps=() i
  [[ -n ${seen[$name]:-} ]] && return 0
  seen[$name]=1
  line=$(awk -v m="$name" -F': *' '{n=$1; sub(".*/", "", n); sub(/\.ko(\.[a-z]+)?$/, "", n); gsub("-", "_", n)
                                     if (n == m) {print; exit}}' "$moddir/modules.dep")
  [[ -n $line ]] || die "kernel module $name not found in $kver"
  path=${line%%:*}
  read -r -a deps <<<"${line#*:}"
  # modules.dep lists the whole closure, nearest first: add the deepest first.
  for ((i = ${#deps[@]} - 1; i >= 0; i--)); do
    dep=${deps[$i]##*/}
    add_module "$(echo "${dep%%.ko*}" | tr - _)"
  done
  load_order+=("$path")
}
for m in "${wanted_modules[@]}"; do add_module "$m"; done
: >"$tree/lib/modules/load-order"
for path in "${load_order[@]}"; do
  cp "$moddir/$path" "$tree/lib/modules/"
  basename "$path" >>"$tree/lib/modules/load-order"
done

# A few files programs expect: users, name lookup through /etc/hosts (written by /init).
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' >"$tree/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' >"$tree/etc/group"
printf 'passwd: files\ngroup: files\nhosts: files dns\n' >"$tree/etc/nsswitch.conf"
printf '127.0.0.1 localhost\n' >"$tree/etc/hosts"
cp "$guest_tools/init" "$tree/init"
chmod 755 "$tree/init"

# Every ELF file must find all its libraries inside the image. The guest's loader resolves them
# with only the image's directories (no host ld.so.cache); a path outside the tree is a miss.
ld_so=$tree/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2
lib_path=$tree/lib/x86_64-linux-gnu:$tree/usr/lib/x86_64-linux-gnu
problems=()
while read -r file; do
  [[ $(head -c 4 "$file" | od -An -c | tr -d ' ') == '177ELF' ]] || continue
  listing=$("$ld_so" --inhibit-cache --library-path "$lib_path" --list "$file" 2>&1) || true
  [[ $listing == *"not a dynamic executable"* || $listing == *"statically linked"* ]] && continue
  while read -r lib arrow resolved _; do
    [[ $arrow == "=>" ]] || continue
    if [[ $resolved == "not" || $resolved != "$tree"/* ]]; then problems+=("${file#"$tree"/} needs $lib"); fi
  done <<<"$listing"
done < <(find "$tree" -type f \( -path '*/bin/*' -o -path '*/sbin/*' -o -name '*.so*' \) ! -name busybox)
((${#problems[@]} == 0)) || die "libraries missing from the guest image (add their Debian packages to library_packages in setup.sh): $(printf '%s; ' "${problems[@]}")"

# ---- write the image (each file replaced atomically; the key last) --------------------------
(cd "$tree" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) >"$guest_image/initrd.img.tmp"
mv "$guest_image/initrd.img.tmp" "$guest_image/initrd.img"
ln -sfn "../stage/vmlinux-$kver" "$guest_image/vmlinux"
{
  echo "kernel $kver"
  echo "modules $(tr '\n' ' ' <"$tree/lib/modules/load-order")"
  echo "files $(find "$tree" -type f | wc -l), initrd $(du -h "$guest_image/initrd.img" | cut -f1)"
} >"$guest_image/manifest"
echo "$key" >"$guest_image/key"
echo "$fast_key" >"$guest_image/fast-key"

# Forget package versions that are no longer wanted (an apt upgrade leaves old ones behind).
declare -A keep=()
for pkg in "${all_packages[@]}"; do keep[$(stage_of "$pkg")]=1; keep[$(deb_of "$pkg")]=1; done
keep[$guest_cache/stage/vmlinux-$kver]=1
for old in "$guest_cache"/stage/* "$guest_cache"/debs/*.deb; do
  [[ -e $old && -z ${keep[$old]:-} ]] && rm -rf "$old"
done

say "guest image built in $guest_image ($(tail -n 1 "$guest_image/manifest")) in $(secs "$t_start" "$(now_us)") s"
