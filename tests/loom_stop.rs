//! Model check of the stop-machine rendezvous and `patch_machine` with
//! [loom](https://docs.rs/loom): every interleaving of two or three CPUs (threads) up to
//! a preemption bound, and every value the C11 memory model lets each atomic load
//! return, of the production code in `src/stop` and `src/patch`.
//!
//! Built only with `RUSTFLAGS="--cfg loom"`, where `src/sync.rs` gives the core loom's
//! atomics; `tests/loom_models.rs` runs it from the plain `cargo test`:
//!
//! ```sh
//! RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom cargo test --release --test loom_stop -- --nocapture
//! ```
//!
//! The machine ([`LoomArch`]): each CPU is a loom thread; the stop IPI is a pending flag
//! the CPU takes when unmasked (in its idle loop or in any `relax`), with the IPI entry
//! masking it as hardware does; "kernel text" is two words in loom `UnsafeCell`s, so a
//! write that is not ordered after every other CPU's last fetch (quiescence), or a fetch
//! not ordered after the write, is a data race loom reports. Each CPU fetches through its
//! own "instruction cache", refreshed only by `Arch::sync_context`: normal code that runs
//! stale text after a patch fails. Time is a logical clock per CPU, advanced by every
//! `relax`, so every timeout fires after a bounded number of polls; `relax` calls
//! `loom::thread::yield_now`, which makes loom run the spinning thread again only once
//! another thread has made progress, so spin loops do not explode the search.
//!
//! Every model has a weakened twin: a knob of `patch_machine::sync::weaken` removes one
//! ordering or step of the production code, and the twin passes only if loom then finds
//! the failure (its message is printed). Each model prints the number of interleavings
//! (executions) loom explored.

#![cfg(loom)]

use loom::cell::UnsafeCell;
use loom::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use loom::thread;
use patch_machine::CpuSet;
use patch_machine::patch::{Patch, Text, insn, patch_machine};
use patch_machine::stop::{
    Arch, CallContext, ETIMEDOUT, NmiArch, NmiSafe, StopError, StopFnResult, StopMachine,
    StopOptions,
};
use patch_machine::sync::weaken::Knob;
use std::cell::Cell;
use std::ops::Range;
use std::sync::atomic::{AtomicBool as StdBool, AtomicU32, AtomicU64, AtomicUsize as StdUsize};
use std::sync::{Arc, OnceLock, Weak};

mod loom_harness;
use loom_harness::{check, must_fail};

/// The most CPUs (threads) a model uses.
const CPUS: usize = 3;
/// Words of kernel text.
const WORDS: usize = 2;
/// Where the text "lives", for `patch_machine`'s validation.
const BASE: usize = 0x4020_0000;
/// Logical nanoseconds per `relax`.
const TICK_NS: u64 = 1_000;
/// Timeouts that never fire in a model (its loops are bounded by loom's yields).
const PATIENT: StopOptions = StopOptions {
    arrival_timeout_ns: 1 << 40,
    stall_timeout_ns: 1 << 40,
    ..StopOptions::DEFAULT
};
/// An arrival timeout that fires at the initiator's second look.
const IMPATIENT: StopOptions = StopOptions {
    arrival_timeout_ns: TICK_NS / 2,
    stall_timeout_ns: 8 * TICK_NS,
    ..StopOptions::DEFAULT
};

loom::thread_local! {
    /// The CPU this loom thread plays.
    static CPU: Cell<usize> = Cell::new(usize::MAX);
}

fn current_cpu() -> usize {
    CPU.with(Cell::get)
}

/// The machine's state. Loom atomics and cells for what CPUs share; std atomics for
/// what only one CPU (thread) touches, or for the model's own bookkeeping (all loom
/// threads run on one OS thread, one at a time).
struct Machine {
    cpus: usize,
    text: [UnsafeCell<u32>; WORDS],
    /// Stop IPIs sent to each CPU (with Release; the CPU takes them with Acquire: the
    /// DSB before the GIC's SGI write, the fence before x86's x2APIC ICR write). A CPU
    /// that takes one takes every one sent so far: IPIs pending together coalesce.
    ipis_sent: [AtomicUsize; CPUS],
    /// Stop IPIs each CPU has taken (only that CPU touches its own).
    ipis_taken: [StdUsize; CPUS],
    /// Self-NMIs raised on each CPU (same CPU: Release/Acquire stands for program
    /// order), and taken by its NMI thread.
    nmis_sent: [AtomicUsize; CPUS],
    nmis_taken: [StdUsize; CPUS],
    masked: [StdBool; CPUS],
    /// What each CPU fetches: the text as of its last context synchronisation.
    icache: [[AtomicU32; WORDS]; CPUS],
    clock: [AtomicU64; CPUS],
    /// Stop-function runs per CPU.
    ran: [StdUsize; CPUS],
    /// Context synchronisations per CPU.
    synced: [StdUsize; CPUS],
    tick_ns: u64,
    stop: OnceLock<Weak<StopMachine<LoomArch>>>,
}

