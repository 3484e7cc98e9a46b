//! Interrupt masking ("IRQs off/on"), the NMI mechanism chosen at boot, and the IRQ
//! exception entry.
//!
//! # Modes
//!
//! The bootarg `pseudo_nmi=on|off` (default `on`) picks how a CPU masks interrupts:
//!
//! | mode ([`NmiMode`])   | IRQs off                  | NMIs                                         |
//! |----------------------|---------------------------|----------------------------------------------|
//! | `None` (`off`)       | PSTATE.I                  | none                                         |
//! | `PseudoNmi` (`on`)   | ICC_PMR_EL1 = [`PMR_IRQOFF`] | GIC priority [`PRIO_NMI`], under the PMR mask |
//! | `FeatNmi` (`on` + FEAT_NMI + GICD_TYPER.NMI) | ICC_PMR_EL1 = [`PMR_IRQOFF`] | superpriority (Armv8.8 FEAT_NMI, GICv3.3 NMI) |
//!
//! In both `on` modes PSTATE.I stays clear in normal operation and "IRQs off" is the
//! priority mask: normal interrupts (priority [`gic::DEFAULT_PRIORITY`], and anything
//! numerically at or above [`PMR_IRQOFF`]) wait, NMI-class interrupts (below it) pass.
//! `FeatNmi` keeps that masking and changes only how NMIs are delivered: the NMI SGIs
//! carry the GIC NMI property (GICR_INMIR0), so the CPU takes them whatever PMR and
//! PSTATE.I say; only PSTATE.ALLINT masks them, and they are acknowledged through
//! ICC_NMIAR1_EL1 (ICC_IAR1_EL1 returns the special INTID 1022 while one is the
//! highest-priority pending interrupt). `platform_feat_nmi=off` forces `PseudoNmi` on a
//! CPU that has FEAT_NMI (to test that path on `-cpu max`).
//!
//! SCTLR_EL1.SPINTMASK stays 0 in `FeatNmi`: this kernel runs on SP_EL1, and with
//! SPINTMASK = 1 PSTATE.SP = 1 would mask every interrupt. With SPINTMASK = 0 every
//! exception entry sets PSTATE.ALLINT (and SPSR_EL1 keeps the interrupted value, which
//! ERET restores), the FEAT_NMI counterpart of PSTATE.I being set on entry.
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
//! # The IRQ exception
//!
//! `handle_irq_exception` acknowledges interrupts until none is left. The vectors
//! saved the interrupted PMR in the trap frame and restore it on return, so a handler
//! can never leave it changed, and an NMI taken while IRQs were PMR-masked returns to
//! exactly that mask. Per acknowledged interrupt:
//! - NMI-class, the NMI SGI: the NMI handlers run ([`super::nmi`]) with PSTATE.I (and
//!   ALLINT) still set from exception entry, and the GIC running priority at NMI level
//!   until the EOI after them: nothing nests.
//! - NMI-class, anything else (the stop IPI, [`gic::STOP_SGI`]): end it (EOI) at once,
//!   then run its handler "IRQs off, NMIs on" (PMR = [`PMR_IRQOFF`], PSTATE.I and
//!   ALLINT clear); see `stop_sgi_handler` in [`super`].
//! - Normal: raise PMR to [`PMR_IRQOFF`] and clear PSTATE.I (and ALLINT) so NMIs can
//!   preempt the handler (Linux's convention), run it, mask again and put the
//!   interrupted PMR back, then EOI.
//!
//! In `None` mode every interrupt is normal and handlers run with PSTATE.I set.

use super::exceptions::TrapFrame;
use super::{cpu, dtb::BootInfo, gic, nmi};
use crate::MAX_CPUS;
use core::arch::asm;
use core::fmt;
use core::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};

/// GIC priority of NMI-class interrupts (the NMI SGI, and the stop IPI when NMIs exist).
pub const PRIO_NMI: u8 = 0x20;
/// The priority mask of "IRQs off" in the `on` modes: masks every priority numerically
/// at or above it (normal interrupts), admits [`PRIO_NMI`].
pub const PMR_IRQOFF: u8 = 0x60;
/// The priority mask of "IRQs on": admits everything this kernel configures.
pub const PMR_IRQON: u8 = 0xf0;

