//! The arch-free stop-machine core: Linux's `multi_cpu_stop` state machine, shortened.
//!
//! One CPU (the *initiator*) calls [`StopMachine::stop_machine`]; every other online CPU
//! (a *joiner*) is pulled in by a stop IPI and runs the same loop from its IPI handler.
//! A call has three phases, and each opens only when every CPU it waits for has
//! acknowledged the one before:
//!
//! | phase    | who acknowledges | each CPU does                                        | opened by                                  |
//! |----------|------------------|------------------------------------------------------|--------------------------------------------|
//! | `Arrive` | every participant | masks every asynchronous exception, records that, acknowledges; the initiator does so last, once all the others have | the initiator's stop IPI |
//! | `Run`    | the active CPUs  | active CPUs run the function; the others only wait   | the initiator's own `Arrive` acknowledgement |
//! | `Exit`   | nobody           | context synchronisation (ISB), unmask, leave         | the last active CPU's `Run` acknowledgement |
//!
//! Linux needs four hand-offs (`PREPARE`, `DISABLE_IRQ`, `RUN`, `EXIT`) because its
//! stopper threads arrive with interrupts on and must keep serving them until everyone
//! is there. Here a joiner arrives in an interrupt handler, already unable to take a
//! normal interrupt, so it masks on arrival: its acknowledgement is both "here" and
//! "quiescent". The initiator, the one CPU that arrives with interrupts on, keeps them
//! on while it waits for the others and masks last, so its acknowledgement opens `Run`
//! without a cross-CPU hand-off. `Exit` is a release, not a rendezvous: nothing that a
//! joiner does after it changes what the initiator may conclude, so the initiator leaves
//! as soon as it has opened `Exit` (or seen it opened), and a call with one active CPU
//! costs the stop IPI, one gather of acknowledgements and one release — one interrupt
//! round trip plus the function.
//!
//! That keeps every guarantee of the four-phase loop:
//! - the function runs only after every participant has acknowledged with its
//!   exceptions masked ([`Quiescence`] holds the evidence);
//! - every CPU that masked executes [`Arch::sync_context`] after it observed the end of
//!   `Run` (or anything later) and before it unmasks, so no CPU runs normal code with a
//!   stale instruction stream, whenever it leaves;
//! - a CPU still leaving call `g` when the initiator starts call `g + 1` has its stop IPI
//!   pending until it unmasks, then joins `g + 1` normally: calls never overlap on a CPU.
//!
//! Unlike Linux's loop, every wait is bounded. If some CPU does not *arrive* within
//! [`StopOptions::arrival_timeout_ns`], the initiator aborts the call: the function runs
//! nowhere, the CPUs that did arrive unmask and leave, and the error names the CPUs that
//! never came. Once everyone has arrived, a CPU that stops answering is stuck with its
//! exceptions masked; that is a hard lockup, and the core panics with the phase and the
//! CPUs it waited for rather than spin forever.
//!
//! Every function here is placed in `.text.nopatch`: the code the rendezvous runs is
//! never a valid patch target.
//!
//! The whole shared state is one 64-bit word, `generation | phase | acknowledgements`,
//! so every transition (an acknowledgement, the last acknowledgement that opens the next
//! phase, the initiator's abort) is a single compare-and-swap. The generation makes a
//! late CPU, still holding a stop IPI from an aborted call, harmless: its
//! compare-and-swap names a generation that no longer exists.

mod arch;

pub use arch::Arch;
#[cfg(feature = "stop-machine-nmi")]
pub use arch::NmiArch;

use crate::{CpuSet, MAX_CPUS};
use core::fmt;
use core::sync::atomic::{AtomicBool, AtomicI32, AtomicPtr, AtomicU32, AtomicU64, Ordering};

/// What a stop function returns on one CPU: `Err(code)` with a non-zero, errno-like code.
pub type StopFnResult = Result<(), i32>;

/// A function run by [`StopMachine::stop_machine`] on each active CPU; its argument is
/// the index of the CPU it runs on.
pub type StopFn<'a> = &'a (dyn Fn(usize) -> StopFnResult + Sync);

/// A stop function that may run in NMI context: it takes no lock, does not print,
/// does not allocate, and takes no exception (on x86 an exception's IRET would
/// re-enable NMIs; on arm64 nothing may fault in a handler that runs with interrupts
/// masked). The wrapper makes that promise explicit at the type level, as seed 000's
/// `cpu_stop_nmisafe_fn_t` does.
#[derive(Clone, Copy)]
pub struct NmiSafe<'a>(StopFn<'a>);

impl<'a> NmiSafe<'a> {
    /// Marks `function` as safe to run from an NMI handler.
    ///
    /// # Safety
    /// `function` takes no lock, does not print or allocate, and takes no exception.
    pub const unsafe fn new(function: StopFn<'a>) -> Self {
        NmiSafe(function)
    }
}

