//! The kernel's counters with FEAT_LSE atomics where the CPU has them: `STADD`/`STADDL`
//! replace the LDXR/STXR loop through alternatives (Linux's `ARM64_HAS_LSE_ATOMICS`).
//! Without LSE every contended increment may retry; with it the update is one
//! instruction performed near memory.
//!
//! Each function is `#[inline(never)]`, so it holds exactly one site, and its class
//! follows where it lives: [`add_relaxed_nopatch`] runs in IRQ dispatch, inside
//! `.text.nopatch`, so it is a boot alternative; [`add_release`] is a runtime one.
//! Hand-written because Rust's atomics on `aarch64-unknown-none` (`+v8a`) are LL/SC
//! only, and choosing per CPU at run time is what alternatives are for.

use super::cpu::FEATURE_LSE;
use core::sync::atomic::{AtomicU32, AtomicU64};

/// `counter += value`, relaxed. Lives in `.text.nopatch` (the IRQ path counts SGIs with
/// it), so its site is a boot alternative.
#[inline(never)]
#[unsafe(link_section = ".text.nopatch")]
pub fn add_relaxed_nopatch(counter: &AtomicU64, value: u64) {
    // SAFETY: an atomic read-modify-write of `counter`, which is a valid, aligned
    // `AtomicU64` for the whole call; both variants store `old + value` exactly once.
    unsafe {
        alternative!(boot,
            orig: "0: ldxr {old}, [{ptr}]\n\
                   add {old}, {old}, {val}\n\
                   stxr {status:w}, {old}, [{ptr}]\n\
                   cbnz {status:w}, 0b",
            repl: ".arch_extension lse\n\
                   stadd {val}, [{ptr}]\n\
                   nop\n\
                   nop\n\
                   nop",
            feature: FEATURE_LSE,
            ptr = in(reg) counter.as_ptr(),
            val = in(reg) value,
            old = out(reg) _,
            status = out(reg) _,
            options(nostack, preserves_flags)
        )
    }
}

/// `counter += value` with Release ordering (what every store before it is published
/// by). A runtime alternative: applied through `patch_machine`.
#[inline(never)]
pub fn add_release(counter: &AtomicU32, value: u32) {
    // SAFETY: as for `add_relaxed_nopatch`; STLXR and STADDL both give the store
    // release semantics, so the ordering the caller asked for holds either way.
    unsafe {
        alternative!(runtime,
            orig: "0: ldxr {old:w}, [{ptr}]\n\
                   add {old:w}, {old:w}, {val:w}\n\
                   stlxr {status:w}, {old:w}, [{ptr}]\n\
                   cbnz {status:w}, 0b",
            repl: ".arch_extension lse\n\
                   staddl {val:w}, [{ptr}]\n\
                   nop\n\
                   nop\n\
                   nop",
            feature: FEATURE_LSE,
            ptr = in(reg) counter.as_ptr(),
            val = in(reg) value,
            old = out(reg) _,
            status = out(reg) _,
            options(nostack, preserves_flags)
        )
    }
}
