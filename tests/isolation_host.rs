//! Isolated CPUs in user mode on the host: threads play the CPUs, "user mode" is a loop
//! that touches no kernel text, and the context state words (`src/stop/context.rs`)
//! decide whether a patcher interrupts a CPU or defers its synchronisation to its next
//! kernel entry.

#![allow(clippy::result_large_err)]

use patch_machine::CpuSet;
use patch_machine::arch::host::{HostArch, HostText};
use patch_machine::patch::{Patch, insn, patch_machine};
use patch_machine::stop::{StopMachine, StopOptions};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

/// The version a `MOVZ X0, #version` site holds.
fn version(word: u32) -> u64 {
    u64::from((word >> 5) & 0xffff)
}

fn machine(cpus: usize) -> Arc<StopMachine<HostArch>> {
    let stop = Arc::new(StopMachine::new(HostArch::new(cpus)));
    HostArch::connect(&stop);
    stop
}

/// What a user-mode CPU thread saw.
#[derive(Default, Debug)]
struct UserReport {
    entries: u64,
    user_spins: u64,
    stale: Vec<(u64, u64)>,
}

/// CPU `cpu` alternates between user mode (spinning, taking only the stop IPIs a
/// patcher sends it) and a kernel entry that runs the patched site, until `quit`. On
/// every entry it checks that the site holds at least the version `committed` had
/// before the entry began.
fn user_cpu(
    stop: Arc<StopMachine<HostArch>>,
    text: Arc<HostText>,
    committed: Arc<AtomicU64>,
    quit: Arc<AtomicBool>,
    cpu: usize,
) -> thread::JoinHandle<UserReport> {
    thread::spawn(move || {
        let arch = stop.arch();
        arch.bind_current_thread(cpu);
        let mut report = UserReport::default();
        while !quit.load(Ordering::Relaxed) {
            arch.exit_to_user();
            for _ in 0..20 {
                arch.user_poll().expect("a stop stayed open");
                report.user_spins += 1;
                thread::yield_now();
            }
            // SeqCst: the patcher's store of `committed` follows its patch_machine's
            // return; anything committed before this load must be seen after entry.
            let floor = committed.load(Ordering::SeqCst);
            arch.enter_kernel().expect("a stop stayed open");
            report.entries += 1;
            let seen = version(text.word(0));
            if seen < floor {
                report.stale.push((floor, seen));
            }
            arch.poll_interrupts();
        }
        report
    })
}

/// CPU `cpu` stays in user mode until the patcher publishes a new `round`, then enters
/// the kernel once, checks the site holds at least that round's version, returns to
/// user mode and says so in `back` (the patcher waits for it before its next patch).
fn lockstep_user_cpu(
    stop: Arc<StopMachine<HostArch>>,
    text: Arc<HostText>,
    round: Arc<AtomicU64>,
    back: Arc<AtomicU64>,
    quit: Arc<AtomicBool>,
    cpu: usize,
) -> thread::JoinHandle<UserReport> {
    thread::spawn(move || {
        let arch = stop.arch();
        arch.bind_current_thread(cpu);
        let mut report = UserReport::default();
        let mut seen_round = 0;
        loop {
            arch.exit_to_user();
            // SeqCst: the patcher sees this only once the state word says USER.
            back.store(seen_round, Ordering::SeqCst);
            loop {
                arch.user_poll().expect("a stop stayed open");
                report.user_spins += 1;
                if quit.load(Ordering::SeqCst) {
                    return report;
                }
                let now = round.load(Ordering::SeqCst);
                if now != seen_round {
                    seen_round = now;
                    break;
                }
                thread::yield_now();
            }
            arch.enter_kernel().expect("a stop stayed open");
            report.entries += 1;
            let seen = version(text.word(0));
            if seen < seen_round {
                report.stale.push((seen_round, seen));
            }
            arch.poll_interrupts();
        }
    })
}

/// Waits until `back` says `cpu` is in user mode after `round`: bounded, naming it.
fn await_back(back: &AtomicU64, round: u64, cpu: usize) {
    let start = Instant::now();
    while back.load(Ordering::SeqCst) != round {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "cpu{cpu} did not return to user mode after round {round} within 10 s"
        );
        thread::yield_now();
    }
}

/// A CPU that stays in the kernel and takes its stop IPIs.
fn kernel_cpu(
    stop: Arc<StopMachine<HostArch>>,
    quit: Arc<AtomicBool>,
    cpu: usize,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        stop.arch().bind_current_thread(cpu);
        while !quit.load(Ordering::Relaxed) {
            stop.arch().poll_interrupts();
            thread::yield_now();
        }
    })
}

