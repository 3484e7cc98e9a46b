//! The write plan of a [`patch_machine`](super::patch_machine) batch, prepared before the
//! machine stops so that the window only compares and copies.
//!
//! [`prepare`] validates the batch (as [`validate`] does, with the same verdict, but in
//! linear passes over the entries sorted by address instead of one search per entry),
//! sorts it, and coalesces entries that follow each other back to back into runs whose
//! old and new bytes lie contiguous in a [`PlanSpace`]. The window then checks each run
//! against its old bytes and writes each run with one copy ([`super::Text::write_run`]),
//! not one alias mapping and one store per instruction.
//!
//! Plain arithmetic over the batch, free of any architecture: `tests/patch_host.rs`
//! checks that every site lands in exactly one run, in address order.

use super::{Instruction, Patch, PatchError, Text, validate};

/// Entries a plan holds at most; a larger batch is written entry by entry.
pub const MAX_SITES: usize = 2048;
/// Bytes of new (and of old) instructions a plan holds at most: room for
/// [`MAX_SITES`] instructions of 8 bytes, so a batch that fits by count fits.
pub const MAX_BYTES: usize = 8 * MAX_SITES;
/// Room after the last byte: each instruction is stored as one 8-byte word.
const SLACK: usize = 8;

/// Where run `k` starts: its first position in the sorted order and its first byte.
/// Run `k` ends where run `k + 1` starts (a closing slot follows the last run).
#[derive(Clone, Copy, Debug, Default)]
struct RunSlot {
    first: u16,
    bytes: u16,
}

/// Bytes, 8-byte aligned so that the arch writers can copy whole words.
#[repr(C, align(8))]
struct Bytes([u8; MAX_BYTES + SLACK]);

/// Where a plan lives: the sorted order, the runs and both byte images. About 44 KiB,
/// so the kernel keeps one in `.bss` ([`SPACE`]) rather than on a stack.
pub struct PlanSpace {
    order: [u16; MAX_SITES],
    runs: [RunSlot; MAX_SITES + 1],
    new: Bytes,
    old: Bytes,
}

impl PlanSpace {
    /// An empty space.
    pub const fn new() -> Self {
        PlanSpace {
            order: [0; MAX_SITES],
            runs: [RunSlot { first: 0, bytes: 0 }; MAX_SITES + 1],
            new: Bytes([0; MAX_BYTES + SLACK]),
            old: Bytes([0; MAX_BYTES + SLACK]),
        }
    }
}

impl Default for PlanSpace {
    fn default() -> Self {
        Self::new()
    }
}

/// The space [`patch_machine`](super::patch_machine) plans in. Taken after the text's
/// writer lock, with `try_lock`: in the kernel there is one text and its writers are
/// serialised, so it is always free; two texts patched at once (host tests) make the
/// second batch go entry by entry instead.
pub static SPACE: spin::Mutex<PlanSpace> = spin::Mutex::new(PlanSpace::new());

/// A validated batch, sorted by address and coalesced into runs.
pub struct WritePlan<'a, I: Instruction> {
    batch: &'a [Patch<I>],
    /// Batch positions in address order; `None`: the batch's own order is.
    order: Option<&'a [u16]>,
    /// The runs' starts, then a closing slot.
    runs: &'a [RunSlot],
    new: &'a [u8],
    old: &'a [u8],
}

/// Entries that follow each other back to back, in address order: `new` is written
/// over `old` at `addr`.
pub struct Run<'a, I: Instruction> {
    /// The first byte.
    pub addr: usize,
    /// The bytes to write, every entry's new instruction in address order.
    pub new: &'a [u8],
    /// The bytes validation found there, every entry's old instruction.
    pub old: &'a [u8],
    batch: &'a [Patch<I>],
    order: Option<&'a [u16]>,
    positions: core::ops::Range<usize>,
}

impl<'a, I: Instruction> Run<'a, I> {
    /// The run's entries, in address order.
    #[inline(always)]
    pub fn entries(&self) -> impl Iterator<Item = &'a Patch<I>> + 'a {
        let (batch, order) = (self.batch, self.order);
        self.positions.clone().filter_map(move |pos| match order {
            Some(order) => order
                .get(pos)
                .and_then(|&index| batch.get(usize::from(index))),
            None => batch.get(pos),
        })
    }

    /// The bytes the run covers.
    pub fn range(&self) -> core::ops::Range<usize> {
        self.addr..self.addr + self.new.len()
    }
}

