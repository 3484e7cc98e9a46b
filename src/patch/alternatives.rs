//! Alternatives: instruction sequences the kernel is built with, each recorded with a
//! replacement and the CPU feature that calls for it, rewritten once the features are
//! known (Linux's `apply_alternatives`).
//!
//! Each architecture's `alternative!` macro emits the original sequence inline, the
//! replacement into `.altinstr_replacement` (read-only data: never executed where it
//! lies, never patched) and one [`AltEntry`] into a table section. There are two tables,
//! because Mark Rutland's "arm64: ensure CPUs are quiescent before patching"
//! (linux-arm-kernel, 2021) requires every CPU quiescent before a byte changes, and the
//! code that makes them quiescent cannot wait for itself:
//!
//! - [`Class::Runtime`] sites (`.altinstructions`) lie in patchable text and are
//!   applied through [`patch_machine`] once every CPU is online;
//! - [`Class::Boot`] sites (`.altinstructions.boot`) lie in `.text.nopatch`, the code the
//!   rendezvous runs, and are written by the boot CPU before any other CPU starts
//!   ([`apply_boot`]), through the same [`Text`] writer, without a stop.
//!
//! A runtime site inside protected text, or a boot site outside it, is refused by
//! [`check_table`] before anything is written, as is any other malformed entry: a bad
//! table changes nothing.

use super::{Instruction, Patch, PatchError, PatchReport, Text, patch_machine};
use crate::stop::{Arch, StopMachine, StopOptions};
use core::fmt;
use core::ops::Range;

/// The longest site (bytes) an entry may describe.
pub const MAX_SITE_LEN: usize = 32;
/// The most entries one table may hold (the snapshot of original bytes is static).
pub const MAX_SITES: usize = 64;
/// Feature numbers are bit positions in [`Features`].
pub const MAX_FEATURES: u16 = 64;

/// One table entry, as the `alternative!` macros emit it: 12 bytes, offsets relative
/// to the field that holds them (as Linux's `struct alt_instr`), so the table needs no
/// relocation. Neither `Copy` nor `Clone`: a copy elsewhere would point elsewhere.
#[repr(C)]
#[derive(Debug, PartialEq, Eq)]
pub struct AltEntry {
    /// Site address minus the address of this field.
    site_offset: i32,
    /// Replacement address minus the address of this field.
    repl_offset: i32,
    /// Bit of [`Features`] that calls for the replacement.
    pub feature: u16,
    /// Bytes of the original sequence.
    pub site_len: u8,
    /// Bytes of the replacement (x86: at most `site_len`, padded with NOPs; arm64:
    /// equal).
    pub repl_len: u8,
}

const _: () = assert!(core::mem::size_of::<AltEntry>() == 12);

impl AltEntry {
    /// An entry whose site and replacement are `site_offset`/`repl_offset` bytes from
    /// the entry's own first and second field.
    ///
    /// # Safety
    /// The entry is only used (by [`check_table`], [`Snapshot::take`],
    /// [`build_batch`], [`Alternatives`]) once it is stored where the offsets were
    /// computed for, and its replacement is then `repl_len` readable bytes that stay
    /// unchanged: the table functions read it through its address.
    pub const unsafe fn new(
        site_offset: i32,
        repl_offset: i32,
        feature: u16,
        site_len: u8,
        repl_len: u8,
    ) -> Self {
        AltEntry {
            site_offset,
            repl_offset,
            feature,
            site_len,
            repl_len,
        }
    }

    /// An entry to be stored at `entry_addr` that describes `site` and `repl` (both
    /// within 2 GiB of it, as the linker guarantees for the kernel's tables).
    ///
    /// # Safety
    /// As [`AltEntry::new`], with the entry stored at `entry_addr`.
    pub unsafe fn at(
        entry_addr: usize,
        site: usize,
        repl: usize,
        feature: u16,
        lens: (u8, u8),
    ) -> Self {
        let rel = |field: usize, target: usize| target.wrapping_sub(field) as isize as i32;
        // SAFETY: forwarded from the caller.
        unsafe {
            AltEntry::new(
                rel(entry_addr, site),
                rel(entry_addr + 4, repl),
                feature,
                lens.0,
                lens.1,
            )
        }
    }