const _: () = assert!(PRIO_NMI < PMR_IRQOFF && PMR_IRQOFF < gic::DEFAULT_PRIORITY);
const _: () = assert!(gic::STOP_SGI_PRIORITY >= PMR_IRQOFF && gic::DEFAULT_PRIORITY < PMR_IRQON);
// QEMU implements 5 priority bits: every value must survive the truncation.
const _: () = assert!(
    PRIO_NMI.is_multiple_of(8) && PMR_IRQOFF.is_multiple_of(8) && PMR_IRQON.is_multiple_of(8)
);

/// SCTLR_EL1.NMI (FEAT_NMI): superpriority interrupts exist and ALLINT masks them.
const SCTLR_NMI: u64 = 1 << 61;
/// SCTLR_EL1.SPINTMASK (FEAT_NMI): kept 0, see the module docs.
const SCTLR_SPINTMASK: u64 = 1 << 62;
/// ICC_CTLR_EL1.PMHE.
const ICC_CTLR_PMHE: u64 = 1 << 6;
/// GICD_TYPER.NMI: the distributor supports the NMI property (GICv3.3).
pub const GICD_TYPER_NMI: u32 = 1 << 9;

/// How this machine masks interrupts and delivers NMIs; chosen once at boot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum NmiMode {
    /// `pseudo_nmi=off`: IRQs off is PSTATE.I; there are no NMIs.
    None = 0,
    /// GICv3 pseudo-NMI: IRQs off is the priority mask; NMIs are priority [`PRIO_NMI`].
    PseudoNmi = 1,
    /// As `PseudoNmi` for IRQ masking; NMIs are FEAT_NMI superpriority interrupts.
    FeatNmi = 2,
}

static MODE: AtomicU8 = AtomicU8::new(NmiMode::None as u8);

/// Set if any CPU reported ICC_CTLR_EL1.PMHE: unmasking PMR writes need `DSB SY`. Read
/// by vectors.S (a byte) on exception return.
pub(crate) static PMR_SYNC: AtomicBool = AtomicBool::new(false);

/// Per CPU: 1 once its GIC CPU interface is on (ICC_SRE_EL1.SRE), so the vectors may
/// save and restore ICC_PMR_EL1 (a byte each, read by vectors.S).
pub(crate) static PMR_LIVE: [AtomicU8; MAX_CPUS] = [const { AtomicU8::new(0) }; MAX_CPUS];

/// Interrupts acknowledged through ICC_NMIAR1_EL1 (superpriority), all CPUs.
static NMIAR1_ACKS: AtomicU64 = AtomicU64::new(0);

/// How many interrupts were acknowledged as superpriority NMIs (ICC_NMIAR1_EL1) so far,
/// on all CPUs: evidence that FEAT_NMI delivery is really in use.
pub fn superpriority_acks() -> u64 {
    NMIAR1_ACKS.load(Ordering::Relaxed)
}

/// What the boot CPU saw when it chose the mode (for the boot report).
static ID_AA64PFR1: AtomicU64 = AtomicU64::new(0);
static GICD_TYPER: AtomicU64 = AtomicU64::new(0);
static REQUESTED: AtomicU8 = AtomicU8::new(0);

/// The mode chosen at boot.
#[inline(always)]
pub fn nmi_mode() -> NmiMode {
    // Relaxed: written once by the boot CPU before any other CPU starts and before
    // interrupts are first unmasked.
    match MODE.load(Ordering::Relaxed) {
        1 => NmiMode::PseudoNmi,
        2 => NmiMode::FeatNmi,
        _ => NmiMode::None,
    }
}

/// Whether `pseudo_nmi=on` is in force: IRQs are masked with ICC_PMR_EL1 and NMIs exist
/// (GICv3 pseudo-NMIs, or FEAT_NMI superpriority interrupts, see [`feat_nmi_in_use`]).
#[inline(always)]
pub fn pseudo_nmi_enabled() -> bool {
    nmi_mode() != NmiMode::None
}

/// Whether NMIs are FEAT_NMI superpriority interrupts (SCTLR_EL1.NMI set, NMI SGIs with
/// the GIC NMI property, PSTATE.ALLINT masking them).
#[inline(always)]
pub fn feat_nmi_in_use() -> bool {
    nmi_mode() == NmiMode::FeatNmi
}

/// ID_AA64PFR1_EL1 of the calling CPU.
fn id_aa64pfr1() -> u64 {
    let v: u64;
    // SAFETY: reading an ID register has no side effect.
    unsafe { asm!("mrs {}, S3_0_C0_C4_1", out(reg) v, options(nomem, nostack, preserves_flags)) };
    v
}

