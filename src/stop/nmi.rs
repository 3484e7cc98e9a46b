//! The NMI path (Chang S. Bae, "stop_machine: Add NMI-based execution path", LKML,
//! 2026; Linux's `STOP_MACHINE_NMI`): in the `Run` phase an active CPU raises an NMI on
//! itself and its NMI handler runs the function, so that nothing, not even another NMI,
//! can preempt it.
//!
//! A request moves `pending` (set by the CPU, cleared by whoever claims it first: the
//! handler, or the waiter that timed out) -> `done` (the handler stored its result).

use super::rendezvous::Work;
use super::{Arch, StopMachine, StopOptions};
use super::{ETIMEDOUT, MaskLevel, NMI_TIMEOUT_NS, NmiArch, NmiSafe, StopError, StopFnResult};
use crate::{CpuSet, MAX_CPUS};
use core::sync::atomic::{AtomicI32, AtomicU32, Ordering};

/// Raises an NMI on the calling CPU, for [`StopMachine::stop_machine_nmi`]: a trait
/// object rather than a closure so that its code lives in `.text.nopatch`.
pub(super) trait RaiseNmi: Sync {
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
    pending: AtomicU32,
    /// CPUs whose NMI handler has finished and stored its result.
    done: AtomicU32,
    /// CPUs on which the NMI ran the function in the last NMI call.
    delivered: AtomicU32,
    /// The function's result in each CPU's NMI handler.
    codes: [AtomicI32; MAX_CPUS],
}

impl NmiRequests {
    pub(super) const fn new() -> Self {
        NmiRequests {
            pending: AtomicU32::new(0),
            done: AtomicU32::new(0),
            delivered: AtomicU32::new(0),
            codes: [const { AtomicI32::new(0) }; MAX_CPUS],
        }
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
        };
        // Relaxed: published with the call by the `Arrive` release in `call`.
        self.nmi.delivered.store(0, Ordering::Relaxed);
        let options = StopOptions {
            mask: MaskLevel::IrqsOnly,
            ..options
        };
        self.call(&work, active, options)
    }

    /// The stop-machine slot of the architecture's NMI handler: runs the function if
    /// this CPU raised an NMI for it, and returns whether it did (`false`: the NMI is
    /// someone else's).
    ///
    /// Must be called first in the NMI handler, so that the stop function takes
    /// priority over any other NMI work (as in Ankur Arora, "x86/alternatives: NMI safe
    /// runtime patching", LKML, 2020).
    #[unsafe(link_section = ".text.nopatch")]
    pub fn handle_nmi(&self) -> bool {
        let me = self.arch.cpu_id();
        let bit = CpuSet::single(me).bits();
        // Claim the request (Linux: cpumask_test_and_clear_cpu). Acquire pairs with the
        // release in `run_in_nmi`.
        if self.nmi.pending.fetch_and(!bit, Ordering::AcqRel) & bit == 0 {
            return false;
        }
        // SAFETY: the request was pending, so this CPU is in `run_in_nmi`, inside the
        // `Run` phase of the call that published `work`, which cannot end before this
        // handler reports below.
        let work = unsafe { self.published.work() };
        let code = match work.function.call(me) {
            Ok(()) => 0,
            Err(code) => code,
        };
        // Relaxed: both released by `done` below (and `delivered` again by this CPU's
        // `Run` acknowledgement, before the initiator reads it).
        self.nmi.codes[me].store(code, Ordering::Relaxed);
        self.nmi.delivered.fetch_or(bit, Ordering::Relaxed);
        // Release: the result is stored before `run_in_nmi` can see `done`.
        self.nmi.done.fetch_or(bit, Ordering::Release);
        true
    }

    /// The CPUs on which the last [`stop_machine_nmi`](Self::stop_machine_nmi) call ran
    /// the function from an NMI.
    pub fn nmi_delivered(&self) -> CpuSet {
        CpuSet::from_bits(self.nmi.delivered.load(Ordering::Relaxed))
    }
}

impl<A: Arch> StopMachine<A> {
    /// Raises an NMI on this CPU and waits, bounded, for its handler to run the function.
    #[unsafe(link_section = ".text.nopatch")]
    pub(super) fn run_in_nmi(&self, me: usize, raise_nmi: &dyn RaiseNmi) -> StopFnResult {
        let arch = &self.arch;
        let nmi = &self.nmi;
        let bit = CpuSet::single(me).bits();
        // Relaxed: only this CPU's handler sets the bit, after the release below.
        nmi.done.fetch_and(!bit, Ordering::Relaxed);
        // Release pairs with the handler's claim (AcqRel in `handle_nmi`).
        nmi.pending.fetch_or(bit, Ordering::Release);
        raise_nmi.raise();
        let start = arch.now_ns();
        let mut claimed_by_handler = false;
        loop {
            // Acquire pairs with the handler's release of `done`: the result it stored
            // first is visible (the race v2 of Chang S. Bae's series fixed).
            if nmi.done.load(Ordering::Acquire) & bit != 0 {
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
                if nmi.pending.fetch_and(!bit, Ordering::AcqRel) & bit != 0 {
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
