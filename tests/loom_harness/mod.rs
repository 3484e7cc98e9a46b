//! The loom runner shared by `tests/loom_stop.rs` and `tests/loom_context.rs`: runs one
//! model with some `weaken` knobs on, counts and prints the interleavings explored, and
//! keeps the first failure loom found (a weakened twin must have one).

use patch_machine::sync::weaken::{self, Knob};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::AtomicUsize as StdUsize;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Knob changes and loom runs are one at a time: the knobs are process-wide.
static SERIAL: Mutex<()> = Mutex::new(());

/// The last panic message, caught by the hook `run` installs for a weakened model.
static LAST_PANIC: Mutex<String> = Mutex::new(String::new());

/// Runs model `name` under loom with `knobs` on; prints the interleavings explored.
/// Returns loom's failure message, if it found one.
pub fn run(
    name: &str,
    knobs: &[Knob],
    preemption_bound: usize,
    model: impl Fn() + Sync + Send + 'static,
) -> Result<usize, String> {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    weaken::set(knobs);
    let executions = Arc::new(StdUsize::new(0));
    let counted = executions.clone();
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = Some(preemption_bound);
    builder.max_branches = 100_000;
    let start = Instant::now();
    // Keep the first panic's message (loom re-panics with its own afterwards).
    let previous_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|info| {
        let payload = info.payload();
        let message = payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        let mut last = LAST_PANIC.lock().unwrap_or_else(|e| e.into_inner());
        // Loom's coroutines unwind with empty panics of their own: not the finding.
        if last.is_empty() && !message.is_empty() {
            *last = format!(
                "{message} (at {})",
                info.location().map_or(String::new(), |l| l.to_string())
            );
        }
    }));
    LAST_PANIC.lock().unwrap_or_else(|e| e.into_inner()).clear();
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        builder.check(move || {
            counted.fetch_add(1, SeqCst);
            model();
        })
    }));
    std::panic::set_hook(previous_hook);
    weaken::set(&[]);
    let executions = executions.load(SeqCst);
    let seconds = start.elapsed().as_secs_f64();
    match outcome {
        Ok(()) => {
            println!(
                "# loom {name}: {executions} interleavings explored, none failed \
                 (preemption bound {preemption_bound}, {seconds:.2} s)"
            );
            Ok(executions)
        }
        Err(_) => {
            let message = LAST_PANIC.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let first_line = message.lines().next().unwrap_or("").to_string();
            println!(
                "# loom {name} with {knobs:?}: failure found in interleaving {executions} \
                 ({seconds:.2} s): {first_line}"
            );
            Err(first_line)
        }
    }
}

/// A model that must pass.
pub fn check(name: &str, preemption_bound: usize, model: impl Fn() + Sync + Send + 'static) {
    run(name, &[], preemption_bound, model).unwrap_or_else(|message| {
        panic!("loom found a failure in {name}: {message}");
    });
}

/// The weakened twin of a model: loom must find a failure with `knobs` on.
pub fn must_fail(
    name: &str,
    knobs: &[Knob],
    preemption_bound: usize,
    model: impl Fn() + Sync + Send + 'static,
) {
    assert!(!knobs.is_empty());
    match run(name, knobs, preemption_bound, model) {
        Ok(executions) => panic!(
            "{name} with {knobs:?}: loom explored {executions} interleavings and found \
             nothing, so the model cannot tell the weakened core from the real one"
        ),
        // Loom's own limit is no finding about the core.
        Err(message) if message.contains("maximum number of branches") => {
            panic!("{name} with {knobs:?}: loom hit its branch limit, no bug found: {message}")
        }
        Err(_) => {}
    }
}
