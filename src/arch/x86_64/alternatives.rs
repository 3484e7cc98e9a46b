//! This port's alternatives ([`crate::patch::alternatives`], applied through
//! [`KernelAlternatives`]): the feature reader and instruction-stream sync it hands
//! over, the paths with sites, and the benchmark sites.

use super::{STOP, X86_64, cpu, layout, text::KERNEL_TEXT};
use crate::arch::kernel_alternatives::KernelAlternatives;
use crate::patch::alternatives::{AltPath, Alternatives, MAX_SITE_LEN, MAX_SITES};
use crate::patch::x86::{self, Insn};

/// Chunks (of up to `x86::MAX_LEN` bytes) one table may rewrite at most.
const SCRATCH_LEN: usize = MAX_SITES * MAX_SITE_LEN.div_ceil(x86::MAX_LEN);

/// A placeholder for the scratch batch.
const NOP: Insn = match x86::nop(1) {
    Ok(nop) => nop,
    Err(_) => panic!("a 1-byte NOP exists"),
};

/// The kernel's alternatives.
pub static ALTERNATIVES: KernelAlternatives<X86_64, SCRATCH_LEN> = KernelAlternatives::new(
    Alternatives::new(&KERNEL_TEXT, &cpu::FEATURE_NAMES, cpu::FEATURE_BENCH, NOP),
    &STOP,
    cpu::features,
    layout::nopatch_range,
    cpu::serialize,
);

/// Sites in [`run_bench_sites`].
pub const BENCH_SITES: u64 = 8;

/// [`BENCH_SITES`] benchmark sites (`add rax, 0`, or `inc rax` and a NOP with
/// [`cpu::FEATURE_BENCH`]): returns how many hold their replacement. Only the
/// self-tests and the benchmark call it, on the boot CPU.
#[inline(never)]
pub fn run_bench_sites() -> u64 {
    let mut count = 0u64;
    macro_rules! site {
        () => {
            // SAFETY: arithmetic on RAX only.
            unsafe {
                alternative!(runtime,
                    orig: "add rax, 0",
                    repl: "inc rax",
                    feature: cpu::FEATURE_BENCH,
                    inout("rax") count,
                    options(nomem, nostack)
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

fn sync_core() -> Result<(), &'static str> {
    cpu::serialize();
    Ok(())
}

fn processor_id() -> Result<usize, &'static str> {
    Ok(cpu::processor_id())
}

fn processor_id_nopatch_matches() -> Result<(), &'static str> {
    match cpu::processor_id_nopatch() == cpu::current_cpu() {
        true => Ok(()),
        false => Err("processor_id_nopatch differs from the GS-relative index"),
    }
}

fn processor_id_matches() -> Result<(), &'static str> {
    match processor_id()? == cpu::current_cpu() {
        true => Ok(()),
        false => Err("processor_id differs from the GS-relative index"),
    }
}

fn bench_sites() -> Result<(), &'static str> {
    match run_bench_sites() {
        0 => Ok(()),
        _ => Err("bench_sites: a site holds `inc rax` with the bench feature off"),
    }
}

/// The kernel paths with alternative sites, each with a check of its result.
pub const PATHS: [AltPath; 4] = [
    AltPath {
        name: "sync_core (boot, SERIALIZE, else CPUID)",
        run: sync_core,
    },
    AltPath {
        name: "NMI entry's processor_id_nopatch (boot, RDPID, else mov gs:[0])",
        run: processor_id_nopatch_matches,
    },
    AltPath {
        name: "processor_id (runtime, RDPID, else mov gs:[0])",
        run: processor_id_matches,
    },
    AltPath {
        name: "bench sites (runtime, inc rax only while benchmarking)",
        run: bench_sites,
    },
];

/// Runtime sites the benchmark flips, and how many of them hold their replacement now.
pub fn bench_sites_applied() -> (u64, u64) {
    (BENCH_SITES, run_bench_sites())
}