// SAFETY: the text cells are accessed only through loom's `with`/`with_mut`, which
// fail the model on any access not ordered against a write (the point of the models).
unsafe impl Sync for Machine {}

impl Machine {
    fn read_text(&self, word: usize) -> u32 {
        // SAFETY: loom's cell checks that no write races with this read.
        self.text[word].with(|p| unsafe { *p })
    }

    fn write_text(&self, word: usize, value: u32) {
        // SAFETY: loom's cell checks that no access races with this write.
        self.text[word].with_mut(|p| unsafe { *p = value });
    }

    /// What every CPU's code does between two interrupts: fetch the text.
    fn normal_code(&self) {
        let me = current_cpu();
        assert!(
            !self.masked[me].load(SeqCst),
            "cpu{me} runs normal code masked"
        );
        for word in 0..WORDS {
            let fetched = self.icache[me][word].load(SeqCst);
            let current = self.read_text(word);
            assert_eq!(
                fetched, current,
                "cpu{me} runs stale text at word {word}: it fetches {fetched:#x}, the text \
                 holds {current:#x} (it unmasked without a context synchronisation after \
                 the write)"
            );
        }
    }
}

use std::sync::atomic::Ordering::SeqCst;

/// The host architecture of the models.
#[derive(Clone)]
struct LoomArch(Arc<Machine>);

impl LoomArch {
    /// Takes a pending stop IPI, if this CPU is unmasked.
    fn poll_interrupts(&self) {
        let me = current_cpu();
        let machine = &self.0;
        if machine.masked[me].load(SeqCst) {
            return;
        }
        // Only a load, no read-modify-write: a wait loop that only loads is one loom
        // explores to the end. Acquire pairs with the Release in `send_stop_ipi`.
        let sent = machine.ipis_sent[me].load(Ordering::Acquire);
        if sent == machine.ipis_taken[me].load(SeqCst) {
            return;
        }
        machine.ipis_taken[me].store(sent, SeqCst);
        let stop = machine.stop.get().and_then(Weak::upgrade);
        // The exception entry masks, its return restores.
        let was = machine.masked[me].swap(true, SeqCst);
        if let Some(stop) = stop {
            stop.handle_stop_ipi();
        }
        machine.masked[me].store(was, SeqCst);
    }

    /// Takes a pending self-NMI (on the CPU's NMI thread).
    fn poll_nmi(&self) {
        let me = current_cpu();
        let machine = &self.0;
        // As `poll_interrupts`. Acquire pairs with the Release in `send_self_nmi`.
        let sent = machine.nmis_sent[me].load(Ordering::Acquire);
        if sent == machine.nmis_taken[me].load(SeqCst) {
            return;
        }
        machine.nmis_taken[me].store(sent, SeqCst);
        if let Some(stop) = machine.stop.get().and_then(Weak::upgrade) {
            stop.handle_nmi();
        }
    }
}

// SAFETY: `cpu_id` is the thread's bound CPU, < CPUS; `mask_all` makes
// `poll_interrupts` take nothing until `restore`; a stop IPI stays pending until its
// CPU polls unmasked, which every idle loop and `relax` does; `sync_context` refreshes
// the CPU's fetches from the text (through loom's cell, which checks the ordering).
unsafe impl Arch for LoomArch {
    type MaskState = bool;

    fn cpu_id(&self) -> usize {
        current_cpu()
    }

    fn online_cpus(&self) -> CpuSet {
        CpuSet::first(self.0.cpus)
    }

    fn mask_all(&self) -> bool {
        self.0.masked[current_cpu()].swap(true, SeqCst)
    }

    fn restore(&self, was_masked: bool) {
        self.0.masked[current_cpu()].store(was_masked, SeqCst);
    }

