//! The kernel's platform names on x86_64 (see the table in the parent module).

use crate::arch::x86_64::{boot, cpu, layout, smp};
use crate::patch::{Patch, PatchError, x86};
use core::ops::Range;

pub use crate::arch::write_probe::set_write_probe;
pub use crate::arch::x86_64::console::{write_forced, write_raw_forced};
pub use crate::arch::x86_64::exit::exit;
pub use crate::arch::x86_64::ipi::{TEST_IPIS, clear_ipi_handler, send_ipi, set_ipi_handler};
pub use crate::arch::x86_64::irq::{IrqFlags, irqs_disabled, local_irq_restore, local_irq_save};
pub use crate::arch::x86_64::paging::alias_mapped;
pub use crate::arch::x86_64::smp::online_cpus;
pub use crate::arch::x86_64::text::{KERNEL_TEXT, KernelText};
pub use crate::arch::x86_64::timer::now_ns;
pub use crate::arch::x86_64::{STOP, X86_64 as Platform, nmi};
pub use crate::patch::x86::Insn;

/// Bytes of one patch site: `MOV $imm32, %eax` and the 5-byte NOP.
pub const SITE_LEN: usize = 5;

/// The 5-byte NOP the Intel SDM recommends (`nopl 0x0(%rax,%rax,1)`).
pub const NOP: Insn = match x86::nop(SITE_LEN) {
    Ok(nop) => nop,
    Err(_) => panic!("SITE_LEN has a recommended NOP"),
};

/// Masks interrupts on the calling CPU for good (`cli`): the panic handler's first
/// step. NMIs still arrive; the run ends before that matters.
pub fn mask_for_panic() {
    cpu::cli_save();
}

/// The calling CPU's index.
pub fn current_cpu() -> usize {
    cpu::current_cpu()
}

/// CPUs the ACPI MADT lists.
pub fn cpu_count() -> usize {
    smp::cpu_count()
}

/// The kernel command line (PVH start info).
pub fn bootargs() -> &'static str {
    boot::cmdline()
}

/// `MOV $value, %eax`: a site that makes its function return `value`.
pub fn returning(value: u16) -> Insn {
    x86::mov_eax_imm32(u32::from(value))
}

/// `PAUSE`: under single-threaded TCG it ends the vCPU's turn, so the poster of a job
/// runs; no interrupt is needed to leave it.
pub fn idle_wait() {
    cpu::pause();
}

/// Nothing to do: [`idle_wait`] does not sleep.
pub fn wake_idle() {}

/// `PAUSE` (see [`idle_wait`]).
pub fn cpu_yield() {
    cpu::pause();
}

/// `JMP rel32` from `site` to `target`: the live pair (with the 5-byte NOP) that
/// [`patch_live`] changes through the INT3 protocol.
pub fn live_branch(site: usize, target: usize) -> Result<Insn, &'static str> {
    x86::jmp_rel32(site, target).map_err(|_| "the branch target is out of rel32 range")
}

/// Patches `batch` while other CPUs may run it, without stopping them: the INT3
/// protocol (`text_poke_bp`, Linux's `text_poke_bp_batch`).
pub fn patch_live(batch: &[Patch<Insn>]) -> Result<(), PatchError<Insn>> {
    crate::arch::x86_64::text_poke::text_poke_bp(&KERNEL_TEXT, batch)
}

/// NMIs through the local APIC always exist on x86.
pub fn nmi_mechanism() -> Result<&'static str, &'static str> {
    Ok("APIC NMIs (delivery mode NMI); IRQs off = RFLAGS.IF, which NMIs pass")
}

/// The stop IPI is a normal vector: a CPU spinning with IF clear is not reached (the
/// arrival timeout names it).
pub fn stop_ipi_reaches_irqs_off() -> bool {
    false
}

/// `cli` does not keep NMIs out of `patch_machine`'s window on x86.
pub fn nmi_free_window() -> Result<(), &'static str> {
    Err(
        "x86: cli cannot keep NMIs out of the patch window; an NMI-free window (write from NMI context, or NMI-blocked state) is not implemented yet",
    )
}

/// All kernel code.
pub fn text_range() -> Range<usize> {
    layout::text_range()
}

/// Code the patcher must never touch: what the rendezvous runs (with boot code).
pub fn protected_ranges() -> [Range<usize>; 2] {
    [layout::nopatch_range(), layout::boot_range()]
}

core::arch::global_asm!(include_str!("targets_x86_64.S"), options(att_syntax));
