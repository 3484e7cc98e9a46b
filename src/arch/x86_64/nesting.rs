//! Per-CPU NMI nesting (`nmi.rs`'s) and count of trap handlers in flight other than the
//! NMI's (the trap dispatcher's, [`super::traps`]), both read by
//! [`crate::stop::Arch::call_context`]. A leaf, so that all of them can use it.

use super::cpu;
use crate::MAX_CPUS;
use core::sync::atomic::{AtomicU32, Ordering};

/// Per CPU: NMI handlers in progress (0 or 1: NMIs do not nest), maintained by
/// `nmi.rs`.
pub(super) static IN_NMI: [AtomicU32; MAX_CPUS] = [const { AtomicU32::new(0) }; MAX_CPUS];

/// Whether `cpu` is running NMI handlers (read on `cpu` itself).
#[inline(always)]
pub fn in_nmi_of(cpu: usize) -> bool {
    // Relaxed: only `cpu` writes its slot, and it sees its own writes in order.
    IN_NMI
        .get(cpu)
        .is_some_and(|n| n.load(Ordering::Relaxed) != 0)
}

/// Per CPU: trap handlers other than the NMI's in flight.
static IN_HANDLER: [AtomicU32; MAX_CPUS] = [const { AtomicU32::new(0) }; MAX_CPUS];

/// The calling CPU's count, for the dispatcher to bump around a handler.
#[inline(always)]
pub(super) fn counter() -> Option<&'static AtomicU32> {
    IN_HANDLER.get(cpu::current_cpu())
}

/// Whether the calling CPU is inside an interrupt or exception handler (the NMI's is
/// [`super::nmi::in_nmi`]).
#[inline(always)]
pub fn in_handler() -> bool {
    // Relaxed: only this CPU writes its slot, and it sees its own writes in order.
    counter().is_some_and(|n| n.load(Ordering::Relaxed) != 0)
}