    /// The address of the original sequence.
    pub fn site(&self) -> usize {
        (&self.site_offset as *const i32 as usize).wrapping_add_signed(self.site_offset as isize)
    }

    /// The address of the replacement.
    pub fn replacement(&self) -> usize {
        (&self.repl_offset as *const i32 as usize).wrapping_add_signed(self.repl_offset as isize)
    }

    /// The bytes of the original sequence.
    pub fn site_range(&self) -> Range<usize> {
        self.site()..self.site() + usize::from(self.site_len)
    }

    fn replacement_range(&self) -> Range<usize> {
        self.replacement()..self.replacement() + usize::from(self.repl_len)
    }
}

/// CPU features, one bit each; the architecture numbers them and fills the set in from
/// its ID registers or CPUID.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Features(pub u64);

impl Features {
    /// No feature.
    pub const NONE: Features = Features(0);

    /// The set with feature `bit` added.
    pub const fn with(self, bit: u16) -> Features {
        Features(self.0 | 1 << bit)
    }

    /// The set with feature `bit` set to `on`.
    pub const fn set(self, bit: u16, on: bool) -> Features {
        if on {
            self.with(bit)
        } else {
            Features(self.0 & !(1 << bit))
        }
    }

    /// Whether feature `bit` is in the set.
    pub const fn has(self, bit: u16) -> bool {
        bit < MAX_FEATURES && self.0 & (1 << bit) != 0
    }
}

/// Which table an entry comes from, and so how it may be written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// In `.text.nopatch`: written on the boot CPU before any other CPU runs.
    Boot,
    /// In patchable text: written through `patch_machine`, every CPU quiescent.
    Runtime,
}

impl Class {
    /// The section the entries of this class live in.
    pub const fn section(self) -> &'static str {
        match self {
            Class::Boot => ".altinstructions.boot",
            Class::Runtime => ".altinstructions",
        }
    }
}

/// An instruction encoding alternatives can be cut into: sites are rewritten in chunks
/// of at most [`CHUNK`](AltInsn::CHUNK) bytes, each one [`Patch`] entry.
pub trait AltInsn: Instruction {
    /// Bytes of one chunk (arm64: one word; x86: the longest instruction the patcher
    /// moves).
    const CHUNK: usize;
    /// Whether a shorter replacement is padded with NOPs (x86) or lengths must be
    /// equal (arm64).
    const PADS: bool;

    /// The chunk holding `bytes` (`1..=CHUNK` of them, `CHUNK` unless padding).
    fn from_chunk(bytes: &[u8]) -> Self;

    /// Stores the chunk's bytes, in memory order, into `out` (as long as the chunk).
    fn write_bytes(&self, out: &mut [u8]);

    /// Fills `buf` with NOPs; `false` if this encoding cannot.
    fn fill_nops(buf: &mut [u8]) -> bool;
}

impl AltInsn for super::insn::Insn {
    const CHUNK: usize = 4;
    const PADS: bool = false;

    fn from_chunk(bytes: &[u8]) -> Self {
        let mut word = [0u8; 4];
        for (to, from) in word.iter_mut().zip(bytes) {
            *to = *from;
        }
        u32::from_le_bytes(word)
    }

    fn write_bytes(&self, out: &mut [u8]) {
        for (to, from) in out.iter_mut().zip(self.to_le_bytes()) {
            *to = from;
        }
    }

    fn fill_nops(buf: &mut [u8]) -> bool {
        if !buf.len().is_multiple_of(4) {
            return false;
        }
        for word in buf.chunks_mut(4) {
            word.copy_from_slice(&super::insn::NOP.to_le_bytes());
        }
        true
    }
}

