//! The kernel's platform names on aarch64 (see the table in the parent module).

use super::KprobeFixture;
use crate::CpuSet;
use crate::arch::aarch64::{boot_info, cpu, gic, irq, irqflags, layout, nmi_mode};
use crate::patch::{Patch, PatchError, insn};
use core::ops::Range;

pub use crate::arch::aarch64::alternatives::{
    ALTERNATIVES, PATHS as ALTERNATIVE_PATHS, bench_sites_applied,
};
pub use crate::arch::aarch64::assumptions::NAMES as ASSUMPTIONS;
pub use crate::arch::aarch64::console::{write_forced, write_raw_forced};
pub use crate::arch::aarch64::cpu::FEATURE_NAMES;
pub use crate::arch::aarch64::exceptions::TrapFrame as KprobeFrame;
pub use crate::arch::aarch64::exit::exit;
pub use crate::arch::aarch64::irqflags::{
    IrqFlags, irqs_disabled, local_irq_restore, local_irq_save,
};
pub use crate::arch::aarch64::jump_label::{KernelKeys, STATIC_KEYS};
pub use crate::arch::aarch64::kprobes::{Arm64Kprobes as KprobePlatform, KPROBES};
pub use crate::arch::aarch64::mmu::alias_mapped;
pub use crate::arch::aarch64::selftest::{FAULT_MODES, SELFTESTS, provoke};
pub use crate::arch::aarch64::smp::{cpu_die, current_cpu, online_cpus, online_syncs};
pub use crate::arch::aarch64::text::{KERNEL_TEXT, KernelText};
pub use crate::arch::aarch64::timer::now_ns;
pub use crate::arch::aarch64::{Aarch64 as Platform, STOP, nmi};
pub use crate::arch::write_probe::set_write_probe;
pub use crate::patch::insn::{Insn, NOP};

/// Masks every exception on the calling CPU, NMIs included, for good: the panic
/// handler's first step (DAIF and, with FEAT_NMI, ALLINT).
pub fn mask_for_panic() {
    cpu::mask_all();
}

/// The calling CPU's features, as the alternatives see them.
pub fn cpu_features() -> crate::patch::alternatives::Features {
    cpu::features()
}

/// `counter += value`, Release (LSE `STADDL` where the CPU has it, through a runtime
/// alternative).
pub fn counter_add_release(counter: &core::sync::atomic::AtomicU32, value: u32) {
    crate::arch::aarch64::atomic::add_release(counter, value);
}

/// Bytes of one patch site.
pub const SITE_LEN: usize = 4;

/// CPUs the DTB lists.
pub fn cpu_count() -> usize {
    boot_info().cpu_count
}

/// CPUs the DTB lists, including any beyond [`MAX_CPUS`](crate::MAX_CPUS).
pub fn firmware_cpu_count() -> usize {
    boot_info().dtb_cpu_count
}

/// What lists the CPUs here.
pub const CPU_TABLE: &str = "DTB";

/// The kernel command line.
pub fn bootargs() -> &'static str {
    boot_info().bootargs
}

/// The command line was longer than the kernel's copy of it (`/chosen/bootargs`).
pub fn bootargs_too_long() -> Option<crate::bootargs::TooLong> {
    let info = boot_info();
    (info.bootargs_len > info.bootargs.len()).then_some(crate::bootargs::TooLong {
        len: info.bootargs_len,
        capacity: crate::arch::aarch64::dtb::BOOTARGS_CAPACITY,
    })
}

/// `MOVZ X0, #value`: a site that makes its function return `value`.
pub fn returning(value: u16) -> Insn {
    insn::movz_x(0, value, 0).expect("x0 and shift 0 are valid")
}

/// Waits for an event (`WFE`): woken by [`wake_idle`], any interrupt, or the timer's
/// event stream at the latest.
pub fn idle_wait() {
    aarch64_cpu::asm::wfe();
}

/// Wakes CPUs in [`idle_wait`]: the stores before it are visible first (`DSB ISHST`).
pub fn wake_idle() {
    aarch64_cpu::asm::barrier::dsb(aarch64_cpu::asm::barrier::ISHST);
    aarch64_cpu::asm::sev();
}

/// `YIELD`: a hint on hardware; under single-threaded TCG it hands the host thread to
/// the next vCPU, without which every broadcast TLBI of the patch alias waits for each
/// busy caller's whole time slice (100 ms). (`core::hint::spin_loop` is an `ISB` here.)
pub fn cpu_yield() {
    // SAFETY: a hint instruction: no memory, stack or flags effect.
    unsafe { core::arch::asm!("yield", options(nomem, nostack, preserves_flags)) };
}

