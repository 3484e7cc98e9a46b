//! CPU hotplug: [`cpu_down`] and [`cpu_up`], Linux's `remove_cpu` / `add_cpu` for a
//! kernel without a scheduler. Arch-free: the platform only powers a CPU off from the
//! CPU itself ([`platform::cpu_die`]), on again ([`platform::cpu_power_on`]), and says
//! whether it is down ([`platform::cpu_is_down`]); each CPU leaves and joins the online
//! set itself.
//!
//! Both take the stop machine's hotplug write side ([`STOP.cpus_write_lock`]) for
//! their whole length, so they never overlap a stop call (which holds the read side):
//! - down: the CPU leaves the online set with everything masked, then stops
//!   answering; no stop call is in flight meanwhile, and the next one does not count
//!   it (an offline CPU never blocks a stop);
//! - up: the CPU marks itself online only once its interrupt controller and vectors
//!   are set up, right before it unmasks, so a stop IPI sent to it from then on is
//!   answered; it synchronises (arm64: `IC IALLU; DSB; ISB`; x86: CPUID) before any
//!   patchable code ([`platform::online_syncs`] counts it), so text patched while it
//!   was off is what it runs.
//!
//! There are no tasks to migrate: a CPU goes down only from its idle loop, so one
//! running a job is refused ([`HotplugError::Busy`]). Every wait is bounded and its
//! error names what was waited for.
//!
//! [`STOP.cpus_write_lock`]: crate::stop::StopMachine::cpus_write_lock

use super::platform::{self, STOP, current_cpu, now_ns, online_cpus};
use super::smp;
use crate::CpuSet;
use crate::stop::LockTimeout;
use core::fmt;
use core::sync::atomic::{AtomicU64, Ordering};

/// How long hotplug waits for the hotplug lock (stop calls in flight): a stop call's
/// own arrival bound, plus room for the function.
pub const LOCK_TIMEOUT_NS: u64 = 2_000_000_000;
/// How long hotplug waits for a CPU to leave (or join) the online set, and then to be
/// reported down by the firmware.
pub const STATE_TIMEOUT_NS: u64 = 2_000_000_000;

/// CPUs asked to go down, cleared by the CPU itself as it goes.
static DOWN_REQUESTED: crate::AtomicCpuSet = crate::AtomicCpuSet::new();
/// Completed [`cpu_down`]s and [`cpu_up`]s since boot.
static DOWNS: AtomicU64 = AtomicU64::new(0);
static UPS: AtomicU64 = AtomicU64::new(0);

/// Why [`cpu_down`] or [`cpu_up`] refused or failed. Refusals change nothing.
#[derive(Clone, Copy, Debug)]
pub enum HotplugError {
    /// CPU 0 runs the kernel proper and never goes down.
    BootCpu,
    /// A CPU cannot take itself down (nor is an online caller ever down).
    Caller(usize),
    /// No such CPU in the firmware's table.
    NotPresent {
        /// The CPU asked for.
        cpu: usize,
        /// How many CPUs the firmware lists.
        present: usize,
    },
    /// `cpu_down` of an offline CPU.
    AlreadyOffline(usize),
    /// `cpu_up` of an online CPU.
    AlreadyOnline(usize),
    /// The CPU is running a job: it goes down only from its idle loop.
    Busy(usize),
    /// Stop calls held the hotplug lock for the whole wait.
    Locked(LockTimeout),
    /// The CPU did not reach a state within [`STATE_TIMEOUT_NS`].
    Timeout {
        /// The CPU waited for.
        cpu: usize,
        /// The state it did not reach.
        what: &'static str,
        /// How long the caller waited.
        waited_ns: u64,
    },
    /// The firmware (or its stand-in) refused.
    Firmware {
        /// The CPU.
        cpu: usize,
        /// The platform's error.
        why: platform::HotplugFirmwareError,
    },
}

impl fmt::Display for HotplugError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HotplugError::BootCpu => f.write_str("cpu0 is the boot CPU and never goes down"),
            HotplugError::Caller(cpu) => write!(f, "cpu{cpu} cannot take itself down"),
            HotplugError::NotPresent { cpu, present } => write!(
                f,
                "cpu{cpu} is not present (the {} lists {present} CPUs)",
                platform::CPU_TABLE
            ),
            HotplugError::AlreadyOffline(cpu) => write!(f, "cpu{cpu} is already offline"),
            HotplugError::AlreadyOnline(cpu) => write!(f, "cpu{cpu} is already online"),
            HotplugError::Busy(cpu) => write!(
                f,
                "cpu{cpu} is running a job; it goes down only from its idle loop"
            ),
            HotplugError::Locked(timeout) => write!(f, "{timeout}"),
            HotplugError::Timeout {
                cpu,
                what,
                waited_ns,
            } => write!(
                f,
                "cpu{cpu} did not {what} within {} ms",
                waited_ns / 1_000_000
            ),
            HotplugError::Firmware { cpu, why } => write!(
                f,
                "cpu{cpu}: {} refused: {why}",
                platform::HOTPLUG_MECHANISM
            ),
        }
    }
}

