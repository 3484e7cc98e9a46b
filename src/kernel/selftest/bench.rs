//! Benchmarks (`tests=bench`, or `./qemu.sh --bench`): latency of the rendezvous and of
//! patching, measured in the guest with the architectural counter.
//!
//! Each figure is one KTAP diagnostic line,
//! `# bench <name> cpus=<n> sites=<k> median_ns=<x> p99_ns=<y> iters=<i>`,
//! taken over `iters` timed runs after a warm-up. `ipi_roundtrip` is the physical
//! limit every other figure is compared with: one NMI-priority broadcast to the other
//! CPUs and their acknowledgements (with a single CPU: an NMI to itself). With
//! `pseudo_nmi=off` it is the same round trip with a normal-priority SGI, and the
//! NMI-mode stop is skipped.

use super::{Msg, OPTIONS, Params, Verdict};
use crate::CpuSet;
use crate::kernel::platform::KERNEL_TEXT;
use crate::kernel::platform::returning;
use crate::kernel::platform::{self, Insn, NOP, SITE_LEN, STATIC_KEYS, STOP, nmi};
use crate::kprint;
use crate::patch::{Patch, PatchError, Text, patch_machine};
use crate::stop::{Arch, CallProfile, StopError};
use core::fmt::Write;
use core::sync::atomic::{AtomicU64, Ordering};

use super::{pm_nosync_branch_dest, pm_nosync_target};

unsafe extern "C" {
    fn pm_bench_sites();
}

/// Patch sites in `pm_bench_sites` (targets.S).
const BENCH_SITES: usize = 1000;
/// The batch sizes measured.
const BATCH_SIZES: [usize; 4] = [1, 10, 100, 1000];
/// The NMI handler slot of the round-trip benchmark (1 is the NMI self-tests').
const BENCH_SLOT: usize = 2;
/// The SGI of the round trip without NMIs.
const BENCH_SGI: u32 = platform::TEST_IPIS[1];
/// How long one round trip may take before the benchmark gives up.
const ROUNDTRIP_TIMEOUT_NS: u64 = 1_000_000_000;
/// How long the benchmarking CPU idles before each timed iteration, so that every
/// iteration starts with the other CPUs back in their idle loop: a latency, not the
/// throughput of back-to-back calls (whose tail, on an emulator that runs one vCPU at a
/// time, lands in the next call's gather).
const SETTLE_NS: u64 = 200_000;
/// Upper bound on timed iterations (the sample buffer is static: no heap).
const MAX_ITERS: usize = 4096;

/// Timed samples of the benchmark running now (only the boot CPU runs benchmarks).
static SAMPLES: spin::Mutex<[u64; MAX_ITERS]> = spin::Mutex::new([0; MAX_ITERS]);
/// Both directions of the batch benchmark: NOP -> MOVZ and back.
static BATCHES: spin::Mutex<[[Patch<Insn>; BENCH_SITES]; 2]> =
    spin::Mutex::new([[Patch::new(0, NOP, NOP); BENCH_SITES]; 2]);
/// Per CPU: round-trip interrupts acknowledged.
static ACKS: [AtomicU64; crate::MAX_CPUS] = [const { AtomicU64::new(0) }; crate::MAX_CPUS];
/// Round trips sent so far (see [`roundtrip`]).
static ROUNDS: AtomicU64 = AtomicU64::new(0);

/// Iterations of each profile.
const PROFILE_ITERS: usize = 200;
/// Per profiled iteration: total, setup, arrive, run, exit, what lies outside the
/// rendezvous (validation and everything else the caller does around it), and the
/// longest time another CPU spent masked (`masked_max_ns`).
static PROFILE: spin::Mutex<[[u64; PROFILE_ITERS]; 7]> = spin::Mutex::new([[0; PROFILE_ITERS]; 7]);

/// Median and 99th percentile of one benchmark.
struct Stats {
    median_ns: u64,
    p99_ns: u64,
    iters: usize,
}

/// Runs `step` `warmup` times untimed, then `iters` times timed, and summarises.
fn measure<E>(
    warmup: usize,
    iters: usize,
    mut step: impl FnMut(usize) -> Result<(), E>,
) -> Result<Stats, E> {
    let iters = iters.clamp(1, MAX_ITERS);
    for i in 0..warmup {
        step(i)?;
    }
    let mut samples = SAMPLES.lock();
    for (i, sample) in samples[..iters].iter_mut().enumerate() {
        settle();
        let start = platform::now_ns();
        step(warmup + i)?;
        *sample = platform::now_ns() - start;
    }
    let sorted = &mut samples[..iters];
    sorted.sort_unstable();
    Ok(Stats {
        median_ns: percentile(sorted, 50),
        p99_ns: percentile(sorted, 99),
        iters,
    })
}

