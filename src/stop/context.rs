//! Context tracking for isolated CPUs: one state word per CPU that says whether it runs
//! user code, so that a patcher can defer that CPU's synchronisation to its next kernel
//! entry instead of interrupting it (Valentin Schneider, "context_tracking,x86: Defer
//! some IPIs until a user->kernel transition", LKML, 2026, reviewed by Frederic
//! Weisbecker).
//!
//! # The state word
//!
//! | bits   | meaning                                                                  |
//! |--------|--------------------------------------------------------------------------|
//! | 0      | `USER`: the CPU is in user mode (or on its way there, in `.text.nopatch`) |
//! | 1      | `PENDING`: a patcher deferred a context synchronisation to the next entry |
//! | 2..    | the token of the stop whose writes the entry must wait out (0: none)      |
//!
//! - **Exit to user** is one read-modify-write, [`ContextStates::exit_to_user`] (`USER`
//!   set, `Release`), the last thing the kernel does before the return to user mode:
//!   from there to the `ERET`/`SYSRET` it runs only code patching refuses.
//! - **Entry** is one read-modify-write, [`ContextStates::enter_kernel`] (swap to 0,
//!   `AcqRel`), the first thing the entry code does; if it finds `PENDING`, the CPU waits
//!   until the stop named by the token has closed ([`ContextStates::finish_deferred`])
//!   and then context-synchronises, all before it runs any patchable instruction.
//! - **A patcher** defers with one compare-and-swap ([`ContextStates::try_defer`]) that
//!   succeeds only on a word with `USER` set; on a word without it, it fails and the
//!   patcher interrupts the CPU as usual. There is no window between "is it in user
//!   mode?" and "mark it": both are the same atomic operation on the same word, so
//!   either the CAS comes first in the word's modification order (and the entry's swap
//!   reads `PENDING`) or the swap does (and the CAS fails).
//!
//! This answers the review's two questions for this protocol: the deferral condition is
//! "isolated **and** in user mode" (`&&`: a non-isolated CPU is never deferred, and an
//! isolated CPU in the kernel is interrupted), and the only barriers it needs are the
//! Release of the patcher's CAS (ordering its text writes, or the opening of its stop,
//! before the mark) paired with the Acquire of the entry's swap, then the Acquire load of
//! the stop token paired with the stop's Release when it closes, and a context
//! synchronisation after both (docs/porting.md, "Isolated CPUs").
//!
//! Model-checked with loom in `tests/loom_context.rs` (each ordering above, the single
//! CAS and the entry's wait have a `sync::weaken` knob that loom must find failing).
//!
//! Arch-free: the architecture's entry and exit code call it, and
//! [`Arch::context_states`](super::Arch::context_states) hands it to the stop core.

use crate::cpuset::AtomicCpuSet;
use crate::sync::weaken::{self, Knob};
use crate::sync::{AtomicU64, Ordering, atomic_array, const_unless_loom};
use crate::{CpuSet, MAX_CPUS};

/// The CPU is in user mode.
pub const USER: u64 = 1;
/// A context synchronisation is owed at the next kernel entry.
pub const PENDING: u64 = 1 << 1;
const TOKEN_SHIFT: u32 = 2;
/// Set in every stop token, so that a token is never 0 ("no stop to wait for").
const TOKEN_OPEN: u64 = 1 << 32;

/// The token of stop call `generation`.
#[inline(always)]
fn token(generation: u32) -> u64 {
    u64::from(generation) | TOKEN_OPEN
}

/// One CPU's state word and what the CPU itself counts, on a cache line of its own (the
/// word is written on every entry and exit of its CPU).
#[repr(C, align(64))]
struct CpuContext {
    word: AtomicU64,
    /// Entries that found `PENDING` (written by the CPU only).
    deferred_syncs: AtomicU64,
    /// Kernel entries from user mode (written by the CPU only).
    entries: AtomicU64,
}

/// What [`ContextStates::enter_kernel`] found: the deferred work the entry still owes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use = "the deferred work must be done before any patchable instruction"]
pub struct Deferred {
    /// A patcher deferred a synchronisation to this entry.
    pub pending: bool,
    /// The stop whose window the entry must wait out first (0: none).
    token: u64,
}

