//! Static keys in the running kernel: flips while every other CPU runs the sites
//! (`static_keys`), the refusals and the reference counts (`static_key_errors`), and the
//! kernel's own hook (`static_key_hook`, `trace_jobs` in the job loop).

use super::{CALLER_WAIT_NS, CALLS_PER_YIELD, JOB_TIMEOUT_NS, Params, Verdict, others};
use crate::CpuSet;
use crate::kernel::platform::{
    self, KernelKeys, STATIC_KEYS, StaticKey, current_cpu, define_static_key, now_ns,
    static_branch_likely, static_branch_unlikely,
};
use crate::kernel::smp::{JOBS_TRACED, TRACE_JOBS, run_on};
use crate::patch::{Patch, PatchError};
use crate::static_key::{JumpEntry, KeyError, KeyText, StaticKeys, check_tables};
use core::fmt::Write;
use core::ops::Range;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

define_static_key!(
    /// The key `static_keys` flips.
    FLIP_KEY,
    "selftest_flip"
);
define_static_key!(
    /// The key `static_key_errors` counts.
    COUNT_KEY,
    "selftest_count"
);

/// Every site of [`FLIP_KEY`] the callers run, each a separate site: an unlikely one
/// and a likely one, twice (`#[inline(never)]` keeps them one site each).
#[inline(never)]
fn flip_sites() -> [bool; 4] {
    [
        static_branch_unlikely!(FLIP_KEY),
        static_branch_likely!(FLIP_KEY),
        static_branch_unlikely!(FLIP_KEY),
        static_branch_likely!(FLIP_KEY),
    ]
}

#[inline(never)]
fn count_site() -> bool {
    static_branch_unlikely!(COUNT_KEY)
}

/// What the callers share with the flipping CPU.
struct Flips {
    stop: AtomicBool,
    /// `2k`: flip `k` (and every earlier one) returned; `2k + 1`: flip `k + 1` is in
    /// flight. Flip `k` leaves the key enabled when `k` is odd.
    generation: AtomicU64,
    /// Per CPU: the generation of its latest call made entirely inside one even
    /// generation (the handshake the flipper waits for).
    synced: [AtomicU64; crate::MAX_CPUS],
    calls: AtomicU64,
    /// Calls that overlapped a flip in flight.
    overlapping: AtomicU64,
    bad: AtomicU32,
    first_bad: spin::Mutex<Option<(usize, [bool; 4], u64)>>,
}

/// The key's state once the flip that published even `generation` returned.
fn state_at(generation: u64) -> bool {
    (generation / 2) % 2 == 1
}

fn flip_caller(cpu: usize, flips: &Flips) {
    while !flips.stop.load(Ordering::Acquire) {
        // Acquire pairs with the flipper's Release stores: an even generation read
        // here means its flip had returned, so every site is the new instruction for
        // this CPU (the flip's synchronisation reached it before it returned).
        let before = flips.generation.load(Ordering::Acquire);
        let seen = flip_sites();
        let after = flips.generation.load(Ordering::Acquire);
        if before == after && before.is_multiple_of(2) {
            let expected = state_at(before);
            if seen.iter().any(|&s| s != expected) {
                flips.record_bad(cpu, seen, before);
            }
            // Release pairs with the Acquire in `wait_synced`.
            flips.synced[cpu].store(before, Ordering::Release);
        } else {
            // A flip in flight: each site is the old or the new instruction, both of
            // which are a valid answer (old state or new).
            flips.overlapping.fetch_add(1, Ordering::Relaxed);
        }
        if flips
            .calls
            .fetch_add(1, Ordering::Relaxed)
            .is_multiple_of(CALLS_PER_YIELD)
        {
            platform::cpu_yield();
        }
    }
}

impl Flips {
    fn record_bad(&self, cpu: usize, seen: [bool; 4], generation: u64) {
        if self.bad.fetch_add(1, Ordering::Relaxed) == 0 {
            *self.first_bad.lock() = Some((cpu, seen, generation));
        }
    }

