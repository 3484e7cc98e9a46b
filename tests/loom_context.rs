//! Model check, with [loom](https://docs.rs/loom), of the context-tracking protocol of
//! `src/stop/context.rs` (issue 13): the real `ContextStates` (`exit_to_user`,
//! `enter_kernel`, `finish_deferred`, `try_defer` through `defer`, `open_stop`,
//! `close_stop`) and, for a stop, the real `StopMachine`, whose `Arch::context_states`
//! returns the model's states. Every interleaving of a patcher (CPU 0) and an isolated
//! CPU (CPU 1) up to a preemption bound, and every value the C11 memory model lets each
//! load return.
//!
//! Built only with `RUSTFLAGS="--cfg loom"` (`src/sync.rs` then gives the core loom's
//! atomics); `tests/loom_models.rs` runs it with `tests/loom_stop.rs` from the plain
//! `cargo test`:
//!
//! ```sh
//! RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom cargo test --release --test loom_context -- --nocapture --test-threads=1
//! ```
//!
//! The machine ([`LoomArch`]): the isolated CPU is in user mode (runs no kernel text), in
//! its entry or exit code (`.text.nopatch`), or in patchable kernel code, which fetches
//! the text through the CPU's own copy, refreshed only by `Arch::sync_context`. Two texts:
//! - the stop's, a loom `UnsafeCell`: a fetch not ordered against the stop's write (a
//!   deferred entry that does not wait the stop out) is a data race loom reports, and the
//!   stop function also checks the isolated CPU is masked or out of patchable code;
//! - the live path's (one instruction replaced, atomically for fetches), a loom atomic:
//!   once the CPU has seen the patch call return, it must fetch the new value.
//!
//! The properties: entry vs patch and exit vs patch (live path and stop), the CPU never
//! runs stale code once the patch has returned; a deferred entry vs a stop in progress,
//! the entry never runs kernel text while the stop writes it. Both outcomes (deferred,
//! interrupted) must occur across each model's interleavings, or the model proved
//! nothing about the protocol. Every model has weakened twins (`weaken` knobs of
//! `context.rs`) that loom must find failing.

#![cfg(loom)]

use loom::cell::UnsafeCell;
use loom::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use loom::thread;
use patch_machine::CpuSet;
use patch_machine::stop::{
    Arch, CallContext, ContextStates, StopFnResult, StopMachine, StopOptions,
};
use patch_machine::sync::weaken::Knob;
use std::cell::Cell;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::atomic::{
    AtomicBool as StdBool, AtomicU32 as StdU32, AtomicU64 as StdU64, AtomicUsize as StdUsize,
};
use std::sync::{Arc, OnceLock, Weak};

mod loom_harness;
use loom_harness::{check, must_fail};

const CPUS: usize = 2;
/// The CPU that patches.
const PATCHER: usize = 0;
/// The isolated CPU, running user code.
const ISOLATED: usize = 1;
const OLD: u32 = 1;
const NEW: u32 = 2;
/// Logical nanoseconds per `relax`.
const TICK_NS: u64 = 1_000;
/// Timeouts that never fire in a model (its loops are bounded by loom's yields).
const PATIENT: StopOptions = StopOptions {
    arrival_timeout_ns: 1 << 40,
    stall_timeout_ns: 1 << 40,
    ..StopOptions::DEFAULT
};
/// The entry's limit for a stop to close, never reached in a model.
const ENTRY_LIMIT_NS: u64 = 1 << 40;

loom::thread_local! {
    /// The CPU this loom thread plays.
    static CPU: Cell<usize> = Cell::new(usize::MAX);
}

fn current_cpu() -> usize {
    CPU.with(Cell::get)
}

