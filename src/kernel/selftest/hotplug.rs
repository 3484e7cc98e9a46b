//! CPU hotplug self-tests: CPUs taken down and brought back ([`hotplug_cycle`]), text
//! patched while a CPU is down ([`hotplug_patch_offline`]), hotplug and patching at
//! once ([`hotplug_torture`]) and the refusals ([`hotplug_refusals`]).

use super::{
    JOB_TIMEOUT_NS, OPTIONS, Params, TORTURE_A, TORTURE_B, pm_torture_a, pm_torture_b,
    torture_batch,
};
use crate::CpuSet;
use crate::harness::{Msg, Verdict};
use crate::kernel::hotplug::{self, HotplugError, cpu_down, cpu_up};
use crate::kernel::platform::{
    self, Insn, KERNEL_TEXT, SITE_LEN, STOP, now_ns, online_cpus, online_syncs, returning,
};
use crate::kernel::smp::run_on;
use crate::patch::{PatchError, Text, patch_machine};
use crate::static_key::KeyError;
use crate::stop::StopError;
use core::fmt::Write;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

/// Stop calls made on each CPU brought back, to see it answer (and count) again.
const CALLS_AFTER_UP: u32 = 3;

/// Runs `function` on `cpu` as a job and returns what it returned.
fn call_on(cpu: usize, function: unsafe extern "C" fn() -> u64) -> Result<u64, Msg> {
    struct Call {
        function: unsafe extern "C" fn() -> u64,
        result: AtomicU64,
    }
    fn job(_: usize, call: &Call) {
        // SAFETY: the callers pass the torture targets, assembly functions of the C ABI
        // that return a constant in the return register and touch nothing else.
        let value = unsafe { (call.function)() };
        call.result.store(value, Ordering::Relaxed);
    }
    let call = Call {
        function,
        result: AtomicU64::new(u64::MAX),
    };
    // SAFETY: `call` outlives the job: waited for below, and a job that never finishes
    // ends the run (panic) before `call` could go away.
    let jobs = unsafe { run_on(CpuSet::single(cpu), job, &call) };
    if let Err(pending) = jobs.wait(JOB_TIMEOUT_NS) {
        panic!("hotplug: the job on {pending} never finished: its argument must not go away");
    }
    // Relaxed: the job's completion was acquired by `wait`.
    Ok(call.result.load(Ordering::Relaxed))
}

