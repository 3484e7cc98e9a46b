//! Static keys (jump labels): a branch whose direction is changed by patching the code
//! instead of testing a flag, so that a disabled hook costs one NOP.
//!
//! The model is Linux's `include/linux/jump_label.h` and `kernel/jump_label.c`. A site
//! (`static_branch_unlikely!` / `static_branch_likely!`, defined by each architecture)
//! is one instruction, a NOP or a branch to the other arm, with a [`JumpEntry`] in the
//! `__jump_table` linker section; every [`StaticKey`] is listed in the `.static_keys`
//! section ([`define_static_key!`](crate::define_static_key)). [`StaticKeys`] owns the update lock and flips a key
//! by patching all of its sites as one batch through the architecture's live path
//! ([`KeyText::patch`]: arm64 `patch_nosync` with one synchronisation for the batch,
//! x86 the INT3 protocol with one set of syncs).
//!
//! This module knows no architecture: the encodings, the tables and the patching come
//! through [`KeyText`], so the host tests drive it with an array as text.
//!
//! # Ordering
//!
//! Every change of a key's count happens under the update lock, which is held across
//! the patch: counts and text always agree when the lock is free. A 0 -> 1 or 1 -> 0
//! change patches first and then stores the count with `Release`; [`StaticKey::count`]
//! loads it with `Acquire`, so whoever sees the new count finds every site patched (the
//! count follows the text, in both directions). Other changes (1 -> 2, 2 -> 1) touch
//! only the count.

use crate::patch::{Instruction, Patch, PatchError};
use crate::stop::{LockTimeout, lock_within};
use core::fmt;
use core::ops::Range;
use core::sync::atomic::{AtomicUsize, Ordering};

/// A key: its sites take the "enabled" arm while the count is non-zero. Define one with
/// [`define_static_key!`](crate::define_static_key) so that it is in the key table; a key that is not is refused.
#[derive(Debug)]
pub struct StaticKey {
    name: &'static str,
    count: AtomicUsize,
}

impl StaticKey {
    /// A disabled key (count 0). Every site of it starts in the disabled direction.
    pub const fn new(name: &'static str) -> StaticKey {
        StaticKey {
            name,
            count: AtomicUsize::new(0),
        }
    }

    /// The name the key was defined with (`static_keys=` and error messages use it).
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The reference count. Acquire pairs with the Release store after a patch: a
    /// reader that sees a count of 0 or 1 finds the text patched accordingly.
    pub fn count(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    /// Whether the count is non-zero (slow: a load, not a patched branch).
    pub fn is_enabled(&self) -> bool {
        self.count() != 0
    }

    fn addr(&self) -> usize {
        self as *const StaticKey as usize
    }
}

/// Defines a [`StaticKey`] and lists it in the key table (`.static_keys`), e.g.
/// `define_static_key!(pub TRACE_JOBS, "trace_jobs");`.
#[macro_export]
macro_rules! define_static_key {
    ($(#[$attr:meta])* $vis:vis $key:ident, $name:expr) => {
        $(#[$attr])*
        $vis static $key: $crate::static_key::StaticKey = $crate::static_key::StaticKey::new($name);
        const _: () = {
            #[used]
            #[unsafe(link_section = ".static_keys")]
            static ENTRY: &$crate::static_key::StaticKey = &$key;
        };
    };
}

/// Which arm of a site is laid out straight after it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BranchKind {
    /// `static_branch_unlikely!`: falls through to "disabled"; a NOP while disabled.
    Unlikely = 0,
    /// `static_branch_likely!`: falls through to "enabled"; a NOP while enabled.
    Likely = 1,
}

/// One site, as the branch macros record it in `__jump_table` (four 64-bit words).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JumpEntry {
    /// Address of the site's instruction.
    pub site: usize,
    /// Where the branch goes (the arm that is not laid out after the site).
    pub target: usize,
    /// Address of the [`StaticKey`].
    pub key: usize,
    /// [`BranchKind`] as a number.
    pub kind: usize,
}

impl JumpEntry {
    /// Whether the site is a branch (not a NOP) when the key is `enabled`.
    pub fn branches_when(&self, enabled: bool) -> bool {
        enabled != (self.kind == BranchKind::Likely as usize)
    }
}

/// Why a key operation or the tables were refused; nothing changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyError<I: Instruction> {
    /// [`StaticKeys::dec`] on a key whose count is 0.
    Underflow {
        /// The key's name.
        key: &'static str,
    },
    /// The count would wrap.
    Overflow {
        /// The key's name.
        key: &'static str,
    },
    /// The address given is not a key of the key table.
    UnknownKey {
        /// The address.
        addr: usize,
    },
    /// A site names an address that is not a key of the key table.
    SiteUnknownKey {
        /// The site.
        site: usize,
        /// The address it names.
        key: usize,
    },
    /// A site has a kind that is neither likely nor unlikely.
    SiteBadKind {
        /// The site.
        site: usize,
        /// The kind recorded.
        kind: usize,
    },
    /// A site lies outside kernel text.
    SiteOutsideText {
        /// The site.
        site: usize,
        /// Its key's name.
        key: &'static str,
    },
    /// A site lies in code that must never be patched (`.text.nopatch`, boot text).
    SiteProtected {
        /// The site.
        site: usize,
        /// Its key's name.
        key: &'static str,
        /// The protected range.
        range: (usize, usize),
    },
    /// The branch from a site to its target cannot be encoded.
    SiteBranch {
        /// The site.
        site: usize,
        /// Its key's name.
        key: &'static str,
        /// Why.
        why: &'static str,
    },
    /// A key has more sites than one batch holds.
    TooManySites {
        /// The key's name.
        key: &'static str,
        /// Its sites.
        sites: usize,
        /// What a batch holds.
        max: usize,
    },
    /// Another CPU held the key-update lock for the whole timeout.
    Busy {
        /// How long the caller waited.
        waited_ns: u64,
    },
    /// Every site was written, but some CPU did not acknowledge the synchronisation
    /// in time: it runs the new code from its next context synchronisation on. The
    /// count was updated (it agrees with the text).
    NotSynced {
        /// The key's name.
        key: &'static str,
        /// What the patcher said.
        error: PatchError<I>,
    },
    /// The patcher refused the batch; nothing changed.
    Patch {
        /// The key's name.
        key: &'static str,
        /// What the patcher said.
        error: PatchError<I>,
    },
}

