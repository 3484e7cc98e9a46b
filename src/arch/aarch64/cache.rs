//! Cache maintenance by virtual address.
//!
//! Line sizes come from CTR_EL0 (DminLine, IminLine: log2 of words), read each time
//! (cheap, and correct even on big.LITTLE systems where it may differ between CPUs at
//! boot time; the architecture requires the value EL1 sees to be safe system-wide).
//! Everything the rendezvous may run lives in `.text.nopatch`.

use crate::patch::icache::{self, CacheType};
use core::arch::asm;
use tock_registers::interfaces::Readable;
use tock_registers::register_bitfields;

register_bitfields! {u64,
    /// Cache Type Register (the fields used here).
    CTR_EL0 [
        /// Instruction-side coherence to PoU does not need the I-cache invalidated.
        DIC OFFSET(29) NUMBITS(1) [],
        /// Instruction-side coherence to PoU does not need the D-cache cleaned.
        IDC OFFSET(28) NUMBITS(1) [],
        /// log2 of the smallest data cache line, in words.
        DminLine OFFSET(16) NUMBITS(4) [],
        /// log2 of the smallest instruction cache line, in words.
        IminLine OFFSET(0) NUMBITS(4) []
    ]
}

/// CTR_EL0, read through tock-registers' typed fields. aarch64-cpu 11.2 has no CTR_EL0,
/// so the read itself is written here.
struct CtrEl0;

impl Readable for CtrEl0 {
    type T = u64;
    type R = CTR_EL0::Register;

    #[inline(always)]
    fn get(&self) -> u64 {
        let ctr: u64;
        // SAFETY: reading CTR_EL0 has no side effect.
        unsafe { asm!("mrs {}, ctr_el0", out(reg) ctr, options(nomem, nostack, preserves_flags)) };
        ctr
    }
}

/// Smallest data cache line size in bytes (CTR_EL0.DminLine).
#[inline(always)]
pub fn dcache_line_size() -> usize {
    4 << CtrEl0.read(CTR_EL0::DminLine)
}

/// Smallest instruction cache line size in bytes (CTR_EL0.IminLine).
#[inline(always)]
pub fn icache_line_size() -> usize {
    4 << CtrEl0.read(CTR_EL0::IminLine)
}

/// Whether CTR_EL0.IDC and CTR_EL0.DIC are set (in that order).
pub fn idc_dic() -> (bool, bool) {
    let ctr = CtrEl0.extract();
    (ctr.is_set(CTR_EL0::IDC), ctr.is_set(CTR_EL0::DIC))
}

/// Makes instructions written to `[start, end)` (through any alias) visible to
/// instruction fetch on every CPU in the inner shareable domain:
///
/// `DC CVAU` over the range by the D-cache line size, `DSB ISH`, `IC IVAU` over the
/// range by the I-cache line size, `DSB ISH`. With CTR_EL0.IDC the D-side clean is
/// skipped (the DSB stays, ordering the writes before the I-side); with CTR_EL0.DIC the
/// I-side invalidation is skipped (its DSB stays). Which lines, and what may be skipped,
/// is [`icache::plan`]'s decision (host-tested); tests/kernel_image.rs checks this order
/// in the image. No ISB: each CPU that will execute the new instructions must itself
/// perform a context synchronisation event (the stop-machine protocol makes every CPU
/// do so before it leaves).
///
/// `start..end` must be mapped readable at these (executable) addresses: cache
/// maintenance by VA needs a valid translation, and the I-cache may be VIPT, so the
/// instruction side must use the addresses the code is executed from.
#[unsafe(link_section = ".text.nopatch")]
#[inline(never)]
pub fn sync_icache_range(start: usize, end: usize) {
    if start >= end {
        return;
    }
    let ctr = CtrEl0.extract();
    let cache = CacheType {
        dcache_line: 4 << ctr.read(CTR_EL0::DminLine),
        icache_line: 4 << ctr.read(CTR_EL0::IminLine),
        idc: ctr.is_set(CTR_EL0::IDC),
        dic: ctr.is_set(CTR_EL0::DIC),
    };
    let plan = icache::plan(cache, start..end);
    if let Some(lines) = plan.clean {
        for addr in lines {
            // SAFETY: DC CVAU on a mapped address only cleans a cache line; it does not
            // change memory contents. Not `nomem`: it must stay after the writes it
            // publishes.
            unsafe { asm!("dc cvau, {}", in(reg) addr, options(nostack, preserves_flags)) };
        }
    }
    // SAFETY: barrier only. Orders the cleans (or, with IDC, the writes themselves)
    // before the invalidations below and before anything that follows.
    unsafe { asm!("dsb ish", options(nostack, preserves_flags)) };
    if let Some(lines) = plan.invalidate {
        for addr in lines {
            // SAFETY: IC IVAU only invalidates instruction cache lines.
            unsafe { asm!("ic ivau, {}", in(reg) addr, options(nostack, preserves_flags)) };
        }
    }
    // SAFETY: barrier only: the invalidations complete before we return.
    unsafe { asm!("dsb ish", options(nostack, preserves_flags)) };
}

/// Instruction synchronisation barrier.
#[unsafe(link_section = ".text.nopatch")]
#[inline(always)]
pub fn isb() {
    super::cpu::isb();
}

/// `DC CIVAC` (clean and invalidate to the point of coherency) over `[start, end)`,
/// then `DSB SY`. Used to publish data to CPUs that read it with their MMU off.
pub fn clean_inval_dcache_range_poc(start: usize, end: usize) {
    let line = dcache_line_size();
    let mut addr = start & !(line - 1);
    while addr < end {
        // SAFETY: clean+invalidate preserves memory contents.
        unsafe { asm!("dc civac, {}", in(reg) addr, options(nostack, preserves_flags)) };
        addr += line;
    }
    // SAFETY: barrier only.
    unsafe { asm!("dsb sy", options(nostack, preserves_flags)) };
}

/// `DC IVAC` (invalidate to the point of coherency) over `[start, end)`, then
/// `DSB SY`.
///
/// # Safety
/// Discards any dirty line in the range: only for memory whose up-to-date contents are
/// already in RAM (written with the MMU and caches off), before caches are enabled.
pub unsafe fn inval_dcache_range_poc(start: usize, end: usize) {
    let line = dcache_line_size();
    let mut addr = start & !(line - 1);
    while addr < end {
        // SAFETY: the caller guarantees no dirty data in the range needs to survive.
        unsafe { asm!("dc ivac, {}", in(reg) addr, options(nostack, preserves_flags)) };
        addr += line;
    }
    // SAFETY: barrier only.
    unsafe { asm!("dsb sy", options(nostack, preserves_flags)) };
}

/// Invalidates the calling CPU's whole instruction cache (`IC IALLU`, this CPU only)
/// and synchronises its context: what a CPU coming online does before it runs any
/// patchable code. The Arm ARM leaves it IMPLEMENTATION DEFINED whether a core's
/// I-cache keeps lines across a power-down, and while a core is off it takes no part
/// in the broadcast `IC IVAU` of a patch: lines from before it went down may be stale.
/// Linux invalidates the same way on the way in (`__cpu_setup`, then the `ISB` of
/// `secondary_start_kernel`'s path).
#[unsafe(link_section = ".text.nopatch")]
#[inline(always)]
pub fn invalidate_local_icache() {
    // SAFETY: cache maintenance and barriers only; no memory is changed. No `nomem`: a
    // compiler barrier, so nothing is moved across the synchronisation.
    unsafe {
        asm!(
            "ic iallu",
            "dsb nsh",
            "isb",
            options(nostack, preserves_flags)
        )
    };
}