    /// Waits (bounded, yielding) until every CPU in `cpus` made a call wholly inside
    /// `generation`; returns those that did not.
    fn wait_synced(&self, cpus: CpuSet, generation: u64) -> CpuSet {
        let start = now_ns();
        loop {
            // Acquire pairs with the Release in `flip_caller`.
            let idle = cpus
                .iter()
                .filter(|&cpu| self.synced[cpu].load(Ordering::Acquire) < generation)
                .fold(CpuSet::EMPTY, CpuSet::with);
            if idle.is_empty() || now_ns() - start > CALLER_WAIT_NS {
                return idle;
            }
            platform::cpu_yield();
        }
    }
}

/// `static_key_flips` flips of a key with four sites (two unlikely, two likely)
/// through `enable`/`disable`, while every other CPU runs the sites in a loop. A call
/// made while no flip was in flight must see every site in the key's current state;
/// each flip must make exactly one batch's cross-CPU synchronisations, taken by every
/// other CPU before it returns; after each flip returns, every other CPU must make such a call (the handshake: it
/// sees the new state, and a CPU that runs nothing is named within a bounded wait).
pub fn static_keys(params: &Params) -> Verdict {
    if let Err(err) = STATIC_KEYS.check() {
        fail!("the kernel's static key tables: {err}");
    }
    let sites = STATIC_KEYS.sites(&FLIP_KEY).count();
    check!(
        sites == 4,
        "{} has {sites} sites, expected 4",
        FLIP_KEY.name()
    );
    let flips = Flips {
        stop: AtomicBool::new(false),
        generation: AtomicU64::new(0),
        synced: [const { AtomicU64::new(0) }; crate::MAX_CPUS],
        calls: AtomicU64::new(0),
        overlapping: AtomicU64::new(0),
        bad: AtomicU32::new(0),
        first_bad: spin::Mutex::new(None),
    };
    let others = others();
    // SAFETY: `flips` outlives the jobs: we wait for them before returning.
    let jobs = unsafe { run_on(others, flip_caller, &flips) };
    let mut failure = None;
    let mut sync_failure = None;
    let mut starved = flips.wait_synced(others, 0);
    let mut starved_at = None;
    let patches_before = STATIC_KEYS.flips();
    let mut flip_ns = 0;
    let count = if starved.is_empty() {
        params.static_key_flips
    } else {
        0
    };
    for k in 1..=u64::from(count) {
        // Release pairs with the callers' Acquire: a call that overlaps the flip sees
        // an odd generation at one end.
        flips.generation.store(2 * k - 1, Ordering::Release);
        // The odd generation is visible before the first site changes (the patch path's
        // barriers follow). An instruction fetch is not ordered with the callers' loads
        // on hardware, so a CPU there could fetch a new site early and be reported; the
        // emulator never fetches ahead of a write.
        core::sync::atomic::fence(Ordering::SeqCst);
        let (syncs_before, _) = platform::key_syncs();
        let start = now_ns();
        let result = if k % 2 == 1 {
            STATIC_KEYS.enable(&FLIP_KEY)
        } else {
            STATIC_KEYS.disable(&FLIP_KEY)
        };
        flip_ns += now_ns() - start;
        if let Err(err) = result {
            failure = Some((k, err));
            break;
        }
        // One batch for the four sites: exactly the architecture's synchronisations
        // for one batch, and every other CPU took the last of them.
        let (syncs_after, acked) = platform::key_syncs();
        let unsynced = others
            .iter()
            .filter(|&cpu| acked(cpu) < syncs_after)
            .fold(CpuSet::EMPTY, CpuSet::with);
        if syncs_after - syncs_before != platform::SYNCS_PER_KEY_BATCH || !unsynced.is_empty() {
            sync_failure = Some((k, syncs_after - syncs_before, unsynced));
            break;
        }
        flips.generation.store(2 * k, Ordering::Release);
        let mine = flip_sites();
        if mine.iter().any(|&s| s != state_at(2 * k)) {
            flips.record_bad(current_cpu(), mine, 2 * k);
        }
        starved = flips.wait_synced(others, 2 * k);
        if !starved.is_empty() {
            starved_at = Some(k);
            break;
        }
    }
    let patches = STATIC_KEYS.flips() - patches_before;
    flips.stop.store(true, Ordering::Release);
    let waited = jobs.wait(JOB_TIMEOUT_NS);
    let _ = STATIC_KEYS.disable(&FLIP_KEY);
    if let Some((k, err)) = failure {
        fail!("flip {k}: {err}");
    }
    if let Some((k, syncs, unsynced)) = sync_failure {
        if !unsynced.is_empty() {
            fail!("flip {k} returned before CPUs {unsynced} took its last synchronisation");
        }
        fail!(
            "flip {k}: {syncs} cross-CPU synchronisations, but one batch makes {}",
            platform::SYNCS_PER_KEY_BATCH
        );
    }
    if !starved.is_empty() {
        match starved_at {
            None => fail!(
                "CPUs {starved} never ran the sites within {} ms of being started",
                CALLER_WAIT_NS / 1_000_000
            ),
            Some(k) => fail!(
                "after flip {k}, CPUs {starved} ran no site in the new state within {} ms",
                CALLER_WAIT_NS / 1_000_000
            ),
        }
    }
    if let Err(pending) = waited {
        fail!("callers on {pending} did not stop");
    }
    if let Some((cpu, seen, generation)) = *flips.first_bad.lock() {
        fail!(
            "{} inconsistent calls; first: cpu{cpu} saw sites {seen:?} with the key {} \
             (flip {} returned, none in flight)",
            flips.bad.load(Ordering::Relaxed),
            if state_at(generation) {
                "enabled"
            } else {
                "disabled"
            },
            generation / 2
        );
    }
    check!(
        patches == count as usize,
        "{count} flips patched {patches} batches"
    );
    Verdict::Pass(msg!(
        "{count} flips of {sites} sites, {} sync(s) each, {} calls on {} CPUs ({} during a flip), {} us per flip",
        platform::SYNCS_PER_KEY_BATCH,
        flips.calls.load(Ordering::Relaxed),
        others.len(),
        flips.overlapping.load(Ordering::Relaxed),
        flip_ns / u64::from(count.max(1)) / 1000
    ))
}

