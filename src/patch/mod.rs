//! Patching kernel text: batches validated whole, then written while the machine is
//! stopped ([`patch_machine`]) or, for the few instruction pairs the architecture allows
//! to change under a running CPU, without stopping it ([`patch_nosync`]).
//!
//! Nothing here writes text through its own mapping: [`Text::write_insn`] goes through
//! a temporary writable alias, so kernel text is never writable.

pub mod alternatives;
pub mod icache;
pub mod insn;
pub mod plan;
pub mod x86;
pub mod x86_decode;

use crate::CpuSet;
use crate::stop::{
    Arch, LockTimeout, Quiescence, StopError, StopFnResult, StopFunction, StopMachine, StopOptions,
    lock_within,
};
use core::fmt;
use core::ops::Range;
use insn::Insn;
use plan::{Run, WritePlan};

/// An instruction encoding as the patcher moves it: fixed-size words on arm64
/// ([`insn::Insn`]), byte strings on x86 ([`x86::Insn`]).
pub trait Instruction: Copy + Eq + fmt::Debug + fmt::LowerHex + Send + Sync + 'static {
    /// The alignment a patch site needs.
    const ALIGN: usize;
    /// Which pairs [`patch_nosync`] accepts, for its refusal message.
    const CMODX_RULE: &'static str;

    /// Bytes the encoding occupies (1 to 8).
    fn size(&self) -> usize;

    /// The encoding as it lies in memory, in the low [`size`](Self::size) bytes of a
    /// little-endian word (the rest zero).
    fn to_le_word(&self) -> u64;

    /// Whether `old` may be replaced by `new` while another CPU may execute it.
    fn cmodx_pair_allowed(old: Self, new: Self) -> bool;
}

impl Instruction for Insn {
    const ALIGN: usize = 4;
    const CMODX_RULE: &'static str = "only B, BL, BRK, HVC, ISB, NOP, SMC, SVC pairs can";

    fn size(&self) -> usize {
        4
    }

    #[inline(always)]
    fn to_le_word(&self) -> u64 {
        u64::from(*self)
    }

    fn cmodx_pair_allowed(old: Self, new: Self) -> bool {
        insn::cmodx_pair_allowed(old, new)
    }
}

/// One instruction to replace: at `addr`, `old` must be there and becomes `new`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Patch<I: Instruction = Insn> {
    /// Address of the instruction (aligned to [`Instruction::ALIGN`], inside kernel
    /// text).
    pub addr: usize,
    /// The instruction expected there now.
    pub old: I,
    /// The instruction to write (as long as `old`).
    pub new: I,
}

impl<I: Instruction> Patch<I> {
    /// Replace `old` at `addr` with `new`.
    pub const fn new(addr: usize, old: I, new: I) -> Self {
        Patch { addr, old, new }
    }

    /// The bytes the entry changes.
    pub fn range(&self) -> Range<usize> {
        self.addr..self.addr + self.old.size()
    }

    /// The same site patched back.
    pub const fn reversed(self) -> Self {
        Patch {
            addr: self.addr,
            old: self.new,
            new: self.old,
        }
    }
}

/// What patching needs from the architecture besides the stop machine.
///
/// # Safety
///
/// - [`text_range`](Text::text_range) covers only mapped, executable kernel text, and
///   [`protected_ranges`](Text::protected_ranges) cover every instruction the
///   rendezvous, the exception entry paths and the writer themselves execute.
/// - [`write_insn`](Text::write_insn) stores the instruction visibly at `addr` (arm64:
///   one single-copy-atomic 32-bit write), without ever making `addr`'s own mapping
///   writable.
/// - [`write_run`](Text::write_run) stores exactly the run's bytes over its range, as
///   `write_insn` stores one instruction (arm64: each instruction single-copy atomic), and
///   makes them coherent as `sync_icache` does; [`holds`](Text::holds) and
///   [`run_holds`](Text::run_holds) answer exactly what reading the text would.
/// - [`sync_icache`](Text::sync_icache) makes the range coherent between data and
///   instruction side for every CPU, to the point of unification, and waits for that to
///   complete (arm64: DC CVAU, DSB ISH, IC IVAU, DSB ISH).
pub unsafe trait Text: Sync {
    /// The instruction encoding of this text.
    type Insn: Instruction;

    /// All of kernel text.
    fn text_range(&self) -> Range<usize>;

    /// Parts of text that must never be patched: the code the rendezvous and the
    /// patching path run.
    fn protected_ranges(&self) -> &[Range<usize>];

    /// Reads the `len`-byte instruction at `addr`, which validation found aligned and
    /// in text.
    fn read_insn(&self, addr: usize, len: usize) -> Self::Insn;