/// A branch from `site` to `target` that may replace a NOP at `site` while other CPUs
/// run it (`B`: CMODX-safe), or why this architecture has none.
pub fn live_branch(site: usize, target: usize) -> Result<Insn, &'static str> {
    insn::b(site, target).map_err(|_| "the nosync branch target is out of B's range")
}

/// `BL` at `site` to `target`: CMODX-safe with the NOP and other BLs, so
/// [`patch_live`] changes call sites without a stop.
pub fn live_call(site: usize, target: usize) -> Result<Insn, &'static str> {
    insn::bl(site, target).map_err(|_| "the call target is out of BL's range")
}

/// None: a BL in flight is executed, old or new, never emulated.
pub fn live_calls_emulated() -> Option<u64> {
    None
}

/// Cross-CPU synchronisations one static key batch makes: one kick of every other CPU.
pub const SYNCS_PER_KEY_BATCH: u64 = 1;

/// Cross-CPU synchronisations made so far by static key flips, and the latest one `cpu`
/// took (arm64: the kick after each batch).
pub fn key_syncs() -> (u64, fn(usize) -> u64) {
    (
        crate::arch::aarch64::jump_label::kick_generation(),
        crate::arch::aarch64::jump_label::kick_acked,
    )
}

/// Patches `batch` while other CPUs may run it, without stopping them: on arm64 only
/// CMODX-safe pairs, through [`patch_nosync`](crate::patch::patch_nosync).
pub fn patch_live(batch: &[Patch<Insn>]) -> Result<(), PatchError<Insn>> {
    crate::patch::patch_nosync(&Platform, &KERNEL_TEXT, batch)
}

/// Normal-priority IPIs the self-tests may use.
pub const TEST_IPIS: [u32; 2] = [gic::TEST_SGIS[0], gic::TEST_SGIS[1]];

/// Installs `handler(cpu)` for test IPI `ipi`.
pub fn set_ipi_handler(ipi: u32, handler: fn(usize)) {
    gic::set_sgi_handler(ipi, handler);
}

/// Removes the handler of test IPI `ipi`.
pub fn clear_ipi_handler(ipi: u32) {
    gic::clear_sgi_handler(ipi);
}

/// Sends test IPI `ipi` to `targets`.
pub fn send_ipi(ipi: u32, targets: CpuSet) {
    gic::send_sgi(ipi, targets);
}

/// The NMI mechanism in use, or why there is none (`Err`: the NMI tests skip).
pub fn nmi_mechanism() -> Result<&'static str, &'static str> {
    match (nmi_mode::pseudo_nmi_enabled(), nmi_mode::feat_nmi_in_use()) {
        (true, true) => Ok("FEAT_NMI superpriority SGIs, PSTATE.ALLINT in the patch window"),
        (true, false) => Ok("GICv3 pseudo-NMI: IRQs off = ICC_PMR_EL1, NMIs = priority 0x20"),
        (false, true) => Err("FEAT_NMI in use with pseudo_nmi=off"),
        (false, false) => Err("pseudo_nmi=off: IRQs off = DAIF.I, no NMIs"),
    }
}

/// An NMI mechanism arm64 can run with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NmiMechanism {
    /// No NMIs: IRQs off is PSTATE.I.
    None,
    /// GICv3 pseudo-NMIs: IRQs off is ICC_PMR_EL1, NMIs are a priority it admits.
    PseudoNmi,
    /// FEAT_NMI superpriority interrupts (GICR_INMIR0, ICC_NMIAR1_EL1), PMR masking.
    FeatNmi,
}

impl NmiMechanism {
    /// Every mechanism, by its `expect_nmi=` spelling ([`name`](Self::name)).
    pub const ALL: [NmiMechanism; 3] = [Self::None, Self::PseudoNmi, Self::FeatNmi];

    /// The `expect_nmi=` spelling.
    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::PseudoNmi => "pseudo_nmi",
            Self::FeatNmi => "feat_nmi",
        }
    }
}

impl core::fmt::Display for NmiMechanism {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.name())
    }
}

/// What the mechanism is chosen from: the CPU, the GIC and the bootargs.
#[derive(Clone, Copy, Debug)]
pub struct NmiInputs {
    /// ID_AA64PFR1_EL1.NMI (bits 39:36): 1 = FEAT_NMI.
    cpu_nmi: u64,
    /// GICD_TYPER.NMI: the distributor has the NMI property.
    gic_nmi: bool,
    /// `pseudo_nmi=off`.
    off: bool,
    /// `platform_feat_nmi=off`: pseudo-NMIs even with FEAT_NMI.
    feat_off: bool,
}

