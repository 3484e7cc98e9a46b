//! "IRQs off" under the names the kernel proper uses on every architecture. On x86 this
//! is RFLAGS.IF alone: NMIs pass it (nothing software-controlled masks them).

use super::cpu;

/// Saved interrupt state (RFLAGS).
pub type IrqFlags = u64;

/// Disables interrupts and returns the previous state.
#[inline(always)]
pub fn local_irq_save() -> IrqFlags {
    cpu::cli_save()
}

/// Restores the state returned by [`local_irq_save`].
#[inline(always)]
pub fn local_irq_restore(flags: IrqFlags) {
    cpu::restore_if(flags)
}

/// Whether interrupts are disabled on the calling CPU.
#[inline(always)]
pub fn irqs_disabled() -> bool {
    !cpu::irqs_enabled()
}
