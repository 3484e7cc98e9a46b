#!/usr/bin/env bash
# Builds the patch-machine kernel and boots it under QEMU, then checks the KTAP
# report it prints on the serial console. Run `./qemu.sh --help` for options.
#
# Exit status: 0 = the kernel booted, QEMU exited 0 and the KTAP report is
# complete and has no failure; 1 = anything went wrong with the build, the boot
# or the tests; 2 = usage error or missing prerequisite.
#
# The file can be sourced (it only runs main when executed), which lets the
# KTAP checker be exercised on its own: `source qemu.sh; ktap_scan FILE`.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
readonly ROOT
readonly KERNEL_TARGET="aarch64-unknown-none"
readonly KERNEL_BIN="patch-machine"
readonly QEMU_AARCH64="qemu-system-aarch64"
readonly KILL_GRACE=10 # seconds between SIGTERM and SIGKILL on timeout

usage() {
    cat <<EOF
Usage: ./qemu.sh [OPTIONS] [-- BOOTARGS...]

Builds the kernel (release), boots it under QEMU and checks its KTAP report.
The serial console is streamed to stdout; the exit status is 0 only if QEMU
exited 0 and the report is complete with no failed test.

Options:
  --arch ARCH          aarch64 (default) or x86_64 (q35, PVH boot; success is
                       QEMU status 33 from isa-debug-exit; --accel kvm is
                       probed first and refused with status 2 if unusable)
  --smp N              number of vCPUs, default 4: aarch64 1 to $(arch_max_smp aarch64),
                       x86_64 1 to $(arch_max_smp x86_64) (the smaller of MAX_CPUS,
                       src/cpuset.rs, and the machine's limit)
  --cpu MODEL          QEMU CPU model (default max); on aarch64 a 64-bit one
                       (qemu-system-aarch64 -cpu help lists them)
  --machine-opts OPTS  appended to "virt,gic-version=3", e.g. virtualization=on
                       or virtualization=on,gic-version=4
  --accel ACCEL        QEMU accelerator (default tcg); a tcg without thread=
                       gets thread=single (see pick_accel for why)
  --timeout SECONDS    kill QEMU after this long, 1 to $MAX_TIMEOUT (default 300);
                       a fatal QEMU error (e.g. "KVM internal error") ends the
                       run at once instead
  --no-build           boot the existing image, do not run cargo build
  --check              check the options and that QEMU accepts the machine,
                       CPU model and accelerator, then exit: no build, no boot
  --bench [OPTS]       run the in-guest benchmarks for 1, 2, 4 and 8 CPUs and
                       write target/bench/bench.{csv,json}, scaling.{csv,json}
                       and SVG plots; OPTS (before or after --bench): --arch A
                       (repeatable), --cpus "1 2 4 8 ... 512" (a count above
                       one architecture's limit is skipped for it, and said so),
                       --cpu MODEL, --no-build (see tools/bench.sh)
  --log FILE           also save the serial output to FILE (checked before the
                       build: its directory is created, the file must be
                       writable)
  -h, --help           show this help
An option's value may not start with "-" (--log --no-build is refused); write
--log=-FILE for such a value.
  -- BOOTARGS...       the rest, joined with spaces, is passed as -append
                       (e.g. -- tests=torture,bad_batches flips=2000)

Exit status: 0 pass; 1 build, boot or test failure (a fatal QEMU error during
the run included); 2 usage or setup error: a bad option or value, a missing
QEMU, Rust target or image, a machine/CPU/accelerator QEMU refuses, unusable
KVM, or a --log that cannot be written. Nothing is built or booted after a 2.
EOF
}

say() { printf 'qemu.sh: %s\n' "$*" >&2; }

usage_error() {
    say "$*"
    usage >&2
    exit 2
}

# The largest --timeout: a day; larger values are typos (and would wrap bash's
# arithmetic past 19 digits).
readonly MAX_TIMEOUT=86400

# max_cpus: MAX_CPUS of src/cpuset.rs, the most CPUs the kernel drives (it fails
# cpus_online when the firmware lists more).
max_cpus() {
    local line
    line="$(grep -m1 -E '^pub const MAX_CPUS: usize = [0-9]+;' "$ROOT/src/cpuset.rs" 2>/dev/null)" || {
        echo 32
        return
    }
    line="${line##* }"
    printf '%s\n' "${line%;}"
}

# The machines' own vCPU limits: QEMU `virt` with GICv3 takes at most 512 (it
# refuses 513); the x86_64 port is brought up and tested on q35 up to 288
# (issue 15; q35 itself accepts more).
readonly AARCH64_MACHINE_MAX_SMP=512
readonly X86_64_MACHINE_MAX_SMP=288

# arch_max_smp ARCH [why]: the most vCPUs a run of ARCH takes, the smaller of
# MAX_CPUS and the machine's limit; with "why", also what sets it.
arch_max_smp() {
    local kernel machine why
    kernel="$(max_cpus)"
    case "$1" in
        x86_64) machine=$X86_64_MACHINE_MAX_SMP why="the x86_64 port's q35 limit, qemu.sh" ;;
        *) machine=$AARCH64_MACHINE_MAX_SMP why="QEMU virt's GICv3 limit" ;;
    esac
    if ((kernel <= machine)); then
        machine=$kernel
        why="MAX_CPUS, src/cpuset.rs"
    fi
    if [[ "${2:-}" == why ]]; then
        printf '%s %s\n' "$machine" "$why"
    else
        printf '%s\n' "$machine"
    fi
}

