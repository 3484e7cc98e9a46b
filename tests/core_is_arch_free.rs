//! The stop-machine core is arch-free: this test crate compiles `src/stop` and
//! `src/cpuset.rs` on their own, in a crate that has no `arch` module, no kernel and no
//! platform, and drives the core through an `Arch` written here from nothing.
//!
//! If the core ever names `crate::arch`, an architecture's register or instruction, or
//! anything else outside `CpuSet`/`MAX_CPUS`, this file stops compiling; the text checks
//! below catch what would still compile on the host (inline assembly, `target_arch`
//! conditions).

#![allow(dead_code)]
// As in the library (src/lib.rs): a stop-machine failure carries one code per CPU.
#![allow(clippy::result_large_err, clippy::large_enum_variant)]

#[path = "../src/cpuset.rs"]
mod cpuset;
// `pub`: the core's re-exports (CallProfile, Quiescence, ...) are its API, used or not.
#[path = "../src/stop/mod.rs"]
pub mod stop;

pub use cpuset::{CpuSet, MAX_CPUS};

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;
use stop::{Arch, StopMachine, StopOptions};

/// The smallest machine there is: one CPU, masking tracked in a flag.
struct OneCpu {
    masked: AtomicBool,
    syncs: AtomicU64,
    start: Instant,
}

// SAFETY: one CPU, index 0, always online; `mask_all` sets the flag `all_masked` reports
// until `restore`; there are no other CPUs to send stop IPIs to; `sync_context` is
// counted (nothing to synchronise on the host).
unsafe impl Arch for OneCpu {
    type MaskState = bool;

    fn cpu_id(&self) -> usize {
        0
    }

    fn online_cpus(&self) -> CpuSet {
        CpuSet::single(0)
    }

    fn mask_all(&self) -> bool {
        self.masked.swap(true, Ordering::Relaxed)
    }

    fn restore(&self, saved: bool) {
        self.masked.store(saved, Ordering::Relaxed);
    }

    fn all_masked(&self) -> bool {
        self.masked.load(Ordering::Relaxed)
    }

    fn send_stop_ipi(&self, targets: CpuSet) {
        assert!(targets.is_empty(), "one CPU: nobody to interrupt");
    }

    fn sync_context(&self) {
        self.syncs.fetch_add(1, Ordering::Relaxed);
    }

    fn relax(&self) {
        std::hint::spin_loop();
    }

    fn now_ns(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    fn call_context(&self) -> stop::CallContext {
        if self.masked.load(Ordering::Relaxed) {
            stop::CallContext::IrqsMasked
        } else {
            stop::CallContext::Normal
        }
    }
}

#[cfg(feature = "stop-machine-nmi")]
// SAFETY: never called by the test below (no stop_machine_nmi call).
unsafe impl stop::NmiArch for OneCpu {
    fn send_self_nmi(&self) {
        unreachable!("this test makes no NMI-mode call");
    }
}

#[test]
fn the_core_runs_on_an_arch_defined_from_nothing() {
    let machine = StopMachine::new(OneCpu {
        masked: AtomicBool::new(false),
        syncs: AtomicU64::new(0),
        start: Instant::now(),
    });
    let masked_inside = AtomicBool::new(false);
    let result = machine.stop_machine(
        &|cpu| {
            assert_eq!(cpu, 0);
            masked_inside.store(machine.arch().all_masked(), Ordering::Relaxed);
            Ok(())
        },
        CpuSet::single(0),
        StopOptions::DEFAULT,
    );
    assert_eq!(result, Ok(()));
    assert!(
        masked_inside.load(Ordering::Relaxed),
        "the function ran unmasked"
    );
    assert!(!machine.arch().all_masked(), "the mask was not restored");
    assert!(
        machine.arch().syncs.load(Ordering::Relaxed) >= 1,
        "no context synchronisation before leaving"
    );
}

#[test]
fn the_core_source_names_no_architecture() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/src/stop");
    let mut checked = 0;
    for entry in std::fs::read_dir(dir).expect("src/stop") {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        for (number, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            for banned in [
                "asm!",
                "target_arch",
                "crate::arch",
                "aarch64",
                "x86_64",
                "global_asm",
            ] {
                assert!(
                    !code.contains(banned),
                    "{}:{}: the arch-free core mentions `{banned}`: {line}",
                    path.display(),
                    number + 1
                );
            }
        }
        checked += 1;
    }
    assert!(checked >= 2, "found only {checked} source files in {dir}");
}
