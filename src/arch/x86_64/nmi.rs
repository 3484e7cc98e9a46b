//! NMIs: NMI IPIs through the local APIC, per-CPU NMI state and the handler registry.
//!
//! x86 NMIs cannot be masked by RFLAGS.IF: `cli` keeps out normal interrupts only. Only
//! the CPU's own NMI blocking (from NMI delivery until the next `iretq`) holds one
//! back, and it latches at most one more. So an NMI carries no message: senders count
//! requests per target in software (`REQUESTS`) before raising the NMI, and the
//! handler drains the count and runs every registered handler until no request is
//! left; each handler checks for work of its own. Slot 0 is the stop machine's.
//!
//! Handlers run on the NMI IST stack with IF clear; they must take no lock that
//! interrupted code may hold and must not print. They may take an exception (the INT3
//! protocol's #BP): its `iretq` ends NMI blocking early, but the entry stub
//! (`x86_stub_2` in `boot/x86_64/vectors.S`) latches an NMI arriving then and runs the
//! handlers again once the first pass is done, never on top of it ([`nmis_latched`]).

use super::{apic, cpu, ipi, smp};
use crate::nmi_handlers::NmiHandlers;
use crate::{CpuSet, MAX_CPUS};
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

pub use crate::nmi_handlers::{NMI_SLOTS, STOP_MACHINE_SLOT};

/// The NMI handlers (slot 0, the stop machine's, is called directly).
static HANDLERS: NmiHandlers = NmiHandlers::new();
/// Per CPU: NMI handlers in progress (in `nesting`, so that `call_context` reads it).
use super::nesting::IN_NMI;
static TAKEN: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
static UNCLAIMED: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
/// Per target CPU: NMI requests not yet handled.
static REQUESTS: [AtomicU32; MAX_CPUS] = [const { AtomicU32::new(0) }; MAX_CPUS];
/// Per CPU: requests the handler drained (each request counted once, when drained).
static DRAINED: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
/// Nested NMIs the entry stub latched (turned into a repeat of the outer NMI's
/// handlers), all CPUs; incremented by the stub with `lock incq`.
pub(super) static NMI_LATCHED: AtomicU64 = AtomicU64::new(0);

/// Per CPU: nested NMIs the entry stub latched there (`lock incq`, indexed by the CPU
/// index at `%gs:0`).
pub(super) static NMI_LATCHED_BY: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
/// Per CPU: latches a repeat pass answered (its handlers ran after them, before the
/// outer NMI returned), the repeat passes that answered any, and latches whose outer
/// NMI returned without a repeat for them (seen at the next NMI's first pass).
static LATCHES_ANSWERED: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
static REPEAT_PASSES: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
static LATCHES_LOST: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];

/// Per CPU: set while a repeat pass (one that answers a latch) runs the handlers.
static IN_REPEAT: [AtomicBool; MAX_CPUS] = [const { AtomicBool::new(false) }; MAX_CPUS];

/// Whether the calling CPU's NMI handlers are running again for a latched NMI.
pub fn in_repeat_pass() -> bool {
    // Relaxed: only this CPU writes its slot.
    IN_REPEAT
        .get(cpu::current_cpu())
        .is_some_and(|r| r.load(Ordering::Relaxed))
}

/// What the nested-NMI latch did on one CPU since boot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LatchCounts {
    /// Nested NMIs the entry stub latched.
    pub latched: u64,
    /// Latches a repeat pass of their outer NMI answered.
    pub answered: u64,
    /// Repeat passes that answered at least one latch.
    pub repeats: u64,
    /// Latches whose outer NMI returned without repeating for them.
    pub lost: u64,
}

/// The nested-NMI latch counts of `cpu`.
pub fn latch_counts(cpu: usize) -> LatchCounts {
    let get = |a: &[AtomicU64; MAX_CPUS]| a.get(cpu).map_or(0, |n| n.load(Ordering::Relaxed));
    LatchCounts {
        latched: get(&NMI_LATCHED_BY),
        answered: get(&LATCHES_ANSWERED),
        repeats: get(&REPEAT_PASSES),
        lost: get(&LATCHES_LOST),
    }
}

/// How many nested NMIs the entry stub latched, on all CPUs, since boot.
pub fn nmis_latched() -> u64 {
    NMI_LATCHED.load(Ordering::Relaxed)
}

/// How many NMI requests (one per NMI sent to it) `cpu`'s handler has drained.
pub fn requests_drained(cpu: usize) -> u64 {
    DRAINED.get(cpu).map_or(0, |n| n.load(Ordering::Relaxed))
}

#[inline(always)]
fn request(cpu: usize) {
    // Release pairs with the handler's Acquire swap: whatever the sender prepared for
    // the handler is visible once it sees the request.
    REQUESTS[cpu].fetch_add(1, Ordering::Release);
}

/// Sends an NMI to every online CPU in `targets` (the caller too, if in the set) in
/// the cheapest form that names exactly them ([`ipi::form_for`]: the shorthand for all
/// others, x2APIC clusters, or one by one). Callable with interrupts off and from NMI
/// context.
#[unsafe(link_section = ".text.nopatch")]
pub fn send_nmi(targets: CpuSet) {
    let targets = targets.and(smp::online_cpus());
    for t in targets.iter() {
        request(t);
    }
    ipi::send_to(targets, apic::DM_NMI, ipi::form_for(targets));
}

/// Sends an NMI to every other online CPU: with the all-excluding-self shorthand when
/// every CPU the MADT lists is online (otherwise it would also hit a CPU still waiting
/// for its SIPI, and QEMU then starts it at the reset vector), else as [`send_nmi`].
#[unsafe(link_section = ".text.nopatch")]
pub fn send_nmi_all_but_self() {
    send_nmi(smp::online_cpus().without(cpu::current_cpu()));
}

