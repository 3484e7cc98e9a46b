//! The fixup point of [`crate::stop::Arch::call_catching_faults`]: a `setjmp` at the
//! call and a `longjmp` from the synchronous exception handler (see `src/stop/fault.rs`
//! for the design).
//!
//! `pm_call_with_fixup` saves the callee-saved state (x19-x30, SP, d8-d15) and its
//! resume address in a `Context` on the caller's stack, then calls the function. While
//! a CPU's slot in `ARMED` points at a context, the exception handler
//! ([`super::exceptions`]) offers it every synchronous exception it would otherwise
//! report as fatal (`resume_from_fault`): the slot is disarmed, the fault recorded in
//! the context, and the exception returns to the resume address with x0 = the context;
//! there the saved state comes back and `pm_call_with_fixup` returns `FAULTED`. The
//! exception return restores SPSR, so the CPU resumes with the masks the function ran
//! with. Hand-written: no crate offers a non-local exit for a bare-metal exception.

use super::cpu;
use crate::MAX_CPUS;
use crate::stop::{StopFault, StopFnResult, StopFunction};
use core::arch::global_asm;
use core::sync::atomic::{AtomicPtr, Ordering};

/// What `pm_call_with_fixup` returns when the function faulted (no `i32` result is).
const FAULTED: i64 = i64::MIN;

/// The state saved at the call, and the fault that ended it. `#[repr(C)]`: the offsets
/// are the assembly's.
#[repr(C)]
struct Context {
    /// x19-x28, x29 (FP), x30 (LR) at the call.
    regs: [u64; 12],
    sp: u64,
    resume: u64,
    /// d8-d15 (the callee-saved FP/SIMD state).
    fp: [u64; 8],
    fault: Option<StopFault>,
}

/// Per CPU: the context of a call in flight that catches faults (null: none). Written
/// only by its own CPU, read by its own exception handler: program order.
static ARMED: [AtomicPtr<Context>; MAX_CPUS] =
    [const { AtomicPtr::new(core::ptr::null_mut()) }; MAX_CPUS];

global_asm!(
    r#"
    .pushsection .text.nopatch, "ax"
    .balign 4
    .global pm_call_with_fixup
    .type pm_call_with_fixup, %function
// i64 pm_call_with_fixup(struct Context *ctx, i64 (*f)(usize), usize arg)
pm_call_with_fixup:
    stp     x19, x20, [x0, #0]
    stp     x21, x22, [x0, #16]
    stp     x23, x24, [x0, #32]
    stp     x25, x26, [x0, #48]
    stp     x27, x28, [x0, #64]
    stp     x29, x30, [x0, #80]
    mov     x9, sp
    str     x9, [x0, #96]
    adr     x9, 1f
    str     x9, [x0, #104]
    stp     d8, d9, [x0, #112]
    stp     d10, d11, [x0, #128]
    stp     d12, d13, [x0, #144]
    stp     d14, d15, [x0, #160]
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
    ldp     d8, d9, [x0, #112]
    ldp     d10, d11, [x0, #128]
    ldp     d12, d13, [x0, #144]
    ldp     d14, d15, [x0, #160]
    movz    x0, #0x8000, lsl #48
    ret
    .size pm_call_with_fixup, . - pm_call_with_fixup
    .popsection
"#
);

const _: () = assert!(core::mem::offset_of!(Context, sp) == 96);
const _: () = assert!(core::mem::offset_of!(Context, resume) == 104);
const _: () = assert!(core::mem::offset_of!(Context, fp) == 112);

unsafe extern "C" {
    fn pm_call_with_fixup(
        ctx: *mut core::ffi::c_void,
        f: extern "C" fn(usize) -> i64,
        arg: usize,
    ) -> i64;
}

/// The function and its CPU, passed to [`trampoline`] by address.
struct Call<'a> {
    function: &'a dyn StopFunction,
    cpu: usize,
}

#[unsafe(link_section = ".text.nopatch")]
extern "C" fn trampoline(arg: usize) -> i64 {
    // SAFETY: `call_catching_faults` passes the address of a live `Call`.
    let call = unsafe { &*(arg as *const Call<'_>) };
    match call.function.call(call.cpu) {
        Ok(()) => 0,
        Err(code) => i64::from(code),
    }
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
    let Some(slot) = ARMED.get(cpu) else {
        return Ok(function.call(cpu));
    };
    let mut ctx = Context {
        regs: [0; 12],
        sp: 0,
        resume: 0,
        fp: [0; 8],
        fault: None,
    };
    let call = Call { function, cpu };
    // Relaxed: read only by this CPU's own exception handler (see `ARMED`); the
    // assembly call below is opaque to the compiler, so the store happens before it.
    slot.store(&raw mut ctx, Ordering::Relaxed);
    // SAFETY: `ctx` outlives the call; `trampoline` gets a live `Call`; the exception
    // handler resumes at the saved point only while the slot points at `ctx`, and the
    // caller guarantees the abandoned frames need no destructors.
    let result =
        unsafe { pm_call_with_fixup((&raw mut ctx).cast(), trampoline, &raw const call as usize) };
    slot.store(core::ptr::null_mut(), Ordering::Relaxed);
    // The handler wrote `fault` before resuming here: read it through the pointer the
    // compiler must assume the assembly used.
    // SAFETY: `ctx` is live and nothing else refers to it any more.
    let fault = unsafe { core::ptr::read_volatile(&raw const ctx.fault) };
    match (result, fault) {
        (FAULTED, Some(fault)) => Err(fault),
        (FAULTED, None) => Ok(Err(crate::stop::EFAULT)),
        (0, _) => Ok(Ok(())),
        (code, _) => Ok(Err(code as i32)),
    }
}

/// Offered a synchronous exception the handler would report as fatal: if this CPU's
/// fixup point is armed, disarms it, records `fault`, and returns the address to resume
/// at and the value for x0 (the context). Runs in the exception handler, everything
/// masked.
#[unsafe(link_section = ".text.nopatch")]
#[inline(always)]
pub(super) fn resume_from_fault(fault: StopFault) -> Option<(u64, u64)> {
    let slot = ARMED.get(cpu::current_cpu())?;
    // Relaxed: this CPU's own slot (see `ARMED`).
    let ctx = slot.swap(core::ptr::null_mut(), Ordering::Relaxed);
    if ctx.is_null() {
        return None;
    }
    // SAFETY: an armed slot points at the live context of the call this CPU is in
    // (`call_catching_faults` disarms it before the context goes away).
    unsafe {
        (*ctx).fault = Some(fault);
        Some(((*ctx).resume, ctx as u64))
    }
}