/// The machine. Loom atomics and cells for what CPUs share; std atomics for what one CPU
/// alone touches and for the model's bookkeeping (loom threads run one at a time).
struct Machine {
    states: ContextStates,
    /// The text a stop writes.
    text: UnsafeCell<u32>,
    /// The text the live path writes.
    live_text: AtomicU32,
    /// What each CPU fetches of each text: as of its last context synchronisation.
    icache: [StdU32; CPUS],
    live_icache: [StdU32; CPUS],
    /// IPIs sent to each CPU (Release; taken with Acquire), taken, and, for the live
    /// path's synchronisation IPI, acknowledged (Release, to the patcher's Acquire).
    ipis_sent: [AtomicUsize; CPUS],
    ipis_taken: [StdUsize; CPUS],
    ipis_acked: [AtomicUsize; CPUS],
    masked: [StdBool; CPUS],
    /// The CPU runs patchable kernel code (not user mode, not its entry or exit code).
    patchable: [StdBool; CPUS],
    clock: [StdU64; CPUS],
    /// The stop machine of a stop model; none: the IPI is the live path's sync IPI.
    stop: OnceLock<Weak<StopMachine<LoomArch>>>,
}

// SAFETY: the text cell is accessed only through loom's `with`/`with_mut`, which fail
// the model on any access not ordered against a write (the point of the models).
unsafe impl Sync for Machine {}

impl Machine {
    fn read_text(&self) -> u32 {
        // SAFETY: loom's cell checks that no write races with this read.
        self.text.with(|p| unsafe { *p })
    }

    fn write_text(&self, value: u32) {
        // SAFETY: loom's cell checks that no access races with this write.
        self.text.with_mut(|p| unsafe { *p = value });
    }
}

/// The host architecture of the models.
#[derive(Clone)]
struct LoomArch(Arc<Machine>);

impl LoomArch {
    fn ipi_pending(&self) -> bool {
        let me = current_cpu();
        // Acquire pairs with the Release in `send_stop_ipi` / `send_sync_ipi`.
        self.0.ipis_sent[me].load(Ordering::Acquire) != self.0.ipis_taken[me].load(SeqCst)
    }

    /// Takes a pending IPI, if this CPU is unmasked: the stop's, or the live path's
    /// synchronisation IPI.
    fn poll_interrupts(&self) {
        let me = current_cpu();
        let machine = &self.0;
        if machine.masked[me].load(SeqCst) {
            return;
        }
        // Acquire pairs with the Release of the sender.
        let sent = machine.ipis_sent[me].load(Ordering::Acquire);
        if sent == machine.ipis_taken[me].load(SeqCst) {
            return;
        }
        machine.ipis_taken[me].store(sent, SeqCst);
        let was = machine.masked[me].swap(true, SeqCst);
        match machine.stop.get().and_then(Weak::upgrade) {
            Some(stop) => stop.handle_stop_ipi(),
            None => {
                self.sync_context();
                // Release pairs with the patcher's Acquire wait for the acknowledgement.
                machine.ipis_acked[me].store(sent, Ordering::Release);
            }
        }
        machine.masked[me].store(was, SeqCst);
    }

    fn send_sync_ipi(&self, cpu: usize) {
        self.0.ipis_sent[cpu].fetch_add(1, Ordering::Release);
    }
}

// SAFETY: `cpu_id` is the thread's bound CPU, < CPUS; `mask_all` makes
// `poll_interrupts` take nothing until `restore`; an IPI stays pending until its CPU
// polls unmasked (its idle loop, `relax`, or, in user mode, as an entry);
// `sync_context` refreshes the CPU's fetches; the entry and exit code call the
// context-state protocol as `context_states` requires (`Model::enter`, `Model::exit`).
unsafe impl Arch for LoomArch {
    type MaskState = bool;

    fn cpu_id(&self) -> usize {
        current_cpu()
    }

    fn online_cpus(&self) -> CpuSet {
        CpuSet::first(CPUS)
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
        self.0.icache[me].store(self.0.read_text(), SeqCst);
        // Relaxed: what the fetch may see is what the Acquires before it made visible.
        self.0.live_icache[me].store(self.0.live_text.load(Ordering::Relaxed), SeqCst);
    }

    fn relax(&self) {
        self.poll_interrupts();
        self.0.clock[current_cpu()].fetch_add(TICK_NS, SeqCst);
        thread::yield_now();
    }

    fn now_ns(&self) -> u64 {
        self.0.clock[current_cpu()].load(SeqCst)
    }

    fn context_states(&self) -> Option<&ContextStates> {
        Some(&self.0.states)
    }