    fn all_masked(&self) -> bool {
        self.0.masked[current_cpu()].load(SeqCst)
    }

    fn send_stop_ipi(&self, targets: CpuSet) {
        for cpu in targets {
            self.0.ipis_sent[cpu].fetch_add(1, Ordering::Release);
        }
    }

    fn sync_context(&self) {
        let me = current_cpu();
        for word in 0..WORDS {
            self.0.icache[me][word].store(self.0.read_text(word), SeqCst);
        }
        self.0.synced[me].fetch_add(1, SeqCst);
    }

    fn relax(&self) {
        self.poll_interrupts();
        self.0.clock[current_cpu()].fetch_add(self.0.tick_ns, SeqCst);
        thread::yield_now();
    }

    fn now_ns(&self) -> u64 {
        self.0.clock[current_cpu()].load(SeqCst)
    }

    fn call_context(&self) -> CallContext {
        // The model's callers call from normal code; an IPI handler runs masked.
        if self.0.masked[current_cpu()].load(SeqCst) {
            CallContext::IrqsMasked
        } else {
            CallContext::Normal
        }
    }
}

// SAFETY: the NMI is taken by the CPU's NMI thread, whatever the mask, and its handler
// calls `handle_nmi` first; it never nests (one thread).
unsafe impl NmiArch for LoomArch {
    fn send_self_nmi(&self) {
        self.0.nmis_sent[current_cpu()].fetch_add(1, Ordering::Release);
    }
}

/// One model's machine: `cpus` CPUs, the stop machine driving them.
struct Model {
    machine: Arc<Machine>,
    stop: Arc<StopMachine<LoomArch>>,
}

const INITIAL_TEXT: [u32; WORDS] = [0xd280_0020, insn::RET]; // MOVZ X0, #1; RET

impl Model {
    fn new(cpus: usize, tick_ns: u64) -> Model {
        let machine = Arc::new(Machine {
            cpus,
            text: INITIAL_TEXT.map(UnsafeCell::new),
            ipis_sent: std::array::from_fn(|_| AtomicUsize::new(0)),
            ipis_taken: std::array::from_fn(|_| StdUsize::new(0)),
            nmis_sent: std::array::from_fn(|_| AtomicUsize::new(0)),
            nmis_taken: std::array::from_fn(|_| StdUsize::new(0)),
            masked: std::array::from_fn(|_| StdBool::new(false)),
            icache: std::array::from_fn(|_| INITIAL_TEXT.map(AtomicU32::new)),
            clock: std::array::from_fn(|_| AtomicU64::new(0)),
            ran: std::array::from_fn(|_| StdUsize::new(0)),
            synced: std::array::from_fn(|_| StdUsize::new(0)),
            tick_ns,
            stop: OnceLock::new(),
        });
        let stop = Arc::new(StopMachine::new(LoomArch(machine.clone())));
        let _ = machine.stop.set(Arc::downgrade(&stop));
        CPU.with(|cpu| cpu.set(0));
        Model { machine, stop }
    }

    /// Starts CPU `cpu` on a loom thread of its own, running `body`.
    fn spawn(&self, cpu: usize, body: impl FnOnce(&Model) + 'static) -> thread::JoinHandle<()> {
        let model = Model {
            machine: self.machine.clone(),
            stop: self.stop.clone(),
        };
        thread::spawn(move || {
            CPU.with(|c| c.set(cpu));
            body(&model);
        })
    }

    /// Starts CPU `cpu` idling until `quit`: normal code, interrupts taken.
    fn spawn_idle(&self, cpu: usize, quit: &Arc<AtomicBool>) -> thread::JoinHandle<()> {
        let quit = quit.clone();
        self.spawn(cpu, move |model| model.idle_until(&quit))
    }

    /// This CPU runs normal code and takes interrupts until `flag` is set, then runs
    /// normal code once more (it fetches the text as it is after every call).
    fn idle_until(&self, flag: &AtomicBool) {
        // Acquire: pairs with the Release of whoever sets the flag (model bookkeeping).
        while !flag.load(Ordering::Acquire) {
            self.machine.normal_code();
            self.stop.arch().poll_interrupts();
            thread::yield_now();
        }
        self.machine.normal_code();
    }

    fn ran(&self, cpu: usize) -> usize {
        self.machine.ran[cpu].load(SeqCst)
    }

