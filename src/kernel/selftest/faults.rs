//! Fault injection: the stop machine and `patch_machine` when things go wrong. A CPU
//! that never arrives with every exception masked, stop functions that fail on some
//! CPUs, many CPUs patching at once, calls from IRQ and NMI context or with interrupts
//! masked, an NMI storm while patching. In every case: no deadlock, no partial batch, a
//! clear error, and a following patch succeeds.

use super::{
    Callers, HOLD_TIMEOUT_NS, JOB_TIMEOUT_NS, OPTIONS, Params, Verdict, call_torture_targets,
    others, spare_patch, stop_recording, torture_batch, torture_caller,
};
use crate::kernel::platform::{
    self, Insn, KERNEL_TEXT, SITE_LEN, STOP, current_cpu, nmi, now_ns, online_cpus, returning,
};
use crate::kernel::smp::run_on;
use crate::patch::{Instruction, Patch, PatchError, Text, patch_machine};
use crate::stop::{Arch, CallContext, StopError, StopOptions};
use crate::{AtomicCpuSet, CpuSet};
use core::fmt::Write;
use core::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};

unsafe extern "C" {
    fn pm_torture_a() -> u64;
    fn pm_torture_b() -> u64;
    /// Loads the word at `addr` (`targets_*.S`).
    fn pm_fault_load(addr: usize) -> u64;
    /// An undefined instruction (arm64 `UDF #0`, x86 `UD2`).
    fn pm_fault_udf();
}

/// An address in the null page, unmapped on both ports (`platform_selftest=null`).
const UNMAPPED: usize = 0x18;

/// The NMI handler slot of these tests (1 is the NMI tests', 2 x86's platform hold, 3
/// the kprobe tests', the last the arm64 platform's).
const FAULT_SLOT: usize = 4;

/// How long a held CPU stays held at most, whatever the test does.
const HOLD_LIMIT_NS: u64 = 10_000_000_000;

fn site_a() -> usize {
    pm_torture_a as *const () as usize
}

fn site_b() -> usize {
    pm_torture_b as *const () as usize
}

/// The two torture sites' words, as the text holds them now.
fn torture_words() -> (u64, u64) {
    (
        KERNEL_TEXT.read_insn(site_a(), SITE_LEN).to_le_word(),
        KERNEL_TEXT.read_insn(site_b(), SITE_LEN).to_le_word(),
    )
}

/// A copy of kernel text, to compare byte for byte after a refused call.
static TEXT_COPY: [AtomicU8; 1 << 20] = [const { AtomicU8::new(0) }; 1 << 20];

fn text_bytes() -> impl Iterator<Item = (usize, u8)> {
    KERNEL_TEXT.text_range().enumerate().map(|(i, addr)| {
        // SAFETY: kernel text is mapped readable for its whole range.
        (i, unsafe { core::ptr::read_volatile(addr as *const u8) })
    })
}

/// Takes a copy of kernel text; `false` if it does not fit.
fn snapshot_text() -> bool {
    if KERNEL_TEXT.text_range().len() > TEXT_COPY.len() {
        return false;
    }
    for (i, byte) in text_bytes() {
        // Relaxed: only the calling CPU reads the copy back.
        TEXT_COPY[i].store(byte, Ordering::Relaxed);
    }
    true
}

/// The first byte of text that differs from [`snapshot_text`]'s copy.
fn text_changed() -> Option<usize> {
    text_bytes()
        .find(|&(i, byte)| TEXT_COPY[i].load(Ordering::Relaxed) != byte)
        .map(|(i, _)| KERNEL_TEXT.text_range().start + i)
}

/// A CPU held with every exception masked until released.
struct Hold {
    /// `cpu + 1` of the CPU the NMI handler holds (0: none).
    target: AtomicU32,
    holding: AtomicCpuSet,
    release: AtomicBool,
    timed_out: AtomicBool,
}

static HOLD: Hold = Hold {
    target: AtomicU32::new(0),
    holding: AtomicCpuSet::new(),
    release: AtomicBool::new(false),
    timed_out: AtomicBool::new(false),
};

/// Spins with every exception masked (arm64: D, A, I, F and, with FEAT_NMI, ALLINT; x86:
/// IF, and inside an NMI handler NMIs too) until released, at most [`HOLD_LIMIT_NS`].
fn hold_here(cpu: usize) {
    let saved = STOP.arch().mask_all();
    // Release pairs with the test's Acquire: it may start once this CPU is masked.
    HOLD.holding.insert(cpu, Ordering::Release);
    let start = now_ns();
    // Acquire pairs with the test's release.
    while !HOLD.release.load(Ordering::Acquire) {
        if now_ns() - start > HOLD_LIMIT_NS {
            HOLD.timed_out.store(true, Ordering::Relaxed);
            break;
        }
        core::hint::spin_loop();
    }
    HOLD.holding.remove(cpu, Ordering::Release);
    STOP.arch().restore(saved);
}

/// The holding NMI handler: the strongest mask there is on either architecture. arm64:
/// the NMI runs with PSTATE.I and ALLINT set and the GIC's running priority at NMI
/// level, and `hold_here` sets D, A, I, F again, so neither an IRQ nor a (pseudo or
/// superpriority) NMI is taken. x86: inside its NMI handler a CPU takes no NMI until its
/// IRETQ, and IF is clear; only SMI, INIT and machine checks, which no kernel masks,
/// remain.
fn hold_in_nmi(cpu: usize) -> bool {
    // Acquire pairs with the release of the target in `start_hold`.
    if HOLD.target.load(Ordering::Acquire) != cpu as u32 + 1 {
        return false;
    }
    hold_here(cpu);
    true
}

fn hold_job(cpu: usize, _: &()) {
    hold_here(cpu);
}

