//! `./qemu.sh` and `./qemu.sh --bench` (tools/bench.sh) over a table of bad input: each
//! is refused with its exit status (2: usage or setup error) and a message naming the
//! value and the limit, before anything is built, booted or deleted. Every run uses
//! `--no-build` and a target directory of its own with no kernel image, so a case that
//! got past the checks would stop at "kernel image ... not found" (or, in the bench
//! cases, delete the planted old log) and fail the table.
//!
//! The checks that ask QEMU (CPU model, machine options) need qemu-system-aarch64 and
//! qemu-system-x86_64; one case runs a stand-in QEMU that reports "KVM internal error"
//! and hangs, as QEMU does, and wants the run ended at once with that line.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A fresh directory under target/tmp/qemu-sh-args.
fn scratch(name: &str) -> PathBuf {
    let dir = root().join("target/tmp/qemu-sh-args").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs `./qemu.sh ARGS` with `CARGO_TARGET_DIR=target_dir` and `path_prefix` first in
/// PATH, if any.
fn qemu_sh(args: &[&str], target_dir: &Path, path_prefix: Option<&Path>) -> Output {
    let mut command = Command::new(root().join("qemu.sh"));
    command
        .args(args)
        .current_dir(root())
        .env("CARGO_TARGET_DIR", target_dir);
    if let Some(prefix) = path_prefix {
        let path = std::env::var("PATH").unwrap_or_default();
        command.env("PATH", format!("{}:{path}", prefix.display()));
    }
    command.output().expect("run ./qemu.sh")
}

/// One bad input: the arguments, the exit status and a piece of the message.
struct Case {
    args: &'static [&'static str],
    status: i32,
    says: &'static str,
}

const fn case(args: &'static [&'static str], status: i32, says: &'static str) -> Case {
    Case { args, status, says }
}

