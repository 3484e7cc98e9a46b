#!/usr/bin/env bash
# Installs QEMU (aarch64 + x86_64 system emulators) and aarch64 binutils on a
# Debian machine. The project's bookworm machines ship qemu-utils from
# bookworm-backports without that suite in their apt sources, so a plain
# install conflicts; on bookworm we add the suite (same mirror as the existing
# Debian entry) and install from it (see shared/PLATFORM-FACTS.md).
set -euo pipefail

say() { printf 'install-qemu.sh: %s\n' "$*"; }

need=()
command -v qemu-system-aarch64 >/dev/null || need+=(qemu-system-arm)
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v aarch64-linux-gnu-as >/dev/null || need+=(binutils-aarch64-linux-gnu)
if [ ${#need[@]} -eq 0 ]; then
    say "QEMU and aarch64 binutils are already installed"
    exit 0
fi

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    if ! command -v sudo >/dev/null; then
        say "need root to install ${need[*]}; rerun as root" >&2
        exit 1
    fi
    SUDO=(sudo)
fi

# The URI of the machine's main Debian archive entry (deb822 or one-line
# format), so that the backports entry uses the same mirror.
debian_mirror() {
    local uri=""
    uri="$(awk '
        /^[ \t]*$/ { if (suites ~ /(^| )bookworm( |$)/ && uris != "") { print uris; exit } suites = uris = ""; next }
        /^URIs:/ { uris = $2 }
        /^Suites:/ { $1 = ""; suites = $0 " " }
        END { if (suites ~ /(^| )bookworm( |$)/ && uris != "") print uris }
    ' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n1)"
    if [ -z "$uri" ]; then
        uri="$(awk '$1 == "deb" { for (i = 2; i < NF; i++) if ($i !~ /^\[/ && $i !~ /\]$/) { if ($(i + 1) == "bookworm") print $i; break } }' \
            /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null | head -n1)"
    fi
    printf '%s\n' "${uri:-http://deb.debian.org/debian}"
}

# shellcheck disable=SC1091 # /etc/os-release is the machine's
codename="$( (. /etc/os-release && printf '%s' "${VERSION_CODENAME:-}") 2>/dev/null || true)"
export DEBIAN_FRONTEND=noninteractive
install_opts=(-y -qq)
if [ "$codename" = bookworm ]; then
    if ! grep -rqs bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d/; then
        mirror="$(debian_mirror)"
        say "adding bookworm-backports ($mirror) to the apt sources"
        "${SUDO[@]}" tee /etc/apt/sources.list.d/bookworm-backports.sources >/dev/null <<SRC
Types: deb
URIs: $mirror
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
    fi
    install_opts+=(-t bookworm-backports)
else
    say "not Debian bookworm (codename '${codename:-unknown}'): installing from the default suites"
fi
say "apt-get update"
"${SUDO[@]}" apt-get update -qq
say "apt-get install ${install_opts[*]} ${need[*]}"
"${SUDO[@]}" apt-get install "${install_opts[@]}" "${need[@]}" >/dev/null
if ! command -v qemu-system-aarch64 >/dev/null; then
    say "apt-get finished but qemu-system-aarch64 is still missing" >&2
    exit 1
fi
say "installed: $(qemu-system-aarch64 --version | head -n1)"
