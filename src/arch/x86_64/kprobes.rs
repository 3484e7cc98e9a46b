//! kprobes on x86_64: [`KPROBES`], the system's registry, on [`X86Kprobes`].
//!
//! - Arming writes one `INT3` over the probed instruction's first byte, disarming
//!   writes the original byte back, each with `patch_machine`, not the INT3 protocol
//!   (`text_poke_bp`). Linux's `arch_arm_kprobe` (arch/x86/kernel/kprobes/core.c) writes
//!   the byte with `text_poke` and then `text_poke_sync`s every CPU. Here the stop
//!   gives what the core's contract needs and an IPI sync would not give by itself: a
//!   CPU is never inside the hit path (#BP to #DB, IF clear throughout, or inside an
//!   NMI) while it is in the rendezvous, so when the disarming write returns no CPU is
//!   still stepping in the probe's XOL slot and the slot may be reused; and a call made
//!   with IF clear is either wholly armed or wholly disarmed, so `kprobe_hammer` can
//!   count hits exactly. `text_poke_bp` itself does not fit: its #BP handler emulates
//!   the NEW instruction of a site in flight, and `INT3 + the old tail` is no
//!   instruction it could emulate.
//! - The #BP handler ([`super::traps`]) tries the INT3 protocol's sites first, then
//!   `on_int3`, else reports the breakpoint as unexpected. `on_int3` gives the hit
//!   to the core (which runs the pre handler), then executes the original:
//!   - emulated on the frame for `JMP rel8/rel32`, `CALL rel32` (pushed into the gap
//!     the #BP entry stub leaves below the interrupted stack, as for `call_site_live`)
//!     and `Jcc rel8/rel32` (Linux's `int3_emulate_jmp`/`int3_emulate_call`/
//!     `int3_emulate_jcc`); the post handler runs at once;
//!   - otherwise single-stepped out of line: RIP goes to the probe's XOL slot with TF set
//!     and IF clear; the #DB after the one instruction (`on_debug`) puts RIP back after
//!     the original (or keeps the target of a RET/indirect JMP, fixing the return
//!     address an indirect CALL pushed), restores TF and IF, and the core runs the post
//!     handler. A RIP-relative displacement is rebased in the slot's copy.
//! - Steps in flight are a small per-CPU stack: an NMI can arrive between the #BP's
//!   IRETQ and the stepped instruction and hit a probe of its own (no self-test makes
//!   that interleaving happen on purpose). A #DB is ours only if a step is in flight on
//!   this CPU, DR6.BS says single step, and RIP is where the step's instruction leaves
//!   it (for an indirect CALL: the return address it pushed is the copy's end).
//! - The copy runs on the interrupted stack with the interrupted registers, so PUSH,
//!   POP, ENTER, LEAVE and anything else relative to RSP need no fix-up; what reads
//!   RIP is emulated, rebased (RIP-relative operands) or fixed after the step (the
//!   return address of an indirect CALL).
//! - XOL slots: one per registry slot, 16 bytes each, in `.text.kprobes.xol` (kernel
//!   text, RX; written only through the patcher's temporary alias at registration, when
//!   no CPU can execute the slot). The bytes after the copy are INT3s.
//!
//! What is not checked: whether the address is an instruction boundary. Linux decodes
//! from the function start, which it finds with kallsyms; this kernel carries no symbol
//! table, so an address inside an instruction is decoded as if an instruction began
//! there, and refused only if those bytes do not decode (see `kprobe_refusals`).
//!
//! Everything the hit path runs is in `.text.kprobes` (this file's handlers, the core's
//! hit path) or `.text.nopatch` (the entry stubs, the trap dispatch), which probes
//! refuse.

use super::frame::TrapFrame;
use super::text::KERNEL_TEXT;
use super::{STOP, X86_64, cpu, layout, paging};
use crate::MAX_CPUS;
use crate::kprobes::{
    Decoded, DecodedOf, Forbidden, ForbiddenRange, Hit, HitToken, KprobeArch, Kprobes, Unprobeable,
};
use crate::patch::x86::{self, Insn};
use crate::patch::x86_decode::{self, Execute, Fixup, IF, TF};
use crate::patch::{Patch, PatchError, Text, lock_bounded, patch_machine};
use crate::stop::{Arch, StopOptions};
use core::cell::UnsafeCell;
use core::ops::Range;

/// Probes the registry holds at once (and XOL slots).
pub const CAPACITY: usize = 16;

