#!/usr/bin/env bash
# Runs the in-guest benchmarks (`tests=bench`) for several CPU counts through
# ./qemu.sh, collects the `# bench ...` lines into target/bench/bench.{csv,json}
# and draws the plots (target/bench/*.svg) with tools/bench_report.py.
#
# Usage: ./qemu.sh --bench [--arch ARCH]... [--cpus "1 2 4 8"] [--cpu MODEL]
#        [--no-build] [-- EXTRA BOOTARGS]
# Exit status: 0 when every run passed and the report was written, 1 otherwise,
# 2 on a usage error.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly ROOT
say() { printf 'bench: %s\n' "$*" >&2; }

arches=()
cpus="1 2 4 8"
cpu_model=max
build=1
extra=()
while (($# > 0)); do
    case "$1" in
        --arch | --cpus | --cpu)
            (($# >= 2)) || { say "option $1 needs a value"; exit 2; }
            case "$1" in
                --arch) arches+=("$2") ;;
                --cpus) cpus="$2" ;;
                --cpu) cpu_model="$2" ;;
            esac
            shift
            ;;
        --no-build) build=0 ;;
        -h | --help) sed -n '2,10p' "${BASH_SOURCE[0]}"; exit 0 ;;
        --) shift; extra=("$@"); break ;;
        *) say "unknown argument: $1"; exit 2 ;;
    esac
    shift
done
((${#arches[@]} > 0)) || arches=(aarch64)
for arch in "${arches[@]}"; do
    case "$arch" in
        aarch64 | x86_64) ;;
        *) say "unknown --arch '$arch' (aarch64 or x86_64)"; exit 2 ;;
    esac
done
for n in $cpus; do
    [[ "$n" =~ ^[0-9]+$ && "$n" =~ [1-9] ]] || { say "--cpus needs positive CPU counts, got '$cpus'"; exit 2; }
done
# The report needs only python3's standard library. Checked before the boots, so
# that a missing python3 does not cost a whole sweep. (QEMU and the Rust target
# are installed or named by the first ./qemu.sh of each architecture.)
command -v python3 >/dev/null || {
    say "FAIL (python3 not found; install it with: sudo apt-get install -y python3)"
    exit 2
}

target_dir="${CARGO_TARGET_DIR:-$ROOT/target}"
[[ "$target_dir" == /* ]] || target_dir="$ROOT/$target_dir"
out="$target_dir/bench"
mkdir -p "$out/logs"
rm -f "$out"/logs/*.log

status=0
for arch in "${arches[@]}"; do
    first=1
    for n in $cpus; do
        log="$out/logs/${arch}_smp${n}.log"
        args=(--arch "$arch" --smp "$n" --cpu "$cpu_model" --timeout 600 --log "$log")
        if ((!build || !first)); then args+=(--no-build); fi
        first=0
        say "$arch, $n CPUs: ./qemu.sh ${args[*]} -- tests=bench ${extra[*]}"
        if ! "$ROOT/qemu.sh" "${args[@]}" -- tests=bench "${extra[@]}" >/dev/null; then
            say "FAIL: $arch with $n CPUs (log: $log)"
            status=1
        fi
    done
done

python3 "$ROOT/tools/bench_report.py" --out "$out" --cpu "$cpu_model" "$out"/logs/*.log || status=1
exit "$status"
