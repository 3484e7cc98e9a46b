//! What the core records about a call besides its outcome: the evidence that every CPU
//! was quiescent before the function ran ([`Quiescence`]), the masked-window witness,
//! and the initiator's profile of the rendezvous ([`CallProfile`]).
//!
//! All of it is measurement: nothing here decides anything, so every access is
//! `Relaxed`, made visible by the state word's release/acquire pairs of the phase it
//! belongs to.

use super::{Arch, StopFnResult, StopFunction, StopMachine};
use crate::cpuset::AtomicCpuSet;
use crate::{CpuSet, MAX_CPUS};
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// Evidence, recorded by the core, that every CPU was quiescent before the function ran.
///
/// Read it from inside the stop function (the `Run` phase) and compare it with
/// [`StopMachine::stamp`] taken right before the first side effect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quiescence {
    /// CPUs that reported every asynchronous exception masked when they acknowledged
    /// the `Arrive` phase.
    pub masked: CpuSet,
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
}

/// What each CPU reports as it arrives, and who is inside a masked window.
pub(super) struct Evidence {
    /// The sequence [`StopMachine::stamp`] draws from.
    stamps: AtomicU64,
    /// CPUs that found themselves fully masked on arrival in the current call.
    masked_at_ack: AtomicCpuSet,
    /// Each CPU's stamp as it arrived.
    ack_stamp: [AtomicU64; MAX_CPUS],
    /// CPUs inside a call's window: from their mask until they leave it (see
    /// [`StopMachine::in_masked_window`]).
    in_window: AtomicCpuSet,
    /// The generation of the call whose window each CPU last entered.
    window_generation: [AtomicU32; MAX_CPUS],
    /// CPUs running a stop function right now.
    running: AtomicCpuSet,
}

impl Evidence {
    pub(super) const fn new() -> Self {
        Evidence {
            stamps: AtomicU64::new(0),
            masked_at_ack: AtomicCpuSet::new(),
            ack_stamp: [const { AtomicU64::new(0) }; MAX_CPUS],
            in_window: AtomicCpuSet::new(),
            window_generation: [const { AtomicU32::new(0) }; MAX_CPUS],
            running: AtomicCpuSet::new(),
        }
    }

    /// Forgets the last call's mask reports (the initiator, under the machine's lock,
    /// before it opens `Arrive`).
    pub(super) fn reset(&self) {
        self.masked_at_ack.clear(Ordering::Relaxed);
    }

    #[inline(always)]
    fn next_stamp(&self) -> u64 {
        self.stamps.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// `me` has just masked: it is in the window, and reports whether it is fully masked
    /// and its stamp. Released by its `Arrive` acknowledgement.
    #[inline(always)]
    pub(super) fn arrived(&self, me: usize, generation: u32, all_masked: bool) {
        // `get`: `me < MAX_CPUS`, but a bounds-check panic would leave `.text.nopatch`.
        if let Some(window) = self.window_generation.get(me) {
            window.store(generation, Ordering::Relaxed);
        }
        // Release: an NMI on this CPU that sees the bit (Acquire in `window_of`) sees the
        // generation stored before it (a compiler barrier, too: same CPU).
        self.in_window.insert(me, Ordering::Release);
        if all_masked {
            self.masked_at_ack.insert(me, Ordering::Relaxed);
        }
        if let Some(stamp) = self.ack_stamp.get(me) {
            stamp.store(self.next_stamp(), Ordering::Relaxed);
        }
    }

    /// The generation of the call whose window `me` is in, if it is in one (its own NMI
    /// handler asks).
    #[cfg(feature = "stop-machine-nmi")]
    #[inline(always)]
    pub(super) fn window_of(&self, me: usize) -> Option<u32> {
        // Acquire pairs with the Release in `arrived` (this CPU's own stores).
        self.in_window.contains(me, Ordering::Acquire).then(|| {
            self.window_generation
                .get(me)
                .map_or(0, |g| g.load(Ordering::Relaxed))
        })
    }

    /// Runs `function` on `me`, recorded as running meanwhile.
    #[inline(always)]
    pub(super) fn run_marked(&self, me: usize, function: &dyn StopFunction) -> StopFnResult {
        self.running.insert(me, Ordering::Relaxed);
        let result = function.call(me);
        // Release: an NMI handler elsewhere that no longer sees the bit sees what the
        // function wrote (evidence only; the hold in `finish_in_nmi` decides by `done`).
        self.running.remove(me, Ordering::Release);
        result
    }

    /// `me` has finished its part of the call (about to restore its mask, or done so in
    /// an NMI handler that held the CPU until the function had run everywhere).
    #[inline(always)]
    pub(super) fn leaving(&self, me: usize) {
        self.in_window.remove(me, Ordering::Relaxed);
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

/// The initiator's [`Mark`]s in its last call. Only the initiator writes it, under the
/// machine's lock.
pub(super) struct Profile {
    timeline: [AtomicU64; 5],
}

impl Profile {
    pub(super) const fn new() -> Self {
        Profile {
            timeline: [const { AtomicU64::new(0) }; 5],
        }
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
        let evidence = &self.evidence;
        let last_ack_stamp = self
            .published
            .participants()
            .iter()
            .map(|cpu| evidence.ack_stamp[cpu].load(Ordering::Relaxed))
            .max()
            .unwrap_or(0);
        Quiescence {
            masked: evidence.masked_at_ack.load(Ordering::Relaxed),
            last_ack_stamp,
        }
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
        self.evidence.in_window.load(Ordering::Relaxed)
    }

    /// The CPUs running a stop function right now (directly, or in the NMI handler of
    /// [`stop_machine_nmi`](Self::stop_machine_nmi)). A witness for the self-tests: an
    /// NMI handler that starts while this is not empty ran while text may be changing.
    #[unsafe(link_section = ".text.nopatch")]
    pub fn running_function(&self) -> CpuSet {
        self.evidence.running.load(Ordering::Acquire)
    }

    /// Records instant `mark` of the current call (the initiator only).
    #[unsafe(link_section = ".text.nopatch")]
    pub(super) fn mark(&self, mark: Mark) {
        self.profile.record(mark, self.arch.now_ns());
    }

    /// The profile of this CPU's last call that reached `Run`. Meaningful on the CPU
    /// that made the call, after it returned, and before anyone makes another.
    pub fn last_call_profile(&self) -> CallProfile {
        let profile = &self.profile;
        CallProfile {
            setup_ns: profile.span(Mark::Entry, Mark::IpiSent),
            arrive_ns: profile.span(Mark::IpiSent, Mark::Arrived),
            run_ns: profile.span(Mark::Arrived, Mark::Exit),
            exit_ns: profile.span(Mark::Exit, Mark::Unmasked),
        }
    }
}