/// Bytes of one XOL slot: the longest instruction and at least one INT3.
const XOL_SLOT_BYTES: usize = 16;

core::arch::global_asm!(
    ".pushsection .text.kprobes.xol, \"ax\", @progbits",
    ".balign 4096",
    ".global pm_kprobe_xol",
    "pm_kprobe_xol:",
    ".fill {bytes}, 1, 0xcc",
    ".balign 4096, 0xcc",
    ".popsection",
    bytes = const CAPACITY * XOL_SLOT_BYTES,
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
    xol_area() + slot * XOL_SLOT_BYTES
}

/// The system's kprobes.
pub static KPROBES: Kprobes<X86Kprobes, CAPACITY> = Kprobes::new(X86Kprobes {
    forbidden: spin::Once::new(),
});

/// How a hit on x86 executes the original: the decoded instruction, and its XOL slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct X86Plan {
    /// The whole original instruction and how it executes.
    pub insn: x86_decode::Decoded,
    /// The XOL slot (stepped instructions only; 0 until prepared).
    pub xol: usize,
}

/// The x86_64 half of kprobes (see the module docs).
pub struct X86Kprobes {
    forbidden: spin::Once<[ForbiddenRange; 3]>,
}

/// A single step in flight: pushed by the probe's #BP, popped by its #DB.
#[derive(Clone, Copy)]
struct Step {
    /// The end of the slot's copy: where a falling-through step leaves RIP, and the
    /// return address an indirect CALL pushes.
    xol_end: u64,
    /// The end of the original instruction.
    resume: u64,
    fixup: Fixup,
    /// RFLAGS.TF and IF as the probed code had them.
    saved_flags: u64,
    /// The hit whose post handler runs after the step (`None`: a missed hit).
    token: Option<HitToken>,
}

/// Steps a CPU can have in flight at once: one of its own code, one of an NMI that
/// arrived between the #BP's IRETQ and the step, one of a probe inside that NMI's
/// handlers (counted missed), with room to spare.
const STEP_DEPTH: usize = 4;

#[repr(align(64))]
struct PerCpuSteps(UnsafeCell<([Option<Step>; STEP_DEPTH], usize)>);

// SAFETY: entry `cpu` is touched only by CPU `cpu`, from its #BP and #DB handlers with IF
// clear; a handler interrupted by an NMI whose own probe pushes and pops a step finds
// the stack as it left it (the NMI's #BP/#DB pair is balanced before the NMI returns).
unsafe impl Sync for PerCpuSteps {}

static STEPS: [PerCpuSteps; MAX_CPUS] =
    [const { PerCpuSteps(UnsafeCell::new(([None; STEP_DEPTH], 0))) }; MAX_CPUS];

/// The #BP hook: a kprobe's INT3 at `frame.rip - 1`. False if it is not a probe's.
#[unsafe(link_section = ".text.kprobes")]
pub(crate) fn on_int3(frame: &mut TrapFrame) -> bool {
    let addr = frame.rip.wrapping_sub(1) as usize;
    let (token, plan) = match KPROBES.hit(addr, frame) {
        Hit::NotOurs => return false,
        Hit::Handle(token, plan) => (Some(token), plan),
        Hit::Missed(plan) => (None, plan),
    };
    let execute = plan.insn.execute;
    match execute {
        Execute::Jump { target } => frame.rip = target as u64,
        Execute::Jcc { cond, target, next } => {
            let taken = x86_decode::condition_holds(cond, frame.rflags);
            frame.rip = if taken { target } else { next } as u64;
        }
        Execute::Call { target, ret } => {
            if !emulate_call(frame, target, ret) {
                return false;
            }
        }
        Execute::Step { fixup, .. } => {
            let Some(steps) = STEPS.get(cpu::current_cpu()) else {
                return false;
            };
            // SAFETY: this CPU's entry, in its #BP handler (see `PerCpuSteps`).
            let (stack, depth) = unsafe { &mut *steps.0.get() };
            let Some(free) = stack.get_mut(*depth) else {
                return false;
            };
            let xol_end = (plan.xol + usize::from(plan.insn.len)) as u64;
            *free = Some(Step {
                xol_end,
                resume: (addr + usize::from(plan.insn.len)) as u64,
                fixup,
                saved_flags: frame.rflags & (TF | IF),
                token,
            });
            *depth += 1;
            // One instruction, then #DB; nothing maskable in between.
            frame.rflags = (frame.rflags | TF) & !IF;
            frame.rip = plan.xol as u64;
            return true;
        }
    }
    if let Some(token) = token {
        KPROBES.finish(token, frame);
    }
    true
}

