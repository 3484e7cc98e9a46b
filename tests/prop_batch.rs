//! Property tests of batch validation (`src/patch/mod.rs` `validate`,
//! `src/patch/plan.rs` `prepare`) and of the two patch calls that rely on it, for both
//! instruction kinds (A64 words, x86 byte strings of 1 to 8 bytes).
//!
//! Texts are placed anywhere, the top of the address space included (a text may end
//! at `usize::MAX`), may end in a partial instruction, and have protected ranges;
//! entries are anywhere (in text, off the grid, just outside, near 0 and
//! `usize::MAX`, inside protected code), overlap, hold the right or a wrong old
//! instruction, and batches run from empty to past `plan::MAX_SITES`. Properties:
//! - `validate` never panics and returns exactly the error an independent oracle
//!   names (the first bad entry in batch order and its reason), over exact integer
//!   arithmetic; a text access outside text panics the test text and fails the case;
//! - `prepare` returns exactly `validate`'s verdict, and plans every valid batch that
//!   fits (`MAX_SITES`, a text of 8 bytes or more);
//! - `patch_machine` and `patch_nosync` are all-or-nothing: on any error the text is
//!   bit-identical, on success it holds every entry's new instruction and nothing
//!   else changed; `patch_nosync` also refuses the first pair that is not CMODX-safe.

// `PatchError` carries two instructions; the crate allows the same (src/lib.rs).
#![allow(clippy::result_large_err)]

use patch_machine::arch::host::HostArch;
use patch_machine::patch::insn::{self, Insn as A64};
use patch_machine::patch::plan::{MAX_SITES, PlanSpace, prepare};
use patch_machine::patch::x86::{self, Insn as X86};
use patch_machine::patch::{
    Instruction, Patch, PatchError, Text, patch_machine, patch_nosync, validate,
};
use patch_machine::stop::{StopMachine, StopOptions};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use std::marker::PhantomData;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

fn config() -> Config {
    Config {
        failure_persistence: None,
        ..Config::default()
    }
}

/// `PROPTEST_CASES / div` cases (at least 1), `default` when it is not set: for a
/// property whose cases are a few thousand entries each.
fn fewer_cases(div: u32, default: u32) -> Config {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse::<u32>().ok())
        .map_or(default, |c| (c / div).max(1));
    Config { cases, ..config() }
}

/// The instruction kinds: how to build one from text bytes.
trait Kind: Instruction {
    fn from_text(bytes: &[u8]) -> Self;
}

impl Kind for A64 {
    fn from_text(bytes: &[u8]) -> Self {
        u32::from_le_bytes(bytes.try_into().expect("4 bytes"))
    }
}

impl Kind for X86 {
    fn from_text(bytes: &[u8]) -> Self {
        X86::from_bytes(bytes).expect("1 to 8 bytes")
    }
}

fn bytes_of<I: Instruction>(insn: I) -> Vec<u8> {
    insn.to_le_word().to_le_bytes()[..insn.size()].to_vec()
}

/// Text at `base` made of `bytes`. Any access outside `base..base + len` panics, naming
/// it: validation let a bad entry through.
struct TestText<I> {
    base: usize,
    bytes: Vec<AtomicU8>,
    protected: Vec<Range<usize>>,
    writer: spin::Mutex<()>,
    kind: PhantomData<I>,
}

impl<I: Kind> TestText<I> {
    fn new(layout: &Layout) -> Self {
        TestText {
            base: layout.base,
            bytes: layout.bytes.iter().map(|&b| AtomicU8::new(b)).collect(),
            protected: layout.protected.clone(),
            writer: spin::Mutex::new(()),
            kind: PhantomData,
        }
    }

    fn offset(&self, addr: usize, len: usize) -> usize {
        addr.checked_sub(self.base)
            .filter(|off| {
                off.checked_add(len)
                    .is_some_and(|end| end <= self.bytes.len())
            })
            .unwrap_or_else(|| {
                panic!(
                    "text access at {addr:#x} ({len} bytes) outside text {:#x}+{:#x}",
                    self.base,
                    self.bytes.len()
                )
            })
    }

    fn snapshot(&self) -> Vec<u8> {
        self.bytes
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect()
    }
}

// SAFETY: bytes in memory that nothing executes; every access is checked against the
// text's range.
unsafe impl<I: Kind> Text for TestText<I> {
    type Insn = I;

