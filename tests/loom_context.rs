//! Model check, with [loom](https://docs.rs/loom), of the context-tracking protocol of
//! `src/stop/context.rs` (issue 13): every interleaving of a patcher and an isolated CPU,
//! and every value the C11 memory model lets each load return.
//!
//! Built only with `RUSTFLAGS="--cfg loom"`; `tests/loom_context_models.rs` runs it from
//! the plain `cargo test`:
//!
//! ```sh
//! RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom cargo test --release --test loom_context
//! ```
//!
//! The protocol's operations are written out here with the same atomics, the same
//! orderings and the same bit layout as `ContextStates` (`exit_to_user`, `enter_kernel`,
//! `finish_deferred`, `try_defer`, `open_stop`, `close_stop`): the crate's own atomics are
//! `core`'s, which loom cannot drive. "Kernel text" is one atomic word, fetched through
//! the CPU's own instruction cache, which only a context synchronisation refreshes; a
//! stop's write is two stores (a torn intermediate value, then the new one). The checked
//! properties:
//! - once a patch has returned, the CPU runs no stale kernel code in the kernel stint in
//!   which it observed that (entry vs patch, exit vs patch);
//! - a deferred entry never fetches text a stop is still writing (the torn value).
//!
//! The twin with the deferral's CAS replaced by a separate load and store must fail:
//! loom finds the interleaving where the CPU enters between the two.

#![cfg(loom)]

use loom::sync::Arc;
use loom::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use loom::thread;

const USER: u64 = 1;
const PENDING: u64 = 1 << 1;
const TOKEN_SHIFT: u32 = 2;
const TOKEN_OPEN: u64 = 1 << 32;

const OLD: u64 = 1;
const TORN: u64 = 2;
const NEW: u64 = 3;

/// How the patcher marks a CPU in user mode.
#[derive(Clone, Copy, PartialEq)]
enum Defer {
    /// One CAS that succeeds only on a word with `USER` (the production code).
    Cas,
    /// A load, a test, then a store: the check-then-set window.
    LoadThenStore,
}

/// The machine: one isolated CPU and one patcher.
struct Machine {
    word: AtomicU64,
    open_stop: AtomicU64,
    text: AtomicU64,
    /// The patcher's IPI to the CPU, and the CPU's acknowledgement.
    ipi: AtomicBool,
    ack: AtomicBool,
    /// The patcher has decided: 1 deferred, 2 interrupted.
    decided: AtomicU64,
    /// The patch call has returned.
    done: AtomicBool,
}

impl Machine {
    fn new(in_user: bool) -> Arc<Machine> {
        Arc::new(Machine {
            word: AtomicU64::new(if in_user { USER } else { 0 }),
            open_stop: AtomicU64::new(0),
            text: AtomicU64::new(OLD),
            ipi: AtomicBool::new(false),
            ack: AtomicBool::new(false),
            decided: AtomicU64::new(0),
            done: AtomicBool::new(false),
        })
    }

    /// `ContextStates::try_defer`.
    fn try_defer(&self, token: u64, how: Defer) -> bool {
        let mark = USER | PENDING | token << TOKEN_SHIFT;
        match how {
            Defer::Cas => {
                let mut seen = self.word.load(Ordering::Relaxed);
                while seen & USER != 0 {
                    match self.word.compare_exchange_weak(
                        seen,
                        mark,
                        Ordering::AcqRel,
                        Ordering::Relaxed,
                    ) {
                        Ok(_) => return true,
                        Err(now) => seen = now,
                    }
                }
                false
            }
            Defer::LoadThenStore => {
                if self.word.load(Ordering::Acquire) & USER == 0 {
                    return false;
                }
                self.word.store(mark, Ordering::Release);
                true
            }
        }
    }

