//! kprobes self-tests: a probe armed and disarmed under CPUs that call its function in
//! a tight loop (`kprobe_hammer`), every simulated instruction class probed
//! (`kprobe_simulate`), the refusals (`kprobe_refusals`), and hits from IRQ and NMI
//! handlers and from inside a probe handler (`kprobe_contexts`).

use super::{Callers, JOB_TIMEOUT_NS, Params, Verdict, others};
use super::{callers_verdict, wait_for_callers};
use crate::harness::Msg;
use crate::kernel::platform::{
    self, KERNEL_TEXT, KPROBES, KprobeFixture, KprobeFrame, STOP, current_cpu, nmi, now_ns,
    set_write_probe,
};
use crate::kernel::smp::run_on;
use crate::kprobes::{Forbidden, KprobeError, ProbeHit, ProbeId};
use crate::patch::Text;
use crate::stop::Arch;
use core::fmt::Write;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Writes of the probed site, counted inside the patch window (the write probe): odd
/// while the probe is armed. A caller that reads it with every exception masked reads
/// the state of the text it executes: no patch window can open meanwhile.
static SITE_WRITES: AtomicU64 = AtomicU64::new(0);
static PRE_HITS: AtomicU64 = AtomicU64::new(0);
static POST_HITS: AtomicU64 = AtomicU64::new(0);
/// Post handler runs that found the probed instruction's effect missing.
static BAD_POSTS: AtomicU64 = AtomicU64::new(0);
/// Per CPU: calls made while the site was armed, as the caller saw it.
static ARMED_CALLS: [AtomicU64; crate::MAX_CPUS] = [const { AtomicU64::new(0) }; crate::MAX_CPUS];

/// A write probe: runs inside the patch window, so it lives in `.text.nopatch`.
#[unsafe(link_section = ".text.nopatch")]
fn count_site_write() {
    // Relaxed: the stop machine's phase transitions order it before every other CPU
    // leaves the rendezvous, and so before any of them reads it again.
    SITE_WRITES.fetch_add(1, Ordering::Relaxed);
}

fn target() -> KprobeFixture {
    platform::KPROBE_TARGET.expect("kprobes_unsupported() is None")
}

fn expected(x: u64) -> u64 {
    x.wrapping_mul(3).wrapping_add(7)
}

fn hammer_pre(_: &ProbeHit, _: &mut KprobeFrame) {
    PRE_HITS.fetch_add(1, Ordering::Relaxed);
}

/// The frame must show the probed instruction's effect (arm64: X1 = 3 * X0).
fn hammer_post(_: &ProbeHit, frame: &mut KprobeFrame) {
    if !platform::kprobe_target_stepped(frame) {
        BAD_POSTS.fetch_add(1, Ordering::Relaxed);
    }
    POST_HITS.fetch_add(1, Ordering::Relaxed);
}

/// One call of the target with every exception masked: returns whether the site was
/// armed for it, recording a wrong result or a site that changed under it.
fn hammer_call(cpu: usize, callers: &Callers, arg: u64) -> bool {
    let saved = STOP.arch().mask_all();
    let before = SITE_WRITES.load(Ordering::Relaxed);
    let value = target().run(arg);
    let after = SITE_WRITES.load(Ordering::Relaxed);
    STOP.arch().restore(saved);
    if value != expected(arg) || before != after {
        callers.record_bad(cpu, value, before, after);
    }
    let armed = before % 2 == 1;
    if armed {
        ARMED_CALLS[cpu].fetch_add(1, Ordering::Relaxed);
    }
    armed
}

fn hammer_caller(cpu: usize, callers: &Callers) {
    let mut arg = cpu as u64 * 1_000_003;
    while !callers.stop.load(Ordering::Acquire) {
        hammer_call(cpu, callers, arg);
        arg = arg.wrapping_add(0x1_0001);
        callers.count_call(cpu);
    }
}

