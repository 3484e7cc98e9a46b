//! The host "architecture": OS threads play the CPUs, so `cargo test` can drive the
//! stop-machine core with real concurrency.
//!
//! A thread becomes CPU `n` with [`HostArch::bind_current_thread`]. Interrupts are
//! simulated: a stop IPI sets a pending flag, and the CPU "takes" it when its code
//! calls [`HostArch::poll_interrupts`] (every [`Arch::relax`] does) with interrupts
//! unmasked, like hardware checking for an interrupt between instructions. Taking one
//! masks interrupts for the duration of the handler, as exception entry does.
//!
//! NMIs are modelled on arm64 pseudo-NMIs: [`Arch::mask_irqs`] leaves them
//! deliverable, [`Arch::mask_all`] blocks them, and they never nest. With
//! [`HostArch::nmis_like_x86`] they pass [`Arch::mask_all`] too, as on x86, and an NMI
//! hook stands for the NMI handlers after the stop machine's slot.

pub mod kprobes;
mod text;
pub use text::HostText;

use crate::stop::{Arch, ContextStates, StopMachine, StopStillOpen};
use crate::{AtomicCpuSet, CpuSet, MAX_CPUS};

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

thread_local! {
    static CURRENT_CPU: Cell<Option<usize>> = const { Cell::new(None) };
}

struct Shared {
    online: AtomicCpuSet,
    pending: [AtomicBool; MAX_CPUS],
    masked: [AtomicBool; MAX_CPUS],
    nmi_pending: [AtomicBool; MAX_CPUS],
    nmi_masked: [AtomicBool; MAX_CPUS],
    in_nmi: [AtomicBool; MAX_CPUS],
    /// In the stop IPI's handler.
    in_irq: [AtomicBool; MAX_CPUS],
    /// NMIs sent to these CPUs are lost (a test knob).
    nmi_lost: AtomicCpuSet,
    nmis_taken: [AtomicU64; MAX_CPUS],
    syncs: [AtomicU64; MAX_CPUS],
    /// Per CPU: the [`HostArch::tick`] of its last `sync_context` and last `restore`.
    last_sync: [AtomicU64; MAX_CPUS],
    last_restore: [AtomicU64; MAX_CPUS],
    ticks: AtomicU64,
    ipis_sent: AtomicU64,
    epoch: OnceLock<Instant>,
    stop_ipi_handler: OnceLock<Box<dyn Fn() + Send + Sync>>,
    nmi_handler: OnceLock<Box<dyn Fn() + Send + Sync>>,
    /// NMIs pass `mask_all`, as on x86.
    nmis_pass_mask_all: AtomicBool,
    /// Runs after the stop machine's slot in every NMI, with the CPU's index.
    nmi_hook: std::sync::Mutex<Option<NmiHook>>,
    /// The CPUs' user/kernel state words ([`HostArch::exit_to_user`]).
    contexts: ContextStates,
    /// Per CPU: stop IPIs taken while it was in user mode.
    user_ipis: [AtomicU64; MAX_CPUS],
}

/// What [`HostArch::set_nmi_hook`] installs.
type NmiHook = Arc<dyn Fn(usize) + Send + Sync>;

/// Saved mask state: what [`Arch::mask_all`] or [`Arch::mask_irqs`] found.
#[derive(Clone, Copy, Debug)]
pub struct HostMask {
    irqs: bool,
    nmis: bool,
}

/// A machine of host threads. Cheap to clone: clones share the machine.
#[derive(Clone)]
pub struct HostArch {
    shared: Arc<Shared>,
}

impl HostArch {
    /// A machine with CPUs `0..cpus` online.
    ///
    /// # Panics
    /// If `cpus` is 0 or more than [`MAX_CPUS`].
    pub fn new(cpus: usize) -> Self {
        assert!((1..=MAX_CPUS).contains(&cpus), "bad CPU count {cpus}");
        let shared = Shared {
            online: AtomicCpuSet::new(),
            pending: [const { AtomicBool::new(false) }; MAX_CPUS],
            masked: [const { AtomicBool::new(false) }; MAX_CPUS],
            nmi_pending: [const { AtomicBool::new(false) }; MAX_CPUS],
            nmi_masked: [const { AtomicBool::new(false) }; MAX_CPUS],
            in_nmi: [const { AtomicBool::new(false) }; MAX_CPUS],
            in_irq: [const { AtomicBool::new(false) }; MAX_CPUS],
            nmi_lost: AtomicCpuSet::new(),
            nmis_taken: [const { AtomicU64::new(0) }; MAX_CPUS],
            syncs: [const { AtomicU64::new(0) }; MAX_CPUS],
            last_sync: [const { AtomicU64::new(0) }; MAX_CPUS],
            last_restore: [const { AtomicU64::new(0) }; MAX_CPUS],
            ticks: AtomicU64::new(0),
            ipis_sent: AtomicU64::new(0),
            epoch: OnceLock::new(),
            stop_ipi_handler: OnceLock::new(),
            nmi_handler: OnceLock::new(),
            nmis_pass_mask_all: AtomicBool::new(false),
            nmi_hook: std::sync::Mutex::new(None),
            contexts: ContextStates::new(),
            user_ipis: [const { AtomicU64::new(0) }; MAX_CPUS],
        };
        shared.online.store(CpuSet::first(cpus), Ordering::Relaxed);
        shared.epoch.get_or_init(Instant::now);
        HostArch {
            shared: Arc::new(shared),
        }
    }