/// Runs `a` and `b` alternately, `pairs` times each after a warm-up, each timed run
/// after its own settle: the two medians see the same emulator speed, so their ratio
/// does not move with the host's load between two benchmarks taken seconds apart (on a
/// shared 2-core machine the medians of one boot drift by up to 2x from one benchmark
/// to the next).
fn measure_paired<E>(
    pairs: usize,
    mut a: impl FnMut(usize) -> Result<(), E>,
    mut b: impl FnMut(usize) -> Result<(), E>,
) -> Result<(Stats, Stats), E> {
    let pairs = pairs.clamp(1, MAX_ITERS / 2);
    for i in 0..10 {
        a(i)?;
        b(i)?;
    }
    let mut samples = SAMPLES.lock();
    let (first, second) = samples.split_at_mut(pairs);
    for (i, (sample_a, sample_b)) in first.iter_mut().zip(second.iter_mut()).enumerate() {
        settle();
        let start = platform::now_ns();
        a(i)?;
        *sample_a = platform::now_ns() - start;
        settle();
        let start = platform::now_ns();
        b(i)?;
        *sample_b = platform::now_ns() - start;
    }
    let stats = |sorted: &mut [u64]| {
        sorted.sort_unstable();
        Stats {
            median_ns: percentile(sorted, 50),
            p99_ns: percentile(sorted, 99),
            iters: pairs,
        }
    };
    let stats_a = stats(&mut first[..pairs]);
    let stats_b = stats(&mut second[..pairs]);
    Ok((stats_a, stats_b))
}

/// `# ratio <name>/ipi_roundtrip cpus=<n> sites=<k> ratio=<r> median_ns=<x>
/// roundtrip_median_ns=<y> p99_ns=.. roundtrip_p99_ns=.. pairs=<i>`: one figure and the
/// round trip measured alternately ([`measure_paired`]).
fn report_ratio(name: &str, sites: usize, stats: &Stats, roundtrip: &Stats) {
    let ratio_x100 = (stats.median_ns * 100).div_ceil(roundtrip.median_ns.max(1));
    kprint!(
        "# ratio {name}/ipi_roundtrip cpus={} sites={sites} ratio={}.{:02} median_ns={} \
         roundtrip_median_ns={} p99_ns={} roundtrip_p99_ns={} pairs={}\n",
        platform::online_cpus().len(),
        ratio_x100 / 100,
        ratio_x100 % 100,
        stats.median_ns,
        roundtrip.median_ns,
        stats.p99_ns,
        roundtrip.p99_ns,
        stats.iters
    );
}

/// The nearest-rank `percent`ile of `sorted` (ascending, not empty).
fn percentile(sorted: &[u64], percent: usize) -> u64 {
    sorted[(sorted.len() * percent).div_ceil(100).max(1) - 1]
}

/// Lets the other CPUs finish whatever the last iteration left them doing.
fn settle() {
    let until = platform::now_ns() + SETTLE_NS;
    while platform::now_ns() < until {
        STOP.arch().relax();
    }
}

fn report(name: &str, sites: usize, stats: &Stats) {
    kprint!(
        "# bench {name} cpus={} sites={sites} median_ns={} p99_ns={} iters={}\n",
        platform::online_cpus().len(),
        stats.median_ns,
        stats.p99_ns,
        stats.iters
    );
}

