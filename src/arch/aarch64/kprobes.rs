//! kprobes on arm64: [`KPROBES`], the system's registry, on [`Arm64Kprobes`].
//!
//! - Arming writes `BRK #`[`KPROBE_BRK_IMM`] over the probed instruction with
//!   `patch_machine`: an arbitrary instruction and `BRK` are not a pair the Arm ARM lets
//!   change under a running CPU (B2.2.5), so every CPU is quiescent, exceptions masked,
//!   while it changes (Mark Rutland, "arm64: ensure CPUs are quiescent before patching",
//!   linux-arm-kernel, 2021). Disarming writes the original back the same way.
//! - The BRK handler (installed with [`exceptions::set_kprobe_brk_handler`] before
//!   the first breakpoint is written) gives the hit to the core,
//!   which runs the pre handler; then the original instruction runs:
//!   - simulated against the frame if it reads the PC ([`kprobes_insn`]);
//!   - otherwise out of line: the CPU resumes in the probe's XOL slot, which holds the
//!     original and `BRK #`[`KPROBE_XOL_BRK_IMM`], with D, A, I, F (and ALLINT) set in
//!     its SPSR, so nothing can interrupt the step; the second BRK restores the mask
//!     bits, resumes after the probe and has the core run the post handler.
//! - XOL slots: one per registry slot, in `.text.kprobes.xol` (kernel text, RX; the
//!   page's only writable mapping is the patcher's temporary alias). Each is written once
//!   at registration through that alias, with cache maintenance to the PoU, and never
//!   written while a CPU can execute it. Linux (arch/arm64/kernel/probes) also gives each
//!   probe its own slot, read-only and shared by all CPUs; a per-CPU slot would have to
//!   be written at every hit, from any context (NMI included), taking the alias lock.
//!
//! Everything the hit path runs is in `.text.kprobes` (this file's handler, the core's
//! hit path, the simulation) or `.text.nopatch` (the vectors), which probes refuse and
//! patching refuses ([`super::text`]'s protected ranges).

use super::exceptions::{self, KPROBE_BRK_IMM, KPROBE_XOL_BRK_IMM, TrapFrame};
use super::kprobes_insn::{self, Plan};
use super::text::KERNEL_TEXT;
use super::{Aarch64, STOP, boot, cache, cpu, layout, mmu, nmi_mode};
use crate::MAX_CPUS;
use crate::kprobes::{
    Decoded, DecodedOf, Forbidden, ForbiddenRange, Hit, HitToken, KprobeArch, Kprobes, Unprobeable,
};
use crate::patch::insn::{self, Insn};
use crate::patch::{Patch, PatchError, Text, lock_bounded, patch_machine};
use crate::stop::{Arch, StopOptions};
use core::cell::UnsafeCell;
use core::ops::Range;

/// Probes the registry holds at once (and XOL slots).
pub const CAPACITY: usize = 16;

/// Bytes of one XOL slot: the original instruction and the return BRK.
const XOL_SLOT_BYTES: usize = 8;

core::arch::global_asm!(
    ".pushsection .text.kprobes.xol, \"ax\"",
    ".balign 4096",
    ".global pm_kprobe_xol",
    "pm_kprobe_xol:",
    ".rept {words}",
    "brk #{imm}",
    ".endr",
    ".balign 4096",
    ".popsection",
    words = const CAPACITY * XOL_SLOT_BYTES / 4,
    imm = const KPROBE_XOL_BRK_IMM,
);

unsafe extern "C" {
    /// The XOL slots (above): only ever executed, and written through the alias.
    safe static pm_kprobe_xol: [u8; 0];
}

/// The first XOL slot's address.
pub fn xol_area() -> usize {
    pm_kprobe_xol.as_ptr() as usize
}

/// The address of XOL slot `slot`.
fn xol_slot(slot: usize) -> usize {
    pm_kprobe_xol.as_ptr() as usize + slot * XOL_SLOT_BYTES
}

/// The system's kprobes.
pub static KPROBES: Kprobes<Arm64Kprobes, CAPACITY> = Kprobes::new(Arm64Kprobes {
    forbidden: spin::Once::new(),
});

