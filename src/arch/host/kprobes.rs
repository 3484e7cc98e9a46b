//! kprobes on the host: [`HostKprobeArch`] implements [`KprobeArch`] over [`HostText`],
//! arming with the real `patch_machine` on [`HostArch`] CPUs (threads), so that
//! `cargo test` drives the registry, the refusals and the hit path.
//!
//! A host CPU cannot execute A64 code: [`HostKprobeArch::run`] plays a CPU executing one
//! word. A word that is the kprobe breakpoint takes the hit path; the "out-of-line"
//! execution of the original records it in the frame and moves the PC on.

use super::{HostArch, HostText};
use crate::kprobes::{Decoded, Forbidden, ForbiddenRange, Hit, KprobeArch, Kprobes, Unprobeable};
use crate::patch::insn::{self, Insn, InsnClass};
use crate::patch::{Patch, PatchError, Text, patch_machine};
use crate::stop::{Arch, StopMachine, StopOptions};
use std::ops::Range;
use std::sync::Arc;

/// The `BRK` immediate the host's kprobes arm with (the same as arm64's).
pub const KPROBE_BRK_IMM: u16 = 0x004;

/// BR, BLR and RET: an indirect branch (Rn in bits 5..10 masked out with the opcode's
/// bits 21-22).
const INDIRECT_BRANCH_MASK: Insn = 0xff9f_fc1f;
const INDIRECT_BRANCH: Insn = 0xd61f_0000;

/// The registers a host "CPU" has at a probed instruction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostFrame {
    /// Where the CPU is.
    pub pc: usize,
    /// General registers, free for handlers to use.
    pub x: [u64; 8],
    /// The last original instruction executed on the hit path (0 if none).
    pub stepped: Insn,
}

/// How the host executes a probed word: there is one way, recording it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostPlan {
    insn: Insn,
}

/// The host's half of kprobes: a machine of `cpus` threads and its text.
pub struct HostKprobeArch {
    stop: Arc<StopMachine<HostArch>>,
    text: HostText,
    forbidden: Vec<ForbiddenRange>,
}

impl HostKprobeArch {
    /// `cpus` host CPUs and text holding `words`, nothing forbidden. Binds the calling
    /// thread as CPU 0.
    pub fn new(cpus: usize, words: &[Insn]) -> Self {
        Self::with_forbidden(cpus, words, &[])
    }

    /// As [`new`](Self::new), with regions (word indices) no probe may use. A
    /// [`Forbidden::NoPatch`] region is also protected from patching, as
    /// `.text.nopatch` is.
    pub fn with_forbidden(
        cpus: usize,
        words: &[Insn],
        forbidden: &[(Forbidden, Range<usize>)],
    ) -> Self {
        let stop = Arc::new(StopMachine::new(HostArch::new(cpus)));
        HostArch::connect(&stop);
        stop.arch().bind_current_thread(0);
        let protected = forbidden
            .iter()
            .find(|(why, _)| *why == Forbidden::NoPatch)
            .map_or(0..0, |(_, words)| words.clone());
        let text = HostText::with_protected(words, protected);
        let forbidden = forbidden
            .iter()
            .map(|(why, words)| ForbiddenRange {
                why: *why,
                range: text.addr(words.start)..text.addr(words.end),
            })
            .collect();
        HostKprobeArch {
            stop,
            text,
            forbidden,
        }
    }

    /// The stop machine the probes arm through (its CPUs must take stop IPIs: see
    /// [`HostArch::poll_interrupts`]).
    pub fn stop(&self) -> &Arc<StopMachine<HostArch>> {
        &self.stop
    }

    /// The text probes are placed in.
    pub fn text(&self) -> &HostText {
        &self.text
    }

    /// What an armed site holds.
    pub fn breakpoint(&self) -> Insn {
        insn::brk(KPROBE_BRK_IMM)
    }

    /// The calling CPU executes the word at `addr`, as the arm64 BRK handler would if
    /// it is the kprobe breakpoint; returns the frame after it.
    ///
    /// # Panics
    /// On a kprobe breakpoint no probe claims (an "unexpected exception").
    pub fn run<const N: usize>(&self, probes: &Kprobes<Self, N>, addr: usize) -> HostFrame {
        let mut frame = HostFrame {
            pc: addr,
            ..HostFrame::default()
        };
        if Text::read_insn(&self.text, addr, 4) != self.breakpoint() {
            frame.pc += 4;
            return frame;
        }
        match probes.hit(addr, &mut frame) {
            Hit::NotOurs => panic!("unexpected BRK #{KPROBE_BRK_IMM:#x} at {addr:#x}"),
            Hit::Handle(token, plan) => {
                step(plan, &mut frame);
                probes.finish(token, &mut frame);
            }
            Hit::Missed(plan) => step(plan, &mut frame),
        }
        frame
    }
}

fn step(plan: HostPlan, frame: &mut HostFrame) {
    frame.stepped = plan.insn;
    frame.pc += 4;
}

// SAFETY: `write` is `patch_machine`, which changes nothing on error and returns only
// after every host CPU left the rendezvous (so none is inside `run` for a removed
// breakpoint: `run` does not poll interrupts); `run` is the only hit path and runs on the
// calling thread's CPU.
unsafe impl KprobeArch for HostKprobeArch {
    type Insn = Insn;
    type Frame = HostFrame;
    type Plan = HostPlan;

    fn cpu_id(&self) -> usize {
        self.stop.arch().cpu_id()
    }

    fn now_ns(&self) -> u64 {
        self.stop.arch().now_ns()
    }

    fn relax(&self) {
        self.stop.arch().relax();
    }

    fn text_range(&self) -> Range<usize> {
        self.text.text_range()
    }

    fn forbidden_ranges(&self) -> &[ForbiddenRange] {
        &self.forbidden
    }

    fn decode(&self, addr: usize) -> Result<Decoded<Insn, HostPlan>, Unprobeable<Insn>> {
        let insn = Text::read_insn(&self.text, addr, 4);
        let why = match insn::classify(insn) {
            InsnClass::Brk => Some("a breakpoint belongs to whoever placed it"),
            InsnClass::B | InsnClass::Bl | InsnClass::BCond => {
                Some("the host cannot simulate PC-relative branches")
            }
            _ if insn & INDIRECT_BRANCH_MASK == INDIRECT_BRANCH => {
                Some("the host cannot simulate indirect branches")
            }
            _ => None,
        };
        match why {
            Some(why) => Err(Unprobeable {
                insn: Some(insn),
                why,
            }),
            None => Ok(Decoded {
                insn,
                plan: HostPlan { insn },
            }),
        }
    }

    fn breakpoint_for(&self, _original: Insn) -> Insn {
        self.breakpoint()
    }

    fn prepare(
        &self,
        _slot: usize,
        _addr: usize,
        _decoded: &mut Decoded<Insn, HostPlan>,
    ) -> Result<(), PatchError<Insn>> {
        // Plays the out-of-line slot's write (arm64: an alias map and cache maintenance):
        // it takes time, between choosing the slot and publishing the probe, which the
        // registry lock must cover.
        std::thread::sleep(std::time::Duration::from_micros(20));
        Ok(())
    }

    fn release(&self, _slot: usize) {}

    fn write(&self, patch: Patch<Insn>) -> Result<(), PatchError<Insn>> {
        patch_machine(&self.stop, &self.text, &[patch], StopOptions::DEFAULT).map(|_| ())
    }
}
