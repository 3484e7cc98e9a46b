//! Bringing up the secondary CPUs (PSCI CPU_ON), taking them down again at run time
//! (PSCI CPU_OFF, [`cpu_die`]) and back up ([`cpu_power_on`]), and tracking which CPUs
//! are online.
//!
//! The CPUs start each other in a tree and the boot CPU awaits them all together (see
//! [`start_secondaries`]): no CPU waits for another in turn. The wait is bounded
//! ([`ONLINE_TIMEOUT_NS`] for all of them together) and names the CPUs that did not
//! come, and why.

use super::{cpu, dtb::BootInfo, psci, timer};
use crate::{AtomicCpuSet, CpuSet};
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

/// How long the boot CPU waits for all secondaries together to report online.
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
/// Per CPU: how many times it invalidated its I-cache and synchronised its context on
/// the way online ([`online_sync`]): the evidence the hotplug self-test checks, since
/// TCG keeps instruction fetch coherent and cannot show a stale line.
static ONLINE_SYNCS: [AtomicU64; crate::MAX_CPUS] = [const { AtomicU64::new(0) }; crate::MAX_CPUS];

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

/// The calling CPU, on its way online (boot or hotplug), before it runs any patchable
/// code: `IC IALLU; DSB NSH; ISB` ([`super::cache::invalidate_local_icache`]), then
/// counts it. Text patched while this CPU was off is what it fetches from here on.
#[unsafe(link_section = ".text.nopatch")]
#[inline(always)]
pub(crate) fn online_sync(cpu: usize) {
    super::cache::invalidate_local_icache();
    if let Some(count) = ONLINE_SYNCS.get(cpu) {
        // Release pairs with the Acquire in `online_syncs`: counted after the sync.
        count.fetch_add(1, Ordering::Release);
    }
}

/// How many times `cpu` synchronised on its way online (`online_sync`).
pub fn online_syncs(cpu: usize) -> u64 {
    ONLINE_SYNCS
        .get(cpu)
        .map_or(0, |c| c.load(Ordering::Acquire))
}

/// Whether the boot-time bring-up is over (later CPU_ONs are hotplug).
pub(crate) fn bringup_done() -> bool {
    BRINGUP_DONE.load(Ordering::Acquire)
}

/// Takes the calling secondary CPU down for good (Linux's `cpu_die` through PSCI,
/// `cpu_psci_cpu_die`): masks everything, leaves the online set, and calls PSCI
/// CPU_OFF, which does not return. The caller (the hotplug core) holds the hotplug
/// write side for it, so no stop call is in flight and none targets this CPU once it
/// is out of the set. A CPU_OFF that fails is reported and the CPU parks masked,
/// offline (the hotplug core times out waiting for AFFINITY_INFO to say OFF and names
/// it).
pub fn cpu_die(cpu: usize) -> ! {
    cpu::mask_all();
    // Stop taking interrupts at the CPU interface (ICC_IGRPEN1_EL1 = 0): an SGI sent
    // meanwhile stays pending at the redistributor, and `gic::init_cpu` enables the
    // group again on the way back.
    // SAFETY: this CPU's own interface; every exception is masked.
    unsafe {
        core::arch::asm!(
            "msr S3_0_C12_C12_7, xzr",
            "isb",
            options(nostack, preserves_flags)
        )
    };
    // Release: everything this CPU did is visible to whoever sees it gone.
    ONLINE.remove(cpu, Ordering::Release);
    cpu::sev();
    // Every store of this CPU complete before the core goes down; the firmware does the
    // power-down cache maintenance (PSCI CPU_OFF).
    cpu::dsb_ish();
    let err = psci::cpu_off();
    crate::kprintln!("smp: cpu{cpu}: PSCI CPU_OFF failed: {err}; parked offline");
    loop {
        cpu::wfi();
    }
}