    /// Writes `insn` at `addr` through a temporary writable alias.
    ///
    /// # Safety
    /// `addr` passed validation, and no CPU may execute it unless the pair is
    /// CMODX-safe or every other CPU is quiescent.
    unsafe fn write_insn(&self, addr: usize, insn: Self::Insn);

    /// Cleans the D-cache and invalidates the I-cache for `range` to the point of
    /// unification, on every CPU, and waits for completion.
    fn sync_icache(&self, range: Range<usize>);

    /// Writes every entry's `new` instruction and makes it coherent, as
    /// [`write_insn`](Text::write_insn) then [`sync_icache`](Text::sync_icache) for each
    /// entry in order (the default). An implementation may instead map the alias once
    /// for all the entries that share a page and maintain the caches once per span.
    ///
    /// # Safety
    /// As [`write_insn`](Text::write_insn), for every entry.
    unsafe fn write_batch(&self, batch: &[Patch<Self::Insn>]) {
        for patch in batch {
            // SAFETY: forwarded from the caller.
            unsafe { self.write_insn(patch.addr, patch.new) };
            self.sync_icache(patch.range());
        }
    }

    /// Whether `insn` is at `addr`, which validation found aligned and in text: the
    /// default reads it with [`read_insn`](Text::read_insn); an implementation may
    /// compare the bytes without building an instruction.
    #[inline(always)]
    fn holds(&self, addr: usize, insn: &Self::Insn) -> bool {
        self.read_insn(addr, insn.size()) == *insn
    }

    /// Whether the text still holds `run`'s old bytes: [`patch_machine`]'s re-check
    /// inside the window. The default reads entry by entry; an implementation may
    /// compare the run's bytes ([`Run::old`]) in words instead.
    fn run_holds(&self, run: &Run<'_, Self::Insn>) -> bool {
        run.entries()
            .all(|p| self.read_insn(p.addr, p.old.size()) == p.old)
    }

    /// Writes one run of a write plan ([`Run::new`] over [`Run::range`]) and makes it
    /// coherent. The default is [`write_insn`](Text::write_insn) then
    /// [`sync_icache`](Text::sync_icache) for each entry; an implementation may instead
    /// copy the run's bytes through one alias mapping per page and maintain the caches
    /// once over each page's part.
    ///
    /// # Safety
    /// As [`write_insn`](Text::write_insn), for every entry of the run.
    unsafe fn write_run(&self, run: &Run<'_, Self::Insn>) {
        for patch in run.entries() {
            // SAFETY: forwarded from the caller.
            unsafe { self.write_insn(patch.addr, patch.new) };
            self.sync_icache(patch.range());
        }
    }

    /// The lock that serialises every writer of this text, from validation to the last
    /// write, so that no batch is validated against text another batch is changing.
    fn writer_lock(&self) -> &spin::Mutex<()>;
}

/// Why a batch was refused or failed. Every refusal happens before any byte changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PatchError<I: Instruction = Insn> {
    /// The batch has no entries.
    EmptyBatch,
    /// Entry `index` is not aligned to [`Instruction::ALIGN`].
    Misaligned {
        /// Position in the batch.
        index: usize,
        /// The address given.
        addr: usize,
    },
    /// Entry `index` replaces an instruction by one of another length.
    LengthMismatch {
        /// Position in the batch.
        index: usize,
        /// The address given.
        addr: usize,
        /// Length of the old instruction.
        old_len: usize,
        /// Length of the new one.
        new_len: usize,
    },
    /// Entry `index` is not inside kernel text.
    OutsideText {
        /// Position in the batch.
        index: usize,
        /// The address given.
        addr: usize,
        /// Kernel text.
        text: (usize, usize),
    },
    /// Entry `index` is inside code the rendezvous or the patching path runs.
    Protected {
        /// Position in the batch.
        index: usize,
        /// The address given.
        addr: usize,
        /// The protected range it falls in.
        range: (usize, usize),
    },
    /// Entry `index` does not hold the expected old instruction.
    OldMismatch {
        /// Position in the batch.
        index: usize,
        /// The address given.
        addr: usize,
        /// The instruction the entry expected.
        expected: I,
        /// The instruction found.
        found: I,
    },
    /// Entry `index` patches bytes that entry `first` patches too.
    Duplicate {
        /// Position in the batch.
        index: usize,
        /// The earlier entry it overlaps.
        first: usize,
        /// The address.
        addr: usize,
    },
    /// Entry `index` changes an instruction pair that may not be modified while it can
    /// execute (arm64: only B, BL, BRK, HVC, ISB, NOP, SMC and SVC pairs can; x86: none,
    /// use the INT3 protocol or `patch_machine`).
    NotCmodxSafe {
        /// Position in the batch.
        index: usize,
        /// The address given.
        addr: usize,
        /// Current instruction.
        old: I,
        /// Requested instruction.
        new: I,
    },
    /// Another writer held the text for the whole arrival timeout; nothing was written.
    Busy {
        /// How long the caller waited.
        waited_ns: u64,
    },
    /// The rendezvous failed; no byte changed.
    Stop(StopError),
}

