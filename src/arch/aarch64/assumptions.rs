//! The platform assumptions the arm64 design rests on, checked at boot as platform
//! self-tests (`tests=platform`, each a KTAP line that names the assumption when it
//! does not hold). The table is in docs/porting.md ("Platform assumptions").
//!
//! | test                         | assumption                                                     |
//! |------------------------------|----------------------------------------------------------------|
//! | `gic_single_security_state`  | GICD_CTLR.DS = 1: priorities are not shifted into the NS half  |
//! | `gic_eoimode_0`              | ICC_CTLR_EL1.EOImode = 0 on every CPU: the EOI drops priority *and* deactivates |
//! | `sctlr_spintmask_0`          | SCTLR_EL1.SPINTMASK = 0 (FEAT_NMI): PSTATE.SP does not mask interrupts |
//! | `sctlr_eis_1`                | SCTLR_EL1.EIS = 1 (FEAT_ExS): exception entry is context-synchronising |
//! | `no_sdei_firmware`           | no SDEI firmware (no `arm,sdei-1.0` DTB node): nothing runs past `mask_all` |
//!
//! Each check is a pure function of the register or DTB value it reads, so a port can
//! see what it decides. Register fields are raw bits: aarch64-cpu 11.2 names neither
//! SCTLR_EL1.{SPINTMASK,EIS} nor ID_AA64MMFR0_EL1.EXS, and arm-gic exposes no GICD_CTLR
//! read.

use super::{boot_info, nmi_mode, smp};
use crate::harness::Verdict;
use aarch64_cpu::registers::{ID_AA64MMFR0_EL1, Readable, SCTLR_EL1};
use core::fmt::Write;

/// The checks above by their self-test names: the kernel runs them at every boot, before
/// any test, and refuses the run naming the first that does not hold.
pub const NAMES: [&str; 5] = [
    "gic_single_security_state",
    "gic_eoimode_0",
    "sctlr_spintmask_0",
    "sctlr_eis_1",
    "no_sdei_firmware",
];

/// GICD_CTLR.DS (IHI 0069, GICD_CTLR): 1 = the GIC supports a single security state.
const GICD_CTLR_DS: u32 = 1 << 6;
/// ICC_CTLR_EL1.EOImode (IHI 0069, ICC_CTLR_EL1).
const ICC_CTLR_EOIMODE: u64 = 1 << 1;
/// SCTLR_EL1.SPINTMASK (DDI 0487, SCTLR_EL1; FEAT_NMI).
const SCTLR_SPINTMASK: u64 = 1 << 62;
/// SCTLR_EL1.EIS (DDI 0487, SCTLR_EL1; FEAT_ExS, RES1 without it).
const SCTLR_EIS: u64 = 1 << 22;

/// `gic_single_security_state`: the NMI priority must stay below the IRQs-off mask as
/// the CPU interface sees it.
pub fn gic_single_security_state() -> Verdict {
    // SAFETY: GICD_CTLR (offset 0) of the distributor the DTB names, mapped as device
    // memory by the MMU set-up; a read has no side effect.
    let ctlr = unsafe { core::ptr::read_volatile(boot_info().gicd.base as *const u32) };
    security_state_verdict(ctlr)
}

fn security_state_verdict(gicd_ctlr: u32) -> Verdict {
    check!(
        gicd_ctlr & GICD_CTLR_DS != 0,
        "assumption single-security-state GIC broken: GICD_CTLR {gicd_ctlr:#x} has DS=0; \
         Non-secure priorities are shifted ({:#x} is held as {:#x}) while PMR is not \
         (SCR_EL3.FIQ=0), so PMR {:#x} would mask NMIs too",
        nmi_mode::PRIO_NMI,
        0x80 | (nmi_mode::PRIO_NMI >> 1),
        nmi_mode::PMR_IRQOFF
    );
    Verdict::Pass(msg!("GICD_CTLR {gicd_ctlr:#x}: DS=1, one security state"))
}

/// `gic_eoimode_0`: every online CPU's ICC_CTLR_EL1 as it read after set-up.
pub fn gic_eoimode_0() -> Verdict {
    for cpu in smp::online_cpus().iter() {
        let verdict = eoimode_verdict(cpu, nmi_mode::icc_ctlr(cpu));
        if !matches!(verdict, Verdict::Pass(_)) {
            return verdict;
        }
    }
    Verdict::Pass(msg!(
        "ICC_CTLR_EL1.EOImode=0 on {} CPUs: EOI drops priority and deactivates",
        smp::online_cpus().len()
    ))
}

