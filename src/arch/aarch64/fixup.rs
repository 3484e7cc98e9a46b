//! The aarch64 half of the fixup point of [`crate::stop::Arch::call_catching_faults`]
//! (the arch-free half, arming and result decoding, is `src/arch/fault_fixup.rs`).
//!
//! `pm_call_with_fixup` saves the callee-saved state (x19-x30, SP, d8-d15) and its
//! resume address in the `Context` on the caller's stack, then calls the function.
//! While this CPU's fixup point is armed, the exception handler ([`super::exceptions`])
//! offers it every synchronous exception it would otherwise report as fatal
//! (`resume_from_fault`): the point is disarmed, the fault recorded, and the exception
//! returns to the resume address with x0 = the context; there the saved state comes
//! back and `pm_call_with_fixup` returns `FAULTED` (`i64::MIN`). The exception return
//! restores SPSR, so the CPU resumes with the masks the function ran with.

use super::cpu;
use crate::arch::fault_fixup::{Context, FixupPoints};
use crate::stop::{StopFault, StopFnResult, StopFunction};
use core::arch::global_asm;

/// The words `pm_call_with_fixup` saves: x19-x28, x29 (FP), x30 (LR) at offsets 0-88,
/// SP at 96, d8-d15 (the callee-saved FP/SIMD state) at 104-160.
const SAVED: usize = 21;
const _: () = assert!(Context::<SAVED>::RESUME_OFFSET == 168);

static POINTS: FixupPoints<SAVED> = FixupPoints::new();

global_asm!(
    r#"
    .pushsection .text.nopatch, "ax"
    .balign 4
    .global pm_call_with_fixup
    .type pm_call_with_fixup, %function
// i64 pm_call_with_fixup(struct Context<SAVED> *ctx, i64 (*f)(usize), usize arg)
pm_call_with_fixup:
    stp     x19, x20, [x0, #0]
    stp     x21, x22, [x0, #16]
    stp     x23, x24, [x0, #32]
    stp     x25, x26, [x0, #48]
    stp     x27, x28, [x0, #64]
    stp     x29, x30, [x0, #80]
    mov     x9, sp
    str     x9, [x0, #96]
    stp     d8, d9, [x0, #104]
    stp     d10, d11, [x0, #120]
    stp     d12, d13, [x0, #136]
    stp     d14, d15, [x0, #152]
    adr     x9, 1f
    str     x9, [x0, #168]
    stp     x29, x30, [sp, #-16]!
    mov     x29, sp
    mov     x9, x1
    mov     x0, x2
    blr     x9
    ldp     x29, x30, [sp], #16
    ret
1:  // From the exception handler: x0 = ctx.
    ldp     x19, x20, [x0, #0]
    ldp     x21, x22, [x0, #16]
    ldp     x23, x24, [x0, #32]
    ldp     x25, x26, [x0, #48]
    ldp     x27, x28, [x0, #64]
    ldp     x29, x30, [x0, #80]
    ldr     x9, [x0, #96]
    mov     sp, x9
    ldp     d8, d9, [x0, #104]
    ldp     d10, d11, [x0, #120]
    ldp     d12, d13, [x0, #136]
    ldp     d14, d15, [x0, #152]
    movz    x0, #0x8000, lsl #48
    ret
    .size pm_call_with_fixup, . - pm_call_with_fixup
    .popsection
"#
);

unsafe extern "C" {
    fn pm_call_with_fixup(
        ctx: *mut core::ffi::c_void,
        f: extern "C" fn(usize) -> i64,
        arg: usize,
    ) -> i64;
}

/// Runs `function` with this CPU's fixup point armed.
///
/// # Safety
/// As [`crate::stop::Arch::call_catching_faults`].
#[unsafe(link_section = ".text.nopatch")]
pub(super) unsafe fn call_catching_faults(
    cpu: usize,
    function: &dyn StopFunction,
) -> Result<StopFnResult, StopFault> {
    // SAFETY: forwarded from the caller; `pm_call_with_fixup` lays out `SAVED` words.
    unsafe { POINTS.call_catching_faults(cpu, function, pm_call_with_fixup) }
}

/// Offered a synchronous exception the handler would report as fatal: if this CPU's
/// fixup point is armed, disarms it, records `fault`, and returns the address to resume
/// at and the value for x0 (the context). Runs in the exception handler, everything
/// masked.
#[unsafe(link_section = ".text.nopatch")]
#[inline(always)]
pub(super) fn resume_from_fault(fault: StopFault) -> Option<(u64, u64)> {
    POINTS.resume_from_fault(cpu::current_cpu(), fault)
}
