//! The atomics of the stop-machine core, and the hooks of its model check.
//!
//! Normally this is `core::sync::atomic` and [`spin::Mutex`], at no cost. Built with
//! `RUSTFLAGS="--cfg loom"` (only `tests/loom_stop.rs` and `tests/loom_context.rs` are), the same names are loom's
//! atomics and a loom-visible spin lock, so that the `loom` model checker explores every
//! interleaving and every value a weak load may return; and [`weaken`] lets a model turn
//! one ordering or step of the production code off, to show that loom then finds the bug.
//!
//! Loom's atomics cannot be built in a `const fn`: `const_unless_loom!` drops the
//! `const` of the constructors under loom, and `atomic_array!` builds their arrays.

#[cfg(not(loom))]
pub(crate) use core::sync::atomic::{
    AtomicBool, AtomicI32, AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Ordering,
};
#[cfg(loom)]
pub(crate) use loom::sync::atomic::{
    AtomicBool, AtomicI32, AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Ordering,
};

/// `const fn` normally, plain `fn` under loom (whose atomics have no `const` `new`).
macro_rules! const_unless_loom {
    ($(#[$meta:meta])* $vis:vis const fn $($rest:tt)*) => {
        #[cfg(not(loom))]
        $(#[$meta])* $vis const fn $($rest)*
        #[cfg(loom)]
        $(#[$meta])* $vis fn $($rest)*
    };
}
pub(crate) use const_unless_loom;

/// `[const { $init }; $n]`, or, under loom, the same array built element by element.
macro_rules! atomic_array {
    ($init:expr; $n:expr) => {{
        #[cfg(not(loom))]
        let array = [const { $init }; $n];
        #[cfg(loom)]
        let array = core::array::from_fn(|_| $init);
        array
    }};
}
pub(crate) use atomic_array;

/// The stop machine's initiator lock: taken only by `lock_within`.
#[cfg(not(loom))]
pub(crate) type StopLock = spin::Mutex<()>;
/// The stop machine's initiator lock, made of a loom atomic so that loom sees the
/// hand-over between two initiators.
#[cfg(loom)]
pub(crate) type StopLock = loom_lock::LoomLock;

#[cfg(loom)]
mod loom_lock {
    use super::{AtomicBool, Ordering};

    /// A test-and-set lock whose acquire and release loom sees.
    pub(crate) struct LoomLock(AtomicBool);

    /// Holds a [`LoomLock`] until dropped.
    pub(crate) struct LoomGuard<'a>(&'a LoomLock);

    impl LoomLock {
        pub(crate) fn new(_unit: ()) -> Self {
            LoomLock(AtomicBool::new(false))
        }

        pub(crate) fn try_lock(&self) -> Option<LoomGuard<'_>> {
            // Test, then test-and-set: a waiter that only loads while the lock is held
            // is a wait loom can explore to the end (a failed compare-and-swap in every
            // pass is a store loom orders anew against the holder's, without end).
            if self.0.load(Ordering::Relaxed) {
                return None;
            }
            // Acquire pairs with the release in `drop`: what the last holder did is
            // visible to this one.
            self.0
                .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
                // `then`, not `then_some`: a guard built and dropped on failure would
                // unlock the holder's lock.
                .then(|| LoomGuard(self))
        }
    }

    impl Drop for LoomGuard<'_> {
        fn drop(&mut self) {
            self.0.0.store(false, Ordering::Release);
        }
    }

    impl crate::stop::TryLock for LoomLock {
        type Guard<'a> = LoomGuard<'a>;

        fn try_lock(&self) -> Option<LoomGuard<'_>> {
            LoomLock::try_lock(self)
        }
    }
}

/// The knobs of the model check: each weakens one ordering or removes one step of the
/// core, so that a model can show loom finds the bug that follows. Only under loom;
/// elsewhere `weaken::order` is the identity and `weaken::on` is `false`, both
/// `const` and inlined away.
pub mod weaken {
    use super::Ordering;

    /// One weakening of the production code.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    #[repr(u32)]
    pub enum Knob {
        /// A joiner's `Arrived` acknowledgement: Release -> Relaxed.
        ArrivedRelaxed = 1 << 0,
        /// The initiator's store of `Run`: Release -> Relaxed.
        RunRelaxed = 1 << 1,
        /// An active CPU's `Ran` acknowledgement: Release -> Relaxed.
        RanRelaxed = 1 << 2,
        /// The initiator's store of `Exit`: Release -> Relaxed.
        ExitRelaxed = 1 << 3,
        /// No context synchronisation before a CPU unmasks.
        SkipSync = 1 << 4,
        /// The initiator returns its timeout without storing `Aborted`.
        AbortNotStored = 1 << 5,
        /// The timeout's missing CPUs are computed after the abort is stored (the
        /// suspected bug of `await_arrivals`, as it was).
        MissingAfterAbort = 1 << 6,
        /// Acknowledgements count whatever generation they name.
        AckIgnoresGeneration = 1 << 7,
        /// A joiner goes on into a newer call's state as if it were its own.
        JoinerIgnoresGeneration = 1 << 8,
        /// An NMI handler's `done` after it stored the result: Release -> Relaxed.
        NmiDoneRelaxed = 1 << 9,
        /// A stop IPI left pending from an earlier call makes the initiator a joiner
        /// of its own call (the bug the model check found).
        InitiatorJoinsOwnCall = 1 << 10,
        /// `ContextStates::try_defer` as a load, a test of `USER`, then a store: the
        /// check-then-set window the one compare-and-swap closes.
        DeferLoadThenStore = 1 << 11,
        /// A deferred entry does not wait for the stop that deferred it to close.
        EntryNoWait = 1 << 12,
        /// The entry's swap of the state word: AcqRel -> Relaxed.
        EntrySwapRelaxed = 1 << 13,
        /// The deferral's successful compare-and-swap: AcqRel -> Relaxed.
        DeferCasRelaxed = 1 << 14,
        /// The stop's `close_stop`: Release -> Relaxed.
        CloseStopRelaxed = 1 << 15,
    }

    #[cfg(loom)]
    static KNOBS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

    /// Turns `knobs` on (and every other knob off) for the models that follow.
    #[cfg(loom)]
    pub fn set(knobs: &[Knob]) {
        let bits = knobs.iter().fold(0, |bits, &knob| bits | knob as u32);
        KNOBS.store(bits, std::sync::atomic::Ordering::SeqCst);
    }

    /// Whether `knob` is on (never, outside loom).
    #[inline(always)]
    pub(crate) fn on(knob: Knob) -> bool {
        #[cfg(loom)]
        return KNOBS.load(std::sync::atomic::Ordering::SeqCst) & knob as u32 != 0;
        #[cfg(not(loom))]
        {
            let _ = knob;
            false
        }
    }

    /// `order`, or `Relaxed` where `knob` is on.
    #[inline(always)]
    pub(crate) fn order(order: Ordering, knob: Knob) -> Ordering {
        if on(knob) { Ordering::Relaxed } else { order }
    }
}