    fn text_range(&self) -> Range<usize> {
        self.base..self.base + self.bytes.len()
    }

    fn protected_ranges(&self) -> &[Range<usize>] {
        &self.protected
    }

    fn read_insn(&self, addr: usize, len: usize) -> I {
        let off = self.offset(addr, len);
        let bytes: Vec<u8> = self.bytes[off..off + len]
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        I::from_text(&bytes)
    }

    unsafe fn write_insn(&self, addr: usize, insn: I) {
        let off = self.offset(addr, insn.size());
        for (slot, byte) in self.bytes[off..].iter().zip(bytes_of(insn)) {
            slot.store(byte, Ordering::Relaxed);
        }
    }

    fn sync_icache(&self, _range: Range<usize>) {}

    fn writer_lock(&self) -> &spin::Mutex<()> {
        &self.writer
    }
}

/// Where a text lies and what it holds.
#[derive(Clone, Debug)]
struct Layout {
    base: usize,
    bytes: Vec<u8>,
    protected: Vec<Range<usize>>,
}

impl Layout {
    /// The bytes at `addr..addr + len` if all of them are text, over exact integers.
    fn read(&self, addr: usize, len: usize) -> Option<&[u8]> {
        let start = (addr as u128).checked_sub(self.base as u128)? as usize;
        self.bytes.get(start..start.checked_add(len)?)
    }
}

/// The first problem of `batch`, in batch order, as `validate` documents it: empty;
/// then per entry misaligned, lengths differ, outside text, inside protected code,
/// overlapping an earlier entry, old instruction not there. Exact arithmetic, written
/// apart from `validate`.
fn oracle<I: Kind>(layout: &Layout, batch: &[Patch<I>]) -> Result<(), PatchError<I>> {
    if batch.is_empty() {
        return Err(PatchError::EmptyBatch);
    }
    let text = (layout.base, layout.base + layout.bytes.len());
    let span = |p: &Patch<I>| (p.addr as u128, p.addr as u128 + p.old.size() as u128);
    for (index, p) in batch.iter().enumerate() {
        let addr = p.addr;
        let (start, end) = span(p);
        if !addr.is_multiple_of(I::ALIGN) {
            return Err(PatchError::Misaligned { index, addr });
        }
        if p.new.size() != p.old.size() {
            return Err(PatchError::LengthMismatch {
                index,
                addr,
                old_len: p.old.size(),
                new_len: p.new.size(),
            });
        }
        if start < text.0 as u128 || end > text.1 as u128 {
            return Err(PatchError::OutsideText { index, addr, text });
        }
        if let Some(r) = layout
            .protected
            .iter()
            .find(|r| (r.start as u128) < end && start < r.end as u128)
        {
            return Err(PatchError::Protected {
                index,
                addr,
                range: (r.start, r.end),
            });
        }
        if let Some(first) = batch[..index].iter().position(|q| {
            let (q_start, q_end) = span(q);
            q_start < end && start < q_end
        }) {
            return Err(PatchError::Duplicate { index, first, addr });
        }
        let found = I::from_text(layout.read(addr, p.old.size()).expect("checked in text"));
        if found != p.old {
            return Err(PatchError::OldMismatch {
                index,
                addr,
                expected: p.old,
                found,
            });
        }
    }
    Ok(())
}

/// The text after a valid batch.
fn applied<I: Kind>(layout: &Layout, batch: &[Patch<I>]) -> Vec<u8> {
    let mut bytes = layout.bytes.clone();
    for p in batch {
        let off = p.addr - layout.base;
        bytes[off..off + p.new.size()].copy_from_slice(&bytes_of(p.new));
    }
    bytes
}

