//! The rendezvous: [`StopMachine`], the three-phase loop every CPU runs in a call
//! ([`participate`](StopMachine::participate)), and the acknowledgements, gathers and
//! bounded waits it is made of. The module doc of [`stop`](super) has the table this
//! follows and the ordering argument; `state.rs` the layout.

use super::evidence::{Evidence, Mark, Profile};
use super::fault::{Catching, Faults};
#[cfg(feature = "stop-machine-nmi")]
use super::nmi::NmiRequests;
#[cfg(feature = "stop-machine-nmi")]
use super::nmi::RaiseNmi;
use super::state::{Ack, Control, CpuSlot, CpuSlots, Phase, Progress, State};
use super::{
    Arch, CallContext, Failures, MaskLevel, StopError, StopFn, StopFnResult, StopFunction,
    StopOptions,
};
use super::{CpuHotplugLock, CpusReadGuard, CpusWriteGuard, LockTimeout, lock_within};
use crate::cpuset::AtomicCpuSet;
use crate::sync::weaken::{self, Knob};
use crate::sync::{
    AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering, StopLock, const_unless_loom,
};
use crate::{CpuSet, MAX_CPUS};

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
    /// The function runs through [`Arch::call_catching_faults`].
    pub(super) catch_faults: bool,
}

/// What the initiator publishes for a call: written only under the machine's lock,
/// before the `Arrive` state's release, and read by the CPUs that acquired it.
pub(super) struct Published {
    participants: AtomicCpuSet,
    /// The CPU leading the call: its own stop IPI, left pending from an earlier call,
    /// must not make it a joiner of the call it leads.
    initiator: AtomicUsize,
    /// Isolated CPUs in user mode whose synchronisation the call deferred to their next
    /// kernel entry (`context.rs`): quiescent, not participants.
    deferred: AtomicCpuSet,
    active: AtomicCpuSet,
    stall_timeout_ns: AtomicU64,
    /// The call masks with [`MaskLevel::IrqsOnly`].
    mask_irqs_only: AtomicBool,
    /// Points at a [`Work`] on the initiator's stack while a call is in flight.
    work: AtomicPtr<Work<'static>>,
}

// Relaxed throughout: the control word's release of `Arrive` orders these after their
// writes, and a reader always acquired that state (or a later one) first.
impl Published {
    const_unless_loom! {
        const fn new() -> Self {
            Published {
                participants: AtomicCpuSet::new(),
                initiator: AtomicUsize::new(usize::MAX),
                deferred: AtomicCpuSet::new(),
                active: AtomicCpuSet::new(),
                stall_timeout_ns: AtomicU64::new(StopOptions::DEFAULT.stall_timeout_ns),
                mask_irqs_only: AtomicBool::new(false),
                work: AtomicPtr::new(core::ptr::null_mut()),
            }
        }
    }

    #[inline(always)]
    pub(super) fn participants(&self) -> CpuSet {
        self.participants.load(Ordering::Relaxed)
    }

