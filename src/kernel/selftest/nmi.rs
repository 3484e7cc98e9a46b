//! Self-tests of the NMI paths: NMI IPIs, reaching CPUs with IRQs off, stop functions
//! run from NMI context (Chang S. Bae, "stop_machine: Add NMI-based execution path",
//! LKML, 2026), and patching that stays safe when NMI handlers run the code being
//! patched (Ankur Arora, "x86/alternatives: NMI safe runtime patching", LKML, 2020).

use super::{
    Callers, JOB_TIMEOUT_NS, OPTIONS, Params, Verdict, call_torture_targets, others,
    stop_recording, torture_batch, torture_caller,
};
use crate::kernel::platform::{self, Insn, STOP, nmi};
use crate::kernel::platform::{KERNEL_TEXT, set_write_probe};
use crate::kernel::smp::run_on;
use crate::patch::{Patch, Text, patch_machine};
use crate::stop::{MaskLevel, StopError, StopOptions};
use crate::{AtomicCpuSet, CpuSet};
use core::fmt::Write;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

/// The NMI handler slot the tests use (slot 0 belongs to the stop machine).
const TEST_SLOT: usize = 1;

/// Per-CPU count of test NMIs handled, and whether any ran outside NMI context.
static HITS: [AtomicU32; crate::MAX_CPUS] = [const { AtomicU32::new(0) }; crate::MAX_CPUS];
static NOT_IN_NMI: AtomicCpuSet = AtomicCpuSet::new();

fn count_hit(cpu: usize) -> bool {
    if !nmi::in_nmi() {
        NOT_IN_NMI.insert(cpu, Ordering::Relaxed);
    }
    HITS[cpu].fetch_add(1, Ordering::Release);
    true
}

fn hits() -> [u32; crate::MAX_CPUS] {
    core::array::from_fn(|cpu| HITS[cpu].load(Ordering::Acquire))
}

/// Waits (bounded) until every CPU in `cpus` has handled one more test NMI than in
/// `before`; returns the ones that did not.
fn wait_hits(cpus: CpuSet, before: &[u32; crate::MAX_CPUS]) -> CpuSet {
    let start = platform::now_ns();
    loop {
        let missing = cpus
            .iter()
            .filter(|&cpu| HITS[cpu].load(Ordering::Acquire) <= before[cpu])
            .fold(CpuSet::EMPTY, CpuSet::with);
        if missing.is_empty() || platform::now_ns() - start > 1_000_000_000 {
            return missing;
        }
        core::hint::spin_loop();
    }
}

fn no_nmis() -> Option<Verdict> {
    platform::nmi_mechanism()
        .err()
        .map(|why| Verdict::Skip(msg!("{why}")))
}

/// One observation of the NMI mechanism per CPU.
struct Observations {
    seen: [spin::Mutex<Option<platform::NmiObserved>>; crate::MAX_CPUS],
}

fn observe_on(cpu: usize, out: &Observations) {
    *out.seen[cpu].lock() = Some(platform::observe_nmi_mechanism());
}

/// The NMI mechanism every CPU really uses (its registers, and a self-NMI sent with
/// IRQs off) is the one the hardware and the bootargs call for, derived afresh
/// (arm64: ID_AA64PFR1_EL1.NMI, GICD_TYPER.NMI, `pseudo_nmi=`; x86: CPUID's x2APIC);
/// with `expect_nmi=NAME`, it is that one.
pub fn nmi_mechanism(params: &Params) -> Verdict {
    let (expected, inputs) = platform::expected_nmi_mechanism();
    let out = Observations {
        seen: [const { spin::Mutex::new(None) }; crate::MAX_CPUS],
    };
    observe_on(platform::current_cpu(), &out);
    // One CPU at a time: the FEAT_NMI evidence is a counter of all CPUs.
    for cpu in others().iter() {
        // SAFETY: `out` outlives the job: we wait for it right here.
        let job = unsafe { run_on(CpuSet::single(cpu), observe_on, &out) };
        if let Err(pending) = job.wait(JOB_TIMEOUT_NS) {
            fail!("cpu{pending} did not finish observing its NMI mechanism");
        }
    }
    let online = platform::online_cpus();
    for cpu in online.iter() {
        let Some(seen) = *out.seen[cpu].lock() else {
            fail!("cpu{cpu} made no observation");
        };
        match seen.mechanism() {
            Some(used) if used == expected => {}
            Some(used) => fail!("cpu{cpu} uses {used} ({seen}); {inputs} call for {expected}"),
            None => {
                fail!("cpu{cpu}: no consistent NMI mechanism: {seen}; {inputs} call for {expected}")
            }
        }
    }
    if let Some(want) = params.expect_nmi {
        check!(
            expected == want,
            "expect_nmi={want}, but {expected} is in use ({inputs})"
        );
    }
    let Some(mine) = *out.seen[platform::current_cpu()].lock() else {
        fail!("no observation of the calling CPU");
    };
    Verdict::Pass(msg!("{expected} on {online}: {inputs}; {mine}"))
}

