//! Kernel probes: a breakpoint on (almost) any kernel instruction that runs a handler
//! before and after it, then lets the instruction execute as if never probed.
//!
//! This is the arch-free core: the registry ([`Kprobes`]), the refusals
//! ([`KprobeError`]), the counters, the per-CPU "inside a probe" state, and the hit path
//! the architecture's breakpoint handler calls ([`Kprobes::hit`], [`Kprobes::finish`]).
//! The architecture reads and classifies instructions, prepares their out-of-line
//! copies, and writes the breakpoints through its own patching ([`KprobeArch`]): arm64
//! with `patch_machine`, since no architected pair makes an arbitrary instruction into
//! `BRK` safely under a running CPU (Mark Rutland, "arm64: ensure CPUs are quiescent
//! before patching", linux-arm-kernel, 2021); x86 also with `patch_machine`, of one
//! INT3 byte over the first (see `src/arch/x86_64/kprobes.rs` for why not the INT3
//! protocol).
//!
//! Every function of the hit path lives in `.text.kprobes`, which the architecture
//! reports as [`Forbidden::Kprobes`]: a probe there would trap inside its own handling.
//!
//! ```
//! use patch_machine::arch::host::kprobes::{HostFrame, HostKprobeArch};
//! use patch_machine::kprobes::{KprobeError, Kprobes, ProbeHit};
//! use patch_machine::patch::insn;
//! use std::sync::atomic::{AtomicU64, Ordering};
//!
//! static PRE_RAN: AtomicU64 = AtomicU64::new(0);
//! fn pre(_hit: &ProbeHit, _frame: &mut HostFrame) {
//!     PRE_RAN.fetch_add(1, Ordering::Relaxed);
//! }
//!
//! // One CPU, text `MOVZ X0, #1; RET`.
//! let arch = HostKprobeArch::new(1, &[insn::movz_x(0, 1, 0)?, insn::RET]);
//! let probes: Kprobes<HostKprobeArch> = Kprobes::new(arch);
//! let (site, ret) = (probes.arch().text().addr(0), probes.arch().text().addr(1));
//!
//! let id = probes.register_kprobe(site, Some(pre), None)?;
//! assert_eq!(probes.arch().text().word(0), probes.arch().breakpoint());
//! probes.arch().run(&probes, site); // the CPU executes the probed instruction
//! assert_eq!((PRE_RAN.load(Ordering::Relaxed), probes.stats(id)?.hits), (1, 1));
//!
//! // RET cannot be stepped out of line on the host: refused, text unchanged.
//! let refused = probes.register_kprobe(ret, Some(pre), None);
//! assert!(matches!(refused, Err(KprobeError::Unprobeable { .. })));
//! assert_eq!(probes.arch().text().word(1), insn::RET);
//!
//! probes.unregister_kprobe(id)?;
//! assert_eq!(probes.arch().text().word(0), insn::movz_x(0, 1, 0)?);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod arch;
mod error;
mod hit;
mod registry;

pub use arch::{Decoded, DecodedOf, Forbidden, ForbiddenRange, KprobeArch, Unprobeable};
pub use error::KprobeError;
pub use hit::{Hit, HitToken};
pub use registry::{Kprobes, REGISTRY_LOCK_TIMEOUT_NS};

use core::fmt;

/// A pre or post handler: runs on the CPU that hit the probe, with every asynchronous
/// exception masked, with the register frame of the probed instruction (before it for
/// `pre`, after it for `post`). A probe hit inside it is counted missed. It may change
/// registers of the frame but not where the CPU resumes (the original instruction still
/// executes, from the probed address).
pub type Handler<F> = fn(&ProbeHit, &mut F);

/// Names a registered probe; refused once the probe is unregistered (the slot's
/// generation moved on), even if its slot was reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ProbeId {
    slot: u32,
    generation: u32,
}

impl fmt::Display for ProbeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "kprobe {}.{}", self.slot, self.generation)
    }
}

/// What a handler is told about the hit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbeHit {
    /// The probe.
    pub id: ProbeId,
    /// The probed address.
    pub addr: usize,
    /// The CPU that hit it.
    pub cpu: usize,
}

/// A probe's counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbeStats {
    /// The probe.
    pub id: ProbeId,
    /// The probed address.
    pub addr: usize,
    /// The site holds the breakpoint.
    pub armed: bool,
    /// Hits that ran the handlers.
    pub hits: u64,
    /// Hits inside a probe's handlers, which ran no handler.
    pub missed: u64,
}