    /// The patcher: either defer the CPU or interrupt it and wait for its
    /// acknowledgement; then the call returns.
    fn decide(&self, token: u64, how: Defer) {
        if self.try_defer(token, how) {
            self.decided.store(1, Ordering::Release);
        } else {
            self.decided.store(2, Ordering::Release);
            self.ipi.store(true, Ordering::Release);
            while !self.ack.load(Ordering::Acquire) {
                thread::yield_now();
            }
        }
    }
}

/// The isolated CPU: its instruction cache, refreshed by `sync`.
struct Cpu {
    m: Arc<Machine>,
    icache: u64,
}

impl Cpu {
    fn sync(&mut self) {
        // A context synchronisation: the next fetch reads the text anew. (Relaxed: what
        // it may see is what the Acquires before it made visible.)
        self.icache = self.m.text.load(Ordering::Relaxed);
    }

    /// `ContextStates::exit_to_user`.
    fn exit_to_user(&self) {
        self.m.word.fetch_or(USER, Ordering::Release);
    }

    /// `ContextStates::enter_kernel`, `finish_deferred`, then the ISB if pending.
    fn enter_kernel(&mut self) {
        self.enter_kernel_waiting(true);
    }

    /// [`enter_kernel`](Self::enter_kernel), with or without the wait for the stop.
    fn enter_kernel_waiting(&mut self, wait_out_stop: bool) {
        let old = self.m.word.swap(0, Ordering::AcqRel);
        if old & PENDING != 0 {
            let token = old >> TOKEN_SHIFT;
            if token != 0 && wait_out_stop {
                while self.m.open_stop.load(Ordering::Acquire) == token {
                    thread::yield_now();
                }
            }
            self.sync();
        }
    }

    /// Kernel code that runs the patched site: torn text is never allowed; once the
    /// patch call has returned (observed by this CPU), only the new text is.
    fn run_kernel_code(&self) {
        assert_ne!(self.icache, TORN, "ran text the patch was still writing");
        if self.m.done.load(Ordering::Acquire) {
            assert_eq!(self.icache, NEW, "stale code after the patch had returned");
        }
    }

    /// The kernel with interrupts on: takes the patcher's IPI if it is pending.
    fn take_ipi(&mut self) {
        if self.m.ipi.load(Ordering::Acquire) && !self.m.ack.load(Ordering::Relaxed) {
            self.sync();
            self.m.ack.store(true, Ordering::Release);
        }
    }

    /// Before the thread ends: an IPI still owed is taken (from user mode: an entry).
    fn drain(&mut self) {
        loop {
            match self.m.decided.load(Ordering::Acquire) {
                1 => return,
                2 => {
                    while !self.m.ipi.load(Ordering::Acquire) {
                        thread::yield_now();
                    }
                    self.take_ipi();
                    return;
                }
                _ => thread::yield_now(),
            }
        }
    }
}

/// Entry vs patch (the live path: text written and made coherent, then the deferral or
/// the IPI): the CPU starts in user mode and enters the kernel once.
fn entry_vs_patch(how: Defer) {
    loom::model(move || {
        let m = Machine::new(true);
        let patcher = {
            let m = m.clone();
            thread::spawn(move || {
                m.text.store(NEW, Ordering::Relaxed);
                m.decide(0, how);
                m.done.store(true, Ordering::Release);
            })
        };
        let mut cpu = Cpu {
            m: m.clone(),
            icache: OLD,
        };
        cpu.enter_kernel();
        cpu.run_kernel_code();
        cpu.take_ipi();
        cpu.run_kernel_code();
        cpu.drain();
        patcher.join().unwrap();
    });
}

