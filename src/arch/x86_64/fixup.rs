//! The fixup point of [`crate::stop::Arch::call_catching_faults`]: a `setjmp` at the
//! call and a `longjmp` from the trap dispatcher (see `src/stop/fault.rs` for the
//! design).
//!
//! `pm_call_with_fixup` saves the callee-saved state (RBX, RBP, R12-R15, RSP; the target
//! is soft-float, so no vector state) and its resume address in a `Context` on the
//! caller's stack, then calls the function. While a CPU's slot in `ARMED` points at a
//! context, the trap dispatcher ([`super::traps`]) offers it every exception it would
//! otherwise report as fatal (`resume_from_fault`): the slot is disarmed, the fault
//! recorded in the context, and IRETQ returns to the resume address with RAX = the
//! context; there the saved state comes back and `pm_call_with_fixup` returns
//! `FAULTED`. IRETQ restores RFLAGS, so the CPU resumes with the IF the function ran
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
    /// RBX, RBP, R12, R13, R14, R15 at the call.
    regs: [u64; 6],
    /// RSP at the call (pointing at the return address).
    sp: u64,
    resume: u64,
    fault: Option<StopFault>,
}

/// Per CPU: the context of a call in flight that catches faults (null: none). Written
/// only by its own CPU, read by its own trap dispatcher: program order.
static ARMED: [AtomicPtr<Context>; MAX_CPUS] =
    [const { AtomicPtr::new(core::ptr::null_mut()) }; MAX_CPUS];

global_asm!(
    r#"
    .pushsection .text.nopatch, "ax"
    .balign 16
    .global pm_call_with_fixup
    .type pm_call_with_fixup, @function
// i64 pm_call_with_fixup(struct Context *ctx, i64 (*f)(usize), usize arg)
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

const _: () = assert!(core::mem::offset_of!(Context, sp) == 48);
const _: () = assert!(core::mem::offset_of!(Context, resume) == 56);

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
        regs: [0; 6],
        sp: 0,
        resume: 0,
        fault: None,
    };
    let call = Call { function, cpu };
    // Relaxed: read only by this CPU's own trap dispatcher (see `ARMED`); the
    // assembly call below is opaque to the compiler, so the store happens before it.
    slot.store(&raw mut ctx, Ordering::Relaxed);
    // SAFETY: `ctx` outlives the call; `trampoline` gets a live `Call`; the exception
    // dispatcher resumes at the saved point only while the slot points at `ctx`, and the
    // caller guarantees the abandoned frames need no destructors.
    let result =
        unsafe { pm_call_with_fixup((&raw mut ctx).cast(), trampoline, &raw const call as usize) };
    slot.store(core::ptr::null_mut(), Ordering::Relaxed);
    // The dispatcher wrote `fault` before resuming here: read it through the pointer the
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
/// at and the value for RAX (the context). Runs in the trap dispatcher, IF clear.
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