    #[inline(always)]
    pub(super) fn deferred(&self) -> CpuSet {
        self.deferred.load(Ordering::Relaxed)
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
    /// The caller: it arrives last, opens every phase and alone may abort the call.
    Initiator { arrival_timeout_ns: u64 },
    /// A CPU pulled in by the stop IPI.
    Joiner,
}

/// The stop machine of one system. Make it a `static` and route the architecture's
/// stop IPI to [`handle_stop_ipi`](Self::handle_stop_ipi).
pub struct StopMachine<A: Arch> {
    pub(super) arch: A,
    /// Serialises initiators. Only its holder writes `published`, `control` and the
    /// profile; each CPU writes only its own slot.
    lock: StopLock,
    /// CPU hotplug: every call holds the read side, so the online set it read is fixed
    /// until it returns (Linux's `cpus_read_lock` in `stop_machine`).
    hotplug: CpuHotplugLock,
    /// The call: what the initiator published for it.
    pub(super) published: Published,
    /// Where the call is: `generation | phase`, written by the initiator only.
    pub(super) control: Control,
    /// Each CPU's acknowledgement, result and evidence, one cache line each.
    pub(super) slots: CpuSlots,
    /// The stamp sequence of [`Quiescence`](super::Quiescence).
    pub(super) evidence: Evidence,
    /// The initiator's timeline of its last call.
    pub(super) profile: Profile,
    /// The self-NMI requests of an NMI call.
    #[cfg(feature = "stop-machine-nmi")]
    pub(super) nmi: NmiRequests,
    /// Faults taken by functions of calls that catch them.
    faults: Faults,
}

impl<A: Arch> StopMachine<A> {
    const_unless_loom! {
        /// A stop machine driving the CPUs of `arch`.
        pub const fn new(arch: A) -> Self {
            StopMachine {
                arch,
                lock: StopLock::new(()),
                hotplug: CpuHotplugLock::new(),
                published: Published::new(),
                control: Control::new(),
                slots: CpuSlots::new(),
                evidence: Evidence::new(),
                profile: Profile::new(),
                #[cfg(feature = "stop-machine-nmi")]
                nmi: NmiRequests::new(),
                faults: Faults::new(),
            }
        }
    }

    /// The architecture this machine drives.
    pub fn arch(&self) -> &A {
        &self.arch
    }

    /// Linux's `cpus_read_lock`: while the guard lives no CPU goes up or down. Every
    /// stop call takes it itself; other code that targets the online set and waits for
    /// each CPU's answer (a kick of every CPU) takes it around that. Waits at most
    /// `timeout_ns`, answering IPIs if the caller's interrupts are on.
    pub fn cpus_read_lock(&self, timeout_ns: u64) -> Result<CpusReadGuard<'_>, LockTimeout> {
        self.hotplug
            .read_within(timeout_ns, || self.arch.now_ns(), || self.arch.relax())
    }