/// The error code of an active CPU whose self-NMI never ran the function.
pub const ETIMEDOUT: i32 = -110;

/// How long an active CPU waits for its own NMI before giving up (seed 000 waits one
/// second).
pub const NMI_TIMEOUT_NS: u64 = 1_000_000_000;

/// Per-call limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StopOptions {
    /// How long the initiator waits for the machine to be free and then for every CPU
    /// to arrive before it gives up cleanly ([`StopError::Busy`], [`StopError::Timeout`]).
    pub arrival_timeout_ns: u64,
    /// How long any CPU waits for a phase to complete once everyone has arrived. Past
    /// this a CPU is stuck with exceptions masked: the core panics.
    pub stall_timeout_ns: u64,
    /// What each CPU masks on arrival (the `Arrive` phase).
    pub mask: MaskLevel,
}

/// What the CPUs mask for the window of a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MaskLevel {
    /// Every maskable asynchronous exception, NMIs included where the architecture can
    /// mask them ([`Arch::mask_all`]). The only level safe for patching code that NMI
    /// handlers run: no handler can start inside the window.
    All,
    /// Normal interrupts only ([`Arch::mask_irqs`]): NMIs still arrive. This is
    /// Linux's `stop_machine` (`local_irq_disable`), and what NMI execution needs.
    IrqsOnly,
}

impl StopOptions {
    /// One second to arrive, ten to finish a phase: generous for emulated CPUs.
    pub const DEFAULT: StopOptions = StopOptions {
        arrival_timeout_ns: 1_000_000_000,
        stall_timeout_ns: 10_000_000_000,
        mask: MaskLevel::All,
    };
}

impl Default for StopOptions {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Why [`StopMachine::stop_machine`] failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopError {
    /// `active` was empty or named CPUs that are not online. Nothing ran.
    InvalidCpus {
        /// The set asked for.
        requested: CpuSet,
        /// The online CPUs at the time of the call.
        online: CpuSet,
    },
    /// Another stop-machine call held the machine for the whole arrival timeout.
    Busy {
        /// How long the caller waited.
        waited_ns: u64,
    },
    /// These CPUs did not arrive in time. The function ran on no CPU and every CPU that
    /// had arrived has left.
    Timeout {
        /// The CPUs that never acknowledged arrival.
        missing: CpuSet,
        /// How long the initiator waited.
        waited_ns: u64,
    },
    /// The function ran and returned an error on at least one CPU.
    Failed(Failures),
}

/// The errors returned by the stop function, one per failing CPU (never just the last).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Failures {
    cpus: CpuSet,
    codes: [i32; MAX_CPUS],
}

impl Failures {
    /// The CPUs on which the function failed.
    pub fn cpus(&self) -> CpuSet {
        self.cpus
    }

    /// The error `cpu` returned, if it failed.
    pub fn code(&self, cpu: usize) -> Option<i32> {
        self.cpus.contains(cpu).then(|| self.codes[cpu])
    }

    /// `(cpu, code)` for every failing CPU, in CPU order.
    pub fn iter(&self) -> impl Iterator<Item = (usize, i32)> + '_ {
        self.cpus.iter().map(|cpu| (cpu, self.codes[cpu]))
    }
}

impl fmt::Debug for Failures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl fmt::Display for StopError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StopError::InvalidCpus { requested, online } => write!(
                f,
                "active CPUs {requested} must be a non-empty subset of the online CPUs {online}"
            ),
            StopError::Busy { waited_ns } => write!(
                f,
                "another stop_machine held the machine for {} us",
                waited_ns / 1000
            ),
            StopError::Timeout { missing, waited_ns } => write!(
                f,
                "CPUs {missing} did not arrive within {} us; the function did not run",
                waited_ns / 1000
            ),
            StopError::Failed(failures) => {
                f.write_str("stop function failed on")?;
                for (cpu, code) in failures.iter() {
                    write!(f, " cpu{cpu}={code}")?;
                }
                Ok(())
            }
        }
    }
}

/// Evidence, recorded by the core, that every CPU was quiescent before the function ran.
///
/// Read it from inside the stop function (the `Run` phase) and compare it with
/// [`StopMachine::stamp`] taken right before the first side effect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quiescence {
    /// CPUs that reported every asynchronous exception masked when they acknowledged
    /// the `Arrive` phase.
    pub masked: CpuSet,
    /// The latest stamp taken by any CPU as it acknowledged the `Arrive` phase.
    pub last_ack_stamp: u64,
}

