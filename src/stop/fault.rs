//! Stop functions that take a synchronous exception (a load from an unmapped address,
//! an undefined instruction): [`StopMachine::stop_machine_catching_faults`] runs the
//! function through [`Arch::call_catching_faults`], and the fault comes back here as a
//! per-CPU record instead of ending the machine.
//!
//! Linux recovers from faults at single, known instructions (its exception tables:
//! `copy_from_kernel_nofault` and friends). A stop function is arbitrary code, so the
//! fixup point here is the call itself: the architecture saves the callee-saved state
//! at the call (a `setjmp`), arms a per-CPU pointer to it, and its synchronous exception
//! handler, for an exception that would otherwise be fatal and only while armed,
//! resumes there with the fault's description (a `longjmp`). Nothing is looked up or
//! saved on any other path: calls that do not ask for it, and the exception entry
//! until it is about to report a fatal fault, are unchanged.

use super::rendezvous::Work;
use super::{Arch, StopFnResult, StopFunction};
use crate::MAX_CPUS;
use core::fmt;

/// The code a CPU whose function faulted reports among the call's results.
pub const EFAULT: i32 = -14;

/// A synchronous exception taken by a stop function.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StopFault {
    /// What the exception was (arm64: the ESR exception class; x86: the vector).
    pub what: &'static str,
    /// Where the function was (arm64 ELR_EL1, x86 RIP).
    pub pc: usize,
    /// The faulting data address where there is one (arm64 FAR_EL1, x86 CR2), else 0.
    pub addr: usize,
    /// The syndrome (arm64 ESR_EL1, x86 the error code).
    pub syndrome: u64,
}

impl fmt::Display for StopFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} at pc {:#x} (address {:#x}, syndrome {:#x})",
            self.what, self.pc, self.addr, self.syndrome
        )
    }
}

/// Each CPU's fault in the call in flight: written only by that CPU in `Run`, before its
/// `Ran` acknowledgement (a release); read by the initiator after its gather (acquire).
pub(super) struct Faults {
    faults: [spin::Mutex<Option<StopFault>>; MAX_CPUS],
}

impl Faults {
    pub(super) const fn new() -> Self {
        Faults {
            faults: [const { spin::Mutex::new(None) }; MAX_CPUS],
        }
    }

    /// Takes `cpu`'s record (uncontended: see the type).
    #[unsafe(link_section = ".text.nopatch")]
    pub(super) fn take(&self, cpu: usize) -> Option<StopFault> {
        self.faults.get(cpu).and_then(|f| f.lock().take())
    }

    #[unsafe(link_section = ".text.nopatch")]
    fn record(&self, cpu: usize, fault: StopFault) {
        if let Some(slot) = self.faults.get(cpu) {
            *slot.lock() = Some(fault);
        }
    }
}

/// The function of a call that catches faults, as the core runs it on one CPU.
pub(super) struct Catching<'a, A: Arch> {
    pub(super) arch: &'a A,
    pub(super) work: &'a Work<'a>,
    pub(super) faults: &'a Faults,
}

impl<A: Arch> StopFunction for Catching<'_, A> {
    #[unsafe(link_section = ".text.nopatch")]
    fn call(&self, cpu: usize) -> StopFnResult {
        // SAFETY: `stop_machine_catching_faults`' caller promised that the function
        // holds nothing across code that may fault.
        match unsafe { self.arch.call_catching_faults(cpu, self.work.function) } {
            Ok(result) => result,
            Err(fault) => {
                self.faults.record(cpu, fault);
                Err(EFAULT)
            }
        }
    }
}
