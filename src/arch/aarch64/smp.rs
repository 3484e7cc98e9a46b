//! Bringing up the secondary CPUs (PSCI CPU_ON) and tracking which CPUs are online.
//!
//! All secondaries are started first, then awaited together: PSCI CPU_ON returns once
//! the CPU is scheduled to start, so starting 511 CPUs one after the other while waiting
//! for each would put their whole set-up times in series. The wait is bounded
//! ([`ONLINE_TIMEOUT_NS`] for all of them together) and names the CPUs that did not come.

use super::{cpu, dtb::BootInfo, psci, timer};
use crate::{AtomicCpuSet, CpuSet};
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

/// How long the boot CPU waits, after starting the last secondary, for all of them to
/// report online.
pub const ONLINE_TIMEOUT_NS: u64 = 5_000_000_000;

/// CPUs that finished their bring-up.
static ONLINE: AtomicCpuSet = AtomicCpuSet::new();
/// CPUs that were started but did not come online in time, or whose CPU_ON failed.
static FAILED: AtomicCpuSet = AtomicCpuSet::new();
/// Set by the boot CPU when every secondary has been started and awaited (see
/// [`wait_for_bringup`]).
static BRINGUP_DONE: AtomicBool = AtomicBool::new(false);
/// How long [`start_secondaries`] took, from the first CPU_ON to the last CPU online.
static BRINGUP_NS: AtomicU64 = AtomicU64::new(0);
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

/// Whether `cpu` is online (as [`online_cpus`], for one CPU).
#[inline(always)]
pub fn is_online(cpu: usize) -> bool {
    ONLINE.contains(cpu, Ordering::Acquire)
}

/// CPUs that failed to come up.
pub fn failed_cpus() -> CpuSet {
    FAILED.load(Ordering::Relaxed)
}

/// The number of logical CPUs the DTB describes (online or not).
pub fn cpu_count() -> usize {
    COUNT.load(Ordering::Relaxed)
}

/// Marks the calling CPU online (after its set-up is complete) and wakes the boot CPU
/// waiting for it in [`start_secondaries`].
pub(crate) fn mark_online(cpu: usize) {
    // Release: everything this CPU set up is visible to whoever sees the bit.
    ONLINE.insert(cpu, Ordering::Release);
    cpu::sev();
}

/// Starts every secondary CPU of `info` (PSCI CPU_ON, without waiting in between),
/// then waits up to [`ONLINE_TIMEOUT_NS`] after the last CPU_ON for all of them to mark
/// themselves online. A
/// CPU that fails is reported (index and MPIDR) and left out of [`online_cpus`]; the
/// boot continues.
pub fn start_secondaries(info: &BootInfo) -> CpuSet {
    COUNT.store(info.cpu_count, Ordering::Relaxed);
    mark_online(0);
    let entry = pm_secondary_entry.as_ptr() as u64;
    let start = timer::now_ns();
    let mut started = CpuSet::single(0);
    for cpu in 1..info.cpu_count {
        let mpidr = info.mpidrs[cpu];
        match psci::cpu_on(mpidr, entry, cpu as u64) {
            Ok(()) => started = started.with(cpu),
            Err(e) => {
                crate::kprintln!("smp: cpu{cpu} (MPIDR {mpidr:#x}): PSCI CPU_ON failed: {e}");
                FAILED.insert(cpu, Ordering::Relaxed);
            }
        }
    }
    let waiting = started.len();
    // The time limit runs from the last CPU_ON: the loop above is the boot CPU's own
    // work (each call lets the started CPUs run; 512 took 3 to 5 s under TCG here).
    let last_on = timer::now_ns();
    loop {
        let online = online_cpus().len();
        if online >= waiting {
            break;
        }
        if timer::now_ns().wrapping_sub(last_on) > ONLINE_TIMEOUT_NS {
            for cpu in started.iter().filter(|&c| !is_online(c)) {
                crate::kprintln!(
                    "smp: cpu{cpu} (MPIDR {:#x}) did not come online within {} ms",
                    info.mpidrs[cpu],
                    ONLINE_TIMEOUT_NS / 1_000_000
                );
                FAILED.insert(cpu, Ordering::Relaxed);
            }
            break;
        }
        // Woken by a new CPU's SEV in `mark_online` (or the timer event stream), so a
        // single-threaded emulator runs the CPUs we wait for instead of this loop.
        cpu::wfe();
    }
    BRINGUP_NS.store(timer::now_ns().wrapping_sub(start), Ordering::Relaxed);
    online_cpus()
}

/// A secondary, once online: sleeps in `WFI`, everything masked, until the boot CPU has
/// started every CPU ([`release_secondaries`], then [`super::gic::WAKE_SGI`], which stays
/// pending and so ends the `WFI` however late this CPU gets here). Why not `WFE`: under
/// single-threaded TCG a CPU in WFE still takes a turn in every round of the vCPUs, and
/// each CPU_ON kicks the boot CPU into a new round, so 511 idle CPUs made the boot
/// CPU's CPU_ON loop quadratic (5 s at 512 CPUs); sleeping CPUs take no turn.
pub(crate) fn wait_for_bringup() {
    // Acquire pairs with the Release in `release_secondaries`.
    while !BRINGUP_DONE.load(Ordering::Acquire) {
        cpu::wfi();
    }
}

/// Ends [`wait_for_bringup`] for every CPU: the caller then sends the wake SGI.
pub(crate) fn release_secondaries() {
    BRINGUP_DONE.store(true, Ordering::Release);
}

/// How long the bring-up took (guest time), from the first CPU_ON until the last CPU
/// was online or the wait gave up.
pub fn bringup_ns() -> u64 {
    BRINGUP_NS.load(Ordering::Relaxed)
}