/// What an out-of-range chunk becomes (never: chunks are `1..=CHUNK` bytes).
const X86_NOP1: super::x86::Insn = match super::x86::Insn::from_bytes(&[0x90]) {
    Some(nop) => nop,
    None => panic!("one byte is a valid length"),
};

impl AltInsn for super::x86::Insn {
    const CHUNK: usize = super::x86::MAX_LEN;
    const PADS: bool = true;

    fn from_chunk(bytes: &[u8]) -> Self {
        super::x86::Insn::from_bytes(bytes).unwrap_or(X86_NOP1)
    }

    fn write_bytes(&self, out: &mut [u8]) {
        for (to, from) in out.iter_mut().zip(self.bytes()) {
            *to = *from;
        }
    }

    fn fill_nops(buf: &mut [u8]) -> bool {
        let mut rest = buf;
        while !rest.is_empty() {
            let len = rest.len().min(super::x86::MAX_LEN);
            let Ok(nop) = super::x86::nop(len) else {
                return false;
            };
            let (head, tail) = rest.split_at_mut(len);
            head.copy_from_slice(nop.bytes());
            rest = tail;
        }
        true
    }
}

/// Why a table was refused or could not be applied. Every refusal comes before any
/// byte changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AltError<I: Instruction> {
    /// The table has more than [`MAX_SITES`] entries.
    TooManySites {
        /// Entries in the table.
        entries: usize,
    },
    /// Entry `index` has an empty site or one longer than [`MAX_SITE_LEN`].
    BadLength {
        /// Position in the table.
        index: usize,
        /// Site address.
        site: usize,
        /// Its length.
        len: usize,
    },
    /// Entry `index`'s replacement is longer than its site, or (without NOP padding)
    /// not as long.
    LengthMismatch {
        /// Position in the table.
        index: usize,
        /// Site address.
        site: usize,
        /// Site length.
        site_len: usize,
        /// Replacement length.
        repl_len: usize,
    },
    /// Entry `index`'s site is not aligned, or not a whole number of instructions.
    Misaligned {
        /// Position in the table.
        index: usize,
        /// Site address.
        site: usize,
    },
    /// Entry `index`'s site is not inside kernel text.
    SiteOutsideText {
        /// Position in the table.
        index: usize,
        /// Site address.
        site: usize,
    },
    /// Entry `index`'s replacement lies in kernel text: it must be data nobody runs or
    /// patches.
    ReplacementInText {
        /// Position in the table.
        index: usize,
        /// Replacement address.
        replacement: usize,
    },
    /// Entry `index` names a feature the architecture does not define.
    UnknownFeature {
        /// Position in the table.
        index: usize,
        /// The feature number.
        feature: u16,
    },
    /// A runtime entry's site lies in code the rendezvous runs: it would need a stop
    /// that cannot wait for it. Use the boot form of the macro.
    RuntimeSiteProtected {
        /// Position in the table.
        index: usize,
        /// Site address.
        site: usize,
        /// The protected range.
        range: (usize, usize),
    },
    /// A boot entry's site lies outside `.text.nopatch`: it must go through
    /// `patch_machine`. Use the runtime form of the macro.
    BootSiteOutsideNopatch {
        /// Position in the table.
        index: usize,
        /// Site address.
        site: usize,
    },
    /// Entry `index`'s site overlaps entry `first`'s.
    Overlap {
        /// Position in the table.
        index: usize,
        /// The earlier entry.
        first: usize,
        /// Site address.
        site: usize,
    },
    /// The text writer was held by someone else at boot.
    Busy,
    /// The table was never applied (the boot flow skipped it).
    NotApplied,
    /// The batch was refused or the rendezvous failed; nothing was written.
    Patch(PatchError<I>),
}