    /// After every CPU's thread was joined: every CPU left the rendezvous.
    fn assert_all_left(&self) {
        for cpu in 0..self.machine.cpus {
            assert!(
                !self.machine.masked[cpu].load(SeqCst),
                "cpu{cpu} is still masked at the end"
            );
        }
    }
}

/// The stop function of the models: checks that every other CPU is masked (in the
/// rendezvous, not in normal code), counts its run; `writer` writes the text (one word,
/// one more than it held); `fail` makes one CPU return an error code.
fn stop_function(
    machine: &Arc<Machine>,
    writer: usize,
    fail: Option<(usize, i32)>,
) -> impl Fn(usize) -> StopFnResult + Sync + use<> {
    let machine = machine.clone();
    move |cpu| {
        for other in (0..machine.cpus).filter(|&other| other != cpu) {
            assert!(
                machine.masked[other].load(SeqCst),
                "cpu{cpu} runs the stop function while cpu{other} is unmasked (running \
                 normal code)"
            );
        }
        // The evidence every CPU recorded as it arrived is visible here: the initiator's
        // through its `Run` release, a joiner's through its `Arrived` release and the
        // initiator's gather (what `patch_machine` checks before it writes).
        if let Some(stop) = machine.stop.get().and_then(Weak::upgrade) {
            assert_eq!(
                stop.quiescence().masked,
                CpuSet::first(machine.cpus),
                "cpu{cpu} runs the stop function without every CPU's quiescence evidence"
            );
        }
        machine.ran[cpu].fetch_add(1, SeqCst);
        if cpu == writer {
            machine.write_text(0, machine.read_text(0).wrapping_add(1));
        }
        match fail {
            Some((failing, code)) if failing == cpu => Err(code),
            _ => Ok(()),
        }
    }
}

// ---------------------------------------------------------------------------------
// The models.
// ---------------------------------------------------------------------------------

/// Quiescence before the first write: `cpus` CPUs, CPU 0 calls `stop_machine` with
/// `active`, CPU `writer` writes the text. No CPU runs normal code while the function
/// runs (the stop function checks every other CPU is masked; loom checks every fetch
/// is ordered before the write), and the function runs once on each active CPU.
fn quiescence(cpus: usize, active: CpuSet, writer: usize) -> impl Fn() + Sync + Send {
    move || {
        let model = Model::new(cpus, TICK_NS);
        let quit = Arc::new(AtomicBool::new(false));
        let joiners: Vec<_> = (1..cpus).map(|cpu| model.spawn_idle(cpu, &quit)).collect();
        model.machine.normal_code();
        let function = stop_function(&model.machine, writer, None);
        let result = model.stop.stop_machine(&function, active, PATIENT);
        assert_eq!(result, Ok(()));
        model.machine.normal_code();
        quit.store(true, Ordering::Release);
        joiners.into_iter().for_each(|j| j.join().unwrap());
        for cpu in 0..cpus {
            assert_eq!(
                model.ran(cpu),
                usize::from(active.contains(cpu)),
                "cpu{cpu}"
            );
        }
        model.assert_all_left();
    }
}

#[test]
fn quiescence_before_the_first_write() {
    check(
        "quiescence_before_the_first_write (2 CPUs, the initiator writes)",
        3,
        quiescence(2, CpuSet::single(0), 0),
    );
}

/// Two joiners, so the gather's cursor moves past one to the other. Only without
/// preemptions (switches at yields, every value each load may return): at bound 1 the
/// two spinning joiners make loom's search run past 100 s here.
#[test]
fn quiescence_before_the_first_write_3_cpus() {
    check(
        "quiescence_before_the_first_write (3 CPUs, the initiator writes)",
        0,
        quiescence(3, CpuSet::single(0), 0),
    );
}

#[test]
fn quiescence_before_the_first_write_needs_the_arrival_release() {
    must_fail(
        "quiescence_before_the_first_write",
        &[Knob::ArrivedRelaxed],
        2,
        quiescence(2, CpuSet::single(0), 0),
    );
}

#[test]
fn quiescence_when_a_joiner_writes() {
    check(
        "quiescence_when_a_joiner_writes (2 CPUs, CPU 1 active and writing)",
        3,
        quiescence(2, CpuSet::single(1), 1),
    );
}