/// How a hit on arm64 executes the original: the decoded plan, and its XOL slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Arm64Plan {
    /// Out of line or simulated.
    pub how: Plan,
    /// The XOL slot (out of line only; 0 until prepared).
    pub xol: usize,
}

/// The arm64 half of kprobes (see the module docs).
pub struct Arm64Kprobes {
    forbidden: spin::Once<[ForbiddenRange; 3]>,
}

/// An out-of-line step in flight on a CPU: set by the probe's BRK, consumed by the
/// return BRK.
#[derive(Clone, Copy)]
struct Step {
    /// The address of the slot's return BRK (0: no step in flight).
    return_brk: usize,
    /// Where the CPU resumes after it.
    resume: u64,
    /// The SPSR mask bits the step set and the return restores.
    saved_mask: u64,
    /// The hit whose post handler runs after the step (`None`: a missed hit).
    token: Option<HitToken>,
}

#[repr(align(64))]
struct PerCpuStep(UnsafeCell<Step>);

// SAFETY: entry `cpu` is touched only by CPU `cpu`, from its BRK handler with every
// exception masked; a step is set right before the exception returns into the slot and
// consumed by the return BRK, and nothing runs on the CPU between (the step runs
// masked), so the accesses never overlap.
unsafe impl Sync for PerCpuStep {}

static STEPS: [PerCpuStep; MAX_CPUS] = [const {
    PerCpuStep(UnsafeCell::new(Step {
        return_brk: 0,
        resume: 0,
        saved_mask: 0,
        token: None,
    }))
}; MAX_CPUS];

/// The SPSR bits an out-of-line step runs with: every exception masked.
#[unsafe(link_section = ".text.kprobes")]
fn step_mask() -> u64 {
    const ALLINT: u64 = 1 << 13;
    cpu::DAIF_ALL
        | if nmi_mode::feat_nmi_in_use() {
            ALLINT
        } else {
            0
        }
}

/// The BRK hook: a kprobe's breakpoint or the return from its out-of-line step.
#[unsafe(link_section = ".text.kprobes")]
fn on_brk(frame: &mut TrapFrame) -> bool {
    match (frame.esr & 0xffff) as u16 {
        KPROBE_BRK_IMM => on_probe(frame),
        KPROBE_XOL_BRK_IMM => on_step_return(frame),
        _ => false,
    }
}

#[unsafe(link_section = ".text.kprobes")]
fn on_probe(frame: &mut TrapFrame) -> bool {
    let addr = frame.elr as usize;
    let (token, plan) = match KPROBES.hit(addr, frame) {
        Hit::NotOurs => return false,
        Hit::Handle(token, plan) => (Some(token), plan),
        Hit::Missed(plan) => (None, plan),
    };
    match plan.how {
        Plan::Simulate(sim) => {
            kprobes_insn::simulate(sim, addr as u64, frame);
            if let Some(token) = token {
                KPROBES.finish(token, frame);
            }
        }
        Plan::OutOfLine => {
            let Some(step) = STEPS.get(cpu::current_cpu()) else {
                return false;
            };
            let mask = step_mask();
            // SAFETY: this CPU's entry, in its BRK handler (see `PerCpuStep`); no step
            // is in flight (a step runs masked, so no BRK handler runs during one).
            unsafe {
                *step.0.get() = Step {
                    return_brk: plan.xol + 4,
                    resume: addr as u64 + 4,
                    saved_mask: frame.spsr & mask,
                    token,
                }
            };
            frame.spsr |= mask;
            frame.elr = plan.xol as u64;
        }
    }
    true
}

#[unsafe(link_section = ".text.kprobes")]
fn on_step_return(frame: &mut TrapFrame) -> bool {
    let Some(step) = STEPS.get(cpu::current_cpu()) else {
        return false;
    };
    // SAFETY: this CPU's entry, in its BRK handler (see `PerCpuStep`).
    let step = unsafe { &mut *step.0.get() };
    if step.return_brk == 0 || frame.elr as usize != step.return_brk {
        return false;
    }
    let mask = step_mask();
    frame.spsr = (frame.spsr & !mask) | step.saved_mask;
    frame.elr = step.resume;
    step.return_brk = 0;
    if let Some(token) = step.token.take() {
        KPROBES.finish(token, frame);
    }
    true
}