/// The target's probe is armed and disarmed `kprobe_cycles` times while every other CPU
/// calls it; after each arming every caller must call it again before the disarming.
/// Each caller counts the calls it made while the site was armed (masked around the
/// call and the reads of the site's write count, so no patch can fall inside). The pre
/// and post handlers must each have run exactly that often, the probe's own counter
/// must agree, nothing may be missed, every result must be right, and the callers (this
/// CPU included, one call per armed window) must have made armed calls at all.
pub(super) fn kprobe_hammer(params: &Params) -> Verdict {
    if let Some(why) = platform::kprobes_unsupported() {
        return Verdict::Skip(msg!("{why}"));
    }
    let target = target();
    let site = target.site_addr();
    let original = KERNEL_TEXT.read_insn(site, platform::SITE_LEN);
    for counter in [&SITE_WRITES, &PRE_HITS, &POST_HITS, &BAD_POSTS] {
        counter.store(0, Ordering::Relaxed);
    }
    for calls in &ARMED_CALLS {
        calls.store(0, Ordering::Relaxed);
    }
    set_write_probe(Some(count_site_write));
    let id = match KPROBES.register_kprobe(site, Some(hammer_pre), Some(hammer_post)) {
        Ok(id) => id,
        Err(err) => {
            set_write_probe(None);
            fail!("register_kprobe({site:#x}): {err}");
        }
    };
    let callers = Callers::new();
    let others = others();
    let me = current_cpu();
    let mut failure = None;
    let mut starved = None;
    if let Err(err) = KPROBES.disable(id) {
        failure = Some((0, Some(err)));
    }
    // SAFETY: `callers` outlives the jobs: we wait for them before returning.
    let jobs = unsafe { run_on(others, hammer_caller, &callers) };
    let idle = wait_for_callers(&callers, others, &[0; crate::MAX_CPUS]);
    if !idle.is_empty() {
        starved = Some((None, idle));
    }
    let cycles = if starved.is_none() && failure.is_none() {
        params.kprobe_cycles
    } else {
        0
    };
    let mut done = 0;
    for k in 0..u64::from(cycles) {
        if let Err(err) = KPROBES.enable(id) {
            failure = Some((k, Some(err)));
            break;
        }
        if !hammer_call(me, &callers, k) {
            failure = Some((k, None));
            break;
        }
        let since: [u64; crate::MAX_CPUS] =
            core::array::from_fn(|cpu| callers.calls_by[cpu].load(Ordering::Relaxed));
        let idle = wait_for_callers(&callers, others, &since);
        if let Err(err) = KPROBES.disable(id) {
            failure = Some((k, Some(err)));
            break;
        }
        done += 1;
        if !idle.is_empty() {
            starved = Some((Some(k), idle));
            break;
        }
        if callers.bad.load(Ordering::Relaxed) != 0 {
            break;
        }
    }
    callers.stop.store(true, Ordering::Release);
    let waited = jobs.wait(JOB_TIMEOUT_NS);
    set_write_probe(None);
    let stats = KPROBES.unregister_kprobe(id);
    match failure {
        Some((k, Some(err))) => fail!("cycle {k}: {err}"),
        Some((k, None)) => fail!("cycle {k}: a call right after enable returned ran unprobed"),
        None => {}
    }
    if let Some(verdict) = callers_verdict(starved, waited) {
        return verdict;
    }
    let stats = match stats {
        Ok(stats) => stats,
        Err(err) => fail!("unregister_kprobe: {err}"),
    };
    check!(
        KERNEL_TEXT.read_insn(site, platform::SITE_LEN) == original,
        "the site was not restored after unregister"
    );
    if let Some((cpu, value, before, after)) = *callers.first_bad.lock() {
        fail!(
            "cpu{cpu}: target returned {value:#x} (site writes {before} -> {after} during \
             the call; {} bad calls)",
            callers.bad.load(Ordering::Relaxed)
        );
    }
    let writes = SITE_WRITES.load(Ordering::Relaxed);
    check!(
        writes == 2 + 2 * done,
        "{writes} site writes for {done} arm/disarm cycles (expected {})",
        2 + 2 * done
    );
    let armed_calls: u64 = ARMED_CALLS.iter().map(|c| c.load(Ordering::Relaxed)).sum();
    let others_armed = armed_calls - ARMED_CALLS[me].load(Ordering::Relaxed);
    check!(
        armed_calls > 0,
        "no call was made while the probe was armed"
    );
    check!(
        others.is_empty() || others_armed > 0,
        "the other CPUs made no call while the probe was armed"
    );
    let (pre, post) = (
        PRE_HITS.load(Ordering::Relaxed),
        POST_HITS.load(Ordering::Relaxed),
    );
    check!(
        pre == armed_calls && post == armed_calls && stats.hits == armed_calls,
        "callers made {armed_calls} calls while armed, but pre ran {pre}, post {post}, \
         the probe counted {} hits",
        stats.hits
    );
    check!(stats.missed == 0, "{} hits missed", stats.missed);
    let bad_posts = BAD_POSTS.load(Ordering::Relaxed);
    check!(
        bad_posts == 0,
        "{bad_posts} post handlers found the probed instruction's effect missing: the \
         original did not run first"
    );
    Verdict::Pass(msg!(
        "{done} arm/disarm cycles, {armed_calls} armed calls ({others_armed} from {} other CPUs), \
         {} calls by the other CPUs",
        others.len(),
        callers.calls.load(Ordering::Relaxed)
    ))
}