impl<I: Instruction> fmt::Display for AltError<I> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            AltError::TooManySites { entries } => {
                write!(f, "{entries} alternatives, more than {MAX_SITES}")
            }
            AltError::BadLength { index, site, len } => write!(
                f,
                "alternative {index} ({site:#x}): site of {len} bytes (1..={MAX_SITE_LEN})"
            ),
            AltError::LengthMismatch {
                index,
                site,
                site_len,
                repl_len,
            } => write!(
                f,
                "alternative {index} ({site:#x}): {repl_len}-byte replacement for a \
                 {site_len}-byte site"
            ),
            AltError::Misaligned { index, site } => write!(
                f,
                "alternative {index} ({site:#x}): not whole {}-byte aligned instructions",
                I::ALIGN
            ),
            AltError::SiteOutsideText { index, site } => {
                write!(
                    f,
                    "alternative {index} ({site:#x}): site outside kernel text"
                )
            }
            AltError::ReplacementInText { index, replacement } => write!(
                f,
                "alternative {index}: replacement at {replacement:#x} lies in kernel text"
            ),
            AltError::UnknownFeature { index, feature } => {
                write!(f, "alternative {index}: unknown feature {feature}")
            }
            AltError::RuntimeSiteProtected { index, site, range } => write!(
                f,
                "alternative {index} ({site:#x}): in code the rendezvous runs \
                 ({:#x}..{:#x}), which patch_machine cannot stop; use the boot form",
                range.0, range.1
            ),
            AltError::BootSiteOutsideNopatch { index, site } => write!(
                f,
                "boot alternative {index} ({site:#x}): outside .text.nopatch, so other CPUs \
                 may run it; use the runtime form (patch_machine)"
            ),
            AltError::Overlap { index, first, site } => write!(
                f,
                "alternative {index} ({site:#x}): overlaps alternative {first}"
            ),
            AltError::Busy => f.write_str("the text writer is held at boot"),
            AltError::NotApplied => f.write_str("the table was never applied"),
            AltError::Patch(err) => write!(f, "{err}"),
        }
    }
}

/// Where a table's sites may lie.
#[derive(Clone, Debug)]
pub struct Bounds<'a> {
    /// All kernel text.
    pub text: Range<usize>,
    /// Code the rendezvous runs (`.text.nopatch`), where boot sites must lie.
    pub nopatch: Range<usize>,
    /// Every range `patch_machine` refuses (nopatch, boot code).
    pub protected: &'a [Range<usize>],
    /// Features the architecture defines: an entry naming another is refused.
    pub known: Features,
}

fn overlaps(a: &Range<usize>, b: &Range<usize>) -> bool {
    a.start < b.end && b.start < a.end
}

fn inside(inner: &Range<usize>, outer: &Range<usize>) -> bool {
    outer.start <= inner.start && inner.end <= outer.end
}

/// Checks every entry of `table` (of `class`) against `bounds`; the first problem is
/// returned.
pub fn check_table<I: AltInsn>(
    table: &[AltEntry],
    class: Class,
    bounds: &Bounds<'_>,
) -> Result<(), AltError<I>> {
    if table.len() > MAX_SITES {
        return Err(AltError::TooManySites {
            entries: table.len(),
        });
    }
    for (index, entry) in table.iter().enumerate() {
        let site = entry.site();
        let (site_len, repl_len) = (usize::from(entry.site_len), usize::from(entry.repl_len));
        if site_len == 0 || site_len > MAX_SITE_LEN {
            return Err(AltError::BadLength {
                index,
                site,
                len: site_len,
            });
        }
        if repl_len > site_len || (!I::PADS && repl_len != site_len) {
            return Err(AltError::LengthMismatch {
                index,
                site,
                site_len,
                repl_len,
            });
        }
        if !site.is_multiple_of(I::ALIGN) || !site_len.is_multiple_of(I::ALIGN) {
            return Err(AltError::Misaligned { index, site });
        }
        let range = entry.site_range();
        if !inside(&range, &bounds.text) {
            return Err(AltError::SiteOutsideText { index, site });
        }
        if repl_len > 0 && overlaps(&entry.replacement_range(), &bounds.text) {
            return Err(AltError::ReplacementInText {
                index,
                replacement: entry.replacement(),
            });
        }
        if !bounds.known.has(entry.feature) {
            return Err(AltError::UnknownFeature {
                index,
                feature: entry.feature,
            });
        }
        match class {
            Class::Boot if !inside(&range, &bounds.nopatch) => {
                return Err(AltError::BootSiteOutsideNopatch { index, site });
            }
            Class::Runtime => {
                if let Some(p) = bounds.protected.iter().find(|p| overlaps(&range, p)) {
                    return Err(AltError::RuntimeSiteProtected {
                        index,
                        site,
                        range: (p.start, p.end),
                    });
                }
            }
            Class::Boot => {}
        }
        if let Some(first) = table[..index]
            .iter()
            .position(|e| overlaps(&e.site_range(), &range))
        {
            return Err(AltError::Overlap { index, first, site });
        }
    }
    Ok(())
}