/// How a CPU was held.
enum Held {
    /// In its NMI handler.
    InNmi,
    /// In a job, without NMIs to hold it in (arm64 `pseudo_nmi=off`).
    InJob(crate::kernel::smp::Jobs),
}

/// Holds `cpu` with every exception masked; `Err` if it never started holding.
fn start_hold(cpu: usize) -> Result<Held, Verdict> {
    HOLD.release.store(false, Ordering::Relaxed);
    HOLD.timed_out.store(false, Ordering::Relaxed);
    let held = if platform::nmi_mechanism().is_ok() {
        nmi::register_nmi_handler(FAULT_SLOT, hold_in_nmi);
        // Release: the flags above, to the handler's Acquire.
        HOLD.target.store(cpu as u32 + 1, Ordering::Release);
        nmi::send_nmi(CpuSet::single(cpu));
        Held::InNmi
    } else {
        // SAFETY: the argument is a static unit.
        Held::InJob(unsafe { run_on(CpuSet::single(cpu), hold_job, &()) })
    };
    let start = now_ns();
    while !HOLD.holding.contains(cpu, Ordering::Acquire) {
        if now_ns() - start > JOB_TIMEOUT_NS {
            // The failure below is the one to report; the release is best effort.
            let _ = end_hold(held);
            return Err(Verdict::Fail(msg!(
                "cpu{cpu} never started holding (waited {} ms)",
                JOB_TIMEOUT_NS / 1_000_000
            )));
        }
        core::hint::spin_loop();
    }
    Ok(held)
}

/// Releases the held CPU; `Err` names what did not end in time.
fn end_hold(held: Held) -> Result<(), Verdict> {
    HOLD.release.store(true, Ordering::Release);
    let start = now_ns();
    while !HOLD.holding.load(Ordering::Acquire).is_empty() {
        if now_ns() - start > JOB_TIMEOUT_NS {
            return Err(Verdict::Fail(msg!(
                "CPUs {} still held {} ms after the release",
                HOLD.holding.load(Ordering::Relaxed),
                JOB_TIMEOUT_NS / 1_000_000
            )));
        }
        core::hint::spin_loop();
    }
    match held {
        Held::InNmi => {
            HOLD.target.store(0, Ordering::Release);
            nmi::unregister_nmi_handler(FAULT_SLOT);
        }
        Held::InJob(job) => {
            if let Err(pending) = job.wait(JOB_TIMEOUT_NS) {
                return Err(Verdict::Fail(msg!(
                    "the holding job on {pending} never ended"
                )));
            }
        }
    }
    if HOLD.timed_out.load(Ordering::Relaxed) {
        return Err(Verdict::Fail(msg!(
            "the held CPU gave up after {} s, before the release",
            HOLD_LIMIT_NS / 1_000_000_000
        )));
    }
    Ok(())
}

/// Waits (bounded) until no CPU is left in a stop machine window.
fn others_left() -> Result<(), CpuSet> {
    let start = now_ns();
    loop {
        let inside = STOP.in_masked_window();
        if inside.is_empty() {
            return Ok(());
        }
        if now_ns() - start > JOB_TIMEOUT_NS {
            return Err(inside);
        }
        core::hint::spin_loop();
    }
}

/// A CPU that never arrives, with every exception masked and spinning (in its own NMI
/// handler where there are NMIs): `stop_machine` and `patch_machine` fail naming exactly
/// that CPU, the function runs nowhere, text is unchanged byte for byte, every other CPU
/// leaves; once released, a patch succeeds.
pub fn fault_cpu_never_arrives(_: &Params) -> Verdict {
    let online = online_cpus();
    let Some(victim) = others().iter().last() else {
        return Verdict::Skip(msg!("needs a second CPU to hold"));
    };
    check!(
        snapshot_text(),
        "kernel text ({} bytes) is larger than the copy",
        KERNEL_TEXT.text_range().len()
    );
    let options = StopOptions {
        arrival_timeout_ns: HOLD_TIMEOUT_NS,
        ..OPTIONS
    };
    let held = match start_hold(victim) {
        Ok(held) => held,
        Err(verdict) => return verdict,
    };
    let how = match held {
        Held::InNmi => "in its NMI handler",
        Held::InJob(_) => "in a job (no NMIs)",
    };
    let (stopped, ran) = stop_recording(online, options);
    let patched = patch_machine(&STOP, &KERNEL_TEXT, &torture_batch(0, 1), options);
    let changed = text_changed();
    let left = others_left();
    if let Err(verdict) = end_hold(held) {
        return verdict;
    }
    match stopped {
        Err(StopError::Timeout { missing, .. }) if missing == CpuSet::single(victim) => {}
        other => {
            fail!("stop_machine with cpu{victim} held: expected a timeout naming it, got {other:?}")
        }
    }
    check!(
        ran.is_empty(),
        "the function ran on {ran} despite the timeout"
    );
    match patched {
        Err(PatchError::Stop(StopError::Timeout { missing, .. }))
            if missing == CpuSet::single(victim) => {}
        other => fail!(
            "patch_machine with cpu{victim} held: expected a timeout naming it, got {other:?}"
        ),
    }
    if let Some(addr) = changed {
        fail!("text changed at {addr:#x} after the refused patch");
    }
    if let Err(inside) = left {
        fail!("CPUs {inside} still in the window after the abort");
    }
    // Released: the same batch goes through, whole.
    if let Err(err) = patch_machine(&STOP, &KERNEL_TEXT, &torture_batch(0, 1), OPTIONS) {
        fail!("the patch after the release failed: {err}");
    }
    let after = torture_words();
    let back = patch_machine(&STOP, &KERNEL_TEXT, &torture_batch(1, 0), OPTIONS);
    let want = (
        returning(super::TORTURE_A[1]).to_le_word(),
        returning(super::TORTURE_B[1]).to_le_word(),
    );
    check!(after == want, "after the patch the sites hold {after:x?}");
    check!(back.is_ok(), "patching back: {}", back.unwrap_err());
    Verdict::Pass(msg!(
        "cpu{victim} held {how}: stop_machine and patch_machine timed out naming it, text unchanged; then patched"
    ))
}