static FIXTURE_PRE: AtomicU64 = AtomicU64::new(0);
static FIXTURE_POST: AtomicU64 = AtomicU64::new(0);

fn fixture_pre(_: &ProbeHit, _: &mut KprobeFrame) {
    FIXTURE_PRE.fetch_add(1, Ordering::Relaxed);
}

fn fixture_post(_: &ProbeHit, _: &mut KprobeFrame) {
    FIXTURE_POST.fetch_add(1, Ordering::Relaxed);
}

/// Every fixture (one per instruction class run out of line or simulated) returns the
/// same probed as unprobed, for both its arguments (a conditional branch's taken and
/// not-taken), and each call hits the probe once, pre and post; the arguments must
/// give different results (both paths are exercised); the site is restored after.
pub(super) fn kprobe_simulate(_: &Params) -> Verdict {
    if let Some(why) = platform::kprobes_unsupported() {
        return Verdict::Skip(msg!("{why}"));
    }
    for fixture in platform::KPROBE_FIXTURES {
        let name = fixture.name;
        let site = fixture.site_addr();
        let original = KERNEL_TEXT.read_insn(site, platform::SITE_LEN);
        let unprobed = fixture.args.map(|arg| fixture.run(arg));
        check!(
            unprobed[0] != unprobed[1],
            "{name}: both arguments give {:#x}: the fixture does not tell its paths apart",
            unprobed[0]
        );
        let (pre0, post0) = (
            FIXTURE_PRE.load(Ordering::Relaxed),
            FIXTURE_POST.load(Ordering::Relaxed),
        );
        let id = match KPROBES.register_kprobe(site, Some(fixture_pre), Some(fixture_post)) {
            Ok(id) => id,
            Err(err) => fail!("{name}: register_kprobe({site:#x}): {err}"),
        };
        let probed = fixture.args.map(|arg| fixture.run(arg));
        let stats = KPROBES.unregister_kprobe(id);
        let (pre, post) = (
            FIXTURE_PRE.load(Ordering::Relaxed) - pre0,
            FIXTURE_POST.load(Ordering::Relaxed) - post0,
        );
        check!(
            probed == unprobed,
            "{name}: probed results {probed:x?}, unprobed {unprobed:x?} (arguments {:x?})",
            fixture.args
        );
        let stats = match stats {
            Ok(stats) => stats,
            Err(err) => fail!("{name}: unregister_kprobe: {err}"),
        };
        check!(
            stats.hits == 2 && pre == 2 && post == 2,
            "{name}: 2 calls, but {} hits, pre ran {pre}, post {post}",
            stats.hits
        );
        check!(
            KERNEL_TEXT.read_insn(site, platform::SITE_LEN) == original,
            "{name}: the site was not restored"
        );
    }
    Verdict::Pass(msg!(
        "{} instruction classes",
        platform::KPROBE_FIXTURES.len()
    ))
}

/// The refusal a `kprobe_refusals` case expects.
#[derive(Clone, Copy)]
enum Expected {
    Misaligned,
    OutsideText,
    Forbidden(Forbidden),
    Unprobeable,
    Duplicate(ProbeId),
}

impl Expected {
    fn matches(self, err: &KprobeError<platform::Insn>) -> bool {
        match (self, err) {
            (Expected::Misaligned, KprobeError::Misaligned { .. })
            | (Expected::OutsideText, KprobeError::OutsideText { .. })
            | (Expected::Unprobeable, KprobeError::Unprobeable { .. }) => true,
            (Expected::Forbidden(want), KprobeError::Forbidden { why, .. }) => *why == want,
            (Expected::Duplicate(want), KprobeError::Duplicate { existing, .. }) => {
                *existing == want
            }
            _ => false,
        }
    }
}

