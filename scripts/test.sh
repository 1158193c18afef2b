#!/usr/bin/env bash
# The README's test command: installs the outside tools the tests use when they are missing
# (qemu-img/qemu-io/qemu-nbd and nbdinfo for the NBD tests, losetup for raw block devices, moto
# for the S3 backup target, grpcio and grpcio-tools for the CSI client tests, strace for the
# tests that count a command's system calls, fio, nbdfuse and e2fsprogs for the NBD client
# tests), then runs every test. A test whose tool still
# cannot be had says SKIPPED.
set -uo pipefail
cd "$(dirname "$0")/.."

apt_install() {
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq >/dev/null 2>&1
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null 2>&1 ||
      echo "test.sh: could not install $* (the tests that need it will say SKIPPED)"
  else
    echo "test.sh: $* missing and not root (the tests that need it will say SKIPPED)"
  fi
}

if ! command -v losetup >/dev/null 2>&1 || ! command -v taskset >/dev/null 2>&1; then
  apt_install util-linux
fi
if ! command -v qemu-io >/dev/null 2>&1 || ! command -v qemu-nbd >/dev/null 2>&1; then
  apt_install qemu-utils
fi
if ! command -v nbdinfo >/dev/null 2>&1; then
  apt_install libnbd-bin
fi
if ! command -v strace >/dev/null 2>&1; then
  apt_install strace
fi
# fio (its nbd engine verifies writes through the server), nbdfuse and e2fsprogs (ext4 on a
# served volume through a loop device) for tests/nbd_clients.rs.
if ! command -v fio >/dev/null 2>&1; then
  apt_install fio
fi
if ! command -v nbdfuse >/dev/null 2>&1; then
  apt_install nbdfuse
fi
if ! command -v debugfs >/dev/null 2>&1 || ! command -v mkfs.ext4 >/dev/null 2>&1; then
  apt_install e2fsprogs
fi
if ! command -v moto_server >/dev/null 2>&1; then
  python3 -m pip install -q 'moto[server]' >/dev/null 2>&1 ||
    echo "test.sh: could not install moto (the S3 tests will say SKIPPED)"
  # pip may put the script outside PATH (a user install).
  export PATH="$PATH:$HOME/.local/bin"
fi

if ! python3 -c 'import grpc, grpc_tools' >/dev/null 2>&1; then
  python3 -m pip install -q grpcio grpcio-tools >/dev/null 2>&1 ||
    echo "test.sh: could not install grpcio/grpcio-tools (the CSI client tests will say SKIPPED)"
fi

set -e
cargo test --all-features "$@"
