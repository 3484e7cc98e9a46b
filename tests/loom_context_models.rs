//! Runs the loom model of the context-tracking protocol (`tests/loom_context.rs`) from the
//! plain `cargo test`: a release build with `RUSTFLAGS="--cfg loom"`, in a target
//! directory of its own so that it never rebuilds the normal one. The models and their
//! weakened twins (which must be found failing) are that file's tests.

use std::process::Command;

#[test]
fn loom_context_models_pass_and_their_twins_fail() {
    let root = env!("CARGO_MANIFEST_DIR");
    let output = Command::new(env!("CARGO"))
        .args(["test", "--release", "--test", "loom_context"])
        .current_dir(root)
        .env("RUSTFLAGS", "--cfg loom")
        .env("CARGO_TARGET_DIR", format!("{root}/target/loom"))
        .output()
        .expect("running cargo for the loom model");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the loom model of src/stop/context.rs failed:\n{stdout}\n{stderr}"
    );
    for model in [
        "entry_vs_patch_is_never_stale",
        "exit_vs_patch_is_never_stale",
        "deferred_entry_waits_out_the_stop",
        "load_then_store_deferral_is_found_stale",
        "entry_that_does_not_wait_out_the_stop_is_found_torn",
    ] {
        let passed = stdout
            .lines()
            .any(|line| line.starts_with(&format!("test {model} ")) && line.ends_with("... ok"));
        assert!(passed, "model {model} did not run and pass:\n{stdout}");
    }
}