/// The entry waited longer than its limit for a stop to close: the stop is stuck.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StopStillOpen {
    /// How long the entry waited.
    pub waited_ns: u64,
}

/// The context state words of every CPU, and which CPUs are isolated.
pub struct ContextStates {
    isolated: AtomicCpuSet,
    /// The token of the stop whose window is open (0: none). Written by the stop
    /// initiator only, under the stop machine's lock.
    open_stop: AtomicU64,
    cpus: [CpuContext; MAX_CPUS],
}

impl Default for ContextStates {
    fn default() -> Self {
        Self::new()
    }
}

impl ContextStates {
    const_unless_loom! {
        /// No CPU isolated, every CPU in the kernel.
        pub const fn new() -> Self {
            ContextStates {
                isolated: AtomicCpuSet::new(),
                open_stop: AtomicU64::new(0),
                cpus: atomic_array![CpuContext {
                    word: AtomicU64::new(0),
                    deferred_syncs: AtomicU64::new(0),
                    entries: AtomicU64::new(0),
                }; MAX_CPUS],
            }
        }
    }

    /// Marks `cpus` isolated (boot time: `isolcpus=`). Only isolated CPUs are deferred.
    pub fn set_isolated(&self, cpus: CpuSet) {
        // Relaxed: set before the isolated CPUs are started on user code; a patcher that
        // misses it interrupts them as usual, which is always correct.
        self.isolated.store(cpus, Ordering::Relaxed);
    }

    /// The isolated CPUs.
    pub fn isolated(&self) -> CpuSet {
        self.isolated.load(Ordering::Relaxed)
    }

    #[inline(always)]
    fn cpu(&self, cpu: usize) -> &CpuContext {
        &self.cpus[cpu % MAX_CPUS]
    }

    /// The raw state word of `cpu` (diagnostics and tests).
    pub fn word(&self, cpu: usize) -> u64 {
        self.cpu(cpu).word.load(Ordering::Relaxed)
    }

    /// Whether `cpu` is in user mode right now (diagnostics: decides nothing).
    pub fn in_user(&self, cpu: usize) -> bool {
        self.word(cpu) & USER != 0
    }

    /// Entries of `cpu` that did deferred work.
    pub fn deferred_syncs(&self, cpu: usize) -> u64 {
        self.cpu(cpu).deferred_syncs.load(Ordering::Relaxed)
    }

    /// Kernel entries of `cpu` through [`enter_kernel`](Self::enter_kernel).
    pub fn entries(&self, cpu: usize) -> u64 {
        self.cpu(cpu).entries.load(Ordering::Relaxed)
    }

    /// The calling CPU `cpu` leaves for user mode: one RMW. From here to the return to
    /// user mode it must run only code that patching refuses.
    #[inline(always)]
    pub fn exit_to_user(&self, cpu: usize) {
        // Release: everything the kernel did before (its own view of the text included)
        // is ordered before a patcher's CAS that reads USER (AcqRel) and so before
        // anything that patcher does after deferring this CPU.
        self.cpu(cpu).word.fetch_or(USER, Ordering::Release);
    }