/// Stop calls with `active` = {`cpu`}: the calls that ran there (it must answer and run
/// every one).
fn stop_calls_on(cpu: usize, calls: u32) -> Result<u32, StopError> {
    let ran = AtomicU32::new(0);
    for _ in 0..calls {
        STOP.stop_machine(
            &|on| {
                if on == cpu {
                    ran.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            },
            CpuSet::single(cpu),
            OPTIONS,
        )?;
    }
    Ok(ran.load(Ordering::Relaxed))
}

/// A stop call on every online CPU: where it ran.
fn stop_everywhere() -> Result<CpuSet, StopError> {
    let ran = crate::AtomicCpuSet::new();
    STOP.stop_machine(
        &|cpu| {
            ran.insert(cpu, Ordering::Relaxed);
            Ok(())
        },
        online_cpus(),
        OPTIONS,
    )?;
    Ok(ran.load(Ordering::Relaxed))
}

/// Every secondary, one after the other: down (out of the online set, a stop call on
/// the others completes without it), up (online again, synchronised once on the way,
/// answers stop calls with itself active and counts each, runs a job).
pub(super) fn hotplug_cycle(_: &Params) -> Verdict {
    let all = online_cpus();
    let secondaries = all.without(0);
    if secondaries.is_empty() {
        return Verdict::Skip(msg!("needs a secondary CPU"));
    }
    let (downs, ups) = hotplug::counts();
    // Guest time of each call, reported (never asserted).
    let mut down_ns = [0u64; crate::MAX_CPUS];
    let mut up_ns = [0u64; crate::MAX_CPUS];
    for (i, cpu) in secondaries.iter().enumerate() {
        let t0 = now_ns();
        if let Err(err) = cpu_down(cpu) {
            fail!("cpu_down({cpu}): {err}");
        }
        down_ns[i] = now_ns() - t0;
        let online = online_cpus();
        check!(
            online == all.without(cpu),
            "after cpu_down({cpu}) the online set is {online}"
        );
        let start = now_ns();
        match stop_everywhere() {
            Ok(ran) => check!(
                ran == online,
                "with cpu{cpu} down, stop_machine ran on {ran}, not {online}"
            ),
            Err(err) => fail!("with cpu{cpu} down, stop_machine failed: {err}"),
        }
        let stop_ns = now_ns() - start;
        let syncs = online_syncs(cpu);
        let t0 = now_ns();
        if let Err(err) = cpu_up(cpu) {
            fail!("cpu_up({cpu}): {err}");
        }
        up_ns[i] = now_ns() - t0;
        check!(
            online_cpus() == all,
            "after cpu_up({cpu}) the online set is {}",
            online_cpus()
        );
        check!(
            online_syncs(cpu) == syncs + 1,
            "cpu{cpu} came back without synchronising on its way online (online syncs {} -> {})",
            syncs,
            online_syncs(cpu)
        );
        match stop_calls_on(cpu, CALLS_AFTER_UP) {
            Ok(ran) => check!(
                ran == CALLS_AFTER_UP,
                "cpu{cpu} ran {ran} of {CALLS_AFTER_UP} stop calls after cpu_up"
            ),
            Err(err) => fail!("stop_machine on cpu{cpu} after cpu_up: {err}"),
        }
        match call_on(cpu, pm_torture_a) {
            Ok(value) if TORTURE_A.iter().any(|&v| u64::from(v) == value) => {}
            Ok(value) => fail!("cpu{cpu} ran a job after cpu_up and read {value:#x}"),
            Err(why) => fail!("{}", why.as_str()),
        }
        // The whole call must have been far below the arrival timeout: the offline CPU
        // was not waited for.
        check!(
            stop_ns < OPTIONS.arrival_timeout_ns / 2,
            "with cpu{cpu} down, stop_machine took {} ms",
            stop_ns / 1_000_000
        );
    }
    let (downs2, ups2) = hotplug::counts();
    let n = secondaries.len() as u64;
    check!(
        downs2 - downs == n && ups2 - ups == n,
        "{} downs and {} ups counted for {n} CPUs",
        downs2 - downs,
        ups2 - ups
    );
    match stop_everywhere() {
        Ok(ran) => check!(ran == all, "the final stop_machine ran on {ran}"),
        Err(err) => fail!("the final stop_machine: {err}"),
    }
    let (down, up) = (
        Spread::of(&mut down_ns[..n as usize]),
        Spread::of(&mut up_ns[..n as usize]),
    );
    Verdict::Pass(msg!(
        "{n} CPUs down and up, each answered {CALLS_AFTER_UP} stop calls after; cpu_down {down}, cpu_up {up}"
    ))
}

/// Median and maximum of some durations, for a result's note.
struct Spread {
    median_ns: u64,
    max_ns: u64,
}

impl Spread {
    fn of(samples: &mut [u64]) -> Spread {
        samples.sort_unstable();
        Spread {
            median_ns: samples.get(samples.len() / 2).copied().unwrap_or(0),
            max_ns: samples.last().copied().unwrap_or(0),
        }
    }
}

impl core::fmt::Display for Spread {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "median {} us max {} us",
            self.median_ns / 1000,
            self.max_ns / 1000
        )
    }
}

/// The index (into `TORTURE_A`/`TORTURE_B`) both torture sites now hold, or what they
/// hold when they disagree (a partial batch) or hold neither.
fn torture_state() -> Result<usize, (Insn, Insn)> {
    let a = KERNEL_TEXT.read_insn(pm_torture_a as *const () as usize, SITE_LEN);
    let b = KERNEL_TEXT.read_insn(pm_torture_b as *const () as usize, SITE_LEN);
    (0..3)
        .find(|&i| a == returning(TORTURE_A[i]) && b == returning(TORTURE_B[i]))
        .ok_or((a, b))
}