/// Registers a probe at `addr`, which must be refused as `expected` with the text
/// unchanged.
fn refused(addr: usize, what: &str, expected: Expected) -> Result<(), Msg> {
    let text = platform::text_range();
    let word = |addr: usize| text.contains(&addr).then(|| KERNEL_TEXT.read_insn(addr, 4));
    let before = word(addr);
    let result = KPROBES.register_kprobe(addr, Some(fixture_pre), None);
    let after = word(addr);
    match result {
        Ok(id) => {
            let _ = KPROBES.unregister_kprobe(id);
            Err(msg!("{what} ({addr:#x}): accepted"))
        }
        Err(err) if !expected.matches(&err) => Err(msg!(
            "{what} ({addr:#x}): refused for the wrong reason: {err}"
        )),
        Err(_) if before != after => Err(msg!("{what} ({addr:#x}): the text changed")),
        Err(_) => Ok(()),
    }
}

/// Refused, with the reason named and the text unchanged: an address off the
/// instruction grid, one outside text, exception entry, the probe machinery (the core's
/// hit path, the XOL slots), `.text.nopatch`, unprobeable instructions, a duplicate.
pub(super) fn kprobe_refusals(_: &Params) -> Verdict {
    if let Some(why) = platform::kprobes_unsupported() {
        return Verdict::Skip(msg!("{why}"));
    }
    let site = target().site_addr();
    let mut cases = 0;
    let mut check = |addr: usize, what: &str, expected: Expected| {
        cases += 1;
        refused(addr, what, expected)
    };
    let data = &SITE_WRITES as *const AtomicU64 as usize;
    // x86 has no instruction grid to be off (see `kprobe_misaligned_site`).
    let mut result = match platform::kprobe_misaligned_site(site) {
        Some(addr) => check(addr, "misaligned", Expected::Misaligned),
        None => Ok(()),
    }
    .and_then(|()| check(data, "data", Expected::OutsideText));
    for (why, addr) in platform::kprobe_forbidden_sites() {
        result = result.and_then(|()| check(addr, why.what(), Expected::Forbidden(why)));
    }
    for (name, insn) in platform::KPROBE_UNPROBEABLE {
        result = result.and_then(|()| check(*insn as usize, name, Expected::Unprobeable));
    }
    if let Err(msg) = result {
        return Verdict::Fail(msg);
    }
    let id = match KPROBES.register_kprobe(site, Some(fixture_pre), None) {
        Ok(id) => id,
        Err(err) => fail!("register_kprobe({site:#x}): {err}"),
    };
    let duplicate = check(site, "a second probe", Expected::Duplicate(id));
    let removed = KPROBES.unregister_kprobe(id);
    if let Err(msg) = duplicate {
        return Verdict::Fail(msg);
    }
    if let Err(err) = removed {
        fail!("unregister_kprobe: {err}");
    }
    check!(
        KPROBES.unregister_kprobe(id) == Err(KprobeError::UnknownProbe(id)),
        "a removed probe's id was accepted again"
    );
    Verdict::Pass(msg!("{cases} refusals"))
}

static CONTEXT_PRE: AtomicU64 = AtomicU64::new(0);
/// Per CPU: an IRQ or NMI call of the target is wanted (set by the test, cleared by the
/// handler that makes it).
static WANT_IRQ: [AtomicBool; crate::MAX_CPUS] =
    [const { AtomicBool::new(false) }; crate::MAX_CPUS];
static WANT_NMI: [AtomicBool; crate::MAX_CPUS] =
    [const { AtomicBool::new(false) }; crate::MAX_CPUS];
static CONTEXT_CALLS: AtomicU64 = AtomicU64::new(0);
static CONTEXT_BAD: AtomicU64 = AtomicU64::new(0);
/// The NMI handler slot of this test (0: the stop machine, 1: NMI tests, 2: bench).
const KPROBE_NMI_SLOT: usize = 3;

fn context_pre(_: &ProbeHit, _: &mut KprobeFrame) {
    CONTEXT_PRE.fetch_add(1, Ordering::Relaxed);
}

fn call_target_counted() {
    let arg = 41;
    if target().run(arg) != expected(arg) {
        CONTEXT_BAD.fetch_add(1, Ordering::Relaxed);
    }
    CONTEXT_CALLS.fetch_add(1, Ordering::Relaxed);
}

fn context_ipi(cpu: usize) {
    if WANT_IRQ[cpu].swap(false, Ordering::AcqRel) {
        call_target_counted();
    }
}