    fn call_context(&self) -> CallContext {
        if self.0.masked[current_cpu()].load(SeqCst) {
            CallContext::IrqsMasked
        } else {
            CallContext::Normal
        }
    }
}

/// One model's machine.
struct Model {
    arch: LoomArch,
    stop: Option<Arc<StopMachine<LoomArch>>>,
    quit: Arc<AtomicBool>,
}

impl Model {
    /// CPU 1 isolated, in user mode if `in_user`; with a stop machine if `with_stop`.
    fn new(in_user: bool, with_stop: bool) -> Model {
        let machine = Arc::new(Machine {
            states: ContextStates::new(),
            text: UnsafeCell::new(OLD),
            live_text: AtomicU32::new(OLD),
            icache: std::array::from_fn(|_| StdU32::new(OLD)),
            live_icache: std::array::from_fn(|_| StdU32::new(OLD)),
            ipis_sent: std::array::from_fn(|_| AtomicUsize::new(0)),
            ipis_taken: std::array::from_fn(|_| StdUsize::new(0)),
            ipis_acked: std::array::from_fn(|_| AtomicUsize::new(0)),
            masked: std::array::from_fn(|_| StdBool::new(false)),
            patchable: std::array::from_fn(|_| StdBool::new(true)),
            clock: std::array::from_fn(|_| StdU64::new(0)),
            stop: OnceLock::new(),
        });
        machine.states.set_isolated(CpuSet::single(ISOLATED));
        if in_user {
            machine.patchable[ISOLATED].store(false, SeqCst);
            machine.states.exit_to_user(ISOLATED);
        }
        let arch = LoomArch(machine.clone());
        let stop = with_stop.then(|| Arc::new(StopMachine::new(arch.clone())));
        if let Some(stop) = &stop {
            let _ = machine.stop.set(Arc::downgrade(stop));
        }
        CPU.with(|cpu| cpu.set(PATCHER));
        Model {
            arch,
            stop,
            quit: Arc::new(AtomicBool::new(false)),
        }
    }

    fn machine(&self) -> &Machine {
        &self.arch.0
    }

    /// The kernel entry from user mode, as the architecture's entry code does it: the
    /// swap, the deferred wait, the synchronisation if one was deferred; only then
    /// patchable code.
    fn enter(&self) {
        let me = current_cpu();
        let machine = self.machine();
        let deferred = machine.states.enter_kernel(me);
        // The entry runs masked: its wait takes no interrupt.
        let waited = machine.states.finish_deferred(
            deferred,
            ENTRY_LIMIT_NS,
            || self.arch.now_ns(),
            || {
                machine.clock[me].fetch_add(TICK_NS, SeqCst);
                thread::yield_now();
            },
        );
        assert_eq!(waited, Ok(()), "cpu{me}'s entry waited out its limit");
        if deferred.pending {
            self.arch.sync_context();
        }
        machine.patchable[me].store(true, SeqCst);
    }

    /// The return to user mode: patchable code ends before the exit's RMW (what follows
    /// it is `.text.nopatch`).
    fn exit(&self) {
        let me = current_cpu();
        self.machine().patchable[me].store(false, SeqCst);
        self.machine().states.exit_to_user(me);
    }

    /// User code: no kernel text. An IPI pending is taken: an entry, the handler, the
    /// exit.
    fn user_mode(&self) {
        if self.arch.ipi_pending() {
            self.enter();
            self.arch.poll_interrupts();
            self.exit();
        }
    }

    /// Patchable kernel code runs the patched sites.
    fn kernel_code(&self) {
        let me = current_cpu();
        let machine = self.machine();
        assert!(machine.patchable[me].load(SeqCst), "cpu{me} model error");
        let fetched = machine.icache[me].load(SeqCst);
        let current = machine.read_text();
        assert_eq!(
            fetched, current,
            "cpu{me} runs stale text: it fetches {fetched}, the stop wrote {current}"
        );
    }

    /// Kernel code of the live path's site, `returned`: whether this CPU had seen the
    /// patch call return before it fetched.
    fn live_kernel_code(&self, returned: bool) {
        let me = current_cpu();
        let fetched = self.machine().live_icache[me].load(SeqCst);
        // A stop model never patches the live site.
        if returned && self.stop.is_none() {
            assert_eq!(fetched, NEW, "stale code after the patch had returned");
        }
    }