impl<'a, I: Instruction> WritePlan<'a, I> {
    /// The runs, in address order. Runs in the patch window: no indexing that can panic.
    #[inline(always)]
    pub fn runs(&self) -> impl Iterator<Item = Run<'a, I>> + '_ {
        self.runs.windows(2).map(|pair| {
            let (start, end) = match pair {
                [start, end] => (*start, *end),
                _ => (RunSlot::default(), RunSlot::default()),
            };
            let bytes = usize::from(start.bytes)..usize::from(end.bytes);
            let positions = usize::from(start.first)..usize::from(end.first);
            let first = match self.order {
                Some(order) => order
                    .get(positions.start)
                    .and_then(|&index| self.batch.get(usize::from(index))),
                None => self.batch.get(positions.start),
            };
            Run {
                addr: first.map_or(0, |p| p.addr),
                new: self.new.get(bytes.clone()).unwrap_or(&[]),
                old: self.old.get(bytes).unwrap_or(&[]),
                batch: self.batch,
                order: self.order,
                positions,
            }
        })
    }

    /// Entries in the batch.
    pub fn sites(&self) -> usize {
        self.batch.len()
    }
}

/// Validates `batch` against `text` and plans its writes in `space`.
///
/// `Err` is exactly what [`validate`] returns (the same entry and reason; nothing is
/// written). `Ok(None)`: the batch is valid but has more than [`MAX_SITES`] entries
/// (or the text is shorter than 8 bytes), so it is to be written entry by entry.
///
/// One pass over the entries in address order checks the structure `validate` checks
/// entry by entry: alignment, equal lengths, inside text, no overlap with the previous
/// entry (which, in address order, rules out any overlap); for each protected range a
/// binary search finds the one entry that could reach into it; a second loop gathers
/// both byte images and notes where runs start; then the text is compared with each
/// run's old bytes ([`Text::run_holds`], as the window compares them again). Any problem
/// sends the batch to `validate`, which names the first one in batch order. For `n`
/// entries that
/// is O(n) in the batch's own order, O(n) reversed and O(n log n) otherwise, where
/// `validate` is O(n²) for any batch not in ascending order.
pub fn prepare<'a, T: Text>(
    text: &T,
    batch: &'a [Patch<T::Insn>],
    space: &'a mut PlanSpace,
) -> Result<Option<WritePlan<'a, T::Insn>>, PatchError<T::Insn>> {
    let n = batch.len();
    let text_range = text.text_range();
    if n == 0 || n > MAX_SITES || text_range.len() < 8 {
        return validate(text, batch).map(|()| None);
    }
    let mut gather = Gather {
        text_range: text_range.clone(),
        span: text_range.len(),
        runs: &mut space.runs,
        new: &mut space.new.0,
        old: &mut space.old.0,
        prev_end: 0,
    };
    // Batches usually come in ascending order: try that first (unless the last entry
    // lies below the first), and sort only if an entry is found out of order (which is
    // then not an overlap).
    let mut order: Option<&[u16]> = None;
    let mut ok = batch[0].addr <= batch[n - 1].addr;
    if ok {
        for p in batch {
            ok &= gather.entry(p);
        }
    }
    if !ok && !batch.windows(2).all(|pair| pair[0].addr <= pair[1].addr) {
        let sorted = sort_by_address(batch, &mut space.order[..n]);
        gather.restart();
        ok = true;
        for &index in sorted {
            ok &= gather.entry(&batch[usize::from(index)]);
        }
        order = Some(sorted);
    }
    let at = |pos: usize| match order {
        Some(order) => &batch[usize::from(order[pos])],
        None => &batch[pos],
    };
    let ok = ok
        && text.protected_ranges().iter().all(|range| {
            // Ends ascend (no overlaps): the first entry ending after the range's start
            // is the only one that can begin before its end.
            let (mut low, mut high) = (0, n);
            while low < high {
                let mid = low + (high - low) / 2;
                if at(mid).range().end <= range.start {
                    low = mid + 1;
                } else {
                    high = mid;
                }
            }
            low == n || at(low).addr >= range.end
        });
    if !ok {
        // The first problem in batch order, as `validate` names it.
        return validate(text, batch).map(|()| None);
    }
    let (bytes, runs) = match order {
        Some(order) => gather.copy(order.iter().map(|&index| &batch[usize::from(index)])),
        None => gather.copy(batch.iter()),
    };
    space.runs[runs] = RunSlot {
        first: n as u16,
        bytes: bytes as u16,
    };
    let plan = WritePlan {
        batch,
        order,
        runs: &space.runs[..=runs],
        new: &space.new.0[..bytes],
        old: &space.old.0[..bytes],
    };
    // Contents, now that every entry is known to lie in text: the text holds each run's
    // old bytes, compared as the window will compare them again.
    if !plan.runs().all(|run| text.run_holds(&run)) {
        return validate(text, batch).map(|()| None);
    }
    Ok(Some(plan))
}

