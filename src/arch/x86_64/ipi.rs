//! The IPI vectors ([`STOP_VECTOR`], [`TEST_IPIS`], [`SYNC_VECTOR`]). Normal-priority
//! IPIs for the self-tests: two fixed vectors, each with one handler `fn(cpu)`, run
//! with interrupts off after the EOI; and the sync IPI of the INT3 protocol
//! ([`sync_all`]). The stop IPI's handler is the stop machine's (see [`super::traps`]).

use super::{apic, cpu, smp, timer};
use crate::CpuSet;
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// The stop-IPI vector (highest priority class, so nothing normal delays it).
pub const STOP_VECTOR: u8 = 0xf0;

/// The test IPI vectors (priority class 14: below the stop IPI's 15).
pub const TEST_IPIS: [u32; 2] = [0xe0, 0xe1];

/// Handlers: a `fn(usize)` as usize, 0 = none.
static HANDLERS: [AtomicUsize; 2] = [const { AtomicUsize::new(0) }; 2];

fn slot(ipi: u32) -> usize {
    TEST_IPIS
        .iter()
        .position(|&v| v == ipi)
        .unwrap_or_else(|| panic!("IPI {ipi:#x} is not one of the test IPIs {TEST_IPIS:x?}"))
}

/// Installs `handler(cpu)` for test IPI `ipi`.
pub fn set_ipi_handler(ipi: u32, handler: fn(usize)) {
    // Release pairs with the Acquire in `dispatch`: what the handler relies on that was
    // set up before is visible when it runs.
    HANDLERS[slot(ipi)].store(handler as usize, Ordering::Release);
}

/// Removes the handler of test IPI `ipi` (one already running finishes).
pub fn clear_ipi_handler(ipi: u32) {
    HANDLERS[slot(ipi)].store(0, Ordering::Release);
}

/// Sends test IPI `ipi` to every online CPU in `targets` (the caller too, if in it).
/// In `.text.nopatch`: the patch-masking self-test sends it from inside the patch window.
#[unsafe(link_section = ".text.nopatch")]
pub fn send_ipi(ipi: u32, targets: CpuSet) {
    let vector = TEST_IPIS[slot(ipi)];
    let saved = cpu::cli_save();
    for t in targets.and(smp::online_cpus()).iter() {
        apic::send_ipi(smp::apic_id(t), apic::DM_FIXED | vector);
    }
    cpu::restore_if(saved);
}

/// Runs the handler of test IPI `ipi` (from the trap dispatch, after the EOI). Part of
/// the trap path, so it lives in `.text.nopatch` with it.
#[unsafe(link_section = ".text.nopatch")]
pub(crate) fn dispatch(ipi: u32) {
    let Some(i) = TEST_IPIS.iter().position(|&v| v == ipi) else {
        return;
    };
    // Acquire pairs with the Release in `set_ipi_handler`.
    let f = HANDLERS[i].load(Ordering::Acquire);
    if f != 0 {
        // SAFETY: only `set_ipi_handler` stores non-zero values: `fn(usize)` pointers.
        let f: fn(usize) = unsafe { core::mem::transmute(f) };
        f(cpu::current_cpu());
    }
}

/// The sync IPI vector (priority class 15, with the stop IPI): its handler executes a
/// serialising instruction and acknowledges, for [`sync_all`].
pub const SYNC_VECTOR: u8 = 0xf1;

/// Generation of the latest [`sync_all`] request.
static SYNC_GEN: AtomicU64 = AtomicU64::new(0);
/// Per CPU: the latest generation it serialised for.
static SYNC_ACK: [AtomicU64; crate::MAX_CPUS] = [const { AtomicU64::new(0) }; crate::MAX_CPUS];

/// The sync IPI's handler (from the trap dispatch, after the EOI): serialise, then
/// acknowledge. Code the INT3 protocol runs, so it lives in `.text.nopatch`.
#[unsafe(link_section = ".text.nopatch")]
pub(crate) fn handle_sync() {
    // Acquire pairs with the AcqRel increment in `sync_all`: the generation read is at
    // least the one whose IPI brought us here (a later one is fine: it was requested
    // after the earlier writes too, and we serialise after reading it).
    let generation = SYNC_GEN.load(Ordering::Acquire);
    cpu::serialize();
    if let Some(ack) = SYNC_ACK.get(cpu::current_cpu()) {
        // Release pairs with the Acquire load in `sync_all`'s wait: the serialisation
        // above happened before the requester sees the acknowledgement.
        ack.store(generation, Ordering::Release);
    }
}

/// [`sync_all`] calls so far: with [`sync_acked`], what the static key self-test checks.
pub fn sync_generation() -> u64 {
    SYNC_GEN.load(Ordering::Acquire)
}

/// The latest [`sync_all`] generation `cpu` serialised for.
pub fn sync_acked(cpu: usize) -> u64 {
    SYNC_ACK.get(cpu).map_or(0, |a| a.load(Ordering::Acquire))
}

/// Makes every online CPU execute a serialising instruction (Linux's
/// `text_poke_sync`: an IPI to the others, `sync_core` locally) and waits up to
/// `timeout_ns` for each to acknowledge. A CPU spinning with IF clear cannot take the
/// IPI: the error names the CPUs that did not acknowledge and how long we waited.
///
/// Callers are serialised (the text writer lock): a late acknowledgement of an
/// earlier generation never satisfies a later call.
pub fn sync_all(timeout_ns: u64) -> Result<(), (CpuSet, u64)> {
    let me = cpu::current_cpu();
    // AcqRel: Release pairs with the Acquire in `handle_sync` (our text writes before
    // this point are ordered before the IPI's handler reads the generation).
    let generation = SYNC_GEN.fetch_add(1, Ordering::AcqRel) + 1;
    let online = smp::online_cpus();
    let others = online.without(me);
    let saved = cpu::cli_save();
    let vector = apic::DM_FIXED | u32::from(SYNC_VECTOR);
    if !others.is_empty() && online.len() == smp::present() {
        // One ICR write for all, as the stop IPI does: the shorthand would also reach a
        // CPU still waiting for its SIPI, so only when every CPU the MADT lists is online.
        apic::send_ipi(0, vector | apic::ALL_BUT_SELF);
    } else {
        for t in others.iter() {
            apic::send_ipi(smp::apic_id(t), vector);
        }
    }
    cpu::restore_if(saved);
    cpu::serialize();
    let start = timer::now_ns();
    loop {
        // Acquire pairs with the Release store in `handle_sync`.
        let missing = others
            .iter()
            .filter(|&c| {
                SYNC_ACK
                    .get(c)
                    .is_none_or(|a| a.load(Ordering::Acquire) < generation)
            })
            .fold(CpuSet::EMPTY, CpuSet::with);
        if missing.is_empty() {
            return Ok(());
        }
        let waited_ns = timer::now_ns().saturating_sub(start);
        if waited_ns > timeout_ns {
            return Err((missing, waited_ns));
        }
        cpu::pause();
    }
}
