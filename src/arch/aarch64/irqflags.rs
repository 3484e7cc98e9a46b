//! Interrupt masking: "IRQs off/on" (`local_irq_*`) and the stop machine's
//! `mask_all`/`mask_irqs`, in the mode [`super::nmi_mode`] chose.
//!
//! # PMR writes: what synchronisation they need, and why
//!
//! - Compiler: every PMR access below is an `asm!` without `nomem`, so it is a compiler
//!   barrier: memory accesses made "under" [`local_irq_disable`] are not moved out.
//! - Masking (a numerically lower value): ICC_PMR_EL1 writes are self-synchronising for
//!   the masking they do. Once the MSR executed, the CPU interface signals no interrupt
//!   the new value masks, so no barrier is needed (Linux's `arch_local_irq_disable` has
//!   none either).
//! - Unmasking (a higher value): the CPU interface itself acts on the new value without
//!   help; interrupts it now admits are taken at the latest at the next context
//!   synchronisation event, and nothing here needs them at an exact instruction. What
//!   may lag is the *redistributor's* copy: when ICC_CTLR_EL1.PMHE (priority mask hint
//!   enable, bit 6) is 1, the CPU interface reports its PMR to the redistributor, which
//!   uses it to choose the target of 1-of-N SPIs, and only a `DSB SY` guarantees that
//!   report has arrived. Without it the redistributor may go on steering interrupts away
//!   from a CPU that has just unmasked them. Linux: `pmr_sync()`
//!   (arch/arm64/include/asm/barrier.h) is `dsb(sy)` only if the `gic_pmr_sync` static
//!   key is set, and `gic_enable_nmi_support()` (drivers/irqchip/irq-gic-v3.c) sets it
//!   iff ICC_CTLR_EL1.PMHE reads 1 ("Linux itself doesn't use 1:N distribution, so has
//!   no need to set PMHE. The only reason to have it set is if EL3 requires it").
//!   Likewise here: arm-gic writes ICC_CTLR_EL1 = 0, each CPU reads PMHE back (EL3 may
//!   force it), and if any CPU has it, every unmasking PMR write is followed by
//!   `DSB SY` (so is the PMR restore on exception return, in vectors.S). QEMU reads 0:
//!   "relaxed".
//!
//! SCTLR_EL1.SPINTMASK stays 0 in `FeatNmi`: this kernel runs on SP_EL1, and with
//! SPINTMASK = 1 PSTATE.SP = 1 would mask every interrupt. With SPINTMASK = 0 every
//! exception entry sets PSTATE.ALLINT (and SPSR_EL1 keeps the interrupted value, which
//! ERET restores), the FEAT_NMI counterpart of PSTATE.I being set on entry.

use super::cpu;
use super::nmi_mode::{
    self, NmiMode, PMR_IRQOFF, PMR_IRQON, PMR_SYNC, feat_nmi_in_use, pseudo_nmi_enabled,
};
use aarch64_cpu::asm::barrier;
use aarch64_cpu::registers::{Readable, SCTLR_EL1, Writeable};
use core::arch::asm;
use core::sync::atomic::Ordering;

/// SCTLR_EL1.NMI (FEAT_NMI): superpriority interrupts exist and ALLINT masks them.
const SCTLR_NMI: u64 = 1 << 61;
/// SCTLR_EL1.SPINTMASK (FEAT_NMI): kept 0, see the module docs.
const SCTLR_SPINTMASK: u64 = 1 << 62;

/// Per-CPU set-up of the NMI mechanism, after [`super::gic::init_cpu`] and before the
/// CPU first unmasks interrupts. In `FeatNmi`: ALLINT set first (the CPU runs with DAIF
/// masked, which does not mask superpriority interrupts), then SCTLR_EL1.NMI on and
/// SPINTMASK off; [`cpu::unmask_all`] clears ALLINT with the DAIF bits.
pub(crate) fn init_cpu(cpu_index: usize) {
    if nmi_mode::published_mode() != NmiMode::FeatNmi {
        return;
    }
    if !nmi_mode::cpu_has_feat_nmi() {
        panic!("cpu{cpu_index} lacks FEAT_NMI, which the boot CPU has: mixed CPUs unsupported");
    }
    cpu::allint_set();
    // aarch64-cpu 11.2 names no NMI/SPINTMASK fields: raw bits. Its accessors are not
    // compiler barriers, which is fine here (boot, no memory ordered by this write);
    // the ISB makes the new SCTLR_EL1 effective. No superpriority interrupt can be
    // taken before the vectors are ready for it: ALLINT is set, and VBAR_EL1 is too.
    SCTLR_EL1.set((SCTLR_EL1.get() | SCTLR_NMI) & !SCTLR_SPINTMASK);
    barrier::isb(barrier::SY);
}

