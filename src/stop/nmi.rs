//! The NMI path (Chang S. Bae, "stop_machine: Add NMI-based execution path", LKML,
//! 2026; Linux's `STOP_MACHINE_NMI`): in the `Run` phase an active CPU raises an NMI on
//! itself and its NMI handler runs the function, so that nothing, not even another NMI,
//! can preempt it.
//!
//! A request moves `pending` (set by the CPU, cleared by whoever claims it first: the
//! handler, or the waiter that timed out) -> `done` (the handler stored its result, or
//! the waiter withdrew the request: the function will not run there).
//!
//! [`StopMachine::stop_machine_nmi_free`] adds the other half of Ankur Arora,
//! "x86/alternatives: NMI safe runtime patching" (LKML, 2020), for architectures whose
//! NMIs pass [`Arch::mask_all`](super::Arch::mask_all) (x86): the active CPU's function
//! runs from its self-NMI, so no other NMI handler can start on it meanwhile, and an NMI
//! that any participant takes while the function may be running first finishes that
//! CPU's part of the call in the stop machine's slot ([`StopMachine::handle_nmi`]): it
//! waits, bounded, until the function has finished on every active CPU, then
//! context-synchronises, and only then do the other NMI handlers run. They see the old
//! code (before `Run`) or the new (after), never a write in progress; and no one waits
//! for a CPU in an NMI: the active CPU's function needs nothing from the others.

use super::rendezvous::Work;
use super::state::{Phase, Progress};
use super::{Arch, StopMachine, StopOptions};
use super::{ETIMEDOUT, MaskLevel, NMI_TIMEOUT_NS, NmiArch, NmiSafe, StopError, StopFnResult};
use crate::cpuset::AtomicCpuSet;
use crate::{CpuSet, MAX_CPUS};
use core::sync::atomic::{AtomicBool, AtomicI32, Ordering};

/// Raises an NMI on the calling CPU, for [`StopMachine::stop_machine_nmi`]: a trait
/// object rather than a closure so that its code lives in `.text.nopatch`. Every
/// [`NmiArch`] is one ([`NmiArch::send_self_nmi`]).
pub trait RaiseNmi: Sync {
    /// Raises an NMI on the calling CPU.
    fn raise(&self);
}

impl<A: NmiArch> RaiseNmi for A {
    #[unsafe(link_section = ".text.nopatch")]
    fn raise(&self) {
        self.send_self_nmi();
    }
}

/// The self-NMI requests of the current call, one bit per CPU.
pub(super) struct NmiRequests {
    /// CPUs whose self-NMI may run the function (Linux's `nmi_cpus`).
    pending: AtomicCpuSet,
    /// CPUs whose NMI handler has finished and stored its result.
    done: AtomicCpuSet,
    /// CPUs on which the NMI ran the function in the last NMI call.
    delivered: AtomicCpuSet,
    /// The function's result in each CPU's NMI handler.
    codes: [AtomicI32; MAX_CPUS],
    /// The call holds the participants' NMIs while its function may run.
    hold: AtomicBool,
}

impl NmiRequests {
    pub(super) const fn new() -> Self {
        NmiRequests {
            pending: AtomicCpuSet::new(),
            done: AtomicCpuSet::new(),
            delivered: AtomicCpuSet::new(),
            codes: [const { AtomicI32::new(0) }; MAX_CPUS],
            hold: AtomicBool::new(false),
        }
    }

    /// A new call (the initiator, under the machine's lock, before it opens `Arrive`):
    /// no function has run yet, and `hold` says whether NMIs are held.
    #[inline(always)]
    pub(super) fn begin_call(&self, hold: bool) {
        // Relaxed: released by the `Arrive` state. An NMI handler reads these only after
        // it acquired a state of this call (`finish_in_nmi`).
        self.done.clear(Ordering::Relaxed);
        self.hold.store(hold, Ordering::Relaxed);
    }
}