/// Runs `step` (one stop-machine call, or a patch built on one) `iters` times after a
/// warm-up and prints where the time went, as medians of
/// [`CallProfile`](crate::stop::CallProfile)'s spans:
/// `# profile <name> cpus=<n> sites=<k> total_ns=.. outside_ns=.. setup_ns=.. arrive_ns=.. run_ns=.. exit_ns=.. iters=<i>`,
/// then the longest time any other CPU spent masked in each call, as a benchmark of its
/// own (`# bench <name>_masked_max ...`, which `tools/bench_report.py` sets against the
/// round trip) and as a ratio to `roundtrip` of the same boot:
/// `# masked_max <name> cpus=<n> sites=<k> median_ns=.. p99_ns=.. roundtrip_median_ns=.. ratio=<r> p99_ratio=<r>`.
fn profile<E: From<MaskedUnreported>>(
    name: &str,
    sites: usize,
    iters: usize,
    roundtrip: &Stats,
    mut step: impl FnMut(usize) -> Result<(), E>,
) -> Result<(), E> {
    let iters = iters.clamp(1, PROFILE_ITERS) & !1;
    for i in 0..iters.max(2) {
        step(i)?;
    }
    let mut samples = PROFILE.lock();
    for i in 0..iters {
        settle();
        let start = platform::now_ns();
        step(i)?;
        let total = platform::now_ns() - start;
        let CallProfile {
            setup_ns,
            arrive_ns,
            run_ns,
            exit_ns,
            masked_max_ns,
            masked_unreported,
            ..
        } = STOP.last_call_profile();
        if !masked_unreported.is_empty() {
            return Err(MaskedUnreported(masked_unreported).into());
        }
        let inside = setup_ns + arrive_ns + run_ns + exit_ns;
        let row = [
            total,
            setup_ns,
            arrive_ns,
            run_ns,
            exit_ns,
            total.saturating_sub(inside),
            masked_max_ns,
        ];
        for (column, value) in samples.iter_mut().zip(row) {
            column[i] = value;
        }
    }
    let mut medians = [0; 7];
    for (median, column) in medians.iter_mut().zip(samples.iter_mut()) {
        let column = &mut column[..iters];
        column.sort_unstable();
        *median = percentile(column, 50);
    }
    let [total, setup, arrive, run, exit, outside, masked_max] = medians;
    let masked_max = Stats {
        median_ns: masked_max,
        p99_ns: percentile(&samples[6][..iters], 99),
        iters,
    };
    kprint!(
        "# profile {name} cpus={} sites={sites} total_ns={total} outside_ns={outside} \
         setup_ns={setup} arrive_ns={arrive} run_ns={run} exit_ns={exit} iters={iters}\n",
        platform::online_cpus().len(),
    );
    let mut masked_name = Msg::new();
    let _ = write!(masked_name, "{name}_masked_max");
    report(masked_name.as_str(), sites, &masked_max);
    let base = roundtrip.median_ns.max(1);
    let (ratio, p99_ratio) = (
        (masked_max.median_ns * 100).div_ceil(base),
        (masked_max.p99_ns * 100).div_ceil(base),
    );
    kprint!(
        "# masked_max {name} cpus={} sites={sites} median_ns={} p99_ns={} \
         roundtrip_median_ns={} ratio={}.{:02} p99_ratio={}.{:02}\n",
        platform::online_cpus().len(),
        masked_max.median_ns,
        masked_max.p99_ns,
        roundtrip.median_ns,
        ratio / 100,
        ratio % 100,
        p99_ratio / 100,
        p99_ratio % 100,
    );
    Ok(())
}

/// A participant that had not left the window when the profile was read: stuck masked
/// for a whole stall timeout.
struct MaskedUnreported(CpuSet);

impl From<MaskedUnreported> for StopError {
    fn from(MaskedUnreported(cpus): MaskedUnreported) -> StopError {
        StopError::Timeout {
            missing: cpus,
            waited_ns: OPTIONS.stall_timeout_ns,
        }
    }
}

impl From<MaskedUnreported> for PatchError<Insn> {
    fn from(unreported: MaskedUnreported) -> PatchError<Insn> {
        PatchError::Stop(unreported.into())
    }
}

fn count_ack(cpu: usize) -> bool {
    ACKS[cpu].fetch_add(1, Ordering::Release);
    // The sender waits in WFE, as the rendezvous does: the round trip costs what the
    // rendezvous's own hand-offs cost.
    STOP.arch().wake_waiters();
    true
}

fn count_sgi_ack(cpu: usize) {
    count_ack(cpu);
}

/// One broadcast to `targets` and the wait for every acknowledgement.
///
/// Each target's counter is compared with the round number (the benchmark sends every
/// round to the same targets, each acknowledges each round once), read by a cursor
/// that moves past a CPU once it has answered: no per-round copy of `MAX_CPUS`
/// counters, so the baseline costs what the rendezvous's own gather costs.
fn roundtrip(targets: CpuSet, send: fn(CpuSet)) -> Result<(), CpuSet> {
    // Relaxed: only the benchmarking CPU counts rounds.
    let round = ROUNDS.fetch_add(1, Ordering::Relaxed) + 1;
    let start = platform::now_ns();
    send(targets);
    let mut pending = targets.iter().peekable();
    loop {
        // Acquire pairs with the Release in `count_ack`.
        while pending
            .next_if(|&cpu| ACKS[cpu].load(Ordering::Acquire) >= round)
            .is_some()
        {}
        if pending.peek().is_none() {
            return Ok(());
        }
        if platform::now_ns() - start > ROUNDTRIP_TIMEOUT_NS {
            return Err(pending.fold(CpuSet::EMPTY, CpuSet::with));
        }
        STOP.arch().relax();
    }
}

/// One NMI (or IPI) to the calling CPU and the wait for its own acknowledgement; leaves
/// [`ROUNDS`] alone, so the other CPUs' counts still match it.
fn self_roundtrip(me: usize, send: fn(CpuSet)) -> Result<(), CpuSet> {
    // Relaxed: this CPU's own counter, bumped by its own handler.
    let before = ACKS[me].load(Ordering::Relaxed);
    let start = platform::now_ns();
    send(CpuSet::single(me));
    while ACKS[me].load(Ordering::Relaxed) == before {
        if platform::now_ns() - start > ROUNDTRIP_TIMEOUT_NS {
            return Err(CpuSet::single(me));
        }
        STOP.arch().relax();
    }
    Ok(())
}