#[test]
fn quiescence_when_a_joiner_writes_needs_the_run_release() {
    must_fail(
        "quiescence_when_a_joiner_writes",
        &[Knob::RunRelaxed],
        3,
        quiescence(2, CpuSet::single(1), 1),
    );
}

/// Context synchronisation before unmask on every CPU: CPU 0 writes in a call on
/// `cpus` CPUs; every CPU, the initiator included, then runs normal code (after it
/// left) and must fetch the new text, which it does only through `sync_context`.
fn sync_before_unmask(cpus: usize) -> impl Fn() + Sync + Send {
    move || {
        let model = Model::new(cpus, TICK_NS);
        let quit = Arc::new(AtomicBool::new(false));
        let joiners: Vec<_> = (1..cpus).map(|cpu| model.spawn_idle(cpu, &quit)).collect();
        let function = stop_function(&model.machine, 0, None);
        let result = model
            .stop
            .stop_machine(&function, CpuSet::single(0), PATIENT);
        assert_eq!(result, Ok(()));
        model.machine.normal_code();
        quit.store(true, Ordering::Release);
        joiners.into_iter().for_each(|j| j.join().unwrap());
        for cpu in 0..cpus {
            assert!(
                model.machine.synced[cpu].load(SeqCst) >= 1,
                "cpu{cpu} never synced"
            );
        }
        model.assert_all_left();
    }
}

#[test]
fn every_cpu_synchronises_before_it_unmasks() {
    check(
        "every_cpu_synchronises_before_it_unmasks (2 CPUs)",
        3,
        sync_before_unmask(2),
    );
}

#[test]
fn every_cpu_synchronises_before_it_unmasks_fails_without_the_sync() {
    must_fail(
        "every_cpu_synchronises_before_it_unmasks",
        &[Knob::SkipSync],
        2,
        sync_before_unmask(2),
    );
}

#[test]
fn every_cpu_synchronises_before_it_unmasks_needs_the_exit_release() {
    must_fail(
        "every_cpu_synchronises_before_it_unmasks",
        &[Knob::ExitRelaxed],
        2,
        sync_before_unmask(2),
    );
}

/// Abort on arrival timeout: CPU 0 calls with every CPU active and an arrival timeout
/// that fires at its second look; CPU 1 may take the IPI in time or not. Either the
/// call completed and ran everywhere, or it failed with a timeout that names CPU 1 (the
/// only CPU that can be late), the function ran nowhere, and every CPU that arrived
/// left (every thread ends unmasked).
fn abort_on_arrival_timeout() -> impl Fn() + Sync + Send {
    || {
        let model = Model::new(2, TICK_NS);
        let quit = Arc::new(AtomicBool::new(false));
        let joiner = model.spawn_idle(1, &quit);
        let function = stop_function(&model.machine, 0, None);
        let result = model
            .stop
            .stop_machine(&function, CpuSet::first(2), IMPATIENT);
        match result {
            Ok(()) => assert!(model.ran(0) == 1 && model.ran(1) == 1),
            Err(StopError::Timeout { missing, .. }) => {
                assert_eq!(
                    missing,
                    CpuSet::single(1),
                    "the timeout must name the CPU that did not arrive"
                );
                assert!(
                    model.ran(0) == 0 && model.ran(1) == 0,
                    "ran in an aborted call"
                );
            }
            Err(other) => panic!("unexpected {other:?}"),
        }
        model.machine.normal_code();
        quit.store(true, Ordering::Release);
        joiner.join().unwrap();
        model.assert_all_left();
    }
}

#[test]
fn abort_on_arrival_timeout_runs_nowhere_and_names_the_late_cpu() {
    check(
        "abort_on_arrival_timeout (2 CPUs)",
        3,
        abort_on_arrival_timeout(),
    );
}

/// The suspected bug of `await_arrivals`, confirmed: with the missing CPUs computed
/// after the abort is stored, as it was, a CPU that acknowledges in between is not
/// named, and the timeout names no CPU at all.
#[test]
fn abort_on_arrival_timeout_named_nobody_when_missing_was_computed_after_the_abort() {
    must_fail(
        "abort_on_arrival_timeout",
        &[Knob::MissingAfterAbort],
        3,
        abort_on_arrival_timeout(),
    );
}

#[test]
fn abort_on_arrival_timeout_needs_the_abort_store() {
    must_fail(
        "abort_on_arrival_timeout",
        &[Knob::AbortNotStored],
        3,
        abort_on_arrival_timeout(),
    );
}