/// Patches the site from version `v - 1` to `v` for `v` in `1..=rounds`, publishing each
/// in `committed` once patch_machine returned; returns the CPUs each call deferred.
fn patch_rounds(
    stop: &StopMachine<HostArch>,
    text: &HostText,
    committed: &AtomicU64,
    rounds: u16,
    before_each: impl Fn(u16),
) -> Vec<CpuSet> {
    let mut deferred = Vec::new();
    for v in 1..=rounds {
        before_each(v);
        let old = insn::movz_x(0, v - 1, 0).unwrap();
        let new = insn::movz_x(0, v, 0).unwrap();
        patch_machine(
            stop,
            text,
            &[Patch::new(text.addr(0), old, new)],
            StopOptions::DEFAULT,
        )
        .unwrap_or_else(|e| panic!("patch {v}: {e}"));
        committed.store(u64::from(v), Ordering::SeqCst);
        // The evidence of the call just made: who was counted quiescent by deferral.
        deferred.push(stop.last_deferred());
    }
    deferred
}

#[test]
fn isolated_user_cpus_take_no_stop_ipis_and_run_new_code_after_entry() {
    const ROUNDS: u16 = 200;
    let stop = machine(4);
    stop.arch().bind_current_thread(0);
    stop.arch()
        .contexts()
        .set_isolated(CpuSet::single(1).with(2));
    let text = Arc::new(HostText::new(&[insn::movz_x(0, 0, 0).unwrap(), insn::RET]));
    let committed = Arc::new(AtomicU64::new(0));
    let round = Arc::new(AtomicU64::new(0));
    let quit = Arc::new(AtomicBool::new(false));
    let backs = [
        Arc::new(AtomicU64::new(u64::MAX)),
        Arc::new(AtomicU64::new(u64::MAX)),
    ];
    let users: Vec<_> = [1, 2]
        .into_iter()
        .zip(&backs)
        .map(|(cpu, back)| {
            let args = (stop.clone(), text.clone(), round.clone(), back.clone());
            lockstep_user_cpu(args.0, args.1, args.2, args.3, quit.clone(), cpu)
        })
        .collect();
    let kernel = kernel_cpu(stop.clone(), quit.clone(), 3);

    let deferred = patch_rounds(&stop, &text, &committed, ROUNDS, |v| {
        // The previous patch has returned: each isolated CPU enters the kernel once
        // (and must see it), then is back in user mode before the next patch.
        round.store(u64::from(v - 1), Ordering::SeqCst);
        for (cpu, back) in [1, 2].into_iter().zip(&backs) {
            await_back(back, u64::from(v - 1), cpu);
        }
    });
    round.store(u64::from(ROUNDS), Ordering::SeqCst);
    for (cpu, back) in [1, 2].into_iter().zip(&backs) {
        await_back(back, u64::from(ROUNDS), cpu);
    }
    quit.store(true, Ordering::SeqCst);
    let reports: Vec<_> = users.into_iter().map(|t| t.join().unwrap()).collect();
    kernel.join().unwrap();

    let arch = stop.arch();
    for (cpu, report) in [1, 2].into_iter().zip(&reports) {
        assert!(
            report.user_spins > 0 && report.entries >= u64::from(ROUNDS),
            "cpu{cpu} spent no time in user mode or missed rounds: {report:?}"
        );
        assert_eq!(
            arch.user_ipis(cpu),
            0,
            "isolated cpu{cpu} took stop IPIs in user mode across {ROUNDS} patches"
        );
        assert!(
            report.stale.is_empty(),
            "cpu{cpu} ran stale code after an entry (round, seen): {:?}",
            report.stale
        );
        assert_eq!(
            arch.contexts().deferred_syncs(cpu),
            u64::from(ROUNDS),
            "cpu{cpu}: every patch should have deferred its sync to the next entry"
        );
    }
    let expected = CpuSet::single(1).with(2);
    assert!(
        deferred.iter().all(|d| *d == expected),
        "each call must defer exactly the isolated CPUs: {deferred:?}"
    );
}

#[test]
fn torture_isolated_cpus_entering_at_a_high_rate_run_no_stale_code() {
    const ROUNDS: u16 = 300;
    let stop = machine(4);
    stop.arch().bind_current_thread(0);
    stop.arch()
        .contexts()
        .set_isolated(CpuSet::single(1).with(2));
    let text = Arc::new(HostText::new(&[insn::movz_x(0, 0, 0).unwrap(), insn::RET]));
    let committed = Arc::new(AtomicU64::new(0));
    let quit = Arc::new(AtomicBool::new(false));
    let users: Vec<_> = [1, 2]
        .into_iter()
        .map(|cpu| {
            user_cpu(
                stop.clone(),
                text.clone(),
                committed.clone(),
                quit.clone(),
                cpu,
            )
        })
        .collect();
    let kernel = kernel_cpu(stop.clone(), quit.clone(), 3);

    // A pause between patches lets the CPUs leave the rendezvous for user mode.
    let deferred = patch_rounds(&stop, &text, &committed, ROUNDS, |_| {
        for _ in 0..50 {
            thread::yield_now();
        }
    });
    quit.store(true, Ordering::Relaxed);
    let reports: Vec<_> = users.into_iter().map(|t| t.join().unwrap()).collect();
    kernel.join().unwrap();

    let arch = stop.arch();
    for (cpu, report) in [1, 2].into_iter().zip(&reports) {
        assert!(
            report.user_spins > 0 && report.entries > 0,
            "cpu{cpu} spent no time in user mode: {report:?}"
        );
        assert!(
            report.stale.is_empty(),
            "cpu{cpu} ran stale code after an entry (floor, seen): {:?}",
            report.stale
        );
        assert!(
            arch.contexts().deferred_syncs(cpu) > 0,
            "cpu{cpu}: no entry ever did deferred work"
        );
    }
    let deferring_calls = deferred.iter().filter(|d| !d.is_empty()).count();
    assert!(deferring_calls > 0, "no call deferred any CPU");
    assert!(
        deferred.iter().all(|d| !d.contains(0) && !d.contains(3)),
        "a non-isolated CPU was deferred: {deferred:?}"
    );
}

