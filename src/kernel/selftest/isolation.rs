//! Isolated CPUs running user code while the kernel patches itself (issue 13): their
//! synchronisation is deferred to their next kernel entry instead of interrupting them
//! (Valentin Schneider, "context_tracking,x86: Defer some IPIs until a user->kernel
//! transition", LKML, 2026; `crate::stop::ContextStates`).
//!
//! The patched site is the torture's `pm_torture_a`, cycled through versions
//! `VERSION_BASE + k` and put back afterwards. The user loop's kernel entry runs
//! [`tick`], kernel code that calls the site: what an isolated CPU executes right after
//! an entry is what these tests check.

use super::super::platform::{
    self, KERNEL_TEXT, STATIC_KEYS, STOP, UserExit, UserProgram, UserTick, current_cpu, now_ns,
    returning,
};
use super::super::smp::run_on;
use super::{OPTIONS, Params, TORTURE_A, pm_torture_a};
use crate::CpuSet;
use crate::harness::Verdict;
use crate::patch::{Patch, PatchError, Text, patch_machine};
use core::fmt::Write;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Versions the site goes through: `VERSION_BASE + k` after patch `k`.
const VERSION_BASE: u16 = 0x2000;
/// How long the patcher waits for an isolated CPU to be back in user mode, or to have
/// taken its entry.
const WAIT_NS: u64 = 2_000_000_000;
/// How long the jobs get to leave user mode at the end.
const JOB_TIMEOUT_NS: u64 = 10_000_000_000;

/// What the tick hook shares with the patcher.
struct Shared {
    /// The version of the last patch that returned (0: none): an entry that begins after
    /// it must run it or a newer one.
    committed: AtomicU64,
    /// Per CPU: the version its last tick ran.
    seen: [AtomicU64; crate::MAX_CPUS],
    /// Ticks that ran an older version than `committed` at their entry.
    stale: AtomicU64,
    /// The first of them: `cpu << 32 | seen`, and the floor.
    first_stale: AtomicU64,
    first_stale_floor: AtomicU64,
    /// Makes every loop exit at its next entry.
    quit: AtomicBool,
}

static SHARED: Shared = Shared {
    committed: AtomicU64::new(0),
    seen: [const { AtomicU64::new(0) }; crate::MAX_CPUS],
    stale: AtomicU64::new(0),
    first_stale: AtomicU64::new(0),
    first_stale_floor: AtomicU64::new(0),
    quit: AtomicBool::new(false),
};

/// The kernel code every `SYS_TICK` entry runs: after the entry's deferred work, so it
/// must see every patch that returned before the entry.
fn tick(cpu: usize) -> UserTick {
    // Acquire pairs with the patcher's Release store after patch_machine returned. The
    // entry began before this load: a patch that completed after it could not have
    // completed without this CPU (masked since the entry) or deferred it.
    let floor = SHARED.committed.load(Ordering::Acquire);
    // SAFETY: a plain assembly function returning a constant in x0.
    let version = unsafe { pm_torture_a() };
    if floor != 0 && version < floor && SHARED.stale.fetch_add(1, Ordering::Relaxed) == 0 {
        SHARED
            .first_stale
            .store((cpu as u64) << 32 | version, Ordering::Relaxed);
        SHARED.first_stale_floor.store(floor, Ordering::Relaxed);
    }
    // Release pairs with the patcher's Acquire: this tick is done.
    SHARED.seen[cpu].store(version, Ordering::Release);
    UserTick {
        value: version,
        exit: SHARED.quit.load(Ordering::Relaxed),
    }
}

/// Per CPU: how its run of user code ended (`exit_code`: 0 not yet, 1 exited, 2 other).
static EXITS: [AtomicU64; crate::MAX_CPUS] = [const { AtomicU64::new(0) }; crate::MAX_CPUS];

/// The user loop's iterations between entries, for the jobs.
static SPINS: AtomicU64 = AtomicU64::new(0);

/// The job of an isolated CPU: the user loop, `spins` iterations between entries.
fn user_job(cpu: usize, spins: &AtomicU64) {
    let spins = spins.load(Ordering::Relaxed);
    let exit = platform::run_user(UserProgram::Loop { spins });
    let code = if exit == UserExit::Exited(0) { 1 } else { 2 };
    EXITS[cpu].store(code, Ordering::Release);
}

fn version_insn(k: u64) -> platform::Insn {
    returning(VERSION_BASE + k as u16)
}

