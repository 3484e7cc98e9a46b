//! The x86_64 half of the fixup point of [`crate::stop::Arch::call_catching_faults`]
//! (the arch-free half, arming and result decoding, is `src/arch/fault_fixup.rs`).
//!
//! `pm_call_with_fixup` saves the callee-saved state (RBX, RBP, R12-R15, RSP; the target
//! is soft-float, so no vector state) and its resume address in the `Context` on the
//! caller's stack, then calls the function. While this CPU's fixup point is armed, the
//! trap dispatcher ([`super::traps`]) offers it every exception it would otherwise
//! report as fatal (`resume_from_fault`): the point is disarmed, the fault recorded,
//! and IRETQ returns to the resume address with RAX = the context; there the saved
//! state comes back and `pm_call_with_fixup` returns `FAULTED` (`i64::MIN`). IRETQ
//! restores RFLAGS, so the CPU resumes with the IF the function ran with.

use super::cpu;
use crate::arch::fault_fixup::{Context, FixupPoints};
use crate::stop::{StopFault, StopFnResult, StopFunction};
use core::arch::global_asm;

/// The words `pm_call_with_fixup` saves: RBX, RBP, R12, R13, R14, R15 at offsets 0-40,
/// RSP at the call (pointing at the return address) at 48.
const SAVED: usize = 7;
const _: () = assert!(Context::<SAVED>::RESUME_OFFSET == 56);

static POINTS: FixupPoints<SAVED> = FixupPoints::new();

global_asm!(
    r#"
    .pushsection .text.nopatch, "ax"
    .balign 16
    .global pm_call_with_fixup
    .type pm_call_with_fixup, @function
// i64 pm_call_with_fixup(struct Context<SAVED> *ctx, i64 (*f)(usize), usize arg)
pm_call_with_fixup:
    mov     [rdi + 0], rbx
    mov     [rdi + 8], rbp
    mov     [rdi + 16], r12
    mov     [rdi + 24], r13
    mov     [rdi + 32], r14
    mov     [rdi + 40], r15
    mov     [rdi + 48], rsp
    lea     rax, [rip + 2f]
    mov     [rdi + 56], rax
    mov     rax, rsi
    mov     rdi, rdx
    sub     rsp, 8
    call    rax
    add     rsp, 8
    ret
2:  // From the trap dispatcher: rax = ctx.
    mov     rbx, [rax + 0]
    mov     rbp, [rax + 8]
    mov     r12, [rax + 16]
    mov     r13, [rax + 24]
    mov     r14, [rax + 32]
    mov     r15, [rax + 40]
    mov     rsp, [rax + 48]
    movabs  rax, 0x8000000000000000
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

/// Offered an exception the handler would report as fatal: if this CPU's
/// fixup point is armed, disarms it, records `fault`, and returns the address to resume
/// at and the value for RAX (the context). Runs in the trap dispatcher, IF clear.
#[unsafe(link_section = ".text.nopatch")]
#[inline(always)]
pub(super) fn resume_from_fault(fault: StopFault) -> Option<(u64, u64)> {
    POINTS.resume_from_fault(cpu::current_cpu(), fault)
}