impl<A: NmiArch> StopMachine<A> {
    /// Like [`stop_machine`](Self::stop_machine), but each active CPU runs `function`
    /// from an NMI it raises on itself (Chang S. Bae, "stop_machine: Add NMI-based
    /// execution path", LKML, 2026; Linux's `STOP_MACHINE_NMI`): nothing, not even
    /// another NMI, can preempt the function.
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
        let work = Work {
            function: &function.0,
            raise_nmi: Some(&self.arch),
            hold_nmis: false,
            catch_faults: false,
        };
        // Relaxed: published with the call by the `Arrive` release in `call`.
        self.nmi.delivered.clear(Ordering::Relaxed);
        let options = StopOptions {
            mask: MaskLevel::IrqsOnly,
            ..options
        };
        self.call(&work, active, options)
    }

    /// The stop-machine slot of the architecture's NMI handler: runs the function if
    /// this CPU raised an NMI for it, and returns whether it did (`false`: the NMI is
    /// someone else's). In a call that holds NMIs it then finishes this CPU's part of
    /// the call (`finish_in_nmi`) before returning, so that the NMI handlers after it
    /// see no write in progress.
    ///
    /// Must be called first in the NMI handler, so that the stop function takes
    /// priority over any other NMI work (as in Ankur Arora, "x86/alternatives: NMI safe
    /// runtime patching", LKML, 2020).
    #[unsafe(link_section = ".text.nopatch")]
    pub fn handle_nmi(&self) -> bool {
        let me = self.arch.cpu_id();
        // Claim the request (Linux: cpumask_test_and_clear_cpu). Acquire pairs with the
        // release in `run_in_nmi`.
        let claimed = self.nmi.pending.remove(me, Ordering::AcqRel);
        if claimed {
            // SAFETY: the request was pending, so this CPU is in `run_in_nmi`, inside the
            // `Run` phase of the call that published `work`, which cannot end before this
            // handler reports below.
            let work = unsafe { self.published.work() };
            let code = match self
                .evidence
                .run_marked(self.slots.get(me), me, work.function)
            {
                Ok(()) => 0,
                Err(code) => code,
            };
            // Relaxed: both released by `done` below (and `delivered` again by this
            // CPU's `Run` acknowledgement, before the initiator reads it).
            self.nmi.codes[me].store(code, Ordering::Relaxed);
            self.nmi.delivered.insert(me, Ordering::Relaxed);
            // Release: the result is stored before `run_in_nmi` can see `done`.
            self.nmi.done.insert(me, Ordering::Release);
        }
        self.finish_in_nmi(me);
        claimed
    }

    /// In a call that holds NMIs, an NMI on participant `me` finishes this CPU's part of
    /// the call before any other NMI handler runs (Ankur Arora's
    /// `text_poke_sync_finish()` called from the NMI): it waits until the function has
    /// finished on every active CPU, context-synchronises, and records that `me` has left
    /// the window. Its interrupted code still leaves the rendezvous as usual.
    ///
    /// Nothing here waits for this CPU itself: an NMI that comes before this CPU has
    /// acknowledged `Arrive` (no function can run until it does), or on an active CPU
    /// before its own function ran (that runs from the next NMI), returns at once, the CPU
    /// still in the window.
    #[unsafe(link_section = ".text.nopatch")]
    fn finish_in_nmi(&self, me: usize) {
        let slot = self.slots.get(me);
        let Some(window) = self.evidence.window_of(slot) else {
            return;
        };
        // Relaxed: the latest call's flag (a newer call than the window's writes it only
        // after this one's `Exit`, when nothing is left here but to synchronise).
        if !self.nmi.hold.load(Ordering::Relaxed) {
            return;
        }
        let arch = &self.arch;
        let start = arch.now_ns();
        loop {
            // Acquire pairs with the initiator's releases of the control word: the call's
            // `hold`, `active` and `done` are visible. A newer call can republish them
            // only after this one's `Exit`, which ends the wait below on its own.
            let state = self.control.load(Ordering::Acquire);
            if state.generation() != window {
                break; // A later call: this one's `Run` is over.
            }
            let acked = match state.phase() {
                // This CPU's own acknowledgement: program order. The initiator writes
                // none; its acknowledgement is its opening of `Run`.
                Phase::Arrive => slot
                    .ack(Ordering::Relaxed)
                    .reached(window, Progress::Arrived),
                Phase::Run => true,
                Phase::Idle | Phase::Exit | Phase::Aborted => break,
            };
            if !acked {
                return;
            }
            let active = self.published.active();
            // Acquire pairs with each handler's release of `done`: what the function
            // wrote is visible here.
            let done = self.nmi.done.load(Ordering::Acquire);
            if active.is_subset(done) {
                break;
            }
            if active.contains(me) && !done.contains(me) && active.without(me).is_subset(done) {
                return; // This CPU's own function runs from its next NMI.
            }
            let waited_ns = arch.now_ns().saturating_sub(start);
            if waited_ns > self.published.stall_timeout_ns() {
                panic!(
                    "stop_machine: cpu{me}'s NMI waited {} us in call {window} for the \
                     function on {}",
                    waited_ns / 1000,
                    active.minus(done)
                );
            }
            arch.relax();
        }
        // What the active CPUs wrote is what this CPU fetches from here on, in this NMI.
        arch.sync_context();
        self.evidence.leaving(slot);
    }

    /// The CPUs on which the last [`stop_machine_nmi`](Self::stop_machine_nmi) call ran
    /// the function from an NMI.
    pub fn nmi_delivered(&self) -> CpuSet {
        self.nmi.delivered.load(Ordering::Relaxed)
    }
}

