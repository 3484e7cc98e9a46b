//! Small per-CPU primitives: exception masking, barriers, identity registers.
//!
//! Identity registers (TPIDR_EL1, MPIDR_EL1, CurrentEL) and the ISB/DSB barriers come
//! from aarch64-cpu. What changes what the CPU may take (DAIF, ALLINT), WFE and SEV stay
//! `asm!` written without `nomem`, so that each is also a compiler barrier: the
//! compiler may not move memory accesses across it. aarch64-cpu's register accessors,
//! `wfe` and `sev` are `nomem` (neither a compiler barrier nor an ISB), and it has no
//! DAIFSet/DAIFClr or ALLINT. Everything here is inlined or lives in `.text.nopatch`,
//! because the rendezvous runs it.

use aarch64_cpu::asm::barrier;
use aarch64_cpu::registers::{CurrentEL, MPIDR_EL1, TPIDR_EL1};
use core::arch::asm;
use tock_registers::interfaces::Readable;

/// DAIF bit for debug exceptions (D).
pub const DAIF_D: u64 = 1 << 9;
/// DAIF bit for SError (A).
pub const DAIF_A: u64 = 1 << 8;
/// DAIF bit for IRQ (I).
pub const DAIF_I: u64 = 1 << 7;
/// DAIF bit for FIQ (F).
pub const DAIF_F: u64 = 1 << 6;
/// All four DAIF bits.
pub const DAIF_ALL: u64 = DAIF_D | DAIF_A | DAIF_I | DAIF_F;

/// PSTATE.ALLINT (FEAT_NMI), in the bit position the `ALLINT` register and SPSR use.
/// [`mask_all`] returns it together with the DAIF bits when FEAT_NMI is in use.
pub const ALLINT: u64 = 1 << 13;

/// Reads DAIF.
#[inline(always)]
pub fn daif() -> u64 {
    let daif: u64;
    // Not aarch64-cpu's `DAIF.get()`, which is `nomem`: callers use this read to order
    // their reasoning about masking with their memory accesses.
    // SAFETY: reading DAIF has no side effect.
    unsafe { asm!("mrs {}, daif", out(reg) daif, options(nostack, preserves_flags)) };
    daif
}

/// Reads PSTATE.ALLINT (as [`ALLINT`] or 0). Only on a CPU with FEAT_NMI: callers check
/// [`super::nmi_mode::feat_nmi_in_use`] first (the register is UNDEFINED without it).
#[inline(always)]
pub fn allint() -> u64 {
    let v: u64;
    // SAFETY: reading ALLINT (S3_0_C4_C3_0) has no side effect; callers only do it on a
    // CPU that implements FEAT_NMI.
    unsafe { asm!("mrs {}, S3_0_C4_C3_0", out(reg) v, options(nostack, preserves_flags)) };
    v & ALLINT
}

/// `MSR ALLINT, #1`: masks every interrupt, NMIs (superpriority) included. The
/// immediate form is self-synchronising, like `MSR DAIFSet`. FEAT_NMI only.
#[inline(always)]
pub fn allint_set() {
    // SAFETY: masking cannot break memory safety; FEAT_NMI is implemented (callers
    // check). Encoding: MSR (immediate) op1=1, CRm=0b0001, op2=0 (Linux SYS_ALLINT_SET);
    // written as .inst because the assembler may not know the `allint` name. Not
    // `nomem`: a compiler barrier.
    unsafe { asm!(".inst 0xd501411f", options(nostack, preserves_flags)) };
}

/// `MSR ALLINT, #0`: lets NMIs (superpriority) in again. FEAT_NMI only.
#[inline(always)]
pub fn allint_clear() {
    // SAFETY: as for `allint_set` (SYS_ALLINT_CLR: CRm=0b0000); every handler is
    // installed before SCTLR_EL1.NMI makes ALLINT matter.
    unsafe { asm!(".inst 0xd501401f", options(nostack, preserves_flags)) };
}