/// A late CPU holding a stale IPI: call g on 2 CPUs (both active) times out at the
/// initiator's second look, so CPU 1 may still be in its IPI of g, or still hold it,
/// when call g + 1 starts (patient). Call g + 1 completes, each CPU runs its function
/// exactly once in it, and nothing runs out of turn.
fn stale_ipi() -> impl Fn() + Sync + Send {
    || {
        let model = Model::new(2, TICK_NS);
        let quit = Arc::new(AtomicBool::new(false));
        let joiner = model.spawn_idle(1, &quit);
        let function = stop_function(&model.machine, 0, None);
        let first = model
            .stop
            .stop_machine(&function, CpuSet::first(2), IMPATIENT);
        let runs_first = match first {
            Ok(()) => 1,
            Err(StopError::Timeout { .. }) => 0,
            Err(other) => panic!("unexpected {other:?}"),
        };
        assert!(model.ran(0) == runs_first && model.ran(1) == runs_first);
        model.machine.normal_code();
        let second = model
            .stop
            .stop_machine(&function, CpuSet::first(2), PATIENT);
        assert_eq!(second, Ok(()));
        assert_eq!(
            (model.ran(0), model.ran(1)),
            (runs_first + 1, runs_first + 1)
        );
        model.machine.normal_code();
        quit.store(true, Ordering::Release);
        joiner.join().unwrap();
        model.assert_all_left();
    }
}

#[test]
fn a_late_cpu_holding_a_stale_ipi() {
    check("a_late_cpu_holding_a_stale_ipi (2 CPUs)", 2, stale_ipi());
}

#[test]
fn a_late_cpu_holding_a_stale_ipi_needs_the_generation_check() {
    must_fail(
        "a_late_cpu_holding_a_stale_ipi",
        &[Knob::JoinerIgnoresGeneration],
        2,
        stale_ipi(),
    );
}

/// Back-to-back calls from CPU 0 on 2 CPUs, both active: CPU 0 writes in the first,
/// CPU 1 writes in the second and fails it with -7. The second call must report
/// exactly that failure and every CPU fetch the text as the second call left it.
fn back_to_back() -> impl Fn() + Sync + Send {
    || {
        let model = Model::new(2, TICK_NS);
        let quit = Arc::new(AtomicBool::new(false));
        let joiner = model.spawn_idle(1, &quit);
        let first = stop_function(&model.machine, 0, None);
        assert_eq!(
            model.stop.stop_machine(&first, CpuSet::first(2), PATIENT),
            Ok(())
        );
        let second = stop_function(&model.machine, 1, Some((1, -7)));
        match model.stop.stop_machine(&second, CpuSet::first(2), PATIENT) {
            Err(StopError::Failed(failures)) => {
                assert_eq!(failures.cpus(), CpuSet::single(1));
                assert_eq!(failures.code(1), Some(-7));
            }
            other => panic!("the second call returned {other:?}, not cpu1's -7"),
        }
        model.machine.normal_code();
        quit.store(true, Ordering::Release);
        joiner.join().unwrap();
        assert_eq!((model.ran(0), model.ran(1)), (2, 2));
        assert_eq!(model.machine.read_text(0), INITIAL_TEXT[0] + 2);
        model.assert_all_left();
    }
}

#[test]
fn back_to_back_calls() {
    check("back_to_back_calls (2 CPUs)", 2, back_to_back());
}

#[test]
fn back_to_back_calls_need_the_generation_in_the_acknowledgement() {
    must_fail(
        "back_to_back_calls",
        &[Knob::AckIgnoresGeneration],
        2,
        back_to_back(),
    );
}

#[test]
fn back_to_back_calls_need_the_ran_release() {
    must_fail("back_to_back_calls", &[Knob::RanRelaxed], 2, back_to_back());
}