/// The site's instruction before patch `k` (`k = 1`: the torture's).
fn before(k: u64) -> platform::Insn {
    if k <= 1 {
        returning(TORTURE_A[0])
    } else {
        version_insn(k - 1)
    }
}

/// Starts the isolated CPUs on the user loop; `None` (with a skip) if this cannot run.
fn start(params: &Params, spins: u64) -> Result<(CpuSet, super::super::smp::Jobs), Verdict> {
    if let Some(why) = platform::user_mode_unsupported() {
        return Err(Verdict::Skip(msg!("{why}")));
    }
    let isolated = params.isolated;
    if isolated.is_empty() {
        return Err(Verdict::Skip(msg!(
            "no isolated CPUs (isolcpus=LIST or nohz_full=LIST)"
        )));
    }
    SHARED.committed.store(0, Ordering::Relaxed);
    SHARED.stale.store(0, Ordering::Relaxed);
    SHARED.quit.store(false, Ordering::Relaxed);
    for cpu in isolated {
        EXITS[cpu].store(0, Ordering::Relaxed);
        SHARED.seen[cpu].store(0, Ordering::Relaxed);
    }
    platform::set_user_tick(tick);
    // Relaxed: published to the jobs by `run_on`'s Release.
    SPINS.store(spins, Ordering::Relaxed);
    // SAFETY: `SPINS` is a static: it outlives the jobs.
    let jobs = unsafe { run_on(isolated, user_job, &SPINS) };
    Ok((isolated, jobs))
}

/// Ends the loops (each exits at its next entry, which a mailbox post forces) and puts
/// the site back.
fn finish(isolated: CpuSet, jobs: super::super::smp::Jobs, last: u64) -> Result<(), Verdict> {
    SHARED.quit.store(true, Ordering::Release);
    // A value no earlier post had: the loop enters at once.
    let post = now_ns() | 1 << 63;
    for cpu in isolated {
        platform::post_to_user(cpu, post);
    }
    let waited = jobs.wait(JOB_TIMEOUT_NS);
    if last > 0 {
        let back = Patch::new(
            pm_torture_a as *const () as usize,
            version_insn(last),
            returning(TORTURE_A[0]),
        );
        let _ = patch_machine(&STOP, &KERNEL_TEXT, &[back], OPTIONS);
    }
    if let Err(pending) = waited {
        return Err(Verdict::Fail(msg!(
            "CPUs {pending} did not leave user mode"
        )));
    }
    if let Some(cpu) = isolated
        .iter()
        .find(|&c| EXITS[c].load(Ordering::Acquire) != 1)
    {
        return Err(Verdict::Fail(msg!(
            "cpu{cpu}'s user loop did not exit cleanly"
        )));
    }
    Ok(())
}

/// Waits until `cond()` holds, at most [`WAIT_NS`].
fn wait_until(cond: impl Fn() -> bool) -> bool {
    let start = now_ns();
    while !cond() {
        if now_ns().saturating_sub(start) > WAIT_NS {
            return cond();
        }
        platform::cpu_yield();
    }
    true
}