/// Masks D, A, I and F on the calling CPU, and PSTATE.ALLINT when FEAT_NMI is in use,
/// so nothing at all (not even an NMI) is taken. Returns the previous state: DAIF bits
/// plus [`ALLINT`], for [`restore`].
#[inline(always)]
pub fn mask_all() -> u64 {
    let old: u64;
    // One asm (not aarch64-cpu's DAIF accessors, which are `nomem` and have no DAIFSet):
    // read and mask back to back, and a compiler barrier.
    // SAFETY: masking exceptions cannot break memory safety. No `nomem`: a compiler
    // barrier, so nothing the caller does "under the mask" is hoisted above it. The
    // write to DAIF by MSR DAIFSet is self-synchronising for the masking it performs.
    unsafe {
        asm!(
            "mrs {old}, daif",
            "msr daifset, #0xf",
            old = out(reg) old,
            options(nostack, preserves_flags),
        )
    };
    if super::nmi_mode::feat_nmi_in_use() {
        // Read before setting: the caller's state. ALLINT after DAIF: either order
        // leaves no window, since both only mask.
        let allint = allint();
        allint_set();
        return old | allint;
    }
    old
}

/// Writes DAIF (and, with FEAT_NMI in use, ALLINT) back: a value from [`mask_all`] or
/// [`daif`] (which carries no ALLINT bit: ALLINT is then cleared).
#[inline(always)]
pub fn restore(saved: u64) {
    let allint = super::nmi_mode::feat_nmi_in_use();
    // ALLINT is masked first and unmasked last (Linux's order): no NMI arrives in a
    // state that is neither the current nor the saved one.
    if allint && saved & ALLINT != 0 {
        allint_set();
    }
    // Not aarch64-cpu's `DAIF.set()`, which is `nomem`: nothing the caller did under the
    // mask may sink below the unmask.
    // SAFETY: DAIF only affects which exceptions are taken; every handler is installed
    // before interrupts are first unmasked.
    unsafe { asm!("msr daif, {}", in(reg) saved & DAIF_ALL, options(nostack, preserves_flags)) };
    if allint && saved & ALLINT == 0 {
        allint_clear();
    }
}

/// Unmasks D, A, I and F (and ALLINT when FEAT_NMI is in use) on the calling CPU.
#[inline(always)]
pub fn unmask_all() {
    // SAFETY: as for `restore`; the ISB makes pending interrupts taken right here.
    unsafe { asm!("msr daifclr, #0xf", options(nostack, preserves_flags)) };
    if super::nmi_mode::feat_nmi_in_use() {
        allint_clear();
    }
    isb();
}

/// Whether nothing can be taken on the calling CPU: D, A, I and F all masked, and
/// ALLINT set when FEAT_NMI is in use (it is what masks NMIs then).
#[inline(always)]
pub fn all_masked() -> bool {
    daif() & DAIF_ALL == DAIF_ALL && (!super::nmi_mode::feat_nmi_in_use() || allint() != 0)
}

/// The logical index of the calling CPU (TPIDR_EL1, set by the boot code).
#[inline(always)]
pub fn current_cpu() -> usize {
    // The accessor is `nomem`, which is right: TPIDR_EL1 is written only by the boot
    // code before any Rust code runs on the CPU.
    TPIDR_EL1.get() as usize
}

/// MPIDR_EL1 affinity fields (Aff3..Aff0) of the calling CPU, in the DTB `reg` format.
#[inline]
pub fn mpidr() -> u64 {
    MPIDR_EL1.get() & MPIDR_AFFINITY_MASK
}

/// The affinity bits of MPIDR_EL1 (Aff3 at 39:32, Aff2..Aff0 at 23:0).
pub const MPIDR_AFFINITY_MASK: u64 = 0xff_00ff_ffff;

/// Instruction synchronisation barrier (context synchronisation event).
#[inline(always)]
pub fn isb() {
    // aarch64-cpu's barriers are not `nomem`: also a compiler barrier.
    barrier::isb(barrier::SY);
}

/// `DSB ISH`.
#[inline(always)]
pub fn dsb_ish() {
    // Also a compiler barrier (see `isb`).
    barrier::dsb(barrier::ISH);
}

/// `DSB ISHST`.
#[inline(always)]
pub fn dsb_ishst() {
    // Also a compiler barrier (see `isb`).
    barrier::dsb(barrier::ISHST);
}

/// One iteration of a polling wait: `YIELD`. Not `core::hint::spin_loop`, which is an
/// ISB on AArch64: under single-threaded TCG, `YIELD` (and `WFE`) end the vCPU's time
/// slice, so the CPUs being waited for run instead of the waiter; on hardware it is a
/// hint to an SMT core.
#[inline(always)]
pub fn relax() {
    // SAFETY: a hint; no effect on memory or registers. Not `nomem`: the caller re-reads
    // memory afterwards.
    unsafe { asm!("yield", options(nostack, preserves_flags)) };
}

