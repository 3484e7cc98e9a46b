#!/usr/bin/env bash
# Installs QEMU (aarch64 + x86_64 system emulators) and aarch64 binutils on a
# Debian bookworm machine. The machine ships qemu-utils from bookworm-backports
# without that suite in its apt sources, so a plain install conflicts; we add
# the suite and install from it (see shared/PLATFORM-FACTS.md).
set -euo pipefail
need=()
command -v qemu-system-aarch64 >/dev/null || need+=(qemu-system-arm)
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v aarch64-linux-gnu-as >/dev/null || need+=(binutils-aarch64-linux-gnu)
[ ${#need[@]} -eq 0 ] && exit 0
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
if ! grep -rqs bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d/; then
  $SUDO tee /etc/apt/sources.list.d/bookworm-backports.sources >/dev/null <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq -t bookworm-backports "${need[@]}" >/dev/null
