//! This port's alternatives ([`crate::patch::alternatives`], applied through
//! [`KernelAlternatives`]): the feature reader and instruction-stream sync it hands
//! over, the paths with sites, and the benchmark sites.

use super::{Aarch64, STOP, atomic, cpu, layout, text::KERNEL_TEXT};
use crate::arch::kernel_alternatives::KernelAlternatives;
use crate::patch::alternatives::{AltPath, Alternatives, MAX_SITE_LEN, MAX_SITES};
use crate::patch::insn::NOP;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// Words one table may rewrite at most.
const SCRATCH_LEN: usize = MAX_SITES * MAX_SITE_LEN / 4;

/// The kernel's alternatives.
pub static ALTERNATIVES: KernelAlternatives<Aarch64, SCRATCH_LEN> = KernelAlternatives::new(
    Alternatives::new(&KERNEL_TEXT, &cpu::FEATURE_NAMES, cpu::FEATURE_BENCH, NOP),
    &STOP,
    cpu::features,
    layout::nopatch_range,
    cpu::isb,
);

/// Sites in [`run_bench_sites`].
pub const BENCH_SITES: u64 = 8;

/// [`BENCH_SITES`] benchmark sites (`add x0, x0, #0`, or `#1` with
/// [`cpu::FEATURE_BENCH`]): returns how many hold their replacement. Only the
/// self-tests and the benchmark call it, on the boot CPU.
#[inline(never)]
pub fn run_bench_sites() -> u64 {
    let mut count = 0u64;
    macro_rules! site {
        () => {
            // SAFETY: arithmetic on x0 only.
            unsafe {
                alternative!(runtime,
                    orig: "add x0, x0, #0",
                    repl: "add x0, x0, #1",
                    feature: cpu::FEATURE_BENCH,
                    inout("x0") count,
                    options(nomem, nostack, preserves_flags)
                )
            }
        };
    }
    site!();
    site!();
    site!();
    site!();
    site!();
    site!();
    site!();
    site!();
    count
}

fn lse_counter_nopatch() -> Result<(), &'static str> {
    let counter = AtomicU64::new(u64::MAX - 3);
    atomic::add_relaxed_nopatch(&counter, 1);
    atomic::add_relaxed_nopatch(&counter, 2);
    match counter.load(Ordering::Relaxed) {
        u64::MAX => Ok(()),
        _ => Err("add_relaxed_nopatch: (2^64 - 4) + 1 + 2 is not 2^64 - 1"),
    }
}

fn lse_counter_release() -> Result<(), &'static str> {
    let counter = AtomicU32::new(40);
    atomic::add_release(&counter, 2);
    match counter.load(Ordering::Relaxed) {
        42 => Ok(()),
        _ => Err("add_release: 40 + 2 is not 42"),
    }
}

fn bench_sites() -> Result<(), &'static str> {
    match run_bench_sites() {
        0 => Ok(()),
        _ => Err("bench_sites: a site holds `add x0, x0, #1` with the bench feature off"),
    }
}

/// The kernel paths with alternative sites, each with a check of its result.
pub const PATHS: [AltPath; 3] = [
    AltPath {
        name: "SGI counter (boot, STADD with LSE, else LDXR/STXR)",
        run: lse_counter_nopatch,
    },
    AltPath {
        name: "job-done counter (runtime, STADDL with LSE, else LDXR/STLXR)",
        run: lse_counter_release,
    },
    AltPath {
        name: "bench sites (runtime, add #1 only while benchmarking)",
        run: bench_sites,
    },
];

/// Runtime sites the benchmark flips, and how many of them hold their replacement now.
pub fn bench_sites_applied() -> (u64, u64) {
    (BENCH_SITES, run_bench_sites())
}