/// Two concurrent callers: CPUs 0 and 1 both call `stop_machine` (each active alone,
/// each writing). Each call completes or is refused Busy (or, with a short arrival
/// timeout, times out naming the other CPU), the functions never overlap (each checks
/// the other CPU is masked; loom checks the writes are ordered), and each completed
/// call ran once.
fn two_callers(options: StopOptions) -> impl Fn() + Sync + Send {
    let impatient = options.arrival_timeout_ns < PATIENT.arrival_timeout_ns;
    move || {
        let model = Model::new(2, TICK_NS);
        let quit = Arc::new(AtomicBool::new(false));
        let done1 = Arc::new(AtomicBool::new(false));
        let second = {
            let (quit, done1) = (quit.clone(), done1.clone());
            model.spawn(1, move |model| {
                let function = stop_function(&model.machine, 1, None);
                let result = model
                    .stop
                    .stop_machine(&function, CpuSet::single(1), options);
                check_caller(model, 1, result, impatient);
                done1.store(true, Ordering::Release);
                model.idle_until(&quit);
            })
        };
        let function = stop_function(&model.machine, 0, None);
        let result = model
            .stop
            .stop_machine(&function, CpuSet::single(0), options);
        check_caller(&model, 0, result, impatient);
        model.idle_until(&done1);
        quit.store(true, Ordering::Release);
        second.join().unwrap();
        model.assert_all_left();
    }
}

fn check_caller(model: &Model, cpu: usize, result: Result<(), StopError>, impatient: bool) {
    match result {
        Ok(()) => assert_eq!(model.ran(cpu), 1, "cpu{cpu}'s call completed"),
        Err(StopError::Busy { .. }) => assert_eq!(model.ran(cpu), 0, "cpu{cpu} was refused"),
        // Only with an arrival timeout the other CPU can miss: it names that CPU.
        Err(StopError::Timeout { missing, .. }) if impatient => {
            assert_eq!(missing, CpuSet::single(1 - cpu));
            assert_eq!(model.ran(cpu), 0, "cpu{cpu}'s call timed out");
        }
        Err(other) => panic!("cpu{cpu}'s call returned {other:?}"),
    }
}

/// The bug this model found: CPU 1 misses CPU 0's call (it times out), then calls
/// itself and, waiting with interrupts on for CPU 0, takes the stop IPI still pending
/// from CPU 0's call; that used to make it a joiner of its own call, waiting, masked,
/// for itself (to the stall panic; with these bounds, forever).
#[test]
fn two_concurrent_callers_one_busy_joined_its_own_call_before_the_fix() {
    let options = StopOptions {
        arrival_timeout_ns: TICK_NS / 2,
        stall_timeout_ns: 64 * TICK_NS,
        ..PATIENT
    };
    must_fail(
        "two_concurrent_callers_one_busy",
        &[Knob::InitiatorJoinsOwnCall],
        2,
        two_callers(options),
    );
}

#[test]
fn two_concurrent_callers_serialise() {
    check(
        "two_concurrent_callers_serialise (2 CPUs)",
        2,
        two_callers(PATIENT),
    );
}

#[test]
fn two_concurrent_callers_one_busy() {
    // The lock wait is bounded by the arrival timeout: one tick, so the loser of the
    // lock is refused Busy unless the winner is already done (and the winner may time
    // out on the loser, which answers its IPI only at its next poll).
    let options = StopOptions {
        arrival_timeout_ns: TICK_NS / 2,
        ..PATIENT
    };
    check(
        "two_concurrent_callers_one_busy (2 CPUs)",
        2,
        two_callers(options),
    );
}

/// The NMI-mode result hand-off: one CPU, its function run from its self-NMI (its NMI
/// thread), failing with -5; a logical tick of half `NMI_TIMEOUT_NS`, so the
/// initiator's withdrawal of the request races with the handler's claim too. Either the
/// handler ran the function and the call reports its -5, or the request was withdrawn
/// before the handler claimed it, the function never runs, and the call reports
/// ETIMEDOUT.
fn nmi_hand_off() -> impl Fn() + Sync + Send {
    || {
        let model = Model::new(1, patch_machine::stop::NMI_TIMEOUT_NS / 2);
        let quit = Arc::new(AtomicBool::new(false));
        let nmi_thread = {
            let quit = quit.clone();
            model.spawn(0, move |model| {
                while !quit.load(Ordering::Acquire) {
                    model.stop.arch().poll_nmi();
                    thread::yield_now();
                }
                model.stop.arch().poll_nmi();
            })
        };
        let function = stop_function(&model.machine, 0, Some((0, -5)));
        // SAFETY: the function takes no lock, allocates nothing (its checks panic only
        // in a failed model).
        let nmi_safe = unsafe { NmiSafe::new(&function) };
        let result = model
            .stop
            .stop_machine_nmi(nmi_safe, CpuSet::single(0), PATIENT);
        let expected = if model.ran(0) == 1 { -5 } else { ETIMEDOUT };
        match result {
            Err(StopError::Failed(failures)) => assert_eq!(
                failures.code(0),
                Some(expected),
                "the call reported {:?}, the NMI handler {} the function",
                failures.code(0),
                if model.ran(0) == 1 {
                    "ran"
                } else {
                    "never ran"
                }
            ),
            other => panic!(
                "the call returned {other:?}; the NMI handler {} the function (-5)",
                if model.ran(0) == 1 {
                    "ran"
                } else {
                    "never ran"
                }
            ),
        }
        quit.store(true, Ordering::Release);
        nmi_thread.join().unwrap();
        assert!(model.ran(0) <= 1);
    }
}