/// The original bytes of a table's sites, taken before the first write, so that the
/// sites can be put back (the benchmark flips them) and checked against the features.
#[derive(Clone, Copy, Debug)]
pub struct Snapshot {
    bytes: [[u8; MAX_SITE_LEN]; MAX_SITES],
    taken: usize,
}

impl Snapshot {
    /// No site recorded.
    pub const EMPTY: Snapshot = Snapshot {
        bytes: [[0; MAX_SITE_LEN]; MAX_SITES],
        taken: 0,
    };

    /// Records the current bytes of every site of `table`, which [`check_table`]
    /// accepted (so every site is readable text).
    pub fn take<T: Text>(text: &T, table: &[AltEntry]) -> Snapshot
    where
        T::Insn: AltInsn,
    {
        let mut snapshot = Snapshot::EMPTY;
        for (entry, bytes) in table.iter().zip(snapshot.bytes.iter_mut()) {
            read_site(text, entry, bytes);
        }
        snapshot.taken = table.len().min(MAX_SITES);
        snapshot
    }

    /// The original bytes of site `index`, if recorded.
    pub fn original(&self, index: usize) -> Option<&[u8; MAX_SITE_LEN]> {
        self.bytes.get(index).filter(|_| index < self.taken)
    }
}

/// Reads the bytes of `entry`'s site through `text`, chunk by chunk.
fn read_site<T: Text>(text: &T, entry: &AltEntry, out: &mut [u8; MAX_SITE_LEN])
where
    T::Insn: AltInsn,
{
    let chunk = T::Insn::CHUNK;
    let len = usize::from(entry.site_len).min(MAX_SITE_LEN);
    let mut offset = 0;
    while offset < len {
        let n = chunk.min(len - offset);
        text.read_insn(entry.site() + offset, n)
            .write_bytes(&mut out[offset..offset + n]);
        offset += n;
    }
}

/// The bytes `entry`'s site must hold under `features`: the replacement (NOP-padded)
/// when its feature is present, else the original from `snapshot`.
fn wanted_bytes<I: AltInsn>(
    entry: &AltEntry,
    original: &[u8; MAX_SITE_LEN],
    features: Features,
) -> Option<[u8; MAX_SITE_LEN]> {
    let len = usize::from(entry.site_len).min(MAX_SITE_LEN);
    if !features.has(entry.feature) {
        return Some(*original);
    }
    let mut out = [0u8; MAX_SITE_LEN];
    let repl = usize::from(entry.repl_len).min(len);
    // SAFETY: entries are made by the assembler or by `AltEntry::new`, whose contract
    // makes the replacement `repl_len` readable bytes at the address the entry names.
    let src = unsafe { core::slice::from_raw_parts(entry.replacement() as *const u8, repl) };
    out[..repl].copy_from_slice(src);
    if repl < len && !I::fill_nops(&mut out[repl..len]) {
        return None;
    }
    Some(out)
}