/// ID_AA64PFR1_EL1.NMI (bits [39:36]): 1 = FEAT_NMI.
fn pfr1_nmi(pfr1: u64) -> u64 {
    (pfr1 >> 36) & 0xf
}

/// Chooses the mode from the bootargs, the CPU and the distributor. Boot CPU, once,
/// after the distributor is set up and before any CPU interface is.
pub(crate) fn select_mode(info: &BootInfo, gicd_typer: u32) {
    let requested = match info.bootarg("pseudo_nmi") {
        Some("off") => 2,
        Some("on") => 1,
        None => 0,
        Some(_) => 3, // the kernel's parser rejects it; run with the default meanwhile
    };
    REQUESTED.store(requested, Ordering::Relaxed);
    let pfr1 = id_aa64pfr1();
    ID_AA64PFR1.store(pfr1, Ordering::Relaxed);
    GICD_TYPER.store(u64::from(gicd_typer), Ordering::Relaxed);
    let mode = if requested == 2 {
        NmiMode::None
    } else if pfr1_nmi(pfr1) >= 1
        && gicd_typer & GICD_TYPER_NMI != 0
        && info.bootarg("platform_feat_nmi") != Some("off")
    {
        NmiMode::FeatNmi
    } else {
        NmiMode::PseudoNmi
    };
    // Release: published before secondaries start (they acquire in `init_cpu`).
    MODE.store(mode as u8, Ordering::Release);
}

/// Records the calling CPU's ICC_CTLR_EL1 (after arm-gic wrote it) and marks its PMR as
/// live for the vectors. Called by [`gic::init_cpu`].
pub(crate) fn note_cpu_interface(cpu: usize, icc_ctlr: u64) {
    if icc_ctlr & ICC_CTLR_PMHE != 0 {
        PMR_SYNC.store(true, Ordering::Relaxed);
    }
    if let Some(live) = PMR_LIVE.get(cpu) {
        live.store(1, Ordering::Relaxed);
    }
}

/// Per-CPU set-up of the NMI mechanism, after [`gic::init_cpu`] and before the CPU
/// first unmasks interrupts. In `FeatNmi`: ALLINT set first (the CPU runs with DAIF
/// masked, which does not mask superpriority interrupts), then SCTLR_EL1.NMI on and
/// SPINTMASK off; [`cpu::unmask_all`] clears ALLINT with the DAIF bits.
pub(crate) fn init_cpu(cpu_index: usize) {
    // Acquire pairs with the Release in `select_mode` (secondaries).
    let mode = MODE.load(Ordering::Acquire);
    if mode != NmiMode::FeatNmi as u8 {
        return;
    }
    if pfr1_nmi(id_aa64pfr1()) == 0 {
        panic!("cpu{cpu_index} lacks FEAT_NMI, which the boot CPU has: mixed CPUs unsupported");
    }
    cpu::allint_set();
    // SAFETY: sets SCTLR_EL1.NMI and clears SPINTMASK on the calling CPU; ALLINT is set,
    // so no superpriority interrupt can be taken before the vectors are ready for it
    // (they are: VBAR_EL1 is set). The ISB makes the new SCTLR_EL1 effective.
    unsafe {
        asm!(
            "mrs {t}, sctlr_el1",
            "orr {t}, {t}, {nmi}",
            "bic {t}, {t}, {spintmask}",
            "msr sctlr_el1, {t}",
            "isb",
            t = out(reg) _,
            nmi = in(reg) SCTLR_NMI,
            spintmask = in(reg) SCTLR_SPINTMASK,
            options(nostack, preserves_flags),
        )
    };
}

/// The boot report line: which NMI mechanism is in use, and the evidence.
pub fn describe() -> impl fmt::Display {
    Describe
}

struct Describe;