/// Runs every check of the module doc on one text and batch.
fn check<I: Kind>(layout: &Layout, batch: &[Patch<I>]) -> Result<(), TestCaseError> {
    let text = TestText::<I>::new(layout);
    let expected = oracle(layout, batch);
    prop_assert_eq!(validate(&text, batch), expected);

    let mut space = Box::new(PlanSpace::new());
    match prepare(&text, batch, &mut space) {
        Err(err) => prop_assert_eq!(Err(err), expected),
        Ok(plan) => {
            prop_assert_eq!(Ok(()), expected);
            let plannable = batch.len() <= MAX_SITES && layout.bytes.len() >= 8;
            prop_assert_eq!(plan.is_some(), plannable);
            if let Some(plan) = plan {
                let mut covered = 0;
                for run in plan.runs() {
                    prop_assert_eq!(
                        run.old,
                        layout.read(run.addr, run.old.len()).expect("in text")
                    );
                    covered += run.entries().count();
                }
                prop_assert_eq!(covered, batch.len());
            }
        }
    }
    drop(space);
    prop_assert_eq!(text.snapshot(), layout.bytes.clone(), "validation wrote");

    // One CPU: this thread. Validation happens before anything stops.
    let stop = Arc::new(StopMachine::new(HostArch::new(1)));
    HostArch::connect(&stop);
    stop.arch().bind_current_thread(0);
    let result = patch_machine(&stop, &text, batch, StopOptions::DEFAULT);
    match &result {
        Ok(report) => {
            prop_assert_eq!(Ok(()), expected);
            prop_assert_eq!(report.sites, batch.len());
            prop_assert_eq!(text.snapshot(), applied(layout, batch));
        }
        Err(err) => {
            prop_assert_eq!(Err(*err), expected);
            prop_assert_eq!(
                text.snapshot(),
                layout.bytes.clone(),
                "a refused batch wrote"
            );
        }
    }

    let text = TestText::<I>::new(layout);
    let nosync_expected = expected.and_then(|()| {
        match batch
            .iter()
            .position(|p| !I::cmodx_pair_allowed(p.old, p.new))
        {
            Some(index) => Err(PatchError::NotCmodxSafe {
                index,
                addr: batch[index].addr,
                old: batch[index].old,
                new: batch[index].new,
            }),
            None => Ok(()),
        }
    });
    let result = patch_nosync(stop.arch(), &text, batch);
    prop_assert_eq!(result, nosync_expected);
    let after = if result.is_ok() {
        applied(layout, batch)
    } else {
        layout.bytes.clone()
    };
    prop_assert_eq!(text.snapshot(), after);
    Ok(())
}

/// Words a text holds: anything, or the CMODX-safe ones (so that `patch_nosync` and
/// B <-> NOP batches succeed too).
fn a64_text_word() -> impl Strategy<Value = u32> {
    prop_oneof![
        any::<u32>(),
        Just(insn::NOP),
        Just(insn::ISB),
        any::<u16>().prop_map(insn::brk),
        (0usize..1 << 20).prop_map(|w| insn::b(0, 4 * w).unwrap()),
    ]
}

/// Where a text lies: an ordinary kernel address, 0, ending at `usize::MAX` exactly,
/// just below the top, or anywhere it fits.
fn base_for(len: usize) -> impl Strategy<Value = usize> {
    prop_oneof![
        Just(0x4020_0000usize),
        Just(0usize),
        Just(usize::MAX - len),
        Just((usize::MAX - len - 4096) & !7),
        (0..=usize::MAX - len).prop_map(|b| b & !3),
    ]
}

/// Protected ranges: around some part of the text, sometimes empty, inverted or
/// anywhere.
fn protected_for(base: usize, len: usize) -> impl Strategy<Value = Vec<Range<usize>>> {
    let inside = (0..=len, 0..=len).prop_map(move |(a, b)| base + a.min(b)..base + a.max(b));
    let any_range = (any::<usize>(), any::<usize>()).prop_map(|(a, b)| a..b);
    prop::collection::vec(prop_oneof![4 => inside, 1 => any_range], 0..3)
}

/// Addresses an entry may name for a text at `base` of `len` bytes.
fn entry_addr(base: usize, len: usize, align: usize) -> impl Strategy<Value = usize> {
    let slots = len / align + 3;
    prop_oneof![
        // On the grid, in text or just past it.
        6 => (0..slots).prop_map(move |i| base.wrapping_add(i * align)),
        // Off the grid, or not a multiple of an instruction.
        1 => (0..len + 8).prop_map(move |off| base.wrapping_add(off)),
        // Just below the text, around 0 and the top of the address space.
        1 => (1usize..16).prop_map(move |d| base.wrapping_sub(d)),
        1 => prop_oneof![0usize..16, (0usize..16).prop_map(|d| usize::MAX - d)],
        1 => any::<usize>(),
    ]
}