/// A stop function that fails on several sets of CPUs: every failing CPU is named with
/// its own code, never just one, the function ran on every active CPU, and a patch
/// afterwards succeeds.
pub fn fault_stop_fn_errors(_: &Params) -> Verdict {
    let online = online_cpus();
    let me = current_cpu();
    let last = online.iter().last().unwrap_or(me);
    let even = online
        .iter()
        .filter(|c| c % 2 == 0)
        .fold(CpuSet::EMPTY, CpuSet::with);
    let cases = [
        ("every CPU", online),
        ("only the initiator", CpuSet::single(me)),
        ("only the last CPU", CpuSet::single(last)),
        ("the even CPUs", even),
    ];
    for (what, failing) in cases {
        let ran = AtomicCpuSet::new();
        let result = STOP.stop_machine(
            &|cpu| {
                ran.insert(cpu, Ordering::Relaxed);
                if failing.contains(cpu) {
                    Err(-1000 - cpu as i32)
                } else {
                    Ok(())
                }
            },
            online,
            OPTIONS,
        );
        let ran = ran.load(Ordering::Relaxed);
        check!(
            ran == online,
            "{what}: the function ran on {ran} of {online}"
        );
        match result {
            Err(StopError::Failed(failures)) if failures.cpus() == failing => {
                for cpu in failing.iter() {
                    check!(
                        failures.code(cpu) == Some(-1000 - cpu as i32),
                        "{what}: cpu{cpu} reported {:?}",
                        failures.code(cpu)
                    );
                }
            }
            other => fail!("{what}: expected failures on {failing}, got {other:?}"),
        }
    }
    let patched = patch_machine(&STOP, &KERNEL_TEXT, &[spare_patch(0x5a5a, 0x2468)], OPTIONS);
    let back = patch_machine(&STOP, &KERNEL_TEXT, &[spare_patch(0x2468, 0x5a5a)], OPTIONS);
    check!(
        patched.is_ok(),
        "the patch afterwards: {}",
        patched.unwrap_err()
    );
    check!(back.is_ok(), "patching back: {}", back.unwrap_err());
    Verdict::Pass(msg!(
        "{} sets of failing CPUs, each named with its code; then patched",
        cases.len()
    ))
}

/// Calls of [`fault_concurrent_patchers`] the record has room for.
const RACE_SLOTS: usize = 4096;

/// Many CPUs calling `patch_machine` at once.
struct Race {
    rounds: AtomicU32,
    /// Rounds the coordinator has opened.
    opened: AtomicU32,
    /// Calls finished, all CPUs together.
    finished: AtomicU32,
    /// Calls begun and not yet returned.
    in_flight: AtomicU32,
    max_in_flight: AtomicU32,
    /// Calls that began while another call was in flight.
    overlapped: AtomicU64,
    applied: AtomicU64,
    busy: AtomicU64,
    /// Refused because the sites no longer held what the caller read (another call won).
    stale: AtomicU64,
    /// A follower that waited too long for the next round: `cpu + 1`.
    starved: AtomicU32,
    /// Anything else: how many, and (cpu, round, error) of the first.
    unexpected: AtomicU64,
    first_unexpected: spin::Mutex<Option<(usize, u32, PatchError<Insn>)>>,
    /// Per call (`cpu * rounds + round`) that applied its batch: the words it replaced.
    old_a: [AtomicU64; RACE_SLOTS],
    old_b: [AtomicU64; RACE_SLOTS],
    done: [AtomicBool; RACE_SLOTS],
}

static RACE: Race = Race {
    rounds: AtomicU32::new(0),
    opened: AtomicU32::new(0),
    finished: AtomicU32::new(0),
    in_flight: AtomicU32::new(0),
    max_in_flight: AtomicU32::new(0),
    overlapped: AtomicU64::new(0),
    applied: AtomicU64::new(0),
    busy: AtomicU64::new(0),
    stale: AtomicU64::new(0),
    starved: AtomicU32::new(0),
    unexpected: AtomicU64::new(0),
    first_unexpected: spin::Mutex::new(None),
    old_a: [const { AtomicU64::new(0) }; RACE_SLOTS],
    old_b: [const { AtomicU64::new(0) }; RACE_SLOTS],
    done: [const { AtomicBool::new(false) }; RACE_SLOTS],
};

/// The values call `slot` writes to the two sites: unique per call, so the applied
/// calls form one chain from the initial text to the final one.
fn race_values(slot: usize) -> (u16, u16) {
    let id = 1 + slot as u16;
    (id, id | 0x8000)
}