impl<I: Instruction> fmt::Display for KeyError<I> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            KeyError::Underflow { key } => {
                write!(f, "static key {key}: dec with count 0 (unbalanced inc/dec)")
            }
            KeyError::Overflow { key } => write!(f, "static key {key}: count overflow"),
            KeyError::UnknownKey { addr } => {
                write!(f, "{addr:#x} is not a static key (not in the key table)")
            }
            KeyError::SiteUnknownKey { site, key } => write!(
                f,
                "jump site {site:#x} names {key:#x}, which is not a static key"
            ),
            KeyError::SiteBadKind { site, kind } => {
                write!(f, "jump site {site:#x}: unknown branch kind {kind}")
            }
            KeyError::SiteOutsideText { site, key } => {
                write!(f, "jump site {site:#x} of key {key}: outside kernel text")
            }
            KeyError::SiteProtected { site, key, range } => write!(
                f,
                "jump site {site:#x} of key {key}: in code that is never patched \
                 ({:#x}..{:#x}: .text.nopatch or boot text); move the site out",
                range.0, range.1
            ),
            KeyError::SiteBranch { site, key, why } => {
                write!(f, "jump site {site:#x} of key {key}: {why}")
            }
            KeyError::TooManySites { key, sites, max } => write!(
                f,
                "static key {key}: {sites} sites, more than one batch holds ({max})"
            ),
            KeyError::Busy { waited_ns } => write!(
                f,
                "the static key update lock was held for {} us; nothing changed",
                waited_ns / 1000
            ),
            KeyError::NotSynced { key, error } => write!(
                f,
                "static key {key}: sites written, but not every CPU synchronised: {error}"
            ),
            KeyError::Patch { key, error } => {
                write!(f, "static key {key}: nothing changed: {error}")
            }
        }
    }
}

/// What flipping keys needs from the architecture and the image.
pub trait KeyText {
    /// The instruction encoding.
    type Insn: Instruction;

    /// Every site (the `__jump_table` section).
    fn entries(&self) -> &[JumpEntry];
    /// Every key (the `.static_keys` section).
    fn keys(&self) -> &[&StaticKey];
    /// All kernel text.
    fn text_range(&self) -> Range<usize>;
    /// Text that is never patched.
    fn protected_ranges(&self) -> &[Range<usize>];
    /// The site's instruction when it falls through.
    fn nop(&self) -> Self::Insn;
    /// The site's instruction when it branches from `site` to `target`.
    fn branch(&self, site: usize, target: usize) -> Result<Self::Insn, &'static str>;
    /// Patches `batch` while other CPUs may run it; when this returns `Ok`, every CPU
    /// executes the new instructions from its next instruction fetch on.
    fn patch(&self, batch: &[Patch<Self::Insn>]) -> Result<(), PatchError<Self::Insn>>;
    /// The instruction at `site` now (after a failed [`patch`](Self::patch): was it
    /// written?).
    fn read(&self, site: usize) -> Self::Insn;
    /// A clock for the bounded lock wait.
    fn now_ns(&self) -> u64;
    /// A spin hint for the lock wait (lets an emulator run the holder).
    fn relax(&self);
}