# check_count NAME VALUE MIN MAX [WHY]: VALUE is a decimal integer in MIN..MAX (checked
# as text first, so that no value wraps); prints it without leading zeros.
check_count() {
    local name="$1" value="$2" min="$3" max="$4" why="${5:+ = $5}"
    [[ "$value" =~ ^[0-9]+$ ]] || usage_error "$name takes a number from $min to $max, got '$value'"
    local digits="${value#"${value%%[!0]*}"}"
    if ((${#digits} > ${#max})) || ((10#${digits:-0} < min || 10#${digits:-0} > max)); then
        usage_error "$name $value is out of range (min $min, max $max$why)"
    fi
    printf '%s\n' "$((10#${digits:-0}))"
}

# ---------------------------------------------------------------------------
# KTAP checking
# ---------------------------------------------------------------------------

# ktap_scan FILE: reads a serial log and prints one fact per line:
#   count PLANNED SEEN PASS FAIL SKIP   (PLANNED is -1 without a plan line)
#   suite NAME PLANNED SEEN PASS FAIL SKIP   each subtest suite, when it ends
#   last LINE                           last result line (SUITE: LINE in a suite)
#   lastline LINE                       last non-empty line of output
#   notok LINE                          each failed top-level result
#   subnotok SUITE: LINE                each failed result inside a subtest suite
#   crash LINE                          first PANIC / UNEXPECTED EXCEPTION line
#   crashed_in NAME                     the test running at the crash (SUITE.NAME
#                                       inside a suite), from its "# NAME: start"
#   running NAME                        a test that started ("# NAME: start")
#                                       and never reported a result
#   error TEXT                          each structural problem, in order
# Subtest suites are KUnit's: a level is four spaces deeper, opens with its own
# "KTAP version 1", "# Subtest: NAME" and plan, and its verdict is the parent's
# next result, "ok N NAME" or "not ok N NAME", which must be "not ok" exactly
# when a result inside failed or is missing. Every level is checked like the
# top one (plan, numbering, Totals). A result line is `ok N ...` or
# `not ok N ...`; a `# SKIP` directive makes it a skip (as kunit does), which is
# never a failure.
ktap_scan() {
    LC_ALL=C awk '
    function err(msg) { print "error " msg }
    # The path of suite level d, e.g. "platform".
    function path(d,    p, i) {
        p = ""
        for (i = 1; i <= d; i++) p = p (p == "" ? "" : ".") sname[i]
        return p
    }
    function where(d) { return d > 0 ? "suite " path(d) ": " : "" }
    function open_level(d) {
        planned[d] = -1; seen[d] = 0; npass[d] = 0; nfail[d] = 0; nskip[d] = 0
        totals[d] = ""; started[d] = ""; delete tot
    }
    # Ends suite level d (its parent result, if any, follows).
    function close_level(d) {
        if (planned[d] < 0) err(where(d) "no plan line")
        else if (seen[d] != planned[d])
            err(where(d) seen[d] " result line(s) for a plan of " planned[d])
        if (totals[d] == "") err(where(d) "no \"# Totals:\" line")
        print "suite " path(d) " " planned[d] " " seen[d] " " npass[d] " " nfail[d] " " nskip[d]
        closed_name = sname[d]
        closed_bad = (nfail[d] > 0 || seen[d] != planned[d] || planned[d] < 0)
        depth = d - 1
    }
    {
        sub(/\r+$/, "")
        if ($0 ~ /[^ \t]/) lastline = $0
        # A KTAP line of level d is indented by 4*d spaces.
        match($0, /^ */)
        indent = RLENGTH
        body = substr($0, indent + 1)
        d = (indent % 4 == 0) ? indent / 4 : -1
    }
    /^(PANIC|UNEXPECTED EXCEPTION)/ {
        if (crash == "") {
            crash = $0
            if (started[depth] != "") crashed_in = (depth > 0 ? path(depth) "." : "") started[depth]
            else if (headers) crashed_in = (depth > 0 ? path(depth) " test " : "test ") seen[depth] + 1
        }
        next
    }
    d < 0 { next }
    body ~ /^KTAP version / {
        if (body != "KTAP version 1") { err("unsupported header \"" body "\""); next }
        if (d == 0) {
            headers++
            if (headers > 1) err("KTAP header printed more than once (did the kernel restart?)")
            next
        }
        if (d != depth + 1) { err("subtest header \"" $0 "\" at the wrong depth"); next }
        depth = d
        sname[d] = "(unnamed)"
        open_level(d)
        next
    }
    d > 0 && d <= depth && body ~ /^# Subtest: / {
        sname[d] = substr(body, 12)
        next
    }
    d <= depth && body ~ /^1\.\.[0-9]+$/ {
        if (d == 0 && !headers) { err("plan line \"" $0 "\" before the KTAP header"); next }
        if (planned[d] >= 0) { err(where(d) "more than one plan line"); next }
        planned[d] = substr(body, 4) + 0
        next
    }
    d <= depth && body ~ /^# [^ ]+: start$/ {
        started[d] = substr(body, 3, length(body) - 9)
        next
    }
    body ~ /^(not )?ok [0-9]+( |$)/ {
        if (d > depth) { err("result \"" $0 "\" deeper than any open suite"); next }
        closed_name = ""
        while (depth > d) close_level(depth)
        notok = (body ~ /^not /)
        line = body
        num = line; sub(/^(not )?ok /, "", num); sub(/ .*$/, "", num); num += 0
        if (d == 0 && !headers) err("result \"" $0 "\" before the KTAP header")
        else if (planned[d] < 0) err(where(d) "result \"" body "\" before the plan line")
        if (totals[d] != "") err(where(d) "result \"" body "\" after the Totals line")
        seen[d]++
        started[d] = ""
        if (num != seen[d]) err(where(d) "result numbered " num " where " seen[d] " was expected: \"" body "\"")
        # The directive is whatever follows the first " # " of the line.
        skip = 0
        name = line; sub(/^(not )?ok [0-9]+ /, "", name); sub(/ #.*$/, "", name)
        if (match(line, / #/)) {
            directive = toupper(substr(line, RSTART + 2))
            sub(/^[ \t]*/, "", directive)
            skip = (directive ~ /^SKIP([ \t]|$)/)
        }
        if (closed_name != "") {
            if (name != closed_name) err("suite \"" closed_name "\" ends with the result of \"" name "\"")
            if (closed_bad && !notok) err("suite \"" closed_name "\" has failed or missing results but reports \"" body "\"")
            if (!closed_bad && notok) err("suite \"" closed_name "\" reports \"" body "\" without a failed result")
        }
        if (skip) nskip[d]++
        else if (notok) {
            nfail[d]++
            if (d == 0) print "notok " body
            else print "subnotok " path(d) ": " body
        } else npass[d]++
        last = (d > 0 ? path(d) ": " : "") body
        next
    }
    d <= depth && body ~ /^# Totals:/ {
        if (totals[d] != "") { err(where(d) "more than one Totals line"); next }
        totals[d] = body
        delete tot
        rest = substr(body, 10)
        n = split(rest, kv, /[ \t]+/)
        for (i = 1; i <= n; i++) {
            if (kv[i] == "") continue
            if (kv[i] !~ /^[a-z_]+:[0-9]+$/) { err(where(d) "unparsable Totals field \"" kv[i] "\""); continue }
            split(kv[i], p, ":")
            tot[p[1]] = p[2] + 0
        }
        if (!("pass" in tot) || !("fail" in tot) || !("skip" in tot))
            err(where(d) "Totals line lacks pass/fail/skip: \"" body "\"")
        else {
            if (d == 0 && tot["fail"] != 0) err("Totals report fail:" tot["fail"])
            if (tot["pass"] != npass[d] || tot["fail"] != nfail[d] || tot["skip"] != nskip[d])
                err(where(d) "\"" body "\" disagrees with the results (pass:" npass[d]+0 " fail:" nfail[d]+0 " skip:" nskip[d]+0 ")")
        }
        for (k in tot)
            if (k != "pass" && k != "fail" && k != "skip" && k != "xfail" && tot[k] != 0)
                err(where(d) "Totals report " k ":" tot[k])
        next
    }
    END {
        # A test that started and never reported: where a hang, an exit or a crash
        # left the run.
        for (i = depth; i >= 0; i--)
            if (started[i] != "") {
                print "running " (i > 0 ? path(i) "." : "") started[i]
                break
            }
        while (depth > 0) {
            err("suite " path(depth) " never ended (ran " seen[depth] " of " planned[depth] ")")
            close_level(depth)
        }
        if (!headers) err("no \"KTAP version 1\" line")
        else if (planned[0] < 0) err("no plan line \"1..N\"")
        else if (planned[0] == 0) err("empty plan \"1..0\": no test was run")
        if (planned[0] >= 0 && seen[0] != planned[0])
            err(seen[0]+0 " result line(s) for a plan of " planned[0])
        if (headers && totals[0] == "") err("no \"# Totals:\" line")
        if (crash != "") print "crash " crash
        if (crashed_in != "") print "crashed_in " crashed_in
        print "count " planned[0] " " seen[0]+0 " " npass[0]+0 " " nfail[0]+0 " " nskip[0]+0
        if (last != "") print "last " last
        if (lastline != "") print "lastline " lastline
    }
    BEGIN { depth = 0; open_level(0) }
    ' "$1"
}

# ktap_verdict SERIAL_LOG QEMU_STATUS TIMED_OUT QEMU_STDERR ELAPSED
# (TIMED_OUT is 0, or the time limit in seconds that QEMU ran into.)
# Prints the failing KTAP lines and a one-line PASS/FAIL summary; returns 0 on
# pass and 1 on failure.
ktap_verdict() {
    local serial="$1" status="$2" timed_out="$3" errfile="$4" elapsed="$5"
    local seen=0 npass=0 nfail=0 nskip=0
    local last="" lastline="" crash="" crashed_in="" running="" kind rest suites=""
    local -a errors=() notoks=() subnotoks=()

    while IFS= read -r fact; do
        kind="${fact%% *}"
        rest="${fact#* }"
        case "$kind" in
            count) read -r _ seen npass nfail nskip <<<"$rest" ;;
            last) last="$rest" ;;
            lastline) lastline="$rest" ;;
            crash) crash="$rest" ;;
            crashed_in) crashed_in="$rest" ;;
            running) running="$rest" ;;
            notok) notoks+=("$rest") ;;
            subnotok) subnotoks+=("$rest") ;;
            suite)
                local s_name s_planned s_seen s_pass s_fail s_skip
                read -r s_name s_planned s_seen s_pass s_fail s_skip <<<"$rest"
                suites+="; $s_name: $s_seen of $s_planned tests, $s_pass passed, $s_skip skipped"
                ((s_fail == 0)) || suites+=", $s_fail failed"
                ;;
            error) errors+=("$rest") ;;
        esac
    done < <(ktap_scan "$serial")

    local qemu_error=""
    if [[ -s "$errfile" ]]; then
        qemu_error="$(grep -m1 -v '^[[:space:]]*$' "$errfile" || true)"
    fi

    local where=""
    if [[ -n "$last" ]]; then
        where="last test seen: $last"
    elif [[ -n "$lastline" ]]; then
        where="no test result seen; last line: $lastline"
    else
        where="no serial output"
    fi

    local line
    for line in "${notoks[@]}" "${subnotoks[@]}"; do
        say "  $line"
    done

    local reason=""
    if [[ -n "${QEMU_FATAL_LINE:-}" ]]; then
        reason="QEMU stopped after ${elapsed} s with a fatal error: $QEMU_FATAL_LINE; $where"
    elif [[ "$timed_out" != 0 ]]; then
        reason="timeout after $timed_out s${running:+ in $running}; $where"
    elif [[ -n "$crash" ]]; then
        reason="kernel crashed${crashed_in:+ in $crashed_in}: $crash; $where"
    elif ((nfail > 0 || ${#subnotoks[@]} > 0)); then
        if ((nfail > 0)); then
            reason="$nfail of $seen test(s) failed: ${notoks[0]}"
            if ((nfail > 1)); then reason+=" (and $((nfail - 1)) more)"; fi
        else
            reason="a subtest failed (its suite reported no failure)"
        fi
        if ((${#subnotoks[@]} > 0)); then
            reason+="; in suite ${subnotoks[0]}"
            if ((${#subnotoks[@]} > 1)); then reason+=" (and $((${#subnotoks[@]} - 1)) more)"; fi
        fi
        if ((status == 0)); then reason+="; QEMU exited 0 nevertheless"; fi
    elif [[ "$status" != 0 && -n "$qemu_error" && "$seen" == 0 ]]; then
        reason="QEMU exited with status $status: $qemu_error"
    elif ((${#errors[@]} > 0)); then
        reason="bad KTAP report: ${errors[0]}"
        if [[ -n "$running" ]]; then reason="the run ended in $running; $reason"; fi
        if ((${#errors[@]} > 1)); then reason+=" (and $((${#errors[@]} - 1)) more problem(s))"; fi
        if [[ "$status" != 0 ]]; then reason+="; QEMU exit status $status"; fi
        reason+="; $where"
    elif [[ "$status" != 0 ]]; then
        reason="QEMU exited with status $status although KTAP reports no failure"
        if [[ -n "$qemu_error" ]]; then reason+=": $qemu_error"; fi
    fi

    if [[ -n "$reason" ]]; then
        # The full list of KTAP problems helps when the first one is not the cause.
        if ((${#errors[@]} > 1)) || [[ -n "$crash" || "$timed_out" != 0 ]]; then
            for line in "${errors[@]}"; do
                say "  KTAP: $line"
            done
        fi
        say "FAIL ($reason)"
        return 1
    fi
    say "PASS ($seen tests: $npass passed, $nskip skipped$suites; ${elapsed} s)"
    return 0
}

# ---------------------------------------------------------------------------
# Prerequisites, build, boot
# ---------------------------------------------------------------------------

# ensure_qemu PROGRAM: installs QEMU (and the aarch64 binutils) through
# .ci/install-qemu.sh when PROGRAM is missing and we are root; otherwise stops
# with the command that installs it.
ensure_qemu() {
    local program="$1"
    command -v "$program" >/dev/null && return 0
    if [[ "$(id -u)" == 0 ]]; then
        say "$program not found; installing it: bash $ROOT/.ci/install-qemu.sh"
        if ! bash "$ROOT/.ci/install-qemu.sh"; then
            say "FAIL (could not install QEMU with .ci/install-qemu.sh)"
            exit 2
        fi
        command -v "$program" >/dev/null && return 0
        say "FAIL (.ci/install-qemu.sh ran but $program is still missing)"
        exit 2
    fi
    say "FAIL ($program not found; install it with: sudo bash $ROOT/.ci/install-qemu.sh)"
    exit 2
}

# rust_target_installed TARGET: the toolchain cargo uses here (rust-toolchain.toml
# picks it) has TARGET's standard library.
rust_target_installed() {
    local sysroot
    sysroot="$(cd "$ROOT" && rustc --print sysroot 2>/dev/null)" || return 1
    [[ -d "$sysroot/lib/rustlib/$1/lib" ]]
}

# ensure_rust_target TARGET: rustup adds rust-toolchain.toml's targets only when
# it installs the toolchain, so a toolchain that was already installed lacks
# them (cargo build then fails with "can't find crate for `core`"): add it.
ensure_rust_target() {
    local target="$1"
    command -v cargo >/dev/null || {
        say "FAIL (cargo not found: install Rust with rustup first; rust-toolchain.toml then picks the version)"
        exit 2
    }
    rust_target_installed "$target" && return 0
    if ! command -v rustup >/dev/null; then
        say "FAIL (the Rust toolchain has no $target standard library and there is no rustup to add it; with rustup: cd $ROOT && rustup target add $target)"
        exit 2
    fi
    # Run from ROOT so that rust-toolchain.toml selects the pinned toolchain.
    say "rust target $target missing; running: rustup target add $target"
    if ! (cd "$ROOT" && rustup target add "$target") || ! rust_target_installed "$target"; then
        say "FAIL (rustup target add $target failed; run it yourself: cd $ROOT && rustup target add $target)"
        exit 2
    fi
}

build_kernel() {
    local cmd=(cargo build --release --target "$KERNEL_TARGET" --bin "$KERNEL_BIN")
    say "building: ${cmd[*]}"
    local status=0
    (cd "$ROOT" && "${cmd[@]}") || status=$?
    if ((status != 0)); then
        say "FAIL (cargo build failed with status $status)"
        exit 1
    fi
}

kernel_image() {
    local target_dir="${CARGO_TARGET_DIR:-target}"
    [[ "$target_dir" == /* ]] || target_dir="$ROOT/$target_dir"
    printf '%s\n' "$target_dir/$KERNEL_TARGET/release/$KERNEL_BIN"
}

# shell_quote ARGS...: prints the arguments as a copy-pasteable command line.
shell_quote() {
    local arg out=""
    for arg in "$@"; do
        if [[ "$arg" =~ ^[A-Za-z0-9_,.=/:+@%-]+$ ]]; then
            out+=" $arg"
        else
            out+=" '${arg//\'/\'\\\'\'}'"
        fi
    done
    printf '%s\n' "${out# }"
}

host_cores() { nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null || echo 1; }

# pick_accel ACCEL SMP: a plain tcg becomes single-threaded TCG. Two reasons:
# with more spinning vCPUs than host cores, multi-threaded TCG makes every
# rendezvous two orders of magnitude slower; and multi-threaded TCG does not keep
# cross-modified code coherent (a vCPU translating a page while another writes it
# can publish a stale translation that the writer itself then runs, even after
# its DC CVAU/IC IVAU/DSB/ISB), which the nosync self-test catches. Ask for
# --accel tcg,thread=multi to get truly parallel vCPUs anyway.
pick_accel() {
    local accel="$1" smp="$2"
    if [[ "$accel" =~ ^tcg(,|$) && "$accel" != *thread=* ]]; then
        accel+=",thread=single"
        ((smp > 1)) && say "using single-threaded TCG (--accel tcg,thread=multi for parallel vCPUs)"
    fi
    printf '%s\n' "$accel"
}

# probe_qemu PROGRAM MACHINE ACCEL: starts QEMU paused with the run's machine, CPU
# model, CPU count and accelerator, reads the registers through its monitor and
# quits (a fraction of a second), so that a setup QEMU refuses is a usage error
# found before anything is built or booted. On aarch64 the registers also tell an
# AArch32-only CPU model (R00=, where AArch64 shows PC= and X00=), which QEMU
# would refuse only at -kernel ("incompatible architecture").
probe_qemu() {
    local program="$1" machine="$2" accel="$3" out="$TMP/probe" status=0
    local setup="-machine $machine -cpu $OPT_CPU -smp $OPT_SMP -accel $accel"
    printf 'info registers\nquit\n' | timeout 30 "$program" -machine "$machine" -cpu "$OPT_CPU" \
        -smp "$OPT_SMP" -m 256M -accel "$accel" -display none -serial none -monitor stdio \
        -nodefaults -S >"$out" 2>&1 || status=$?
    if ((status == 124)); then
        say "FAIL (QEMU did not answer its monitor within 30 s when probing $setup)"
        exit 2
    elif ((status != 0)); then
        local line
        line="$(grep -m1 "^$program: " "$out" || grep -m1 -v '^[[:space:]]*$' "$out" || true)"
        say "FAIL (QEMU refuses $setup: ${line:-exit status $status})"
        exit 2
    fi
    if [[ "$program" == "$QEMU_AARCH64" ]] && ! grep -q 'PC=' "$out"; then
        say "FAIL (--cpu $OPT_CPU is a 32-bit (AArch32-only) CPU model and the kernel is AArch64: use a 64-bit one, e.g. max, cortex-a53, cortex-a57, cortex-a72 or neoverse-n1)"
        exit 2
    fi
}

# check_log: --log's directory is created and the file can be written, before
# the build.
check_log() {
    [[ -n "$OPT_LOG" ]] || return 0
    local dir err
    dir="$(dirname -- "$OPT_LOG")"
    if [[ -e "$dir" && ! -d "$dir" ]]; then
        say "FAIL (cannot create the --log file '$OPT_LOG': '$dir' is not a directory)"
        exit 2
    fi
    if ! err="$(mkdir -p -- "$dir" 2>&1)"; then
        say "FAIL (cannot create the --log directory '$dir': ${err##*: })"
        exit 2
    fi
    if ! err="$({ : >>"$OPT_LOG"; } 2>&1)"; then
        say "FAIL (cannot write the --log file '$OPT_LOG': ${err##*: })"
        exit 2
    fi
}

# check_only: --check ends here, every check above passed.
check_only() {
    ((OPT_CHECK)) || return 0
    say "OK ($OPT_ARCH: QEMU accepts -cpu $OPT_CPU -smp $OPT_SMP -accel $1; nothing built or booted)"
    exit 0
}

# Lines of QEMU's stderr after which it never exits by itself: KVM pauses the VM
# ("KVM internal error. Suberror: N", "KVM: entry failed, hardware error") and
# waits for a monitor that is not there, so the run would wait out its timeout.
readonly QEMU_FATAL='^(KVM internal error|KVM: entry failed|error: kvm run failed|qemu: fatal:)'

# watch_stderr: copies QEMU's stderr to ours and "$TMP/stderr"; on the first
# fatal line, saves it in "$TMP/fatal" and stops QEMU (through timeout(1), whose
# pid is in "$TMP/pid" and which passes SIGTERM on).
watch_stderr() {
    local line
    while IFS= read -r line || [[ -n "$line" ]]; do
        printf '%s\n' "$line" >&2
        printf '%s\n' "$line" >>"$TMP/stderr"
        if [[ ! -s "$TMP/fatal" && "$line" =~ $QEMU_FATAL ]]; then
            printf '%s\n' "$line" >"$TMP/fatal"
            say "QEMU reported a fatal error; stopping it"
            kill -TERM "$(cat "$TMP/pid")" 2>/dev/null || true
        fi
    done
}

# run_qemu LOGFILE... -- QEMU COMMAND...: streams the serial output to stdout
# and the log files, QEMU's stderr to stderr and "$TMP/stderr"; sets
# QEMU_STATUS, TIMED_OUT (0 or the time limit), QEMU_FATAL_LINE (the fatal line
# QEMU was stopped for, or empty) and ELAPSED.
run_qemu() {
    local -a logs=()
    while [[ "$1" != "--" ]]; do
        logs+=("$1")
        shift
    done
    shift
    local start=$SECONDS
    set +e
    # The inner pipeline copies QEMU's stderr to our stderr and a file, the
    # outer one copies the serial console (QEMU's stdout, via fd 3) to our
    # stdout and the logs. --foreground keeps QEMU in our process group so that
    # Ctrl-C reaches it; stdin is /dev/null so that QEMU never puts the
    # terminal in raw mode.
    : >"$TMP/stderr"
    : >"$TMP/fatal"
    {
        # shellcheck disable=SC2016 # $0 and $@ belong to the inner shell
        bash -c 'echo $$ >"$0"; exec "$@"' "$TMP/pid" \
            timeout --foreground --kill-after="$KILL_GRACE" "$OPT_TIMEOUT" "$@" \
            </dev/null 2>&1 1>&3 3>&- | watch_stderr 3>&-
        echo "${PIPESTATUS[0]}" >"$TMP/status"
    } 3>&1 | tee "${logs[@]}"
    set -e
    QEMU_FATAL_LINE="$(cat "$TMP/fatal")"
    ELAPSED=$((SECONDS - start))
    QEMU_STATUS="$(cat "$TMP/status")"
    TIMED_OUT=0
    # timeout(1) exits 124 (or 137 after SIGKILL); a kernel could exit with
    # those codes itself, but not after having used up the whole time budget.
    if [[ "$QEMU_STATUS" == 124 || "$QEMU_STATUS" == 137 ]] && ((ELAPSED >= OPT_TIMEOUT)); then
        TIMED_OUT="$OPT_TIMEOUT"
    fi
}

# ---------------------------------------------------------------------------
# x86_64: q35, PVH ELF boot, isa-debug-exit
# ---------------------------------------------------------------------------

readonly X86_64_TARGET="x86_64-unknown-none"
readonly QEMU_X86_64="qemu-system-x86_64"
# The kernel writes 0x10 (success) or 0x11 (failure) to isa-debug-exit, and QEMU
# exits with (v << 1) | 1. A triple fault under -no-reboot exits 0, so 0 is
# never success.
readonly X86_64_SUCCESS_STATUS=33

# x86_64_kvm_usable CPU: KVM here may exist but refuse to run (no /dev/kvm
# access, no hardware virtualisation, or a CPU model whose MSRs the host KVM
# rejects: -cpu max aborts QEMU on nested KVM). A short paused start (-S) shows
# it: QEMU still running after 3 s means the vCPUs were created.
x86_64_kvm_usable() {
    local cpu="$1" status=0
    [[ -r /dev/kvm && -w /dev/kvm ]] || {
        say "/dev/kvm is missing or not read-writable"
        return 1
    }
    # The subshell keeps bash's own "Aborted" job report out of the output.
    (timeout 3 "$QEMU_X86_64" -accel kvm,kernel-irqchip=split -machine q35 -cpu "$cpu" \
        -smp 1 -m 64M -display none -serial none -monitor none -no-reboot -S \
        </dev/null >"$TMP/kvm-probe" 2>&1; exit $?) 2>/dev/null || status=$?
    ((status == 124)) && return 0
    say "KVM probe with -cpu $cpu exited with status $status: $(grep -m1 -i 'error\|fail' "$TMP/kvm-probe" || head -n1 "$TMP/kvm-probe")"
    return 1
}

x86_64_main() {
    ensure_qemu "$QEMU_X86_64"
    TMP="$(mktemp -d "${TMPDIR:-/tmp}/qemu.sh.XXXXXX")"
    trap 'rm -rf "$TMP"' EXIT
    local accel
    if [[ "$OPT_ACCEL" =~ ^kvm(,|$) ]]; then
        # KVM here works only with an in-kernel (or split) irqchip.
        [[ "$OPT_ACCEL" == *kernel-irqchip=* ]] || OPT_ACCEL+=",kernel-irqchip=split"
        if ! x86_64_kvm_usable "$OPT_CPU"; then
            say "FAIL (--accel kvm is not usable here; use the default TCG, or try --cpu qemu64)"
            return 2
        fi
    fi
    accel="$(pick_accel "$OPT_ACCEL" "$OPT_SMP")"
    probe_qemu "$QEMU_X86_64" "q35${OPT_MACHINE_OPTS:+,$OPT_MACHINE_OPTS}" "$accel"
    check_log
    check_only "$accel"
    if ((OPT_BUILD)); then
        ensure_rust_target "$X86_64_TARGET"
        local -a cmd=(cargo build --release --target "$X86_64_TARGET" --bin "$KERNEL_BIN")
        say "building: ${cmd[*]}"
        (cd "$ROOT" && "${cmd[@]}") || {
            say "FAIL (cargo build failed)"
            return 1
        }
    fi
    local target_dir="${CARGO_TARGET_DIR:-target}"
    [[ "$target_dir" == /* ]] || target_dir="$ROOT/$target_dir"
    local image="$target_dir/$X86_64_TARGET/release/$KERNEL_BIN"
    [[ -f "$image" ]] || {
        say "FAIL (kernel image $image not found; drop --no-build)"
        return 2
    }
    # shellcheck disable=SC2054 # the commas belong to QEMU option values
    local -a qemu=(
        "$QEMU_X86_64"
        -machine "q35${OPT_MACHINE_OPTS:+,$OPT_MACHINE_OPTS}"
        -cpu "$OPT_CPU"
        -smp "$OPT_SMP"
        -m 256M
        -accel "$accel"
        -display none -serial stdio -monitor none
        -device isa-debug-exit,iobase=0xf4,iosize=0x04
        -no-reboot
        -kernel "$image"
    )
    if [[ -n "$OPT_APPEND" ]]; then qemu+=(-append "$OPT_APPEND"); fi
    local -a logs=("$TMP/serial")
    if [[ -n "$OPT_LOG" ]]; then logs+=("$OPT_LOG"); fi
    say "$(shell_quote "${qemu[@]}")"
    run_qemu "${logs[@]}" -- "${qemu[@]}"
    local status="$QEMU_STATUS"
    if ((TIMED_OUT == 0)); then
        if [[ "$QEMU_STATUS" == "$X86_64_SUCCESS_STATUS" ]]; then
            status=0
        elif [[ "$QEMU_STATUS" == 0 ]]; then
            say "QEMU exited 0: not the isa-debug-exit success code (a triple fault under -no-reboot exits 0)"
            status=1
        fi
    fi
    ktap_verdict "$TMP/serial" "$status" "$TIMED_OUT" "$TMP/stderr" "$ELAPSED"
}

# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------

# set_option OPTION VALUE
set_option() {
    case "$1" in
        --arch) OPT_ARCH="$2" ;;
        --smp) OPT_SMP="$2" ;;
        --cpu) OPT_CPU="$2" ;;
        --machine-opts) OPT_MACHINE_OPTS="$2" ;;
        --accel) OPT_ACCEL="$2" ;;
        --timeout) OPT_TIMEOUT="$2" ;;
        --log) OPT_LOG="$2" ;;
    esac
}

parse_args() {
    OPT_ARCH=aarch64
    OPT_SMP=4
    OPT_CPU=max
    OPT_MACHINE_OPTS=""
    OPT_ACCEL=tcg
    OPT_TIMEOUT=300
    OPT_BUILD=1
    OPT_LOG=""
    OPT_APPEND=""
    OPT_CHECK=0
    local -a bootargs=() before=()
    while (($# > 0)); do
        case "$1" in
            -h | --help)
                usage
                exit 0
                ;;
            --no-build) OPT_BUILD=0 ;;
            --check) OPT_CHECK=1 ;;
            --bench)
                # The benchmark sweep is its own driver; it boots through this script.
                # The options before --bench are its options too (it refuses those
                # that are not).
                shift
                exec bash "$ROOT/tools/bench.sh" "${before[@]}" "$@"
                ;;
            --arch | --smp | --cpu | --machine-opts | --accel | --timeout | --log)
                (($# >= 2)) || usage_error "option $1 needs a value"
                # "--log --no-build" is a forgotten value, not a file named --no-build.
                [[ "$2" != -* ]] || usage_error "option $1 needs a value, got the option '$2' (write $1=$2 if that is the value)"
                set_option "$1" "$2"
                before+=("$1" "$2")
                shift
                ;;
            --arch=* | --smp=* | --cpu=* | --machine-opts=* | --accel=* | --timeout=* | --log=*)
                set_option "${1%%=*}" "${1#*=}"
                ;;
            --)
                shift
                bootargs=("$@")
                break
                ;;
            *) usage_error "unknown argument: $1" ;;
        esac
        [[ "$1" == --no-build ]] && before+=("$1")
        shift
    done
    OPT_APPEND="${bootargs[*]}"

    local smp_max smp_why
    read -r smp_max smp_why <<<"$(arch_max_smp "$OPT_ARCH" why)"
    OPT_SMP="$(check_count --smp "$OPT_SMP" 1 "$smp_max" "$smp_why")" || exit 2
    OPT_TIMEOUT="$(check_count --timeout "$OPT_TIMEOUT" 1 "$MAX_TIMEOUT")" || exit 2
    [[ -n "$OPT_CPU" ]] || usage_error "--cpu needs a CPU model"
    [[ -n "$OPT_ACCEL" ]] || usage_error "--accel needs an accelerator"
    if [[ -n "$OPT_LOG" && "$OPT_LOG" == */ ]]; then
        usage_error "--log needs a file, got the directory '$OPT_LOG'"
    fi
    case "$OPT_ARCH" in
        aarch64) ;;
        x86_64)
            # The x86_64 boot has its own flow (x86_64_main below), so that the
            # aarch64 one stays as it is; everything it needs is parsed by now.
            x86_64_main
            exit $?
            ;;
        *) usage_error "unknown --arch '$OPT_ARCH' (aarch64 or x86_64)" ;;
    esac
}

main() {
    parse_args "$@"

    ensure_qemu "$QEMU_AARCH64"
    TMP="$(mktemp -d "${TMPDIR:-/tmp}/qemu.sh.XXXXXX")"
    trap 'rm -rf "$TMP"' EXIT
    local machine="virt,gic-version=3${OPT_MACHINE_OPTS:+,$OPT_MACHINE_OPTS}"
    local accel
    accel="$(pick_accel "$OPT_ACCEL" "$OPT_SMP")"
    probe_qemu "$QEMU_AARCH64" "$machine" "$accel"
    check_log
    check_only "$accel"
    if ((OPT_BUILD)); then
        ensure_rust_target "$KERNEL_TARGET"
        build_kernel
    fi
    local image
    image="$(kernel_image)"
    if [[ ! -f "$image" ]]; then
        say "FAIL (kernel image $image not found; build it with: cargo build --release --target $KERNEL_TARGET --bin $KERNEL_BIN, or drop --no-build)"
        exit 2
    fi

    # shellcheck disable=SC2054 # the commas belong to QEMU option values
    local -a qemu=(
        "$QEMU_AARCH64"
        -machine "$machine"
        -cpu "$OPT_CPU"
        -smp "$OPT_SMP"
        -m 256M
        -accel "$accel"
        -display none -serial stdio -monitor none
        -semihosting-config enable=on,target=native
        -no-reboot
        -kernel "$image"
    )
    if [[ -n "$OPT_APPEND" ]]; then qemu+=(-append "$OPT_APPEND"); fi

    local -a logs=("$TMP/serial")
    if [[ -n "$OPT_LOG" ]]; then logs+=("$OPT_LOG"); fi

    say "$(shell_quote "${qemu[@]}")"

    run_qemu "${logs[@]}" -- "${qemu[@]}"
    ktap_verdict "$TMP/serial" "$QEMU_STATUS" "$TIMED_OUT" "$TMP/stderr" "$ELAPSED"
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    main "$@"
fi