/// Sends an NMI to the calling CPU, by its own APIC ID (the "self" shorthand is not
/// valid for NMIs per the SDM).
#[unsafe(link_section = ".text.nopatch")]
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

/// Registers `f(cpu)` in slot `slot` (1..NMI_SLOTS); it runs on every NMI, after the
/// lower slots, and says whether it found work of its own.
///
/// # Panics
/// If `slot` is [`STOP_MACHINE_SLOT`] or not below [`NMI_SLOTS`].
pub fn register_nmi_handler(slot: usize, f: fn(cpu: usize) -> bool) {
    HANDLERS.register(slot, f);
}

/// Empties slot `slot`. A handler already running elsewhere finishes.
pub fn unregister_nmi_handler(slot: usize) {
    HANDLERS.unregister(slot);
}

#[unsafe(link_section = ".text.nopatch")]
fn run_handlers(cpu: usize) -> bool {
    // The stop machine first (as in Ankur Arora's NMI-safe runtime patching), then every registered handler.
    #[cfg(feature = "stop-machine-nmi")]
    let claimed = super::STOP.handle_nmi();
    #[cfg(not(feature = "stop-machine-nmi"))]
    let claimed = false;
    claimed | HANDLERS.run(cpu)
}

/// Books the latches this pass answers (`answering`, from the frame): every latch the
/// stub counted on this CPU must be answered by now, by an earlier repeat pass of its
/// own outer NMI or by this one; any other was lost (its outer NMI returned first).
#[unsafe(link_section = ".text.nopatch")]
fn account_latches(cpu: usize, answering: u64) {
    let (Some(latched), Some(answered), Some(repeats), Some(lost)) = (
        NMI_LATCHED_BY.get(cpu),
        LATCHES_ANSWERED.get(cpu),
        REPEAT_PASSES.get(cpu),
        LATCHES_LOST.get(cpu),
    ) else {
        return;
    };
    // Relaxed: only this CPU writes these (the stub's increments run on this CPU, and
    // finish before this code resumes).
    let latched = latched.load(Ordering::Relaxed);
    let unanswered = latched
        .saturating_sub(answered.load(Ordering::Relaxed))
        .saturating_sub(answering);
    if unanswered != 0 {
        lost.fetch_add(unanswered, Ordering::Relaxed);
    }
    answered.store(latched, Ordering::Relaxed);
    if answering != 0 {
        repeats.fetch_add(1, Ordering::Relaxed);
    }
}

/// The NMI vector (2), on the NMI IST stack, NMIs blocked until `iretq`.
///
/// # Safety
/// `latches` is the error code slot of this NMI's frame, where the entry stub counts
/// the nested NMIs this pass answers; nothing but this CPU's nested NMIs (one `incq`
/// each) touches it meanwhile.
#[unsafe(link_section = ".text.nopatch")]
pub(crate) unsafe fn handle_nmi(latches: *mut u64) {
    let cpu = cpu::processor_id_nopatch();
    let (Some(in_nmi), Some(taken), Some(requests), Some(drained)) = (
        IN_NMI.get(cpu),
        TAKEN.get(cpu),
        REQUESTS.get(cpu),
        DRAINED.get(cpu),
    ) else {
        return;
    };
    // SAFETY: aligned (a stack slot) and valid for the whole pass (the caller); the
    // swap is one `xchg`, so a nested NMI's `incq` lands before or after it, never lost.
    let answering = unsafe { AtomicU64::from_ptr(latches) }.swap(0, Ordering::Relaxed);
    account_latches(cpu, answering);
    let repeat = IN_REPEAT.get(cpu);
    if let Some(r) = repeat {
        r.store(answering != 0, Ordering::Relaxed);
    }
    in_nmi.fetch_add(1, Ordering::Relaxed);
    taken.fetch_add(1, Ordering::Relaxed);
    // Drain: requests that arrived while NMIs were blocked were latched once at most.
    // Acquire pairs with the senders' Release in `request`.
    let mut claimed = false;
    let mut rounds = 0;
    loop {
        let pending = requests.swap(0, Ordering::Acquire);
        drained.fetch_add(u64::from(pending), Ordering::Relaxed);
        claimed |= run_handlers(cpu);
        rounds += 1;
        // Bounded: a sender storm cannot keep one NMI running forever; requests left
        // over are picked up by the NMI that is latched for them.
        if pending == 0 || rounds >= 64 || requests.load(Ordering::Acquire) == 0 {
            break;
        }
    }
    if !claimed && let Some(n) = UNCLAIMED.get(cpu) {
        n.fetch_add(1, Ordering::Relaxed);
    }
    if let Some(r) = repeat {
        r.store(false, Ordering::Relaxed);
    }
    in_nmi.fetch_sub(1, Ordering::Relaxed);
}

// SAFETY: `send_self_nmi` raises an NMI on the calling CPU through its own APIC ID. x86
// NMIs are not masked by RFLAGS.IF, so it is taken inside `mask_irqs` (`cli`), and
// equally inside `mask_all` (also `cli`): on x86 `mask_all` cannot keep NMIs out,
// which is why the core only sends self-NMIs in `IrqsOnly` windows. It never nests: the
// CPU blocks NMIs from NMI delivery until `iretq`, and an NMI arriving after an
// exception's `iretq` inside the handler is latched by the entry stub and run after.
// The handler (`handle_nmi` -> `run_handlers`) calls `STOP.handle_nmi()` before any
// other handler.
#[cfg(feature = "stop-machine-nmi")]
unsafe impl crate::stop::NmiArch for super::X86_64 {
    #[inline(always)]
    fn send_self_nmi(&self) {
        send_nmi_self();
    }
}