impl<I: Instruction> core::error::Error for PatchError<I> {}

impl<I: Instruction> fmt::Display for PatchError<I> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            PatchError::EmptyBatch => f.write_str("empty batch"),
            PatchError::Misaligned { index, addr } => {
                write!(
                    f,
                    "entry {index} ({addr:#x}): not {}-byte aligned",
                    I::ALIGN
                )
            }
            PatchError::LengthMismatch {
                index,
                addr,
                old_len,
                new_len,
            } => write!(
                f,
                "entry {index} ({addr:#x}): replaces a {old_len}-byte instruction with a \
                 {new_len}-byte one"
            ),
            PatchError::OutsideText { index, addr, text } => write!(
                f,
                "entry {index} ({addr:#x}): outside kernel text {:#x}..{:#x}",
                text.0, text.1
            ),
            PatchError::Protected { index, addr, range } => write!(
                f,
                "entry {index} ({addr:#x}): inside code the rendezvous runs ({:#x}..{:#x})",
                range.0, range.1
            ),
            PatchError::OldMismatch {
                index,
                addr,
                expected,
                found,
            } => write!(
                f,
                "entry {index} ({addr:#x}): expected old instruction {expected:#010x}, found {found:#010x}"
            ),
            PatchError::Duplicate { index, first, addr } => {
                write!(f, "entry {index} ({addr:#x}): overlaps entry {first}")
            }
            PatchError::NotCmodxSafe {
                index,
                addr,
                old,
                new,
            } => write!(
                f,
                "entry {index} ({addr:#x}): {old:#010x} -> {new:#010x} may not change while it \
                 can execute ({}); use patch_machine",
                I::CMODX_RULE
            ),
            PatchError::Busy { waited_ns } => write!(
                f,
                "another patcher held the text for {} us; nothing written",
                waited_ns / 1000
            ),
            PatchError::Stop(err) => write!(f, "rendezvous failed, nothing written: {err}"),
        }
    }
}

impl<I: Instruction> From<StopError> for PatchError<I> {
    fn from(err: StopError) -> Self {
        PatchError::Stop(err)
    }
}

/// Checks every entry of `batch` against the current text; the first problem found is
/// returned and nothing is written.
pub fn validate<T: Text>(text: &T, batch: &[Patch<T::Insn>]) -> Result<(), PatchError<T::Insn>> {
    if batch.is_empty() {
        return Err(PatchError::EmptyBatch);
    }
    let text_range = text.text_range();
    // Batches are usually sorted by address: then no entry can repeat an earlier one,
    // and the quadratic search below is skipped (1000 sites: 500,000 comparisons).
    // Saturating: an entry at the top of the address space is refused below as outside
    // text, not an overflow here.
    let ascending = batch
        .windows(2)
        .all(|pair| pair[0].addr.saturating_add(pair[0].old.size()) <= pair[1].addr);
    for (index, patch) in batch.iter().enumerate() {
        let addr = patch.addr;
        if !addr.is_multiple_of(T::Insn::ALIGN) {
            return Err(PatchError::Misaligned { index, addr });
        }
        let len = patch.old.size();
        if patch.new.size() != len {
            return Err(PatchError::LengthMismatch {
                index,
                addr,
                old_len: len,
                new_len: patch.new.size(),
            });
        }
        // Checked, not saturating: in a text ending at `usize::MAX`, an entry running
        // past the top saturated to the end and passed (tests/prop_batch.rs).
        let end = match addr.checked_add(len) {
            Some(end) if text_range.start <= addr && end <= text_range.end => end,
            _ => {
                return Err(PatchError::OutsideText {
                    index,
                    addr,
                    text: (text_range.start, text_range.end),
                });
            }
        };
        if let Some(range) = text
            .protected_ranges()
            .iter()
            .find(|r| r.start < end && addr < r.end)
        {
            return Err(PatchError::Protected {
                index,
                addr,
                range: (range.start, range.end),
            });
        }
        if !ascending
            && let Some(first) = batch[..index]
                .iter()
                .position(|p| p.addr < end && addr < p.range().end)
        {
            return Err(PatchError::Duplicate { index, first, addr });
        }
        let found = text.read_insn(addr, len);
        if found != patch.old {
            return Err(PatchError::OldMismatch {
                index,
                addr,
                expected: patch.old,
                found,
            });
        }
    }
    Ok(())
}