impl<A: Arch> StopMachine<A> {
    /// [`stop_machine_nmi_free`](Self::stop_machine_nmi_free) where NMIs pass
    /// [`Arch::mask_all`]: `function` from the active CPUs' self-NMIs (`raise_nmi`),
    /// the participants' NMIs held while it may run.
    pub(super) fn call_nmi_held(
        &self,
        function: &dyn super::StopFunction,
        raise_nmi: &dyn RaiseNmi,
        active: CpuSet,
        options: StopOptions,
    ) -> Result<(), StopError> {
        let work = Work {
            function,
            raise_nmi: Some(raise_nmi),
            hold_nmis: true,
            catch_faults: false,
        };
        let options = StopOptions {
            mask: MaskLevel::IrqsOnly,
            ..options
        };
        self.call(&work, active, options)
    }

    /// Raises an NMI on this CPU and waits, bounded, for its handler to run the function.
    #[unsafe(link_section = ".text.nopatch")]
    pub(super) fn run_in_nmi(&self, me: usize, raise_nmi: &dyn RaiseNmi) -> StopFnResult {
        let arch = &self.arch;
        let nmi = &self.nmi;
        // Relaxed: only this CPU's handler sets the bit, after the release below.
        nmi.done.remove(me, Ordering::Relaxed);
        // Release pairs with the handler's claim (AcqRel in `handle_nmi`).
        nmi.pending.insert(me, Ordering::Release);
        raise_nmi.raise();
        let start = arch.now_ns();
        let mut claimed_by_handler = false;
        loop {
            // Acquire pairs with the handler's release of `done`: the result it stored
            // first is visible (the race v2 of Chang S. Bae's series fixed).
            if nmi.done.contains(me, Ordering::Acquire) {
                // `get`: `me < MAX_CPUS` always, but a bounds-check panic would be a
                // branch out of `.text.nopatch`.
                let code = nmi.codes.get(me).map_or(0, |c| c.load(Ordering::Relaxed));
                return if code == 0 { Ok(()) } else { Err(code) };
            }
            let waited_ns = arch.now_ns().saturating_sub(start);
            if !claimed_by_handler && waited_ns > NMI_TIMEOUT_NS {
                // Withdraw the request. If it was still pending the handler never
                // started, and now never will run the function; otherwise it is running
                // it and we wait for its result like any other phase. AcqRel: the
                // claim is one read-modify-write on `pending`, whichever side wins.
                if nmi.pending.remove(me, Ordering::AcqRel) {
                    // "Done": the function will never run here; an NMI held for it on
                    // another CPU stops waiting for this one.
                    nmi.done.insert(me, Ordering::Release);
                    return Err(ETIMEDOUT);
                }
                claimed_by_handler = true;
            }
            if waited_ns > self.published.stall_timeout_ns() {
                panic!(
                    "stop_machine: cpu{me}'s NMI handler ran for {} us",
                    waited_ns / 1000
                );
            }
            arch.relax();
        }
    }
}