/// NMI IPIs to one CPU, to all but self and to self, each taken in NMI context.
pub fn nmi_ipi(_: &Params) -> Verdict {
    if let Some(skip) = no_nmis() {
        return skip;
    }
    nmi::register_nmi_handler(TEST_SLOT, count_hit);
    NOT_IN_NMI.clear(Ordering::Relaxed);
    let me = platform::current_cpu();
    let online = platform::online_cpus();
    let one = others().lowest().map_or(CpuSet::EMPTY, CpuSet::single);
    for (what, targets, send) in [
        ("one", one, (|t| nmi::send_nmi(t)) as fn(CpuSet)),
        ("all but self", online.without(me), |_| {
            nmi::send_nmi_all_but_self()
        }),
        ("self", CpuSet::single(me), |_| nmi::send_nmi_self()),
    ] {
        let before = hits();
        send(targets);
        let missing = wait_hits(targets, &before);
        check!(missing.is_empty(), "NMI to {what} never reached {missing}");
    }
    let outside = NOT_IN_NMI.load(Ordering::Relaxed);
    check!(
        outside.is_empty(),
        "handlers ran outside NMI context on {outside}"
    );
    Verdict::Pass(msg!("one, all-but-self and self delivered"))
}

struct IrqsOff {
    holding: AtomicBool,
    release: AtomicBool,
    irqs_stayed_off: AtomicBool,
}

fn spin_with_irqs_off(_cpu: usize, hold: &IrqsOff) {
    let flags = platform::local_irq_save();
    hold.holding.store(true, Ordering::Release);
    let start = platform::now_ns();
    while !hold.release.load(Ordering::Acquire) && platform::now_ns() - start < 10_000_000_000 {
        core::hint::spin_loop();
    }
    // Still masked: whatever reached this CPU meanwhile got through an IRQ mask.
    hold.irqs_stayed_off
        .store(platform::irqs_disabled(), Ordering::Relaxed);
    platform::local_irq_restore(flags);
}

/// A stop request reaches a CPU that spins with IRQs off (an NMI gets there); without
/// NMIs the same request times out naming the CPU.
pub fn nmi_reaches_irqs_off(_: &Params) -> Verdict {
    let online = platform::online_cpus();
    let Some(held) = others().iter().last() else {
        return Verdict::Skip(msg!("needs a second CPU"));
    };
    let hold = IrqsOff {
        holding: AtomicBool::new(false),
        release: AtomicBool::new(false),
        irqs_stayed_off: AtomicBool::new(false),
    };
    // SAFETY: `hold` outlives the job: we wait for it below.
    let job = unsafe { run_on(CpuSet::single(held), spin_with_irqs_off, &hold) };
    while !hold.holding.load(Ordering::Acquire) {
        core::hint::spin_loop();
    }
    let (result, ran) = stop_recording(
        online,
        StopOptions {
            arrival_timeout_ns: super::HOLD_TIMEOUT_NS,
            ..OPTIONS
        },
    );
    hold.release.store(true, Ordering::Release);
    if let Err(pending) = job.wait(JOB_TIMEOUT_NS) {
        fail!("cpu{held} never released: {pending}");
    }
    if platform::stop_ipi_reaches_irqs_off() {
        check!(
            result.is_ok(),
            "cpu{held} spun with IRQs off: {}",
            result.unwrap_err()
        );
        check!(ran == online, "ran on {ran}");
        check!(
            hold.irqs_stayed_off.load(Ordering::Relaxed),
            "cpu{held} did not keep IRQs off while it was held"
        );
        Verdict::Pass(msg!("cpu{held} with IRQs off joined through an NMI"))
    } else {
        match result {
            Err(StopError::Timeout { missing, .. }) if missing == CpuSet::single(held) => {
                Verdict::Pass(msg!(
                    "no NMI-class stop IPI here: cpu{held} with IRQs off timed out, named"
                ))
            }
            other => fail!("expected a timeout naming cpu{held}, got {other:?}"),
        }
    }
}