/// The calling CPU's priority mask (ICC_PMR_EL1).
#[inline(always)]
pub fn pmr() -> u8 {
    let v: u64;
    // SAFETY: reading ICC_PMR_EL1 (the GIC CPU interface is on for any CPU that runs
    // code using this). Not `nomem`: ordered with the caller's masking reasoning.
    unsafe { asm!("mrs {}, S3_0_C4_C6_0", out(reg) v, options(nostack, preserves_flags)) };
    v as u8
}

/// Writes a PMR value that masks at least as much as the current one. Self-synchronising:
/// no barrier (see the module docs).
#[inline(always)]
fn pmr_mask(value: u8) {
    // SAFETY: only changes which interrupts this CPU is signalled. Not `nomem`: a
    // compiler barrier.
    unsafe {
        asm!("msr S3_0_C4_C6_0, {}", in(reg) u64::from(value), options(nostack, preserves_flags))
    };
}

/// Writes a PMR value that may unmask: followed by `DSB SY` when PMHE requires it.
#[inline(always)]
pub(crate) fn pmr_write(value: u8) {
    pmr_mask(value);
    // Relaxed: set at CPU bring-up, before interrupts are first unmasked.
    if PMR_SYNC.load(Ordering::Relaxed) {
        // SAFETY: a barrier only (see the module docs: the redistributor's copy of PMR).
        unsafe { asm!("dsb sy", options(nostack, preserves_flags)) };
    }
}

/// `MSR DAIFSet, #2`. `asm!` rather than aarch64-cpu's `DAIF` (a `nomem` read-modify-
/// write): one instruction, and a compiler barrier for what runs "under" the mask.
#[inline(always)]
fn daif_set_i() {
    // SAFETY: masking cannot break memory safety. A compiler barrier (no `nomem`).
    unsafe { asm!("msr daifset, #2", options(nostack, preserves_flags)) };
}

/// `MSR DAIFClr, #2` (`asm!`, as [`daif_set_i`]).
#[inline(always)]
fn daif_clear_i() {
    // SAFETY: every handler is installed before a CPU first unmasks. A compiler barrier.
    unsafe { asm!("msr daifclr, #2", options(nostack, preserves_flags)) };
}

/// The state [`local_irq_save`] returns, for [`local_irq_restore`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use = "hand the flags to local_irq_restore"]
pub struct IrqFlags {
    /// The PMR (`on` modes) or the DAIF value (`off`).
    value: u64,
}

/// Masks normal interrupts on the calling CPU and returns the previous state. With
/// pseudo-NMI on this lowers ICC_PMR_EL1 to [`PMR_IRQOFF`] (NMIs still arrive); off, it
/// sets PSTATE.I.
#[inline(always)]
pub fn local_irq_save() -> IrqFlags {
    if pseudo_nmi_enabled() {
        let old = pmr();
        // Never loosen a stricter mask.
        pmr_mask(old.min(PMR_IRQOFF));
        IrqFlags {
            value: u64::from(old),
        }
    } else {
        let old = cpu::daif();
        daif_set_i();
        IrqFlags { value: old }
    }
}

/// Restores the state [`local_irq_save`] returned.
#[inline(always)]
pub fn local_irq_restore(flags: IrqFlags) {
    if pseudo_nmi_enabled() {
        pmr_write(flags.value as u8);
    } else if flags.value & cpu::DAIF_I == 0 {
        daif_clear_i();
    }
}

/// Masks normal interrupts on the calling CPU (see [`local_irq_save`]).
#[inline(always)]
pub fn local_irq_disable() {
    if pseudo_nmi_enabled() {
        let old = pmr();
        pmr_mask(old.min(PMR_IRQOFF));
    } else {
        daif_set_i();
    }
}

