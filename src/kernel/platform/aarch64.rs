//! The kernel's platform names on aarch64 (see the table in the parent module).

use crate::CpuSet;
use crate::arch::aarch64::{boot_info, cpu, gic, layout, nmi_mode};
use crate::patch::{Patch, PatchError, insn};
use core::ops::Range;

pub use crate::arch::aarch64::console::{write_forced, write_raw_forced};
pub use crate::arch::aarch64::exit::exit;
pub use crate::arch::aarch64::irqflags::{
    IrqFlags, irqs_disabled, local_irq_restore, local_irq_save,
};
pub use crate::arch::aarch64::mmu::alias_mapped;
pub use crate::arch::aarch64::smp::{current_cpu, online_cpus};
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

/// Bytes of one patch site.
pub const SITE_LEN: usize = 4;

/// CPUs the DTB lists.
pub fn cpu_count() -> usize {
    boot_info().cpu_count
}

/// The kernel command line.
pub fn bootargs() -> &'static str {
    boot_info().bootargs
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

/// Code the patcher must never touch: what the rendezvous runs, and boot code.
pub fn protected_ranges() -> [Range<usize>; 2] {
    [layout::nopatch_range(), layout::boot_range()]
}

core::arch::global_asm!(include_str!("targets_aarch64.S"));
