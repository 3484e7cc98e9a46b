//! What the core records about a call besides its outcome: the evidence that every CPU
//! was quiescent before the function ran ([`Quiescence`]), the masked-window witness,
//! and the initiator's profile of the rendezvous ([`CallProfile`]).
//!
//! All of it is measurement: nothing here decides anything, so most accesses are
//! `Relaxed`, made visible by the acknowledgements' and the control word's
//! release/acquire pairs of the phase they belong to.

use super::state::{CpuSlot, Progress};
use super::{Arch, StopFnResult, StopFunction, StopMachine};
use crate::CpuSet;
use crate::cpuset::AtomicCpuSet;
use crate::sync::{AtomicU32, AtomicU64, AtomicUsize, Ordering, atomic_array, const_unless_loom};

/// Evidence, recorded by the core, that every CPU was quiescent before the function ran.
///
/// Read it from inside the stop function (the `Run` phase) and compare it with
/// [`StopMachine::stamp`] taken right before the first side effect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quiescence {
    /// CPUs that reported every asynchronous exception masked when they acknowledged
    /// the `Arrive` phase.
    pub masked: CpuSet,
    /// Isolated CPUs counted quiescent because they were in user mode when the call
    /// began: their synchronisation was deferred to their next kernel entry by one CAS on
    /// their context state word, and that entry waits for the call's window to close
    /// (`context.rs`). They did not take the stop IPI and are not in `masked`.
    pub deferred: CpuSet,
    /// The latest stamp taken by any CPU as it acknowledged the `Arrive` phase.
    pub last_ack_stamp: u64,
}

/// Where the initiator's time went in its last call that reached `Run`: the profile of
/// the rendezvous, in nanoseconds of [`Arch::now_ns`]. `tests=bench` prints it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CallProfile {
    /// From entry to the stop IPI sent: checking the CPUs, taking the machine,
    /// publishing the call.
    pub setup_ns: u64,
    /// From the stop IPI sent to the last other CPU's arrival (masked and acknowledged):
    /// the gather, at best one interrupt round trip.
    pub arrive_ns: u64,
    /// From the last arrival to `Exit`: the initiator masking and acknowledging, and the
    /// function on every active CPU.
    pub run_ns: u64,
    /// From `Exit` to the initiator unmasked: its context synchronisation and restore.
    pub exit_ns: u64,
    /// The longest time any other participant spent masked in the call, from its mask
    /// to just before its restore (its stop-IPI entry and exit are not in it).
    pub masked_max_ns: u64,
    /// The participant that spent [`masked_max_ns`](Self::masked_max_ns) masked.
    pub masked_max_cpu: Option<usize>,
    /// Participants that had not left the window within the stall timeout when the
    /// profile was read: not in `masked_max_ns`.
    pub masked_unreported: CpuSet,
}

/// The stamp sequence; everything else a CPU reports lives in its own
/// [`CpuSlot`] (`state.rs`), so that arriving writes no line another CPU writes.
pub(super) struct Evidence {
    /// The sequence [`StopMachine::stamp`] draws from: one read-modify-write per
    /// arrival, the only shared line a joiner writes (it orders side effects after
    /// every CPU's quiescence, which per-CPU clocks could not prove).
    stamps: AtomicU64,
}

impl Evidence {
    const_unless_loom! {
        pub(super) const fn new() -> Self {
            Evidence {
                stamps: AtomicU64::new(0),
            }
        }
    }