/// Where the initiator's time went in its last call that reached `Run`: the profile of
/// the rendezvous, in nanoseconds of [`Arch::now_ns`]. `tests=bench` prints it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CallProfile {
    /// From entry to the stop IPI sent: checking the CPUs, taking the machine,
    /// publishing the call.
    pub setup_ns: u64,
    /// From the stop IPI sent to the last other CPU's arrival (masked and acknowledged):
    /// the gather, at best one interrupt round trip.
    pub arrive_ns: u64,
    /// From the last arrival to `Exit`: the initiator masking and acknowledging, and the
    /// function on every active CPU.
    pub run_ns: u64,
    /// From `Exit` to the initiator unmasked: its context synchronisation and restore.
    pub exit_ns: u64,
}

/// The instants the initiator records in a call, indexes into `StopMachine::timeline`.
#[derive(Clone, Copy)]
enum Mark {
    Entry = 0,
    IpiSent = 1,
    Arrived = 2,
    Exit = 3,
    Unmasked = 4,
}

/// The phases of one call, in order. `Exit` and `Aborted` are terminal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Phase {
    Idle = 0,
    Arrive = 1,
    Run = 2,
    Exit = 3,
    Aborted = 4,
}

impl Phase {
    fn from_bits(bits: u8) -> Phase {
        match bits {
            1 => Phase::Arrive,
            2 => Phase::Run,
            3 => Phase::Exit,
            4 => Phase::Aborted,
            _ => Phase::Idle,
        }
    }

    fn next(self) -> Phase {
        match self {
            Phase::Arrive => Phase::Run,
            Phase::Run => Phase::Exit,
            terminal => terminal,
        }
    }
}

/// The state word: `generation (24 bits) | phase (8 bits) | acknowledged CPUs (32 bits)`.
#[derive(Clone, Copy, PartialEq, Eq)]
struct State(u64);

impl State {
    const GENERATION_MASK: u32 = (1 << 24) - 1;

    fn new(generation: u32, phase: Phase, acked: CpuSet) -> State {
        State(
            (u64::from(generation & Self::GENERATION_MASK) << 40)
                | (u64::from(phase as u8) << 32)
                | u64::from(acked.bits()),
        )
    }

    fn generation(self) -> u32 {
        (self.0 >> 40) as u32
    }

    fn phase(self) -> Phase {
        Phase::from_bits((self.0 >> 32) as u8)
    }

    fn acked(self) -> CpuSet {
        CpuSet::from_bits(self.0 as u32)
    }
}

/// The function of the current call, published to the other CPUs by pointer.
struct Work<'a> {
    function: StopFn<'a>,
    /// Raises an NMI on the calling CPU: set for calls whose function runs from it.
    #[cfg(feature = "stop-machine-nmi")]
    raise_nmi: Option<&'a (dyn Fn() + Sync)>,
}

/// How a CPU's pass through the loop ended.
enum Outcome {
    /// The call reached `Exit` (for the initiator: every active CPU has finished).
    Completed,
    /// The call ended before `Run`: the initiator aborted it, or this CPU's IPI was
    /// stale. The function ran nowhere.
    Aborted { missing: CpuSet, waited_ns: u64 },
}

/// What a CPU is in a call.
#[derive(Clone, Copy)]
enum Role {
    /// The caller: it arrives last and alone may abort the call.
    Initiator { arrival_timeout_ns: u64 },
    /// A CPU pulled in by the stop IPI.
    Joiner,
}

/// The stop machine of one system. Make it a `static` and route the architecture's
/// stop IPI to [`handle_stop_ipi`](Self::handle_stop_ipi).
pub struct StopMachine<A: Arch> {
    arch: A,
    /// Serialises initiators. Only its holder writes anything but `state` below.
    lock: spin::Mutex<()>,
    state: AtomicU64,
    participants: AtomicU32,
    active: AtomicU32,
    stall_timeout_ns: AtomicU64,
    /// Points at a [`Work`] on the initiator's stack while a call is in flight.
    work: AtomicPtr<Work<'static>>,
    failed: AtomicU32,
    codes: [AtomicI32; MAX_CPUS],
    stamps: AtomicU64,
    masked_at_ack: AtomicU32,
    ack_stamp: [AtomicU64; MAX_CPUS],
    /// The initiator's [`Mark`]s in its last call.
    timeline: [AtomicU64; 5],
    /// CPUs between their `mask_all` and their `restore` in a call.
    in_window: AtomicU32,
    /// The current call masks with [`MaskLevel::IrqsOnly`].
    mask_irqs_only: AtomicBool,
    /// CPUs whose self-NMI may run the function (Linux's `nmi_cpus`): set by the CPU
    /// before it raises the NMI, cleared by whoever claims it first, the handler or the
    /// timed-out waiter.
    #[cfg(feature = "stop-machine-nmi")]
    nmi_pending: AtomicU32,
    /// CPUs whose NMI handler has finished and stored its result.
    #[cfg(feature = "stop-machine-nmi")]
    nmi_done: AtomicU32,
    /// CPUs on which the NMI ran the function in the last NMI call.
    #[cfg(feature = "stop-machine-nmi")]
    nmi_delivered: AtomicU32,
    /// The function's result in each CPU's NMI handler.
    #[cfg(feature = "stop-machine-nmi")]
    nmi_codes: [AtomicI32; MAX_CPUS],
}