/// How long a key operation waits for the update lock.
pub const LOCK_TIMEOUT_NS: u64 = 2_000_000_000;

/// The key table of one text: the update lock and the batch buffer (the kernel has no
/// heap: a key has at most `N` sites).
///
/// Key operations wait (bounded) for the update lock and for every other CPU to
/// synchronise, with interrupts as the caller left them: call them with interrupts
/// enabled, never from an interrupt or NMI handler (Linux's `static_key_enable` may
/// sleep for the same reason).
pub struct StaticKeys<T: KeyText, const N: usize> {
    text: T,
    /// The update lock, and the batch being built under it.
    batch: spin::Mutex<[Patch<T::Insn>; N]>,
    checked: spin::Once<Result<(), KeyError<T::Insn>>>,
    flips: AtomicUsize,
}

impl<T: KeyText, const N: usize> StaticKeys<T, N> {
    /// The tables of `text`; `filler` only fills the unused part of the batch buffer.
    pub const fn new(text: T, filler: T::Insn) -> Self {
        StaticKeys {
            text,
            batch: spin::Mutex::new([Patch::new(0, filler, filler); N]),
            checked: spin::Once::new(),
            flips: AtomicUsize::new(0),
        }
    }

    /// The text and tables.
    pub fn text(&self) -> &T {
        &self.text
    }

    /// Batches patched so far (0 -> 1 and 1 -> 0 changes).
    pub fn flips(&self) -> usize {
        self.flips.load(Ordering::Relaxed)
    }

    /// Checks both tables once (at the first key operation, or at boot): every site
    /// names a key of the key table, lies in patchable text and can branch to its
    /// target, and no key has more sites than a batch holds. The first problem is
    /// returned, every time, and no key can then change.
    pub fn check(&self) -> Result<(), KeyError<T::Insn>> {
        *self.checked.call_once(|| check_tables(&self.text, N))
    }

    /// The key at `addr`, if the key table has it.
    pub fn find(&self, addr: usize) -> Option<&StaticKey> {
        self.text.keys().iter().copied().find(|k| k.addr() == addr)
    }

    /// The key named `name`, if the key table has it.
    pub fn by_name(&self, name: &str) -> Option<&StaticKey> {
        self.text.keys().iter().copied().find(|k| k.name == name)
    }