fn bench_sites() -> usize {
    pm_bench_sites as *const () as usize
}

/// Fills both directions of the batch benchmark, one entry per site.
fn fill_batches(batches: &mut [[Patch<Insn>; BENCH_SITES]; 2]) {
    let other = returning(0x0b0b);
    let [forwards, backs] = batches;
    for (index, (forward, back)) in forwards.iter_mut().zip(backs.iter_mut()).enumerate() {
        *forward = Patch::new(bench_sites() + SITE_LEN * index, NOP, other);
        *back = forward.reversed();
    }
}

/// Every benchmark, one line each; a failure of the machinery fails the test.
pub fn bench(_: &Params) -> Verdict {
    let online = platform::online_cpus();
    let me = platform::current_cpu();
    let others = online.without(me);
    let targets = if others.is_empty() {
        CpuSet::single(me)
    } else {
        others
    };

    // The physical limit: one interrupt round trip to every other CPU.
    let send = roundtrip_handlers(true);
    let roundtrip_stats = measure(100, 2000, |_| roundtrip(targets, send));
    roundtrip_handlers(false);
    let roundtrip_stats = match roundtrip_stats {
        Ok(stats) => stats,
        Err(missing) => fail!("ipi_roundtrip: no acknowledgement from {missing} within 1 s"),
    };
    report("ipi_roundtrip", 0, &roundtrip_stats);

    let empty = |_: usize| -> Result<(), i32> { Ok(()) };
    match measure(50, 1000, |_| STOP.stop_machine(&empty, online, OPTIONS)) {
        Ok(stats) => report("stop_machine", 0, &stats),
        Err(err) => fail!("stop_machine: {err}"),
    }
    #[cfg(feature = "stop-machine-nmi")]
    if platform::nmi_mechanism().is_ok() {
        // SAFETY: the function touches nothing.
        let function = unsafe { crate::stop::NmiSafe::new(&empty) };
        match measure(50, 1000, |_| {
            STOP.stop_machine_nmi(function, online, OPTIONS)
        }) {
            Ok(stats) => report("stop_machine_nmi", 0, &stats),
            Err(err) => fail!("stop_machine_nmi: {err}"),
        }
    }

    // Where the time of one call goes: an empty function on the calling CPU only (the
    // rendezvous that `patch_machine` stands on), on every CPU, and patching.
    let mut batches = BATCHES.lock();
    fill_batches(&mut batches);
    let rt = &roundtrip_stats;
    let profiled: Result<(), StopError> = profile("stop_machine_one", 0, PROFILE_ITERS, rt, |_| {
        STOP.stop_machine(&empty, CpuSet::single(me), OPTIONS)
    })
    .and_then(|()| {
        profile("stop_machine", 0, PROFILE_ITERS, rt, |_| {
            STOP.stop_machine(&empty, online, OPTIONS)
        })
    });
    if let Err(err) = profiled {
        fail!("profile: {err}");
    }
    for (sites, iters) in [(1, PROFILE_ITERS), (1000, 20)] {
        if let Err(err) = profile("patch_machine", sites, iters, rt, |i| {
            patch_machine(&STOP, &KERNEL_TEXT, &batches[i % 2][..sites], OPTIONS).map(|_| ())
        }) {
            fail!("profile: patch_machine, {sites} sites: {err}");
        }
    }

    let mut patch_median_1 = 0;
    for sites in BATCH_SIZES {
        let iters = match sites {
            1 => 1000,
            10 => 500,
            100 => 100,
            _ => 20,
        };
        // Even counts: the sites end as NOPs again.
        let warmup = (iters / 10).max(2) & !1;
        let result = measure(warmup, iters & !1, |i| {
            let batch = &batches[i % 2][..sites];
            patch_machine(&STOP, &KERNEL_TEXT, batch, OPTIONS).map(|_| ())
        });
        match result {
            Ok(stats) => {
                report("patch_machine", sites, &stats);
                if sites == 1 {
                    patch_median_1 = stats.median_ns;
                }
            }
            Err(err) => fail!("patch_machine, {sites} sites: {err}"),
        }
    }
    // The headline ratio, both figures taken alternately (see `measure_paired`).
    let send = roundtrip_handlers(true);
    let paired = measure_paired(
        1000,
        |_| roundtrip(targets, send).map_err(PairedError::Roundtrip),
        |i| {
            patch_machine(&STOP, &KERNEL_TEXT, &batches[i % 2][..1], OPTIONS)
                .map(|_| ())
                .map_err(PairedError::Patch)
        },
    );
    roundtrip_handlers(false);
    let headline = match paired {
        Ok((roundtrip, patch)) => {
            report_ratio("patch_machine", 1, &patch, &roundtrip);
            (patch.median_ns, roundtrip)
        }
        Err(err) => fail!("patch_machine/ipi_roundtrip: {err}"),
    };
    if let Err(err) = bench_decomposition(targets, me) {
        return Verdict::Fail(err);
    }
    let first = bench_sites();
    if KERNEL_TEXT.read_insn(first, SITE_LEN) != NOP {
        let _ = patch_machine(&STOP, &KERNEL_TEXT, &batches[1][..BENCH_SITES], OPTIONS);
    }
    if let Err(err) = batch_ratio(&mut batches) {
        fail!("patch_machine_x1000/patch_machine_x1: {err}");
    }
    drop(batches);

    // The alternatives: the whole runtime table re-applied through patch_machine, its
    // benchmark sites flipped on and off (even counts: they end off, as at boot).
    let (alt_sites, _) = platform::bench_sites_applied();
    let result = measure(10, 200, |i| {
        platform::ALTERNATIVES.flip_bench(i % 2 == 0).map(|_| ())
    });
    if platform::bench_sites_applied().1 != 0 {
        let _ = platform::ALTERNATIVES.flip_bench(false);
    }
    match result {
        Ok(stats) => {
            report("alternatives_apply", alt_sites as usize, &stats);
            let ratio_x10 = (stats.median_ns * 10).div_ceil(roundtrip_stats.median_ns.max(1));
            kprint!(
                "# alternatives_apply/ipi_roundtrip = {}.{} (median, {alt_sites} sites)\n",
                ratio_x10 / 10,
                ratio_x10 % 10
            );
        }
        Err(err) => fail!("alternatives_apply: {err}"),
    }
    if let Err(failure) = bench_static_keys(&roundtrip_stats) {
        return failure;
    }
    if let Err(failure) = bench_kprobes(targets) {
        return failure;
    }

    let site = pm_nosync_target as *const () as usize;
    let branch: Insn =
        match platform::live_branch(site, pm_nosync_branch_dest as *const () as usize) {
            Ok(branch) => branch,
            Err(why) => {
                kprint!("# bench patch_nosync skipped: {why}\n");
                return Verdict::Pass(ratio_msg(patch_median_1, &roundtrip_stats, &headline));
            }
        };
    let flips = [Patch::new(site, NOP, branch), Patch::new(site, branch, NOP)];
    let result: Result<Stats, PatchError<Insn>> = measure(100, 2000, |i| {
        platform::patch_live(&flips[i % 2..i % 2 + 1])
    });
    match result {
        Ok(stats) => report("patch_nosync", 1, &stats),
        Err(err) => fail!("patch_nosync: {err}"),
    }
    let send = roundtrip_handlers(true);
    let paired = measure_paired(
        1000,
        |_| roundtrip(targets, send).map_err(PairedError::Roundtrip),
        |i| platform::patch_live(&flips[i % 2..i % 2 + 1]).map_err(PairedError::Patch),
    );
    roundtrip_handlers(false);
    match paired {
        Ok((roundtrip, live)) => report_ratio("patch_nosync", 1, &live, &roundtrip),
        Err(err) => fail!("patch_nosync/ipi_roundtrip: {err}"),
    }

    Verdict::Pass(ratio_msg(patch_median_1, &roundtrip_stats, &headline))
}