/// Whether `entry`'s site holds its replacement now (`Some(true)`), its original
/// (`Some(false)`), or neither.
pub fn variant_in_text<T: Text>(
    text: &T,
    entry: &AltEntry,
    original: &[u8; MAX_SITE_LEN],
) -> Option<bool>
where
    T::Insn: AltInsn,
{
    let mut now = [0u8; MAX_SITE_LEN];
    read_site(text, entry, &mut now);
    let replaced = wanted_bytes::<T::Insn>(entry, original, Features(u64::MAX))?;
    let len = usize::from(entry.site_len).min(MAX_SITE_LEN);
    if now[..len] == replaced[..len] {
        Some(true)
    } else if now[..len] == original[..len] {
        Some(false)
    } else {
        None
    }
}

/// Builds into `out` the patches that make every site of `table` hold what
/// `features` call for; chunks already right are left out. Returns how many entries
/// of `out` were filled.
pub fn build_batch<T: Text>(
    text: &T,
    table: &[AltEntry],
    snapshot: &Snapshot,
    features: Features,
    out: &mut [Patch<T::Insn>],
) -> Result<usize, AltError<T::Insn>>
where
    T::Insn: AltInsn,
{
    let chunk = T::Insn::CHUNK;
    let mut filled = 0;
    for (index, entry) in table.iter().enumerate() {
        let original = snapshot.original(index).ok_or(AltError::TooManySites {
            entries: table.len(),
        })?;
        let site = entry.site();
        let len = usize::from(entry.site_len);
        let wanted =
            wanted_bytes::<T::Insn>(entry, original, features).ok_or(AltError::LengthMismatch {
                index,
                site,
                site_len: len,
                repl_len: usize::from(entry.repl_len),
            })?;
        let mut offset = 0;
        while offset < len {
            let n = chunk.min(len - offset);
            let old = text.read_insn(site + offset, n);
            let new = T::Insn::from_chunk(&wanted[offset..offset + n]);
            if old != new {
                let slot = out.get_mut(filled).ok_or(AltError::TooManySites {
                    entries: table.len(),
                })?;
                *slot = Patch::new(site + offset, old, new);
                filled += 1;
            }
            offset += n;
        }
    }
    Ok(filled)
}

/// Writes `table`'s boot sites as `features` call for, through `text`'s writer,
/// without a stop. Returns the chunks written.
///
/// # Safety
/// No other CPU runs: the caller is the boot CPU before any secondary started. The
/// table passed [`check_table`] with [`Class::Boot`] and `snapshot` was taken from it.
pub unsafe fn apply_boot<T: Text>(
    text: &T,
    table: &[AltEntry],
    snapshot: &Snapshot,
    features: Features,
    scratch: &mut [Patch<T::Insn>],
) -> Result<usize, AltError<T::Insn>>
where
    T::Insn: AltInsn,
{
    let _writer = text.writer_lock().try_lock().ok_or(AltError::Busy)?;
    let filled = build_batch(text, table, snapshot, features, scratch)?;
    let batch = &scratch[..filled];
    if !batch.is_empty() {
        // SAFETY: only this CPU runs (the caller's promise), so no CPU executes the
        // sites while they change; `check_table` placed every site in text.
        unsafe { text.write_batch(batch) };
    }
    Ok(filled)
}

/// Makes `table`'s runtime sites hold what `features` call for, in one
/// [`patch_machine`] batch (every CPU quiescent before the first write). Returns the
/// report, or `None` when every site already held what it should (nothing to stop
/// for).
pub fn apply_runtime<A: Arch, T: Text>(
    stop: &StopMachine<A>,
    text: &T,
    table: &[AltEntry],
    snapshot: &Snapshot,
    features: Features,
    scratch: &mut [Patch<T::Insn>],
    options: StopOptions,
) -> Result<Option<PatchReport>, AltError<T::Insn>>
where
    T::Insn: AltInsn,
{
    let filled = build_batch(text, table, snapshot, features, scratch)?;
    if filled == 0 {
        return Ok(None);
    }
    patch_machine(stop, text, &scratch[..filled], options)
        .map(Some)
        .map_err(AltError::Patch)
}