/// Exit vs patch: the CPU starts in the kernel, returns to user mode (where an IPI that
/// was sent meanwhile is taken as an entry), and enters the kernel again.
fn exit_vs_patch(how: Defer) {
    loom::model(move || {
        let m = Machine::new(false);
        let patcher = {
            let m = m.clone();
            thread::spawn(move || {
                m.text.store(NEW, Ordering::Relaxed);
                m.decide(0, how);
                m.done.store(true, Ordering::Release);
            })
        };
        let mut cpu = Cpu {
            m: m.clone(),
            icache: OLD,
        };
        cpu.take_ipi();
        cpu.exit_to_user();
        // An IPI pending at EL0 is taken at once: an entry, the handler, the exit.
        if cpu.m.ipi.load(Ordering::Acquire) {
            cpu.enter_kernel();
            cpu.take_ipi();
            cpu.exit_to_user();
        }
        cpu.enter_kernel();
        cpu.run_kernel_code();
        cpu.take_ipi();
        cpu.run_kernel_code();
        cpu.drain();
        patcher.join().unwrap();
    });
}

/// A deferred entry vs a stop in progress: the stop opens its window, defers the CPU (or
/// interrupts it: the CPU then waits in the rendezvous until the writes are done), writes
/// the text in two stores, closes the window and returns.
fn entry_vs_stop(how: Defer, wait_out_stop: bool) {
    loom::model(move || {
        let m = Machine::new(true);
        let token = 7 | TOKEN_OPEN;
        let patcher = {
            let m = m.clone();
            thread::spawn(move || {
                m.open_stop.store(token, Ordering::Relaxed);
                let deferred = m.try_defer(token, how);
                m.decided
                    .store(if deferred { 1 } else { 2 }, Ordering::Release);
                if !deferred {
                    // The rendezvous: the CPU arrives (acknowledges) and waits.
                    m.ipi.store(true, Ordering::Release);
                    while !m.ack.load(Ordering::Acquire) {
                        thread::yield_now();
                    }
                }
                m.text.store(TORN, Ordering::Relaxed);
                m.text.store(NEW, Ordering::Relaxed);
                m.open_stop.store(0, Ordering::Release);
                m.done.store(true, Ordering::Release);
            })
        };
        let mut cpu = Cpu {
            m: m.clone(),
            icache: OLD,
        };
        let arrive = |cpu: &mut Cpu| {
            if cpu.m.ipi.load(Ordering::Acquire) && !cpu.m.ack.load(Ordering::Relaxed) {
                cpu.m.ack.store(true, Ordering::Release);
                while cpu.m.open_stop.load(Ordering::Acquire) == token {
                    thread::yield_now();
                }
                cpu.sync();
            }
        };
        cpu.enter_kernel_waiting(wait_out_stop);
        cpu.run_kernel_code();
        arrive(&mut cpu);
        cpu.run_kernel_code();
        if cpu.m.decided.load(Ordering::Acquire) == 0 {
            while cpu.m.decided.load(Ordering::Acquire) == 0 {
                thread::yield_now();
            }
        }
        if cpu.m.decided.load(Ordering::Acquire) == 2 {
            while !cpu.m.ipi.load(Ordering::Acquire) {
                thread::yield_now();
            }
            arrive(&mut cpu);
        }
        patcher.join().unwrap();
    });
}

#[test]
fn entry_vs_patch_is_never_stale() {
    entry_vs_patch(Defer::Cas);
}

#[test]
fn exit_vs_patch_is_never_stale() {
    exit_vs_patch(Defer::Cas);
}

#[test]
fn deferred_entry_waits_out_the_stop() {
    entry_vs_stop(Defer::Cas, true);
}

/// The twin without the entry's wait for the stop that deferred it: the entry
/// synchronises before the stop has finished writing, and runs the old text after the
/// stop returned, or the torn text (loom reports the first of them it finds).
#[test]
#[should_panic(expected = "the patch")]
fn entry_that_does_not_wait_out_the_stop_is_found_torn() {
    entry_vs_stop(Defer::Cas, false);
}

/// The check-then-set twin: the CPU enters between the patcher's load (user mode) and its
/// store, takes no deferred sync and gets no IPI; it runs stale code after the patch
/// returned. Loom must find that.
#[test]
#[should_panic(expected = "stale code after the patch had returned")]
fn load_then_store_deferral_is_found_stale() {
    entry_vs_patch(Defer::LoadThenStore);
}