    /// Makes the calling thread CPU `cpu` (of any machine: the binding is per thread).
    pub fn bind_current_thread(&self, cpu: usize) {
        assert!(cpu < MAX_CPUS);
        CURRENT_CPU.with(|current| current.set(Some(cpu)));
    }

    /// Routes this machine's stop IPI to `stop` (the "interrupt controller" wiring).
    ///
    /// Holds only a weak reference, so the machine can still be dropped.
    pub fn connect(stop: &Arc<StopMachine<HostArch>>) {
        let weak = Arc::downgrade(stop);
        let handler = move || {
            if let Some(stop) = weak.upgrade() {
                stop.handle_stop_ipi();
            }
        };
        if stop
            .arch()
            .shared
            .stop_ipi_handler
            .set(Box::new(handler))
            .is_err()
        {
            panic!("HostArch::connect called twice");
        }
        let weak = Arc::downgrade(stop);
        let nmi = move || {
            #[cfg(feature = "stop-machine-nmi")]
            if let Some(stop) = weak.upgrade() {
                // The stop-machine slot comes first; nothing else uses NMIs here.
                stop.handle_nmi();
            }
            #[cfg(not(feature = "stop-machine-nmi"))]
            let _ = &weak;
        };
        let _ = stop.arch().shared.nmi_handler.set(Box::new(nmi));
    }

    /// Makes NMIs pass [`Arch::mask_all`] as on x86 (`cli`), and reports that through
    /// `Arch::nmis_pass_mask_all`; `false` puts back the arm64 model.
    pub fn nmis_like_x86(&self, on: bool) {
        self.shared.nmis_pass_mask_all.store(on, Ordering::Relaxed);
    }

    /// Runs `hook(cpu)` in every NMI after the stop machine's slot (`None`: nothing).
    pub fn set_nmi_hook(&self, hook: Option<NmiHook>) {
        *self.shared.nmi_hook.lock().unwrap() = hook;
    }

    /// Makes NMIs sent to `cpus` vanish (to test the NMI timeout), or with an empty set,
    /// arrive again.
    pub fn lose_nmis(&self, cpus: CpuSet) {
        self.shared.nmi_lost.store(cpus, Ordering::Relaxed);
    }

    /// Whether the calling CPU is in an NMI handler.
    pub fn in_nmi(&self) -> bool {
        self.shared.in_nmi[self.cpu_id()].load(Ordering::Relaxed)
    }

    /// How many NMIs `cpu` has taken.
    pub fn nmis_taken(&self, cpu: usize) -> u64 {
        self.shared.nmis_taken[cpu].load(Ordering::Relaxed)
    }

    /// Sends an NMI to each CPU in `targets`.
    pub fn send_nmi(&self, targets: CpuSet) {
        let lost = self.shared.nmi_lost.load(Ordering::Relaxed);
        for cpu in targets.minus(lost).iter() {
            self.shared.nmi_pending[cpu].store(true, Ordering::Release);
        }
    }

    /// Takes a pending stop IPI if the calling CPU has interrupts unmasked, running the
    /// connected handler with interrupts masked. Returns whether one was taken.
    pub fn poll_interrupts(&self) -> bool {
        let cpu = self.cpu_id();
        let shared = &self.shared;
        // NMIs first: they pass an IRQ mask, not an NMI mask, and never nest.
        if !shared.nmi_masked[cpu].load(Ordering::Relaxed)
            && !shared.in_nmi[cpu].load(Ordering::Relaxed)
            && shared.nmi_pending[cpu].swap(false, Ordering::Acquire)
            && let Some(handler) = shared.nmi_handler.get()
        {
            shared.in_nmi[cpu].store(true, Ordering::Relaxed);
            shared.nmis_taken[cpu].fetch_add(1, Ordering::Relaxed);
            handler();
            let hook = shared.nmi_hook.lock().unwrap().clone();
            if let Some(hook) = hook {
                hook(cpu);
            }
            shared.in_nmi[cpu].store(false, Ordering::Relaxed);
        }
        let Some(handler) = shared.stop_ipi_handler.get() else {
            return false;
        };
        if shared.masked[cpu].load(Ordering::Relaxed) {
            return false;
        }
        // Acquire pairs with the release in `send_stop_ipi`, as a DSB before an SGI write
        // makes the sender's stores visible to the interrupted CPU.
        if !shared.pending[cpu].swap(false, Ordering::Acquire) {
            return false;
        }
        shared.masked[cpu].store(true, Ordering::Relaxed);
        shared.in_irq[cpu].store(true, Ordering::Relaxed);
        handler();
        shared.in_irq[cpu].store(false, Ordering::Relaxed);
        shared.masked[cpu].store(false, Ordering::Relaxed);
        true
    }

