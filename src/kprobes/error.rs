//! Why a kprobe operation was refused: [`KprobeError`]. Every refusal happens before
//! the text changes.

use super::ProbeId;
use super::arch::{Forbidden, Unprobeable};
use crate::patch::{Instruction, PatchError, insn::Insn};
use core::fmt;

/// Why [`Kprobes`](super::Kprobes) refused an operation; the text is as it was.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KprobeError<I: Instruction = Insn> {
    /// The address is not aligned to an instruction boundary.
    Misaligned {
        /// The address given.
        addr: usize,
        /// The alignment instructions have.
        align: usize,
    },
    /// The address is not in kernel text.
    OutsideText {
        /// The address given.
        addr: usize,
        /// Kernel text.
        text: (usize, usize),
    },
    /// The address is in a region no probe may be placed in.
    Forbidden {
        /// The address given.
        addr: usize,
        /// What the region is.
        why: Forbidden,
        /// The region.
        range: (usize, usize),
    },
    /// The instruction there cannot be probed.
    Unprobeable {
        /// The address given.
        addr: usize,
        /// The instruction and why.
        reason: Unprobeable<I>,
    },
    /// A probe is already registered at the address.
    Duplicate {
        /// The address given.
        addr: usize,
        /// The probe already there.
        existing: ProbeId,
    },
    /// Every slot of the registry is in use.
    Full {
        /// How many probes the registry holds.
        capacity: usize,
    },
    /// No probe with this id is registered (never was, or was unregistered).
    UnknownProbe(ProbeId),
    /// Another CPU held the registry for the whole bounded wait.
    Busy {
        /// How long the caller waited.
        waited_ns: u64,
    },
    /// Writing the breakpoint, the original or the out-of-line slot failed; the text is
    /// as it was before the call.
    Patch(PatchError<I>),
}

impl<I: Instruction> core::error::Error for KprobeError<I> {}

impl<I: Instruction> fmt::Display for KprobeError<I> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            KprobeError::Misaligned { addr, align } => {
                write!(f, "{addr:#x}: not on a {align}-byte instruction boundary")
            }
            KprobeError::OutsideText { addr, text } => write!(
                f,
                "{addr:#x}: outside kernel text {:#x}..{:#x}",
                text.0, text.1
            ),
            KprobeError::Forbidden { addr, why, range } => write!(
                f,
                "{addr:#x}: inside {} ({:#x}..{:#x}), which may not be probed",
                why.what(),
                range.0,
                range.1
            ),
            KprobeError::Unprobeable { addr, reason } => match reason.insn {
                Some(insn) => write!(
                    f,
                    "{addr:#x}: instruction {insn:#010x} cannot be probed: {}",
                    reason.why
                ),
                None => write!(f, "{addr:#x}: cannot be probed: {}", reason.why),
            },
            KprobeError::Duplicate { addr, existing } => {
                write!(f, "{addr:#x}: already probed by {existing}")
            }
            KprobeError::Full { capacity } => {
                write!(f, "all {capacity} kprobe slots are in use")
            }
            KprobeError::UnknownProbe(id) => write!(f, "{id}: no such probe registered"),
            KprobeError::Busy { waited_ns } => write!(
                f,
                "another CPU held the kprobe registry for {} us; nothing changed",
                waited_ns / 1000
            ),
            KprobeError::Patch(err) => write!(f, "patching failed, text unchanged: {err}"),
        }
    }
}

impl<I: Instruction> From<PatchError<I>> for KprobeError<I> {
    fn from(err: PatchError<I>) -> Self {
        KprobeError::Patch(err)
    }
}
