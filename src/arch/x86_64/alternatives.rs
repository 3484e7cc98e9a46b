//! Applying the alternatives tables ([`crate::patch::alternatives`]): the boot table on
//! the boot CPU before any AP starts ([`apply_boot`]), the runtime table
//! through `patch_machine` once every CPU is online ([`apply_runtime`]). Features are
//! the boot CPU's ([`cpu::features`]); the self-tests check every CPU has the same.

use super::{STOP, cpu, layout, text::KERNEL_TEXT};
use crate::patch::Patch;
use crate::patch::Text;
use crate::patch::alternatives::{
    self as alt, AltEntry, AltError, AltPath, Bounds, Class, Features, MAX_SITE_LEN, MAX_SITES,
    SiteView, Snapshot,
};
use crate::patch::x86::{self, Insn};
use crate::stop::StopOptions;

// The tables, from the linker script: only `.altinstructions*` entries (12 bytes,
// 4-aligned, `AltEntry`'s layout) lie between each pair of symbols.
unsafe extern "C" {
    safe static __alt_boot_start: [AltEntry; 0];
    safe static __alt_boot_end: [AltEntry; 0];
    safe static __alt_start: [AltEntry; 0];
    safe static __alt_end: [AltEntry; 0];
}

fn table(start: &'static [AltEntry; 0], end: &'static [AltEntry; 0]) -> &'static [AltEntry] {
    let (first, last) = (start.as_ptr() as usize, end.as_ptr() as usize);
    let len = last.saturating_sub(first) / core::mem::size_of::<AltEntry>();
    // SAFETY: the linker script fills `start..end` with entries only (see above); they
    // are read-only data for the life of the kernel.
    unsafe { core::slice::from_raw_parts(start.as_ptr(), len) }
}

/// The boot table (`.altinstructions.boot`: sites in `.text.nopatch`).
pub fn boot_table() -> &'static [AltEntry] {
    table(&__alt_boot_start, &__alt_boot_end)
}

/// The runtime table (`.altinstructions`: sites in patchable text).
pub fn runtime_table() -> &'static [AltEntry] {
    table(&__alt_start, &__alt_end)
}

/// Chunks (of up to `x86::MAX_LEN` bytes) one table may rewrite at most.
const SCRATCH_LEN: usize = MAX_SITES * MAX_SITE_LEN.div_ceil(x86::MAX_LEN);

/// A placeholder for the scratch batch.
const NOP: Insn = match x86::nop(1) {
    Ok(nop) => nop,
    Err(_) => panic!("a 1-byte NOP exists"),
};

struct State {
    /// The boot CPU's features, as applied.
    features: Features,
    /// Whether the benchmark's feature is on in the runtime table now.
    bench_on: bool,
    /// Whether both tables passed `check_table` (None: not yet looked at).
    checked: Option<Result<(), AltError<Insn>>>,
    boot: Snapshot,
    runtime: Snapshot,
    /// What applying the runtime table did (None: not yet).
    applied: Option<Result<usize, AltError<Insn>>>,
    scratch: [Patch<Insn>; SCRATCH_LEN],
}

static STATE: spin::Mutex<State> = spin::Mutex::new(State {
    features: Features::NONE,
    bench_on: false,
    checked: None,
    boot: Snapshot::EMPTY,
    runtime: Snapshot::EMPTY,
    applied: None,
    scratch: [Patch::new(0, NOP, NOP); SCRATCH_LEN],
});

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

/// Every feature a table may name.
fn known() -> Features {
    cpu::FEATURE_NAMES
        .iter()
        .fold(Features::NONE, |set, (bit, _)| set.with(*bit))
}

/// The name of feature `bit`.
pub fn feature_name(bit: u16) -> &'static str {
    cpu::FEATURE_NAMES
        .iter()
        .find(|(b, _)| *b == bit)
        .map_or("?", |(_, name)| name)
}

fn check_both() -> Result<(), AltError<Insn>> {
    let bounds = Bounds {
        text: layout::text_range(),
        nopatch: layout::nopatch_range(),
        protected: KERNEL_TEXT.protected_ranges(),
        known: known(),
    };
    alt::check_table(boot_table(), Class::Boot, &bounds)?;
    alt::check_table(runtime_table(), Class::Runtime, &bounds)
}