    #[inline(always)]
    fn next_stamp(&self) -> u64 {
        self.stamps.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// The CPU of `slot` has just masked (at `now_ns`): it is in the window of call
    /// `generation`, and reports whether it is fully masked and its stamp. Released by
    /// its `Arrive` acknowledgement (the initiator's: by its release of `Run`).
    #[inline(always)]
    pub(super) fn arrived(&self, slot: &CpuSlot, generation: u32, all_masked: bool, now_ns: u64) {
        slot.masked_since.store(now_ns, Ordering::Relaxed);
        // Release: an NMI on this CPU that sees the window (Acquire in `window_of`) sees
        // what came before it (a compiler barrier, too: same CPU).
        slot.window
            .store(u64::from(generation) << 1 | 1, Ordering::Release);
        slot.masked_at_ack.store(all_masked, Ordering::Relaxed);
        slot.ack_stamp.store(self.next_stamp(), Ordering::Relaxed);
    }

    /// The generation of the call whose window the CPU of `slot` is in, if it is in one
    /// (its own NMI handler asks).
    #[cfg(feature = "stop-machine-nmi")]
    #[inline(always)]
    pub(super) fn window_of(&self, slot: &CpuSlot) -> Option<u32> {
        // Acquire pairs with the Release in `arrived` (this CPU's own stores).
        let window = slot.window.load(Ordering::Acquire);
        (window & 1 != 0).then_some((window >> 1) as u32)
    }

    /// Runs `function` on `me`, recorded as running meanwhile.
    #[inline(always)]
    pub(super) fn run_marked(
        &self,
        slot: &CpuSlot,
        me: usize,
        function: &dyn StopFunction,
    ) -> StopFnResult {
        slot.running.store(true, Ordering::Relaxed);
        let result = function.call(me);
        // Release: an NMI handler elsewhere that no longer sees the flag sees what the
        // function wrote (evidence only; the hold in `finish_in_nmi` decides by `done`).
        slot.running.store(false, Ordering::Release);
        result
    }

    /// The CPU of `slot` stops measuring its masked time at `now_ns`, about to leave.
    #[inline(always)]
    pub(super) fn unmasking(&self, slot: &CpuSlot, now_ns: u64) {
        let since = slot.masked_since.load(Ordering::Relaxed);
        slot.masked_ns
            .store(now_ns.saturating_sub(since), Ordering::Relaxed);
    }

    /// The CPU of `slot` has finished its part of the call (about to restore its mask,
    /// or done so in an NMI handler that held the CPU until the function had run
    /// everywhere). A plain store: nothing between the context synchronisation and the
    /// restore may branch (tests/kernel_image.rs checks the x86 image).
    #[inline(always)]
    pub(super) fn leaving(&self, slot: &CpuSlot) {
        slot.window.store(0, Ordering::Relaxed);
    }
}

/// The instants the initiator records in a call, indexes into [`Profile`].
#[derive(Clone, Copy)]
pub(super) enum Mark {
    Entry = 0,
    IpiSent = 1,
    Arrived = 2,
    Exit = 3,
    Unmasked = 4,
}

/// The initiator's [`Mark`]s in its last call, and who took part in its last call that
/// reached `Run`. Only the initiator writes it, under the machine's lock.
pub(super) struct Profile {
    timeline: [AtomicU64; 5],
    generation: AtomicU32,
    initiator: AtomicUsize,
    participants: AtomicCpuSet,
}

impl Profile {
    const_unless_loom! {
        pub(super) const fn new() -> Self {
            Profile {
                timeline: atomic_array![AtomicU64::new(0); 5],
                generation: AtomicU32::new(0),
                initiator: AtomicUsize::new(0),
                participants: AtomicCpuSet::new(),
            }
        }
    }

    /// Call `generation`, initiated by `initiator`, is opening `Run`.
    #[inline(always)]
    pub(super) fn reached_run(&self, generation: u32, initiator: usize, participants: CpuSet) {
        self.generation.store(generation, Ordering::Relaxed);
        self.initiator.store(initiator, Ordering::Relaxed);
        self.participants.store(participants, Ordering::Relaxed);
    }

    #[inline(always)]
    pub(super) fn record(&self, mark: Mark, now_ns: u64) {
        self.timeline[mark as usize].store(now_ns, Ordering::Relaxed);
    }

    fn span(&self, from: Mark, to: Mark) -> u64 {
        let at = |mark: Mark| self.timeline[mark as usize].load(Ordering::Relaxed);
        at(to).saturating_sub(at(from))
    }
}

impl<A: Arch> StopMachine<A> {
    /// A fresh stamp from the same sequence the `Arrive` acknowledgements draw from.
    ///
    /// Taken right before a side effect inside the stop function, it proves the effect
    /// came after every CPU's quiescence: compare with [`Quiescence::last_ack_stamp`].
    #[unsafe(link_section = ".text.nopatch")]
    pub fn stamp(&self) -> u64 {
        self.evidence.next_stamp()
    }

    /// What the CPUs reported as they acknowledged the `Arrive` phase of the current call.
    ///
    /// Meaningful from inside the stop function.
    #[unsafe(link_section = ".text.nopatch")]
    pub fn quiescence(&self) -> Quiescence {
        let mut quiescence = Quiescence {
            masked: CpuSet::EMPTY,
            deferred: self.published.deferred(),
            last_ack_stamp: 0,
        };
        for cpu in self.published.participants() {
            let slot = self.slots.get(cpu);
            if slot.masked_at_ack.load(Ordering::Relaxed) {
                quiescence.masked = quiescence.masked.with(cpu);
            }
            let stamp = slot.ack_stamp.load(Ordering::Relaxed);
            quiescence.last_ack_stamp = quiescence.last_ack_stamp.max(stamp);
        }
        quiescence
    }

