//! The IRQ exception: acknowledge, dispatch, end.
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

use super::irqflags::{handler_close_nmis, handler_open_nmis};
use super::nmi_mode::{NmiMode, PMR_IRQOFF, nmi_mode};
use super::{cpu, gic, nmi};
use core::sync::atomic::{AtomicU64, Ordering};

/// Interrupts acknowledged through ICC_NMIAR1_EL1 (superpriority), all CPUs.
static NMIAR1_ACKS: AtomicU64 = AtomicU64::new(0);

/// How many interrupts were acknowledged as superpriority NMIs (ICC_NMIAR1_EL1) so far,
/// on all CPUs: evidence that FEAT_NMI delivery is really in use.
pub fn superpriority_acks() -> u64 {
    NMIAR1_ACKS.load(Ordering::Relaxed)
}

/// The IRQ exception (from the vectors via [`super::exceptions`], everything masked;
/// `depth` and `interrupted_pmr` from its trap frame): acknowledges and handles
/// interrupts until none is pending (see the module docs).
/// An error is a broken invariant the caller reports as fatal.
#[unsafe(link_section = ".text.nopatch")]
pub(crate) fn handle_irq_exception(depth: u64, interrupted_pmr: u64) -> Result<(), &'static str> {
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
            handler_close_nmis(interrupted_pmr);
        } else {
            if depth > 1 {
                gic::eoi(iar);
                return Err("a normal-priority interrupt preempted an exception handler");
            }
            if mode != NmiMode::None {
                handler_open_nmis();
            }
            gic::dispatch(cpu, intid);
            if mode != NmiMode::None {
                handler_close_nmis(interrupted_pmr);
            }
            gic::eoi(iar);
        }
    }
    Ok(())
}