/// One call of the race: read both sites, replace them with this call's values.
fn race_call(cpu: usize, round: usize, rounds: usize) {
    let slot = cpu * rounds + round;
    let (a, b) = race_values(slot);
    let old_a = KERNEL_TEXT.read_insn(site_a(), SITE_LEN);
    let old_b = KERNEL_TEXT.read_insn(site_b(), SITE_LEN);
    let batch = [
        Patch::new(site_a(), old_a, returning(a)),
        Patch::new(site_b(), old_b, returning(b)),
    ];
    // Relaxed: counts, read once every caller has finished.
    let before = RACE.in_flight.fetch_add(1, Ordering::Relaxed);
    if before > 0 {
        RACE.overlapped.fetch_add(1, Ordering::Relaxed);
    }
    RACE.max_in_flight.fetch_max(before + 1, Ordering::Relaxed);
    let result = patch_machine(&STOP, &KERNEL_TEXT, &batch, OPTIONS);
    RACE.in_flight.fetch_sub(1, Ordering::Relaxed);
    // Relaxed: released by `finished` below, acquired by the coordinator.
    match result {
        Ok(_) => {
            RACE.old_a[slot].store(old_a.to_le_word(), Ordering::Relaxed);
            RACE.old_b[slot].store(old_b.to_le_word(), Ordering::Relaxed);
            RACE.done[slot].store(true, Ordering::Relaxed);
            RACE.applied.fetch_add(1, Ordering::Relaxed);
        }
        Err(PatchError::OldMismatch { .. }) => {
            RACE.stale.fetch_add(1, Ordering::Relaxed);
        }
        Err(PatchError::Busy { .. } | PatchError::Stop(StopError::Busy { .. })) => {
            RACE.busy.fetch_add(1, Ordering::Relaxed);
        }
        Err(err) => {
            if RACE.unexpected.fetch_add(1, Ordering::Relaxed) == 0 {
                *RACE.first_unexpected.lock() = Some((cpu, round as u32, err));
            }
        }
    }
    // Release pairs with the coordinator's Acquire: this call's records.
    RACE.finished.fetch_add(1, Ordering::Release);
}

/// A follower: one call per round, as soon as the coordinator opens it. Interrupts stay
/// on while it waits, so it joins the others' stops meanwhile.
fn race_follower(cpu: usize, _: &()) {
    let rounds = RACE.rounds.load(Ordering::Relaxed) as usize;
    for round in 0..rounds {
        let start = now_ns();
        // Acquire pairs with the coordinator's release of the round.
        while RACE.opened.load(Ordering::Acquire) <= round as u32 {
            if now_ns() - start > JOB_TIMEOUT_NS {
                RACE.starved.store(cpu as u32 + 1, Ordering::Relaxed);
                return;
            }
            platform::cpu_yield();
        }
        race_call(cpu, round, rounds);
    }
}

/// Every CPU calls `patch_machine` at once, round after round, each reading the two
/// torture sites and replacing them with values of its own: every call applies its
/// whole batch or is refused with a clear error (the sites changed under it, or Busy);
/// none deadlocks; the applied calls form one chain, each replacing exactly what the
/// one before wrote to both sites, that ends at the text as it is; calls overlapped.
///
/// Under single-threaded TCG a CPU's call runs from its start to the stop IPI without
/// giving up the host thread, so free-running calls never overlap there. Every other
/// round is therefore gated: the coordinator holds the text's writer lock (as another
/// writer would) until every follower is inside `patch_machine`, waiting for it, then
/// lets go and calls too; the calls then contend, the winner's stop pulls the others in
/// from their lock waits, and they carry on.
pub fn fault_concurrent_patchers(_: &Params) -> Verdict {
    let online = online_cpus();
    let me = current_cpu();
    let followers = others();
    let Some(highest) = online.iter().last() else {
        fail!("no CPU online");
    };
    // About 2000 calls in all, at least 2 rounds, at most 100.
    let rounds = (2000 / online.len()).clamp(2, 100);
    check!(
        (highest + 1) * rounds <= RACE_SLOTS,
        "{} CPUs x {rounds} rounds do not fit the record",
        highest + 1
    );
    for slot in 0..RACE_SLOTS {
        RACE.done[slot].store(false, Ordering::Relaxed);
    }
    for count in [
        &RACE.overlapped,
        &RACE.applied,
        &RACE.busy,
        &RACE.stale,
        &RACE.unexpected,
    ] {
        count.store(0, Ordering::Relaxed);
    }
    for count in [
        &RACE.opened,
        &RACE.finished,
        &RACE.in_flight,
        &RACE.max_in_flight,
        &RACE.starved,
    ] {
        count.store(0, Ordering::Relaxed);
    }
    *RACE.first_unexpected.lock() = None;
    RACE.rounds.store(rounds as u32, Ordering::Relaxed);
    let initial = torture_words();
    // SAFETY: the argument is a static unit.
    let jobs = unsafe { run_on(followers, race_follower, &()) };
    let mut expected = 0u32;
    let mut stuck = None;
    for round in 0..rounds {
        let gated = round % 2 == 0 && !followers.is_empty();
        let gate = if gated {
            KERNEL_TEXT.writer_lock().try_lock()
        } else {
            None
        };
        if gated && gate.is_none() {
            stuck = Some(msg!("round {round}: the text writer lock was held"));
            break;
        }
        // Release: the round's start, to the followers' Acquire.
        RACE.opened.store(round as u32 + 1, Ordering::Release);
        expected += followers.len() as u32;
        if gated {
            let start = now_ns();
            while RACE.in_flight.load(Ordering::Relaxed) < followers.len() as u32
                && now_ns() - start < super::CALLER_WAIT_NS
            {
                platform::cpu_yield();
            }
            drop(gate);
        }
        // The coordinator's own call: in a gated round it begins while the followers'
        // calls are in flight.
        race_call(me, round, rounds);
        expected += 1;
        let start = now_ns();
        // Acquire pairs with each call's release of `finished`.
        while RACE.finished.load(Ordering::Acquire) < expected {
            if now_ns() - start > JOB_TIMEOUT_NS {
                stuck = Some(msg!(
                    "round {round}: {} of {expected} calls finished within {} ms",
                    RACE.finished.load(Ordering::Relaxed),
                    JOB_TIMEOUT_NS / 1_000_000
                ));
                break;
            }
            platform::cpu_yield();
        }
        if stuck.is_some() {
            break;
        }
    }
    // Whatever happened, let every follower run out its rounds.
    RACE.opened.store(rounds as u32, Ordering::Release);
    let waited = jobs.wait(JOB_TIMEOUT_NS);
    // Walk the chain of applied calls from the initial text.
    let mut current = initial;
    let mut steps = 0u64;
    let slots = (highest + 1) * rounds;
    loop {
        let next = (0..slots).find(|&slot| {
            RACE.done[slot].load(Ordering::Relaxed)
                && RACE.old_a[slot].load(Ordering::Relaxed) == current.0
        });
        let Some(slot) = next else { break };
        let old_b = RACE.old_b[slot].load(Ordering::Relaxed);
        check!(
            old_b == current.1,
            "call {slot} replaced site a's {:#x} but site b's {old_b:#x}, not {:#x}: a partial batch",
            current.0,
            current.1
        );
        let (a, b) = race_values(slot);
        current = (returning(a).to_le_word(), returning(b).to_le_word());
        steps += 1;
        if steps > slots as u64 {
            break;
        }
    }
    let final_words = torture_words();
    // Put the torture sites back.
    let restore = [
        Patch::new(
            site_a(),
            KERNEL_TEXT.read_insn(site_a(), SITE_LEN),
            returning(super::TORTURE_A[0]),
        ),
        Patch::new(
            site_b(),
            KERNEL_TEXT.read_insn(site_b(), SITE_LEN),
            returning(super::TORTURE_B[0]),
        ),
    ];
    let restored = patch_machine(&STOP, &KERNEL_TEXT, &restore, OPTIONS);
    if let Some(why) = stuck {
        return Verdict::Fail(why);
    }
    if let Err(pending) = waited {
        fail!("patchers on {pending} did not finish");
    }
    if let Some(cpu) = RACE.starved.load(Ordering::Relaxed).checked_sub(1) {
        fail!(
            "cpu{cpu} waited {} ms for a round to open",
            JOB_TIMEOUT_NS / 1_000_000
        );
    }
    if let Some((cpu, round, err)) = *RACE.first_unexpected.lock() {
        fail!(
            "{} calls failed unexpectedly; first: cpu{cpu} round {round}: {err}",
            RACE.unexpected.load(Ordering::Relaxed)
        );
    }
    let applied = RACE.applied.load(Ordering::Relaxed);
    let (stale, busy) = (
        RACE.stale.load(Ordering::Relaxed),
        RACE.busy.load(Ordering::Relaxed),
    );
    check!(
        steps == applied,
        "{applied} calls applied their batch, but only {steps} follow one another from the initial text"
    );
    check!(
        final_words == current,
        "the text holds {final_words:x?}, not the last applied batch's {current:x?}"
    );
    check!(applied > 0, "no call applied its batch");
    let overlapped = RACE.overlapped.load(Ordering::Relaxed);
    check!(
        online.len() < 2 || overlapped > 0,
        "no call began while another was in flight: the calls never overlapped ({applied} applied, {stale} stale, {busy} busy)"
    );
    check!(restored.is_ok(), "patching back: {}", restored.unwrap_err());
    Verdict::Pass(msg!(
        "{} CPUs, {rounds} rounds: {applied} applied in one chain, {stale} stale, {busy} busy; {overlapped} overlapped, up to {} at once",
        online.len(),
        RACE.max_in_flight.load(Ordering::Relaxed)
    ))
}