/// One site as the self-tests see it.
#[derive(Clone, Copy, Debug)]
pub struct SiteView {
    /// Its table.
    pub class: Class,
    /// Its position in the table.
    pub index: usize,
    /// Its address.
    pub site: usize,
    /// Its length.
    pub len: usize,
    /// The feature that calls for the replacement, and its name.
    pub feature: (u16, &'static str),
    /// Whether the features applied call for the replacement.
    pub wanted: bool,
    /// What the text holds now: the replacement (`Some(true)`), the original
    /// (`Some(false)`) or neither.
    pub in_text: Option<bool>,
}

/// A kernel path that runs an alternative site, and checks what it computed.
#[derive(Clone, Copy, Debug)]
pub struct AltPath {
    /// What the path is (names the function and its variants).
    pub name: &'static str,
    /// Runs the path; `Err` says what came out wrong.
    pub run: fn() -> Result<(), &'static str>,
}

/// Where a kernel's two tables are, and the code boot sites must lie in.
#[derive(Clone, Debug)]
pub struct Tables {
    /// `.altinstructions.boot`.
    pub boot: &'static [AltEntry],
    /// `.altinstructions`.
    pub runtime: &'static [AltEntry],
    /// `.text.nopatch`, the code the rendezvous runs.
    pub nopatch: Range<usize>,
}

struct State<I: Instruction, const N: usize> {
    /// The boot CPU's features, as applied.
    features: Features,
    /// Whether the benchmark's feature is on in the runtime table now.
    bench_on: bool,
    /// Whether both tables passed [`check_table`] (`None`: not looked at yet).
    checked: Option<Result<(), AltError<I>>>,
    boot: Snapshot,
    runtime: Snapshot,
    /// What applying the runtime table did (`None`: not yet).
    applied: Option<Result<usize, AltError<I>>>,
    scratch: [Patch<I>; N],
}

/// A kernel's alternatives: its text, its feature names, and what was applied. Each
/// port has one, with `N` chunks of scratch batch (enough for [`MAX_SITES`] sites of
/// [`MAX_SITE_LEN`]).
pub struct Alternatives<T: Text + 'static, const N: usize> {
    text: &'static T,
    names: &'static [(u16, &'static str)],
    bench: u16,
    state: spin::Mutex<State<T::Insn, N>>,
}

