//! CPU hotplug exclusion: Linux's `cpus_read_lock` / `cpus_write_lock`. Every stop call
//! holds the read side for its whole length (Linux's `stop_machine` takes
//! `cpus_read_lock` around `stop_machine_cpuslocked`), so the online set it read stays
//! the online set until its last CPU has been released; a CPU is taken down or brought
//! up only under the write side. Hand-written: `spin::RwLock` has no bounded wait and
//! lets a stream of readers starve a writer, and every wait here must be bounded.
//!
//! A waiting writer shuts out new readers (as Linux's percpu-rwsem does), so a CPU
//! patching back to back cannot starve hotplug; a reader then fails with a timeout
//! rather than waiting forever. Readers do not nest while a writer waits: no reader of
//! this kernel takes the read side again inside it.

use super::LockTimeout;
use core::sync::atomic::{AtomicU32, Ordering};

/// The write side is held.
const WRITER: u32 = 1 << 31;
/// A writer waits: new readers stay out.
const WRITER_WAITING: u32 = 1 << 30;
/// The reader count's bits.
const READERS: u32 = WRITER_WAITING - 1;

/// The read/write lock of CPU hotplug (see the module doc).
pub struct CpuHotplugLock {
    /// `WRITER | WRITER_WAITING | readers`.
    state: AtomicU32,
}

/// The read side, held: the online set does not change until it is dropped.
#[must_use = "the online set may change as soon as the guard is dropped"]
pub struct CpusReadGuard<'a>(&'a CpuHotplugLock);

/// The write side, held: no stop call is in flight until it is dropped.
#[must_use = "hotplug is no longer excluded once the guard is dropped"]
pub struct CpusWriteGuard<'a>(&'a CpuHotplugLock);

impl CpuHotplugLock {
    /// A free lock.
    pub const fn new() -> Self {
        CpuHotplugLock {
            state: AtomicU32::new(0),
        }
    }

    /// Takes the read side, or gives up after `timeout_ns` of the `now_ns` clock,
    /// running `relax` between attempts. In `.text.nopatch` and inlined: the rendezvous
    /// takes it.
    #[unsafe(link_section = ".text.nopatch")]
    #[inline(always)]
    pub fn read_within(
        &self,
        timeout_ns: u64,
        now_ns: impl Fn() -> u64,
        relax: impl Fn(),
    ) -> Result<CpusReadGuard<'_>, LockTimeout> {
        let mut start = None;
        loop {
            let state = self.state.load(Ordering::Relaxed);
            // Acquire pairs with the Release of the last writer's unlock: the online
            // set it changed is visible to this reader.
            if state & (WRITER | WRITER_WAITING) == 0
                && self
                    .state
                    .compare_exchange_weak(state, state + 1, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
            {
                return Ok(CpusReadGuard(self));
            }
            let now = now_ns();
            let waited_ns = now.saturating_sub(*start.get_or_insert(now));
            if waited_ns > timeout_ns {
                return Err(LockTimeout {
                    lock: "the CPU hotplug lock (a CPU is going up or down)",
                    waited_ns,
                });
            }
            relax();
        }
    }

    /// Takes the write side once no reader holds the lock, or gives up after
    /// `timeout_ns`, leaving the lock as it found it.
    pub fn write_within(
        &self,
        timeout_ns: u64,
        now_ns: impl Fn() -> u64,
        relax: impl Fn(),
    ) -> Result<CpusWriteGuard<'_>, LockTimeout> {
        let start = now_ns();
        loop {
            let state = self.state.load(Ordering::Relaxed);
            // Acquire pairs with the Release of each reader's unlock (and of the last
            // writer's): everything the stop calls did is visible before the online
            // set changes.
            if state & (WRITER | READERS) == 0
                && self
                    .state
                    .compare_exchange_weak(state, WRITER, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
            {
                return Ok(CpusWriteGuard(self));
            }
            // Relaxed: only keeps new readers out; it publishes nothing.
            self.state.fetch_or(WRITER_WAITING, Ordering::Relaxed);
            let waited_ns = now_ns().saturating_sub(start);
            if waited_ns > timeout_ns {
                // Let readers in again. Another writer still waiting sets it again on its
                // next attempt.
                self.state.fetch_and(!WRITER_WAITING, Ordering::Relaxed);
                return Err(LockTimeout {
                    lock: "the CPU hotplug lock (held by stop-machine calls)",
                    waited_ns,
                });
            }
            relax();
        }
    }

    /// Readers holding the lock now (a snapshot, for tests and diagnostics).
    pub fn readers(&self) -> u32 {
        self.state.load(Ordering::Relaxed) & READERS
    }

    /// Whether the write side is held now (a snapshot).
    pub fn write_locked(&self) -> bool {
        self.state.load(Ordering::Relaxed) & WRITER != 0
    }
}

impl Default for CpuHotplugLock {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for CpusReadGuard<'_> {
    #[unsafe(link_section = ".text.nopatch")]
    #[inline(always)]
    fn drop(&mut self) {
        // Release pairs with a writer's Acquire: this reader's call is over before the
        // online set changes.
        self.0.state.fetch_sub(1, Ordering::Release);
    }
}

impl Drop for CpusWriteGuard<'_> {
    fn drop(&mut self) {
        // Release pairs with the next reader's (or writer's) Acquire: the online set as
        // this writer left it is what they see.
        self.0.state.fetch_and(!WRITER, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::cell::Cell;

    #[test]
    fn readers_share_and_a_writer_waits_for_them() {
        let lock = CpuHotplugLock::new();
        let clock = Cell::new(0u64);
        let tick = || {
            clock.set(clock.get() + 100);
        };
        let r1 = lock.read_within(0, || clock.get(), tick).unwrap();
        let r2 = lock.read_within(0, || clock.get(), tick).unwrap();
        assert_eq!(lock.readers(), 2);
        let err = lock
            .write_within(1000, || clock.get(), tick)
            .map(|_| ())
            .unwrap_err();
        assert!(err.waited_ns > 1000, "{err}");
        // The timed-out writer let readers in again.
        drop(lock.read_within(0, || clock.get(), tick).unwrap());
        drop((r1, r2));
        let w = lock.write_within(0, || clock.get(), tick).unwrap();
        assert!(lock.write_locked());
        assert!(lock.read_within(500, || clock.get(), tick).is_err());
        drop(w);
        assert!(!lock.write_locked());
        assert!(lock.read_within(0, || clock.get(), tick).is_ok());
    }

    #[test]
    fn a_waiting_writer_shuts_out_new_readers() {
        let lock = CpuHotplugLock::new();
        let clock = Cell::new(0u64);
        let reader = lock.read_within(0, || clock.get(), || ()).unwrap();
        // The writer's relax runs while it waits: a new reader must be refused then.
        let refused = Cell::new(false);
        let inner_clock = Cell::new(0u64);
        let result = lock.write_within(
            10,
            || clock.get(),
            || {
                let inner = lock.read_within(
                    0,
                    || inner_clock.get(),
                    || inner_clock.set(inner_clock.get() + 1),
                );
                refused.set(inner.is_err());
                clock.set(clock.get() + 100);
            },
        );
        assert!(result.is_err());
        assert!(refused.get(), "a new reader got in while a writer waited");
        drop(reader);
    }
}