fn context_nmi(cpu: usize) -> bool {
    let wanted = WANT_NMI[cpu].swap(false, Ordering::AcqRel);
    if wanted {
        call_target_counted();
    }
    wanted
}

/// A pre handler that calls a probed function: that hit must be missed.
fn nesting_pre(_: &ProbeHit, _: &mut KprobeFrame) {
    CONTEXT_PRE.fetch_add(1, Ordering::Relaxed);
    call_target_counted();
}

/// Waits (bounded) until `CONTEXT_CALLS` reaches `calls`.
fn wait_calls(calls: u64) -> bool {
    let start = now_ns();
    while CONTEXT_CALLS.load(Ordering::Relaxed) < calls {
        if now_ns() - start > 1_000_000_000 {
            return false;
        }
        platform::cpu_yield();
    }
    true
}

/// The target's probe hit from a test IPI's handler on every CPU and from an NMI
/// handler on every CPU (where there are NMIs): each call runs the pre handler once
/// and returns the right value. Then a probe whose pre handler calls the probed target:
/// those hits are counted missed and run no handler, and the result is still right.
pub(super) fn kprobe_contexts(_: &Params) -> Verdict {
    if let Some(why) = platform::kprobes_unsupported() {
        return Verdict::Skip(msg!("{why}"));
    }
    let target = target();
    let everyone = platform::online_cpus();
    let id = match KPROBES.register_kprobe(target.site_addr(), Some(context_pre), None) {
        Ok(id) => id,
        Err(err) => fail!("register_kprobe: {err}"),
    };
    let (pre0, calls0, bad0) = (
        CONTEXT_PRE.load(Ordering::Relaxed),
        CONTEXT_CALLS.load(Ordering::Relaxed),
        CONTEXT_BAD.load(Ordering::Relaxed),
    );
    let ipi = platform::TEST_IPIS[0];
    platform::set_ipi_handler(ipi, context_ipi);
    for cpu in everyone.iter() {
        WANT_IRQ[cpu].store(true, Ordering::Release);
    }
    platform::send_ipi(ipi, everyone);
    let irq_ok = wait_calls(calls0 + everyone.len() as u64);
    platform::clear_ipi_handler(ipi);
    let mut nmi_cpus = 0;
    let mut nmi_ok = true;
    if platform::nmi_mechanism().is_ok() && irq_ok {
        nmi::register_nmi_handler(KPROBE_NMI_SLOT, context_nmi);
        for cpu in everyone.iter() {
            WANT_NMI[cpu].store(true, Ordering::Release);
        }
        nmi::send_nmi(everyone);
        nmi_ok = wait_calls(calls0 + 2 * everyone.len() as u64);
        nmi::unregister_nmi_handler(KPROBE_NMI_SLOT);
        nmi_cpus = everyone.len();
    }
    let stats = KPROBES.unregister_kprobe(id);
    check!(
        irq_ok,
        "the IPI handlers made {} of {} calls",
        CONTEXT_CALLS.load(Ordering::Relaxed) - calls0,
        everyone.len()
    );
    check!(
        nmi_ok,
        "the NMI handlers did not all call the target within 1 s"
    );
    let stats = match stats {
        Ok(stats) => stats,
        Err(err) => fail!("unregister_kprobe: {err}"),
    };
    let calls = CONTEXT_CALLS.load(Ordering::Relaxed) - calls0;
    let pre = CONTEXT_PRE.load(Ordering::Relaxed) - pre0;
    check!(
        stats.hits == calls && pre == calls && stats.missed == 0,
        "{calls} calls from IRQ/NMI handlers, but {} hits ({} missed), pre ran {pre}",
        stats.hits,
        stats.missed
    );

    // A probe hit inside a probe handler.
    let outer_fixture = platform::KPROBE_FIXTURES[0];
    let outer = KPROBES.register_kprobe(outer_fixture.site_addr(), Some(nesting_pre), None);
    let inner = KPROBES.register_kprobe(target.site_addr(), Some(context_pre), None);
    let (outer, inner) = match (outer, inner) {
        (Ok(o), Ok(i)) => (o, i),
        (o, i) => {
            for id in [o.ok(), i.ok()].into_iter().flatten() {
                let _ = KPROBES.unregister_kprobe(id);
            }
            fail!("registering the nested probes failed");
        }
    };
    let (pre1, calls1) = (
        CONTEXT_PRE.load(Ordering::Relaxed),
        CONTEXT_CALLS.load(Ordering::Relaxed),
    );
    let results = outer_fixture.args.map(|arg| outer_fixture.run(arg));
    let unprobed_ok = {
        let (o, i) = (
            KPROBES.unregister_kprobe(outer),
            KPROBES.unregister_kprobe(inner),
        );
        (o, i)
    };
    let (o, i) = match unprobed_ok {
        (Ok(o), Ok(i)) => (o, i),
        _ => fail!("unregistering the nested probes failed"),
    };
    let expected_results = outer_fixture.args.map(|arg| outer_fixture.run(arg));
    check!(
        results == expected_results,
        "nested: results {results:x?}, expected {expected_results:x?}"
    );
    let nested_calls = CONTEXT_CALLS.load(Ordering::Relaxed) - calls1;
    let pre = CONTEXT_PRE.load(Ordering::Relaxed) - pre1;
    check!(
        o.hits == 2
            && o.missed == 0
            && i.hits == 0
            && i.missed == 2
            && nested_calls == 2
            && pre == 2,
        "nested: outer {} hits {} missed, inner {} hits {} missed, {nested_calls} nested calls, \
         pre ran {pre} (expected 2/0, 0/2, 2, 2)",
        o.hits,
        o.missed,
        i.hits,
        i.missed
    );
    let bad = CONTEXT_BAD.load(Ordering::Relaxed) - bad0;
    check!(bad == 0, "{bad} calls of the target returned a wrong value");
    Verdict::Pass(msg!(
        "{} calls from IRQ handlers, {} from NMI handlers, 2 nested hits missed",
        everyone.len(),
        nmi_cpus
    ))
}