/// Built without the `stop-machine-nmi` feature there is no NMI path to test.
#[cfg(not(feature = "stop-machine-nmi"))]
pub fn stop_machine_nmi(_: &Params) -> Verdict {
    Verdict::Skip(msg!("built without the stop-machine-nmi feature"))
}

/// Stop functions run from NMI context on exactly the active CPUs, for all CPUs and
/// for proper subsets (one other CPU, all but the initiator, the initiator with one
/// other, the initiator alone); NMIs land on exactly those CPUs; errors from every
/// active CPU are kept.
#[cfg(feature = "stop-machine-nmi")]
pub fn stop_machine_nmi(_: &Params) -> Verdict {
    if let Some(skip) = no_nmis() {
        return skip;
    }
    let online = platform::online_cpus();
    let me = platform::current_cpu();
    let others = online.without(me);
    let first_other = others.lowest().map_or(CpuSet::EMPTY, CpuSet::single);
    let last_other = others.iter().last().map_or(CpuSet::EMPTY, CpuSet::single);
    let subsets = [
        ("all", online),
        ("one other", first_other),
        ("all but the initiator", others),
        ("the initiator and one other", last_other.with(me)),
        ("the initiator alone", CpuSet::single(me)),
    ];
    nmi::register_nmi_handler(TEST_SLOT, count_hit);
    let mut tried = 0;
    for (what, active) in subsets {
        if active.is_empty() || (active == online && what != "all") {
            continue;
        }
        if let failed @ Verdict::Fail(_) = stop_machine_nmi_on(what, active) {
            nmi::unregister_nmi_handler(TEST_SLOT);
            return failed;
        }
        tried += 1;
    }
    nmi::unregister_nmi_handler(TEST_SLOT);
    Verdict::Pass(msg!(
        "{tried} active sets of {online}: ran from NMI on exactly each, odd CPUs' errors kept"
    ))
}