/// How a stop function faults in [`fault_stop_fn_faults`].
#[derive(Clone, Copy, PartialEq, Eq)]
enum FaultKind {
    Load,
    Undefined,
}

fn take_fault(kind: FaultKind) {
    match kind {
        // SAFETY: the load faults (the null page is unmapped) and the call is run by
        // `stop_machine_catching_faults`, which resumes after it; a plain function of
        // the C ABI otherwise.
        FaultKind::Load => unsafe {
            pm_fault_load(UNMAPPED);
        },
        // SAFETY: as above, for an undefined instruction.
        FaultKind::Undefined => unsafe { pm_fault_udf() },
    }
}

/// A stop function that takes a synchronous exception on one CPU (a load from an
/// unmapped address, an undefined instruction; on another CPU, then on the
/// initiator): no deadlock, the call fails naming that CPU and the fault (the address
/// of the load), the function ran on every CPU, every CPU left, and the next call and
/// a patch succeed.
pub fn fault_stop_fn_faults(_: &Params) -> Verdict {
    let online = online_cpus();
    let me = current_cpu();
    let victims = [others().iter().last(), Some(me)];
    let mut seen = 0;
    let mut last_fault = None;
    for victim in victims.into_iter().flatten() {
        for (what, kind) in [
            ("a load from an unmapped address", FaultKind::Load),
            ("an undefined instruction", FaultKind::Undefined),
        ] {
            let ran = AtomicCpuSet::new();
            let after = AtomicCpuSet::new();
            let function = |cpu: usize| {
                ran.insert(cpu, Ordering::Relaxed);
                if cpu == victim {
                    take_fault(kind);
                }
                after.insert(cpu, Ordering::Relaxed);
                Ok(())
            };
            // SAFETY: the function holds nothing across the fault (atomics only).
            let result = unsafe { STOP.stop_machine_catching_faults(&function, online, OPTIONS) };
            let left = others_left();
            let (ran, after) = (ran.load(Ordering::Relaxed), after.load(Ordering::Relaxed));
            let fault = match result {
                Err(StopError::Faulted { cpus, cpu, fault })
                    if cpus == CpuSet::single(victim) && cpu == victim =>
                {
                    fault
                }
                other => fail!("{what} on cpu{victim}: expected a fault naming it, got {other:?}"),
            };
            check!(
                kind != FaultKind::Load || fault.addr == UNMAPPED,
                "{what} on cpu{victim}: the fault names address {:#x}, not {UNMAPPED:#x} ({fault})",
                fault.addr
            );
            check!(
                ran == online,
                "{what} on cpu{victim}: the function ran on {ran}"
            );
            check!(
                after == online.without(victim),
                "{what} on cpu{victim}: the function went on past the fault on {after}"
            );
            if let Err(inside) = left {
                fail!("{what} on cpu{victim}: CPUs {inside} still in the window");
            }
            let (next, next_ran) = stop_recording(online, OPTIONS);
            check!(
                next.is_ok(),
                "after {what} on cpu{victim}: {}",
                next.unwrap_err()
            );
            check!(
                next_ran == online,
                "after {what} on cpu{victim}: ran on {next_ran}"
            );
            seen += 1;
            last_fault = Some((victim, fault));
        }
    }
    let patched = patch_machine(&STOP, &KERNEL_TEXT, &[spare_patch(0x5a5a, 0x3579)], OPTIONS);
    let back = patch_machine(&STOP, &KERNEL_TEXT, &[spare_patch(0x3579, 0x5a5a)], OPTIONS);
    check!(
        patched.is_ok(),
        "the patch afterwards: {}",
        patched.unwrap_err()
    );
    check!(back.is_ok(), "patching back: {}", back.unwrap_err());
    let Some((victim, fault)) = last_fault else {
        fail!("no fault was provoked");
    };
    Verdict::Pass(msg!(
        "{seen} faults caught, each named; last: cpu{victim}: {fault}; then patched"
    ))
}

