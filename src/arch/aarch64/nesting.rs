//! Per-CPU NMI nesting (`nmi.rs`'s) and exception nesting depth (the vectors',
//! `boot/aarch64/vectors.S`, through `DEPTH`'s symbol), read by the exception handler
//! and by [`crate::stop::Arch::call_context`]. A leaf, so that all of them can use it.

use crate::MAX_CPUS;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

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

/// Per-CPU exception nesting depth, maintained by the vectors with plain loads/stores
/// (only the owning CPU touches its slot).
pub(crate) static DEPTH: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];

/// `cpu`'s exception nesting depth (0 in normal code).
#[inline(always)]
pub fn depth_of(cpu: usize) -> u64 {
    // Relaxed: only `cpu` writes its slot; read on `cpu` itself, in program order.
    DEPTH.get(cpu).map_or(0, |d| d.load(Ordering::Relaxed))
}