/// The torture sites patched while a CPU is down: once it is back it runs the new code,
/// and it synchronised on its way online. TCG keeps instruction fetch coherent, so a
/// CPU that skipped the synchronisation would still read the new value here; the
/// `online_syncs` count is what fails then (seen red with the sync removed).
pub(super) fn hotplug_patch_offline(_: &Params) -> Verdict {
    let Some(victim) = online_cpus().without(0).iter().last() else {
        return Verdict::Skip(msg!("needs a secondary CPU"));
    };
    let from = match torture_state() {
        Ok(index) => index,
        Err((a, b)) => fail!("torture sites hold {a:#x?} / {b:#x?}"),
    };
    let to = (from + 1) % 3;
    // The victim runs the old code first, so its caches and translations hold it.
    match call_on(victim, pm_torture_a) {
        Ok(value) if value == u64::from(TORTURE_A[from]) => {}
        Ok(value) => fail!(
            "cpu{victim} read {value:#x} before, expected {:#x}",
            TORTURE_A[from]
        ),
        Err(why) => fail!("{}", why.as_str()),
    }
    if let Err(err) = cpu_down(victim) {
        fail!("cpu_down({victim}): {err}");
    }
    let patched = patch_machine(&STOP, &KERNEL_TEXT, &torture_batch(from, to), OPTIONS);
    let syncs = online_syncs(victim);
    let up = cpu_up(victim);
    if let Err(err) = patched {
        fail!("patch_machine with cpu{victim} down: {err}");
    }
    if let Err(err) = up {
        fail!("cpu_up({victim}): {err}");
    }
    check!(
        online_syncs(victim) == syncs + 1,
        "cpu{victim} came online without synchronising (online syncs {syncs} -> {})",
        online_syncs(victim)
    );
    let (a, b) = match (call_on(victim, pm_torture_a), call_on(victim, pm_torture_b)) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(why), _) | (_, Err(why)) => fail!("{}", why.as_str()),
    };
    check!(
        a == u64::from(TORTURE_A[to]) && b == u64::from(TORTURE_B[to]),
        "cpu{victim}, back online, ran {a:#x}/{b:#x}, not the new {:#x}/{:#x}",
        TORTURE_A[to],
        TORTURE_B[to]
    );
    Verdict::Pass(msg!(
        "cpu{victim} ran {a:#x}/{b:#x} after coming back, patched while it was down"
    ))
}

/// What the patcher of the torture saw.
struct Patcher {
    stop: AtomicBool,
    started: AtomicBool,
    applied: AtomicU64,
    refused: AtomicU64,
    /// Patches applied while some CPU was down.
    applied_while_down: AtomicU64,
    /// Patches started while a CPU was going down or up (hotplug held the lock).
    met_hotplug: AtomicU64,
    /// A refusal right after a refusal (the one after an error must succeed).
    refused_twice: AtomicBool,
    /// The first refusal, the first that was not the hotplug lock's bounded wait, and a
    /// batch found half-applied.
    first_error: spin::Mutex<Option<PatchError<Insn>>>,
    other_error: spin::Mutex<Option<PatchError<Insn>>>,
    partial: spin::Mutex<Option<(Insn, Insn)>>,
    /// Static key flips made, and the first refused.
    key_flips: AtomicU64,
    key_error: spin::Mutex<Option<KeyError<Insn>>>,
}