/// What a call from a context that may not stop reported.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
enum Refusal {
    /// Not tried yet.
    None = 0,
    /// Both calls refused with `WrongContext` naming the CPU and the context; nothing ran.
    Right = 1,
    /// `stop_machine` ran the function or returned something else.
    StopWrong = 2,
    /// `patch_machine` returned something else.
    PatchWrong = 3,
}

/// Tries `stop_machine` and `patch_machine` from where the caller is; both must be
/// refused as called from `expected`, with nothing run or written.
fn try_to_stop(expected: CallContext) -> Refusal {
    let me = current_cpu();
    let refused = |err: &StopError| matches!(*err, StopError::WrongContext { cpu, context } if cpu == me && context == expected);
    let ran = AtomicBool::new(false);
    let stopped = STOP.stop_machine(
        &|_| {
            ran.store(true, Ordering::Relaxed);
            Ok(())
        },
        online_cpus(),
        OPTIONS,
    );
    if ran.load(Ordering::Relaxed) || !stopped.as_ref().is_err_and(refused) {
        return Refusal::StopWrong;
    }
    match patch_machine(&STOP, &KERNEL_TEXT, &[spare_patch(0x5a5a, 0x6666)], OPTIONS) {
        Err(PatchError::Stop(err)) if refused(&err) => Refusal::Right,
        _ => Refusal::PatchWrong,
    }
}

/// Per CPU: the outcome of the last try from a handler ([`Refusal`] as u32).
static HANDLER_TRIES: [AtomicU32; crate::MAX_CPUS] = [const { AtomicU32::new(0) }; crate::MAX_CPUS];
/// `cpu + 1` of the CPU whose NMI handler tries (0: none).
static NMI_TRY_TARGET: AtomicU32 = AtomicU32::new(0);

fn try_from_irq(cpu: usize) {
    let outcome = try_to_stop(CallContext::Irq);
    // Release pairs with the test's Acquire.
    HANDLER_TRIES[cpu].store(outcome as u32, Ordering::Release);
}

fn try_from_nmi(cpu: usize) -> bool {
    if NMI_TRY_TARGET.load(Ordering::Acquire) != cpu as u32 + 1 {
        return false;
    }
    let outcome = try_to_stop(CallContext::Nmi);
    HANDLER_TRIES[cpu].store(outcome as u32, Ordering::Release);
    true
}

/// What a wrong outcome of `try_to_stop` means, for the failure message.
fn describe(outcome: Refusal) -> &'static str {
    match outcome {
        Refusal::StopWrong => "stop_machine was not refused as it should be",
        Refusal::PatchWrong => "patch_machine was not refused as it should be",
        _ => "",
    }
}

/// Waits for the `what` ("IRQ", "NMI") handler's attempt on `cpu`: `Ok` if both calls
/// were refused as they should be, else why not.
fn refused_in_handler(what: &str, cpu: usize) -> Result<(), crate::harness::Msg> {
    match handler_outcome(cpu) {
        Some(Refusal::Right) => Ok(()),
        Some(outcome) => Err(msg!("{what} handler on cpu{cpu}: {}", describe(outcome))),
        None => Err(msg!("the {what} handler on cpu{cpu} never reported")),
    }
}

/// Waits (bounded) for `cpu`'s handler to report; what it reported.
fn handler_outcome(cpu: usize) -> Option<Refusal> {
    let start = now_ns();
    loop {
        let outcome = match HANDLER_TRIES[cpu].load(Ordering::Acquire) {
            1 => Refusal::Right,
            2 => Refusal::StopWrong,
            3 => Refusal::PatchWrong,
            _ => Refusal::None,
        };
        if outcome != Refusal::None {
            return Some(outcome);
        }
        if now_ns() - start > JOB_TIMEOUT_NS {
            return None;
        }
        platform::cpu_yield();
    }
}

/// The IPI the context test's handler takes.
const TRY_IPI: u32 = platform::TEST_IPIS[1];

