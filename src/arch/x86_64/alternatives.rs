//! Applying the alternatives tables ([`crate::patch::alternatives`]): the boot table on
//! the boot CPU before any AP starts ([`apply_boot`]), the runtime table
//! through `patch_machine` once every CPU is online ([`apply_runtime`]). Features are
//! the boot CPU's ([`cpu::features`]); the self-tests check every CPU has the same.

use super::text::KernelText;
use super::{STOP, cpu, layout, text::KERNEL_TEXT};
use crate::patch::alternatives::{
    AltError, AltPath, Alternatives, Features, MAX_SITE_LEN, MAX_SITES, SiteView, Tables,
};
use crate::patch::x86::{self, Insn};

pub use crate::arch::linker_tables::{
    alt_boot_table as boot_table, alt_runtime_table as runtime_table,
};

/// Chunks (of up to `x86::MAX_LEN` bytes) one table may rewrite at most.
const SCRATCH_LEN: usize = MAX_SITES * MAX_SITE_LEN.div_ceil(x86::MAX_LEN);

/// A placeholder for the scratch batch.
const NOP: Insn = match x86::nop(1) {
    Ok(nop) => nop,
    Err(_) => panic!("a 1-byte NOP exists"),
};

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
/// The boot CPU, before any AP started, with the text alias available.
pub unsafe fn apply_boot() {
    let features = cpu::features();
    // SAFETY: forwarded from the caller: no other CPU runs.
    let written = unsafe { ALTERNATIVES.apply_boot(&tables(), features) };
    // The boot CPU runs the new instructions from here on.
    cpu::serialize();
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
