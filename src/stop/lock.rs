//! The one bounded wait for a spin lock, shared by the stop machine's initiators, the
//! patchers and x86's text alias: [`lock_within`].

use core::fmt;

/// A lock that stayed held for a whole bounded wait.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LockTimeout {
    /// The lock waited for.
    pub lock: &'static str,
    /// How long the caller waited.
    pub waited_ns: u64,
}

impl fmt::Display for LockTimeout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} stayed held for {} us",
            self.lock,
            self.waited_ns / 1000
        )
    }
}

/// A lock [`lock_within`] can wait for: one attempt to take it.
pub trait TryLock {
    /// Holds the lock until dropped.
    type Guard<'a>
    where
        Self: 'a;

    /// Takes the lock if it is free.
    fn try_lock(&self) -> Option<Self::Guard<'_>>;
}

impl<T: ?Sized> TryLock for spin::Mutex<T> {
    type Guard<'a>
        = spin::MutexGuard<'a, T>
    where
        Self: 'a;

    #[inline(always)]
    fn try_lock(&self) -> Option<spin::MutexGuard<'_, T>> {
        spin::Mutex::try_lock(self)
    }
}

/// Takes `lock` (named `name` in the error), or gives up once more than `timeout_ns`
/// have passed on the `now_ns` clock. `relax` runs between two attempts: a spin hint,
/// or a low-power wait that something ends within the timeout.
///
/// In `.text.nopatch` and always inlined: the rendezvous takes its lock with it.
#[unsafe(link_section = ".text.nopatch")]
#[inline(always)]
pub fn lock_within<'a, L: TryLock + ?Sized>(
    lock: &'a L,
    name: &'static str,
    timeout_ns: u64,
    now_ns: impl Fn() -> u64,
    relax: impl Fn(),
) -> Result<L::Guard<'a>, LockTimeout> {
    // The clock is read only once the lock turns out to be held.
    let mut start = None;
    loop {
        if let Some(guard) = lock.try_lock() {
            return Ok(guard);
        }
        let now = now_ns();
        let waited_ns = now.saturating_sub(*start.get_or_insert(now));
        if waited_ns > timeout_ns {
            return Err(LockTimeout {
                lock: name,
                waited_ns,
            });
        }
        relax();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::cell::Cell;

    #[test]
    fn a_free_lock_is_taken_at_once() {
        let lock = spin::Mutex::new(7);
        let relaxed = Cell::new(0);
        let guard = lock_within(
            &lock,
            "the lock",
            0,
            || 0,
            || relaxed.set(relaxed.get() + 1),
        );
        assert_eq!(guard.map(|g| *g), Ok(7));
        assert_eq!(relaxed.get(), 0);
    }

    #[test]
    fn a_held_lock_times_out_and_names_itself() {
        let lock = spin::Mutex::new(());
        let _held = lock.lock();
        let clock = Cell::new(0u64);
        let result = lock_within(
            &lock,
            "the test lock",
            1000,
            || clock.get(),
            || {
                assert!(clock.get() < 10_000, "lock_within waited past its bound");
                clock.set(clock.get() + 300)
            },
        );
        let err = result.map(|_| ()).unwrap_err();
        // 0, 300, 600, 900 are within the bound; 1200 is past it.
        assert_eq!(
            err,
            LockTimeout {
                lock: "the test lock",
                waited_ns: 1200
            }
        );
        assert_eq!(err.to_string(), "the test lock stayed held for 1 us");
    }
}