#[test]
fn non_isolated_user_cpus_are_interrupted() {
    const ROUNDS: u16 = 50;
    let stop = machine(2);
    stop.arch().bind_current_thread(0);
    let text = Arc::new(HostText::new(&[insn::movz_x(0, 0, 0).unwrap(), insn::RET]));
    let committed = Arc::new(AtomicU64::new(0));
    let quit = Arc::new(AtomicBool::new(false));
    let user = user_cpu(
        stop.clone(),
        text.clone(),
        committed.clone(),
        quit.clone(),
        1,
    );
    let deferred = patch_rounds(&stop, &text, &committed, ROUNDS, |_| {
        for _ in 0..50 {
            thread::yield_now();
        }
    });
    quit.store(true, Ordering::Relaxed);
    let report = user.join().unwrap();
    assert!(report.stale.is_empty(), "stale code: {:?}", report.stale);
    assert!(
        deferred.iter().all(|d| d.is_empty()),
        "deferred: {deferred:?}"
    );
    assert!(
        stop.arch().user_ipis(1) > 0,
        "cpu1 is not isolated and spent time in user mode, yet took no stop IPI there"
    );
}

#[test]
fn deferred_entry_waits_out_the_stop_that_deferred_it() {
    let stop = machine(2);
    stop.arch().bind_current_thread(0);
    stop.arch().contexts().set_isolated(CpuSet::single(1));
    let in_user = Arc::new(AtomicBool::new(false));
    let go = Arc::new(AtomicBool::new(false));
    let function_done = Arc::new(AtomicBool::new(false));
    let entering = {
        let (stop, in_user, go, function_done) = (
            stop.clone(),
            in_user.clone(),
            go.clone(),
            function_done.clone(),
        );
        thread::spawn(move || {
            stop.arch().bind_current_thread(1);
            stop.arch().exit_to_user();
            in_user.store(true, Ordering::SeqCst);
            while !go.load(Ordering::SeqCst) {
                thread::yield_now();
            }
            let pending = stop.arch().enter_kernel().expect("the stop stayed open");
            // SeqCst: the stop function set it before returning, and the window closed
            // only after that.
            (pending, function_done.load(Ordering::SeqCst))
        })
    };
    while !in_user.load(Ordering::SeqCst) {
        thread::yield_now();
    }
    let deferred_seen = AtomicBool::new(false);
    let function = |_cpu: usize| {
        deferred_seen.store(stop.quiescence().deferred.contains(1), Ordering::SeqCst);
        // The isolated CPU enters the kernel while the "writes" are under way.
        go.store(true, Ordering::SeqCst);
        let start = Instant::now();
        while start.elapsed() < Duration::from_millis(50) {
            thread::yield_now();
        }
        function_done.store(true, Ordering::SeqCst);
        Ok(())
    };
    stop.stop_machine(&function, CpuSet::single(0), StopOptions::DEFAULT)
        .unwrap();
    let (pending, done_when_entered) = entering.join().unwrap();
    assert!(
        deferred_seen.load(Ordering::SeqCst),
        "cpu1 was not in the evidence as deferred"
    );
    assert!(pending, "the entry found no deferred work");
    assert!(
        done_when_entered,
        "cpu1 finished its kernel entry while the stop that deferred it was still writing"
    );
    assert_eq!(stop.arch().user_ipis(1), 0);
}

#[test]
fn isolated_cpu_in_the_kernel_is_interrupted_and_masked() {
    let stop = machine(2);
    stop.arch().bind_current_thread(0);
    stop.arch().contexts().set_isolated(CpuSet::single(1));
    let quit = Arc::new(AtomicBool::new(false));
    let kernel = kernel_cpu(stop.clone(), quit.clone(), 1);
    let evidence = std::sync::Mutex::new(None);
    let function = |_cpu: usize| {
        *evidence.lock().unwrap() = Some(stop.quiescence());
        Ok(())
    };
    stop.stop_machine(&function, CpuSet::single(0), StopOptions::DEFAULT)
        .unwrap();
    quit.store(true, Ordering::Relaxed);
    kernel.join().unwrap();
    let q = evidence.lock().unwrap().expect("the function ran");
    assert!(
        q.deferred.is_empty(),
        "an isolated CPU in the kernel was deferred: {q:?}"
    );
    assert!(q.masked.contains(1), "cpu1 did not arrive masked: {q:?}");
}