fn patcher(_: usize, p: &Patcher) {
    let all = CpuSet::first(platform::cpu_count());
    p.started.store(true, Ordering::Release);
    let mut last_failed = false;
    while !p.stop.load(Ordering::Acquire) {
        let from = match torture_state() {
            Ok(index) => index,
            Err(seen) => {
                *p.partial.lock() = Some(seen);
                return;
            }
        };
        let down = online_cpus() != all;
        if STOP.hotplug_lock().write_locked() {
            p.met_hotplug.fetch_add(1, Ordering::Relaxed);
        }
        match patch_machine(
            &STOP,
            &KERNEL_TEXT,
            &torture_batch(from, (from + 1) % 3),
            OPTIONS,
        ) {
            Ok(_) => {
                p.applied.fetch_add(1, Ordering::Relaxed);
                if down {
                    p.applied_while_down.fetch_add(1, Ordering::Relaxed);
                }
                last_failed = false;
            }
            Err(err) => {
                // The one refusal hotplug may cause: the lock held past the bound.
                if !matches!(err, PatchError::Stop(StopError::Busy { .. })) {
                    p.other_error.lock().get_or_insert(err);
                }
                p.first_error.lock().get_or_insert(err);
                p.refused.fetch_add(1, Ordering::Relaxed);
                if last_failed {
                    p.refused_twice.store(true, Ordering::Relaxed);
                }
                last_failed = true;
            }
        }
        // Both sites hold the same generation after every call, applied or refused.
        if let Err(seen) = torture_state() {
            *p.partial.lock() = Some(seen);
            return;
        }
        // A static key flip too: the live path's cross-CPU sync (arm64 kick, x86 INT3
        // syncs) waits for every online CPU while CPUs go down and up.
        let key = &platform::BENCH_KEY_1;
        let flipped = if key.is_enabled() {
            platform::STATIC_KEYS.disable(key)
        } else {
            platform::STATIC_KEYS.enable(key)
        };
        match flipped {
            Ok(()) => {
                p.key_flips.fetch_add(1, Ordering::Relaxed);
            }
            Err(err) => {
                p.key_error.lock().get_or_insert(err);
            }
        }
        platform::cpu_yield();
    }
}

/// CPU 0 takes CPUs 2.. down and up `hotplug_cycles` times while CPU 1 patches the
/// torture sites in a loop: no deadlock (every wait is bounded), no partial batch,
/// every patch applied or refused with an error and the one after it applied, and the
/// two overlapped (patches applied while a CPU was down, in at least one cycle).
pub(super) fn hotplug_torture(params: &Params) -> Verdict {
    let all = online_cpus();
    if all.len() < 3 || !all.contains(1) {
        return Verdict::Skip(msg!(
            "needs 3 CPUs: a patcher, a hotplugger and one to take down"
        ));
    }
    let victims = all.without(0).without(1);
    let p = Patcher {
        stop: AtomicBool::new(false),
        started: AtomicBool::new(false),
        applied: AtomicU64::new(0),
        refused: AtomicU64::new(0),
        applied_while_down: AtomicU64::new(0),
        met_hotplug: AtomicU64::new(0),
        refused_twice: AtomicBool::new(false),
        first_error: spin::Mutex::new(None),
        other_error: spin::Mutex::new(None),
        partial: spin::Mutex::new(None),
        key_flips: AtomicU64::new(0),
        key_error: spin::Mutex::new(None),
    };
    // SAFETY: `p` outlives the job: waited for below before returning.
    let job = unsafe { run_on(CpuSet::single(1), patcher, &p) };
    let start = now_ns();
    while !p.started.load(Ordering::Acquire) && now_ns() - start < JOB_TIMEOUT_NS {
        platform::cpu_yield();
    }
    let mut cycles = 0u64;
    let mut interleaved = 0u64;
    let mut hotplug_failure = None;
    let mut victim_iter = victims.iter().cycle();
    for _ in 0..params.hotplug_cycles {
        let Some(victim) = victim_iter.next() else {
            break;
        };
        let before = p.applied.load(Ordering::Relaxed);
        if let Err(err) = cpu_down(victim) {
            hotplug_failure = Some(("cpu_down", victim, err));
            break;
        }
        // Give the patcher a turn with the CPU down (bounded: it may be refused).
        let wait = now_ns();
        while p.applied.load(Ordering::Relaxed) == before && now_ns() - wait < 100_000_000 {
            platform::cpu_yield();
        }
        let during = p.applied.load(Ordering::Relaxed);
        if let Err(err) = cpu_up(victim) {
            hotplug_failure = Some(("cpu_up", victim, err));
            break;
        }
        cycles += 1;
        if during != before {
            interleaved += 1;
        }
    }
    p.stop.store(true, Ordering::Release);
    if let Err(pending) = job.wait(JOB_TIMEOUT_NS) {
        fail!("the patcher on {pending} did not stop");
    }
    if let Some((call, cpu, err)) = hotplug_failure {
        // A CPU left down would fail every later test: try to bring it back first.
        let _ = cpu_up(cpu);
        fail!("{call}({cpu}) in cycle {cycles}: {err}");
    }
    if let Some((a, b)) = *p.partial.lock() {
        fail!("a partial batch: the torture sites hold {a:#x?} / {b:#x?}");
    }
    // The benchmark key ends disabled, as the other tests expect it.
    let key = &platform::BENCH_KEY_1;
    let key_reset = if key.is_enabled() {
        platform::STATIC_KEYS.disable(key)
    } else {
        Ok(())
    };
    if let Some(err) = *p.key_error.lock() {
        fail!("a static key flip refused while CPUs went down and up: {err}");
    }
    if let Err(err) = key_reset {
        fail!("disabling the benchmark key afterwards: {err}");
    }
    let applied = p.applied.load(Ordering::Relaxed);
    let refused = p.refused.load(Ordering::Relaxed);
    let first_error = *p.first_error.lock();
    // An offline (or dying) CPU never blocks a stop, nor does hotplug change the set
    // under one: a patch may only be refused for the time hotplug held the lock.
    if let Some(err) = *p.other_error.lock() {
        fail!(
            "a patch refused while CPUs went down and up: {err} ({refused} refused, {applied} applied)"
        );
    }
    check!(
        !p.refused_twice.load(Ordering::Relaxed),
        "two patches in a row refused (first error: {})",
        Refusal(first_error)
    );
    check!(
        online_cpus() == all,
        "online CPUs {} after the torture",
        online_cpus()
    );
    check!(
        interleaved > 0 && p.applied_while_down.load(Ordering::Relaxed) > 0,
        "no overlap: {cycles} hotplug cycles, {interleaved} with a patch applied while a CPU was down ({applied} patches, {refused} refused: {})",
        Refusal(first_error)
    );
    match stop_everywhere() {
        Ok(ran) => check!(
            ran == all,
            "the stop_machine after the torture ran on {ran}"
        ),
        Err(err) => fail!("the stop_machine after the torture: {err}"),
    }
    Verdict::Pass(msg!(
        "hotplug cycles={cycles} interleaved={interleaved} patches={applied} while_down={} met_hotplug={} key_flips={} refused={refused} ({})",
        p.applied_while_down.load(Ordering::Relaxed),
        p.met_hotplug.load(Ordering::Relaxed),
        p.key_flips.load(Ordering::Relaxed),
        Refusal(first_error)
    ))
}

