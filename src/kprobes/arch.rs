//! What an architecture provides to the kprobes core: [`KprobeArch`].
//!
//! The core never names an instruction, a register or a section; it asks the
//! architecture to read and classify the probed instruction, gives it the registry slot
//! to prepare out-of-line code for, and has it write the breakpoint and the original
//! back through the architecture's own text patching. The architecture's breakpoint
//! exception handler calls back into [`Kprobes::hit`](super::Kprobes::hit) and
//! [`Kprobes::finish`](super::Kprobes::finish).

use crate::patch::{Instruction, Patch, PatchError};
use core::ops::Range;

/// Why a region of text may not carry a probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Forbidden {
    /// Exception entry and return: a breakpoint there would be taken with the state it
    /// is saving or restoring half-built.
    ExceptionEntry,
    /// The probe machinery: the breakpoint handler, the hit path, the out-of-line
    /// slots and the simulation code (a probe there would recurse without end).
    Kprobes,
    /// `.text.nopatch`: the code the stop rendezvous and the patch window run, which
    /// must not change while the patcher uses it.
    NoPatch,
}

impl Forbidden {
    /// What the region is, for error messages.
    pub const fn what(self) -> &'static str {
        match self {
            Forbidden::ExceptionEntry => "exception entry",
            Forbidden::Kprobes => "the kprobes machinery itself",
            Forbidden::NoPatch => ".text.nopatch (the rendezvous and the patch window)",
        }
    }
}

/// A region no probe may be placed in, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ForbiddenRange {
    /// Why.
    pub why: Forbidden,
    /// The addresses.
    pub range: Range<usize>,
}

/// An instruction the architecture read at a probe address and how a hit executes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decoded<I, P> {
    /// The original instruction: what the site holds while the probe is disarmed.
    pub insn: I,
    /// How a hit executes it (the architecture's own plan: step out of line, or
    /// simulate from decoded fields).
    pub plan: P,
}

/// [`Decoded`] for architecture `A`.
pub type DecodedOf<A> = Decoded<<A as KprobeArch>::Insn, <A as KprobeArch>::Plan>;

/// The instruction at a probe address cannot be probed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Unprobeable<I> {
    /// The instruction found, if it could be read as one.
    pub insn: Option<I>,
    /// Why it cannot be probed (e.g. "exclusive load: stepping it out of line breaks
    /// the exclusive monitor").
    pub why: &'static str,
}

/// The architecture half of kprobes.
///
/// # The hit protocol
///
/// The site of an armed probe holds [`breakpoint_for`](KprobeArch::breakpoint_for)'s
/// instruction. When a CPU executes it, the architecture's breakpoint exception handler,
/// with every asynchronous exception masked on that CPU:
///
/// 1. calls [`Kprobes::hit`](super::Kprobes::hit) with the breakpoint's address and the
///    trapped register frame. On [`Hit::NotOurs`](super::Hit::NotOurs) the breakpoint
///    belongs to someone else. Otherwise `hit` has run the pre handler (or counted the
///    hit missed) and hands back the probe's plan;
/// 2. executes the original instruction according to the plan: simulates it against the
///    frame, or resumes the CPU in the slot's out-of-line copy, which ends in a trap
///    (a second breakpoint, or a single step) that brings the CPU back into the handler
///    with the frame as the copy left it, its PC then moved to the instruction after
///    the probe (or wherever the instruction went);
/// 3. for [`Hit::Handle`](super::Hit::Handle) only, calls
///    [`Kprobes::finish`](super::Kprobes::finish) with the token and the frame: it runs
///    the post handler and ends the CPU's "in a probe" state. A
///    [`Hit::Missed`](super::Hit::Missed) has no post handler and no finish.
///
/// Steps 1-3 must stay in code [`forbidden_ranges`](KprobeArch::forbidden_ranges) names
/// ([`Forbidden::Kprobes`]); the core puts its own hit path in `.text.kprobes`.
///
/// # Safety
///
/// The core relies on these, and on nothing else, to keep the hit path lock-free and
/// the registry consistent:
/// - [`write`](KprobeArch::write) changes the text only through the architecture's
///   patching (which refuses `.text.nopatch` itself), and changes nothing when it
///   returns an error.
/// - When [`write`](KprobeArch::write) returns, every CPU executes the new instruction,
///   and no CPU is still anywhere in steps 1-3 for a breakpoint the write removed (arm64:
///   `patch_machine` stops every CPU with exceptions masked, and the hit path runs
///   masked; x86 likewise, the hit path running with IF clear or inside an NMI). The
///   core frees a slot right after the disarming write returns.
/// - [`forbidden_ranges`](KprobeArch::forbidden_ranges) covers every instruction the
///   breakpoint exception entry, steps 1-3 and the out-of-line slots execute, except
///   the pre and post handlers themselves.
/// - Steps 1-3 run on the CPU that took the breakpoint, masked against everything that
///   could re-enter them except a breakpoint (a probe hit inside a handler), and
///   [`cpu_id`](KprobeArch::cpu_id) is below [`MAX_CPUS`](crate::MAX_CPUS).
pub unsafe trait KprobeArch: Sync {
    /// An instruction as the architecture's patching moves it.
    type Insn: Instruction;
    /// The register frame a breakpoint exception saves; handlers receive it.
    type Frame;
    /// How a hit executes the original instruction (decoded once, at registration).
    type Plan: Copy + Send + Sync + 'static;

    /// The calling CPU's index.
    fn cpu_id(&self) -> usize;
    /// A monotonic clock, for the registry lock's bounded wait.
    fn now_ns(&self) -> u64;
    /// Between two attempts at the registry lock (the caller keeps interrupts enabled,
    /// so a holder stopping the machine can gather it).
    fn relax(&self);

    /// All of kernel text: probes elsewhere are refused.
    fn text_range(&self) -> Range<usize>;
    /// Regions of text no probe may be placed in, most specific first: the first that
    /// contains the address names the refusal.
    fn forbidden_ranges(&self) -> &[ForbiddenRange];

    /// Reads the instruction at `addr` (aligned to `Insn::ALIGN`, in text, in no
    /// forbidden range) and decides how a hit executes it. Writes nothing.
    fn decode(&self, addr: usize) -> Result<DecodedOf<Self>, Unprobeable<Self::Insn>>;

    /// What the site holds while armed, in place of `original` (arm64: `BRK #imm`; x86:
    /// `INT3`, where `original` is the instruction's first byte alone).
    fn breakpoint_for(&self, original: Self::Insn) -> Self::Insn;

    /// Makes the plan ready for registry slot `slot` (arm64: writes the out-of-line copy
    /// of the original and its return trap into the slot's XOL bytes, with cache
    /// maintenance). Called before the site is first armed, under the registry lock; no
    /// CPU executes the slot meanwhile. An error refuses the registration.
    fn prepare(
        &self,
        slot: usize,
        addr: usize,
        decoded: &mut Decoded<Self::Insn, Self::Plan>,
    ) -> Result<(), PatchError<Self::Insn>>;

    /// Slot `slot` is no longer used (its probe's site was restored).
    fn release(&self, slot: usize);

    /// Writes one site: the breakpoint over the original (arming) or back (disarming).
    /// See the trait's safety contract for what must hold when it returns.
    fn write(&self, patch: Patch<Self::Insn>) -> Result<(), PatchError<Self::Insn>>;
}
