//! NMIs: the NMI IPI, the per-CPU NMI state, and the NMI handlers.
//!
//! An NMI is the SGI [`NMI_SGI`], NMI-class in the sense of [`super::nmi_mode`]: a
//! GICv3 pseudo-NMI (priority [`super::nmi_mode::PRIO_NMI`], taken while IRQs are
//! PMR-masked) or a FEAT_NMI superpriority interrupt (taken even with PSTATE.I set).
//! Only [`super::irqflags::mask_all`] (PSTATE.I, and ALLINT with FEAT_NMI) keeps one out. With
//! `pseudo_nmi=off` there are no NMIs: the senders below do nothing.
//!
//! NMIs coalesce (an SGI is pending or not), so an NMI carries no message: the handler
//! runs every registered handler, in slot order, and each checks whether it has work
//! of its own and says whether it did. Slot 0 is the stop machine's
//! ([`super::STOP`]`.handle_nmi()`, with the `stop-machine-nmi` feature), so the stop
//! function takes priority over any other NMI work (as in Ankur Arora,
//! "x86/alternatives: NMI safe runtime patching", LKML, 2020). Handlers run with
//! PSTATE.I (and ALLINT) set and the GIC running priority at NMI level: no other NMI can
//! preempt them. They must take no lock that code with only IRQs masked may hold, and
//! must not fault.

use super::{cpu, gic, nmi_mode, smp};
use crate::nmi_handlers::NmiHandlers;
use crate::{CpuSet, MAX_CPUS};
use core::sync::atomic::{AtomicU64, Ordering};

pub use super::gic::NMI_SGI;
pub use crate::nmi_handlers::{NMI_SLOTS, STOP_MACHINE_SLOT};

/// The NMI handlers (slot 0, the stop machine's, is called directly).
static HANDLERS: NmiHandlers = NmiHandlers::new();
/// Per CPU: NMI handlers in progress (in `nesting`, so that `call_context` reads it).
use super::nesting::IN_NMI;
/// Per CPU: NMIs taken.
static TAKEN: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
/// Per CPU: NMIs no handler claimed.
static UNCLAIMED: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];

/// Whether this machine has NMIs (`pseudo_nmi=on`, the default).
#[inline(always)]
pub fn nmis_available() -> bool {
    nmi_mode::pseudo_nmi_enabled()
}

/// Sends an NMI to every online CPU in `targets` (the caller too, if it is in the set).
/// Lock-free; callable with anything masked, from NMI context too. Does nothing without
/// NMIs ([`nmis_available`]).
#[unsafe(link_section = ".text.nopatch")]
pub fn send_nmi(targets: CpuSet) {
    if !nmis_available() {
        return;
    }
    // Only online CPUs: one still booting might have its NMI property set up but not
    // yet its ALLINT mask (FEAT_NMI) or its vectors.
    gic::send_sgi(NMI_SGI, targets.and(smp::online_cpus()));
}

/// Sends an NMI to every other online CPU.
#[inline(always)]
pub fn send_nmi_all_but_self() {
    send_nmi(smp::online_cpus().without(cpu::current_cpu()));
}

/// Sends an NMI to the calling CPU.
#[inline(always)]
pub fn send_nmi_self() {
    send_nmi(CpuSet::single(cpu::current_cpu()));
}

/// Whether the calling CPU is running NMI handlers.
#[inline(always)]
pub fn in_nmi() -> bool {
    super::nesting::in_nmi_of(cpu::current_cpu())
}

/// How many NMIs `cpu` has taken.
pub fn nmis_taken(cpu: usize) -> u64 {
    TAKEN.get(cpu).map_or(0, |n| n.load(Ordering::Relaxed))
}

/// How many NMIs `cpu` took that no handler claimed.
pub fn unclaimed_nmis(cpu: usize) -> u64 {
    UNCLAIMED.get(cpu).map_or(0, |n| n.load(Ordering::Relaxed))
}

/// Registers `f(cpu)` in NMI handler slot `slot` (replacing any earlier one). It runs on
/// every NMI, after the handlers of lower slots, in NMI context (see the module docs),
/// and returns whether it found work of its own.
///
/// # Panics
/// If `slot` is [`STOP_MACHINE_SLOT`] (reserved) or not below [`NMI_SLOTS`].
pub fn register_nmi_handler(slot: usize, f: fn(cpu: usize) -> bool) {
    HANDLERS.register(slot, f);
}

/// Empties NMI handler slot `slot`. An NMI already running the handler on another CPU
/// finishes it.
pub fn unregister_nmi_handler(slot: usize) {
    HANDLERS.unregister(slot);
}

/// The NMI: runs every handler in slot order. Called by [`super::irq::handle_irq_exception`]
/// with PSTATE.I (and ALLINT) set, between the acknowledge and the EOI of [`NMI_SGI`].
#[unsafe(link_section = ".text.nopatch")]
pub(crate) fn run_handlers(cpu: usize) {
    let (Some(in_nmi), Some(taken)) = (IN_NMI.get(cpu), TAKEN.get(cpu)) else {
        return;
    };
    in_nmi.fetch_add(1, Ordering::Relaxed);
    taken.fetch_add(1, Ordering::Relaxed);
    #[cfg(feature = "stop-machine-nmi")]
    let mut claimed = super::STOP.handle_nmi();
    #[cfg(not(feature = "stop-machine-nmi"))]
    let mut claimed = false;
    claimed |= HANDLERS.run(cpu);
    if !claimed && let Some(n) = UNCLAIMED.get(cpu) {
        n.fetch_add(1, Ordering::Relaxed);
    }
    in_nmi.fetch_sub(1, Ordering::Relaxed);
}

// SAFETY: `send_self_nmi` sends NMI_SGI to the calling CPU. With NMIs (`pseudo_nmi=on`)
// it is NMI-class: priority PRIO_NMI < PMR_IRQOFF, so `mask_irqs` (PMR = PMR_IRQOFF,
// PSTATE.I and ALLINT cleared) lets it in, while `mask_all` (PSTATE.I, and ALLINT with
// FEAT_NMI, which is what masks a superpriority interrupt) keeps it out. It never nests:
// its handler runs with PSTATE.I and ALLINT set from exception entry and the running
// priority at NMI level until its EOI. The handler (`run_handlers`) calls
// `STOP.handle_nmi()` first. With `pseudo_nmi=off` no NMI exists and nothing is raised:
// the core's bounded wait then reports ETIMEDOUT for that CPU and withdraws the request,
// so the function never runs outside NMI context.
#[cfg(feature = "stop-machine-nmi")]
unsafe impl crate::stop::NmiArch for super::Aarch64 {
    #[inline(always)]
    fn send_self_nmi(&self) {
        send_nmi_self();
    }
}