    /// The sites of `key`.
    pub fn sites<'a>(&'a self, key: &StaticKey) -> impl Iterator<Item = &'a JumpEntry> + 'a {
        let addr = key.addr();
        self.text.entries().iter().filter(move |e| e.key == addr)
    }

    /// Sets the count to 1 if it is 0 (patching every site), else leaves it.
    pub fn enable(&self, key: &StaticKey) -> Result<(), KeyError<T::Insn>> {
        self.update(key, |count| Ok(if count == 0 { 1 } else { count }))
    }

    /// Sets the count to 0 (patching every site if it was not 0).
    pub fn disable(&self, key: &StaticKey) -> Result<(), KeyError<T::Insn>> {
        self.update(key, |_| Ok(0))
    }

    /// Adds a reference; the sites are patched on 0 -> 1 only.
    pub fn inc(&self, key: &StaticKey) -> Result<(), KeyError<T::Insn>> {
        let name = key.name;
        self.update(key, |count| {
            count.checked_add(1).ok_or(KeyError::Overflow { key: name })
        })
    }

    /// Drops a reference; the sites are patched on 1 -> 0 only. At 0 it is refused
    /// ([`KeyError::Underflow`]) and nothing changes.
    pub fn dec(&self, key: &StaticKey) -> Result<(), KeyError<T::Insn>> {
        let name = key.name;
        self.update(key, |count| {
            count
                .checked_sub(1)
                .ok_or(KeyError::Underflow { key: name })
        })
    }

    /// Under the update lock: the new count from the old, and the patch when the key
    /// changes between enabled and disabled.
    fn update(
        &self,
        key: &StaticKey,
        next: impl FnOnce(usize) -> Result<usize, KeyError<T::Insn>>,
    ) -> Result<(), KeyError<T::Insn>> {
        self.check()?;
        let Some(key) = self.find(key.addr()) else {
            return Err(KeyError::UnknownKey { addr: key.addr() });
        };
        let mut batch = lock_within(
            &self.batch,
            "the static key update lock",
            LOCK_TIMEOUT_NS,
            || self.text.now_ns(),
            || self.text.relax(),
        )
        .map_err(|LockTimeout { waited_ns, .. }| KeyError::Busy { waited_ns })?;
        // Relaxed: every store to the count happens under the lock we hold.
        let count = key.count.load(Ordering::Relaxed);
        let new = next(count)?;
        if (count == 0) != (new == 0) {
            let len = build_batch(&self.text, key, new != 0, &mut batch[..])?;
            let batch = &batch[..len];
            if !batch.is_empty()
                && let Err(error) = self.text.patch(batch)
            {
                // Only a failed synchronisation can leave the batch written; any other
                // error is a refusal made before the first write.
                let written = matches!(error, PatchError::Stop(_))
                    && batch.iter().all(|p| self.text.read(p.addr) == p.new);
                if !written {
                    return Err(KeyError::Patch {
                        key: key.name,
                        error,
                    });
                }
                // Written, not synchronised everywhere: the count follows the text.
                key.count.store(new, Ordering::Release);
                self.flips.fetch_add(1, Ordering::Relaxed);
                return Err(KeyError::NotSynced {
                    key: key.name,
                    error,
                });
            }
            self.flips.fetch_add(1, Ordering::Relaxed);
        }
        // Release pairs with the Acquire in `StaticKey::count`: the patch is complete
        // before the new count can be seen.
        key.count.store(new, Ordering::Release);
        Ok(())
    }
}

/// The checks of [`StaticKeys::check`] over `text`'s tables, with batches of `max`.
pub fn check_tables<T: KeyText>(text: &T, max: usize) -> Result<(), KeyError<T::Insn>> {
    let keys = text.keys();
    let range = text.text_range();
    for entry in text.entries() {
        let site = entry.site;
        let Some(key) = keys.iter().find(|k| k.addr() == entry.key) else {
            return Err(KeyError::SiteUnknownKey {
                site,
                key: entry.key,
            });
        };
        if entry.kind > BranchKind::Likely as usize {
            return Err(KeyError::SiteBadKind {
                site,
                kind: entry.kind,
            });
        }
        let len = text.nop().size();
        if !(range.start <= site && site.saturating_add(len) <= range.end) {
            return Err(KeyError::SiteOutsideText {
                site,
                key: key.name,
            });
        }
        if let Some(r) = text
            .protected_ranges()
            .iter()
            .find(|r| r.start < site + len && site < r.end)
        {
            return Err(KeyError::SiteProtected {
                site,
                key: key.name,
                range: (r.start, r.end),
            });
        }
        if let Err(why) = text.branch(site, entry.target) {
            return Err(KeyError::SiteBranch {
                site,
                key: key.name,
                why,
            });
        }
    }
    for key in keys {
        let sites = text
            .entries()
            .iter()
            .filter(|e| e.key == key.addr())
            .count();
        if sites > max {
            return Err(KeyError::TooManySites {
                key: key.name,
                sites,
                max,
            });
        }
    }
    Ok(())
}

/// Fills `out` with the patches that take every site of `key` to `enabled`, sorted by
/// address (so the patcher maps each page once and validation skips its overlap
/// search); returns how many. The tables passed [`check_tables`].
pub fn build_batch<T: KeyText>(
    text: &T,
    key: &StaticKey,
    enabled: bool,
    out: &mut [Patch<T::Insn>],
) -> Result<usize, KeyError<T::Insn>> {
    let nop = text.nop();
    let mut len = 0;
    for entry in text.entries().iter().filter(|e| e.key == key.addr()) {
        let branch = text
            .branch(entry.site, entry.target)
            .map_err(|why| KeyError::SiteBranch {
                site: entry.site,
                key: key.name,
                why,
            })?;
        let (old, new) = if entry.branches_when(enabled) {
            (nop, branch)
        } else {
            (branch, nop)
        };
        let slot = out.get_mut(len).ok_or(KeyError::TooManySites {
            key: key.name,
            sites: len + 1,
            max: len,
        })?;
        *slot = Patch::new(entry.site, old, new);
        len += 1;
    }
    out[..len].sort_unstable_by_key(|p| p.addr);
    Ok(len)
}