/// Reads the boot CPU's features, checks both tables and writes the boot table's
/// sites. A bad table is reported and nothing is written.
///
/// # Safety
/// The boot CPU, before any secondary started, with the text alias available (MMU on).
pub unsafe fn apply_boot() {
    let mut state = STATE.lock();
    let state = &mut *state;
    state.features = cpu::features();
    let checked = check_both();
    state.checked = Some(checked);
    if let Err(err) = checked {
        crate::kprintln!("alternatives: tables refused, nothing patched: {err}");
        return;
    }
    state.boot = Snapshot::take(&KERNEL_TEXT, boot_table());
    state.runtime = Snapshot::take(&KERNEL_TEXT, runtime_table());
    // SAFETY: forwarded from the caller: no other CPU runs; the table was checked.
    let written = unsafe {
        alt::apply_boot(
            &KERNEL_TEXT,
            boot_table(),
            &state.boot,
            state.features,
            &mut state.scratch,
        )
    };
    // The boot CPU runs the new bytes from here on.
    cpu::serialize();
    match written {
        Ok(words) => crate::kprintln!(
            "alternatives: features {:#x}; boot: {} sites, {words} chunks written; runtime: {} sites",
            state.features.0,
            boot_table().len(),
            runtime_table().len()
        ),
        Err(err) => {
            crate::kprintln!("alternatives: boot table not applied: {err}");
            state.checked = Some(Err(err));
        }
    }
}

/// Applies the runtime table through `patch_machine` (every CPU quiescent first), once
/// every CPU is online. Returns the chunks written.
pub fn apply_runtime() -> Result<usize, AltError<Insn>> {
    let mut state = STATE.lock();
    let features = state.features;
    let result = apply_runtime_locked(&mut state, features);
    state.applied = Some(result);
    result
}

fn apply_runtime_locked(state: &mut State, features: Features) -> Result<usize, AltError<Insn>> {
    state.checked.unwrap_or(Ok(()))?;
    let report = alt::apply_runtime(
        &STOP,
        &KERNEL_TEXT,
        runtime_table(),
        &state.runtime,
        features,
        &mut state.scratch,
        StopOptions::DEFAULT,
    )?;
    state.bench_on = features.has(cpu::FEATURE_BENCH);
    Ok(report.map_or(0, |r| r.sites))
}

/// The benchmark: makes the runtime table hold what the features call for with
/// [`cpu::FEATURE_BENCH`] `on`, through `patch_machine`. Returns the chunks written.
pub fn flip_bench(on: bool) -> Result<usize, AltError<Insn>> {
    let mut state = STATE.lock();
    let features = state.features.set(cpu::FEATURE_BENCH, on);
    apply_runtime_locked(&mut state, features)
}

/// The features applied, whether the tables were accepted and applied (`Err`: what
/// went wrong; nothing is patched then).
pub fn status() -> (Features, Result<(), AltError<Insn>>) {
    let state = STATE.lock();
    let checked = state.checked.unwrap_or(Err(AltError::NotApplied));
    (
        state.features,
        checked.and(
            state
                .applied
                .unwrap_or(Err(AltError::NotApplied))
                .map(|_| ()),
        ),
    )
}

/// Calls `each` with every site of both tables.
pub fn sites(each: &mut dyn FnMut(SiteView)) {
    let state = STATE.lock();
    for (class, table, snapshot, features) in [
        (Class::Boot, boot_table(), &state.boot, state.features),
        (
            Class::Runtime,
            runtime_table(),
            &state.runtime,
            state.features.set(cpu::FEATURE_BENCH, state.bench_on),
        ),
    ] {
        for (index, entry) in table.iter().enumerate() {
            let Some(original) = snapshot.original(index) else {
                continue;
            };
            each(SiteView {
                class,
                index,
                site: entry.site(),
                len: usize::from(entry.site_len),
                feature: (entry.feature, feature_name(entry.feature)),
                wanted: features.has(entry.feature),
                in_text: alt::variant_in_text(&KERNEL_TEXT, entry, original),
            });
        }
    }
}

fn sync_core() -> Result<(), &'static str> {
    cpu::serialize();
    Ok(())
}

fn processor_id() -> Result<usize, &'static str> {
    Ok(cpu::processor_id())
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
pub const PATHS: [AltPath; 3] = [
    AltPath {
        name: "sync_core (boot, SERIALIZE, else CPUID)",
        run: sync_core,
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