    /// The calling CPU `cpu` has entered the kernel from user mode: one RMW, before any
    /// patchable instruction. The caller then does [`finish_deferred`](Self::finish_deferred)
    /// and, if [`Deferred::pending`], a context synchronisation.
    #[inline(always)]
    pub fn enter_kernel(&self, cpu: usize) -> Deferred {
        let me = self.cpu(cpu);
        // AcqRel: Acquire pairs with the Release of a patcher's CAS that set PENDING
        // (its text writes, or the opening of its stop, happen before what follows);
        // Release orders the user-mode part before a later patcher's failed CAS.
        let old = me
            .word
            .swap(0, weaken::order(Ordering::AcqRel, Knob::EntrySwapRelaxed));
        me.entries
            .store(me.entries.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
        let pending = old & PENDING != 0;
        if pending {
            me.deferred_syncs.store(
                me.deferred_syncs.load(Ordering::Relaxed) + 1,
                Ordering::Relaxed,
            );
        }
        Deferred {
            pending,
            token: old >> TOKEN_SHIFT,
        }
    }

    /// The deferred work of an entry, short of the context synchronisation the caller
    /// makes afterwards: if a stop deferred this CPU, waits until that stop's window has
    /// closed (its writes and their maintenance are complete), so the CPU never runs
    /// text another CPU is writing. Bounded by `limit_ns` of `now_ns`.
    #[inline(always)]
    pub fn finish_deferred(
        &self,
        deferred: Deferred,
        limit_ns: u64,
        now_ns: impl Fn() -> u64,
        relax: impl Fn(),
    ) -> Result<(), StopStillOpen> {
        if !deferred.pending || deferred.token == 0 || weaken::on(Knob::EntryNoWait) {
            return Ok(());
        }
        let mut start = None;
        // Acquire pairs with the Release in `close_stop`: once the stop has moved on,
        // its writes are visible (and, after the caller's synchronisation, fetched).
        while self.open_stop.load(Ordering::Acquire) == deferred.token {
            let now = now_ns();
            let waited_ns = now.saturating_sub(*start.get_or_insert(now));
            if waited_ns > limit_ns {
                return Err(StopStillOpen { waited_ns });
            }
            relax();
        }
        Ok(())
    }

    /// A patcher defers `cpu`'s synchronisation to its next entry, if `cpu` is isolated
    /// and in user mode (`&&`), with one atomic operation; `stop` is the generation of the
    /// stop whose window the entry must wait out (`None` for a synchronisation after
    /// writes that are already complete). False: the caller must interrupt `cpu`.
    #[inline(always)]
    pub fn try_defer(&self, cpu: usize, stop: Option<u32>) -> bool {
        if !self.isolated.contains(cpu, Ordering::Relaxed) {
            return false;
        }
        let mark = USER | PENDING | stop.map_or(0, token) << TOKEN_SHIFT;
        // One CAS loop whose every attempt succeeds only on a word with USER set. AcqRel
        // on success: Release orders this patcher's writes (or `open_stop`) before the
        // mark, to the entry's Acquire swap. Relaxed on failure: the CPU is in the
        // kernel and will be interrupted, which needs nothing from this load.
        let word = &self.cpu(cpu).word;
        let success = weaken::order(Ordering::AcqRel, Knob::DeferCasRelaxed);
        let mut seen = word.load(Ordering::Relaxed);
        if weaken::on(Knob::DeferLoadThenStore) {
            if seen & USER == 0 {
                return false;
            }
            word.store(mark, Ordering::Release);
            return true;
        }
        while seen & USER != 0 {
            match word.compare_exchange_weak(seen, mark, success, Ordering::Relaxed) {
                Ok(_) => return true,
                Err(now) => seen = now,
            }
        }
        false
    }

    /// [`try_defer`](Self::try_defer) for every CPU of `targets`: the CPUs deferred.
    #[unsafe(link_section = ".text.nopatch")]
    pub fn defer(&self, targets: CpuSet, stop: Option<u32>) -> CpuSet {
        let candidates = targets.and(self.isolated());
        let mut deferred = CpuSet::EMPTY;
        for cpu in candidates {
            if self.try_defer(cpu, stop) {
                deferred = deferred.with(cpu);
            }
        }
        deferred
    }

    /// The stop machine opens call `generation`'s window: entries deferred by it wait
    /// until [`close_stop`](Self::close_stop). Before any [`try_defer`](Self::try_defer)
    /// for it.
    #[unsafe(link_section = ".text.nopatch")]
    pub fn open_stop(&self, generation: u32) {
        // Relaxed: released to an entry by the Release of the CAS that names it.
        self.open_stop.store(token(generation), Ordering::Relaxed);
    }

    /// The stop machine's window is closed: every write of the call and its maintenance
    /// are complete.
    #[unsafe(link_section = ".text.nopatch")]
    pub fn close_stop(&self) {
        // Release pairs with the Acquire in `finish_deferred`.
        self.open_stop
            .store(0, weaken::order(Ordering::Release, Knob::CloseStopRelaxed));
    }
}