    /// Whether `cpu` has interrupts masked right now.
    pub fn is_masked(&self, cpu: usize) -> bool {
        self.shared.masked[cpu].load(Ordering::Relaxed)
    }

    /// Whether a stop IPI is pending on `cpu`.
    pub fn ipi_pending(&self, cpu: usize) -> bool {
        self.shared.pending[cpu].load(Ordering::Relaxed)
    }

    /// How many context synchronisations `cpu` has executed.
    pub fn syncs(&self, cpu: usize) -> u64 {
        self.shared.syncs[cpu].load(Ordering::Relaxed)
    }

    /// The next value of a machine-wide event sequence, shared with the records of
    /// [`last_sync`](Self::last_sync) and [`last_restore`](Self::last_restore): a test
    /// takes one when it "writes text" and compares.
    pub fn tick(&self) -> u64 {
        // SeqCst: one total order of events across all CPU threads.
        self.shared.ticks.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// The [`tick`](Self::tick) at `cpu`'s latest context synchronisation (0: never).
    pub fn last_sync(&self, cpu: usize) -> u64 {
        self.shared.last_sync[cpu].load(Ordering::SeqCst)
    }

    /// The [`tick`](Self::tick) at `cpu`'s latest [`Arch::restore`] (0: never).
    pub fn last_restore(&self, cpu: usize) -> u64 {
        self.shared.last_restore[cpu].load(Ordering::SeqCst)
    }

    /// How many stop IPIs have been sent in total.
    pub fn ipis_sent(&self) -> u64 {
        self.shared.ipis_sent.load(Ordering::Relaxed)
    }

    /// The CPUs' context state words.
    pub fn contexts(&self) -> &ContextStates {
        &self.shared.contexts
    }

    /// The calling CPU returns to "user mode": from here until
    /// [`enter_kernel`](Self::enter_kernel) it runs no kernel text (the caller's loop
    /// must not touch the machine's text) and takes interrupts only through
    /// [`user_poll`](Self::user_poll).
    pub fn exit_to_user(&self) {
        self.shared.contexts.exit_to_user(self.cpu_id());
    }

    /// The calling CPU enters the kernel from user mode: the state word's swap, then the
    /// deferred work (wait out the stop that deferred it, then a context
    /// synchronisation), all with interrupts masked as exception entry has them.
    /// Returns whether work had been deferred.
    pub fn enter_kernel(&self) -> Result<bool, StopStillOpen> {
        let cpu = self.cpu_id();
        let saved = self.mask_all();
        let deferred = self.shared.contexts.enter_kernel(cpu);
        let waited = self.shared.contexts.finish_deferred(
            deferred,
            10_000_000_000,
            || self.now_ns(),
            std::thread::yield_now,
        );
        if deferred.pending {
            self.sync_context();
        }
        self.restore(saved);
        waited.map(|()| deferred.pending)
    }

    /// "User mode" between instructions: a pending stop IPI is an interrupt taken from
    /// user mode, so the CPU enters the kernel, takes it and returns to user mode.
    /// Returns whether it did (counted in [`user_ipis`](Self::user_ipis)).
    pub fn user_poll(&self) -> Result<bool, StopStillOpen> {
        let cpu = self.cpu_id();
        if !self.shared.pending[cpu].load(Ordering::Acquire) {
            return Ok(false);
        }
        self.shared.user_ipis[cpu].fetch_add(1, Ordering::Relaxed);
        self.enter_kernel()?;
        self.poll_interrupts();
        self.exit_to_user();
        Ok(true)
    }

    /// Stop IPIs `cpu` took from user mode.
    pub fn user_ipis(&self, cpu: usize) -> u64 {
        self.shared.user_ipis[cpu].load(Ordering::Relaxed)
    }
}

// SAFETY: each thread binds a distinct CPU index below MAX_CPUS; `mask_all` makes
// `poll_interrupts` refuse to run a handler until `restore` (NMIs excepted with
// `nmis_like_x86`, as the trait allows, and then `nmis_pass_mask_all` says so with this
// machine's own self-NMI); `send_stop_ipi` sets a flag
// that the target takes at its next unmasked poll; the simulated ISB is a SeqCst fence,
// which is all "instruction fetch" needs when instructions are plain data.
unsafe impl Arch for HostArch {
    type MaskState = HostMask;