/// Pairs of the batch ratio.
const BATCH_PAIRS: usize = 500;
/// Per pair of the batch ratio: the `run` span (the window's re-check and writes) of
/// the batch and of the one-site patch.
static BATCH_RUNS: spin::Mutex<[[u64; BATCH_PAIRS]; 2]> = spin::Mutex::new([[0; BATCH_PAIRS]; 2]);

/// `# ratio patch_machine_x1000/patch_machine_x1 cpus=<n> sites=1000 ratio=<r>
/// median_ns=<x> x1_median_ns=<y> p99_ns=.. x1_p99_ns=.. run_median_ns=.. run_p99_ns=..
/// x1_run_median_ns=.. x1_run_p99_ns=.. pairs=<i>`: a 1000-site batch and a one-site
/// patch taken alternately ([`measure_paired`]), both real flips, with the median and
/// p99 of their `run` spans (the window's re-check and writes: what the batch size
/// changes inside the window). The sites start as NOPs; odd calls of the batch find site
/// 0 already flipped back by the one-site patch, so their batch is the reverse one with
/// entry 0 turned forwards.
fn batch_ratio(batches: &mut [[Patch<Insn>; BENCH_SITES]; 2]) -> Result<(), PatchError<Insn>> {
    let forward_0 = batches[0][0];
    let back_0 = batches[1][0];
    batches[1][0] = forward_0;
    let mut runs = BATCH_RUNS.lock();
    let [batch_runs, one_runs] = &mut *runs;
    let paired = measure_paired(
        BATCH_PAIRS,
        |i| {
            patch_machine(&STOP, &KERNEL_TEXT, &batches[i % 2][..], OPTIONS)?;
            batch_runs[i % BATCH_PAIRS] = STOP.last_call_profile().run_ns;
            Ok::<(), PatchError<Insn>>(())
        },
        |i| {
            patch_machine(&STOP, &KERNEL_TEXT, &[back_0], OPTIONS)?;
            one_runs[i % BATCH_PAIRS] = STOP.last_call_profile().run_ns;
            Ok::<(), PatchError<Insn>>(())
        },
    );
    batches[1][0] = back_0;
    let (batch, one) = paired?;
    let spans = |column: &mut [u64; BATCH_PAIRS]| {
        column.sort_unstable();
        (percentile(column, 50), percentile(column, 99))
    };
    let (run_median, run_p99) = spans(batch_runs);
    let (one_run_median, one_run_p99) = spans(one_runs);
    let ratio_x100 = (batch.median_ns * 100).div_ceil(one.median_ns.max(1));
    kprint!(
        "# ratio patch_machine_x1000/patch_machine_x1 cpus={} sites={BENCH_SITES} ratio={}.{:02} \
         median_ns={} x1_median_ns={} p99_ns={} x1_p99_ns={} run_median_ns={run_median} \
         run_p99_ns={run_p99} x1_run_median_ns={one_run_median} x1_run_p99_ns={one_run_p99} \
         pairs={}\n",
        platform::online_cpus().len(),
        ratio_x100 / 100,
        ratio_x100 % 100,
        batch.median_ns,
        one.median_ns,
        batch.p99_ns,
        one.p99_ns,
        batch.iters
    );
    Ok(())
}