impl core::fmt::Display for NmiInputs {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "ID_AA64PFR1_EL1.NMI={} GICD_TYPER.NMI={} pseudo_nmi={}{}",
            self.cpu_nmi,
            u8::from(self.gic_nmi),
            if self.off { "off" } else { "on" },
            if self.feat_off {
                " platform_feat_nmi=off"
            } else {
                ""
            }
        )
    }
}

/// The mechanism the calling CPU, the GIC and the bootargs call for, read afresh from
/// the hardware (not the boot's choice): none with `pseudo_nmi=off`; FEAT_NMI when
/// the CPU (ID_AA64PFR1_EL1.NMI) and the distributor (GICD_TYPER.NMI) both have it,
/// unless `platform_feat_nmi=off`; GICv3 pseudo-NMIs otherwise.
pub fn expected_nmi_mechanism() -> (NmiMechanism, NmiInputs) {
    let pfr1: u64;
    // SAFETY: reading an ID register has no side effect. By hand: aarch64-cpu 11.2's
    // ID_AA64PFR1_EL1 has no NMI field.
    unsafe {
        core::arch::asm!("mrs {}, S3_0_C0_C4_1", out(reg) pfr1, options(nomem, nostack, preserves_flags))
    };
    let gicd = boot_info().gicd.base;
    // SAFETY: GICD_TYPER (offset 4) of the distributor the DTB names, mapped as device
    // memory since boot; a read-only register, no side effect.
    let typer = unsafe { core::ptr::read_volatile((gicd + 4) as *const u32) };
    let inputs = NmiInputs {
        cpu_nmi: (pfr1 >> 36) & 0xf,
        gic_nmi: typer & nmi_mode::GICD_TYPER_NMI != 0,
        off: boot_info().bootarg("pseudo_nmi") == Some("off"),
        feat_off: boot_info().bootarg("platform_feat_nmi") == Some("off"),
    };
    let expected = if inputs.off {
        NmiMechanism::None
    } else if inputs.cpu_nmi >= 1 && inputs.gic_nmi && !inputs.feat_off {
        NmiMechanism::FeatNmi
    } else {
        NmiMechanism::PseudoNmi
    };
    (expected, inputs)
}

/// What the calling CPU really does, seen from its registers and one self-NMI.
#[derive(Clone, Copy, Debug, Default)]
pub struct NmiObserved {
    /// SCTLR_EL1.NMI.
    sctlr_nmi: bool,
    /// GICR_INMIR0 bits of the NMI and stop SGIs.
    inmir0: u32,
    /// "IRQs off" (`local_irq_save`): the PMR value, and PSTATE.I.
    pmr_off: u8,
    i_off: bool,
    /// A self-NMI sent with IRQs off: taken (at all), and through ICC_NMIAR1_EL1.
    taken: bool,
    superpriority: bool,
}

impl NmiObserved {
    /// The mechanism these observations add up to, `None` if they contradict each
    /// other.
    pub fn mechanism(&self) -> Option<NmiMechanism> {
        let both = 1 << gic::STOP_SGI | 1 << nmi::NMI_SGI;
        let pmr_masking = self.pmr_off == nmi_mode::PMR_IRQOFF && !self.i_off;
        match (self.sctlr_nmi, self.inmir0) {
            (true, i) if i == both && pmr_masking && self.taken && self.superpriority => {
                Some(NmiMechanism::FeatNmi)
            }
            (false, 0) if pmr_masking && self.taken && !self.superpriority => {
                Some(NmiMechanism::PseudoNmi)
            }
            (false, 0) if self.i_off && !self.taken => Some(NmiMechanism::None),
            _ => None,
        }
    }
}

impl core::fmt::Display for NmiObserved {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "SCTLR.NMI={} INMIR0={:#x} IRQs off: PMR {:#x} I={}, self-NMI {}",
            u8::from(self.sctlr_nmi),
            self.inmir0,
            self.pmr_off,
            u8::from(self.i_off),
            match (self.taken, self.superpriority) {
                (false, _) => "not taken",
                (true, false) => "taken (IAR1)",
                (true, true) => "taken (NMIAR1)",
            }
        )
    }
}

