//! The arch-free half of [`crate::stop::Arch::call_catching_faults`]: a `setjmp` at the
//! call and a `longjmp` from the exception handler (see `src/stop/fault.rs` for the
//! design). Each port supplies only its `pm_call_with_fixup` (assembly that saves its
//! callee-saved state into [`Context::saved`] and the resume address into
//! [`Context::resume`], then calls the function) and the exception-return half; the
//! arming, the per-CPU slots and the result decoding live here once.
//! Hand-written: no crate offers a non-local exit for a bare-metal exception.

use crate::MAX_CPUS;
use crate::stop::{EFAULT, StopFault, StopFnResult, StopFunction};
use core::sync::atomic::{AtomicPtr, Ordering};

/// What `pm_call_with_fixup` returns when the function faulted (no `i32` result is).
const FAULTED: i64 = i64::MIN;

/// The state saved at the call, and the fault that ended it. `#[repr(C)]`: the port's
/// assembly writes `saved` (its own layout) and `resume` at `8 * SAVED`.
#[repr(C)]
pub(super) struct Context<const SAVED: usize> {
    saved: [u64; SAVED],
    resume: u64,
    fault: Option<StopFault>,
}

impl<const SAVED: usize> Context<SAVED> {
    /// The offset of `resume`, which the port's assembly hard-codes.
    pub(super) const RESUME_OFFSET: usize = core::mem::offset_of!(Self, resume);
}

/// A port's `pm_call_with_fixup(ctx, f, arg)`: saves the callee-saved state and the
/// resume address in `ctx`, returns `f(arg)`, or [`FAULTED`] when the exception handler
/// resumed at the saved point.
pub(super) type CallWithFixup =
    unsafe extern "C" fn(*mut core::ffi::c_void, extern "C" fn(usize) -> i64, usize) -> i64;

/// Per CPU: the context of a call in flight that catches faults (null: none). Written
/// only by its own CPU, read by its own exception handler: program order.
pub(super) struct FixupPoints<const SAVED: usize>([AtomicPtr<Context<SAVED>>; MAX_CPUS]);

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

impl<const SAVED: usize> FixupPoints<SAVED> {
    /// No CPU armed.
    pub(super) const fn new() -> Self {
        FixupPoints([const { AtomicPtr::new(core::ptr::null_mut()) }; MAX_CPUS])
    }

    /// Runs `function` on `cpu` (the calling CPU) through `call_with_fixup`, with this
    /// CPU's fixup point armed.
    ///
    /// # Safety
    /// As [`crate::stop::Arch::call_catching_faults`]; and `call_with_fixup` is the
    /// port's `pm_call_with_fixup` for this `SAVED` layout.
    #[unsafe(link_section = ".text.nopatch")]
    #[inline(always)]
    pub(super) unsafe fn call_catching_faults(
        &self,
        cpu: usize,
        function: &dyn StopFunction,
        call_with_fixup: CallWithFixup,
    ) -> Result<StopFnResult, StopFault> {
        let Some(slot) = self.0.get(cpu) else {
            return Ok(function.call(cpu));
        };
        let mut ctx = Context {
            saved: [0; SAVED],
            resume: 0,
            fault: None,
        };
        let call = Call { function, cpu };
        // Relaxed: read only by this CPU's own exception handler (see `FixupPoints`);
        // the assembly call below is opaque to the compiler, so the store happens before.
        slot.store(&raw mut ctx, Ordering::Relaxed);
        // SAFETY: `ctx` outlives the call; `trampoline` gets a live `Call`; the exception
        // handler resumes at the saved point only while the slot points at `ctx`, and the
        // caller guarantees the abandoned frames need no destructors.
        let result =
            unsafe { call_with_fixup((&raw mut ctx).cast(), trampoline, &raw const call as usize) };
        slot.store(core::ptr::null_mut(), Ordering::Relaxed);
        // The handler wrote `fault` before resuming here: read it through the pointer the
        // compiler must assume the assembly used.
        // SAFETY: `ctx` is live and nothing else refers to it any more.
        let fault = unsafe { core::ptr::read_volatile(&raw const ctx.fault) };
        match (result, fault) {
            (FAULTED, Some(fault)) => Err(fault),
            (FAULTED, None) => Ok(Err(EFAULT)),
            (0, _) => Ok(Ok(())),
            (code, _) => Ok(Err(code as i32)),
        }
    }

    /// Offered an exception the handler would report as fatal on `cpu` (the calling
    /// CPU): if its fixup point is armed, disarms it, records `fault`, and returns the
    /// address to resume at and the value for the port's first argument register (the
    /// context). Runs in the exception handler, interrupts masked.
    #[unsafe(link_section = ".text.nopatch")]
    #[inline(always)]
    pub(super) fn resume_from_fault(&self, cpu: usize, fault: StopFault) -> Option<(u64, u64)> {
        let slot = self.0.get(cpu)?;
        // Relaxed: this CPU's own slot (see `FixupPoints`).
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
}