    /// The CPUs the latest call deferred instead of interrupting ([`Quiescence::deferred`]
    /// of that call). Meaningful after the call, before anyone makes another.
    pub fn last_deferred(&self) -> CpuSet {
        self.published.deferred()
    }

    /// The CPUs that are inside a call's masked window right now: they have masked their
    /// exceptions for it and have not yet finished their part of it. That part ends where
    /// a CPU restores its mask, or, in a call that holds NMIs
    /// ([`stop_machine_nmi_free`](Self::stop_machine_nmi_free) where NMIs pass
    /// [`Arch::mask_all`]), where the stop machine's NMI slot on that CPU has waited for
    /// the function to finish on every active CPU and context-synchronised, before any
    /// other NMI handler runs.
    ///
    /// An interrupt handler that finds its own CPU here ran inside the window, which
    /// [`Arch::mask_all`] promises cannot happen: the self-tests use this as a witness.
    #[unsafe(link_section = ".text.nopatch")]
    pub fn in_masked_window(&self) -> CpuSet {
        self.cpus_where(|slot| slot.window.load(Ordering::Relaxed) & 1 != 0)
    }

    /// The CPUs running a stop function right now (directly, or in the NMI handler of
    /// [`stop_machine_nmi`](Self::stop_machine_nmi)). A witness for the self-tests: an
    /// NMI handler that starts while this is not empty ran while text may be changing.
    #[unsafe(link_section = ".text.nopatch")]
    pub fn running_function(&self) -> CpuSet {
        self.cpus_where(|slot| slot.running.load(Ordering::Acquire))
    }

    /// The online CPUs whose slot satisfies `test`: a witness reads every line (O(N)).
    #[inline(always)]
    fn cpus_where(&self, test: impl Fn(&CpuSlot) -> bool) -> CpuSet {
        let mut cpus = CpuSet::EMPTY;
        for cpu in self.arch.online_cpus() {
            if test(self.slots.get(cpu)) {
                cpus = cpus.with(cpu);
            }
        }
        cpus
    }

    /// Records instant `mark` of the current call (the initiator only).
    #[unsafe(link_section = ".text.nopatch")]
    pub(super) fn mark(&self, mark: Mark) {
        self.profile.record(mark, self.arch.now_ns());
    }

    /// The profile of this CPU's last call that reached `Run`. Meaningful on the CPU
    /// that made the call, after it returned, and before anyone makes another.
    ///
    /// The other participants may still be leaving when the call returns: this waits
    /// for each one's `Left` acknowledgement, bounded by the call's stall timeout (past
    /// it a CPU is stuck masked, and is named in
    /// [`masked_unreported`](CallProfile::masked_unreported) instead). O(N).
    pub fn last_call_profile(&self) -> CallProfile {
        let profile = &self.profile;
        let mut result = CallProfile {
            setup_ns: profile.span(Mark::Entry, Mark::IpiSent),
            arrive_ns: profile.span(Mark::IpiSent, Mark::Arrived),
            run_ns: profile.span(Mark::Arrived, Mark::Exit),
            exit_ns: profile.span(Mark::Exit, Mark::Unmasked),
            ..CallProfile::default()
        };
        let generation = profile.generation.load(Ordering::Relaxed);
        let initiator = profile.initiator.load(Ordering::Relaxed);
        let others = profile
            .participants
            .load(Ordering::Relaxed)
            .without(initiator);
        let limit_ns = self.published.stall_timeout_ns();
        let start = self.arch.now_ns();
        for cpu in others {
            let slot = self.slots.get(cpu);
            // Acquire pairs with the CPU's release of `Left`: its masked time is stored.
            while !slot
                .ack(Ordering::Acquire)
                .reached(generation, Progress::Left)
            {
                if self.arch.now_ns().saturating_sub(start) > limit_ns {
                    break;
                }
                self.arch.relax();
            }
            if !slot
                .ack(Ordering::Acquire)
                .reached(generation, Progress::Left)
            {
                result.masked_unreported = result.masked_unreported.with(cpu);
                continue;
            }
            let masked_ns = slot.masked_ns.load(Ordering::Relaxed);
            if result.masked_max_cpu.is_none() || masked_ns > result.masked_max_ns {
                result.masked_max_ns = masked_ns;
                result.masked_max_cpu = Some(cpu);
            }
        }
        result
    }
}