impl<T: Text + 'static, const N: usize> Alternatives<T, N>
where
    T::Insn: AltInsn,
{
    /// Alternatives of `text`; `names` lists every feature a table may name, `bench`
    /// the one only the benchmark turns on; `placeholder` fills the scratch batch.
    pub const fn new(
        text: &'static T,
        names: &'static [(u16, &'static str)],
        bench: u16,
        placeholder: T::Insn,
    ) -> Self {
        Alternatives {
            text,
            names,
            bench,
            state: spin::Mutex::new(State {
                features: Features::NONE,
                bench_on: false,
                checked: None,
                boot: Snapshot::EMPTY,
                runtime: Snapshot::EMPTY,
                applied: None,
                scratch: [Patch::new(0, placeholder, placeholder); N],
            }),
        }
    }

    /// The name of feature `bit`.
    pub fn feature_name(&self, bit: u16) -> &'static str {
        self.names
            .iter()
            .find(|(b, _)| *b == bit)
            .map_or("?", |(_, name)| name)
    }

    fn check(&self, tables: &Tables) -> Result<(), AltError<T::Insn>> {
        let bounds = Bounds {
            text: self.text.text_range(),
            nopatch: tables.nopatch.clone(),
            protected: self.text.protected_ranges(),
            known: self
                .names
                .iter()
                .fold(Features::NONE, |set, (bit, _)| set.with(*bit)),
        };
        check_table(tables.boot, Class::Boot, &bounds)?;
        check_table(tables.runtime, Class::Runtime, &bounds)
    }

    /// Checks both tables, records the original bytes and writes the boot table's
    /// sites as `features` call for. A bad table is refused whole: nothing is
    /// written. Returns the chunks written.
    ///
    /// # Safety
    /// As [`apply_boot`]: no other CPU runs yet. The caller synchronises its own
    /// instruction stream afterwards (arm64 ISB, x86 a serialising instruction).
    pub unsafe fn apply_boot(
        &self,
        tables: &Tables,
        features: Features,
    ) -> Result<usize, AltError<T::Insn>> {
        let mut state = self.state.lock();
        let state = &mut *state;
        state.features = features;
        let checked = self.check(tables);
        state.checked = Some(checked);
        checked?;
        state.boot = Snapshot::take(self.text, tables.boot);
        state.runtime = Snapshot::take(self.text, tables.runtime);
        // SAFETY: forwarded from the caller; the table was checked.
        let written = unsafe {
            apply_boot(
                self.text,
                tables.boot,
                &state.boot,
                features,
                &mut state.scratch,
            )
        };
        if let Err(err) = written {
            state.checked = Some(Err(err));
        }
        written
    }

    fn runtime_locked<A: Arch>(
        &self,
        state: &mut State<T::Insn, N>,
        stop: &StopMachine<A>,
        tables: &Tables,
        bench_on: bool,
    ) -> Result<usize, AltError<T::Insn>> {
        state.checked.unwrap_or(Err(AltError::NotApplied))?;
        let features = state.features.set(self.bench, bench_on);
        let report = apply_runtime(
            stop,
            self.text,
            tables.runtime,
            &state.runtime,
            features,
            &mut state.scratch,
            StopOptions::DEFAULT,
        )?;
        state.bench_on = bench_on;
        Ok(report.map_or(0, |r| r.sites))
    }

    /// Applies the runtime table through `patch_machine` (every CPU quiescent
    /// first), once every CPU is online. Returns the chunks written.
    pub fn apply_runtime<A: Arch>(
        &self,
        stop: &StopMachine<A>,
        tables: &Tables,
    ) -> Result<usize, AltError<T::Insn>> {
        let mut state = self.state.lock();
        let result = self.runtime_locked(&mut state, stop, tables, false);
        state.applied = Some(result);
        result
    }

    /// Makes the runtime table hold what the features call for with the benchmark's
    /// feature `on`, through `patch_machine`. Returns the chunks written.
    pub fn flip_bench<A: Arch>(
        &self,
        stop: &StopMachine<A>,
        tables: &Tables,
        on: bool,
    ) -> Result<usize, AltError<T::Insn>> {
        let mut state = self.state.lock();
        self.runtime_locked(&mut state, stop, tables, on)
    }

    /// The features applied, and whether both tables were accepted and applied.
    pub fn status(&self) -> (Features, Result<(), AltError<T::Insn>>) {
        let state = self.state.lock();
        let checked = state.checked.unwrap_or(Err(AltError::NotApplied));
        let applied = state.applied.unwrap_or(Err(AltError::NotApplied));
        (state.features, checked.and(applied.map(|_| ())))
    }

    /// Calls `each` with every site of both tables: what the features call for, and
    /// what the text holds.
    pub fn sites(&self, tables: &Tables, each: &mut dyn FnMut(SiteView)) {
        let state = self.state.lock();
        let runtime_features = state.features.set(self.bench, state.bench_on);
        for (class, table, snapshot, features) in [
            (Class::Boot, tables.boot, &state.boot, state.features),
            (
                Class::Runtime,
                tables.runtime,
                &state.runtime,
                runtime_features,
            ),
        ] {
            for (index, entry) in table.iter().enumerate() {
                let Some(original) = snapshot.original(index) else {
                    continue;
                };
                each(SiteView {
                    class,
                    index,
                    site: entry.site(),
                    len: usize::from(entry.site_len),
                    feature: (entry.feature, self.feature_name(entry.feature)),
                    wanted: features.has(entry.feature),
                    in_text: variant_in_text(self.text, entry, original),
                });
            }
        }
    }
}