/// Where the headline ratio comes from, each part measured alternately with the round
/// trip in this boot (`# ratio` lines): `stop_machine_one`, the rendezvous alone (an empty
/// function on the calling CPU); `stop_machine_nmi_free_one`, the same empty function run
/// the way `patch_machine` runs its write (x86: from the initiator's self-NMI, the other
/// CPUs' NMIs held; arm64: masked, as `stop_machine_one`); and `self_nmi`, one NMI to the
/// calling CPU and its handler's acknowledgement. `patch_machine` x1 less
/// `stop_machine_nmi_free_one` is the write with its checks and validation.
fn bench_decomposition(targets: CpuSet, me: usize) -> Result<(), Msg> {
    let empty = |_: usize| -> Result<(), i32> { Ok(()) };
    let send = roundtrip_handlers(true);
    let result = decomposition_pairs(targets, me, send, &empty);
    roundtrip_handlers(false);
    result
}

fn decomposition_pairs(
    targets: CpuSet,
    me: usize,
    send: fn(CpuSet),
    empty: &(dyn Fn(usize) -> Result<(), i32> + Sync),
) -> Result<(), Msg> {
    let rt = |_: usize| roundtrip(targets, send).map_err(PairedError::Roundtrip);
    let stop_one = |_: usize| {
        STOP.stop_machine(empty, CpuSet::single(me), OPTIONS)
            .map_err(PairedError::Patch)
    };
    let (roundtrip_stats, stats) = measure_paired(1000, rt, stop_one)
        .map_err(|e| msg!("stop_machine_one/ipi_roundtrip: {e}"))?;
    report_ratio("stop_machine_one", 0, &stats, &roundtrip_stats);
    let nmi_free_one = |_: usize| {
        // SAFETY: the function touches nothing, so it is safe in NMI context.
        unsafe { STOP.stop_machine_nmi_free(&empty, CpuSet::single(me), OPTIONS) }
            .map_err(PairedError::Patch)
    };
    let (roundtrip_stats, stats) = measure_paired(1000, rt, nmi_free_one)
        .map_err(|e| msg!("stop_machine_nmi_free_one/ipi_roundtrip: {e}"))?;
    report_ratio("stop_machine_nmi_free_one", 0, &stats, &roundtrip_stats);
    if platform::nmi_mechanism().is_ok() {
        let self_nmi =
            |_: usize| self_roundtrip(me, send).map_err(PairedError::<StopError>::Roundtrip);
        let (roundtrip_stats, stats) =
            measure_paired(1000, rt, self_nmi).map_err(|e| msg!("self_nmi/ipi_roundtrip: {e}"))?;
        report_ratio("self_nmi", 0, &stats, &roundtrip_stats);
    }
    Ok(())
}