/// The state of [`prepare`]'s one pass.
struct Gather<'s> {
    text_range: core::ops::Range<usize>,
    /// Bytes of text (at least 8).
    span: usize,
    runs: &'s mut [RunSlot; MAX_SITES + 1],
    new: &'s mut [u8; MAX_BYTES + SLACK],
    old: &'s mut [u8; MAX_BYTES + SLACK],
    /// Where the previous entry ended (0 before the first).
    prev_end: usize,
}

impl Gather<'_> {
    /// Back to nothing gathered.
    fn restart(&mut self) {
        self.prev_end = 0;
    }

    /// Checks the next entry in address order, all but its contents; `false` on any
    /// problem.
    ///
    /// Branch-free (`&` on booleans), and the caller's loop has no early exit: under
    /// QEMU's TCG every guest branch ends a translation block, and a pass over 1000
    /// entries with a dozen branches each cost more than the rest of the patch (on x86 a
    /// loop stopping at the first bad entry cost 35-68 us for 1000 entries, this one
    /// 17-20 us). The address is read volatile so that LLVM does not turn the loop into
    /// NEON code on arm64, which TCG emulates slowly (20 us instead of 9, measured).
    /// Nothing is read from text here (an entry is not known to lie in text before it
    /// passed). A bad entry's `false` sends the batch to `validate`.
    #[inline(always)]
    fn entry<I: Instruction>(&mut self, p: &Patch<I>) -> bool {
        // SAFETY: a reference is valid for reads. Volatile only so that LLVM does not
        // vectorise the loop (see above); the load is the one the loop makes anyway.
        let addr = unsafe { core::ptr::read_volatile(&p.addr) };
        let len = p.old.size();
        let end = addr.wrapping_add(len);
        // Inside text, overflow included, in one comparison: `len <= 8 <= span`.
        let fits = addr.is_multiple_of(I::ALIGN)
            & (p.new.size() == len)
            & (len.wrapping_sub(1) < 8)
            & (addr.wrapping_sub(self.text_range.start) <= self.span.wrapping_sub(len))
            & (self.prev_end <= addr);
        self.prev_end = end;
        fits
    }

    /// Gathers both images and notes where runs start, once every entry passed
    /// [`entry`](Self::entry): a loop of its own, short enough to keep its state in
    /// registers. Returns the bytes gathered and the runs.
    #[inline(always)]
    fn copy<'p, I: Instruction>(
        &mut self,
        entries: impl Iterator<Item = &'p Patch<I>>,
    ) -> (usize, usize) {
        let (mut at, mut run, mut prev_end) = (0, 0, 0);
        for (pos, p) in entries.enumerate() {
            // A run opens where an entry does not follow the previous one, at the bytes
            // gathered so far. The slot after the open run is written either way: a later
            // run or the closing slot overwrites it when this entry opened none. Indices
            // are in bounds without a check (`run <= pos < MAX_SITES`, and `at <
            // MAX_BYTES`: at most MAX_SITES entries of at most 8 bytes); the masks only
            // tell the compiler so.
            let opens = (run == 0) | (prev_end != p.addr);
            self.runs[run & (MAX_SITES - 1)] = RunSlot {
                first: pos as u16,
                bytes: at as u16,
            };
            run += usize::from(opens);
            let slot = at & (MAX_BYTES - 1);
            self.new[slot..slot + 8].copy_from_slice(&p.new.to_le_word().to_le_bytes());
            self.old[slot..slot + 8].copy_from_slice(&p.old.to_le_word().to_le_bytes());
            let len = p.old.size();
            at += len;
            prev_end = p.addr + len;
        }
        (at, run)
    }
}

/// Fills `order` (`order.len() == batch.len()`, at most [`MAX_SITES`]) with the
/// positions of `batch` in address order and returns it: reversed when the batch
/// descends (the other order callers build), sorted otherwise. Equal addresses end up
/// adjacent, so the pass of [`prepare`] sees them overlap.
fn sort_by_address<'o, I: Instruction>(batch: &[Patch<I>], order: &'o mut [u16]) -> &'o [u16] {
    let descending = batch.windows(2).all(|pair| pair[0].addr >= pair[1].addr);
    for (pos, slot) in order.iter_mut().enumerate() {
        *slot = if descending {
            (batch.len() - 1 - pos) as u16
        } else {
            pos as u16
        };
    }
    if !descending {
        order.sort_unstable_by_key(|&index| batch[usize::from(index)].addr);
    }
    order
}