/// Observes the NMI mechanism the calling CPU really uses: SCTLR_EL1.NMI, its
/// redistributor's GICR_INMIR0, what "IRQs off" writes, and, when IRQs off is the
/// priority mask, whether a self-NMI gets through it and how it is acknowledged.
pub fn observe_nmi_mechanism() -> NmiObserved {
    let me = current_cpu();
    let sctlr: u64;
    // SAFETY: reading SCTLR_EL1 has no side effect.
    unsafe {
        core::arch::asm!("mrs {}, sctlr_el1", out(reg) sctlr, options(nomem, nostack, preserves_flags))
    };
    let mut seen = NmiObserved {
        sctlr_nmi: (sctlr >> 61) & 1 != 0,
        inmir0: gic::nmi_property(me) & (1 << gic::STOP_SGI | 1 << nmi::NMI_SGI),
        ..NmiObserved::default()
    };
    let flags = local_irq_save();
    seen.pmr_off = irqflags::pmr();
    seen.i_off = crate::arch::aarch64::cpu::daif() & crate::arch::aarch64::cpu::DAIF_I != 0;
    if !seen.i_off {
        let (taken0, acks0) = (gic::sgi_count(me, nmi::NMI_SGI), irq::superpriority_acks());
        nmi::send_nmi_self();
        let start = now_ns();
        while gic::sgi_count(me, nmi::NMI_SGI) == taken0 && now_ns() - start < 100_000_000 {
            core::hint::spin_loop();
        }
        seen.taken = gic::sgi_count(me, nmi::NMI_SGI) != taken0;
        seen.superpriority = irq::superpriority_acks() != acks0;
    }
    local_irq_restore(flags);
    seen
}

/// Whether a stop request reaches a CPU that spins with IRQs off: with NMIs the stop
/// IPI is NMI-class.
pub fn stop_ipi_reaches_irqs_off() -> bool {
    nmi_mode::pseudo_nmi_enabled()
}

/// Whether `patch_machine`'s window keeps NMIs out (`Err`: why not). On arm64
/// `mask_all` masks PSTATE.I (and ALLINT), which no NMI passes.
pub fn nmi_free_window() -> Result<(), &'static str> {
    Ok(())
}

/// All kernel code.
pub fn text_range() -> Range<usize> {
    layout::text_range()
}

/// Code the patcher must never touch: what the rendezvous runs (boot code included),
/// and the kprobes' hit path and XOL slots.
pub fn protected_ranges() -> [Range<usize>; 2] {
    [layout::nopatch_range(), layout::kprobes_range()]
}

/// General register `n` of a kprobe handler's frame (x0-x30).
pub fn kprobe_frame_reg(frame: &KprobeFrame, n: usize) -> u64 {
    frame.x.get(n).copied().unwrap_or(0)
}

/// Whether `frame`, after [`KPROBE_TARGET`]'s probed instruction (`ADD X1, X0, X0, LSL
/// #1`), shows its effect: X1 = 3 * X0.
pub fn kprobe_target_stepped(frame: &KprobeFrame) -> bool {
    kprobe_frame_reg(frame, 1) == kprobe_frame_reg(frame, 0).wrapping_mul(3)
}

/// Kprobes work here.
pub fn kprobes_unsupported() -> Option<&'static str> {
    None
}

/// An address kprobes must refuse as off the instruction grid, near `site`.
pub fn kprobe_misaligned_site(site: usize) -> Option<usize> {
    Some(site + 2)
}

/// Addresses kprobes must refuse for a region, with the region: the vector table
/// (exception entry), the core's hit path and the XOL slots (the machinery),
/// `.text.nopatch` past the vectors.
pub fn kprobe_forbidden_sites() -> [(crate::kprobes::Forbidden, usize); 4] {
    use crate::kprobes::{Forbidden, Kprobes};
    type Registry = Kprobes<KprobePlatform, { crate::arch::aarch64::kprobes::CAPACITY }>;
    let hit: fn(&Registry, usize, &mut KprobeFrame) -> _ = Registry::hit;
    let vectors = crate::arch::aarch64::boot::vectors();
    [
        (Forbidden::ExceptionEntry, vectors + 0x200),
        (Forbidden::Kprobes, hit as usize),
        (
            Forbidden::Kprobes,
            crate::arch::aarch64::kprobes::xol_area(),
        ),
        (Forbidden::NoPatch, vectors + 0x800),
    ]
}

unsafe extern "C" {
    fn pm_kp_target(x: u64) -> u64;
    fn pm_kp_target_site();
    fn pm_kp_ldxr_site();
    fn pm_kp_msr_site();
}