/// `stop_machine` and `patch_machine` called with interrupts masked, from inside a stop
/// function, from a real IRQ handler and from a real NMI handler (on this CPU and on
/// another): each refused with `WrongContext` naming the CPU and the context before
/// anything is touched, the function never runs, text is unchanged; then a patch
/// succeeds.
pub fn fault_wrong_context(_: &Params) -> Verdict {
    let me = current_cpu();
    let spare = super::spare_patch(0x5a5a, 0x5a5a).addr;
    let mut tried = 0;

    let flags = platform::local_irq_save();
    let masked = try_to_stop(CallContext::IrqsMasked);
    platform::local_irq_restore(flags);
    check!(
        masked == Refusal::Right,
        "interrupts masked: {}",
        describe(masked)
    );
    tried += 1;

    let inside = AtomicU32::new(Refusal::None as u32);
    let outer = STOP.stop_machine(
        &|cpu| {
            if cpu == me {
                inside.store(
                    try_to_stop(CallContext::IrqsMasked) as u32,
                    Ordering::Relaxed,
                );
            }
            Ok(())
        },
        CpuSet::single(me),
        OPTIONS,
    );
    check!(
        outer.is_ok(),
        "the outer stop_machine: {}",
        outer.unwrap_err()
    );
    check!(
        inside.load(Ordering::Relaxed) == Refusal::Right as u32,
        "inside a stop function: a nested call was not refused as masked"
    );
    tried += 1;

    let targets = [Some(me), others().lowest()];
    platform::set_ipi_handler(TRY_IPI, try_from_irq);
    for cpu in targets.into_iter().flatten() {
        HANDLER_TRIES[cpu].store(0, Ordering::Relaxed);
        platform::send_ipi(TRY_IPI, CpuSet::single(cpu));
        if let Err(why) = refused_in_handler("IRQ", cpu) {
            platform::clear_ipi_handler(TRY_IPI);
            return Verdict::Fail(why);
        }
        tried += 1;
    }
    platform::clear_ipi_handler(TRY_IPI);

    let nmis = platform::nmi_mechanism().is_ok();
    if nmis {
        nmi::register_nmi_handler(FAULT_SLOT, try_from_nmi);
        for cpu in targets.into_iter().flatten() {
            HANDLER_TRIES[cpu].store(0, Ordering::Relaxed);
            NMI_TRY_TARGET.store(cpu as u32 + 1, Ordering::Release);
            nmi::send_nmi(CpuSet::single(cpu));
            let verdict = refused_in_handler("NMI", cpu);
            NMI_TRY_TARGET.store(0, Ordering::Release);
            if let Err(why) = verdict {
                nmi::unregister_nmi_handler(FAULT_SLOT);
                return Verdict::Fail(why);
            }
            tried += 1;
        }
        nmi::unregister_nmi_handler(FAULT_SLOT);
    }
    check!(
        KERNEL_TEXT.read_insn(spare, SITE_LEN) == returning(0x5a5a),
        "a refused patch_machine changed the spare site"
    );
    let patched = patch_machine(&STOP, &KERNEL_TEXT, &[spare_patch(0x5a5a, 0x1357)], OPTIONS);
    let back = patch_machine(&STOP, &KERNEL_TEXT, &[spare_patch(0x1357, 0x5a5a)], OPTIONS);
    check!(
        patched.is_ok(),
        "the patch afterwards: {}",
        patched.unwrap_err()
    );
    check!(back.is_ok(), "patching back: {}", back.unwrap_err());
    Verdict::Pass(msg!(
        "{tried} contexts refused (masked, in a stop, IRQ{}), text unchanged; then patched",
        if nmis { ", NMI" } else { "; no NMIs here" }
    ))
}

/// An NMI hammer aimed at every CPU while the patcher runs `patch_machine`.
struct Storm {
    callers: Callers,
    armed: AtomicBool,
    stop_hammer: AtomicBool,
    /// The patcher is inside `patch_machine`.
    patching: AtomicBool,
    handled: AtomicU64,
    /// NMI handlers run while the patcher was inside `patch_machine`.
    during: AtomicU64,
    sends: AtomicU64,
    window_sends: AtomicU64,
    /// NMI handlers that started inside a patch window.
    in_window: AtomicU64,
}

static STORM: Storm = Storm {
    callers: Callers::new(),
    armed: AtomicBool::new(false),
    stop_hammer: AtomicBool::new(false),
    patching: AtomicBool::new(false),
    handled: AtomicU64::new(0),
    during: AtomicU64::new(0),
    sends: AtomicU64::new(0),
    window_sends: AtomicU64::new(0),
    in_window: AtomicU64::new(0),
};

fn storm_nmi(cpu: usize) -> bool {
    // Relaxed: flags and counts; nothing is published through them.
    if !STORM.armed.load(Ordering::Relaxed) {
        return false;
    }
    // Inside a window: this CPU's, or any CPU's stop function (the writes) running.
    // arm64 masks NMIs there; x86 holds them in the stop machine's slot until the
    // writes are done everywhere and this CPU has left.
    if STOP.in_masked_window().contains(cpu) || !STOP.running_function().is_empty() {
        STORM.in_window.fetch_add(1, Ordering::Relaxed);
    }
    call_torture_targets(cpu, &STORM.callers);
    STORM.handled.fetch_add(1, Ordering::Relaxed);
    if STORM.patching.load(Ordering::Relaxed) {
        STORM.during.fetch_add(1, Ordering::Relaxed);
    }
    true
}

/// A write probe (inside the patch window, so in `.text.nopatch`): one more NMI at
/// every CPU from inside each patch. Under single-threaded TCG the hammer runs only while
/// the patcher waits, and with two CPUs never while a call is in flight.
#[unsafe(link_section = ".text.nopatch")]
fn nmi_from_window() {
    STORM.window_sends.fetch_add(1, Ordering::Relaxed);
    nmi::send_nmi(online_cpus());
}

fn hammer(_cpu: usize, storm: &Storm) {
    while !storm.stop_hammer.load(Ordering::Acquire) {
        nmi::send_nmi(online_cpus());
        storm.sends.fetch_add(1, Ordering::Relaxed);
        platform::cpu_yield();
    }
}