    /// The isolated CPU's life: (from the kernel: kernel code, an exit, user code,) an
    /// entry, kernel code, then idling with interrupts on until the patcher is done.
    fn isolated_cpu(&self, starts_in_user: bool) {
        if !starts_in_user {
            self.idle_once();
            self.exit();
            self.user_mode();
        }
        self.enter();
        self.idle_once();
        // Acquire: pairs with the patcher's Release of `quit` (model bookkeeping).
        while !self.quit.load(Ordering::Acquire) {
            self.idle_once();
            thread::yield_now();
        }
        self.idle_once();
    }

    fn idle_once(&self) {
        // Acquire pairs with the patcher's Release of `quit`, stored after its call
        // returned.
        let returned = self.quit.load(Ordering::Acquire);
        self.kernel_code();
        self.live_kernel_code(returned);
        self.arch.poll_interrupts();
    }

    fn spawn_isolated(&self, starts_in_user: bool) -> thread::JoinHandle<()> {
        let model = Model {
            arch: self.arch.clone(),
            stop: self.stop.clone(),
            quit: self.quit.clone(),
        };
        thread::spawn(move || {
            CPU.with(|c| c.set(ISOLATED));
            model.isolated_cpu(starts_in_user);
        })
    }
}

/// How often each model deferred the isolated CPU and how often it interrupted it.
struct Outcomes {
    deferred: StdUsize,
    interrupted: StdUsize,
}

impl Outcomes {
    const fn new() -> Outcomes {
        Outcomes {
            deferred: StdUsize::new(0),
            interrupted: StdUsize::new(0),
        }
    }

    fn record(&self, deferred: bool) {
        let counter = if deferred {
            &self.deferred
        } else {
            &self.interrupted
        };
        counter.fetch_add(1, SeqCst);
    }

    /// Both outcomes happened: the model raced the entry (or exit) against the patch.
    fn assert_both(&self, name: &str) {
        let (deferred, interrupted) = (self.deferred.load(SeqCst), self.interrupted.load(SeqCst));
        println!("# loom {name}: {deferred} interleavings deferred, {interrupted} interrupted");
        assert!(
            deferred > 0 && interrupted > 0,
            "{name}: deferred {deferred}, interrupted {interrupted}: the race never happened"
        );
    }
}

/// The live path (as `jump_label` does it): the text written (and made coherent), then
/// the isolated CPU deferred, or interrupted and its acknowledgement awaited.
fn live_patch(starts_in_user: bool, outcomes: &'static Outcomes) -> impl Fn() + Sync + Send {
    move || {
        let model = Model::new(starts_in_user, false);
        let isolated = model.spawn_isolated(starts_in_user);
        let machine = model.machine();
        machine.live_text.store(NEW, Ordering::Relaxed);
        let deferred = machine
            .states
            .defer(CpuSet::single(ISOLATED), None)
            .contains(ISOLATED);
        if !deferred {
            model.arch.send_sync_ipi(ISOLATED);
            // Acquire pairs with the Release of the handler's acknowledgement.
            while machine.ipis_acked[ISOLATED].load(Ordering::Acquire) == 0 {
                thread::yield_now();
            }
        }
        outcomes.record(deferred);
        // Release: the call has returned, to the isolated CPU's Acquire.
        model.quit.store(true, Ordering::Release);
        isolated.join().unwrap();
    }
}