/// Checks what both calls refuse before taking anything.
fn check_cpu(cpu: usize) -> Result<(), HotplugError> {
    let present = platform::cpu_count();
    if cpu >= present {
        return Err(HotplugError::NotPresent { cpu, present });
    }
    if cpu == 0 {
        return Err(HotplugError::BootCpu);
    }
    if cpu == current_cpu() {
        return Err(HotplugError::Caller(cpu));
    }
    Ok(())
}

/// Waits, bounded, until `done()`; names `what` on timeout.
fn wait_for(
    cpu: usize,
    what: &'static str,
    mut done: impl FnMut() -> bool,
) -> Result<(), HotplugError> {
    let start = now_ns();
    loop {
        if done() {
            return Ok(());
        }
        let waited_ns = now_ns().saturating_sub(start);
        if waited_ns > STATE_TIMEOUT_NS {
            return Err(HotplugError::Timeout {
                cpu,
                what,
                waited_ns,
            });
        }
        platform::cpu_yield();
    }
}

/// Takes secondary CPU `cpu` offline: it leaves the online set (every exception
/// masked) and powers itself down (arm64: PSCI CPU_OFF; x86: halted with interrupts
/// off). Call with interrupts on (a stop call the lock waits for may need the caller's
/// answer), from any CPU but `cpu`. Refuses CPU 0, the caller, an unknown or offline CPU and a CPU running a
/// job, changing nothing.
pub fn cpu_down(cpu: usize) -> Result<(), HotplugError> {
    check_cpu(cpu)?;
    if !online_cpus().contains(cpu) {
        return Err(HotplugError::AlreadyOffline(cpu));
    }
    if !smp::is_idle(cpu) {
        return Err(HotplugError::Busy(cpu));
    }
    let _hotplug = STOP
        .cpus_write_lock(LOCK_TIMEOUT_NS)
        .map_err(HotplugError::Locked)?;
    // Under the lock: another hotplugger may have been first.
    if !online_cpus().contains(cpu) {
        return Err(HotplugError::AlreadyOffline(cpu));
    }
    // Release pairs with the Acquire in `take_down_request`: the CPU sees the request
    // with everything the caller did before it.
    DOWN_REQUESTED.insert(cpu, Ordering::Release);
    platform::wake_idle();
    let left = || !online_cpus().contains(cpu);
    if let Err(err) = wait_for(cpu, "leave the online set", left) {
        // Withdrawn, so it never goes down after the lock is released: the one of the
        // two that clears the request owns it (`take_down_request`).
        if DOWN_REQUESTED.remove(cpu, Ordering::Relaxed) {
            return Err(err);
        }
        // The CPU claimed it meanwhile: it is masked and on its way out of the set.
        wait_for(cpu, "leave the online set (request taken)", left)?;
    }
    // Linux's `cpuhp_bringup_ap` counterpart on the way down, `__cpu_die`: wait for the
    // firmware to see it off before it may be started again.
    let mut firmware = None;
    wait_for(
        cpu,
        "power down (reported down by the platform)",
        || match platform::cpu_is_down(cpu) {
            Ok(down) => down,
            Err(why) => {
                firmware = Some(why);
                true
            }
        },
    )?;
    if let Some(why) = firmware {
        return Err(HotplugError::Firmware { cpu, why });
    }
    DOWNS.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// Brings offline CPU `cpu` back (arm64: PSCI CPU_ON; x86: INIT-SIPI-SIPI) and waits
/// until it is online: set up again (interrupt controller, timer, per-CPU state,
/// vectors, tables), synchronised with the text as it is now, answering stop IPIs.
/// Refuses CPU 0, the caller, an unknown or online CPU, changing nothing.
pub fn cpu_up(cpu: usize) -> Result<(), HotplugError> {
    check_cpu(cpu)?;
    if online_cpus().contains(cpu) {
        return Err(HotplugError::AlreadyOnline(cpu));
    }
    let _hotplug = STOP
        .cpus_write_lock(LOCK_TIMEOUT_NS)
        .map_err(HotplugError::Locked)?;
    if online_cpus().contains(cpu) {
        return Err(HotplugError::AlreadyOnline(cpu));
    }
    platform::cpu_power_on(cpu).map_err(|why| HotplugError::Firmware { cpu, why })?;
    wait_for(cpu, "come online", || online_cpus().contains(cpu))?;
    UPS.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// `(downs, ups)` completed since boot.
pub fn counts() -> (u64, u64) {
    (DOWNS.load(Ordering::Relaxed), UPS.load(Ordering::Relaxed))
}

/// The CPUs asked to go down that have not gone yet (a snapshot).
pub fn down_requested() -> CpuSet {
    DOWN_REQUESTED.load(Ordering::Relaxed)
}

/// Called by each secondary in its idle loop: if asked to go down, goes (never returns).
pub(super) fn take_down_request(cpu: usize) {
    // Acquire pairs with the Release in `cpu_down`. The read first, so that the idle
    // loop does not write the shared word; the clear claims the request (a `cpu_down`
    // that gave up clears it too, and then this CPU stays).
    if DOWN_REQUESTED.contains(cpu, Ordering::Acquire)
        && DOWN_REQUESTED.remove(cpu, Ordering::Acquire)
    {
        platform::cpu_die(cpu);
    }
}