/// Why a paired measurement stopped.
enum PairedError<E> {
    Roundtrip(CpuSet),
    Patch(E),
}

impl<E: core::fmt::Display> core::fmt::Display for PairedError<E> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            PairedError::Roundtrip(missing) => {
                write!(f, "no round-trip acknowledgement from {missing} within 1 s")
            }
            PairedError::Patch(err) => write!(f, "{err}"),
        }
    }
}

/// Installs (`on`) or removes the round trip's handler, and returns how it sends: the
/// NMI broadcast where the platform has NMIs, else the normal-priority IPI.
fn roundtrip_handlers(on: bool) -> fn(CpuSet) {
    if platform::nmi_mechanism().is_ok() {
        if on {
            nmi::register_nmi_handler(BENCH_SLOT, count_ack);
        } else {
            nmi::unregister_nmi_handler(BENCH_SLOT);
        }
        nmi::send_nmi
    } else {
        if on {
            platform::set_ipi_handler(BENCH_SGI, count_sgi_ack);
        } else {
            platform::clear_ipi_handler(BENCH_SGI);
        }
        |targets| platform::send_ipi(BENCH_SGI, targets)
    }
}

/// `static_key_flip`: one `enable` or `disable` of a key with 1 and with 100 sites (in
/// `targets_*.S`, on a page of their own), each as a ratio to the round trip too.
fn bench_static_keys(roundtrip: &Stats) -> Result<(), Verdict> {
    for (key, sites, iters) in [
        (&platform::BENCH_KEY_1, 1, 1000),
        (&platform::BENCH_KEY_100, 100, 200),
    ] {
        let count = STATIC_KEYS.sites(key).count();
        if count != sites {
            return Err(Verdict::Fail(msg!(
                "static_key_flip: {} has {count} sites, expected {sites}",
                key.name()
            )));
        }
        // Even counts: the key ends disabled.
        let result = measure(20, iters, |i| {
            if i % 2 == 0 {
                STATIC_KEYS.enable(key)
            } else {
                STATIC_KEYS.disable(key)
            }
        });
        match result {
            Ok(stats) => {
                report("static_key_flip", sites, &stats);
                let ratio_x10 = (stats.median_ns * 10).div_ceil(roundtrip.median_ns.max(1));
                kprint!(
                    "# static_key_flip/ipi_roundtrip = {}.{} (median, {sites} site{})\n",
                    ratio_x10 / 10,
                    ratio_x10 % 10,
                    if sites == 1 { "" } else { "s" }
                );
            }
            Err(err) => {
                let _ = STATIC_KEYS.disable(key);
                return Err(Verdict::Fail(msg!("static_key_flip, {sites} sites: {err}")));
            }
        }
    }
    Ok(())
}

/// Arm/disarm pairs of the kprobes benchmark.
const KPROBE_PAIRS: usize = 500;

fn kprobe_bench_pre(_: &crate::kprobes::ProbeHit, _: &mut platform::KprobeFrame) {}