/// A stop (`stop_machine` on CPU 0 only, which writes the stop's text): the isolated CPU
/// is deferred by the real rendezvous if it is in user mode, interrupted otherwise.
fn stop_patch(starts_in_user: bool, outcomes: &'static Outcomes) -> impl Fn() + Sync + Send {
    move || {
        let model = Model::new(starts_in_user, true);
        let stop = model.stop.clone().expect("a stop model");
        let isolated = model.spawn_isolated(starts_in_user);
        let machine = model.arch.0.clone();
        let function = {
            let machine = machine.clone();
            let stop = Arc::downgrade(&stop);
            move |cpu: usize| -> StopFnResult {
                let evidence = stop.upgrade().expect("the stop machine").quiescence();
                assert!(
                    machine.masked[ISOLATED].load(SeqCst)
                        || !machine.patchable[ISOLATED].load(SeqCst),
                    "the stop writes while cpu{ISOLATED} runs patchable kernel code, \
                     neither masked in the rendezvous nor in user mode or its entry"
                );
                assert!(
                    evidence.masked.contains(ISOLATED) != evidence.deferred.contains(ISOLATED),
                    "cpu{ISOLATED} is counted quiescent by neither or both of the rendezvous \
                     and the deferral: {evidence:?}"
                );
                if cpu == PATCHER {
                    machine.write_text(NEW);
                }
                Ok(())
            }
        };
        assert_eq!(
            stop.stop_machine(&function, CpuSet::single(PATCHER), PATIENT),
            Ok(())
        );
        outcomes.record(stop.last_deferred().contains(ISOLATED));
        model.quit.store(true, Ordering::Release);
        isolated.join().unwrap();
    }
}

const BOUND: usize = 6;

#[test]
fn entry_vs_live_patch() {
    static OUTCOMES: Outcomes = Outcomes::new();
    let name = "entry_vs_live_patch (isolated CPU in user mode, enters once)";
    check(name, BOUND, live_patch(true, &OUTCOMES));
    OUTCOMES.assert_both(name);
}

#[test]
fn exit_vs_live_patch() {
    static OUTCOMES: Outcomes = Outcomes::new();
    let name = "exit_vs_live_patch (isolated CPU in the kernel, exits, enters again)";
    check(name, BOUND, live_patch(false, &OUTCOMES));
    OUTCOMES.assert_both(name);
}

#[test]
fn deferred_entry_vs_stop() {
    static OUTCOMES: Outcomes = Outcomes::new();
    let name = "deferred_entry_vs_stop (isolated CPU in user mode, enters during the stop)";
    check(name, BOUND, stop_patch(true, &OUTCOMES));
    OUTCOMES.assert_both(name);
}

#[test]
fn exit_vs_stop() {
    static OUTCOMES: Outcomes = Outcomes::new();
    let name = "exit_vs_stop (isolated CPU in the kernel, exits, enters again)";
    check(name, BOUND, stop_patch(false, &OUTCOMES));
    OUTCOMES.assert_both(name);
}

// The weakened twins: loom must find each failure.

/// The twins' outcomes, not checked: a twin only has to fail.
static TWIN: Outcomes = Outcomes::new();

#[test]
fn live_patch_with_load_then_store_deferral_fails() {
    must_fail(
        "entry_vs_live_patch",
        &[Knob::DeferLoadThenStore],
        BOUND,
        live_patch(true, &TWIN),
    );
}

#[test]
fn stop_with_load_then_store_deferral_fails() {
    must_fail(
        "deferred_entry_vs_stop",
        &[Knob::DeferLoadThenStore],
        BOUND,
        stop_patch(true, &TWIN),
    );
}

#[test]
fn entry_that_does_not_wait_out_the_stop_fails() {
    must_fail(
        "deferred_entry_vs_stop",
        &[Knob::EntryNoWait],
        BOUND,
        stop_patch(true, &TWIN),
    );
}

#[test]
fn relaxed_entry_swap_fails() {
    must_fail(
        "entry_vs_live_patch",
        &[Knob::EntrySwapRelaxed],
        BOUND,
        live_patch(true, &TWIN),
    );
    must_fail(
        "deferred_entry_vs_stop",
        &[Knob::EntrySwapRelaxed],
        BOUND,
        stop_patch(true, &TWIN),
    );
}

#[test]
fn relaxed_deferral_cas_fails() {
    must_fail(
        "entry_vs_live_patch",
        &[Knob::DeferCasRelaxed],
        BOUND,
        live_patch(true, &TWIN),
    );
}

#[test]
fn relaxed_close_stop_fails() {
    must_fail(
        "deferred_entry_vs_stop",
        &[Knob::CloseStopRelaxed],
        BOUND,
        stop_patch(true, &TWIN),
    );
}