    fn cpu_id(&self) -> usize {
        CURRENT_CPU
            .with(Cell::get)
            .expect("host thread is not bound to a CPU: call HostArch::bind_current_thread")
    }

    fn online_cpus(&self) -> CpuSet {
        self.shared.online.load(Ordering::Relaxed)
    }

    fn mask_all(&self) -> HostMask {
        let cpu = self.cpu_id();
        HostMask {
            irqs: self.shared.masked[cpu].swap(true, Ordering::Relaxed),
            nmis: if self.shared.nmis_pass_mask_all.load(Ordering::Relaxed) {
                self.shared.nmi_masked[cpu].load(Ordering::Relaxed)
            } else {
                self.shared.nmi_masked[cpu].swap(true, Ordering::Relaxed)
            },
        }
    }

    fn mask_irqs(&self) -> HostMask {
        let cpu = self.cpu_id();
        HostMask {
            irqs: self.shared.masked[cpu].swap(true, Ordering::Relaxed),
            nmis: self.shared.nmi_masked[cpu].load(Ordering::Relaxed),
        }
    }

    fn restore(&self, saved: HostMask) {
        let cpu = self.cpu_id();
        self.shared.last_restore[cpu].store(self.tick(), Ordering::SeqCst);
        self.shared.masked[cpu].store(saved.irqs, Ordering::Relaxed);
        self.shared.nmi_masked[cpu].store(saved.nmis, Ordering::Relaxed);
    }

    fn all_masked(&self) -> bool {
        let cpu = self.cpu_id();
        // As x86's "IF clear" where NMIs pass the mask.
        self.shared.masked[cpu].load(Ordering::Relaxed)
            && (self.shared.nmi_masked[cpu].load(Ordering::Relaxed)
                || self.shared.nmis_pass_mask_all.load(Ordering::Relaxed))
    }

    fn send_stop_ipi(&self, targets: CpuSet) {
        for cpu in targets.iter() {
            self.shared.pending[cpu].store(true, Ordering::Release);
            self.shared.ipis_sent.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn sync_context(&self) {
        std::sync::atomic::fence(Ordering::SeqCst);
        let cpu = self.cpu_id();
        self.shared.syncs[cpu].fetch_add(1, Ordering::Relaxed);
        self.shared.last_sync[cpu].store(self.tick(), Ordering::SeqCst);
    }

    fn relax(&self) {
        // A spinning CPU still takes interrupts while unmasked.
        self.poll_interrupts();
        // Two host cores run up to eight CPU threads: let the others make progress.
        std::thread::yield_now();
    }

    fn now_ns(&self) -> u64 {
        let epoch = self.shared.epoch.get_or_init(Instant::now);
        epoch.elapsed().as_nanos() as u64
    }

    fn context_states(&self) -> Option<&ContextStates> {
        Some(&self.shared.contexts)
    }

    fn call_context(&self) -> crate::stop::CallContext {
        use crate::stop::CallContext;
        let cpu = self.cpu_id();
        // Relaxed: each flag is written only by its own CPU's thread.
        if self.shared.in_nmi[cpu].load(Ordering::Relaxed) {
            CallContext::Nmi
        } else if self.shared.in_irq[cpu].load(Ordering::Relaxed) {
            CallContext::Irq
        } else if self.shared.masked[cpu].load(Ordering::Relaxed) {
            CallContext::IrqsMasked
        } else {
            CallContext::Normal
        }
    }

    #[cfg(feature = "stop-machine-nmi")]
    fn nmis_pass_mask_all(&self) -> Option<&dyn crate::stop::RaiseNmi> {
        self.shared
            .nmis_pass_mask_all
            .load(Ordering::Relaxed)
            .then_some(self as &dyn crate::stop::RaiseNmi)
    }
}

// SAFETY: `send_nmi` sets a flag the CPU takes at its next poll unless `mask_all` is in
// force or it is already in an NMI; the handler installed by `connect` calls
// `handle_nmi` first.
#[cfg(feature = "stop-machine-nmi")]
unsafe impl crate::stop::NmiArch for HostArch {
    fn send_self_nmi(&self) {
        self.send_nmi(CpuSet::single(self.cpu_id()));
    }
}