/// Linux's `int3_emulate_call`: push `ret` onto the interrupted stack and continue at
/// `target`. False, with nothing changed, if the slot below the interrupted RSP lies in
/// `frame` (an entry stub without the gap).
#[unsafe(link_section = ".text.kprobes")]
fn emulate_call(frame: &mut TrapFrame, target: usize, ret: usize) -> bool {
    let slot = frame.rsp.wrapping_sub(8);
    let frame_start = &raw const *frame as u64;
    let frame_end = frame_start.wrapping_add(size_of::<TrapFrame>() as u64);
    if (frame_start..frame_end).contains(&slot) {
        return false;
    }
    // SAFETY: kernel-mode #BP without IST: the interrupted stack is ours and mapped, and
    // the 8 bytes below its RSP hold nothing live (no red zone; the CPU's own frame
    // there was copied below by the entry stub, and we checked the copy does not hold
    // the slot). A CALL would write exactly this slot.
    unsafe { (slot as *mut u64).write(ret as u64) };
    frame.rsp = slot;
    frame.rip = target as u64;
    true
}

/// DR6.BS: the #DB is a single-step trap.
const DR6_BS: u64 = 1 << 14;
/// What DR6 reads with no condition recorded (its reserved bits).
const DR6_CLEAR: u64 = 0xffff_0ff0;

/// The #DB hook: the end of a kprobe's out-of-line step. False if it is not one.
#[unsafe(link_section = ".text.kprobes")]
pub(crate) fn on_debug(frame: &mut TrapFrame) -> bool {
    let dr6: u64;
    // SAFETY: reads a debug register (CPL 0); no memory is touched.
    unsafe { core::arch::asm!("mov {}, dr6", out(reg) dr6, options(nomem, nostack)) };
    // DR6's condition bits are sticky: clear them, so the next #DB reads its own.
    // SAFETY: writes DR6's architectural reset value; nothing else uses DR6.
    unsafe { core::arch::asm!("mov dr6, {}", in(reg) DR6_CLEAR, options(nomem, nostack)) };
    let Some(steps) = STEPS.get(cpu::current_cpu()) else {
        return false;
    };
    // SAFETY: this CPU's entry, in its #DB handler (see `PerCpuSteps`).
    let (stack, depth) = unsafe { &mut *steps.0.get() };
    let Some(top) = depth.checked_sub(1) else {
        return false;
    };
    let Some(step) = stack.get(top).copied().flatten() else {
        return false;
    };
    if dr6 & DR6_BS == 0 {
        return false;
    }
    match step.fixup {
        Fixup::Next if frame.rip != step.xol_end => return false,
        Fixup::Next => frame.rip = step.resume,
        Fixup::Absolute => {}
        Fixup::CallIndirect => {
            let pushed = frame.rsp as *mut u64;
            // SAFETY: the stepped CALL just pushed its return address at RSP, on the
            // interrupted (mapped, kernel) stack.
            if unsafe { pushed.read() } != step.xol_end {
                return false;
            }
            // SAFETY: as above; the slot holds the return address we replace.
            unsafe { pushed.write(step.resume) };
        }
    }
    frame.rflags = (frame.rflags & !(TF | IF)) | step.saved_flags;
    if let Some(entry) = stack.get_mut(top) {
        *entry = None;
    }
    *depth = top;
    if let Some(token) = step.token {
        KPROBES.finish(token, frame);
    }
    true
}

/// Up to [`x86_decode::MAX_INSN_LEN`] bytes of text at `addr` (fewer at its end).
fn text_bytes(addr: usize) -> ([u8; x86_decode::MAX_INSN_LEN], usize) {
    let mut bytes = [0u8; x86_decode::MAX_INSN_LEN];
    let end = layout::text().1;
    let len = end.saturating_sub(addr).min(bytes.len());
    for (i, byte) in bytes.iter_mut().take(len).enumerate() {
        // SAFETY: `addr + i` is inside kernel text (bounded by its end above), mapped
        // readable.
        *byte = unsafe { core::ptr::read_volatile((addr + i) as *const u8) };
    }
    (bytes, len)
}