/// One CPU hammers NMIs at every CPU (the patcher included) while the patcher runs
/// `patch_machine` over and over and the others call the patched functions; each patch
/// window sends one more NMI to every CPU; the NMI handlers call the patched functions
/// too. Every patch succeeds, every call (NMI handlers' included)
/// sees old or new code, none deadlocks, and NMIs were handled while patches ran.
pub fn fault_nmi_storm(params: &Params) -> Verdict {
    if let Err(why) = platform::nmi_mechanism() {
        return Verdict::Skip(msg!("{why}"));
    }
    let Some(hammerer) = others().iter().last() else {
        return Verdict::Skip(msg!("needs a second CPU to hammer from"));
    };
    let callers = others().without(hammerer);
    let c = &STORM.callers;
    c.stop.store(false, Ordering::Relaxed);
    c.epoch.store(0, Ordering::Relaxed);
    c.calls.store(0, Ordering::Relaxed);
    c.bad.store(0, Ordering::Relaxed);
    *c.first_bad.lock() = None;
    for count in [
        &STORM.handled,
        &STORM.during,
        &STORM.sends,
        &STORM.window_sends,
    ] {
        count.store(0, Ordering::Relaxed);
    }
    STORM.stop_hammer.store(false, Ordering::Relaxed);
    nmi::register_nmi_handler(FAULT_SLOT, storm_nmi);
    STORM.armed.store(true, Ordering::Relaxed);
    // SAFETY: STORM is static.
    let call_jobs = unsafe { run_on(callers, torture_caller, &STORM.callers) };
    // SAFETY: as above.
    let hammer_job = unsafe { run_on(CpuSet::single(hammerer), hammer, &STORM) };
    let flips = u64::from(params.flips.min(1_000));
    let mut failure = None;
    let mut starved = None;
    platform::set_write_probe(Some(nmi_from_window));
    for k in 0..flips {
        let (from, to) = ((k % 3) as usize, ((k + 1) % 3) as usize);
        STORM.patching.store(true, Ordering::Relaxed);
        let result = patch_machine(&STOP, &KERNEL_TEXT, &torture_batch(from, to), OPTIONS);
        STORM.patching.store(false, Ordering::Relaxed);
        if let Err(err) = result {
            failure = Some((k, err));
            break;
        }
        c.epoch.store(k + 1, Ordering::Release);
        // SAFETY: a plain assembly function returning a value.
        let mine = unsafe { pm_torture_a() };
        if mine != u64::from(super::TORTURE_A[to]) {
            c.record_bad(current_cpu(), mine, k + 1, k + 1);
        }
        // The hammer sends and the callers call between every two patches: back to back,
        // the patcher would keep them inside its rendezvous (as in `torture`).
        let since: [u64; crate::MAX_CPUS] =
            core::array::from_fn(|cpu| c.calls_by[cpu].load(Ordering::Relaxed));
        let idle = super::wait_for_callers(c, callers, &since);
        if !idle.is_empty() {
            starved = Some((k, idle));
            break;
        }
        let sends = STORM.sends.load(Ordering::Relaxed);
        let start = now_ns();
        while STORM.sends.load(Ordering::Relaxed) == sends {
            if now_ns() - start > super::CALLER_WAIT_NS {
                starved = Some((k, CpuSet::single(hammerer)));
                break;
            }
            platform::cpu_yield();
        }
        if starved.is_some() {
            break;
        }
    }
    platform::set_write_probe(None);
    STORM.stop_hammer.store(true, Ordering::Release);
    c.stop.store(true, Ordering::Release);
    let hammer_waited = hammer_job.wait(JOB_TIMEOUT_NS);
    let callers_waited = call_jobs.wait(JOB_TIMEOUT_NS);
    STORM.armed.store(false, Ordering::Relaxed);
    nmi::unregister_nmi_handler(FAULT_SLOT);
    let current = (c.epoch.load(Ordering::Relaxed) % 3) as usize;
    if current != 0 {
        let _ = patch_machine(&STOP, &KERNEL_TEXT, &torture_batch(current, 0), OPTIONS);
    }
    if let Some((k, err)) = failure {
        fail!("flip {k} under the NMI storm: {err}");
    }
    if let Err(pending) = hammer_waited {
        fail!("the hammer on {pending} did not stop");
    }
    if let Some((k, idle)) = starved {
        fail!(
            "after patch {k}, CPUs {idle} made no call or NMI send within {} ms",
            super::CALLER_WAIT_NS / 1_000_000
        );
    }
    if let Err(pending) = callers_waited {
        fail!("callers on {pending} did not stop");
    }
    if let Some((cpu, value, before, after)) = *c.first_bad.lock() {
        fail!(
            "{} bad calls; first: cpu{cpu} got {value:#x} between patches {before} and {after}",
            c.bad.load(Ordering::Relaxed)
        );
    }
    let in_window = STORM.in_window.load(Ordering::Relaxed);
    check!(
        in_window == 0,
        "{in_window} NMI handlers started inside a patch window"
    );
    let during = STORM.during.load(Ordering::Relaxed);
    check!(
        during > 0,
        "no NMI handler ran while a patch_machine call was in flight ({} handled, {} sends)",
        STORM.handled.load(Ordering::Relaxed),
        STORM.sends.load(Ordering::Relaxed)
    );
    Verdict::Pass(msg!(
        "{flips} patches under {} NMI sends from cpu{hammerer} and {} from the windows: {} handlers ran, {during} during patch_machine, results right",
        STORM.sends.load(Ordering::Relaxed),
        STORM.window_sends.load(Ordering::Relaxed),
        STORM.handled.load(Ordering::Relaxed)
    ))
}
