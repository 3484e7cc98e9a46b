//! The shared state of a call, laid out so that it scales: one control word that only
//! the initiator writes, and one cache line per CPU that only that CPU writes.
//!
//! - [`Control`]: `generation | phase`. The initiator opens every phase with a store
//!   (release) and every other CPU only reads it: no compare-and-swap, no lost update,
//!   one line that the readers share until the next phase.
//! - [`CpuSlot`]: a CPU's acknowledgement (`generation | progress`), its function's
//!   result and its evidence, on a line of its own ([`CpuSlot`] is 64-byte aligned).
//!   A joiner acknowledges with one store to its own line: constant work, whatever the
//!   number of CPUs, and no line that two joiners write.
//!
//! The initiator gathers by reading each participant's line until it is acknowledged,
//! with a cursor that only moves forward: O(N) for the whole gather. Nothing
//! counts arrivals in a shared word, so nothing a stale CPU does can be miscounted:
//! an acknowledgement names its generation, and the initiator accepts only its own.

use crate::MAX_CPUS;
use crate::sync::{AtomicBool, AtomicI32, AtomicU64, Ordering, atomic_array, const_unless_loom};

/// The phases of one call, in order. `Exit` and `Aborted` are terminal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(super) enum Phase {
    Idle = 0,
    Arrive = 1,
    Run = 2,
    Exit = 3,
    Aborted = 4,
}

impl Phase {
    #[inline(always)]
    fn from_bits(bits: u8) -> Phase {
        match bits {
            1 => Phase::Arrive,
            2 => Phase::Run,
            3 => Phase::Exit,
            4 => Phase::Aborted,
            _ => Phase::Idle,
        }
    }
}

/// One value of the control word: `generation (32 bits) | phase (8 bits)`.
///
/// The generation makes a late CPU, still holding a stop IPI from an aborted call,
/// harmless: its acknowledgement names a generation the initiator no longer gathers,
/// and the control word it waits on has moved on.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) struct State(u64);

impl State {
    #[inline(always)]
    pub(super) fn new(generation: u32, phase: Phase) -> State {
        State((u64::from(generation) << 8) | u64::from(phase as u8))
    }

    #[inline(always)]
    pub(super) fn generation(self) -> u32 {
        (self.0 >> 8) as u32
    }

    #[inline(always)]
    pub(super) fn phase(self) -> Phase {
        Phase::from_bits(self.0 as u8)
    }

    /// Whether this is `phase` of call `generation`.
    #[inline(always)]
    pub(super) fn is(self, generation: u32, phase: Phase) -> bool {
        self.0 == State::new(generation, phase).0
    }
}

/// The control word, on a cache line of its own: the initiator stores, everyone else
/// loads. Its accessors take the ordering from the caller, whose comment says what it
/// pairs with.
#[repr(C, align(64))]
pub(super) struct Control(AtomicU64);

impl Control {
    const_unless_loom! {
        pub(super) const fn new() -> Self {
            Control(AtomicU64::new(0))
        }
    }

    #[inline(always)]
    pub(super) fn load(&self, order: Ordering) -> State {
        State(self.0.load(order))
    }

    #[inline(always)]
    pub(super) fn store(&self, state: State, order: Ordering) {
        self.0.store(state.0, order);
    }
}

/// How far a CPU has got in a call, as its acknowledgement says. Ordered: a later value
/// implies every earlier one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub(super) enum Progress {
    /// Masked and acknowledged `Arrive`.
    Arrived = 1,
    /// An active CPU whose function has returned, its result stored.
    Ran = 2,
    /// About to unmask: its masked time is stored (see [`CpuSlot::masked_ns`]).
    Left = 3,
}

/// A CPU's acknowledgement: `generation (32 bits) | progress (8 bits)`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) struct Ack(u64);

impl Ack {
    #[inline(always)]
    pub(super) fn new(generation: u32, progress: Progress) -> Ack {
        Ack((u64::from(generation) << 8) | u64::from(progress as u8))
    }