kprobe_fixtures! {
    "out of line (STR via SP)": pm_kp_xol_sp at pm_kp_xol_sp_site with [1, 2];
    "B": pm_kp_b at pm_kp_b_site with [1, 2];
    "BL": pm_kp_bl at pm_kp_bl_site with [1, 2];
    "B.EQ": pm_kp_beq at pm_kp_beq_site with [5, 6];
    "B.LT": pm_kp_blt at pm_kp_blt_site with [4, 5];
    "B.HI": pm_kp_bhi at pm_kp_bhi_site with [6, 5];
    "CBZ": pm_kp_cbz at pm_kp_cbz_site with [0, 1];
    "CBNZ (W)": pm_kp_cbnz_w at pm_kp_cbnz_w_site with [0x1_0000_0000, 1];
    "TBZ": pm_kp_tbz at pm_kp_tbz_site with [0, 8];
    "TBNZ": pm_kp_tbnz at pm_kp_tbnz_site with [1 << 40, 1];
    "ADR": pm_kp_adr at pm_kp_adr_site with [0, 1];
    "ADRP": pm_kp_adrp at pm_kp_adrp_site with [0, 1];
    "LDR (literal, X)": pm_kp_ldr_x at pm_kp_ldr_x_site with [0, 1];
    "LDR (literal, W)": pm_kp_ldr_w at pm_kp_ldr_w_site with [0, 1];
    "LDRSW (literal)": pm_kp_ldrsw at pm_kp_ldrsw_site with [0, 1];
    "RET": pm_kp_ret at pm_kp_ret_site with [0, 1];
    "BR": pm_kp_br at pm_kp_br_site with [0, 1];
    "BLR": pm_kp_blr at pm_kp_blr_site with [0, 1];
}

/// The hammered target: returns `x * 3 + 7` (wrapping), probed at its first instruction
/// (run out of line).
pub const KPROBE_TARGET: Option<KprobeFixture> = Some(KprobeFixture {
    name: "ADD (shifted register)",
    call: pm_kp_target,
    site: pm_kp_target_site,
    args: [0, 1],
});

/// Instructions kprobes must refuse as unprobeable.
pub const KPROBE_UNPROBEABLE: &[(&str, unsafe extern "C" fn())] =
    &[("LDXR", pm_kp_ldxr_site), ("MSR DAIFSet", pm_kp_msr_site)];

core::arch::global_asm!(include_str!("targets_aarch64.S"));

pub use crate::arch::aarch64::user::{
    Program as UserProgram, Tick as UserTick, UserExit, has_pan as user_pan,
    post_to_mailbox as post_to_user, set_tick_hook as set_user_tick, ticks as user_ticks,
    user_irqs,
};

/// The kernel entry from user mode up to its deferred work (patching must refuse it).
pub fn user_entry_code() -> Option<usize> {
    Some(crate::arch::aarch64::exceptions::from_user as *const () as usize)
}

/// User mode exists here (EL0).
pub fn user_mode_unsupported() -> Option<&'static str> {
    None
}

/// Runs `program` at EL0 on the calling CPU until it exits or faults (IRQs enabled).
pub fn run_user(program: UserProgram) -> UserExit {
    crate::arch::aarch64::user::run_user(program)
}

/// Every CPU's context state word (`crate::stop::ContextStates`).
pub fn contexts() -> &'static crate::stop::ContextStates {
    &crate::arch::aarch64::user_context::USER_CONTEXTS
}

/// Static-key kick targets deferred to their next kernel entry so far.
pub fn kicks_deferred() -> u64 {
    crate::arch::aarch64::jump_label::kicks_deferred()
}

/// Whether `exit` is the fault a user access to `addr` must take: a data abort from EL0
/// (ESR EC 0x24) at `addr` for loads and stores, an instruction abort from EL0 (EC 0x20)
/// for a branch, with a permission or translation fault status.
pub fn user_fault_is_refused_access(exit: &UserExit, addr: usize, exec: bool) -> bool {
    let UserExit::Fault { esr, far, .. } = *exit else {
        return false;
    };
    let ec = (esr >> 26) & 0x3f;
    let fsc = esr & 0x3f;
    let refused = matches!(fsc, 0x04..=0x07 | 0x0c..=0x0f);
    ec == if exec { 0x20 } else { 0x24 } && far == addr as u64 && refused
}

/// Why the firmware refused to start or report on a CPU (a PSCI error).
pub type HotplugFirmwareError = smccc::psci::error::Error;

/// How a CPU goes down and comes back here.
pub const HOTPLUG_MECHANISM: &str = "PSCI CPU_OFF / CPU_ON";

/// Starts offline CPU `cpu` again (PSCI CPU_ON at the secondary entry).
pub fn cpu_power_on(cpu: usize) -> Result<(), HotplugFirmwareError> {
    crate::arch::aarch64::smp::cpu_power_on(cpu)
}

/// Whether `cpu` is down (PSCI AFFINITY_INFO says OFF).
pub fn cpu_is_down(cpu: usize) -> Result<bool, HotplugFirmwareError> {
    crate::arch::aarch64::smp::cpu_powered_off(cpu)
}