/// What [`patch_machine`] observed: the evidence that it wrote only once every CPU was
/// quiescent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PatchReport {
    /// The CPUs that took part in the rendezvous.
    pub cpus: CpuSet,
    /// What the CPUs reported as they became quiescent.
    pub quiescence: Quiescence,
    /// Stamp taken right before the first write (see [`StopMachine::stamp`]).
    pub first_write_stamp: u64,
    /// Sites written.
    pub sites: usize,
}

/// Error code the patching CPU returns from inside the rendezvous when some CPU did
/// not report itself masked: nothing is written.
pub const ENOTQUIESCENT: i32 = -16; // -EBUSY

/// Error code the patching CPU returns when the text changed between validation and
/// the write: nothing is written.
pub const ECHANGED: i32 = -11; // -EAGAIN

/// Patches `batch` while the machine is stopped: every online CPU enters the
/// rendezvous and masks every asynchronous exception; only once all of them have
/// acknowledged does the calling CPU write, clean and invalidate each site to the point
/// of unification; every CPU then executes a context synchronisation before it unmasks
/// and leaves.
///
/// No NMI handler runs while a site is being written, on any CPU: where masking keeps
/// NMIs out (arm64) by masking; where NMIs pass it (x86) the writes run from the
/// patching CPU's own NMI and the other CPUs' NMIs wait in the stop machine's slot until
/// they are done ([`StopMachine::stop_machine_nmi_free`]; Ankur Arora,
/// "x86/alternatives: NMI safe runtime patching", LKML, 2020).
///
/// The whole batch is validated first; an invalid entry rejects it all, unchanged.
/// Validation, sorting and the coalescing of back-to-back entries into runs happen
/// before the machine stops ([`plan::prepare`]); the window re-checks and copies runs.
pub fn patch_machine<A: Arch, T: Text>(
    stop: &StopMachine<A>,
    text: &T,
    batch: &[Patch<T::Insn>],
    options: StopOptions,
) -> Result<PatchReport, PatchError<T::Insn>> {
    // Refused from IRQ or NMI context or with interrupts masked, before the lock: its
    // holder may be the code this CPU interrupted, or waiting for this CPU to arrive.
    stop.may_stop_here()?;
    // Waiting here keeps interrupts enabled: the holder may be stopping the machine.
    let _writer = lock_bounded(stop.arch(), text.writer_lock(), options.arrival_timeout_ns)?;
    let mut space = plan::SPACE.try_lock();
    let plan = match space.as_deref_mut() {
        Some(space) => plan::prepare(text, batch, space)?,
        None => {
            validate(text, batch)?;
            None
        }
    };
    let patcher = stop.arch().cpu_id();
    let window = PatchWindow {
        stop,
        text,
        batch,
        plan: plan.as_ref(),
        report: spin::Mutex::new(None),
    };
    // SAFETY: where NMIs pass `mask_all` (x86) the window runs in the patcher's NMI:
    // `write_stopped` takes only `report`'s lock, which nothing else takes during the
    // call, and the text writer's alias lock, which no CPU can hold meanwhile (its holders
    // keep interrupts off, so every other CPU arrived without it, and no NMI handler
    // writes text); it does not print or allocate, and its writes take no exception.
    unsafe { stop.stop_machine_nmi_free(&window, CpuSet::single(patcher), options)? };
    Ok(window
        .report
        .into_inner()
        .expect("the patching CPU ran and reported"))
}

/// The stop function of [`patch_machine`]. A type of its own, not a closure, so that
/// the code the core calls through its vtable can live in `.text.nopatch`
/// (tests/kernel_image.rs checks).
struct PatchWindow<'a, A: Arch, T: Text> {
    stop: &'a StopMachine<A>,
    text: &'a T,
    batch: &'a [Patch<T::Insn>],
    plan: Option<&'a WritePlan<'a, T::Insn>>,
    report: spin::Mutex<Option<PatchReport>>,
}

impl<A: Arch, T: Text> StopFunction for PatchWindow<'_, A, T> {
    #[unsafe(link_section = ".text.nopatch")]
    fn call(&self, _cpu: usize) -> StopFnResult {
        write_stopped(self.stop, self.text, self.batch, self.plan, &self.report)
    }
}

