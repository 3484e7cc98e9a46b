//! The rendezvous: [`StopMachine`], the three-phase loop every CPU runs in a call
//! ([`participate`](StopMachine::participate)), and the acknowledgements and bounded
//! waits it is made of. The module doc of [`stop`](super) has the table this follows.

use super::evidence::{Evidence, Mark, Profile};
#[cfg(feature = "stop-machine-nmi")]
use super::nmi::NmiRequests;
#[cfg(feature = "stop-machine-nmi")]
use super::nmi::RaiseNmi;
use super::state::{Phase, State, StateWord};
use super::{
    Arch, Failures, MaskLevel, StopError, StopFn, StopFnResult, StopFunction, StopOptions,
};
use super::{LockTimeout, lock_within};
use crate::cpuset::AtomicCpuSet;
use crate::{CpuSet, MAX_CPUS};
use core::sync::atomic::{AtomicBool, AtomicI32, AtomicPtr, AtomicU64, Ordering};

/// The function of the current call, published to the other CPUs by pointer.
pub(super) struct Work<'a> {
    pub(super) function: &'a dyn StopFunction,
    /// Raises an NMI on the calling CPU: set for calls whose function runs from it.
    #[cfg(feature = "stop-machine-nmi")]
    pub(super) raise_nmi: Option<&'a dyn RaiseNmi>,
    /// NMIs the participants take while the function may run finish their part of the
    /// call first (see `StopMachine::stop_machine_nmi_free`).
    #[cfg(feature = "stop-machine-nmi")]
    pub(super) hold_nmis: bool,
}

/// What the initiator publishes for a call: written only under the machine's lock,
/// before the `Arrive` state's release, and read by the CPUs that acquired it.
pub(super) struct Published {
    participants: AtomicCpuSet,
    active: AtomicCpuSet,
    stall_timeout_ns: AtomicU64,
    /// The call masks with [`MaskLevel::IrqsOnly`].
    mask_irqs_only: AtomicBool,
    /// Points at a [`Work`] on the initiator's stack while a call is in flight.
    work: AtomicPtr<Work<'static>>,
}

// Relaxed throughout: the state word's release of `Arrive` orders these after their
// writes, and a reader always acquired that state (or a later one) first.
impl Published {
    const fn new() -> Self {
        Published {
            participants: AtomicCpuSet::new(),
            active: AtomicCpuSet::new(),
            stall_timeout_ns: AtomicU64::new(StopOptions::DEFAULT.stall_timeout_ns),
            mask_irqs_only: AtomicBool::new(false),
            work: AtomicPtr::new(core::ptr::null_mut()),
        }
    }

    #[inline(always)]
    pub(super) fn participants(&self) -> CpuSet {
        self.participants.load(Ordering::Relaxed)
    }

    #[inline(always)]
    pub(super) fn active(&self) -> CpuSet {
        self.active.load(Ordering::Relaxed)
    }

    #[inline(always)]
    pub(super) fn stall_timeout_ns(&self) -> u64 {
        self.stall_timeout_ns.load(Ordering::Relaxed)
    }

    /// The work of the call in flight.
    ///
    /// # Safety
    /// The caller is in the `Run` phase of the call that published it, before its own
    /// `Run` acknowledgement (or, in an NMI handler, before it reports): the initiator
    /// resets the pointer only after `Exit`, so the pointee is alive.
    #[inline(always)]
    pub(super) unsafe fn work(&self) -> &Work<'static> {
        // SAFETY: non-null and alive, by the caller's contract.
        unsafe { &*self.work.load(Ordering::Relaxed) }
    }
}

/// What the active CPUs' functions returned: written in `Run`, released by each
/// CPU's `Run` acknowledgement, read by the initiator after `Exit`.
struct Results {
    failed: AtomicCpuSet,
    codes: [AtomicI32; MAX_CPUS],
}

/// How a CPU's pass through the loop ended.
enum Outcome {
    /// The call reached `Exit` (for the initiator: every active CPU has finished).
    Completed,
    /// The call ended before `Run`: the initiator aborted it, or this CPU's IPI was
    /// stale. The function ran nowhere.
    Aborted { missing: CpuSet, waited_ns: u64 },
}