/// Not in the key table: every operation on it is refused.
static ROGUE: StaticKey = StaticKey::new("rogue");

/// The kernel's tables with one entry changed: a site in `.text.nopatch`, or a site
/// naming an address that is not a key.
struct BadTable {
    entries: [JumpEntry; 1],
    keys: [&'static StaticKey; 1],
}

impl KeyText for BadTable {
    type Insn = platform::Insn;
    fn entries(&self) -> &[JumpEntry] {
        &self.entries
    }
    fn keys(&self) -> &[&StaticKey] {
        &self.keys
    }
    fn text_range(&self) -> Range<usize> {
        KernelKeys.text_range()
    }
    fn protected_ranges(&self) -> &[Range<usize>] {
        KernelKeys.protected_ranges()
    }
    fn nop(&self) -> platform::Insn {
        KernelKeys.nop()
    }
    fn branch(&self, site: usize, target: usize) -> Result<platform::Insn, &'static str> {
        KernelKeys.branch(site, target)
    }
    fn patch(&self, batch: &[Patch<platform::Insn>]) -> Result<(), PatchError<platform::Insn>> {
        KernelKeys.patch(batch)
    }
    fn read(&self, site: usize) -> platform::Insn {
        KernelKeys.read(site)
    }
    fn now_ns(&self) -> u64 {
        KernelKeys.now_ns()
    }
    fn relax(&self) {
        KernelKeys.relax()
    }
}