/// A patch refusal for messages ("none" when there was none).
struct Refusal(Option<PatchError<Insn>>);

impl core::fmt::Display for Refusal {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.0 {
            Some(err) => write!(f, "{err}"),
            None => f.write_str("no refusal"),
        }
    }
}

/// A refusal case: what was called, what it returned, the error it must be.
type Refused = (
    &'static str,
    Result<(), HotplugError>,
    fn(&HotplugError) -> bool,
);

/// Parks a CPU in a job until told to go, so that it is busy.
struct Busy {
    running: AtomicBool,
    release: AtomicBool,
    down_self: spin::Mutex<Option<Result<(), HotplugError>>>,
}

fn busy_job(cpu: usize, busy: &Busy) {
    *busy.down_self.lock() = Some(cpu_down(cpu));
    busy.running.store(true, Ordering::Release);
    let start = now_ns();
    while !busy.release.load(Ordering::Acquire) && now_ns() - start < JOB_TIMEOUT_NS {
        platform::cpu_yield();
    }
}

/// Bad input refused with a clear error and nothing changed: CPU 0, CPUs not present,
/// an online CPU brought up, an offline one taken down again, a CPU taking itself down,
/// a CPU that is running a job.
pub(super) fn hotplug_refusals(_: &Params) -> Verdict {
    let all = online_cpus();
    let count = platform::cpu_count();
    let counts = hotplug::counts();
    let unchanged = |what: &str| -> Option<Verdict> {
        (online_cpus() != all || hotplug::counts() != counts).then(|| {
            Verdict::Fail(msg!(
                "{what} changed something: online {} (was {all}), counts {:?} (were {counts:?})",
                online_cpus(),
                hotplug::counts()
            ))
        })
    };
    let expect =
        |what: &str, got: Result<(), HotplugError>, ok: fn(&HotplugError) -> bool| match got {
            Err(err) if ok(&err) => None,
            Err(err) => Some(Verdict::Fail(msg!("{what}: unexpected error: {err}"))),
            Ok(()) => Some(Verdict::Fail(msg!("{what} was not refused"))),
        };
    let cases: [Refused; 4] = [
        ("cpu_down(0)", cpu_down(0), |e| {
            matches!(e, HotplugError::BootCpu)
        }),
        ("cpu_up(0)", cpu_up(0), |e| {
            matches!(e, HotplugError::BootCpu)
        }),
        ("cpu_down(count)", cpu_down(count), |e| {
            matches!(e, HotplugError::NotPresent { .. })
        }),
        ("cpu_up(MAX_CPUS + 7)", cpu_up(crate::MAX_CPUS + 7), |e| {
            matches!(e, HotplugError::NotPresent { .. })
        }),
    ];
    for (what, got, ok) in cases {
        if let Some(verdict) = expect(what, got, ok).or_else(|| unchanged(what)) {
            return verdict;
        }
    }
    let Some(cpu) = all.without(0).lowest() else {
        return Verdict::Pass(msg!("4 refused, nothing changed (one CPU)"));
    };
    if let Some(v) = expect("cpu_up(online)", cpu_up(cpu), |e| {
        matches!(e, HotplugError::AlreadyOnline(_))
    })
    .or_else(|| unchanged("cpu_up(online)"))
    {
        return v;
    }
    // A CPU taking itself down, and a busy CPU.
    let busy = Busy {
        running: AtomicBool::new(false),
        release: AtomicBool::new(false),
        down_self: spin::Mutex::new(None),
    };
    // SAFETY: `busy` outlives the job: waited for below.
    let job = unsafe { run_on(CpuSet::single(cpu), busy_job, &busy) };
    let start = now_ns();
    while !busy.running.load(Ordering::Acquire) && now_ns() - start < JOB_TIMEOUT_NS {
        platform::cpu_yield();
    }
    let while_busy = cpu_down(cpu);
    busy.release.store(true, Ordering::Release);
    if let Err(pending) = job.wait(JOB_TIMEOUT_NS) {
        fail!("the job on {pending} did not finish");
    }
    let down_self = busy.down_self.lock().unwrap_or(Ok(()));
    if let Some(v) = expect("cpu_down(self)", down_self, |e| {
        matches!(e, HotplugError::Caller(_))
    })
    .or_else(|| {
        expect("cpu_down(busy)", while_busy, |e| {
            matches!(e, HotplugError::Busy(_))
        })
    })
    .or_else(|| unchanged("cpu_down(self or busy)"))
    {
        return v;
    }
    // Down twice, up twice: the second of each refused, the state as the first left it.
    if let Err(err) = cpu_down(cpu) {
        fail!("cpu_down({cpu}): {err}");
    }
    let again = cpu_down(cpu);
    let online_after = online_cpus();
    let up = cpu_up(cpu);
    let up_again = cpu_up(cpu);
    if let Err(err) = up {
        fail!("cpu_up({cpu}): {err}");
    }
    if let Some(v) = expect("cpu_down(offline)", again, |e| {
        matches!(e, HotplugError::AlreadyOffline(_))
    })
    .or_else(|| {
        expect("cpu_up(online again)", up_again, |e| {
            matches!(e, HotplugError::AlreadyOnline(_))
        })
    }) {
        return v;
    }
    check!(
        online_after == all.without(cpu) && online_cpus() == all,
        "online {online_after} while cpu{cpu} was down, {} after",
        online_cpus()
    );
    Verdict::Pass(msg!(
        "9 refused, nothing changed; e.g. '{}'",
        while_busy.map_or_else(|e| e, |()| HotplugError::Busy(cpu))
    ))
}
