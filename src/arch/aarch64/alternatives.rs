//! Applying the alternatives tables ([`crate::patch::alternatives`]): the boot table on
//! the boot CPU before any secondary starts ([`apply_boot`]), the runtime table
//! through `patch_machine` once every CPU is online ([`apply_runtime`]). Features are
//! the boot CPU's ([`cpu::features`]); the self-tests check every CPU has the same.

use super::text::KernelText;
use super::{STOP, atomic, cpu, layout, text::KERNEL_TEXT};
use crate::patch::alternatives::{
    AltError, AltPath, Alternatives, Features, MAX_SITE_LEN, MAX_SITES, SiteView, Tables,
};
use crate::patch::insn::{Insn, NOP};
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

pub use crate::arch::linker_tables::{
    alt_boot_table as boot_table, alt_runtime_table as runtime_table,
};

/// Words one table may rewrite at most.
const SCRATCH_LEN: usize = MAX_SITES * MAX_SITE_LEN / 4;

/// The kernel's alternatives.
static ALTERNATIVES: Alternatives<KernelText, SCRATCH_LEN> =
    Alternatives::new(&KERNEL_TEXT, &cpu::FEATURE_NAMES, cpu::FEATURE_BENCH, NOP);

fn tables() -> Tables {
    Tables {
        boot: boot_table(),
        runtime: runtime_table(),
        nopatch: layout::nopatch_range(),
    }
}

/// The name of feature `bit`.
pub fn feature_name(bit: u16) -> &'static str {
    ALTERNATIVES.feature_name(bit)
}

/// Reads the boot CPU's features, checks both tables and writes the boot table's
/// sites. A bad table is reported and nothing is written.
///
/// # Safety
/// The boot CPU, before any secondary started, with the text alias available.
pub unsafe fn apply_boot() {
    let features = cpu::features();
    // SAFETY: forwarded from the caller: no other CPU runs.
    let written = unsafe { ALTERNATIVES.apply_boot(&tables(), features) };
    // The boot CPU runs the new instructions from here on.
    cpu::isb();
    match written {
        Ok(chunks) => crate::kprintln!(
            "alternatives: features {:#x}; boot: {} sites, {chunks} chunks written; runtime: {} sites",
            features.0,
            boot_table().len(),
            runtime_table().len()
        ),
        Err(err) => crate::kprintln!("alternatives: tables refused, nothing patched: {err}"),
    }
}

/// Applies the runtime table through `patch_machine` (every CPU quiescent first), once
/// every CPU is online. Returns the chunks written.
pub fn apply_runtime() -> Result<usize, AltError<Insn>> {
    ALTERNATIVES.apply_runtime(&STOP, &tables())
}

/// The benchmark: the runtime table as the features call for with
/// [`cpu::FEATURE_BENCH`] `on`, through `patch_machine`. Returns the chunks written.
pub fn flip_bench(on: bool) -> Result<usize, AltError<Insn>> {
    ALTERNATIVES.flip_bench(&STOP, &tables(), on)
}

/// The features applied, and whether both tables were accepted and applied.
pub fn status() -> (Features, Result<(), AltError<Insn>>) {
    ALTERNATIVES.status()
}

/// Calls `each` with every site of both tables.
pub fn sites(each: &mut dyn FnMut(SiteView)) {
    ALTERNATIVES.sites(&tables(), each)
}

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