    /// Whether this acknowledges at least `progress` in call `generation`.
    #[inline(always)]
    pub(super) fn reached(self, generation: u32, progress: Progress) -> bool {
        let generation_matches = (self.0 >> 8) as u32 == generation
            || crate::sync::weaken::on(crate::sync::weaken::Knob::AckIgnoresGeneration);
        generation_matches && self.0 as u8 >= progress as u8
    }
}

/// Everything one CPU writes during a call, on a cache line of its own. Only that CPU
/// writes it (its NMI handler included); the initiator and the witnesses read it.
#[repr(C, align(64))]
pub(super) struct CpuSlot {
    /// The CPU's latest [`Ack`]: the release that publishes the fields below.
    ack: AtomicU64,
    /// What its function returned (`0`: success), released by its `Ran` ack.
    pub(super) code: AtomicI32,
    /// The CPU reported every asynchronous exception masked on arrival.
    pub(super) masked_at_ack: AtomicBool,
    /// Its stop function is running right now.
    pub(super) running: AtomicBool,
    /// `generation << 1 | 1` while inside that call's masked window, else 0.
    pub(super) window: AtomicU64,
    /// Its stamp as it arrived ([`StopMachine::stamp`](super::StopMachine::stamp)).
    pub(super) ack_stamp: AtomicU64,
    /// When it masked ([`Arch::now_ns`](super::Arch::now_ns)).
    pub(super) masked_since: AtomicU64,
    /// How long it stayed masked in its latest call, released by its `Left` ack.
    pub(super) masked_ns: AtomicU64,
}

#[cfg(not(loom))]
const _: () = assert!(core::mem::size_of::<CpuSlot>() == 64);

impl CpuSlot {
    const_unless_loom! {
        const fn new() -> Self {
            CpuSlot {
                ack: AtomicU64::new(0),
                code: AtomicI32::new(0),
                masked_at_ack: AtomicBool::new(false),
                running: AtomicBool::new(false),
                window: AtomicU64::new(0),
                ack_stamp: AtomicU64::new(0),
                masked_since: AtomicU64::new(0),
                masked_ns: AtomicU64::new(0),
            }
        }
    }

    #[inline(always)]
    pub(super) fn ack(&self, order: Ordering) -> Ack {
        Ack(self.ack.load(order))
    }

    #[inline(always)]
    pub(super) fn acknowledge(&self, ack: Ack, order: Ordering) {
        self.ack.store(ack.0, order);
    }
}

/// One [`CpuSlot`] per CPU.
pub(super) struct CpuSlots([CpuSlot; MAX_CPUS]);

impl CpuSlots {
    const_unless_loom! {
        pub(super) const fn new() -> Self {
            CpuSlots(atomic_array![CpuSlot::new(); MAX_CPUS])
        }
    }

    /// The slot of `cpu`, which is `< MAX_CPUS` ([`Arch::cpu_id`](super::Arch::cpu_id)'s
    /// contract). Out of range, the last slot, rather than a bounds-check panic, which
    /// would be a branch out of `.text.nopatch`.
    #[inline(always)]
    pub(super) fn get(&self, cpu: usize) -> &CpuSlot {
        &self.0[cpu.min(MAX_CPUS - 1)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_and_ack_round_trip() {
        let state = State::new(0xabcd_ef01, Phase::Run);
        assert_eq!(state.generation(), 0xabcd_ef01);
        assert_eq!(state.phase(), Phase::Run);
        assert!(state.is(0xabcd_ef01, Phase::Run));
        assert!(!state.is(0xabcd_ef00, Phase::Run) && !state.is(0xabcd_ef01, Phase::Exit));
        let ack = Ack::new(7, Progress::Ran);
        assert!(ack.reached(7, Progress::Arrived) && ack.reached(7, Progress::Ran));
        assert!(!ack.reached(7, Progress::Left));
        assert!(
            !ack.reached(8, Progress::Arrived),
            "a stale generation counts"
        );
    }

    #[test]
    fn a_slot_is_one_cache_line() {
        let slots = CpuSlots::new();
        let (a, b) = (
            slots.get(0) as *const _ as usize,
            slots.get(1) as *const _ as usize,
        );
        assert_eq!(b - a, 64);
        assert_eq!(a % 64, 0);
        assert!(core::ptr::eq(slots.get(MAX_CPUS), slots.get(MAX_CPUS - 1)));
    }
}