impl fmt::Display for Describe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pfr1 = ID_AA64PFR1.load(Ordering::Relaxed);
        let typer = GICD_TYPER.load(Ordering::Relaxed);
        match nmi_mode() {
            NmiMode::None => f.write_str("nmi: none (pseudo_nmi=off); IRQs off = PSTATE.I")?,
            NmiMode::PseudoNmi => write!(
                f,
                "nmi: GICv3 pseudo-NMI (PMR); IRQs off = PMR {PMR_IRQOFF:#x}, NMI priority \
                 {PRIO_NMI:#x}, PMR sync {}",
                if PMR_SYNC.load(Ordering::Relaxed) {
                    "forced (DSB SY: ICC_CTLR_EL1.PMHE=1)"
                } else {
                    "relaxed (ICC_CTLR_EL1.PMHE=0)"
                }
            )?,
            NmiMode::FeatNmi => write!(
                f,
                "nmi: FEAT_NMI superpriority (SCTLR_EL1.NMI, GICR_INMIR0, ICC_NMIAR1_EL1); \
                 IRQs off = PMR {PMR_IRQOFF:#x}, PMR sync {}",
                if PMR_SYNC.load(Ordering::Relaxed) {
                    "forced (PMHE=1)"
                } else {
                    "relaxed (PMHE=0)"
                }
            )?,
        }
        write!(
            f,
            "\nnmi: ID_AA64PFR1_EL1 {pfr1:#x} (NMI={}), GICD_TYPER {typer:#x} (NMI={}){}",
            pfr1_nmi(pfr1),
            (typer >> 9) & 1,
            match REQUESTED.load(Ordering::Relaxed) {
                0 => ", pseudo_nmi defaults to on",
                3 => ", pseudo_nmi=<bad value>: using on",
                _ => "",
            }
        )
    }
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

/// `MSR DAIFSet, #2`.
#[inline(always)]
fn daif_set_i() {
    // SAFETY: masking cannot break memory safety. A compiler barrier (no `nomem`).
    unsafe { asm!("msr daifset, #2", options(nostack, preserves_flags)) };
}

/// `MSR DAIFClr, #2`.
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
fn handler_open_nmis() {
    let old = pmr();
    pmr_mask(old.min(PMR_IRQOFF));
    daif_clear_i();
    if feat_nmi_in_use() {
        cpu::allint_clear();
    }
}

/// Undoes [`handler_open_nmis`]: PSTATE.I and ALLINT set again (as on exception
/// entry), then the interrupted PMR from the trap frame.
#[inline(always)]
fn handler_close_nmis(frame: &TrapFrame) {
    if feat_nmi_in_use() {
        cpu::allint_set();
    }
    daif_set_i();
    if frame.pmr <= 0xff {
        pmr_write(frame.pmr as u8);
    }
}

/// The IRQ exception (from the vectors via [`super::exceptions`], everything masked):
/// acknowledges and handles interrupts until none is pending (see the module docs).
/// An error is a broken invariant the caller reports as fatal.
#[unsafe(link_section = ".text.nopatch")]
pub(crate) fn handle_irq_exception(frame: &mut TrapFrame) -> Result<(), &'static str> {
    let cpu = cpu::current_cpu();
    let mode = nmi_mode();
    loop {
        let mut iar = gic::read_iar1();
        let mut nmi_class = false;
        if mode == NmiMode::FeatNmi && gic::intid(iar) == gic::INTID_NMI {
            // A superpriority interrupt is the highest-priority pending one: IAR1 does not
            // acknowledge it, NMIAR1 does.
            iar = gic::read_nmiar1();
            nmi_class = true;
            NMIAR1_ACKS.fetch_add(1, Ordering::Relaxed);
        }
        let intid = gic::intid(iar);
        if intid >= gic::INTID_SPECIAL_FIRST {
            // 1023: nothing (left) to do. 1020-1022 are not acknowledgeable here.
            break;
        }
        if mode != NmiMode::None && !nmi_class {
            // Pseudo-NMI: the running priority is now that of the interrupt we took.
            nmi_class = gic::running_priority_now() < PMR_IRQOFF;
        }
        if nmi_class && intid == nmi::NMI_SGI {
            // PSTATE.I (and ALLINT) are still set from exception entry and the running
            // priority is NMI level until the EOI below: no other NMI can nest.
            gic::count_interrupt(cpu, intid);
            nmi::run_handlers(cpu);
            gic::eoi(iar);
        } else if nmi_class {
            // An IPI delivered at NMI level (the stop IPI): end it now, then run its
            // handler with IRQs off but NMIs on. Re-entrancy: a second one arriving while
            // this handler runs nests here (depth + 1); see `super::stop_sgi_handler`.
            gic::eoi(iar);
            handler_open_nmis();
            gic::dispatch(cpu, intid);
            handler_close_nmis(frame);
        } else {
            if frame.depth > 1 {
                gic::eoi(iar);
                return Err("a normal-priority interrupt preempted an exception handler");
            }
            if mode != NmiMode::None {
                handler_open_nmis();
            }
            gic::dispatch(cpu, intid);
            if mode != NmiMode::None {
                handler_close_nmis(frame);
            }
            gic::eoi(iar);
        }
    }
    Ok(())
}