/// One `stop_machine_nmi` call on `active` (named `what` in failures).
#[cfg(feature = "stop-machine-nmi")]
fn stop_machine_nmi_on(what: &str, active: CpuSet) -> Verdict {
    let ran = AtomicCpuSet::new();
    let runs = AtomicU32::new(0);
    let in_nmi = AtomicCpuSet::new();
    let function = |cpu: usize| {
        ran.insert(cpu, Ordering::Relaxed);
        runs.fetch_add(1, Ordering::Relaxed);
        if nmi::in_nmi() {
            in_nmi.insert(cpu, Ordering::Relaxed);
        }
        if cpu % 2 == 1 {
            Err(-200 - cpu as i32)
        } else {
            Ok(())
        }
    };
    let before = hits();
    // SAFETY: the function only touches atomics.
    let result = STOP.stop_machine_nmi(
        unsafe { crate::stop::NmiSafe::new(&function) },
        active,
        OPTIONS,
    );
    let odd = active
        .iter()
        .filter(|c| c % 2 == 1)
        .fold(CpuSet::EMPTY, CpuSet::with);
    match result {
        Ok(()) if odd.is_empty() => {}
        Err(StopError::Failed(failures)) if failures.cpus() == odd => {
            for cpu in odd.iter() {
                check!(
                    failures.code(cpu) == Some(-200 - cpu as i32),
                    "{what} {active}: cpu{cpu}: {:?}",
                    failures.code(cpu)
                );
            }
        }
        other => fail!("{what} {active}: expected failures on {odd}, got {other:?}"),
    }
    let (ran, in_nmi) = (ran.load(Ordering::Relaxed), in_nmi.load(Ordering::Relaxed));
    let runs = runs.load(Ordering::Relaxed) as usize;
    check!(
        ran == active && runs == active.len(),
        "{what} {active}: ran on {} ({runs} runs)",
        ran
    );
    check!(
        in_nmi == active,
        "{what} {active}: only {} ran in NMI context",
        in_nmi
    );
    check!(
        STOP.nmi_delivered() == active,
        "{what} {active}: NMIs delivered on {}",
        STOP.nmi_delivered()
    );
    // Every NMI runs the test handler too: it counts where NMIs landed.
    let after = hits();
    let landed = platform::online_cpus()
        .iter()
        .filter(|&cpu| after[cpu] != before[cpu])
        .fold(CpuSet::EMPTY, CpuSet::with);
    check!(landed == active, "{what} {active}: NMIs landed on {landed}");
    Verdict::Pass(crate::harness::Msg::new())
}

impl Callers {
    /// Ready for another run.
    fn reset(&self) {
        self.stop.store(false, Ordering::Relaxed);
        self.epoch.store(0, Ordering::Relaxed);
        self.calls.store(0, Ordering::Relaxed);
        self.bad.store(0, Ordering::Relaxed);
        *self.first_bad.lock() = None;
    }
}

/// NMI handlers that call the functions being patched, with NMIs aimed at every CPU
/// from inside every patch window, during a torture run.
struct Storm {
    callers: Callers,
    /// NMI handler entries that found their CPU inside a masked window.
    in_window: AtomicU64,
    handled: AtomicU64,
    sends: AtomicU64,
}

static STORM: Storm = Storm {
    callers: Callers::new(),
    in_window: AtomicU64::new(0),
    handled: AtomicU64::new(0),
    sends: AtomicU64::new(0),
};

fn storm_handler(cpu: usize) -> bool {
    // Inside the window: this CPU's, or any CPU's stop function (the writes) running.
    if STOP.in_masked_window().contains(cpu) || !STOP.running_function().is_empty() {
        STORM.in_window.fetch_add(1, Ordering::Relaxed);
    }
    call_torture_targets(cpu, &STORM.callers);
    STORM.handled.fetch_add(1, Ordering::Relaxed);
    true
}

/// A write probe: runs inside the patch window, so it lives in `.text.nopatch`.
#[unsafe(link_section = ".text.nopatch")]
fn storm_from_window() {
    STORM.sends.fetch_add(1, Ordering::Relaxed);
    nmi::send_nmi(platform::online_cpus());
    // Hand the other vCPUs a turn (PAUSE/ISB end one under single-threaded TCG) while the
    // batch is still being written, so that their NMIs arrive mid-patch: a handler that
    // does not wait for the writes then runs while they are in progress.
    for _ in 0..4 * platform::online_cpus().len() {
        core::hint::spin_loop();
    }
}

/// The Linux-today window: mask IRQs only (arm64: PMR; x86: `cli`), then write from
/// normal context, with no NMI-side protocol.
fn weakened_patch(batch: &[Patch<Insn>]) -> Result<(), StopError> {
    let _writer = KERNEL_TEXT.writer_lock().lock();
    STOP.stop_machine(
        &|_| {
            for patch in batch {
                // SAFETY: the sites are the torture functions, validated by the real
                // patch_machine runs before; this is the deliberately weakened window the
                // test compares against (NMIs can run the site meanwhile: both the old and
                // the new MOVZ are whole instructions).
                unsafe { KERNEL_TEXT.write_insn(patch.addr, patch.new) };
                KERNEL_TEXT.sync_icache(patch.range());
            }
            Ok(())
        },
        CpuSet::single(platform::current_cpu()),
        StopOptions {
            mask: MaskLevel::IrqsOnly,
            ..OPTIONS
        },
    )
}

