//! Time from the generic timer: the virtual counter CNTVCT_EL0 at CNTFRQ_EL0 Hz.
//!
//! Conversion to nanoseconds is `(ticks * mult) >> 32` in 128-bit arithmetic, with
//! `mult = (1e9 << 32) / freq` computed once at boot: no division (and no libcall into
//! patchable compiler-builtins code) on the paths the rendezvous uses, and no overflow
//! (ticks < 2^64, mult < 2^64 for any frequency above 0.25 Hz).
//!
//! Every CPU also enables the timer event stream, so that a `WFE` always ends within
//! about 100 us even if no `SEV` comes: wait loops built on WFE keep their timeouts.

use aarch64_cpu::asm::barrier;
use aarch64_cpu::registers::{CNTFRQ_EL0, CNTKCTL_EL1};
use core::arch::asm;
use core::sync::atomic::{AtomicU64, Ordering};
use tock_registers::interfaces::{ReadWriteable, Readable};

/// `(1e9 << 32) / CNTFRQ_EL0`; 0 until [`init`] ran (then [`now_ns`] returns 0).
static MULT: AtomicU64 = AtomicU64::new(0);

/// CNTFRQ_EL0 as read by [`init`].
static FREQ: AtomicU64 = AtomicU64::new(0);

/// Reads CNTFRQ_EL0.
fn cntfrq() -> u64 {
    CNTFRQ_EL0.get()
}

/// Reads the virtual counter, after an ISB so that the read is not speculated ahead of
/// the code before it.
#[inline(always)]
pub fn ticks() -> u64 {
    let cnt: u64;
    // One asm, not aarch64-cpu's `isb` then `CNTVCT_EL0.get()`: that read is `nomem`, a
    // separate block the compiler may schedule apart from the ISB it must follow.
    // SAFETY: reading CNTVCT_EL0 has no side effect (EL1 access is never trapped: the
    // boot code gives EL1 the counter when it starts at EL2).
    unsafe { asm!("isb", "mrs {}, cntvct_el0", out(reg) cnt, options(nostack, preserves_flags)) };
    cnt
}

/// Counter frequency in Hz (0 before [`init`]).
pub fn frequency() -> u64 {
    FREQ.load(Ordering::Relaxed)
}

/// Boot CPU, once, before any other CPU starts. Runs with the MMU off (plain stores
/// only, which go straight to memory); `mmu::init_primary` then discards any stale
/// cache line over the writable image before it turns the caches on, and secondaries
/// read these values only after their own MMU is on, so every CPU sees them.
pub fn init() {
    let freq = cntfrq();
    if freq != 0 {
        let mult = ((1_000_000_000u128 << 32) / freq as u128).min(u64::MAX as u128) as u64;
        FREQ.store(freq, Ordering::Relaxed);
        MULT.store(mult, Ordering::Relaxed);
    }
}

/// Per-CPU: enables the event stream (a WFE wake-up every ~100 us or less).
pub fn init_cpu() {
    let freq = frequency().max(1);
    // An event fires when bit EVNTI of the counter goes 0 -> 1: every 2^(EVNTI + 1)
    // ticks. Pick the largest period not above 100 us (EVNTI is 4 bits).
    let target = (freq / 10_000).max(2);
    let evnti = (target.ilog2() as u64).saturating_sub(1).min(15);
    CNTKCTL_EL1.modify(
        CNTKCTL_EL1::EVNTI.val(evnti)
            + CNTKCTL_EL1::EVNTDIR::ZeroToOne
            + CNTKCTL_EL1::EVNTEN::Enable,
    );
    barrier::isb(barrier::SY);
}

/// Nanoseconds since the counter started (monotonic, shared by all CPUs).
#[inline(always)]
pub fn now_ns() -> u64 {
    ticks_to_ns(ticks())
}

/// Converts counter ticks to nanoseconds.
#[inline(always)]
pub fn ticks_to_ns(ticks: u64) -> u64 {
    ((ticks as u128 * MULT.load(Ordering::Relaxed) as u128) >> 32) as u64
}

/// Busy-waits at least `ns` nanoseconds.
pub fn delay_ns(ns: u64) {
    if frequency() == 0 {
        return;
    }
    let start = now_ns();
    while now_ns().wrapping_sub(start) < ns {
        // YIELD, not `spin_loop` (an ISB): see `cpu::relax` (not used here: the timer
        // sits below `cpu` in the module order).
        // SAFETY: a hint; no effect on memory or registers.
        unsafe { core::arch::asm!("yield", options(nostack, preserves_flags)) };
    }
}
