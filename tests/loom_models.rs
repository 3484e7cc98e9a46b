//! Runs the loom model checks (`tests/loom_stop.rs`: the rendezvous and `patch_machine`;
//! `tests/loom_context.rs`: the context-tracking protocol of isolated CPUs) from the plain
//! `cargo test`, in one nested `cargo test` (one build): a build of its own, with `RUSTFLAGS="--cfg loom"` (which swaps the stop core's atomics for
//! loom's, `src/sync.rs`) in `target/loom`, so it neither rebuilds nor disturbs the
//! normal one. Fails if any model fails, or if a weakened model's bug is not found;
//! prints every model's count of interleavings explored.
//!
//! By hand: `RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom cargo test --release
//! --test loom_stop --test loom_context -- --nocapture --test-threads=1`.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

#[test]
fn loom_models_of_the_rendezvous_and_patch_machine() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let start = Instant::now();
    let output = Command::new(cargo)
        .args([
            "test",
            "--release",
            "--test",
            "loom_stop",
            "--test",
            "loom_context",
            "--",
        ])
        // One model at a time: the weakening knobs are process-wide (the models also
        // serialise themselves), and the machine has two cores for everyone.
        .args(["--nocapture", "--test-threads=1"])
        .current_dir(root)
        .env("RUSTFLAGS", "--cfg loom")
        // Takes precedence over RUSTFLAGS where an outer cargo set it.
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env("CARGO_TARGET_DIR", root.join("target/loom"))
        .output()
        .expect("cannot run cargo for the loom models");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let report: Vec<&str> = stdout
        .lines()
        .filter_map(|line| line.find("# loom ").map(|at| &line[at..]))
        .collect();
    for line in &report {
        println!("{line}");
    }
    println!(
        "# loom: {} model runs in {:.1} s (build included)",
        report.len(),
        start.elapsed().as_secs_f64()
    );
    let tail = |text: &str| {
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    };
    assert!(
        output.status.success(),
        "the loom models failed ({}); rerun: RUSTFLAGS=\"--cfg loom\" \
         CARGO_TARGET_DIR=target/loom cargo test --release --test loom_stop --test loom_context \
         -- --nocapture --test-threads=1\n--- stdout ---\n{}\n--- stderr ---\n{}",
        output.status,
        tail(&stdout),
        tail(&stderr)
    );
    // The context-tracking models (tests/loom_context.rs) ran and passed too.
    for model in [
        "entry_vs_live_patch",
        "exit_vs_live_patch",
        "deferred_entry_vs_stop",
        "exit_vs_stop",
    ] {
        assert!(
            report
                .iter()
                .any(|line| line.starts_with(&format!("# loom {model} "))
                    && line.contains("none failed")),
            "the context model {model} did not run and pass:\n{}",
            tail(&stdout)
        );
    }
    assert!(
        stdout.contains("test result: ok") && !report.is_empty(),
        "the loom run reported no models:\n{}",
        tail(&stdout)
    );
}
