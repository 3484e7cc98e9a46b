//! The narrow interface the stop-machine core needs from an architecture.

use crate::CpuSet;

/// What the arch-free stop-machine core asks of an architecture.
///
/// An implementation is a handle to "the machine": every method acts on, or reports
/// about, the CPU that calls it. The core never names a register, an interrupt
/// controller or an instruction; everything arch-specific goes through here.
///
/// # Safety
///
/// The core's guarantees (no CPU executes normal code while the stop function runs;
/// every CPU context-synchronises before it leaves) hold only if the implementation
/// keeps this contract:
/// - [`cpu_id`](Arch::cpu_id) is stable for the lifetime of the calling context, unique
///   among online CPUs, and `< MAX_CPUS`; it is in [`online_cpus`](Arch::online_cpus).
/// - After [`mask_all`](Arch::mask_all) returns, the calling CPU takes no asynchronous
///   exception (arm64: D, A, I and F; x86: IF) until [`restore`](Arch::restore).
///   Exceptions the architecture cannot mask (x86 NMI, arm64 SDEI) are out of scope
///   here and are documented by the implementation.
/// - [`send_stop_ipi`](Arch::send_stop_ipi) eventually makes every target CPU whose
///   interrupts are (or become) unmasked call
///   [`StopMachine::handle_stop_ipi`](super::StopMachine::handle_stop_ipi).
/// - [`sync_context`](Arch::sync_context) is a context-synchronisation event: once it
///   returns, the CPU fetches instructions written (and made coherent) by other CPUs
///   before they released the state this CPU acquired.
/// - `nmis_pass_mask_all` (with `stop-machine-nmi`) returns `Some` only on an
///   architecture that is an [`NmiArch`], and raises exactly its self-NMI.
pub unsafe trait Arch: Sync {
    /// Exception-mask state saved by [`mask_all`](Arch::mask_all).
    type MaskState: Copy;

    /// Index of the calling CPU.
    fn cpu_id(&self) -> usize;

    /// The CPUs that are online and will answer a stop IPI.
    fn online_cpus(&self) -> CpuSet;

    /// Masks every maskable asynchronous exception on the calling CPU and returns the
    /// state to hand back to [`restore`](Arch::restore).
    fn mask_all(&self) -> Self::MaskState;

    /// Masks normal interrupts only, leaving NMIs deliverable (arm64 pseudo-NMI: raise
    /// `ICC_PMR_EL1`; x86: `cli`). Where the architecture has no NMI this is
    /// [`mask_all`](Arch::mask_all), the default.
    fn mask_irqs(&self) -> Self::MaskState {
        self.mask_all()
    }

    /// Restores the mask state returned by [`mask_all`](Arch::mask_all) or
    /// [`mask_irqs`](Arch::mask_irqs).
    fn restore(&self, saved: Self::MaskState);

    /// Whether every maskable asynchronous exception is masked on the calling CPU.
    ///
    /// Used to record evidence of quiescence, not to decide anything.
    fn all_masked(&self) -> bool;

    /// Asks each CPU in `targets` (never the caller) to enter the rendezvous.
    fn send_stop_ipi(&self, targets: CpuSet);

    /// Context synchronisation: arm64 `ISB`, x86 a serialising instruction.
    fn sync_context(&self);

    /// Called in every wait loop: a spin hint, or a low-power wait that an
    /// update of the rendezvous state is guaranteed to end.
    fn relax(&self);

    /// Called by the CPU that changed the rendezvous state, after the change: wakes
    /// CPUs that [`relax`](Arch::relax) in a low-power wait (arm64 `SEV`).
    fn wake_waiters(&self) {}

    /// A monotonic clock shared by all CPUs, in nanoseconds.
    fn now_ns(&self) -> u64;

    /// The context state words of this machine's CPUs, where its entry and exit code
    /// keep them (`context.rs`): a stop then defers an isolated CPU in user mode instead
    /// of interrupting it. `None`, the default: every CPU is interrupted.
    ///
    /// An implementation that returns `Some` must call
    /// [`ContextStates::exit_to_user`](super::ContextStates::exit_to_user) last before
    /// every return to user mode, and [`ContextStates::enter_kernel`](super::ContextStates::enter_kernel),
    /// the deferred wait and [`sync_context`](Arch::sync_context) first on every entry
    /// from it, in code patching refuses.
    fn context_states(&self) -> Option<&super::ContextStates> {
        None
    }

    /// Where the calling CPU runs: the most specific of NMI handler, interrupt or
    /// exception handler, interrupts masked, normal. A stop refuses to start anywhere
    /// but [`CallContext::Normal`](super::CallContext::Normal)
    /// ([`StopError::WrongContext`](super::StopError::WrongContext)). Called by the
    /// initiator before it touches anything, so it must be cheap and in `.text.nopatch`
    /// (or inlined there).
    fn call_context(&self) -> super::CallContext;

    /// Runs `function` on this CPU (`cpu`) so that a synchronous exception it takes
    /// that would otherwise be fatal (a load from an unmapped address, an undefined
    /// instruction) ends the call with `Err` describing it instead, as if `function` had
    /// returned. The default catches nothing: a fault stays fatal.
    ///
    /// # Safety
    /// On a fault, every frame between this call and the fault is abandoned without
    /// running its destructors: `function` must hold no lock and own nothing that needs
    /// dropping across code that may fault.
    unsafe fn call_catching_faults(
        &self,
        cpu: usize,
        function: &dyn super::StopFunction,
    ) -> Result<super::StopFnResult, super::StopFault> {
        Ok(function.call(cpu))
    }

    /// Where [`mask_all`](Arch::mask_all) cannot keep NMIs out (x86), this CPU's self-NMI
    /// ([`StopMachine::stop_machine_nmi_free`](super::StopMachine::stop_machine_nmi_free)
    /// then runs the function from it); `None`, the default, where it can.
    #[cfg(feature = "stop-machine-nmi")]
    fn nmis_pass_mask_all(&self) -> Option<&dyn super::RaiseNmi> {
        None
    }
}

/// An architecture with NMIs the stop machine can use to run functions from NMI context
/// ([`StopMachine::stop_machine_nmi`](super::StopMachine::stop_machine_nmi)).
///
/// # Safety
///
/// [`send_self_nmi`](NmiArch::send_self_nmi) raises an NMI on the calling CPU that is
/// taken even with [`Arch::mask_irqs`] in force (and under [`Arch::mask_all`] only where
/// `Arch::nmis_pass_mask_all` says NMIs pass it), never nests, and whose handler calls
/// [`StopMachine::handle_nmi`](super::StopMachine::handle_nmi) before any other NMI work.
#[cfg(feature = "stop-machine-nmi")]
pub unsafe trait NmiArch: Arch {
    /// Raises an NMI on the calling CPU.
    fn send_self_nmi(&self);
}