/// Patching the functions NMI handlers call, under an NMI storm, neither deadlocks nor
/// lets a handler see anything but the old or the new code; no NMI handler starts
/// inside a patch_machine window (its CPU's, or while the writes run anywhere), while an
/// IRQs-only window written from normal context (Linux today: arm64 PMR, x86 `cli`)
/// lets them in.
pub fn nmi_safe_patching(params: &Params) -> Verdict {
    if let Some(skip) = no_nmis() {
        return skip;
    }
    if let Err(why) = platform::nmi_free_window() {
        return Verdict::Skip(msg!("{why}"));
    }
    nmi::register_nmi_handler(TEST_SLOT, storm_handler);
    STORM.callers.reset();
    STORM.in_window.store(0, Ordering::Relaxed);
    STORM.handled.store(0, Ordering::Relaxed);
    STORM.sends.store(0, Ordering::Relaxed);
    let flips = u64::from(params.flips.min(2_000));
    // SAFETY: STORM is static.
    let jobs = unsafe { run_on(others(), torture_caller, &STORM.callers) };
    set_write_probe(Some(storm_from_window));
    let mut failure = None;
    for k in 0..flips {
        let (from, to) = ((k % 3) as usize, ((k + 1) % 3) as usize);
        if let Err(err) = patch_machine(&STOP, &KERNEL_TEXT, &torture_batch(from, to), OPTIONS) {
            failure = Some((k, err));
            break;
        }
        STORM.callers.epoch.store(k + 1, Ordering::Release);
    }
    set_write_probe(None);
    let full_in_window = STORM.in_window.load(Ordering::Relaxed);
    let full_handled = STORM.handled.load(Ordering::Relaxed);

    // The same storm against the weakened window.
    STORM.in_window.store(0, Ordering::Relaxed);
    set_write_probe(Some(storm_from_window));
    let mut weak_failure = None;
    let done = STORM.callers.epoch.load(Ordering::Relaxed);
    for k in done..done + flips.min(200) {
        let (from, to) = ((k % 3) as usize, ((k + 1) % 3) as usize);
        if let Err(err) = weakened_patch(&torture_batch(from, to)) {
            weak_failure = Some((k, err));
            break;
        }
        STORM.callers.epoch.store(k + 1, Ordering::Release);
    }
    set_write_probe(None);
    let weak_in_window = STORM.in_window.load(Ordering::Relaxed);

    STORM.callers.stop.store(true, Ordering::Release);
    let waited = jobs.wait(JOB_TIMEOUT_NS);
    nmi::unregister_nmi_handler(TEST_SLOT);
    let current = (STORM.callers.epoch.load(Ordering::Relaxed) % 3) as usize;
    if current != 0 {
        let _ = patch_machine(&STOP, &KERNEL_TEXT, &torture_batch(current, 0), OPTIONS);
    }
    if let Some((k, err)) = failure {
        fail!("patch_machine flip {k}: {err}");
    }
    if let Some((k, err)) = weak_failure {
        fail!("weakened flip {k}: {err}");
    }
    if let Err(pending) = waited {
        fail!("callers on {pending} did not stop");
    }
    if let Some((cpu, value, before, after)) = *STORM.callers.first_bad.lock() {
        fail!("cpu{cpu} saw {value:#x} between patches {before} and {after}");
    }
    check!(full_handled > 0, "no storm NMI was handled");
    check!(
        full_in_window == 0,
        "{full_in_window} NMI handlers started inside patch_machine windows"
    );
    check!(
        weak_in_window > 0,
        "the IRQs-only window let no NMI in ({} storms sent): the comparison shows nothing",
        STORM.sends.load(Ordering::Relaxed)
    );
    Verdict::Pass(msg!(
        "{flips} flips: {full_handled} NMI handlers, 0 in windows; IRQs-only window: {weak_in_window} in"
    ))
}
