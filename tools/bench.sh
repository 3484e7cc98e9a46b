#!/usr/bin/env bash
# Runs the in-guest benchmarks (`tests=bench`) for several CPU counts through
# ./qemu.sh, collects the `# bench ...` lines into target/bench/bench.{csv,json}
# and draws the plots (target/bench/*.svg) with tools/bench_report.py.
#
# Usage: ./qemu.sh --bench [--arch ARCH]... [--cpus "1 2 4 8"] [--cpu MODEL]
#        [--no-build] [-- EXTRA BOOTARGS]
# (these options may also come before --bench; no other qemu.sh option applies).
# Every option, CPU count and CPU model is checked (./qemu.sh --check) before the
# old logs are deleted or anything is built. Exit status: 0 when every run passed
# and the report was written, 1 otherwise, 2 on a usage or setup error.
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
            [[ "$2" != -* ]] || { say "option $1 needs a value, got the option '$2'"; exit 2; }
            case "$1" in
                --arch) arches+=("$2") ;;
                --cpus) cpus="$2" ;;
                --cpu) cpu_model="$2" ;;
            esac
            shift
            ;;
        --no-build) build=0 ;;
        -h | --help) sed -n '2,12p' "${BASH_SOURCE[0]}"; exit 0 ;;
        --smp | --smp=* | --timeout | --timeout=* | --log | --log=* | --accel | --accel=* | --machine-opts | --machine-opts=* | --check)
            say "${1%%=*} is not a --bench option (--bench takes --arch, --cpus \"1 2 4 8\", --cpu MODEL, --no-build)"
            exit 2
            ;;
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
# Each architecture's vCPU limit (qemu.sh's arch_max_smp: MAX_CPUS or the
# machine's limit, whichever is smaller).
arch_limit() { bash -c 'source "$1"; arch_max_smp "$2" ${3:-}' _ "$ROOT/qemu.sh" "$@"; }
max_cpus=0
max_why=""
for arch in "${arches[@]}"; do
    read -r limit why <<<"$(arch_limit "$arch" why)"
    if ((limit > max_cpus)); then max_cpus=$limit max_why=$why; fi
done
[[ -n "${cpus// /}" ]] || { say "--cpus needs CPU counts from 1 to $max_cpus, got none"; exit 2; }
for n in $cpus; do
    [[ "$n" =~ ^[0-9]+$ ]] || { say "--cpus takes CPU counts from 1 to $max_cpus, got '$n' in '$cpus'"; exit 2; }
    digits="${n#"${n%%[!0]*}"}"
    if ((${#digits} > ${#max_cpus})) || ((10#${digits:-0} < 1 || 10#${digits:-0} > max_cpus)); then
        say "--cpus $n is out of range (min 1, max $max_cpus = $max_why)"
        exit 2
    fi
done
# A count above one architecture's limit (x86_64 stops at 288, aarch64 at 512) is
# not run for it; said here and in the report, never silently.
declare -A arch_cpus=() arch_skipped=()
for arch in "${arches[@]}"; do
    read -r limit why <<<"$(arch_limit "$arch" why)"
    run="" skipped=""
    for n in $cpus; do
        if ((10#$n <= limit)); then run+=" $((10#$n))"; else skipped+=" $((10#$n))"; fi
    done
    if [[ -z "$run" ]]; then
        say "--cpus '$cpus' has no count $arch can run (max $limit = $why)"
        exit 2
    fi
    if [[ -n "$skipped" ]]; then
        say "$arch: skipping${skipped} CPUs (above its limit of $limit = $why)"
        arch_skipped[$arch]="${skipped# }"
    fi
    arch_cpus[$arch]="${run# }"
done
# QEMU must accept each architecture's machine with this CPU model and count
# (e.g. no 32-bit --cpu on aarch64) before anything is deleted or built.
for arch in "${arches[@]}"; do
    for n in ${arch_cpus[$arch]}; do
        if ! said="$("$ROOT/qemu.sh" --check --arch "$arch" --smp "$n" --cpu "$cpu_model" 2>&1 >/dev/null)"; then
            said="$(grep -m1 -E '^qemu.sh: (FAIL|--|option|unknown)' <<<"$said" || tail -n1 <<<"$said")"
            say "FAIL ($arch, $n CPUs, --cpu $cpu_model: ${said#qemu.sh: })"
            exit 2
        fi
    done
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
skipped_args=()
for arch in "${arches[@]}"; do
    skipped="${arch_skipped[$arch]:-}"
    if [[ -n "$skipped" ]]; then skipped_args+=(--skipped "$arch:${skipped// /,}"); fi
done
for arch in "${arches[@]}"; do
    first=1
    for n in ${arch_cpus[$arch]}; do
        log="$out/logs/${arch}_smp${n}.log"
        # A boot of n vCPUs on one host thread takes longer the more there are.
        args=(--arch "$arch" --smp "$n" --cpu "$cpu_model" --timeout $((600 + 4 * n)) --log "$log")
        if ((!build || !first)); then args+=(--no-build); fi
        first=0
        say "$arch, $n CPUs: ./qemu.sh ${args[*]} -- tests=bench ${extra[*]}"
        if ! "$ROOT/qemu.sh" "${args[@]}" -- tests=bench "${extra[@]}" >/dev/null; then
            say "FAIL: $arch with $n CPUs (log: $log)"
            status=1
        fi
    done
done

python3 "$ROOT/tools/bench_report.py" --out "$out" --cpu "$cpu_model" "${skipped_args[@]}" \
    "$out"/logs/*.log || status=1
exit "$status"