/// Isolated CPUs in user mode take no patching interrupt across `isolation_rounds`
/// patch_machine calls (and as many static-key flips); after each patch, each one's
/// next entry runs the new version.
pub fn isolation_quiet(params: &Params) -> Verdict {
    // The loop enters only when its mailbox changes: every patch finds it in user mode.
    let (isolated, jobs) = match start(params, u64::MAX >> 1) {
        Ok(started) => started,
        Err(verdict) => return verdict,
    };
    let rounds = u64::from(params.isolation_rounds);
    let site = pm_torture_a as *const () as usize;
    let irqs_before: [u64; crate::MAX_CPUS] = core::array::from_fn(platform::user_irqs);
    let deferred_before: [u64; crate::MAX_CPUS] =
        core::array::from_fn(|c| platform::contexts().deferred_syncs(c));
    let kicks_before = platform::kicks_deferred();
    let mut failure = None;
    let mut evidence = None;
    let mut last = 0;
    'rounds: for k in 1..=rounds {
        // Every isolated CPU is back in user mode after its previous entry.
        for cpu in isolated {
            if !wait_until(|| platform::contexts().in_user(cpu)) {
                failure = Some(msg!("round {k}: cpu{cpu} did not return to user mode"));
                break 'rounds;
            }
        }
        let report = match patch_machine(
            &STOP,
            &KERNEL_TEXT,
            &[Patch::new(site, before(k), version_insn(k))],
            OPTIONS,
        ) {
            Ok(report) => report,
            Err(err) => {
                failure = Some(msg!("patch {k}: {err}"));
                break;
            }
        };
        last = k;
        let version = u64::from(VERSION_BASE) + k;
        if report.quiescence.deferred != isolated && evidence.is_none() {
            evidence = Some(msg!(
                "patch {k}: the evidence counts {} deferred, not the isolated CPUs {isolated} (all in user mode)",
                report.quiescence.deferred
            ));
        }
        // A static-key flip too: its kick must not reach them either.
        let flip = if k % 2 == 1 {
            STATIC_KEYS.enable(&platform::BENCH_KEY_1)
        } else {
            STATIC_KEYS.disable(&platform::BENCH_KEY_1)
        };
        if let Err(err) = flip {
            failure = Some(msg!("static-key flip {k}: {err}"));
            break;
        }
        // Release pairs with the tick's Acquire.
        SHARED.committed.store(version, Ordering::Release);
        for cpu in isolated {
            platform::post_to_user(cpu, k);
        }
        for cpu in isolated {
            // Acquire pairs with the tick's Release.
            if !wait_until(|| SHARED.seen[cpu].load(Ordering::Acquire) >= version) {
                let seen = SHARED.seen[cpu].load(Ordering::Acquire);
                failure = Some(msg!(
                    "round {k}: cpu{cpu}'s next entry ran version {seen:#x}, not the new {version:#x}"
                ));
                break 'rounds;
            }
        }
    }
    let _ = STATIC_KEYS.disable(&platform::BENCH_KEY_1);
    if let Err(verdict) = finish(isolated, jobs, last) {
        return verdict;
    }
    if let Some(why) = failure {
        return Verdict::Fail(why);
    }
    for cpu in isolated {
        let irqs = platform::user_irqs(cpu) - irqs_before[cpu];
        check!(
            irqs == 0,
            "isolated cpu{cpu} took {irqs} interrupts in user mode across {rounds} patches and key flips"
        );
        let deferred = platform::contexts().deferred_syncs(cpu) - deferred_before[cpu];
        check!(
            deferred >= rounds,
            "isolated cpu{cpu}: {deferred} entries did deferred work in {rounds} rounds (was it in user mode?)"
        );
    }
    if let Some(why) = evidence {
        return Verdict::Fail(why);
    }
    let kicks = platform::kicks_deferred() - kicks_before;
    check!(
        kicks >= rounds * isolated.len() as u64,
        "static-key kicks deferred {kicks} times, expected {} ({rounds} flips, {} CPUs)",
        rounds * isolated.len() as u64,
        isolated.len()
    );
    check!(
        SHARED.stale.load(Ordering::Relaxed) == 0,
        "stale code after an entry"
    );
    Verdict::Pass(msg!(
        "{rounds} patches and key flips; isolated CPUs {isolated}: 0 interrupts in user mode, each next entry ran the new version"
    ))
}

