//! The state word: the whole shared state of a call in one 64-bit atomic, so that every
//! transition (an acknowledgement, the last acknowledgement that opens the next phase,
//! the initiator's abort) is a single compare-and-swap.

use crate::CpuSet;
use core::sync::atomic::{AtomicU64, Ordering};

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

    /// The phase the last acknowledgement of `self` opens.
    #[inline(always)]
    pub(super) fn next(self) -> Phase {
        match self {
            Phase::Arrive => Phase::Run,
            Phase::Run => Phase::Exit,
            terminal => terminal,
        }
    }
}

/// One value of the state word: `generation (24 bits) | phase (8 bits) | acknowledged
/// CPUs (32 bits, CPUs `0..ACK_CPUS`)`.
///
/// The generation makes a late CPU, still holding a stop IPI from an aborted call,
/// harmless: its compare-and-swap names a generation that no longer exists.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) struct State(u64);

impl State {
    pub(super) const GENERATION_MASK: u32 = (1 << 24) - 1;
    /// The CPUs whose acknowledgements the word holds: `0..ACK_CPUS`. A call with a
    /// participant beyond is refused before anything changes.
    pub(super) const ACK_CPUS: usize = 32;

    #[inline(always)]
    pub(super) fn new(generation: u32, phase: Phase, acked: CpuSet) -> State {
        State(
            (u64::from(generation & Self::GENERATION_MASK) << 40)
                | (u64::from(phase as u8) << 32)
                | u64::from(pack(acked)),
        )
    }

    #[inline(always)]
    pub(super) fn generation(self) -> u32 {
        (self.0 >> 40) as u32
    }

    #[inline(always)]
    pub(super) fn phase(self) -> Phase {
        Phase::from_bits((self.0 >> 32) as u8)
    }

    #[inline(always)]
    pub(super) fn acked(self) -> CpuSet {
        unpack(self.0 as u32)
    }

    /// Whether this is `phase` of call `generation`.
    #[inline(always)]
    pub(super) fn is(self, generation: u32, phase: Phase) -> bool {
        self.generation() == generation && self.phase() == phase
    }
}

/// The acknowledgement bits of `acked`, all `< State::ACK_CPUS` (the caller checked).
#[inline(always)]
fn pack(acked: CpuSet) -> u32 {
    acked
        .and(CpuSet::first(State::ACK_CPUS))
        .iter()
        .fold(0, |bits, cpu| bits | 1 << cpu)
}

#[inline(always)]
fn unpack(mut bits: u32) -> CpuSet {
    let mut set = CpuSet::EMPTY;
    while bits != 0 {
        set = set.with(bits.trailing_zeros() as usize);
        bits &= bits - 1;
    }
    set
}

/// The shared state word. Its accessors take the ordering from the caller, whose comment
/// says what it pairs with.
pub(super) struct StateWord(AtomicU64);

impl StateWord {
    pub(super) const fn new() -> Self {
        StateWord(AtomicU64::new(0))
    }

    #[inline(always)]
    pub(super) fn load(&self, order: Ordering) -> State {
        State(self.0.load(order))
    }

    #[inline(always)]
    pub(super) fn store(&self, state: State, order: Ordering) {
        self.0.store(state.0, order);
    }

    #[inline(always)]
    pub(super) fn compare_exchange(
        &self,
        current: State,
        new: State,
        success: Ordering,
        failure: Ordering,
    ) -> Result<State, State> {
        (self.0.compare_exchange(current.0, new.0, success, failure))
            .map(State)
            .map_err(State)
    }

    #[inline(always)]
    pub(super) fn compare_exchange_weak(
        &self,
        current: State,
        new: State,
        success: Ordering,
        failure: Ordering,
    ) -> Result<State, State> {
        (self
            .0
            .compare_exchange_weak(current.0, new.0, success, failure))
        .map(State)
        .map_err(State)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_word_round_trips() {
        let state = State::new(0xab_cdef, Phase::Run, CpuSet::of(&[0, 31]));
        assert_eq!(state.generation(), 0xab_cdef);
        assert_eq!(state.phase(), Phase::Run);
        assert_eq!(state.acked(), CpuSet::of(&[0, 31]));
        let wrapped = State::new(State::GENERATION_MASK + 2, Phase::Exit, CpuSet::EMPTY);
        assert_eq!(wrapped.generation(), 1);
    }

    #[test]
    fn phases_advance_in_order() {
        let mut phase = Phase::Arrive;
        let mut seen = vec![phase];
        while phase != Phase::Exit {
            phase = phase.next();
            seen.push(phase);
        }
        assert_eq!(seen, [Phase::Arrive, Phase::Run, Phase::Exit]);
        assert_eq!(Phase::Exit.next(), Phase::Exit);
        assert_eq!(Phase::Aborted.next(), Phase::Aborted);
    }
}
