//! Bringing up the secondary CPUs (PSCI CPU_ON) and tracking which CPUs are online.

use super::{cpu, dtb::BootInfo, psci, timer};
use crate::{AtomicCpuSet, CpuSet};
use core::sync::atomic::{AtomicUsize, Ordering};

/// How long the boot CPU waits for each secondary to report online.
pub const ONLINE_TIMEOUT_NS: u64 = 1_000_000_000;

/// CPUs that finished their bring-up.
static ONLINE: AtomicCpuSet = AtomicCpuSet::new();
/// CPUs that were started but did not come online in time, or whose CPU_ON failed.
static FAILED: AtomicCpuSet = AtomicCpuSet::new();
/// Logical CPUs the machine has (from the DTB).
static COUNT: AtomicUsize = AtomicUsize::new(1);

unsafe extern "C" {
    /// The secondary entry point in `boot/aarch64/entry.S` (a physical address: the
    /// kernel is identity-mapped).
    safe static pm_secondary_entry: [u8; 0];
}

/// The logical index of the calling CPU (TPIDR_EL1).
#[inline(always)]
pub fn current_cpu() -> usize {
    cpu::current_cpu()
}

/// The CPUs that are online: they have the MMU, exception vectors and GIC set up and
/// answer interrupts (IRQs are unmasked right after they are marked).
#[inline(always)]
pub fn online_cpus() -> CpuSet {
    // Acquire pairs with the Release in `mark_online`: a CPU seen online has finished
    // its set-up.
    ONLINE.load(Ordering::Acquire)
}

/// CPUs that failed to come up.
pub fn failed_cpus() -> CpuSet {
    FAILED.load(Ordering::Relaxed)
}

/// The number of logical CPUs the DTB describes (online or not).
pub fn cpu_count() -> usize {
    COUNT.load(Ordering::Relaxed)
}

/// Marks the calling CPU online (after its set-up is complete).
pub(crate) fn mark_online(cpu: usize) {
    // Release: everything this CPU set up is visible to whoever sees the bit.
    ONLINE.insert(cpu, Ordering::Release);
}

/// Starts every secondary CPU of `info`, one at a time, and waits up to
/// [`ONLINE_TIMEOUT_NS`] for each to mark itself online. A CPU that fails is reported
/// (index and MPIDR) and left out of [`online_cpus`]; the boot continues.
pub fn start_secondaries(info: &BootInfo) -> CpuSet {
    COUNT.store(info.cpu_count, Ordering::Relaxed);
    mark_online(0);
    let entry = pm_secondary_entry.as_ptr() as u64;
    for cpu in 1..info.cpu_count {
        let mpidr = info.mpidrs[cpu];
        if let Err(e) = psci::cpu_on(mpidr, entry, cpu as u64) {
            crate::kprintln!("smp: cpu{cpu} (MPIDR {mpidr:#x}): PSCI CPU_ON failed: {e}");
            FAILED.insert(cpu, Ordering::Relaxed);
            continue;
        }
        let start = timer::now_ns();
        loop {
            if online_cpus().contains(cpu) {
                break;
            }
            if timer::now_ns().wrapping_sub(start) > ONLINE_TIMEOUT_NS {
                crate::kprintln!(
                    "smp: cpu{cpu} (MPIDR {mpidr:#x}) did not come online within {} ms",
                    ONLINE_TIMEOUT_NS / 1_000_000
                );
                FAILED.insert(cpu, Ordering::Relaxed);
                break;
            }
            core::hint::spin_loop();
        }
    }
    online_cpus()
}