/// Refusals change nothing: a key not in the key table, `dec` at 0, a site in code
/// that is never patched, a site naming no key. Reference counts: the sites are
/// patched on 0 -> 1 and 1 -> 0 only, and `enable`/`disable` set 1 and 0.
pub fn static_key_errors(_: &Params) -> Verdict {
    let site = count_site as *const () as usize;
    let text_now = || KernelKeys.read(site);
    let disabled_text = text_now();
    let patches = || STATIC_KEYS.flips();

    match STATIC_KEYS.enable(&ROGUE) {
        Err(KeyError::UnknownKey { addr }) if addr == &ROGUE as *const _ as usize => {}
        other => fail!("enable(a key not in the key table): got {other:?}"),
    }
    check!(ROGUE.count() == 0, "a refused enable changed the count");

    let p0 = patches();
    match STATIC_KEYS.dec(&COUNT_KEY) {
        Err(err @ KeyError::Underflow { .. }) => crate::kprint!("# refused: {err}\n"),
        other => fail!("dec at count 0: got {other:?}"),
    }
    check!(
        COUNT_KEY.count() == 0 && text_now() == disabled_text && patches() == p0,
        "a refused dec changed the key"
    );

    let steps: [(KeyOp, usize, usize); 7] = [
        (|k| STATIC_KEYS.inc(k), 1, 1),
        (|k| STATIC_KEYS.inc(k), 2, 1),
        (|k| STATIC_KEYS.dec(k), 1, 1),
        (|k| STATIC_KEYS.dec(k), 0, 2),
        (|k| STATIC_KEYS.enable(k), 1, 3),
        (|k| STATIC_KEYS.enable(k), 1, 3),
        (|k| STATIC_KEYS.disable(k), 0, 4),
    ];
    for (i, (step, count, batches)) in steps.into_iter().enumerate() {
        if let Err(err) = step(&COUNT_KEY) {
            fail!("step {i}: {err}");
        }
        check!(
            COUNT_KEY.count() == count && patches() - p0 == batches,
            "step {i}: count {} and {} batches, expected {count} and {batches}",
            COUNT_KEY.count(),
            patches() - p0
        );
        check!(
            count_site() == (count != 0),
            "step {i}: the site says {} with count {count}",
            count_site()
        );
    }
    check!(
        text_now() == disabled_text,
        "disabled again, the site is {:x}",
        text_now()
    );

    // A site in code that is never patched, and a site naming no key: refused when the
    // tables are checked (at the first operation), before anything is written.
    let nopatch = platform::protected_ranges()[0].start;
    let nopatch_text = KernelKeys.read(nopatch);
    let bad = StaticKeys::<BadTable, 4>::new(
        BadTable {
            entries: [JumpEntry {
                site: nopatch,
                target: nopatch + 64,
                key: &COUNT_KEY as *const _ as usize,
                kind: 0,
            }],
            keys: [&COUNT_KEY],
        },
        KernelKeys.nop(),
    );
    match bad.enable(&COUNT_KEY) {
        Err(err @ KeyError::SiteProtected { site, .. }) if site == nopatch => {
            crate::kprint!("# refused: {err}\n")
        }
        other => fail!("a site in .text.nopatch: got {other:?}"),
    }
    check!(
        KernelKeys.read(nopatch) == nopatch_text && COUNT_KEY.count() == 0,
        "a refused table changed the text or the count"
    );
    let unknown = BadTable {
        entries: [JumpEntry {
            site,
            target: site + 64,
            key: &ROGUE as *const _ as usize,
            kind: 0,
        }],
        keys: [&COUNT_KEY],
    };
    match check_tables(&unknown, 4) {
        Err(KeyError::SiteUnknownKey { site: s, .. }) if s == site => {}
        other => fail!("a site naming no key: got {other:?}"),
    }
    Verdict::Pass(msg!(
        "unknown key, underflow, nopatch site refused; 7 count steps, 4 batches"
    ))
}

/// A key operation, for the count steps.
type KeyOp = fn(&StaticKey) -> Result<(), KeyError<platform::Insn>>;