/// Rounds of `kprobe_registry` on each CPU.
const REGISTRY_ROUNDS: u32 = 20;

/// A failed round: CPU, round, what, and the error if there was one.
type RoundFailure = (
    usize,
    u32,
    &'static str,
    Option<KprobeError<platform::Insn>>,
);

/// What the CPUs of `kprobe_registry` share.
struct Registrars {
    /// CPUs at the start line, and how many there are: all start at once.
    ready: AtomicU64,
    cpus: u64,
    /// CPUs inside a round (between their first registration and their last removal)
    /// now, and the most seen at once.
    in_flight: AtomicU64,
    most: AtomicU64,
    /// Rounds in which a CPU won the shared site.
    shared_won: AtomicU64,
    /// The first failure: CPU, round, what, and the error if there was one.
    failed: spin::Mutex<Option<RoundFailure>>,
}

impl Registrars {
    fn fail(
        &self,
        cpu: usize,
        round: u32,
        what: &'static str,
        err: Option<KprobeError<platform::Insn>>,
    ) {
        self.failed.lock().get_or_insert((cpu, round, what, err));
    }
}

/// One CPU's rounds: register a probe on its own fixture and one on the shared target
/// (at most one CPU may win it), call what it holds, check the hits, unregister.
fn registry_rounds(cpu: usize, r: &Registrars) {
    r.ready.fetch_add(1, Ordering::AcqRel);
    let start = now_ns();
    while r.ready.load(Ordering::Acquire) < r.cpus && now_ns() - start < 1_000_000_000 {
        platform::cpu_yield();
    }
    let fixtures = platform::KPROBE_FIXTURES;
    let own = fixtures[cpu % fixtures.len()];
    // More CPUs than fixtures, or than the registry has slots besides the shared
    // site's: the extra CPUs contend for the shared site only.
    let own = (cpu < fixtures.len().min(KPROBES.capacity() - 1)).then_some(own);
    let unprobed = own.map(|f| f.run(f.args[0]));
    let target = target();
    for round in 0..REGISTRY_ROUNDS {
        let now = r.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        r.most.fetch_max(now, Ordering::SeqCst);
        let own_id = own.map(|f| KPROBES.register_kprobe(f.site_addr(), Some(fixture_pre), None));
        // Under single-threaded TCG a CPU stopping the machine back to back leaves the
        // others no time of their own between two rendezvous: hand the host over.
        for _ in 0..4 {
            platform::cpu_yield();
        }
        let shared = KPROBES.register_kprobe(target.site_addr(), Some(fixture_pre), None);
        for _ in 0..4 {
            platform::cpu_yield();
        }
        match shared {
            Ok(id) => {
                r.shared_won.fetch_add(1, Ordering::Relaxed);
                if target.run(1) != expected(1) {
                    r.fail(cpu, round, "the shared target returned a wrong value", None);
                }
                match KPROBES.unregister_kprobe(id) {
                    Ok(stats) if stats.hits == 1 => {}
                    Ok(_) => r.fail(cpu, round, "the shared probe's hit count is not 1", None),
                    Err(err) => r.fail(cpu, round, "unregistering the shared probe", Some(err)),
                }
            }
            Err(KprobeError::Duplicate { .. }) => {}
            Err(err) => r.fail(cpu, round, "registering the shared probe", Some(err)),
        }
        if let (Some(fixture), Some(own_id)) = (own, own_id) {
            let id = match own_id {
                Ok(id) => id,
                Err(err) => {
                    r.fail(cpu, round, "registering its own probe", Some(err));
                    r.in_flight.fetch_sub(1, Ordering::SeqCst);
                    return;
                }
            };
            if Some(fixture.run(fixture.args[0])) != unprobed {
                r.fail(
                    cpu,
                    round,
                    "its own probed fixture returned a wrong value",
                    None,
                );
            }
            match KPROBES.unregister_kprobe(id) {
                Ok(stats) if stats.hits == 1 => {}
                Ok(_) => r.fail(cpu, round, "its own probe's hit count is not 1", None),
                Err(err) => r.fail(cpu, round, "unregistering its own probe", Some(err)),
            }
        }
        r.in_flight.fetch_sub(1, Ordering::SeqCst);
        if r.failed.lock().is_some() {
            return;
        }
    }
}