/// Starts offline CPU `cpu` again with PSCI CPU_ON at the secondary entry, where it
/// sets itself up as at boot and marks itself online (hotplug, under the write side).
pub fn cpu_power_on(cpu: usize) -> Result<(), smccc::psci::error::Error> {
    let info = super::dtb::boot_info();
    let mpidr = *info
        .mpidrs
        .get(cpu)
        .ok_or(smccc::psci::error::Error::InvalidParameters)?;
    psci::cpu_on(mpidr, pm_secondary_entry.as_ptr() as u64, cpu as u64)
}

/// Whether the firmware reports `cpu` powered off (PSCI AFFINITY_INFO).
pub fn cpu_powered_off(cpu: usize) -> Result<bool, smccc::psci::error::Error> {
    let info = super::dtb::boot_info();
    let mpidr = *info
        .mpidrs
        .get(cpu)
        .ok_or(smccc::psci::error::Error::InvalidParameters)?;
    psci::is_cpu_off(mpidr)
}

/// Fan-out of the bring-up tree: CPU `i` starts CPUs `FANOUT * i + 1` to
/// `FANOUT * i + FANOUT` (see [`start_secondaries`]).
pub const FANOUT: usize = 4;

/// The CPU that starts `cpu` in the bring-up tree (`None` for the boot CPU).
pub const fn starter(cpu: usize) -> Option<usize> {
    if cpu == 0 {
        None
    } else {
        Some((cpu - 1) / FANOUT)
    }
}

/// Issues PSCI CPU_ON for the calling CPU's children in the bring-up tree. The boot
/// CPU, then each secondary during its bring-up (after its own set-up, before it marks
/// itself online). A failed call is reported (index, MPIDR, error) and the CPU counted
/// as failed.
pub(crate) fn start_children(me: usize, info: &BootInfo) {
    let entry = pm_secondary_entry.as_ptr() as u64;
    let first = FANOUT * me + 1;
    for cpu in first..(first + FANOUT).min(info.cpu_count) {
        let mpidr = info.mpidrs[cpu];
        if let Err(e) = psci::cpu_on(mpidr, entry, cpu as u64) {
            crate::kprintln!(
                "smp: cpu{cpu} (MPIDR {mpidr:#x}): PSCI CPU_ON by cpu{me} failed: {e}"
            );
            FAILED.insert(cpu, Ordering::Relaxed);
            cpu::sev();
        }
    }
}

/// Brings up every secondary CPU of `info` and waits up to [`ONLINE_TIMEOUT_NS`] for
/// all of them to mark themselves online. A CPU that fails is reported (index and
/// MPIDR, and why) and left out of [`online_cpus`]; the boot continues.
///
/// The CPUs start each other in a tree ([`FANOUT`] children each, `start_children`):
/// the boot CPU issues only the first CPU_ONs, no CPU waits for another in turn, and the
/// starts overlap. Why not the boot CPU calling CPU_ON 511 times: single-threaded TCG
/// ends the caller's turn at every CPU_ON and runs a round of all vCPUs (about 10 us
/// each at 512), so 511 calls in a row cost 511 rounds (3 to 8 s measured here); a tree
/// needs a few rounds per level.
pub fn start_secondaries(info: &BootInfo) -> CpuSet {
    COUNT.store(info.cpu_count, Ordering::Relaxed);
    mark_online(0);
    let start = timer::now_ns();
    start_children(0, info);
    loop {
        let (online, failed) = (online_cpus(), failed_cpus());
        if online.or(failed).len() >= info.cpu_count {
            break;
        }
        if timer::now_ns().wrapping_sub(start) > ONLINE_TIMEOUT_NS {
            let all = CpuSet::first(info.cpu_count);
            for cpu in all.minus(online).minus(failed).iter() {
                let mpidr = info.mpidrs[cpu];
                let ms = ONLINE_TIMEOUT_NS / 1_000_000;
                match starter(cpu).filter(|&s| !online.contains(s)) {
                    Some(s) => crate::kprintln!(
                        "smp: cpu{cpu} (MPIDR {mpidr:#x}) not started within {ms} ms: \
                         cpu{s}, which starts it, did not come online"
                    ),
                    None => crate::kprintln!(
                        "smp: cpu{cpu} (MPIDR {mpidr:#x}) did not come online within {ms} ms"
                    ),
                }
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