/// Isolated CPUs enter and leave the kernel at a high rate (`user_spins=`) while the
/// boot CPU patches the site `isolation_rounds` times: no entry runs an older version
/// than the last patch that returned before it.
pub fn isolation_torture(params: &Params) -> Verdict {
    let (isolated, jobs) = match start(params, u64::from(params.user_spins)) {
        Ok(started) => started,
        Err(verdict) => return verdict,
    };
    let rounds = u64::from(params.isolation_rounds);
    let site = pm_torture_a as *const () as usize;
    let ticks_before: [u64; crate::MAX_CPUS] = core::array::from_fn(platform::user_ticks);
    let deferred_before: [u64; crate::MAX_CPUS] =
        core::array::from_fn(|c| platform::contexts().deferred_syncs(c));
    let irqs_before: [u64; crate::MAX_CPUS] = core::array::from_fn(platform::user_irqs);
    let mut failure = None;
    let mut last = 0;
    let mut deferring = 0;
    for k in 1..=rounds {
        match patch_machine(
            &STOP,
            &KERNEL_TEXT,
            &[Patch::new(site, before(k), version_insn(k))],
            OPTIONS,
        ) {
            Ok(report) => {
                deferring += u64::from(!report.quiescence.deferred.is_empty());
            }
            Err(err) => {
                failure = Some(msg!("patch {k}: {err}"));
                break;
            }
        }
        last = k;
        SHARED
            .committed
            .store(u64::from(VERSION_BASE) + k, Ordering::Release);
        // Let the isolated CPUs run a few entries between two patches.
        for _ in 0..4 {
            platform::cpu_yield();
        }
    }
    let stale = SHARED.stale.load(Ordering::Relaxed);
    if let Err(verdict) = finish(isolated, jobs, last) {
        return verdict;
    }
    if let Some(why) = failure {
        return Verdict::Fail(why);
    }
    if stale != 0 {
        let first = SHARED.first_stale.load(Ordering::Relaxed);
        fail!(
            "{stale} entries ran stale code; first: cpu{} ran {:#x} after {:#x} had returned",
            first >> 32,
            first & 0xffff_ffff,
            SHARED.first_stale_floor.load(Ordering::Relaxed)
        );
    }
    let mut entries = 0;
    let mut irqs = 0;
    for cpu in isolated {
        let ticks = platform::user_ticks(cpu) - ticks_before[cpu];
        let deferred = platform::contexts().deferred_syncs(cpu) - deferred_before[cpu];
        check!(
            ticks > 0,
            "isolated cpu{cpu} never entered the kernel from user mode"
        );
        check!(
            deferred > 0,
            "isolated cpu{cpu}: no patch ever found it in user mode ({ticks} entries)"
        );
        entries += ticks;
        irqs += platform::user_irqs(cpu) - irqs_before[cpu];
    }
    Verdict::Pass(msg!(
        "{rounds} patches ({deferring} deferred an isolated CPU), {entries} entries from user mode on {isolated}, {irqs} interrupts taken in user mode, no stale code"
    ))
}

/// A kernel word the user probes aim at.
static PROBED: AtomicU64 = AtomicU64::new(0x5eed);

/// User code cannot read, write or execute kernel memory: each probe takes a fault
/// from EL0 that the kernel reports and survives, the word is unchanged; and the loop
/// itself runs and exits cleanly.
pub fn user_faults(_: &Params) -> Verdict {
    if let Some(why) = platform::user_mode_unsupported() {
        return Verdict::Skip(msg!("{why}"));
    }
    SHARED.quit.store(true, Ordering::Relaxed);
    platform::set_user_tick(tick);
    let me = current_cpu();
    let ticks = platform::user_ticks(me);
    let exit = platform::run_user(UserProgram::Loop { spins: 1 });
    check!(
        exit == UserExit::Exited(0),
        "the user loop ended with {exit:?}"
    );
    check!(
        platform::user_ticks(me) == ticks + 1,
        "the user loop's tick did not reach the kernel"
    );
    let data = PROBED.as_ptr() as usize;
    let text = user_faults as *const () as usize;
    for (name, program, addr, exec) in [
        ("read", UserProgram::ReadProbe(data), data, false),
        ("write", UserProgram::WriteProbe(data), data, false),
        ("exec", UserProgram::ExecProbe(text), text, true),
    ] {
        let exit = platform::run_user(program);
        check!(
            platform::user_fault_is_refused_access(&exit, addr, exec),
            "the user {name} of kernel address {addr:#x} ended with {exit:?}, not a refused access"
        );
    }
    check!(
        PROBED.load(Ordering::Relaxed) == 0x5eed,
        "the user write changed kernel memory"
    );
    // The entry code up to its deferred work is immutable: a patch request into it is
    // refused, naming the protected range, and changes nothing.
    if let Some(entry) = platform::user_entry_code() {
        let before = KERNEL_TEXT.read_insn(entry, platform::SITE_LEN);
        let refused = patch_machine(
            &STOP,
            &KERNEL_TEXT,
            &[Patch::new(entry, before, platform::NOP)],
            OPTIONS,
        );
        check!(
            matches!(refused, Err(PatchError::Protected { .. })),
            "a patch of the user entry code at {entry:#x} was not refused as protected: {refused:?}"
        );
        check!(
            KERNEL_TEXT.read_insn(entry, platform::SITE_LEN) == before,
            "the refused patch changed the user entry code"
        );
    }
    Verdict::Pass(msg!(
        "user read, write and exec of kernel memory faulted and were reported; a patch of the entry code was refused; PAN {}",
        if platform::user_pan() {
            "on"
        } else {
            "not implemented"
        }
    ))
}