/// `kprobe_arm`, `kprobe_disarm` (one `enable`/`disable` of a registered probe: one
/// `patch_machine` each on arm64) and `kprobe_hit` (one call of the probed target, the
/// breakpoint, an empty pre handler and the out-of-line step included), each measured
/// alternately with the round trip and reported as a ratio to it.
fn bench_kprobes(targets: CpuSet) -> Result<(), Verdict> {
    if let Some(why) = platform::kprobes_unsupported() {
        kprint!("# bench kprobe_arm skipped: {why}\n");
        return Ok(());
    }
    let Some(target) = platform::KPROBE_TARGET else {
        return Ok(());
    };
    let fail = |what: &str, err: &dyn core::fmt::Display| Verdict::Fail(msg!("{what}: {err}"));
    let id = platform::KPROBES
        .register_kprobe(target.site_addr(), Some(kprobe_bench_pre), None)
        .map_err(|err| fail("kprobe register", &err))?;
    let send = roundtrip_handlers(true);
    // Round trip, arm, round trip, disarm, each after its own settle (see
    // `measure_paired`): the round trips see the same emulator speed as both.
    let timed = |step: &mut dyn FnMut() -> Result<(), Verdict>| -> Result<u64, Verdict> {
        settle();
        let start = platform::now_ns();
        step()?;
        Ok(platform::now_ns() - start)
    };
    let mut roundtrip_step = || roundtrip(targets, send).map_err(|m| fail("ipi_roundtrip", &m));
    let result = platform::KPROBES
        .disable(id)
        .map_err(|err| fail("kprobe_disarm", &err))
        .and_then(|()| {
            let mut samples = SAMPLES.lock();
            let (rt, rest) = samples.split_at_mut(2 * KPROBE_PAIRS);
            let (arm, rest) = rest.split_at_mut(KPROBE_PAIRS);
            let disarm = &mut rest[..KPROBE_PAIRS];
            for i in 0..KPROBE_PAIRS {
                rt[2 * i] = timed(&mut roundtrip_step)?;
                arm[i] = timed(&mut || {
                    platform::KPROBES
                        .enable(id)
                        .map_err(|err| fail("kprobe_arm", &err))
                })?;
                rt[2 * i + 1] = timed(&mut roundtrip_step)?;
                disarm[i] = timed(&mut || {
                    platform::KPROBES
                        .disable(id)
                        .map_err(|err| fail("kprobe_disarm", &err))
                })?;
            }
            let stats = |sorted: &mut [u64]| {
                sorted.sort_unstable();
                Stats {
                    median_ns: percentile(sorted, 50),
                    p99_ns: percentile(sorted, 99),
                    iters: sorted.len(),
                }
            };
            Ok((stats(rt), stats(arm), stats(disarm)))
        });
    let hit = result.and_then(|figures| {
        platform::KPROBES
            .enable(id)
            .map_err(|err| fail("kprobe_arm", &err))?;
        let paired = measure_paired(
            1000,
            |_| roundtrip(targets, send).map_err(PairedError::Roundtrip),
            |i| {
                let value = target.run(i as u64);
                if value == (i as u64) * 3 + 7 {
                    Ok(())
                } else {
                    Err(PairedError::Patch(value))
                }
            },
        );
        paired
            .map(|pair| (figures, pair))
            .map_err(|err| fail("kprobe_hit", &err))
    });
    roundtrip_handlers(false);
    let stats = platform::KPROBES.unregister_kprobe(id);
    let ((roundtrip, arm, disarm), (hit_roundtrip, hit)) = hit?;
    let stats = stats.map_err(|err| fail("kprobe unregister", &err))?;
    if stats.hits < hit.iters as u64 {
        return Err(Verdict::Fail(msg!(
            "kprobe_hit: {} hits for {} timed calls",
            stats.hits,
            hit.iters
        )));
    }
    report("kprobe_arm", 1, &arm);
    report("kprobe_disarm", 1, &disarm);
    report("kprobe_hit", 1, &hit);
    report_ratio("kprobe_arm", 1, &arm, &roundtrip);
    report_ratio("kprobe_disarm", 1, &disarm, &roundtrip);
    report_ratio("kprobe_hit", 1, &hit, &hit_roundtrip);
    Ok(())
}

/// The headline: `patch_machine` for one site over the round trip, both medians, from
/// the separate benchmarks and from the paired one.
fn ratio_msg(patch_median_1: u64, roundtrip: &Stats, paired: &(u64, Stats)) -> Msg {
    let ratio_x10 = (patch_median_1 * 10).div_ceil(roundtrip.median_ns.max(1));
    let paired_x100 = (paired.0 * 100).div_ceil(paired.1.median_ns.max(1));
    msg!(
        "patch_machine/ipi_roundtrip = {}.{} (median, 1 site, {} CPUs; measured \
         alternately: {}.{:02})",
        ratio_x10 / 10,
        ratio_x10 % 10,
        platform::online_cpus().len(),
        paired_x100 / 100,
        paired_x100 % 100
    )
}

/// Every site of a 1000-entry batch, spanning pages and written in ascending and in
/// descending order, holds its new instruction afterwards (the write plan's runs, copied
/// a page at a time, lose nothing; the descending batch goes through the plan's sort).
pub fn large_batches(_: &Params) -> Verdict {
    let mut batches = BATCHES.lock();
    fill_batches(&mut batches);
    let pages = (bench_sites() + SITE_LEN * BENCH_SITES - 1) / 4096 - bench_sites() / 4096 + 1;
    let other = returning(0x0b0b);
    for descending in [false, true] {
        for direction in 0..2 {
            let batch = &mut batches[direction];
            if descending {
                batch.reverse();
            }
            let result = patch_machine(&STOP, &KERNEL_TEXT, &batch[..], OPTIONS);
            if descending {
                batch.reverse();
            }
            if let Err(err) = result {
                fail!("{BENCH_SITES} sites (descending: {descending}): {err}");
            }
            let expected = if direction == 0 { other } else { NOP };
            let wrong = (0..BENCH_SITES)
                .filter(|i| {
                    KERNEL_TEXT.read_insn(bench_sites() + SITE_LEN * i, SITE_LEN) != expected
                })
                .count();
            check!(
                wrong == 0,
                "{wrong} of {BENCH_SITES} sites do not hold {expected:#010x} (descending: {descending})"
            );
        }
    }
    Verdict::Pass(msg!(
        "{BENCH_SITES} sites over {pages} pages, both orders, both directions"
    ))
}