    /// Linux's `cpus_write_lock`: once it returns no stop call is in flight and none
    /// can start until the guard is dropped. Only CPU hotplug takes it, with its
    /// interrupts on (a stop call it waits for may need this CPU's answer).
    pub fn cpus_write_lock(&self, timeout_ns: u64) -> Result<CpusWriteGuard<'_>, LockTimeout> {
        self.hotplug
            .write_within(timeout_ns, || self.arch.now_ns(), || self.arch.relax())
    }

    /// The hotplug lock (for diagnostics: readers, writer).
    pub fn hotplug_lock(&self) -> &CpuHotplugLock {
        &self.hotplug
    }

    /// Runs `function` on every CPU in `active` while every online CPU is inside the
    /// rendezvous with all asynchronous exceptions masked.
    ///
    /// Must be called from normal code with interrupts enabled: a CPU waiting here for
    /// the machine to be free has to answer the current holder's stop IPI. Anywhere else
    /// (an IRQ or NMI handler, interrupts masked) the call is refused with
    /// [`StopError::WrongContext`] before it touches anything. Errors from all CPUs are
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
            catch_faults: false,
        };
        self.call(&work, active, options)
    }

    /// [`stop_machine`](Self::stop_machine), but a synchronous exception the function
    /// takes on a CPU (a load from an unmapped address, an undefined instruction) ends
    /// the function there, where the architecture can catch it
    /// ([`Arch::call_catching_faults`]; arm64 and x86 do): every CPU leaves as usual and
    /// the call fails with [`StopError::Faulted`], naming the CPUs and the fault. Only
    /// these calls pay for it: a context save at each active CPU's call.
    ///
    /// # Safety
    /// A faulting CPU abandons the function's frames without running destructors:
    /// `function` holds no lock and owns nothing that needs dropping across code that
    /// may fault.
    pub unsafe fn stop_machine_catching_faults(
        &self,
        function: StopFn<'_>,
        active: CpuSet,
        options: StopOptions,
    ) -> Result<(), StopError> {
        let work = Work {
            function: &function,
            #[cfg(feature = "stop-machine-nmi")]
            raise_nmi: None,
            #[cfg(feature = "stop-machine-nmi")]
            hold_nmis: false,
            catch_faults: true,
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

    /// `Ok` if the calling CPU may start a stop ([`Arch::call_context`] is
    /// [`CallContext::Normal`]); otherwise [`StopError::WrongContext`]. Every call checks
    /// this first, and `patch_machine` before it takes the text's lock.
    #[unsafe(link_section = ".text.nopatch")]
    #[inline(always)]
    pub fn may_stop_here(&self) -> Result<(), StopError> {
        match self.arch.call_context() {
            CallContext::Normal => Ok(()),
            context => Err(StopError::WrongContext {
                cpu: self.arch.cpu_id(),
                context,
            }),
        }
    }

    /// One call: take the machine, publish `work`, lead the rendezvous.
    #[unsafe(link_section = ".text.nopatch")]
    pub(super) fn call(
        &self,
        work: &Work<'_>,
        active: CpuSet,
        options: StopOptions,
    ) -> Result<(), StopError> {
        // Before anything else: from an IRQ or NMI handler, or with interrupts masked,
        // the lock wait below could spin on a holder this CPU keeps from finishing.
        self.may_stop_here()?;
        let arch = &self.arch;
        let me = arch.cpu_id();
        if active.is_empty() || !active.is_subset(arch.online_cpus()) {
            return Err(StopError::InvalidCpus {
                requested: active,
                online: arch.online_cpus(),
            });
        }

        let start = arch.now_ns();
        // The hotplug read side first, then the machine: hotplug (the write side) never
        // waits for the machine's lock, so the order cannot deadlock.
        let _cpus = self.hotplug.read_within(
            options.arrival_timeout_ns,
            || arch.now_ns(),
            || arch.relax(),
        )?;
        let _guard = lock_within(
            &self.lock,
            "the stop machine (another stop_machine call)",
            options.arrival_timeout_ns,
            || arch.now_ns(),
            || arch.relax(),
        )?;
        // Read under the hotplug lock: no CPU joins or leaves it until this call is over.
        let online = arch.online_cpus();
        if !active.is_subset(online) {
            return Err(StopError::InvalidCpus {
                requested: active,
                online,
            });
        }

        // Relaxed: only the lock holder changes the generation, and taking the lock
        // acquired the previous holder's last store of it.
        let generation = self
            .control
            .load(Ordering::Relaxed)
            .generation()
            .wrapping_add(1);
        let published = &self.published;
        // An isolated CPU in user mode runs no kernel text until its next entry, which
        // waits for this call's window to close: it is quiescent without an IPI. Only
        // through that protocol, one CAS on its state word; the CPUs the function must
        // run on are always interrupted.
        let deferred = match arch.context_states() {
            Some(states) => {
                states.open_stop(generation);
                states.defer(online.without(me).minus(active), Some(generation))
            }
            None => CpuSet::EMPTY,
        };
        let participants = online.minus(deferred);
        published
            .participants
            .store(participants, Ordering::Relaxed);
        published.deferred.store(deferred, Ordering::Relaxed);
        published.initiator.store(me, Ordering::Relaxed);
        published.active.store(active, Ordering::Relaxed);
        published
            .stall_timeout_ns
            .store(options.stall_timeout_ns, Ordering::Relaxed);
        published
            .mask_irqs_only
            .store(options.mask == MaskLevel::IrqsOnly, Ordering::Relaxed);
        published.work.store(
            // The pointer is dereferenced only in the `Run` phase, which cannot end
            // before this function has seen every active CPU's `Ran` (or panicked):
            // `work` outlives it.
            (work as *const Work<'_>).cast::<Work<'static>>().cast_mut(),
            Ordering::Relaxed,
        );
        #[cfg(feature = "stop-machine-nmi")]
        self.nmi.begin_call(work.hold_nmis);
        // Release: publishes every field above to a CPU that acquires this state, in
        // `handle_stop_ipi` or in any later wait.
        self.control
            .store(State::new(generation, Phase::Arrive), Ordering::Release);
        arch.wake_waiters();
        arch.send_stop_ipi(participants.without(me));
        self.profile.record(Mark::Entry, start);
        self.mark(Mark::IpiSent);

        let role = Role::Initiator {
            arrival_timeout_ns: options.arrival_timeout_ns,
        };
        let outcome = self.participate(generation, me, role);
        // Every write of the call and its maintenance are complete (the gather of every
        // active CPU's `Ran`), or nothing was written: deferred entries may go on.
        if let Some(states) = arch.context_states() {
            states.close_stop();
        }
        // Relaxed: past the gather of `Ran` (or an abort) no CPU dereferences it.
        published
            .work
            .store(core::ptr::null_mut(), Ordering::Relaxed);
        match outcome {
            Outcome::Aborted { missing, waited_ns } => {
                Err(StopError::Timeout { missing, waited_ns })
            }
            // The gather's Acquire loads of each active CPU's `Ran` pair with its
            // release: every code (and fault record) is visible.
            Outcome::Completed if work.catch_faults => self.faulted(active),
            Outcome::Completed => self.results(active),
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
        let state = self.control.load(Ordering::Acquire);
        if state.phase() != Phase::Arrive {
            return;
        }
        let me = self.arch.cpu_id();
        let generation = state.generation();
        // Relaxed: this CPU's own acknowledgement (the second IPI of a call it is in).
        let joined =
            (self.slots.get(me).ack(Ordering::Relaxed)).reached(generation, Progress::Arrived);
        // Relaxed, as `participants`: published by the `Arrive` release acquired above.
        // A stop IPI still pending from an earlier call that this CPU missed reaches it
        // while it waits, interrupts on, for the arrivals of its own call: joining that
        // call would wait for itself, masked, until the stall panic (found by the loom
        // model `two_concurrent_callers_one_busy`).
        let leads_it = self.published.initiator.load(Ordering::Relaxed) == me
            && !weaken::on(Knob::InitiatorJoinsOwnCall);
        if joined || leads_it || !self.published.participants.contains(me, Ordering::Relaxed) {
            return;
        }
        // If a newer call has replaced this one meanwhile, the wait after the
        // acknowledgement sees another generation, and `participate` leaves at once.
        let _ = self.participate(generation, me, Role::Joiner);
    }

    /// One CPU's pass through call `generation`, from arrival to leaving: the table of
    /// the module doc, one phase per paragraph.
    #[unsafe(link_section = ".text.nopatch")]
    fn participate(&self, generation: u32, me: usize, role: Role) -> Outcome {
        let arch = &self.arch;
        let slot = self.slots.get(me);

        // Arrive. The initiator keeps its interrupts on while the others arrive (one of
        // them may be waiting for this CPU before it can take the stop IPI), so it
        // masks last, once it has gathered every other acknowledgement.
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
        // The masked time is measured on the joiners only (`masked_max_ns` is about the
        // other CPUs): no clock read on the initiator's path for it.
        let masked_since = match role {
            Role::Joiner => arch.now_ns(),
            Role::Initiator { .. } => 0,
        };
        self.evidence
            .arrived(slot, generation, arch.all_masked(), masked_since);
        let outcome = 'masked: {
            let active = self.published.active();
            let stall_timeout_ns = self.published.stall_timeout_ns();
            match role {
                // Every other participant is masked and said so: this CPU, masked now
                // too, opens `Run`. It writes no `Arrived` of its own, so that its NMI
                // (`finish_in_nmi`) never sees it acknowledged while `Run` is shut.
                // Release: its evidence and, through the Acquire loads of the gather,
                // every joiner's, to the CPUs that acquire `Run`.
                Role::Initiator { .. } => {
                    self.profile
                        .reached_run(generation, me, self.published.participants());
                    self.control.store(
                        State::new(generation, Phase::Run),
                        weaken::order(Ordering::Release, Knob::RunRelaxed),
                    );
                    arch.wake_waiters();
                }
                // Release: this CPU's evidence, to the initiator's Acquire in its
                // gather. Then wait for the initiator to open `Run`: at most twice the
                // stall limit, since the initiator aborts a late arrival within its
                // arrival timeout, short of a stall.
                Role::Joiner => {
                    slot.acknowledge(
                        Ack::new(generation, Progress::Arrived),
                        weaken::order(Ordering::Release, Knob::ArrivedRelaxed),
                    );
                    arch.wake_waiters();
                    let state = self.wait_past(
                        generation,
                        Phase::Arrive,
                        me,
                        stall_timeout_ns.saturating_mul(2),
                    );
                    let stale = state.generation() != generation
                        && !weaken::on(Knob::JoinerIgnoresGeneration);
                    if stale || state.phase() == Phase::Aborted {
                        break 'masked Outcome::STALE;
                    }
                }
            }

            // Run. Release: the function's result, to the initiator's gather.
            if active.contains(me) {
                self.run(me, slot);
                slot.acknowledge(
                    Ack::new(generation, Progress::Ran),
                    weaken::order(Ordering::Release, Knob::RanRelaxed),
                );
                // The initiator may wait for this in a low-power wait; its own needs
                // no wake-up.
                if let Role::Joiner = role {
                    arch.wake_waiters();
                }
            }

            // Exit: the initiator opens it once every active CPU has finished; a joiner
            // leaves on any state past `Run` of this call, that is `Exit`, or, slow to
            // look, the initiator's next call (which it could start only after `Exit`).
            match role {
                Role::Initiator { .. } => {
                    self.gather(generation, Progress::Ran, active, me, stall_timeout_ns);
                    // Release: nothing new to publish (the joiners only need to leave),
                    // but it orders the gather's Acquires before any CPU unmasks.
                    self.control.store(
                        State::new(generation, Phase::Exit),
                        weaken::order(Ordering::Release, Knob::ExitRelaxed),
                    );
                    arch.wake_waiters();
                }
                Role::Joiner => {
                    self.wait_past(generation, Phase::Run, me, stall_timeout_ns);
                }
            }
            Outcome::Completed
        };
        if let Role::Initiator { .. } = role {
            self.mark(Mark::Exit);
        }
        // Release: the masked time, to `last_call_profile`. Still masked, so no IPI of a
        // later call can run on this CPU before its restore.
        if let Role::Joiner = role {
            self.evidence.unmasking(slot, arch.now_ns());
        }
        slot.acknowledge(Ack::new(generation, Progress::Left), Ordering::Release);
        if let Role::Joiner = role {
            // `last_call_profile` may wait for it in a low-power wait.
            arch.wake_waiters();
        }
        // Every way out of the masked block passed an Acquire of a state at or after the
        // end of `Run` of this call (or of an abort, when nothing was written), or, for
        // the initiator, of every active CPU's `Ran`: what the active CPUs wrote and made
        // coherent before acknowledging `Ran` is what this CPU fetches from here on.
        // Unconditional, so that no path can unmask without it (but for the model
        // check's knob, which shows that loom notices).
        if !weaken::on(Knob::SkipSync) {
            arch.sync_context();
        }
        self.evidence.leaving(slot);
        arch.restore(saved);
        if let Role::Initiator { .. } = role {
            self.mark(Mark::Unmasked);
        }
        outcome
    }

    /// The `Run` phase on an active CPU: the function, its result recorded.
    #[unsafe(link_section = ".text.nopatch")]
    fn run(&self, me: usize, slot: &CpuSlot) {
        // SAFETY: this CPU is in `Run` and has not acknowledged `Ran` yet: the
        // initiator resets `work` only after it has gathered that acknowledgement.
        let work = unsafe { self.published.work() };
        let code = match self.run_function(work, me) {
            Ok(()) => 0,
            Err(code) => code,
        };
        // Relaxed: released by this CPU's `Ran` acknowledgement, right after.
        slot.code.store(code, Ordering::Relaxed);
    }

    /// Runs the function of `work` on this CPU, directly or from a self-NMI.
    #[unsafe(link_section = ".text.nopatch")]
    fn run_function(&self, work: &Work<'_>, me: usize) -> StopFnResult {
        #[cfg(feature = "stop-machine-nmi")]
        if let Some(raise_nmi) = work.raise_nmi {
            return self.run_in_nmi(me, raise_nmi);
        }
        if work.catch_faults {
            let catching = Catching {
                arch: &self.arch,
                work,
                faults: &self.faults,
            };
            return self.evidence.run_marked(self.slots.get(me), me, &catching);
        }
        self.evidence
            .run_marked(self.slots.get(me), me, work.function)
    }

    /// The result of a call that caught faults: [`StopError::Faulted`] if a function
    /// faulted anywhere, else as [`results`](Self::results).
    #[unsafe(link_section = ".text.nopatch")]
    fn faulted(&self, active: CpuSet) -> Result<(), StopError> {
        let mut first = None;
        let mut cpus = CpuSet::EMPTY;
        for cpu in active {
            if let Some(fault) = self.faults.take(cpu) {
                cpus = cpus.with(cpu);
                first.get_or_insert((cpu, fault));
            }
        }
        match first {
            Some((cpu, fault)) => Err(StopError::Faulted { cpus, cpu, fault }),
            None => self.results(active),
        }
    }

    /// The call's result, once every active CPU acknowledged `Ran`: every failing
    /// CPU's code. The `Failures` (a code slot per CPU) is built only if one failed.
    #[unsafe(link_section = ".text.nopatch")]
    fn results(&self, active: CpuSet) -> Result<(), StopError> {
        // Relaxed: acquired by the gather of `Ran` (see `call`).
        let code = |cpu: usize| self.slots.get(cpu).code.load(Ordering::Relaxed);
        if active.iter().all(|cpu| code(cpu) == 0) {
            return Ok(());
        }
        let mut failures = Failures {
            cpus: CpuSet::EMPTY,
            codes: [0; MAX_CPUS],
        };
        for cpu in active {
            let code = code(cpu);
            if code != 0 {
                failures.cpus = failures.cpus.with(cpu);
                if let Some(slot) = failures.codes.get_mut(cpu) {
                    *slot = code;
                }
            }
        }
        Err(StopError::Failed(failures))
    }

    /// The initiator's wait for every other participant's `Arrive` acknowledgement,
    /// with its own interrupts as the caller left them. Past `arrival_timeout_ns` it
    /// aborts the call, unless the last CPU has arrived by its final look.
    #[unsafe(link_section = ".text.nopatch")]
    fn await_arrivals(
        &self,
        generation: u32,
        me: usize,
        arrival_timeout_ns: u64,
    ) -> Result<(), Outcome> {
        let arch = &self.arch;
        let others = self.published.participants().without(me);
        let mut pending = others.iter().peekable();
        let start = arch.now_ns();
        loop {
            // Acquire pairs with each joiner's release of its acknowledgement: its mask
            // evidence and stamp are visible. The cursor only moves forward (an
            // acknowledgement of this generation stays until the CPU's next call, which
            // needs this one to end), so the whole gather reads each line once it has
            // been written: O(N) for the initiator.
            while pending
                .next_if(|&cpu| self.arrived(cpu, generation))
                .is_some()
            {}
            if pending.peek().is_none() {
                return Ok(());
            }
            let waited_ns = arch.now_ns().saturating_sub(start);
            if waited_ns > arrival_timeout_ns {
                #[cfg(loom)]
                if weaken::on(Knob::MissingAfterAbort) {
                    return Err(self.abort_then_name_missing(generation, others, waited_ns));
                }
                // The final look decides, before the abort is stored: the error names
                // the CPUs that had not arrived by then, so it is never empty (a CPU
                // that acknowledges between this look and the abort is still named,
                // and leaves on seeing the abort). Computed after the abort, a CPU
                // acknowledging in between went unnamed (tests/loom_stop.rs).
                let missing = pending
                    .filter(|&cpu| !self.arrived(cpu, generation))
                    .fold(CpuSet::EMPTY, CpuSet::with);
                if missing.is_empty() {
                    return Ok(());
                }
                // Release: to the joiners that wait past `Arrive`. A joiner that
                // acknowledges meanwhile sees the abort in that wait and leaves: the
                // function runs nowhere either way.
                if !weaken::on(Knob::AbortNotStored) {
                    self.control
                        .store(State::new(generation, Phase::Aborted), Ordering::Release);
                }
                arch.wake_waiters();
                return Err(Outcome::Aborted { missing, waited_ns });
            }
            arch.relax();
        }
    }

    /// The abort as it was before the model check found its gap: the missing CPUs are
    /// computed after the abort is stored, so one that acknowledges in between is not
    /// named. Only the knob [`Knob::MissingAfterAbort`] takes this path.
    #[cfg(loom)]
    fn abort_then_name_missing(&self, generation: u32, others: CpuSet, waited_ns: u64) -> Outcome {
        if !weaken::on(Knob::AbortNotStored) {
            self.control
                .store(State::new(generation, Phase::Aborted), Ordering::Release);
        }
        self.arch.wake_waiters();
        let missing = others
            .iter()
            .filter(|&cpu| !self.arrived(cpu, generation))
            .fold(CpuSet::EMPTY, CpuSet::with);
        Outcome::Aborted { missing, waited_ns }
    }

    /// Whether `cpu` has acknowledged `Arrive` of call `generation` (Acquire).
    #[inline(always)]
    fn arrived(&self, cpu: usize, generation: u32) -> bool {
        (self.slots.get(cpu).ack(Ordering::Acquire)).reached(generation, Progress::Arrived)
    }

    /// The initiator's wait, masked, for every CPU of `cpus` to acknowledge `progress` of
    /// call `generation`, one line after the other. Past `limit_ns` a CPU is stuck with
    /// exceptions masked: panic, naming the CPUs.
    #[unsafe(link_section = ".text.nopatch")]
    fn gather(&self, generation: u32, progress: Progress, cpus: CpuSet, me: usize, limit_ns: u64) {
        let arch = &self.arch;
        // The clock is read only once the wait has to wait: the common case, everyone
        // done at the first look, costs no clock read.
        let mut start = None;
        for cpu in cpus {
            loop {
                // Acquire pairs with the CPU's release of its acknowledgement.
                let ack = self.slots.get(cpu).ack(Ordering::Acquire);
                if ack.reached(generation, progress) {
                    break;
                }
                let now = arch.now_ns();
                let waited_ns = now.saturating_sub(*start.get_or_insert(now));
                if waited_ns > limit_ns {
                    let late = cpus
                        .iter()
                        .filter(|&c| {
                            !(self.slots.get(c).ack(Ordering::Relaxed))
                                .reached(generation, progress)
                        })
                        .fold(CpuSet::EMPTY, CpuSet::with);
                    panic!(
                        "stop_machine: cpu{me} waited {} us in call {generation} for CPUs \
                         {late} to acknowledge {progress:?}",
                        waited_ns / 1000,
                    );
                }
                arch.relax();
            }
        }
    }

    /// Waits until the control word is no longer `phase` of `generation`, and returns
    /// the state it saw. Past `limit_ns`, this CPU is stuck with exceptions masked:
    /// panic, naming the phase.
    #[unsafe(link_section = ".text.nopatch")]
    fn wait_past(&self, generation: u32, phase: Phase, me: usize, limit_ns: u64) -> State {
        let arch = &self.arch;
        let mut start = None;
        loop {
            // Acquire pairs with the initiator's release of the state that ended the
            // phase (and, for a later call's state, of that one, which came after).
            let current = self.control.load(Ordering::Acquire);
            if !current.is(generation, phase) {
                return current;
            }
            let now = arch.now_ns();
            let waited_ns = now.saturating_sub(*start.get_or_insert(now));
            if waited_ns > limit_ns {
                panic!(
                    "stop_machine: cpu{me} waited {} us in phase {phase:?} of call {generation} \
                     for the initiator to end it",
                    waited_ns / 1000,
                );
            }
            arch.relax();
        }
    }
}
