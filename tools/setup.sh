#!/usr/bin/env bash
# Installs what ordinal needs on a fresh machine of this kind (Debian with a Rust toolchain) and
# is safe to run again: every step checks first and does nothing when the need is met.
# Sourced by tools/demo.sh and tools/test.sh; run it alone to prepare a machine.
set -euo pipefail

say() { printf 'setup: %s\n' "$*"; }

# Debian packages the build needs: the RDMA wrapper (hw/, through rdma-sys) generates its bindings
# from libibverbs' headers with bindgen (libclang) and finds them with pkg-config. The rest of the
# workspace is pure Rust. The NBD export is tested with real clients: qemu-utils (qemu-io,
# qemu-img) and libnbd-bin (nbdinfo, nbdcopy). The loopback benchmark puts its volumes on ext4
# on a zram device (mkfs.ext4: e2fsprogs).
debian_packages=(libibverbs-dev librdmacm-dev libclang-dev pkg-config qemu-utils libnbd-bin e2fsprogs)

missing=()
for package in "${debian_packages[@]}"; do
  dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing Debian packages: ${missing[*]}"
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: need root to install ${missing[*]} (or install them and run again)" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi

if ! command -v cargo >/dev/null 2>&1; then
  for candidate in "$HOME/.cargo/bin" /usr/local/cargo/bin; do
    if [ -x "$candidate/cargo" ]; then
      export PATH="$candidate:$PATH"
      break
    fi
  done
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: no Rust toolchain (cargo) found; install one (rustup, or Debian's cargo) and run again" >&2
  exit 1
fi
