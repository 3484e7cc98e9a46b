//! Running jobs on other CPUs: each secondary waits in [`secondary_main`] for a job in
//! its mailbox and runs it with interrupts enabled, so it answers stop IPIs meanwhile.

use super::platform::{self, current_cpu, now_ns, online_cpus};
use crate::CpuSet;
use core::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};

/// One CPU's mailbox: a posted function (0 when empty), its argument, and a count of
/// finished jobs.
struct Mailbox {
    function: AtomicUsize,
    arg: AtomicUsize,
    done: AtomicU32,
}

static MAILBOXES: [Mailbox; crate::MAX_CPUS] = [const {
    Mailbox {
        function: AtomicUsize::new(0),
        arg: AtomicUsize::new(0),
        done: AtomicU32::new(0),
    }
}; crate::MAX_CPUS];

platform::define_static_key!(
    /// Counts every job a secondary runs into [`JOBS_TRACED`] while enabled.
    pub TRACE_JOBS,
    "trace_jobs"
);

/// Per CPU: jobs run while [`TRACE_JOBS`] was enabled.
pub static JOBS_TRACED: [AtomicU64; crate::MAX_CPUS] =
    [const { AtomicU64::new(0) }; crate::MAX_CPUS];

/// The loop of every secondary CPU: run posted jobs, otherwise wait for an event.
pub fn secondary_main(cpu: usize) -> ! {
    let mailbox = &MAILBOXES[cpu];
    loop {
        // Acquire pairs with the release in `run_on`: the argument is visible.
        let function = mailbox.function.load(Ordering::Acquire);
        if function == 0 {
            // Only from here, between jobs, may this CPU go down (CPU hotplug).
            super::hotplug::take_down_request(cpu);
            // Woken by the poster (`wake_idle`) or any interrupt: interrupts are enabled.
            platform::idle_wait();
            continue;
        }
        let arg = mailbox.arg.load(Ordering::Relaxed);
        // SAFETY: only `run_on` stores a non-zero value here, and it stores a
        // `fn(usize, usize)` obtained from a `fn(usize, &T)`, which has the same ABI.
        let function: fn(usize, usize) = unsafe { core::mem::transmute(function) };
        function(cpu, arg);
        // Tracing hook: a NOP while `trace_jobs` is off (the `static_key_hook` test).
        if platform::static_branch_unlikely!(TRACE_JOBS) {
            JOBS_TRACED[cpu].fetch_add(1, Ordering::Relaxed);
        }
        mailbox.function.store(0, Ordering::Relaxed);
        // Release pairs with the acquire in `Jobs::wait`: the job's effects are visible.
        platform::counter_add_release(&mailbox.done, 1);
    }
}

/// Whether `cpu` has no job posted or running.
pub fn is_idle(cpu: usize) -> bool {
    MAILBOXES
        .get(cpu)
        .is_some_and(|m| m.function.load(Ordering::Acquire) == 0)
}

/// Jobs started by [`run_on`]. Wait for them before their argument goes away.
#[must_use = "wait for the jobs before their argument goes away"]
pub struct Jobs {
    cpus: CpuSet,
    tickets: [u32; crate::MAX_CPUS],
}

/// Starts `function(cpu, arg)` on every CPU in `cpus`, which must be online
/// secondaries with empty mailboxes.
///
/// # Safety
/// `arg` must stay valid until [`Jobs::wait`] has returned `Ok`.
pub unsafe fn run_on<T: Sync>(cpus: CpuSet, function: fn(usize, &T), arg: &T) -> Jobs {
    let me = current_cpu();
    assert!(
        !cpus.contains(me),
        "run_on: cannot post a job to the calling CPU"
    );
    assert!(
        cpus.is_subset(online_cpus()),
        "run_on: {cpus} not all online"
    );
    let mut jobs = Jobs {
        cpus,
        tickets: [0; crate::MAX_CPUS],
    };
    for cpu in cpus.iter() {
        let mailbox = &MAILBOXES[cpu];
        assert!(
            mailbox.function.load(Ordering::Relaxed) == 0,
            "run_on: cpu{cpu} is still running a job"
        );
        jobs.tickets[cpu] = mailbox.done.load(Ordering::Relaxed);
        mailbox
            .arg
            .store(arg as *const T as usize, Ordering::Relaxed);
        // Release: publishes the argument, and everything the caller wrote before.
        mailbox.function.store(function as usize, Ordering::Release);
    }
    platform::wake_idle();
    jobs
}

impl Jobs {
    /// Waits, at most `timeout_ns`, for every job to finish; on timeout returns the
    /// CPUs still running theirs.
    pub fn wait(self, timeout_ns: u64) -> Result<(), CpuSet> {
        let start = now_ns();
        loop {
            let pending = self
                .cpus
                .iter()
                .filter(|&cpu| MAILBOXES[cpu].done.load(Ordering::Acquire) == self.tickets[cpu])
                .fold(CpuSet::EMPTY, CpuSet::with);
            if pending.is_empty() {
                return Ok(());
            }
            if now_ns().saturating_sub(start) > timeout_ns {
                return Err(pending);
            }
            core::hint::spin_loop();
        }
    }
}
