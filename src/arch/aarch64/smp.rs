//! Bringing up the secondary CPUs (PSCI CPU_ON) and tracking which CPUs are online.
//!
//! All secondaries are started first, then awaited together: PSCI CPU_ON returns once
//! the CPU is scheduled to start, so starting 511 CPUs one after the other while waiting
//! for each would put their whole set-up times in series. The wait is bounded
//! ([`ONLINE_TIMEOUT_NS`] for all of them together) and names the CPUs that did not come.

use super::{cpu, dtb::BootInfo, psci, timer};
use crate::{CpuSet, MAX_CPUS};
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// How long the boot CPU waits for all secondaries together to report online.
pub const ONLINE_TIMEOUT_NS: u64 = 5_000_000_000;

/// 64-bit words of a per-CPU bitmap.
const WORDS: usize = MAX_CPUS.div_ceil(64);

/// CPUs that finished their bring-up (bit n of word n / 64 = logical CPU n).
static ONLINE: [AtomicU64; WORDS] = [const { AtomicU64::new(0) }; WORDS];
/// CPUs that were started but did not come online in time, or whose CPU_ON failed.
static FAILED: [AtomicU64; WORDS] = [const { AtomicU64::new(0) }; WORDS];
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

/// The set of a bitmap's CPUs (Acquire: see [`online_cpus`]).
#[inline(always)]
fn load_set(words: &[AtomicU64; WORDS]) -> CpuSet {
    let mut set = CpuSet::EMPTY;
    for (w, word) in words.iter().enumerate() {
        let mut bits = word.load(Ordering::Acquire);
        while bits != 0 {
            set = set.with(w * 64 + bits.trailing_zeros() as usize);
            bits &= bits - 1;
        }
    }
    set
}

/// Adds `cpu` to a bitmap (Release: see [`mark_online`]).
#[inline(always)]
fn add(words: &[AtomicU64; WORDS], cpu: usize) {
    words[cpu / 64].fetch_or(1 << (cpu % 64), Ordering::Release);
}

/// The CPUs that are online: they have the MMU, exception vectors and GIC set up and
/// answer interrupts (IRQs are unmasked right after they are marked).
#[inline(always)]
pub fn online_cpus() -> CpuSet {
    // Acquire pairs with the Release in `mark_online`: a CPU seen online has finished
    // its set-up.
    load_set(&ONLINE)
}

/// Whether `cpu` is online (as [`online_cpus`], for one CPU).
#[inline(always)]
pub fn is_online(cpu: usize) -> bool {
    cpu < MAX_CPUS && ONLINE[cpu / 64].load(Ordering::Acquire) & 1 << (cpu % 64) != 0
}

/// CPUs that failed to come up.
pub fn failed_cpus() -> CpuSet {
    load_set(&FAILED)
}

/// The number of logical CPUs the DTB describes (online or not).
pub fn cpu_count() -> usize {
    COUNT.load(Ordering::Relaxed)
}

/// Marks the calling CPU online (after its set-up is complete) and wakes the boot CPU
/// waiting for it in [`start_secondaries`].
pub(crate) fn mark_online(cpu: usize) {
    // Release: everything this CPU set up is visible to whoever sees the bit.
    add(&ONLINE, cpu);
    cpu::sev();
}

/// Starts every secondary CPU of `info` (PSCI CPU_ON, without waiting in between),
/// then waits up to [`ONLINE_TIMEOUT_NS`] for all of them to mark themselves online. A
/// CPU that fails is reported (index and MPIDR) and left out of [`online_cpus`]; the
/// boot continues.
pub fn start_secondaries(info: &BootInfo) -> CpuSet {
    COUNT.store(info.cpu_count, Ordering::Relaxed);
    mark_online(0);
    let entry = pm_secondary_entry.as_ptr() as u64;
    let mut started = CpuSet::single(0);
    for cpu in 1..info.cpu_count {
        let mpidr = info.mpidrs[cpu];
        match psci::cpu_on(mpidr, entry, cpu as u64) {
            Ok(()) => started = started.with(cpu),
            Err(e) => {
                crate::kprintln!("smp: cpu{cpu} (MPIDR {mpidr:#x}): PSCI CPU_ON failed: {e}");
                add(&FAILED, cpu);
            }
        }
    }
    let start = timer::now_ns();
    let waiting = started.len();
    loop {
        let online = (0..info.cpu_count).filter(|&c| is_online(c)).count();
        if online >= waiting {
            break;
        }
        if timer::now_ns().wrapping_sub(start) > ONLINE_TIMEOUT_NS {
            for cpu in started.iter().filter(|&c| !is_online(c)) {
                crate::kprintln!(
                    "smp: cpu{cpu} (MPIDR {:#x}) did not come online within {} ms",
                    info.mpidrs[cpu],
                    ONLINE_TIMEOUT_NS / 1_000_000
                );
                add(&FAILED, cpu);
            }
            break;
        }
        // Woken by a new CPU's SEV in `mark_online` (or the timer event stream), so a
        // single-threaded emulator runs the CPUs we wait for instead of this loop.
        cpu::wfe();
    }
    online_cpus()
}