// SAFETY: `write` is `patch_machine`, which writes nothing on error and returns only
// after every CPU left its rendezvous, which it entered through a maskable IPI (IF set):
// a CPU on the hit path has IF clear from the #BP to the end of its #DB (the step runs
// with IF clear) or is inside an NMI, so it cannot be in the rendezvous, and none is on
// the hit path for a removed breakpoint when `write` returns. `forbidden_ranges` covers
// the entry stubs, `.text.kprobes` (this file's hooks, the core's hit path, the XOL
// slots) and `.text.nopatch` (the trap dispatch and the rest of exception entry). The
// hit path runs in the #BP/#DB exceptions on the CPU that took them, IF clear.
unsafe impl KprobeArch for X86Kprobes {
    type Insn = Insn;
    type Frame = TrapFrame;
    type Plan = X86Plan;

    // Inlined into the hit path (`.text.kprobes`), as `tests/kernel_image.rs` checks.
    #[inline(always)]
    fn cpu_id(&self) -> usize {
        cpu::current_cpu()
    }

    fn now_ns(&self) -> u64 {
        X86_64.now_ns()
    }

    fn relax(&self) {
        X86_64.relax();
    }

    fn text_range(&self) -> Range<usize> {
        layout::text_range()
    }

    fn forbidden_ranges(&self) -> &[ForbiddenRange] {
        self.forbidden.call_once(|| {
            [
                ForbiddenRange {
                    why: Forbidden::ExceptionEntry,
                    range: layout::vectors_range(),
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
        let (bytes, len) = text_bytes(addr);
        let found = bytes.get(..len).unwrap_or(&[]);
        let unprobeable = |why| Unprobeable {
            insn: Insn::from_bytes(found.get(..found.len().min(x86::MAX_LEN)).unwrap_or(&[])),
            why,
        };
        let decoded = x86_decode::decode(addr, found).map_err(unprobeable)?;
        // A RIP-relative operand must be reachable from every slot it may get.
        let reach = [xol_slot(0), xol_slot(CAPACITY - 1)];
        if reach
            .iter()
            .any(|&xol| decoded.xol_copy(addr, xol).is_none())
        {
            return Err(unprobeable(
                "its RIP-relative operand is out of rel32 reach of the XOL slots",
            ));
        }
        let first = Insn::from_bytes(found.get(..1).unwrap_or(&[]))
            .ok_or_else(|| unprobeable("outside kernel text"))?;
        Ok(Decoded {
            insn: first,
            plan: X86Plan {
                insn: decoded,
                xol: 0,
            },
        })
    }

    fn breakpoint_for(&self, _original: Insn) -> Insn {
        x86::int3()
    }

    fn prepare(
        &self,
        slot: usize,
        addr: usize,
        decoded: &mut DecodedOf<Self>,
    ) -> Result<(), PatchError<Insn>> {
        if !matches!(decoded.plan.insn.execute, Execute::Step { .. }) {
            return Ok(());
        }
        assert!(slot < CAPACITY, "KPROBES has {CAPACITY} slots");
        let xol = xol_slot(slot);
        let text = layout::text();
        let copy = decoded
            .plan
            .insn
            .xol_copy(addr, xol)
            .ok_or(PatchError::OutsideText {
                index: 0,
                addr: xol,
                text,
            })?;
        let len = usize::from(decoded.plan.insn.len);
        let _writer = lock_bounded(
            &X86_64,
            KERNEL_TEXT.writer_lock(),
            StopOptions::DEFAULT.arrival_timeout_ns,
        )?;
        let mut slot_bytes = [x86::INT3; XOL_SLOT_BYTES];
        slot_bytes[..len].copy_from_slice(&copy[..len]);
        // SAFETY: the slot is in kernel text (`.text.kprobes.xol`), inside one page (16-
        // byte slots in a page-aligned area); no CPU executes it: only a hit on a live
        // probe enters its slot, and the slot's previous probe was disarmed (no CPU on
        // its hit path) before the slot was released. The bytes are whole instructions
        // (the copy, then INT3s).
        unsafe { paging::poke_text(xol, &slot_bytes) };
        decoded.plan.xol = xol;
        Ok(())
    }

    fn release(&self, _slot: usize) {}

    fn write(&self, patch: Patch<Insn>) -> Result<(), PatchError<Insn>> {
        patch_machine(&STOP, &KERNEL_TEXT, &[patch], StopOptions::DEFAULT).map(|_| ())
    }
}
