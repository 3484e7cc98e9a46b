//! The arch-free half of the user programs (`aarch64/user.rs`, `x86_64/user.rs`): the
//! system call numbers, the per-CPU user data slots, the kinds of program, the tick hook
//! and the counters the isolation tests read. Each port keeps its own entry and exit,
//! its user-mode assembly and its fault record.

use crate::MAX_CPUS;
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// The loop's kernel entry: returns the hook's value and whether to exit (in the
/// registers the port's `user.rs` names).
pub const SYS_TICK: u64 = 0;
/// Back to the kernel, with a status.
pub const SYS_EXIT: u64 = 1;

/// Bytes of `.user_data` per CPU: the mailbox word, then the stack.
pub(super) const USER_SLOT: usize = 256;

/// `pm_enter_user`'s status values besides `SYS_EXIT`'s own.
pub(super) const STATUS_FAULT: u64 = 1 << 63;
pub(super) const STATUS_BAD_CALL: u64 = (1 << 63) | 1;

/// Per CPU: a mailbox (word 0) and a small stack (the top of the slot).
#[repr(C, align(4096))]
pub struct UserData(UnsafeCell<[[u64; USER_SLOT / 8]; MAX_CPUS]>);

// SAFETY: the kernel never reads it; it writes only a mailbox word (the port's
// `post_to_mailbox`: STTR on arm64, a store under STAC on x86); user code reads its
// mailbox and uses its stack.
unsafe impl Sync for UserData {}

impl UserData {
    /// The address of `cpu`'s slot.
    pub(super) fn slot(&self, cpu: usize) -> usize {
        self.0.get() as usize + (cpu % MAX_CPUS) * USER_SLOT
    }
}

/// The user programs' data, user read-write (mapped by the port's page tables).
#[unsafe(link_section = ".user_data")]
pub static USER_DATA: UserData = UserData(UnsafeCell::new([[0; USER_SLOT / 8]; MAX_CPUS]));

/// A user program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Program {
    /// `pm_user_loop(spins)`.
    Loop {
        /// Iterations between two kernel entries (the rate).
        spins: u64,
    },
    /// Loads from `addr`.
    ReadProbe(usize),
    /// Stores to `addr`.
    WriteProbe(usize),
    /// Jumps to `addr`.
    ExecProbe(usize),
}

/// Per CPU: interrupts taken from user mode (counted by the CPU itself, before it
/// handles them).
static USER_IRQS: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];

/// Per CPU: `SYS_TICK` entries.
static TICKS: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];

/// What the tick hook answers: the value returned to the program and whether the loop
/// must exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tick {
    /// Returned to the program (arm64 x0, x86 RAX).
    pub value: u64,
    /// Makes the loop exit (`SYS_EXIT`).
    pub exit: bool,
}

/// The tick hook: a `fn(usize) -> Tick` as usize, 0 = none (the loop exits at once).
static TICK_HOOK: AtomicUsize = AtomicUsize::new(0);

/// Installs the kernel code each `SYS_TICK` runs (after the entry's deferred work: it may
/// be patchable), with the CPU's index.
pub fn set_tick_hook(hook: fn(usize) -> Tick) {
    // Release pairs with the Acquire in `tick`.
    TICK_HOOK.store(hook as usize, Ordering::Release);
}

/// A `SYS_TICK` from `cpu`: counts it and runs the hook.
pub(super) fn tick(cpu: usize) -> Tick {
    TICKS[cpu % MAX_CPUS].fetch_add(1, Ordering::Relaxed);
    // Acquire pairs with the Release in `set_tick_hook`.
    let hook = TICK_HOOK.load(Ordering::Acquire);
    if hook == 0 {
        return Tick {
            value: 0,
            exit: true,
        };
    }
    // SAFETY: only `set_tick_hook` stores non-zero values, and those are
    // `fn(usize) -> Tick` pointers.
    let hook: fn(usize) -> Tick = unsafe { core::mem::transmute(hook) };
    hook(cpu)
}

/// Counts an interrupt `cpu` took from user mode (before it handles it).
#[inline(always)]
pub fn count_irq(cpu: usize) {
    USER_IRQS[cpu % MAX_CPUS].fetch_add(1, Ordering::Relaxed);
}

/// Interrupts `cpu` took from user mode.
pub fn user_irqs(cpu: usize) -> u64 {
    USER_IRQS[cpu % MAX_CPUS].load(Ordering::Relaxed)
}

/// `SYS_TICK` entries of `cpu`.
pub fn ticks(cpu: usize) -> u64 {
    TICKS[cpu % MAX_CPUS].load(Ordering::Relaxed)
}