fn a64_layout(max_words: usize) -> impl Strategy<Value = Layout> {
    // The length is words plus a tail of 0 to 3 bytes: a text may end in a part of an
    // instruction (and only a length of 4n + 3 lets an aligned text end at usize::MAX).
    (0..=max_words, 0usize..4)
        .prop_flat_map(|(words, tail)| {
            let len = 4 * words + tail;
            (
                prop::collection::vec(a64_text_word(), words),
                prop::collection::vec(any::<u8>(), tail),
                base_for(len),
            )
        })
        .prop_flat_map(|(words, tail, base)| {
            let bytes: Vec<u8> = words
                .iter()
                .flat_map(|w| w.to_le_bytes())
                .chain(tail)
                .collect();
            let len = bytes.len();
            (Just(base), Just(bytes), protected_for(base, len))
        })
        .prop_map(|(base, bytes, protected)| Layout {
            base,
            bytes,
            protected,
        })
}

/// An A64 entry: the old word read from the text (when the address is in it) or any;
/// the new word any or CMODX-safe.
fn a64_batch(layout: &Layout, max: usize) -> impl Strategy<Value = Vec<Patch<A64>>> + use<> {
    let (base, len) = (layout.base, layout.bytes.len());
    let read = layout.clone();
    let entry = (
        entry_addr(base, len, 4),
        any::<bool>(),
        any::<u32>(),
        a64_text_word(),
    )
        .prop_map(move |(addr, take_old, any_old, new)| {
            let old = match read.read(addr, 4) {
                Some(bytes) if take_old => u32::from_le_bytes(bytes.try_into().unwrap()),
                _ => any_old,
            };
            Patch::new(addr, old, new)
        });
    prop::collection::vec(entry, 0..=max)
}

fn x86_layout(max_len: usize) -> impl Strategy<Value = Layout> {
    (0..=max_len)
        .prop_flat_map(|len| {
            // NOPs most of the time, so that old bytes taken at an address decode.
            let byte = prop_oneof![3 => Just(0x90u8), 1 => any::<u8>()];
            (prop::collection::vec(byte, len), base_for(len))
        })
        .prop_flat_map(|(bytes, base)| {
            let len = bytes.len();
            (Just(base), Just(bytes), protected_for(base, len))
        })
        .prop_map(|(base, bytes, protected)| Layout {
            base,
            bytes,
            protected,
        })
}

/// An x86 entry of 1 to 8 bytes: old bytes from the text or any, new bytes of the same
/// length (sometimes another).
fn x86_batch(layout: &Layout, max: usize) -> impl Strategy<Value = Vec<Patch<X86>>> + use<> {
    let (base, len) = (layout.base, layout.bytes.len());
    let read = layout.clone();
    let entry = (
        entry_addr(base, len, 1),
        1usize..=x86::MAX_LEN,
        any::<bool>(),
        prop::collection::vec(any::<u8>(), x86::MAX_LEN),
        prop::collection::vec(any::<u8>(), x86::MAX_LEN),
        prop_oneof![6 => Just(0usize), 1 => 1usize..x86::MAX_LEN],
    )
        .prop_map(move |(addr, size, take_old, any_old, any_new, other)| {
            let old = match read.read(addr, size) {
                Some(bytes) if take_old => bytes.to_vec(),
                _ => any_old[..size].to_vec(),
            };
            let new_len = (size + other - 1) % x86::MAX_LEN + 1;
            Patch::new(
                addr,
                X86::from_bytes(&old).unwrap(),
                X86::from_bytes(&any_new[..new_len]).unwrap(),
            )
        });
    prop::collection::vec(entry, 0..=max)
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn a64_batches_are_validated_exactly_and_applied_whole(
        (layout, batch) in a64_layout(24).prop_flat_map(|l| (Just(l.clone()), a64_batch(&l, 8)))
    ) {
        check(&layout, &batch)?;
    }

    #[test]
    fn x86_batches_are_validated_exactly_and_applied_whole(
        (layout, batch) in x86_layout(96).prop_flat_map(|l| (Just(l.clone()), x86_batch(&l, 10)))
    ) {
        check(&layout, &batch)?;
    }
}

