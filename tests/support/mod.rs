//! What the tests that build, boot or disassemble the kernel need from the machine:
//! installed the way `./qemu.sh` installs it, or named with the command that does.
//!
//! - The bare-metal Rust targets. rustup adds `rust-toolchain.toml`'s `targets` only
//!   when it installs the toolchain, so on a machine whose toolchain was already
//!   there `cargo build --target x86_64-unknown-none` fails with "can't find crate for
//!   `core`". [`ensure_rust_target`] runs `rustup target add` (no root needed).
//! - QEMU and the aarch64 binutils. [`ensure_installed`] runs `.ci/install-qemu.sh`
//!   when the tests run as root, as `./qemu.sh` does, and otherwise fails with
//!   `sudo bash .ci/install-qemu.sh`.
//!
//! Each test crate that uses it has its own copy (`mod support;`) and uses part of it.
#![allow(dead_code)]

use std::ffi::OsString;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard, OnceLock};

/// Test threads share one toolchain and one apt: one install at a time.
static INSTALLING: Mutex<()> = Mutex::new(());
/// The outcome of the one `.ci/install-qemu.sh` run of this test binary.
static INSTALL_SCRIPT: OnceLock<Result<(), String>> = OnceLock::new();

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn one_at_a_time() -> MutexGuard<'static, ()> {
    INSTALLING.lock().unwrap_or_else(|e| e.into_inner())
}

/// `program` exists (it may still fail on `--version`).
fn exists(program: &str) -> bool {
    !matches!(
        Command::new(program).arg("--version").output(),
        Err(e) if e.kind() == ErrorKind::NotFound
    )
}

/// The sysroot of the rustc that `cargo build` in the repository uses (the one
/// `rust-toolchain.toml` pins, or `$RUSTC`).
fn sysroot() -> Result<PathBuf, String> {
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| OsString::from("rustc"));
    let out = Command::new(&rustc)
        .args(["--print", "sysroot"])
        .current_dir(root())
        .output()
        .map_err(|e| format!("cannot run `{} --print sysroot`: {e}", rustc.display()))?;
    if !out.status.success() {
        return Err(format!(
            "`{} --print sysroot` failed ({}): {}",
            rustc.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

fn target_installed(sysroot: &Path, target: &str) -> bool {
    sysroot
        .join("lib/rustlib")
        .join(target)
        .join("lib")
        .is_dir()
}

/// Makes sure the toolchain has `target`'s standard library, adding it with
/// `rustup target add` (run in the repository, so for the pinned toolchain) when
/// it is missing. The error says what failed and the command that fixes it.
pub fn ensure_rust_target(target: &str) -> Result<(), String> {
    let _one = one_at_a_time();
    let sysroot = sysroot()?;
    if target_installed(&sysroot, target) {
        return Ok(());
    }
    let fix = format!("cd {} && rustup target add {target}", root().display());
    if !exists("rustup") {
        return Err(format!(
            "the Rust toolchain at {} has no standard library for {target}, and there is \
             no rustup to add it; with rustup: {fix}",
            sysroot.display()
        ));
    }
    eprintln!("support: rust target {target} missing; running: rustup target add {target}");
    let status = Command::new("rustup")
        .args(["target", "add", target])
        .current_dir(root())
        .status()
        .map_err(|e| format!("cannot run `rustup target add {target}`: {e}; run: {fix}"))?;
    if !status.success() || !target_installed(&sysroot, target) {
        return Err(format!(
            "`rustup target add {target}` failed ({status}); run it yourself: {fix}"
        ));
    }
    Ok(())
}

fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|out| out.status.success() && out.stdout.trim_ascii() == b"0")
}

/// Makes sure `program`, one of those `.ci/install-qemu.sh` installs (QEMU's
/// `qemu-system-*`, binutils' `aarch64-linux-gnu-*`), exists: as root, runs the
/// script once (as `./qemu.sh` does); otherwise the error names the command.
pub fn ensure_installed(program: &str) -> Result<(), String> {
    let _one = one_at_a_time();
    if exists(program) {
        return Ok(());
    }
    let script = root().join(".ci/install-qemu.sh");
    if !running_as_root() {
        return Err(format!(
            "{program} not found; install it with: sudo bash {}",
            script.display()
        ));
    }
    INSTALL_SCRIPT
        .get_or_init(|| {
            eprintln!(
                "support: {program} not found; installing it: bash {}",
                script.display()
            );
            let status = Command::new("bash")
                .arg(&script)
                .stdin(std::process::Stdio::null())
                .status()
                .map_err(|e| format!("cannot run `bash {}`: {e}", script.display()))?;
            if status.success() {
                Ok(())
            } else {
                Err(format!("`bash {}` failed ({status})", script.display()))
            }
        })
        .clone()?;
    if exists(program) {
        Ok(())
    } else {
        Err(format!(
            "{program} not found, and `bash {}` (as root) did not install it",
            script.display()
        ))
    }
}