fn eoimode_verdict(cpu: usize, icc_ctlr: u64) -> Verdict {
    check!(
        icc_ctlr & ICC_CTLR_EOIMODE == 0,
        "assumption EOImode 0 broken: cpu{cpu} ICC_CTLR_EL1 {icc_ctlr:#x} has EOImode=1; \
         ICC_EOIR1_EL1 then only drops priority, this kernel never writes ICC_DIR_EL1, \
         so interrupts would stay active (the no-nesting argument needs EOImode 0)"
    );
    Verdict::Pass(msg!("cpu{cpu}: EOImode=0"))
}

/// `sctlr_spintmask_0`: with FEAT_NMI, SPINTMASK = 1 and PSTATE.SP = 1 (this kernel
/// runs on SP_EL1) would mask every interrupt, superpriority ones included.
pub fn sctlr_spintmask_0() -> Verdict {
    spintmask_verdict(nmi_mode::cpu_has_feat_nmi(), SCTLR_EL1.get())
}

fn spintmask_verdict(feat_nmi: bool, sctlr: u64) -> Verdict {
    if !feat_nmi {
        return Verdict::Pass(msg!("no FEAT_NMI: SCTLR_EL1.SPINTMASK is RES0"));
    }
    check!(
        sctlr & SCTLR_SPINTMASK == 0,
        "assumption SPINTMASK=0 broken: SCTLR_EL1 {sctlr:#x} has SPINTMASK=1; with \
         PSTATE.SP=1 (SP_EL1) every interrupt, NMIs included, is masked"
    );
    Verdict::Pass(msg!("SCTLR_EL1 {sctlr:#x}: SPINTMASK=0"))
}

/// `sctlr_eis_1`: an exception entry (the stop IPI, the NMI) is a context
/// synchronisation event, as on every CPU without FEAT_ExS.
pub fn sctlr_eis_1() -> Verdict {
    let exs = (ID_AA64MMFR0_EL1.get() >> 44) & 0xf;
    eis_verdict(exs, SCTLR_EL1.get())
}

fn eis_verdict(mmfr0_exs: u64, sctlr: u64) -> Verdict {
    if mmfr0_exs == 0 {
        return Verdict::Pass(msg!(
            "no FEAT_ExS: SCTLR_EL1.EIS is RES1, exception entry synchronises"
        ));
    }
    check!(
        sctlr & SCTLR_EIS != 0,
        "assumption EIS=1 broken: SCTLR_EL1 {sctlr:#x} has EIS=0; exception entry is \
         not context-synchronising, so a stop IPI or NMI no longer implies an ISB"
    );
    Verdict::Pass(msg!("SCTLR_EL1 {sctlr:#x}: EIS=1 (FEAT_ExS)"))
}

/// `no_sdei_firmware`: SDEI events are taken whatever PSTATE and PMR say, so a patch
/// window would need `SDEI_PE_MASK` on every CPU (not implemented).
pub fn no_sdei_firmware() -> Verdict {
    let dtb = boot_info().dtb;
    // SAFETY: the DTB stays mapped read-only (mmu maps `info.dtb`) and nothing writes
    // it after boot; `from_ptr` checks the header and bounds reads by `totalsize`.
    let Ok(fdt) = (unsafe { fdt::Fdt::from_ptr(dtb.base as *const u8) }) else {
        fail!("the DTB at {:#x} no longer parses", dtb.base);
    };
    let sdei = fdt.all_nodes().find(|n| {
        n.compatible()
            .is_some_and(|c| c.all().any(|s| s == "arm,sdei-1.0"))
    });
    sdei_verdict(sdei.map(|n| n.name))
}

fn sdei_verdict(sdei_node: Option<&str>) -> Verdict {
    if let Some(name) = sdei_node {
        fail!(
            "assumption no SDEI firmware broken: DTB node {name} is arm,sdei-1.0; SDEI \
             events pass DAIF and PMR, and mask_all does not call SDEI_PE_MASK"
        );
    }
    Verdict::Pass(msg!("no arm,sdei-1.0 node in the DTB"))
}