/// Unmasks normal interrupts on the calling CPU: PMR to [`PMR_IRQON`] (pseudo-NMI on;
/// PSTATE.I, owned by exception entry and return, is left alone), or PSTATE.I cleared.
#[inline(always)]
pub fn local_irq_enable() {
    if pseudo_nmi_enabled() {
        pmr_write(PMR_IRQON);
    } else {
        daif_clear_i();
    }
}

/// Whether normal interrupts are masked on the calling CPU (by PSTATE.I, or by the PMR
/// with pseudo-NMI on).
#[inline(always)]
pub fn irqs_disabled() -> bool {
    cpu::daif() & cpu::DAIF_I != 0 || (pseudo_nmi_enabled() && pmr() <= PMR_IRQOFF)
}

/// Exception-mask state saved by [`mask_all`] / [`mask_irqs`] (the stop machine's
/// [`crate::stop::Arch::MaskState`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaskState {
    /// DAIF bits, plus [`cpu::ALLINT`] with FEAT_NMI in use.
    pstate: u64,
    /// The PMR (`on` modes); `None`: left alone (`off`).
    pmr: Option<u8>,
}

/// Masks everything, NMIs included: D, A, I, F and (FEAT_NMI) ALLINT.
#[inline(always)]
pub fn mask_all() -> MaskState {
    let pstate = cpu::mask_all();
    let pmr = pseudo_nmi_enabled().then(pmr);
    MaskState { pstate, pmr }
}

/// Masks normal interrupts only. Pseudo-NMI on: PMR to [`PMR_IRQOFF`], then PSTATE.I
/// (and ALLINT) cleared if set, so NMIs arrive even on a CPU that got here from an
/// interrupt handler. Off: PSTATE.I (no NMIs exist).
#[inline(always)]
pub fn mask_irqs() -> MaskState {
    if !pseudo_nmi_enabled() {
        let daif = cpu::daif();
        daif_set_i();
        return MaskState {
            pstate: daif,
            pmr: None,
        };
    }
    let feat = feat_nmi_in_use();
    let pstate = cpu::daif() | if feat { cpu::allint() } else { 0 };
    let old = pmr();
    // PMR first: no normal interrupt may slip in once PSTATE.I is cleared.
    pmr_mask(old.min(PMR_IRQOFF));
    daif_clear_i();
    if feat {
        cpu::allint_clear();
    }
    MaskState {
        pstate,
        pmr: Some(old),
    }
}

/// Restores a state from [`mask_all`] or [`mask_irqs`]. With a PMR to restore,
/// PSTATE.I (and ALLINT) are set first, so the PMR never unmasks while they are clear
/// in a state that is neither the current nor the saved one.
#[inline(always)]
pub fn restore(saved: MaskState) {
    if let Some(pmr) = saved.pmr {
        daif_set_i();
        if feat_nmi_in_use() {
            cpu::allint_set();
        }
        pmr_write(pmr);
    }
    cpu::restore(saved.pstate);
}

/// Whether nothing, not even an NMI, can be taken on the calling CPU.
#[inline(always)]
pub fn all_masked() -> bool {
    cpu::all_masked()
}

/// "IRQs off, NMIs on" inside an interrupt handler: PMR to [`PMR_IRQOFF`] (never
/// loosened), then PSTATE.I and (FEAT_NMI) ALLINT cleared.
#[inline(always)]
pub(crate) fn handler_open_nmis() {
    let old = pmr();
    pmr_mask(old.min(PMR_IRQOFF));
    daif_clear_i();
    if feat_nmi_in_use() {
        cpu::allint_clear();
    }
}

/// Undoes [`handler_open_nmis`]: PSTATE.I and ALLINT set again (as on exception
/// entry), then `interrupted_pmr` (from the trap frame; above 0xff: not saved).
#[inline(always)]
pub(crate) fn handler_close_nmis(interrupted_pmr: u64) {
    if feat_nmi_in_use() {
        cpu::allint_set();
    }
    daif_set_i();
    if interrupted_pmr <= 0xff {
        pmr_write(interrupted_pmr as u8);
    }
}