impl Outcome {
    /// A joiner whose IPI was stale, or whose call was aborted meanwhile.
    const STALE: Outcome = Outcome::Aborted {
        missing: CpuSet::EMPTY,
        waited_ns: 0,
    };
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
    pub(super) arch: A,
    /// Serialises initiators. Only its holder writes anything but `state`, the
    /// results, the evidence and the NMI requests.
    lock: spin::Mutex<()>,
    /// The call: what the initiator published for it.
    pub(super) published: Published,
    /// Where the call is: `generation | phase | acknowledgements`.
    pub(super) state: StateWord,
    /// What the function returned on each active CPU.
    results: Results,
    /// What each CPU reported as it arrived; who is in a masked window.
    pub(super) evidence: Evidence,
    /// The initiator's timeline of its last call.
    pub(super) profile: Profile,
    /// The self-NMI requests of an NMI call.
    #[cfg(feature = "stop-machine-nmi")]
    pub(super) nmi: NmiRequests,
}

impl<A: Arch> StopMachine<A> {
    /// A stop machine driving the CPUs of `arch`.
    pub const fn new(arch: A) -> Self {
        StopMachine {
            arch,
            lock: spin::Mutex::new(()),
            published: Published::new(),
            state: StateWord::new(),
            results: Results {
                failed: AtomicCpuSet::new(),
                codes: [const { AtomicI32::new(0) }; MAX_CPUS],
            },
            evidence: Evidence::new(),
            profile: Profile::new(),
            #[cfg(feature = "stop-machine-nmi")]
            nmi: NmiRequests::new(),
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
        self.stop_machine_with(&function, active, options)
    }

    /// [`stop_machine`](Self::stop_machine) for a [`StopFunction`] of its own type.
    pub fn stop_machine_with(
        &self,
        function: &dyn StopFunction,
        active: CpuSet,
        options: StopOptions,
    ) -> Result<(), StopError> {
        let work = Work {
            function,
            #[cfg(feature = "stop-machine-nmi")]
            raise_nmi: None,
            #[cfg(feature = "stop-machine-nmi")]
            hold_nmis: false,
        };
        self.call(&work, active, options)
    }

    /// [`stop_machine_with`](Self::stop_machine_with) for a function that no NMI handler
    /// may overlap on any CPU (one that patches code NMI handlers run): where
    /// [`Arch::mask_all`] keeps NMIs out, exactly that; where NMIs pass it
    /// ([`Arch::nmis_pass_mask_all`], x86), the active CPUs run `function` from a self-NMI
    /// and every participant's NMIs wait in the stop machine's slot until it has finished
    /// everywhere (Ankur Arora, "x86/alternatives: NMI safe runtime patching", LKML,
    /// 2020; see `nmi.rs`). Built without `stop-machine-nmi`, always the former.
    ///
    /// # Safety
    /// `function` may run in NMI context: it takes no lock that code it interrupts could
    /// hold, does not print or allocate, and takes no exception (as [`NmiSafe`](super::NmiSafe)).
    pub unsafe fn stop_machine_nmi_free(
        &self,
        function: &dyn StopFunction,
        active: CpuSet,
        options: StopOptions,
    ) -> Result<(), StopError> {
        #[cfg(feature = "stop-machine-nmi")]
        if let Some(raise_nmi) = self.arch.nmis_pass_mask_all() {
            return self.call_nmi_held(function, raise_nmi, active, options);
        }
        self.stop_machine_with(function, active, options)
    }

    /// One call: take the machine, publish `work`, lead the rendezvous.
    #[unsafe(link_section = ".text.nopatch")]
    pub(super) fn call(
        &self,
        work: &Work<'_>,
        active: CpuSet,
        options: StopOptions,
    ) -> Result<(), StopError> {
        let arch = &self.arch;
        let me = arch.cpu_id();
        let online = arch.online_cpus();
        if active.is_empty() || !active.is_subset(online) {
            return Err(StopError::InvalidCpus {
                requested: active,
                online,
            });
        }
        if !online.is_subset(CpuSet::first(State::ACK_CPUS)) {
            return Err(StopError::TooManyCpus {
                online,
                limit: State::ACK_CPUS,
            });
        }

        let start = arch.now_ns();
        let _guard = lock_within(
            &self.lock,
            "the stop machine",
            options.arrival_timeout_ns,
            || arch.now_ns(),
            || arch.relax(),
        )
        .map_err(|LockTimeout { waited_ns, .. }| StopError::Busy { waited_ns })?;

        // Relaxed: only the lock holder changes the generation, and taking the lock
        // acquired the previous holder's last state.
        let previous = self.state.load(Ordering::Relaxed);
        let generation = previous.generation().wrapping_add(1) & State::GENERATION_MASK;
        let published = &self.published;
        published.participants.store(online, Ordering::Relaxed);
        published.active.store(active, Ordering::Relaxed);
        published
            .stall_timeout_ns
            .store(options.stall_timeout_ns, Ordering::Relaxed);
        published
            .mask_irqs_only
            .store(options.mask == MaskLevel::IrqsOnly, Ordering::Relaxed);
        published.work.store(
            // The pointer is dereferenced only in the `Run` phase, which cannot end
            // before this function has seen `Exit` (or panicked): `work` outlives it.
            (work as *const Work<'_>).cast::<Work<'static>>().cast_mut(),
            Ordering::Relaxed,
        );
        self.results.failed.clear(Ordering::Relaxed);
        self.evidence.reset();
        #[cfg(feature = "stop-machine-nmi")]
        self.nmi.begin_call(work.hold_nmis);
        // Release: publishes every field above to a CPU that acquires this state, in
        // `handle_stop_ipi` or in its acknowledgement's compare-and-swap.
        self.state.store(
            State::new(generation, Phase::Arrive, CpuSet::EMPTY),
            Ordering::Release,
        );
        arch.wake_waiters();
        arch.send_stop_ipi(online.without(me));
        self.profile.record(Mark::Entry, start);
        self.mark(Mark::IpiSent);

        let role = Role::Initiator {
            arrival_timeout_ns: options.arrival_timeout_ns,
        };
        let outcome = self.participate(generation, me, role);
        // Relaxed: past `Exit` (or an abort) no CPU dereferences it (see `work`).
        published
            .work
            .store(core::ptr::null_mut(), Ordering::Relaxed);
        match outcome {
            Outcome::Aborted { missing, waited_ns } => {
                Err(StopError::Timeout { missing, waited_ns })
            }
            // The Acquire that saw `Exit` (or the CAS that opened it) pairs with every
            // active CPU's release of its `Run` acknowledgement: their codes are visible.
            Outcome::Completed => self.results(),
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
        let state = self.state.load(Ordering::Acquire);
        if state.phase() != Phase::Arrive {
            return;
        }
        let me = self.arch.cpu_id();
        if !self.published.participants().contains(me) || state.acked().contains(me) {
            return;
        }
        // If a newer call has replaced this one meanwhile, the first acknowledgement
        // names a stale generation and fails; `participate` then leaves at once.
        let _ = self.participate(state.generation(), me, Role::Joiner);
    }

    /// One CPU's pass through call `generation`, from arrival to leaving: the table of
    /// the module doc, one phase per paragraph.
    #[unsafe(link_section = ".text.nopatch")]
    fn participate(&self, generation: u32, me: usize, role: Role) -> Outcome {
        let arch = &self.arch;
        let initiator = matches!(role, Role::Initiator { .. });

        // Arrive. The initiator keeps its interrupts on while the others arrive (one of
        // them may be waiting for this CPU before it can take the stop IPI), so it
        // masks and acknowledges last and its acknowledgement opens `Run`.
        if let Role::Initiator { arrival_timeout_ns } = role {
            if let Err(aborted) = self.await_arrivals(generation, me, arrival_timeout_ns) {
                return aborted;
            }
            self.mark(Mark::Arrived);
        }
        let saved = if self.published.mask_irqs_only.load(Ordering::Relaxed) {
            arch.mask_irqs()
        } else {
            arch.mask_all()
        };
        self.evidence.arrived(me, generation, arch.all_masked());
        let outcome = 'masked: {
            let participants = self.published.participants();
            let active = self.published.active();
            let stall_timeout_ns = self.published.stall_timeout_ns();
            if !self.acknowledge(generation, Phase::Arrive, me, participants) {
                break 'masked Outcome::STALE;
            }

            // Run. A joiner waits for the initiator's acknowledgement to open it: at
            // most twice the stall limit, since the initiator aborts a late arrival
            // within its arrival timeout, short of a stall.
            if let Role::Joiner = role {
                let state = self.wait_past(
                    generation,
                    Phase::Arrive,
                    me,
                    participants,
                    stall_timeout_ns.saturating_mul(2),
                );
                if state.generation() != generation || state.phase() == Phase::Aborted {
                    break 'masked Outcome::STALE;
                }
            }
            if active.contains(me) {
                self.run(me);
                // Cannot fail: `Run` needs this very acknowledgement to end.
                self.acknowledge(generation, Phase::Run, me, active);
            }

            // Exit: any state past `Run` of this call, that is `Exit`, or, for a joiner
            // slow to look, the initiator's next call (which it could start only after
            // `Exit`).
            self.wait_past(generation, Phase::Run, me, active, stall_timeout_ns);
            Outcome::Completed
        };
        if initiator {
            self.mark(Mark::Exit);
        }
        // Every way out of the masked block passed an Acquire of a state at or after the
        // end of `Run` of this call (or of an abort, when nothing was written): what the
        // active CPUs wrote and made coherent before acknowledging `Run` is what this
        // CPU fetches from here on. Unconditional, so that no path can unmask without it.
        arch.sync_context();
        self.evidence.leaving(me);
        arch.restore(saved);
        if initiator {
            self.mark(Mark::Unmasked);
        }
        outcome
    }

    /// The `Run` phase on an active CPU: the function, its failure recorded.
    #[unsafe(link_section = ".text.nopatch")]
    fn run(&self, me: usize) {
        // SAFETY: this CPU is in `Run` and has not acknowledged it yet: `Exit`, after
        // which the initiator resets `work`, needs that acknowledgement.
        let work = unsafe { self.published.work() };
        if let Err(code) = self.run_function(work, me) {
            // Relaxed: released by this CPU's `Run` acknowledgement, right after.
            self.results.codes[me].store(code, Ordering::Relaxed);
            self.results.failed.insert(me, Ordering::Relaxed);
        }
    }

    /// Runs the function of `work` on this CPU, directly or from a self-NMI.
    #[unsafe(link_section = ".text.nopatch")]
    fn run_function(&self, work: &Work<'_>, me: usize) -> StopFnResult {
        #[cfg(feature = "stop-machine-nmi")]
        if let Some(raise_nmi) = work.raise_nmi {
            return self.run_in_nmi(me, raise_nmi);
        }
        self.evidence.run_marked(me, work.function)
    }

    /// The call's result, once it reached `Exit`: every failing CPU's code.
    #[unsafe(link_section = ".text.nopatch")]
    fn results(&self) -> Result<(), StopError> {
        let failed = self.results.failed.load(Ordering::Relaxed);
        if failed.is_empty() {
            return Ok(());
        }
        let mut codes = [0; MAX_CPUS];
        for cpu in failed.iter() {
            codes[cpu] = self.results.codes[cpu].load(Ordering::Relaxed);
        }
        Err(StopError::Failed(Failures {
            cpus: failed,
            codes,
        }))
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
        let others = self.published.participants().without(me);
        let start = arch.now_ns();
        loop {
            // Acquire pairs with each joiner's release of its acknowledgement: its mask
            // evidence and stamp are visible.
            let current = self.state.load(Ordering::Acquire);
            if others.is_subset(current.acked()) {
                return Ok(());
            }
            let waited_ns = arch.now_ns().saturating_sub(start);
            if waited_ns > arrival_timeout_ns {
                let aborted = State::new(generation, Phase::Aborted, current.acked());
                // AcqRel on success: releases the abort to the joiners that wait past
                // `Arrive`, and acquires what the ones that did arrive released.
                // Failure (a late acknowledgement): look again.
                if self
                    .state
                    .compare_exchange(current, aborted, Ordering::AcqRel, Ordering::Acquire)
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

    /// Adds `me` to the acknowledgements of `phase`; when that completes `required`, the
    /// phase ends and the next opens. Returns false if the call is no longer in `phase`
    /// of `generation` (it was aborted, or this CPU's IPI was stale).
    #[unsafe(link_section = ".text.nopatch")]
    fn acknowledge(&self, generation: u32, phase: Phase, me: usize, required: CpuSet) -> bool {
        // Relaxed: only a guess for the compare-and-swap below, which orders.
        let mut current = self.state.load(Ordering::Relaxed);
        loop {
            if !current.is(generation, phase) {
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
                current,
                next,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    // Someone waits for this acknowledgement in a low-power wait: the
                    // initiator for the last joiner's arrival, everyone for a new phase.
                    self.arch.wake_waiters();
                    return true;
                }
                Err(seen) => current = seen,
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
            let current = self.state.load(Ordering::Acquire);
            if !current.is(generation, phase) {
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