/// A batch around `MAX_SITES` entries over a text of as many words, every site once,
/// in ascending, descending or a shuffled order, with at most one bad entry anywhere.
fn large_batch() -> impl Strategy<Value = (Layout, Vec<Patch<A64>>)> {
    let words = MAX_SITES + 4;
    (
        MAX_SITES - 2..=MAX_SITES + 2,
        0usize..3,
        any::<u64>(),
        prop::option::of((any::<prop::sample::Index>(), 0usize..4)),
    )
        .prop_map(move |(n, order, seed, bad)| {
            let base = 0x4020_0000usize;
            let bytes: Vec<u8> = (0..words as u32)
                .flat_map(|w| (0xd280_0000 | (w << 5)).to_le_bytes())
                .collect();
            let layout = Layout {
                base,
                bytes,
                // The last two words: the bad entry of kind 3 lands in them.
                protected: std::iter::once(base + 4 * words - 8..base + 4 * words).collect(),
            };
            let mut batch: Vec<Patch<A64>> = (0..n)
                .map(|i| {
                    let old = 0xd280_0000 | ((i as u32) << 5);
                    Patch::new(base + 4 * i, old, insn::NOP)
                })
                .collect();
            match order {
                0 => {}
                1 => batch.reverse(),
                _ => {
                    // A permutation from the seed: a stride coprime with the length.
                    let gcd = |mut a: usize, mut b: usize| {
                        while b != 0 {
                            (a, b) = (b, a % b);
                        }
                        a
                    };
                    let stride = (seed as usize % n..)
                        .find(|&s| gcd(s, n) == 1)
                        .expect("n + 1 is coprime with n");
                    batch = (0..n).map(|i| batch[(i * stride + 1) % n]).collect();
                }
            }
            if let Some((at, kind)) = bad {
                let at = at.index(batch.len());
                let entry = &mut batch[at];
                match kind {
                    0 => entry.addr += 2,
                    1 => entry.old = !entry.old,
                    2 => entry.addr = usize::MAX - 3,
                    _ => entry.addr = base + 4 * (words - 1),
                }
            }
            (layout, batch)
        })
}

/// Past `MAX_SITES` a batch is validated as a whole and written entry by entry.
/// Run by hand rather than by `proptest!`, which would take `PROPTEST_CASES` as is:
/// each case is a few thousand entries.
#[test]
fn batches_past_the_plan_size_are_validated_exactly_and_applied_whole() {
    let mut runner = TestRunner::new(fewer_cases(1000, 12));
    let result = runner.run(&large_batch(), |(layout, batch)| check(&layout, &batch));
    if let Err(failure) = result {
        panic!("{failure}");
    }
}

/// Regression (found by `x86_batches_are_validated_exactly_and_applied_whole`: a text
/// of 32 bytes ending at `usize::MAX`, an entry of 7 bytes at `usize::MAX - 6`;
/// `validate` saturated `addr + len` to the text's end, let the entry through and then
/// panicked with "attempt to add with overflow" at src/patch/mod.rs:379, where a
/// release build would read and write the byte past the text): an entry running past
/// the top of the address space is outside text, for both kinds, and nothing is
/// written.
#[test]
fn an_entry_past_the_top_of_the_address_space_is_outside_text() {
    let x86_layout = Layout {
        base: usize::MAX - 32,
        bytes: vec![0x90; 32],
        protected: Vec::new(),
    };
    let old = X86::from_bytes(&[0x90; 7]).unwrap();
    let batch = [Patch::new(usize::MAX - 6, old, x86::nop(7).unwrap())];
    let expected = Err(PatchError::OutsideText {
        index: 0,
        addr: usize::MAX - 6,
        text: (usize::MAX - 32, usize::MAX),
    });
    assert_eq!(oracle(&x86_layout, &batch), expected);
    assert_eq!(
        validate(&TestText::<X86>::new(&x86_layout), &batch),
        expected
    );
    check(&x86_layout, &batch).unwrap();

    // A64: 8 words and a 3-byte tail, so that the aligned text ends at usize::MAX.
    let a64_layout = Layout {
        base: usize::MAX - 35,
        bytes: [insn::NOP.to_le_bytes(); 9].concat()[..35].to_vec(),
        protected: Vec::new(),
    };
    let batch = [Patch::new(usize::MAX - 3, insn::NOP, insn::ISB)];
    assert_eq!(
        validate(&TestText::<A64>::new(&a64_layout), &batch),
        Err(PatchError::OutsideText {
            index: 0,
            addr: usize::MAX - 3,
            text: (usize::MAX - 35, usize::MAX),
        })
    );
    check(&a64_layout, &batch).unwrap();
}
