//! The arch-free stop-machine core: Linux's `multi_cpu_stop` state machine, shortened.
//!
//! One CPU (the *initiator*) calls [`StopMachine::stop_machine`]; every other online CPU
//! (a *joiner*) is pulled in by a stop IPI and runs the same loop from its IPI handler.
//! A call has three phases, and each opens only when every CPU it waits for has
//! acknowledged the one before:
//!
//! | phase    | who acknowledges | each CPU does                                        | opened by                                  |
//! |----------|------------------|------------------------------------------------------|--------------------------------------------|
//! | `Arrive` | every joiner     | masks every asynchronous exception, records that, acknowledges; the initiator masks last, once it has gathered all the others | the initiator's stop IPI |
//! | `Run`    | the active CPUs  | active CPUs run the function; the others only wait   | the initiator, right after it masked |
//! | `Exit`   | nobody           | context synchronisation (ISB), unmask, leave         | the initiator, once it gathered every active CPU's `Ran` |
//!
//! Linux needs four hand-offs (`PREPARE`, `DISABLE_IRQ`, `RUN`, `EXIT`) because its
//! stopper threads arrive with interrupts on and must keep serving them until everyone
//! is there. Here a joiner arrives in an interrupt handler, already unable to take a
//! normal interrupt, so it masks on arrival: its acknowledgement is both "here" and
//! "quiescent". The initiator, the one CPU that arrives with interrupts on, keeps them
//! on while it waits for the others and masks last, so it opens `Run` itself without a
//! cross-CPU hand-off. `Exit` is a release, not a rendezvous: nothing that a
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
//! Every function the rendezvous runs is placed in `.text.nopatch`: the code of a call
//! is never a valid patch target.
//!
//! The shared state scales to [`MAX_CPUS`](crate::MAX_CPUS): a `generation | phase`
//! control word that only the initiator writes (every phase change is one
//! store-release), and one cache line per CPU that only that CPU writes (its
//! `generation | progress` acknowledgement, result and evidence). A joiner's work per
//! call is constant; the initiator reads each participant's line once: O(N). Ordering
//! argument and costs: `state.rs`, and "The scalable rendezvous state" in
//! docs/porting.md.
//!
//! | file            | what                                                              |
//! |-----------------|-------------------------------------------------------------------|
//! | `api.rs`        | the stop function's types, [`StopOptions`], [`StopError`]         |
//! | `state.rs`      | the control word (generation, phase) and the per-CPU slots        |
//! | `rendezvous.rs` | [`StopMachine`]: publishing a call, the three phases, the waits   |
//! | `nmi.rs`        | the NMI path: `stop_machine_nmi`, `handle_nmi`, NMIs held for `stop_machine_nmi_free` |
//! | `fault.rs`      | [`StopFault`]: stop functions that fault, caught where the arch can |
//! | `evidence.rs`   | [`Quiescence`], the masked-window witness, [`CallProfile`]        |
//! | `lock.rs`       | [`lock_within`], the one bounded wait for a spin lock             |
//! | `hotplug.rs`    | [`CpuHotplugLock`]: every call holds its read side, CPU hotplug its write side |
//! | `arch.rs`       | [`Arch`], what the core asks of an architecture                   |
//! | `context.rs`    | [`ContextStates`]: per-CPU user/kernel state words, deferred sync  |

mod api;
mod arch;
mod context;
mod evidence;
mod fault;
mod hotplug;
mod lock;
#[cfg(feature = "stop-machine-nmi")]
mod nmi;
mod rendezvous;
mod state;

pub use api::{
    CallContext, ETIMEDOUT, Failures, MaskLevel, NMI_TIMEOUT_NS, NmiSafe, StopError, StopFn,
    StopFnResult, StopFunction, StopOptions,
};
pub use arch::Arch;
#[cfg(feature = "stop-machine-nmi")]
pub use arch::NmiArch;
pub use context::{ContextStates, Deferred, PENDING, StopStillOpen, USER};
pub use evidence::{CallProfile, Quiescence};
pub use fault::{EFAULT, StopFault};
pub use hotplug::{CpuHotplugLock, CpusReadGuard, CpusWriteGuard};
pub use lock::{LockTimeout, TryLock, lock_within};
#[cfg(feature = "stop-machine-nmi")]
pub use nmi::RaiseNmi;
pub use rendezvous::StopMachine;