// SAFETY: `write` is `patch_machine`, which writes nothing on error and returns only
// after every CPU left its rendezvous, which it entered with every exception masked:
// a CPU on the hit path (masked from the BRK to the return, the out-of-line step
// included) cannot be in the rendezvous, so none is on it for a removed breakpoint.
// `forbidden_ranges` covers the vector table, `.text.kprobes` (the BRK hook, the core's
// hit path, the simulation, the XOL slots) and `.text.nopatch` (the rest of exception
// entry). The hit path runs in the BRK exception on the CPU that took it.
unsafe impl KprobeArch for Arm64Kprobes {
    type Insn = Insn;
    type Frame = TrapFrame;
    type Plan = Arm64Plan;

    fn cpu_id(&self) -> usize {
        cpu::current_cpu()
    }

    fn now_ns(&self) -> u64 {
        Aarch64.now_ns()
    }

    fn relax(&self) {
        Aarch64.relax();
    }

    fn text_range(&self) -> Range<usize> {
        layout::text_range()
    }

    fn forbidden_ranges(&self) -> &[ForbiddenRange] {
        self.forbidden.call_once(|| {
            let vectors = boot::vectors();
            [
                ForbiddenRange {
                    why: Forbidden::ExceptionEntry,
                    range: vectors..vectors + 0x800,
                },
                ForbiddenRange {
                    why: Forbidden::Kprobes,
                    range: layout::kprobes_range(),
                },
                ForbiddenRange {
                    why: Forbidden::NoPatch,
                    range: layout::nopatch_range(),
                },
            ]
        })
    }

    fn decode(&self, addr: usize) -> Result<DecodedOf<Self>, Unprobeable<Insn>> {
        let insn = KERNEL_TEXT.read_insn(addr, 4);
        match kprobes_insn::decode(insn) {
            Ok(how) => Ok(Decoded {
                insn,
                plan: Arm64Plan { how, xol: 0 },
            }),
            Err(why) => Err(Unprobeable {
                insn: Some(insn),
                why,
            }),
        }
    }

    fn breakpoint_for(&self, _original: Insn) -> Insn {
        insn::brk(KPROBE_BRK_IMM)
    }

    fn prepare(
        &self,
        slot: usize,
        _addr: usize,
        decoded: &mut DecodedOf<Self>,
    ) -> Result<(), PatchError<Insn>> {
        if decoded.plan.how != Plan::OutOfLine {
            return Ok(());
        }
        assert!(slot < CAPACITY, "KPROBES has {CAPACITY} slots");
        let xol = xol_slot(slot);
        let _writer = lock_bounded(
            &Aarch64,
            KERNEL_TEXT.writer_lock(),
            StopOptions::DEFAULT.arrival_timeout_ns,
        )?;
        // SAFETY: the slot is in kernel text (`.text.kprobes.xol`), both words in its
        // page (slots are 8-aligned in a page-aligned area); no CPU executes it: only a
        // hit on a live probe enters its slot, and the slot's previous probe was
        // disarmed (no CPU on its hit path) before the slot was released.
        unsafe {
            mmu::poke_text_page(&[
                (xol, decoded.insn),
                (xol + 4, insn::brk(KPROBE_XOL_BRK_IMM)),
            ])
        };
        cache::sync_icache_range(xol, xol + XOL_SLOT_BYTES);
        decoded.plan.xol = xol;
        Ok(())
    }

    fn release(&self, _slot: usize) {}

    fn write(&self, patch: Patch<Insn>) -> Result<(), PatchError<Insn>> {
        // Before the first breakpoint exists (idempotent).
        exceptions::set_kprobe_brk_handler(on_brk);
        patch_machine(&STOP, &KERNEL_TEXT, &[patch], StopOptions::DEFAULT).map(|_| ())
    }
}