#[test]
fn nmi_mode_result_hand_off() {
    check(
        "nmi_mode_result_hand_off (1 CPU and its NMI)",
        3,
        nmi_hand_off(),
    );
}

#[test]
fn nmi_mode_result_hand_off_needs_the_done_release() {
    must_fail(
        "nmi_mode_result_hand_off",
        &[Knob::NmiDoneRelaxed],
        3,
        nmi_hand_off(),
    );
}

/// `patch_machine` on the model's text, playing A64 words at `BASE`.
struct LoomText {
    machine: Arc<Machine>,
    writer: spin::Mutex<()>,
}

// SAFETY: every address of `text_range` is one of the machine's words; a write is one
// store to its loom cell (which checks that no fetch races with it); the model's
// "instruction cache" is refreshed by `sync_context`, so there is nothing to maintain.
unsafe impl Text for LoomText {
    type Insn = u32;

    fn text_range(&self) -> Range<usize> {
        BASE..BASE + 4 * WORDS
    }

    fn protected_ranges(&self) -> &[Range<usize>] {
        &[]
    }

    fn read_insn(&self, addr: usize, _len: usize) -> u32 {
        self.machine.read_text((addr - BASE) / 4)
    }

    unsafe fn write_insn(&self, addr: usize, insn: u32) {
        self.machine.write_text((addr - BASE) / 4, insn);
    }

    fn sync_icache(&self, _range: Range<usize>) {}

    fn writer_lock(&self) -> &spin::Mutex<()> {
        &self.writer
    }
}

/// `patch_machine` on `cpus` CPUs, from CPU 0: `MOVZ X0, #1` becomes `MOVZ X0, #2`.
/// The write happens only while every other CPU is quiescent (loom: every fetch is
/// ordered before it), the report says every CPU was masked, and every CPU fetches the
/// new instruction afterwards.
fn patch(cpus: usize) -> impl Fn() + Sync + Send {
    move || {
        let model = Model::new(cpus, TICK_NS);
        let quit = Arc::new(AtomicBool::new(false));
        let joiners: Vec<_> = (1..cpus).map(|cpu| model.spawn_idle(cpu, &quit)).collect();
        let text = LoomText {
            machine: model.machine.clone(),
            writer: spin::Mutex::new(()),
        };
        let new = insn::movz_x(0, 2, 0).unwrap();
        let batch = [Patch::new(BASE, INITIAL_TEXT[0], new)];
        let report = patch_machine(&*model.stop, &text, &batch, PATIENT).unwrap();
        assert_eq!(report.quiescence.masked, CpuSet::first(cpus));
        assert_eq!(model.machine.read_text(0), new);
        model.machine.normal_code();
        quit.store(true, Ordering::Release);
        joiners.into_iter().for_each(|j| j.join().unwrap());
        model.assert_all_left();
    }
}

#[test]
fn patch_machine_writes_only_while_all_are_quiescent() {
    check(
        "patch_machine_writes_only_while_all_are_quiescent (2 CPUs)",
        3,
        patch(2),
    );
}

#[test]
fn patch_machine_needs_the_arrival_release() {
    must_fail(
        "patch_machine_writes_only_while_all_are_quiescent",
        &[Knob::ArrivedRelaxed],
        2,
        patch(2),
    );
}

#[test]
fn patch_machine_needs_the_sync_before_unmask() {
    must_fail(
        "patch_machine_writes_only_while_all_are_quiescent",
        &[Knob::SkipSync],
        2,
        patch(2),
    );
}