/// The `Run` phase of [`patch_machine`] on the patching CPU: every other CPU is in the
/// rendezvous. Lives in `.text.nopatch` with the rest of the code the rendezvous runs.
#[unsafe(link_section = ".text.nopatch")]
fn write_stopped<A: Arch, T: Text>(
    stop: &StopMachine<A>,
    text: &T,
    batch: &[Patch<T::Insn>],
    plan: Option<&WritePlan<'_, T::Insn>>,
    report: &spin::Mutex<Option<PatchReport>>,
) -> StopFnResult {
    let quiescence = stop.quiescence();
    let everyone = stop.arch().online_cpus();
    // Trust but verify: the core promises this; write nothing if it is not so. Every CPU
    // is masked in the rendezvous or, isolated in user mode, deferred to its next kernel
    // entry through its context state word (never both).
    let deferred = quiescence.deferred;
    if quiescence.masked.or(deferred) != everyone || !quiescence.masked.and(deferred).is_empty() {
        return Err(ENOTQUIESCENT);
    }
    // What the re-check protects against: every writer that goes through this module
    // holds the text's writer lock from its validation to its last write, so the sites
    // cannot have changed since `prepare` unless something wrote text without that lock
    // (`Text::write_insn` and the arch `poke_text` are callable by unsafe code directly),
    // or memory under text was corrupted. Done here, with every other CPU stopped, the
    // check and the writes are one step for everyone else. Against the plan it is one
    // comparison per run of contiguous bytes, not an instruction decode per entry.
    let unchanged = match plan {
        Some(plan) => plan.runs().all(|run| text.run_holds(&run)),
        None => batch
            .iter()
            .all(|p| text.read_insn(p.addr, p.old.size()) == p.old),
    };
    if !unchanged {
        return Err(ECHANGED);
    }
    let first_write_stamp = stop.stamp();
    match plan {
        Some(plan) => {
            for run in plan.runs() {
                // SAFETY: validated by `prepare`; every other CPU is in the rendezvous
                // with every asynchronous exception masked, so none executes the sites.
                unsafe { text.write_run(&run) };
            }
        }
        // SAFETY: as above, validated by `validate`.
        None => unsafe { text.write_batch(batch) },
    }
    *report.lock() = Some(PatchReport {
        cpus: everyone,
        quiescence,
        first_write_stamp,
        sites: batch.len(),
    });
    Ok(())
}

/// Patches `batch` without stopping the machine. Allowed only where both the old and
/// the new instruction are among those the Arm ARM lets change while another CPU may
/// execute them (B, BL, BRK, HVC, ISB, NOP, SMC, SVC); any other pair is refused with
/// [`PatchError::NotCmodxSafe`] before anything is written.
///
/// Another CPU may execute the old or the new instruction until it next synchronises
/// its context; the caller's CPU sees the new one once this returns.
pub fn patch_nosync<A: Arch, T: Text>(
    arch: &A,
    text: &T,
    batch: &[Patch<T::Insn>],
) -> Result<(), PatchError<T::Insn>> {
    let _writer = lock_bounded(
        arch,
        text.writer_lock(),
        StopOptions::DEFAULT.arrival_timeout_ns,
    )?;
    validate(text, batch)?;
    if let Some((index, patch)) = batch
        .iter()
        .enumerate()
        .find(|(_, p)| !T::Insn::cmodx_pair_allowed(p.old, p.new))
    {
        return Err(PatchError::NotCmodxSafe {
            index,
            addr: patch.addr,
            old: patch.old,
            new: patch.new,
        });
    }
    // One pass for the whole batch (Linux's jump labels: queue, then apply once): the
    // text's `write_batch` maps the alias once per page run and maintains the caches
    // once over each run's span, then one context synchronisation here. Other CPUs are
    // the caller's business (a static key flip kicks them once per batch).
    // SAFETY: validated; both instructions of every entry are CMODX-safe, so a CPU
    // executing a site concurrently sees either the old or the new one.
    unsafe { text.write_batch(batch) };
    arch.sync_context();
    Ok(())
}

/// Takes the text writer `lock`, giving up after `timeout_ns` with
/// [`PatchError::Busy`] (also used by x86's `text_poke_bp`).
pub(crate) fn lock_bounded<'a, A: Arch, I: Instruction>(
    arch: &A,
    lock: &'a spin::Mutex<()>,
    timeout_ns: u64,
) -> Result<spin::MutexGuard<'a, ()>, PatchError<I>> {
    lock_within(
        lock,
        "the text writer lock",
        timeout_ns,
        || arch.now_ns(),
        || arch.relax(),
    )
    .map_err(|LockTimeout { waited_ns, .. }| PatchError::Busy { waited_ns })
}