/// What the CPUs of `static_key_refs` share.
struct Refs {
    /// The highest count a CPU saw while it held a reference.
    most: AtomicU64,
    /// First failure: cpu, round, what went wrong.
    failed: spin::Mutex<Option<(usize, u32, &'static str)>>,
    go: AtomicBool,
}

/// Reference rounds per CPU in `static_key_refs`.
const REF_ROUNDS: u32 = 200;

fn ref_rounds(cpu: usize, refs: &Refs) {
    let start = now_ns();
    while !refs.go.load(Ordering::Acquire) && now_ns() - start < CALLER_WAIT_NS {
        platform::cpu_yield();
    }
    for round in 0..REF_ROUNDS {
        if STATIC_KEYS.inc(&COUNT_KEY).is_err() {
            refs.failed.lock().get_or_insert((cpu, round, "inc failed"));
            return;
        }
        // Holding a reference: the site is enabled here, whoever patched it.
        if !count_site() {
            refs.failed.lock().get_or_insert((
                cpu,
                round,
                "the site was disabled while a reference was held",
            ));
        }
        refs.most
            .fetch_max(COUNT_KEY.count() as u64, Ordering::Relaxed);
        platform::cpu_yield();
        if STATIC_KEYS.dec(&COUNT_KEY).is_err() {
            refs.failed.lock().get_or_insert((cpu, round, "dec failed"));
            return;
        }
        // Staggered pauses, so the count also falls to 0 between rounds (1 -> 0 and
        // 0 -> 1 under contention), not only at the end.
        for _ in 0..(round + cpu as u32) % 8 {
            platform::cpu_yield();
        }
    }
}

/// Every CPU takes and drops references to one key at once (`inc`/`dec`, 200 rounds
/// each): while a CPU holds one, its own run of the site takes the enabled arm; at the
/// end the count is 0 and the site disabled, after an even number of batches; and two
/// CPUs must have held the key at once (else nothing concurrent was tested).
pub fn static_key_refs(_: &Params) -> Verdict {
    let others = others();
    if others.is_empty() {
        return Verdict::Skip(msg!("one CPU: nothing concurrent to test"));
    }
    let refs = Refs {
        most: AtomicU64::new(0),
        failed: spin::Mutex::new(None),
        go: AtomicBool::new(false),
    };
    let batches = STATIC_KEYS.flips();
    // SAFETY: `refs` outlives the jobs: we wait for them before returning.
    let jobs = unsafe { run_on(others, ref_rounds, &refs) };
    refs.go.store(true, Ordering::Release);
    ref_rounds(current_cpu(), &refs);
    if let Err(pending) = jobs.wait(JOB_TIMEOUT_NS) {
        fail!("CPUs {pending} did not finish their rounds");
    }
    if let Some((cpu, round, what)) = *refs.failed.lock() {
        fail!("cpu{cpu}, round {round}: {what}");
    }
    let batches = STATIC_KEYS.flips() - batches;
    check!(
        COUNT_KEY.count() == 0 && !count_site() && batches.is_multiple_of(2),
        "after the rounds: count {}, site {}, {batches} batches",
        COUNT_KEY.count(),
        count_site()
    );
    let most = refs.most.load(Ordering::Relaxed);
    check!(
        most >= 2,
        "no two CPUs ever held the key at once (highest count {most}): nothing concurrent"
    );
    Verdict::Pass(msg!(
        "{} CPUs x {REF_ROUNDS} inc/dec, {batches} batches, up to {most} references at once",
        others.len() + 1
    ))
}

fn noop_job(_: usize, _: &()) {}

/// Runs one job on every CPU of `cpus` and returns how many jobs they traced.
fn traced_after_jobs(cpus: CpuSet) -> Result<u64, CpuSet> {
    let traced = || -> u64 { JOBS_TRACED.iter().map(|c| c.load(Ordering::Relaxed)).sum() };
    let before = traced();
    // SAFETY: the argument is a static unit.
    let jobs = unsafe { run_on(cpus, noop_job, &()) };
    jobs.wait(JOB_TIMEOUT_NS)?;
    Ok(traced() - before)
}

/// The kernel's own static key: `trace_jobs` guards a counter in the secondaries' job
/// loop. Off, the jobs are not traced (the site is a NOP); on, every job is; off again,
/// none.
pub fn static_key_hook(_: &Params) -> Verdict {
    let others = others();
    if others.is_empty() {
        return Verdict::Skip(msg!("one CPU: no job loop runs"));
    }
    let n = others.len() as u64;
    let mut seen = [0; 3];
    for (i, on) in [false, true, false].into_iter().enumerate() {
        let set = if on {
            STATIC_KEYS.enable(&TRACE_JOBS)
        } else {
            STATIC_KEYS.disable(&TRACE_JOBS)
        };
        if let Err(err) = set {
            fail!("{}: {err}", TRACE_JOBS.name());
        }
        seen[i] = match traced_after_jobs(others) {
            Ok(traced) => traced,
            Err(pending) => fail!("jobs on {pending} did not finish"),
        };
    }
    check!(
        seen == [0, n, 0],
        "jobs traced with trace_jobs off/on/off: {seen:?}, expected [0, {n}, 0]"
    );
    Verdict::Pass(msg!("{n} jobs traced while on, none while off"))
}
