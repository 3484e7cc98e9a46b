//! Normal-priority IPIs for the self-tests: two fixed vectors, each with one handler
//! `fn(cpu)`, run with interrupts off after the EOI.

use super::{apic, cpu, smp};
use crate::CpuSet;
use core::sync::atomic::{AtomicUsize, Ordering};

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
pub fn send_ipi(ipi: u32, targets: CpuSet) {
    let vector = TEST_IPIS[slot(ipi)];
    let saved = cpu::cli_save();
    for t in targets.and(smp::online_cpus()).iter() {
        apic::send_ipi(smp::apic_id(t), apic::DM_FIXED | vector);
    }
    cpu::restore_if(saved);
}

/// Runs the handler of test IPI `ipi` (from the trap dispatch, after the EOI).
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