impl<A: Arch> StopMachine<A> {
    /// A stop machine driving the CPUs of `arch`.
    pub const fn new(arch: A) -> Self {
        StopMachine {
            arch,
            lock: spin::Mutex::new(()),
            state: AtomicU64::new(0),
            participants: AtomicU32::new(0),
            active: AtomicU32::new(0),
            stall_timeout_ns: AtomicU64::new(StopOptions::DEFAULT.stall_timeout_ns),
            work: AtomicPtr::new(core::ptr::null_mut()),
            failed: AtomicU32::new(0),
            codes: [const { AtomicI32::new(0) }; MAX_CPUS],
            stamps: AtomicU64::new(0),
            masked_at_ack: AtomicU32::new(0),
            ack_stamp: [const { AtomicU64::new(0) }; MAX_CPUS],
            timeline: [const { AtomicU64::new(0) }; 5],
            in_window: AtomicU32::new(0),
            mask_irqs_only: AtomicBool::new(false),
            #[cfg(feature = "stop-machine-nmi")]
            nmi_pending: AtomicU32::new(0),
            #[cfg(feature = "stop-machine-nmi")]
            nmi_done: AtomicU32::new(0),
            #[cfg(feature = "stop-machine-nmi")]
            nmi_delivered: AtomicU32::new(0),
            #[cfg(feature = "stop-machine-nmi")]
            nmi_codes: [const { AtomicI32::new(0) }; MAX_CPUS],
        }
    }

    /// The architecture this machine drives.
    pub fn arch(&self) -> &A {
        &self.arch
    }

    /// Runs `function` on every CPU in `active` while every online CPU is inside the
    /// rendezvous with all asynchronous exceptions masked.
    ///
    /// Must be called with interrupts enabled: a CPU waiting here for the machine to be
    /// free has to answer the current holder's stop IPI. Errors from all CPUs are
    /// collected ([`StopError::Failed`]).
    pub fn stop_machine(
        &self,
        function: StopFn<'_>,
        active: CpuSet,
        options: StopOptions,
    ) -> Result<(), StopError> {
        let work = Work {
            function,
            #[cfg(feature = "stop-machine-nmi")]
            raise_nmi: None,
        };
        self.call(&work, active, options)
    }

