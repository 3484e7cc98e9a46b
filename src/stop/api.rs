//! What callers of the stop machine see: the stop function's types, the per-call
//! options, and the errors.

use crate::{CpuSet, MAX_CPUS};
use core::fmt;

/// What a stop function returns on one CPU: `Err(code)` with a non-zero, errno-like code.
pub type StopFnResult = Result<(), i32>;

/// A function run by [`StopMachine::stop_machine`](super::StopMachine::stop_machine) on
/// each active CPU; its argument is the index of the CPU it runs on.
pub type StopFn<'a> = &'a (dyn Fn(usize) -> StopFnResult + Sync);

/// A stop function as the core calls it: through this trait's vtable, while every CPU
/// is in the rendezvous. A closure ([`StopFn`]) is one, but its code cannot be placed in
/// `.text.nopatch`; a type of its own can, with `#[unsafe(link_section)]` on
/// [`call`](StopFunction::call), as the patch window's must be
/// ([`stop_machine_with`](super::StopMachine::stop_machine_with)).
pub trait StopFunction: Sync {
    /// Runs the function on CPU `cpu`.
    fn call(&self, cpu: usize) -> StopFnResult;
}

impl StopFunction for StopFn<'_> {
    #[unsafe(link_section = ".text.nopatch")]
    fn call(&self, cpu: usize) -> StopFnResult {
        self(cpu)
    }
}

/// A stop function that may run in NMI context: it takes no lock, does not print,
/// does not allocate, and takes no exception (on x86 an exception's IRET would
/// re-enable NMIs; on arm64 nothing may fault in a handler that runs with interrupts
/// masked). The wrapper makes that promise explicit at the type level, as the
/// `cpu_stop_nmisafe_fn_t` of Chang S. Bae, "stop_machine: Add NMI-based execution
/// path" (LKML, 2026) does.
#[derive(Clone, Copy)]
pub struct NmiSafe<'a>(
    // Read only by the NMI path.
    #[cfg_attr(not(feature = "stop-machine-nmi"), allow(dead_code))] pub(super) StopFn<'a>,
);

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

/// How long an active CPU waits for its own NMI before giving up (the NMI path of
/// Chang S. Bae's "stop_machine: Add NMI-based execution path" waits one second).
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
    /// mask them ([`Arch::mask_all`](super::Arch::mask_all)). The only level safe for
    /// patching code that NMI handlers run: no handler can start inside the window.
    All,
    /// Normal interrupts only ([`Arch::mask_irqs`](super::Arch::mask_irqs)): NMIs still
    /// arrive. This is Linux's `stop_machine` (`local_irq_disable`), and what NMI
    /// execution needs.
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

/// Where the calling CPU runs, as [`Arch::call_context`](super::Arch::call_context)
/// reports it. A stop may start only from [`CallContext::Normal`]: its initiator waits
/// for the machine with interrupts on, answering the holder's stop IPI, and then for
/// every other CPU, which an interrupted initiator may be keeping from arriving (Linux:
/// `stop_machine` may sleep, so it is refused in atomic context).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallContext {
    /// Normal code with interrupts enabled.
    Normal,
    /// Normal code with interrupts masked: the caller cannot take the stop IPI of
    /// another initiator it waits for.
    IrqsMasked,
    /// An interrupt or exception handler: the interrupted code may hold what the stop
    /// needs (the stop machine's or the text's lock), and its CPU takes no stop IPI.
    Irq,
    /// An NMI handler: it may have interrupted this CPU inside a stop.
    Nmi,
}

impl fmt::Display for CallContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CallContext::Normal => "normal context",
            CallContext::IrqsMasked => "code with interrupts masked",
            CallContext::Irq => "an interrupt or exception handler",
            CallContext::Nmi => "an NMI handler",
        })
    }
}

/// Why [`StopMachine::stop_machine`](super::StopMachine::stop_machine) failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopError {
    /// `active` was empty or named CPUs that are not online. Nothing ran.
    InvalidCpus {
        /// The set asked for.
        requested: CpuSet,
        /// The online CPUs at the time of the call.
        online: CpuSet,
    },
    /// A lock the call needs stayed held for the whole arrival timeout: the machine
    /// (another stop-machine call) or the CPU hotplug lock (a CPU going up or down).
    Busy {
        /// The lock that stayed held, named for the message.
        lock: &'static str,
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
    /// The function took a synchronous exception on these CPUs (a call of
    /// [`stop_machine_catching_faults`](super::StopMachine::stop_machine_catching_faults)):
    /// it was abandoned there, every CPU left the rendezvous as usual.
    Faulted {
        /// Every CPU whose function faulted.
        cpus: CpuSet,
        /// The lowest of them.
        cpu: usize,
        /// Its fault.
        fault: super::StopFault,
    },
    /// Called from a context a stop cannot start from (IRQ or NMI handler, interrupts
    /// masked): refused before anything was touched, no lock taken, no IPI sent.
    WrongContext {
        /// The calling CPU.
        cpu: usize,
        /// Where it was running.
        context: CallContext,
    },
}

/// The errors returned by the stop function, one per failing CPU (never just the last).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Failures {
    pub(super) cpus: CpuSet,
    pub(super) codes: [i32; MAX_CPUS],
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

impl core::error::Error for StopError {}

/// A lock a stop call needs (the machine, the CPU hotplug lock) stayed held.
impl From<super::LockTimeout> for StopError {
    fn from(timeout: super::LockTimeout) -> Self {
        StopError::Busy {
            lock: timeout.lock,
            waited_ns: timeout.waited_ns,
        }
    }
}

impl fmt::Display for StopError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StopError::InvalidCpus { requested, online } => write!(
                f,
                "active CPUs {requested} must be a non-empty subset of the online CPUs {online}"
            ),
            StopError::Busy { lock, waited_ns } => {
                write!(f, "{lock} stayed held for {} us", waited_ns / 1000)
            }
            StopError::Timeout { missing, waited_ns } => write!(
                f,
                "CPUs {missing} did not arrive within {} us; the function did not run",
                waited_ns / 1000
            ),
            StopError::Faulted { cpus, cpu, fault } => write!(
                f,
                "stop function faulted on CPUs {cpus}; cpu{cpu}: {fault}; every CPU left"
            ),
            StopError::WrongContext { cpu, context } => write!(
                f,
                "called on cpu{cpu} from {context}: refused, nothing ran (a stop must start \
                 from normal code with interrupts enabled)"
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