/// Runs every case and reports all that did not hold.
fn check_table(name: &str, table: &[Case], planted_log: bool) {
    let mut wrong = Vec::new();
    for (i, c) in table.iter().enumerate() {
        let target_dir = scratch(&format!("{name}-{i}"));
        let old_log = target_dir.join("bench/logs/old.log");
        if planted_log {
            std::fs::create_dir_all(old_log.parent().unwrap()).unwrap();
            std::fs::write(&old_log, "an earlier sweep's log\n").unwrap();
        }
        let mut args = vec!["--no-build"];
        args.extend_from_slice(c.args);
        let out = qemu_sh(&args, &target_dir, None);
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let mut problems = Vec::new();
        if out.status.code() != Some(c.status) {
            problems.push(format!(
                "exit status {:?}, not {}",
                out.status.code(),
                c.status
            ));
        }
        if !said.contains(c.says) {
            problems.push(format!("no {:?} in the output", c.says));
        }
        for never in [
            "unbound variable",
            "building:",
            "not found; drop --no-build",
        ] {
            if said.contains(never) {
                problems.push(format!("the output has {never:?}"));
            }
        }
        if planted_log && !old_log.exists() {
            problems.push("the old bench log was deleted".into());
        }
        if !problems.is_empty() {
            wrong.push(format!(
                "./qemu.sh {}: {}\n--- output ---\n{}",
                args.join(" "),
                problems.join("; "),
                said.trim_end()
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n\n"));
}

/// Refused by the argument parser itself: no QEMU is started.
#[test]
fn bad_options_are_refused_before_anything_runs() {
    check_table(
        "options",
        &[
            case(
                &["--smp", "513"],
                2,
                "--smp 513 is out of range (min 1, max 512",
            ),
            case(
                &["--smp", "1024"],
                2,
                "--smp 1024 is out of range (min 1, max 512",
            ),
            case(
                &["--smp", "18446744073709551620"],
                2,
                "--smp 18446744073709551620 is out of range (min 1, max 512",
            ),
            case(
                &["--smp", "0"],
                2,
                "--smp 0 is out of range (min 1, max 512",
            ),
            case(
                &["--smp", "4x"],
                2,
                "--smp takes a number from 1 to 512, got '4x'",
            ),
            case(
                &["--arch", "x86_64", "--smp", "600"],
                2,
                "--smp 600 is out of range (min 1, max 512",
            ),
            case(&["--smp=513"], 2, "--smp 513 is out of range"),
            case(
                &["--timeout", "0"],
                2,
                "--timeout 0 is out of range (min 1, max 86400)",
            ),
            case(
                &["--timeout", "99999999999999999999"],
                2,
                "--timeout 99999999999999999999 is out of range (min 1, max 86400)",
            ),
            case(
                &["--log", "--check"],
                2,
                "option --log needs a value, got the option '--check'",
            ),
            case(
                &["--cpu", "--smp", "2"],
                2,
                "option --cpu needs a value, got the option '--smp'",
            ),
            case(&["--smp"], 2, "option --smp needs a value"),
            case(
                &["--log", "logs/"],
                2,
                "--log needs a file, got the directory 'logs/'",
            ),
            case(
                &["--arch", "riscv64"],
                2,
                "unknown --arch 'riscv64' (aarch64 or x86_64)",
            ),
            case(&["--frobnicate"], 2, "unknown argument: --frobnicate"),
        ],
        false,
    );
}

/// Refused before the old logs are deleted: `--bench`'s own options and the ones
/// given before `--bench`.
#[test]
fn bad_bench_options_are_refused_before_the_old_logs_go() {
    require_qemu();
    check_table(
        "bench",
        &[
            case(&["--bench", "--arch"], 2, "option --arch needs a value"),
            case(&["--bench", "--arch", "sparc"], 2, "unknown --arch 'sparc'"),
            case(
                &["--bench", "--cpus", "0"],
                2,
                "--cpus 0 is out of range (min 1, max 512",
            ),
            case(
                &["--bench", "--cpus", "2 513"],
                2,
                "--cpus 513 is out of range (min 1, max 512",
            ),
            case(
                &["--bench", "--cpus", "99999999999999999999"],
                2,
                "--cpus 99999999999999999999 is out of range",
            ),
            case(
                &["--bench", "--cpus", " "],
                2,
                "--cpus needs CPU counts from 1 to 512, got none",
            ),
            case(
                &["--bench", "--cpus", "two"],
                2,
                "--cpus takes CPU counts from 1 to 512, got 'two'",
            ),
            case(
                &["--bench", "--cpu", "--no-build"],
                2,
                "option --cpu needs a value, got the option '--no-build'",
            ),
            case(
                &["--smp", "2", "--bench"],
                2,
                "--smp is not a --bench option",
            ),
            case(
                &["--bench", "--timeout", "9"],
                2,
                "--timeout is not a --bench option",
            ),
            case(
                &["--cpu", "cortex-a15", "--bench"],
                2,
                "--cpu cortex-a15 is a 32-bit (AArch32-only) CPU model",
            ),
            case(
                &["--bench", "--arch", "x86_64", "--cpu", "no-such-cpu"],
                2,
                "unable to find CPU model 'no-such-cpu'",
            ),
        ],
        true,
    );
}

/// Refused after asking QEMU (a fraction of a second, paused), before any build.
#[test]
fn setups_qemu_refuses_are_usage_errors() {
    require_qemu();
    check_table(
        "qemu",
        &[
            case(
                &["--cpu", "cortex-a15"],
                2,
                "--cpu cortex-a15 is a 32-bit (AArch32-only) CPU model and the kernel is AArch64",
            ),
            case(
                &["--cpu", "no-such-cpu"],
                2,
                "unable to find CPU model 'no-such-cpu'",
            ),
            case(
                &["--arch", "x86_64", "--cpu", "no-such-cpu"],
                2,
                "unable to find CPU model 'no-such-cpu'",
            ),
            case(
                &["--machine-opts", "no_such_option=1"],
                2,
                "QEMU refuses -machine virt",
            ),
            case(
                &["--log", "Cargo.toml/serial.log"],
                2,
                "'Cargo.toml' is not a directory",
            ),
            case(
                &["--log", "/proc/no-such-dir/serial.log"],
                2,
                "cannot create the --log directory '/proc/no-such-dir'",
            ),
            // Past every check, the missing image is the setup error.
            case(&[], 2, "not found; build it with"),
            case(&["--check"], 0, "OK (aarch64: QEMU accepts -cpu max -smp 4"),
            case(
                &["--arch", "x86_64", "--check"],
                0,
                "OK (x86_64: QEMU accepts -cpu max",
            ),
        ],
        false,
    );
}

/// A QEMU that reports "KVM internal error" and then waits (as KVM's paused VM does)
/// ends the run at once, with QEMU's line in the verdict.
#[test]
fn a_fatal_qemu_error_ends_the_run_at_once() {
    let dir = scratch("fatal");
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let fake = bin.join("qemu-system-aarch64");
    std::fs::write(
        &fake,
        "#!/bin/sh\n\
         # The probe (-S): answer as an AArch64 CPU would, and quit.\n\
         for a in \"$@\"; do [ \"$a\" = -S ] && { cat >/dev/null; echo ' PC=0000000000000000 X00=0'; exit 0; }; done\n\
         echo 'KTAP version 1'\n\
         echo '1..1'\n\
         echo 'KVM internal error. Suberror: 1' >&2\n\
         echo 'extra data[0]: 0x0000000000000000' >&2\n\
         exec sleep 90\n",
    )
    .unwrap();
    let mut permissions = std::fs::metadata(&fake).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut permissions, 0o755);
    std::fs::set_permissions(&fake, permissions).unwrap();
    let image = dir.join("target/aarch64-unknown-none/release/patch-machine");
    std::fs::create_dir_all(image.parent().unwrap()).unwrap();
    std::fs::write(&image, "").unwrap();

    let start = Instant::now();
    let out = qemu_sh(
        &["--no-build", "--timeout", "60"],
        &dir.join("target"),
        Some(&bin),
    );
    let took = start.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.code() == Some(1)
            && stderr.contains("FAIL (QEMU stopped after")
            && stderr.contains("with a fatal error: KVM internal error. Suberror: 1")
            && took < Duration::from_secs(30),
        "wanted exit status 1 at once with the KVM line in the verdict; got {:?} after {took:?}:\n{stderr}",
        out.status.code()
    );
}

fn require_qemu() {
    for qemu in ["qemu-system-aarch64", "qemu-system-x86_64"] {
        support::ensure_installed(qemu).unwrap_or_else(|e| panic!("{e}"));
    }
}