/// Every CPU registers and unregisters probes at once, `REGISTRY_ROUNDS` rounds each:
/// one on a fixture of its own (each call of it hits its probe once, with the right
/// result) and one on the shared target, which at most one CPU holds at a time (the
/// others are refused as duplicates, nothing else). Two CPUs must have been inside a
/// round at once (else nothing concurrent was tested), the shared site must have
/// been won, and every site is restored at the end.
pub(super) fn kprobe_registry(_: &Params) -> Verdict {
    if let Some(why) = platform::kprobes_unsupported() {
        return Verdict::Skip(msg!("{why}"));
    }
    let others = others();
    if others.is_empty() {
        return Verdict::Skip(msg!("one CPU: nothing concurrent to test"));
    }
    let sites: [Option<(usize, platform::Insn)>; 32] = core::array::from_fn(|i| {
        let site = if i == 0 {
            Some(target().site_addr())
        } else {
            platform::KPROBE_FIXTURES.get(i - 1).map(|f| f.site_addr())
        };
        site.map(|s| (s, KERNEL_TEXT.read_insn(s, platform::SITE_LEN)))
    });
    let r = Registrars {
        ready: AtomicU64::new(0),
        cpus: others.len() as u64 + 1,
        in_flight: AtomicU64::new(0),
        most: AtomicU64::new(0),
        shared_won: AtomicU64::new(0),
        failed: spin::Mutex::new(None),
    };
    // SAFETY: `r` outlives the jobs: we wait for them before returning.
    let jobs = unsafe { run_on(others, registry_rounds, &r) };
    registry_rounds(current_cpu(), &r);
    if let Err(pending) = jobs.wait(JOB_TIMEOUT_NS) {
        fail!("CPUs {pending} did not finish their rounds");
    }
    if let Some((cpu, round, what, err)) = *r.failed.lock() {
        match err {
            Some(err) => fail!("cpu{cpu}, round {round}: {what}: {err}"),
            None => fail!("cpu{cpu}, round {round}: {what}"),
        }
    }
    for (site, original) in sites.iter().flatten() {
        check!(
            KERNEL_TEXT.read_insn(*site, platform::SITE_LEN) == *original,
            "the site at {site:#x} was left changed"
        );
    }
    let (most, won) = (
        r.most.load(Ordering::Relaxed),
        r.shared_won.load(Ordering::Relaxed),
    );
    check!(
        most >= 2,
        "no two CPUs were ever inside a round at once: nothing concurrent was tested"
    );
    check!(won > 0, "no CPU ever won the shared site");
    Verdict::Pass(msg!(
        "{} CPUs x {REGISTRY_ROUNDS} rounds, up to {most} CPUs inside a round at once, shared site won {won} times",
        others.len() + 1
    ))
}
