//! The NMI mode chosen at boot, and the interrupt priorities that make it up.
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
//! priority mask: normal interrupts (priority [`super::gic::DEFAULT_PRIORITY`], and anything
//! numerically at or above [`PMR_IRQOFF`]) wait, NMI-class interrupts (below it) pass.
//! `FeatNmi` keeps that masking and changes only how NMIs are delivered: the NMI SGIs
//! carry the GIC NMI property (GICR_INMIR0), so the CPU takes them whatever PMR and
//! PSTATE.I say; only PSTATE.ALLINT masks them, and they are acknowledged through
//! ICC_NMIAR1_EL1 (ICC_IAR1_EL1 returns the special INTID 1022 while one is the
//! highest-priority pending interrupt). `platform_feat_nmi=off` forces `PseudoNmi` on a
//! CPU that has FEAT_NMI (to test that path on `-cpu max`).
//!
//! A leaf: every other module that asks "are there NMIs?" or "what is IRQs off?" asks
//! here, and this module names no other module of the port.

use crate::MAX_CPUS;
use aarch64_cpu::registers::{ID_AA64PFR1_EL1, Readable};
use core::fmt;
use core::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};

/// GIC priority of NMI-class interrupts (the NMI SGI, and the stop IPI when NMIs exist).
pub const PRIO_NMI: u8 = 0x20;
/// The priority mask of "IRQs off" in the `on` modes: masks every priority numerically
/// at or above it (normal interrupts), admits [`PRIO_NMI`].
pub const PMR_IRQOFF: u8 = 0x60;
/// The priority mask of "IRQs on": admits everything this kernel configures.
pub const PMR_IRQON: u8 = 0xf0;

// QEMU implements 5 priority bits: every value must survive the truncation.
const _: () = assert!(
    PRIO_NMI.is_multiple_of(8) && PMR_IRQOFF.is_multiple_of(8) && PMR_IRQON.is_multiple_of(8)
);

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

/// Each CPU's ICC_CTLR_EL1 as it read after set-up (for `assumptions::gic_eoimode_0`).
static ICC_CTLR: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];

/// What the boot CPU saw when it chose the mode (for the boot report).
static ID_AA64PFR1: AtomicU64 = AtomicU64::new(0);
static GICD_TYPER: AtomicU64 = AtomicU64::new(0);
static REQUESTED: AtomicU8 = AtomicU8::new(0);

/// The mode chosen at boot.
#[inline(always)]
pub fn nmi_mode() -> NmiMode {
    // Relaxed: written once by the boot CPU before any other CPU starts and before
    // interrupts are first unmasked.
    decode(MODE.load(Ordering::Relaxed))
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

/// ID_AA64PFR1_EL1 of the calling CPU (an ID register: the crate's `nomem` read fits).
fn id_aa64pfr1() -> u64 {
    ID_AA64PFR1_EL1.get()
}

/// Whether the calling CPU implements FEAT_NMI.
pub(crate) fn cpu_has_feat_nmi() -> bool {
    pfr1_nmi(id_aa64pfr1()) >= 1
}

/// ID_AA64PFR1_EL1.NMI (bits [39:36]): 1 = FEAT_NMI.
fn pfr1_nmi(pfr1: u64) -> u64 {
    (pfr1 >> 36) & 0xf
}

/// Chooses the mode from the bootargs (`pseudo_nmi`, whether `platform_feat_nmi=off`
/// is absent), the CPU and the distributor (`gicd_typer`). Boot CPU, once, after the
/// distributor is set up and before any CPU interface is.
pub(crate) fn select_mode(pseudo_nmi: Option<&str>, feat_nmi_allowed: bool, gicd_typer: u32) {
    let requested = match pseudo_nmi {
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
    } else if pfr1_nmi(pfr1) >= 1 && gicd_typer & GICD_TYPER_NMI != 0 && feat_nmi_allowed {
        NmiMode::FeatNmi
    } else {
        NmiMode::PseudoNmi
    };
    // Release: published before secondaries start (they acquire in `published_mode`).
    MODE.store(mode as u8, Ordering::Release);
}

/// The mode, for a secondary CPU's set-up: Acquire pairs with the Release in
/// [`select_mode`], which the boot CPU ran before starting it.
pub(crate) fn published_mode() -> NmiMode {
    decode(MODE.load(Ordering::Acquire))
}

#[inline(always)]
fn decode(mode: u8) -> NmiMode {
    match mode {
        1 => NmiMode::PseudoNmi,
        2 => NmiMode::FeatNmi,
        _ => NmiMode::None,
    }
}

/// Records the calling CPU's ICC_CTLR_EL1 (after arm-gic wrote it) and marks its PMR as
/// live for the vectors. Called by [`super::gic::init_cpu`].
pub(crate) fn note_cpu_interface(cpu: usize, icc_ctlr: u64) {
    if icc_ctlr & ICC_CTLR_PMHE != 0 {
        PMR_SYNC.store(true, Ordering::Relaxed);
    }
    if let Some(live) = PMR_LIVE.get(cpu) {
        live.store(1, Ordering::Relaxed);
    }
    if let Some(ctlr) = ICC_CTLR.get(cpu) {
        // Relaxed: read only after this CPU is online (which the boot CPU acquired).
        ctlr.store(icc_ctlr, Ordering::Relaxed);
    }
}

/// The ICC_CTLR_EL1 value CPU `cpu` reported in [`note_cpu_interface`] (0 if none).
pub(crate) fn icc_ctlr(cpu: usize) -> u64 {
    ICC_CTLR.get(cpu).map_or(0, |c| c.load(Ordering::Relaxed))
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