    /// One call: take the machine, publish `work`, lead the rendezvous.
    #[unsafe(link_section = ".text.nopatch")]
    fn call(&self, work: &Work<'_>, active: CpuSet, options: StopOptions) -> Result<(), StopError> {
        let arch = &self.arch;
        let me = arch.cpu_id();
        let online = arch.online_cpus();
        if active.is_empty() || !active.is_subset(online) {
            return Err(StopError::InvalidCpus {
                requested: active,
                online,
            });
        }

        let start = arch.now_ns();
        let _guard = loop {
            if let Some(guard) = self.lock.try_lock() {
                break guard;
            }
            let waited_ns = arch.now_ns().saturating_sub(start);
            if waited_ns > options.arrival_timeout_ns {
                return Err(StopError::Busy { waited_ns });
            }
            arch.relax();
        };

        let previous = State(self.state.load(Ordering::Relaxed));
        let generation = previous.generation().wrapping_add(1) & State::GENERATION_MASK;
        self.participants.store(online.bits(), Ordering::Relaxed);
        self.active.store(active.bits(), Ordering::Relaxed);
        self.stall_timeout_ns
            .store(options.stall_timeout_ns, Ordering::Relaxed);
        self.mask_irqs_only
            .store(options.mask == MaskLevel::IrqsOnly, Ordering::Relaxed);
        self.work.store(
            // The pointer is dereferenced only in the `Run` phase, which cannot end
            // before this function has seen `Exit` (or panicked): `work` outlives it.
            (work as *const Work<'_>).cast::<Work<'static>>().cast_mut(),
            Ordering::Relaxed,
        );
        self.failed.store(0, Ordering::Relaxed);
        self.masked_at_ack.store(0, Ordering::Relaxed);
        // Release: publishes every field above to a CPU that acquires this state, in
        // `handle_stop_ipi` or in its acknowledgement's compare-and-swap.
        self.state.store(
            State::new(generation, Phase::Arrive, CpuSet::EMPTY).0,
            Ordering::Release,
        );
        arch.wake_waiters();
        arch.send_stop_ipi(online.without(me));
        self.timeline[Mark::Entry as usize].store(start, Ordering::Relaxed);
        self.mark(Mark::IpiSent);

        let role = Role::Initiator {
            arrival_timeout_ns: options.arrival_timeout_ns,
        };
        let outcome = self.participate(generation, me, role);
        self.work.store(core::ptr::null_mut(), Ordering::Relaxed);
        match outcome {
            Outcome::Aborted { missing, waited_ns } => {
                Err(StopError::Timeout { missing, waited_ns })
            }
            Outcome::Completed => {
                // The Acquire that saw `Exit` (or the CAS that opened it) pairs with
                // every active CPU's release of its `Run` acknowledgement: their codes
                // are visible.
                let failed = CpuSet::from_bits(self.failed.load(Ordering::Relaxed));
                if failed.is_empty() {
                    return Ok(());
                }
                let mut codes = [0; MAX_CPUS];
                for cpu in failed.iter() {
                    codes[cpu] = self.codes[cpu].load(Ordering::Relaxed);
                }
                Err(StopError::Failed(Failures {
                    cpus: failed,
                    codes,
                }))
            }
        }
    }

    /// The stop IPI handler: joins the call in flight, if any, and returns once this
    /// CPU may run normal code again.
    ///
    /// Call it from the architecture's stop-IPI handler. A stale IPI (from a call that
    /// completed or was aborted) finds no call to join and returns at once.
    #[unsafe(link_section = ".text.nopatch")]
    pub fn handle_stop_ipi(&self) {
        // Acquire pairs with the initiator's release of `Arrive`.
        let state = State(self.state.load(Ordering::Acquire));
        if state.phase() != Phase::Arrive {
            return;
        }
        let me = self.arch.cpu_id();
        let participants = CpuSet::from_bits(self.participants.load(Ordering::Relaxed));
        if !participants.contains(me) || state.acked().contains(me) {
            return;
        }
        // If a newer call has replaced this one meanwhile, the first acknowledgement
        // names a stale generation and fails; `participate` then leaves at once.
        let _ = self.participate(state.generation(), me, Role::Joiner);
    }

    /// A fresh stamp from the same sequence the `Arrive` acknowledgements draw from.
    ///
    /// Taken right before a side effect inside the stop function, it proves the effect
    /// came after every CPU's quiescence: compare with [`Quiescence::last_ack_stamp`].
    #[unsafe(link_section = ".text.nopatch")]
    pub fn stamp(&self) -> u64 {
        self.stamps.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// What the CPUs reported as they acknowledged the `Arrive` phase of the current call.
    ///
    /// Meaningful from inside the stop function.
    #[unsafe(link_section = ".text.nopatch")]
    pub fn quiescence(&self) -> Quiescence {
        let participants = CpuSet::from_bits(self.participants.load(Ordering::Relaxed));
        let last_ack_stamp = participants
            .iter()
            .map(|cpu| self.ack_stamp[cpu].load(Ordering::Relaxed))
            .max()
            .unwrap_or(0);
        Quiescence {
            masked: CpuSet::from_bits(self.masked_at_ack.load(Ordering::Relaxed)),
            last_ack_stamp,
        }
    }

    /// Runs the function of `work` on this CPU, directly or from a self-NMI.
    #[unsafe(link_section = ".text.nopatch")]
    fn run_function(&self, work: &Work<'_>, me: usize) -> StopFnResult {
        #[cfg(feature = "stop-machine-nmi")]
        if let Some(raise_nmi) = work.raise_nmi {
            return self.run_in_nmi(me, raise_nmi);
        }
        (work.function)(me)
    }

    /// Raises an NMI on this CPU and waits, bounded, for its handler to run the function.
    #[cfg(feature = "stop-machine-nmi")]
    #[unsafe(link_section = ".text.nopatch")]
    fn run_in_nmi(&self, me: usize, raise_nmi: &(dyn Fn() + Sync)) -> StopFnResult {
        let arch = &self.arch;
        let bit = CpuSet::single(me).bits();
        self.nmi_done.fetch_and(!bit, Ordering::Relaxed);
        // Release pairs with the handler's claim (AcqRel below in `handle_nmi`).
        self.nmi_pending.fetch_or(bit, Ordering::Release);
        raise_nmi();
        let start = arch.now_ns();
        let mut claimed_by_handler = false;
        loop {
            // Acquire pairs with the handler's release of `nmi_done`: the result it
            // stored first is visible (the race fixed in v2 of seed 000).
            if self.nmi_done.load(Ordering::Acquire) & bit != 0 {
                // `get`: `me < MAX_CPUS` always, but a bounds-check panic would be a
                // branch out of `.text.nopatch`.
                let code = self
                    .nmi_codes
                    .get(me)
                    .map_or(0, |c| c.load(Ordering::Relaxed));
                return if code == 0 { Ok(()) } else { Err(code) };
            }
            let waited_ns = arch.now_ns().saturating_sub(start);
            if !claimed_by_handler && waited_ns > NMI_TIMEOUT_NS {
                // Withdraw the request. If it was still pending the handler never
                // started, and now never will run the function; otherwise it is running
                // it and we wait for its result like any other phase.
                if self.nmi_pending.fetch_and(!bit, Ordering::AcqRel) & bit != 0 {
                    return Err(ETIMEDOUT);
                }
                claimed_by_handler = true;
            }
            if waited_ns > self.stall_timeout_ns.load(Ordering::Relaxed) {
                panic!(
                    "stop_machine: cpu{me}'s NMI handler ran for {} us",
                    waited_ns / 1000
                );
            }
            arch.relax();
        }
    }

    /// The stop-machine slot of the architecture's NMI handler: runs the function if
    /// this CPU raised an NMI for it, and returns whether it did (`false`: the NMI is
    /// someone else's).
    ///
    /// Must be called first in the NMI handler, so that the stop function takes
    /// priority over any other NMI work (as in seed 003).
    #[cfg(feature = "stop-machine-nmi")]
    #[unsafe(link_section = ".text.nopatch")]
    pub fn handle_nmi(&self) -> bool {
        let me = self.arch.cpu_id();
        let bit = CpuSet::single(me).bits();
        // Claim the request (Linux: cpumask_test_and_clear_cpu). Acquire pairs with the
        // release in `run_in_nmi`.
        if self.nmi_pending.fetch_and(!bit, Ordering::AcqRel) & bit == 0 {
            return false;
        }
        // SAFETY: the request was pending, so this CPU is in `run_in_nmi`, inside the
        // `Run` phase of the call that published `work`, which cannot end before this
        // handler reports below.
        let work = unsafe { &*self.work.load(Ordering::Relaxed) };
        let code = match (work.function)(me) {
            Ok(()) => 0,
            Err(code) => code,
        };
        self.nmi_codes[me].store(code, Ordering::Relaxed);
        self.nmi_delivered.fetch_or(bit, Ordering::Relaxed);
        // Release: the result is stored before `run_in_nmi` can see `done`.
        self.nmi_done.fetch_or(bit, Ordering::Release);
        true
    }

    /// The CPUs on which the last [`stop_machine_nmi`](Self::stop_machine_nmi) call ran
    /// the function from an NMI.
    #[cfg(feature = "stop-machine-nmi")]
    pub fn nmi_delivered(&self) -> CpuSet {
        CpuSet::from_bits(self.nmi_delivered.load(Ordering::Relaxed))
    }

    /// The CPUs that are inside a call's masked window right now: they have masked their
    /// exceptions for it and not yet restored them.
    ///
    /// An interrupt handler that finds its own CPU here ran inside the window, which
    /// [`Arch::mask_all`] promises cannot happen: the self-tests use this as a witness.
    #[unsafe(link_section = ".text.nopatch")]
    pub fn in_masked_window(&self) -> CpuSet {
        CpuSet::from_bits(self.in_window.load(Ordering::Relaxed))
    }

    /// One CPU's pass through call `generation`, from arrival to leaving.
    #[unsafe(link_section = ".text.nopatch")]
    fn participate(&self, generation: u32, me: usize, role: Role) -> Outcome {
        let arch = &self.arch;
        if let Role::Initiator { arrival_timeout_ns } = role {
            // Interrupts stay on while the others arrive: one of them may be waiting
            // for this CPU before it can take the stop IPI.
            if let Err(aborted) = self.await_arrivals(generation, me, arrival_timeout_ns) {
                return aborted;
            }
            self.mark(Mark::Arrived);
        }
        let saved = if self.mask_irqs_only.load(Ordering::Relaxed) {
            arch.mask_irqs()
        } else {
            arch.mask_all()
        };
        let bit = CpuSet::single(me).bits();
        self.in_window.fetch_or(bit, Ordering::Relaxed);
        if arch.all_masked() {
            self.masked_at_ack.fetch_or(bit, Ordering::Relaxed);
        }
        self.ack_stamp[me].store(self.stamp(), Ordering::Relaxed);

        let outcome = self.run_masked(generation, me, role);
        let initiator = matches!(role, Role::Initiator { .. });
        if initiator {
            self.mark(Mark::Exit);
        }

        // Every way out of `run_masked` passed an Acquire of a state at or after the end
        // of `Run` of this call (or of an abort, when nothing was written): what the
        // active CPUs wrote and made coherent before acknowledging `Run` is what this
        // CPU fetches from here on. Unconditional, so that no path can unmask without it.
        arch.sync_context();
        self.in_window.fetch_and(!bit, Ordering::Relaxed);
        arch.restore(saved);
        if initiator {
            self.mark(Mark::Unmasked);
        }
        outcome
    }

    /// Records instant `mark` of the current call (the initiator only: it alone writes
    /// the timeline, under the machine's lock).
    #[unsafe(link_section = ".text.nopatch")]
    fn mark(&self, mark: Mark) {
        self.timeline[mark as usize].store(self.arch.now_ns(), Ordering::Relaxed);
    }

    /// The profile of this CPU's last call that reached `Run`. Meaningful on the CPU
    /// that made the call, after it returned, and before anyone makes another.
    pub fn last_call_profile(&self) -> CallProfile {
        let at = |mark: Mark| self.timeline[mark as usize].load(Ordering::Relaxed);
        let span = |from: Mark, to: Mark| at(to).saturating_sub(at(from));
        CallProfile {
            setup_ns: span(Mark::Entry, Mark::IpiSent),
            arrive_ns: span(Mark::IpiSent, Mark::Arrived),
            run_ns: span(Mark::Arrived, Mark::Exit),
            exit_ns: span(Mark::Exit, Mark::Unmasked),
        }
    }

    /// The initiator's wait for every other participant's `Arrive` acknowledgement,
    /// with its own interrupts as the caller left them. Past `arrival_timeout_ns` it
    /// aborts the call, unless the last CPU arrives at that very moment.
    #[unsafe(link_section = ".text.nopatch")]
    fn await_arrivals(
        &self,
        generation: u32,
        me: usize,
        arrival_timeout_ns: u64,
    ) -> Result<(), Outcome> {
        let arch = &self.arch;
        let others = CpuSet::from_bits(self.participants.load(Ordering::Relaxed)).without(me);
        let start = arch.now_ns();
        loop {
            // Acquire pairs with each joiner's release of its acknowledgement: its mask
            // evidence and stamp are visible.
            let current = State(self.state.load(Ordering::Acquire));
            if others.is_subset(current.acked()) {
                return Ok(());
            }
            let waited_ns = arch.now_ns().saturating_sub(start);
            if waited_ns > arrival_timeout_ns {
                let aborted = State::new(generation, Phase::Aborted, current.acked());
                if self
                    .state
                    .compare_exchange(current.0, aborted.0, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    arch.wake_waiters();
                    return Err(Outcome::Aborted {
                        missing: others.minus(current.acked()),
                        waited_ns,
                    });
                }
                continue;
            }
            arch.relax();
        }
    }

    /// The masked part of a call: acknowledge arrival, run the function if this CPU is
    /// active, and wait for `Exit`.
    #[unsafe(link_section = ".text.nopatch")]
    fn run_masked(&self, generation: u32, me: usize, role: Role) -> Outcome {
        const STALE: Outcome = Outcome::Aborted {
            missing: CpuSet::EMPTY,
            waited_ns: 0,
        };
        let participants = CpuSet::from_bits(self.participants.load(Ordering::Relaxed));
        let active = CpuSet::from_bits(self.active.load(Ordering::Relaxed));
        let stall_timeout_ns = self.stall_timeout_ns.load(Ordering::Relaxed);
        if !self.acknowledge(generation, Phase::Arrive, me, participants) {
            // A joiner whose IPI was stale, or whose call was aborted meanwhile.
            return STALE;
        }
        // The initiator's acknowledgement is the last and has opened `Run`; a joiner
        // waits for it. A joiner at most waits twice the stall limit: the initiator
        // aborts a late arrival within its arrival timeout, short of a stall.
        if let Role::Joiner = role {
            let state = self.wait_past(
                generation,
                Phase::Arrive,
                me,
                participants,
                stall_timeout_ns.saturating_mul(2),
            );
            if state.generation() != generation || state.phase() == Phase::Aborted {
                return STALE;
            }
        }
        if active.contains(me) {
            // SAFETY: `work` was set before `Arrive` was released and is reset only
            // after `Exit`, which needs this CPU's `Run` acknowledgement below: the
            // pointee is alive.
            let work = unsafe { &*self.work.load(Ordering::Relaxed) };
            if let Err(code) = self.run_function(work, me) {
                self.codes[me].store(code, Ordering::Relaxed);
                self.failed
                    .fetch_or(CpuSet::single(me).bits(), Ordering::Relaxed);
            }
            // Cannot fail: `Run` needs this very acknowledgement to end.
            self.acknowledge(generation, Phase::Run, me, active);
        }
        // Any state past `Run` of this call: `Exit`, or, for a joiner slow to look, the
        // initiator's next call (which it could start only after `Exit`).
        self.wait_past(generation, Phase::Run, me, active, stall_timeout_ns);
        Outcome::Completed
    }

    /// Adds `me` to the acknowledgements of `phase`; when that completes `required`, the
    /// phase ends and the next opens. Returns false if the call is no longer in `phase`
    /// of `generation` (it was aborted, or this CPU's IPI was stale).
    #[unsafe(link_section = ".text.nopatch")]
    fn acknowledge(&self, generation: u32, phase: Phase, me: usize, required: CpuSet) -> bool {
        let mut current = State(self.state.load(Ordering::Relaxed));
        loop {
            if current.generation() != generation || current.phase() != phase {
                return false;
            }
            let acked = current.acked().with(me);
            let next = if required.is_subset(acked) {
                State::new(generation, phase.next(), CpuSet::EMPTY)
            } else {
                State::new(generation, phase, acked)
            };
            // AcqRel: release this CPU's writes of the phase (mask evidence, function
            // result) and acquire those of the CPUs that acknowledged before it, so the
            // CPU that opens the next phase publishes everyone's.
            match self.state.compare_exchange_weak(
                current.0,
                next.0,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    // Someone waits for this acknowledgement in a low-power wait: the
                    // initiator for the last joiner's arrival, everyone for a new phase.
                    self.arch.wake_waiters();
                    return true;
                }
                Err(seen) => current = State(seen),
            }
        }
    }

    /// Waits until the state is no longer `phase` of `generation`, and returns the state
    /// it saw. `required` are the CPUs whose acknowledgements end the phase (named if the
    /// wait outlasts `limit_ns`, which is a CPU stuck with exceptions masked: panic).
    #[unsafe(link_section = ".text.nopatch")]
    fn wait_past(
        &self,
        generation: u32,
        phase: Phase,
        me: usize,
        required: CpuSet,
        limit_ns: u64,
    ) -> State {
        let arch = &self.arch;
        let start = arch.now_ns();
        loop {
            // Acquire pairs with the release of the CPU that ended the phase (and, for a
            // later call's state, with the initiator's release of it, which came after).
            let current = State(self.state.load(Ordering::Acquire));
            if current.generation() != generation || current.phase() != phase {
                return current;
            }
            let waited_ns = arch.now_ns().saturating_sub(start);
            if waited_ns > limit_ns {
                panic!(
                    "stop_machine: cpu{me} waited {} us in phase {phase:?} of call {generation} \
                     for CPUs {} (acknowledged: {})",
                    waited_ns / 1000,
                    required.minus(current.acked()),
                    current.acked()
                );
            }
            arch.relax();
        }
    }
}

#[cfg(feature = "stop-machine-nmi")]
impl<A: NmiArch> StopMachine<A> {
    /// Like [`stop_machine`](Self::stop_machine), but each active CPU runs `function`
    /// from an NMI it raises on itself (seed 000, Linux's `STOP_MACHINE_NMI`): nothing,
    /// not even another NMI, can preempt the function.
    ///
    /// The window masks normal interrupts only ([`MaskLevel::IrqsOnly`]) whatever
    /// `options` says, since the self-NMI must get through. An active CPU whose NMI does
    /// not run within [`NMI_TIMEOUT_NS`] reports [`ETIMEDOUT`]; its handler will then
    /// not run the function even if the NMI arrives later. [`nmi_delivered`](Self::nmi_delivered)
    /// tells on which CPUs the NMI ran.
    pub fn stop_machine_nmi(
        &self,
        function: NmiSafe<'_>,
        active: CpuSet,
        options: StopOptions,
    ) -> Result<(), StopError> {
        let raise = || self.arch.send_self_nmi();
        let work = Work {
            function: function.0,
            raise_nmi: Some(&raise),
        };
        self.nmi_delivered.store(0, Ordering::Relaxed);
        let options = StopOptions {
            mask: MaskLevel::IrqsOnly,
            ..options
        };
        self.call(&work, active, options)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_word_round_trips() {
        let state = State::new(0xab_cdef, Phase::Run, CpuSet::from_bits(0x8000_0001));
        assert_eq!(state.generation(), 0xab_cdef);
        assert_eq!(state.phase(), Phase::Run);
        assert_eq!(state.acked(), CpuSet::from_bits(0x8000_0001));
        let wrapped = State::new(State::GENERATION_MASK + 2, Phase::Exit, CpuSet::EMPTY);
        assert_eq!(wrapped.generation(), 1);
    }

    #[test]
    fn phases_advance_in_order() {
        let mut phase = Phase::Arrive;
        let mut seen = vec![phase];
        while phase != Phase::Exit {
            phase = phase.next();
            seen.push(phase);
        }
        assert_eq!(seen, [Phase::Arrive, Phase::Run, Phase::Exit]);
        assert_eq!(Phase::Exit.next(), Phase::Exit);
        assert_eq!(Phase::Aborted.next(), Phase::Aborted);
    }
}