/// The [`relax`] strategy for spin locks that many CPUs may wait on (the console).
pub struct YieldRelax;

impl spin::RelaxStrategy for YieldRelax {
    #[inline(always)]
    fn relax() {
        relax();
    }
}

/// Waits for an event (`WFE`). Ends at the latest at the next timer event-stream tick
/// (see [`super::timer`]), so it may be used in loops that poll a condition.
#[inline(always)]
pub fn wfe() {
    // Not aarch64-cpu's `wfe()`, which is `nomem`: the caller re-reads memory afterwards.
    // SAFETY: WFE only waits.
    unsafe { asm!("wfe", options(nostack, preserves_flags)) };
}

/// Waits for an interrupt (`WFI`): ends when an interrupt is pending, even one that
/// DAIF masks (it is then not taken). Unlike [`wfe`], under single-threaded TCG the
/// vCPU sleeps and takes no turn until then.
#[inline(always)]
pub fn wfi() {
    // SAFETY: WFI only waits. Not `nomem`: the caller re-reads memory afterwards.
    unsafe { asm!("wfi", options(nostack, preserves_flags)) };
}

/// Sends an event to all CPUs (`SEV`), after a `DSB ISHST` so that the stores made
/// before it are visible to CPUs that wake up.
#[inline(always)]
pub fn sev() {
    // One asm: aarch64-cpu's `sev()` is `nomem` and would be a separate block from the
    // DSB it must follow.
    // SAFETY: barrier and event only.
    unsafe { asm!("dsb ishst", "sev", options(nostack, preserves_flags)) };
}

/// The exception level this code runs at (always 1 once booted).
#[inline]
pub fn current_el() -> u8 {
    CurrentEL.read(CurrentEL::EL) as u8
}

/// Feature number ([`crate::patch::alternatives::Features`]) of FEAT_LSE atomics
/// (ID_AA64ISAR0_EL1.Atomic >= 2: CAS, LDADD, STADD, SWP).
pub const FEATURE_LSE: u16 = 0;
/// CTR_EL0.IDC: instruction fetch coherence needs no D-cache clean to PoU.
pub const FEATURE_IDC: u16 = 1;
/// CTR_EL0.DIC: instruction fetch coherence needs no I-cache invalidation to PoU.
pub const FEATURE_DIC: u16 = 2;
/// FEAT_NMI (ID_AA64PFR1_EL1.NMI >= 1): superpriority interrupts and PSTATE.ALLINT.
pub const FEATURE_NMI: u16 = 3;
/// Never set by the hardware: the benchmark's sites, flipped by turning it on and off.
pub const FEATURE_BENCH: u16 = 63;

/// Every feature number with its name, as the alternatives tables may use them.
pub const FEATURE_NAMES: [(u16, &str); 5] = [
    (FEATURE_LSE, "lse"),
    (FEATURE_IDC, "idc"),
    (FEATURE_DIC, "dic"),
    (FEATURE_NMI, "nmi"),
    (FEATURE_BENCH, "bench"),
];

/// The calling CPU's features, read from its ID registers and CTR_EL0 (never
/// [`FEATURE_BENCH`]).
pub fn features() -> crate::patch::alternatives::Features {
    let (isar0, pfr1, ctr): (u64, u64, u64);
    // SAFETY: reading ID registers and CTR_EL0 has no side effect. By hand: aarch64-cpu
    // 11.2 has neither ID_AA64ISAR0_EL1's Atomic field nor CTR_EL0.
    unsafe {
        asm!("mrs {}, S3_0_C0_C6_0", out(reg) isar0, options(nomem, nostack, preserves_flags));
        asm!("mrs {}, S3_0_C0_C4_1", out(reg) pfr1, options(nomem, nostack, preserves_flags));
        asm!("mrs {}, ctr_el0", out(reg) ctr, options(nomem, nostack, preserves_flags));
    }
    crate::patch::alternatives::Features::NONE
        .set(FEATURE_LSE, (isar0 >> 20) & 0xf >= 2)
        .set(FEATURE_IDC, (ctr >> 28) & 1 != 0)
        .set(FEATURE_DIC, (ctr >> 29) & 1 != 0)
        .set(FEATURE_NMI, (pfr1 >> 36) & 0xf >= 1)
}
