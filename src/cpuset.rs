//! Sets of CPU indices: [`CpuSet`], a fixed bitmap passed by value, and
//! [`AtomicCpuSet`], the same bitmap shared between CPUs one atomic word at a time.
//!
//! Hand-written rather than a bitset crate: the set must be `Copy`, `const`-constructible
//! and usable from `no_std` code in `.text.nopatch` without allocation, with atomics of
//! caller-chosen orderings per word, which none of the common crates offers together.

use crate::sync::{AtomicU64, Ordering, atomic_array, const_unless_loom};
use core::fmt;

/// The most CPUs the kernel supports: QEMU `virt`'s limit (GICv3, 512 vCPUs), above
/// q35's with x2APIC, and Linux arm64's default `NR_CPUS`.
#[cfg(not(loom))]
pub const MAX_CPUS: usize = 512;
/// Under the loom model check: one word of CPUs, so that a model builds a handful of
/// loom atomics per call rather than thousands.
#[cfg(loom)]
pub const MAX_CPUS: usize = 64;

const WORD_BITS: usize = u64::BITS as usize;
/// Words in a [`CpuSet`].
const WORDS: usize = MAX_CPUS / WORD_BITS;
const _: () = assert!(
    MAX_CPUS.is_multiple_of(WORD_BITS),
    "MAX_CPUS must be a multiple of 64"
);

/// A set of logical CPU indices (`0..MAX_CPUS`): a bitmap of `MAX_CPUS / 64` words, bit
/// `n % 64` of word `n / 64` for CPU `n`. `Copy` (64 bytes); iteration walks the words
/// and their set bits only.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct CpuSet([u64; WORDS]);

impl CpuSet {
    /// The empty set.
    pub const EMPTY: CpuSet = CpuSet([0; WORDS]);

    /// The set `{cpu}`.
    ///
    /// # Panics
    /// If `cpu >= MAX_CPUS`.
    #[inline(always)]
    pub const fn single(cpu: usize) -> Self {
        CpuSet::EMPTY.with(cpu)
    }

    /// The set of the CPUs in `cpus`.
    ///
    /// # Panics
    /// If any of them is `>= MAX_CPUS`.
    #[inline(always)]
    pub const fn of(cpus: &[usize]) -> Self {
        let mut set = CpuSet::EMPTY;
        let mut i = 0;
        while i < cpus.len() {
            set = set.with(cpus[i]);
            i += 1;
        }
        set
    }

    /// The set `{0, 1, .., n - 1}`.
    ///
    /// # Panics
    /// If `n > MAX_CPUS`.
    #[inline(always)]
    pub const fn first(n: usize) -> Self {
        assert!(n <= MAX_CPUS, "CPU count out of range");
        let mut words = [0; WORDS];
        let mut w = 0;
        while w < WORDS {
            let from = w * WORD_BITS;
            words[w] = if n >= from + WORD_BITS {
                u64::MAX
            } else if n > from {
                (1 << (n - from)) - 1
            } else {
                0
            };
            w += 1;
        }
        CpuSet(words)
    }

    /// Whether `cpu` is in the set (`false` for an index out of range).
    #[inline(always)]
    pub const fn contains(self, cpu: usize) -> bool {
        cpu < MAX_CPUS && self.0[cpu / WORD_BITS] & bit(cpu) != 0
    }

    /// The set with `cpu` added.
    ///
    /// # Panics
    /// If `cpu >= MAX_CPUS`.
    #[inline(always)]
    pub const fn with(mut self, cpu: usize) -> Self {
        assert!(cpu < MAX_CPUS, "CPU index out of range");
        self.0[cpu / WORD_BITS] |= bit(cpu);
        self
    }

    /// The set with `cpu` removed (unchanged for an index out of range).
    #[inline(always)]
    pub const fn without(mut self, cpu: usize) -> Self {
        if cpu < MAX_CPUS {
            self.0[cpu / WORD_BITS] &= !bit(cpu);
        }
        self
    }

    /// Elements in both sets.
    #[inline(always)]
    pub const fn and(self, other: CpuSet) -> Self {
        self.zip(other, Op::And)
    }

    /// Elements in either set.
    #[inline(always)]
    pub const fn or(self, other: CpuSet) -> Self {
        self.zip(other, Op::Or)
    }

    /// Elements of `self` not in `other`.
    #[inline(always)]
    pub const fn minus(self, other: CpuSet) -> Self {
        self.zip(other, Op::Minus)
    }

    /// Whether every element of `self` is in `other`.
    #[inline(always)]
    pub const fn is_subset(self, other: CpuSet) -> bool {
        self.minus(other).is_empty()
    }

    /// Whether the set is empty.
    #[inline(always)]
    pub const fn is_empty(self) -> bool {
        let mut w = 0;
        while w < WORDS {
            if self.0[w] != 0 {
                return false;
            }
            w += 1;
        }
        true
    }

    /// Number of CPUs in the set.
    #[inline(always)]
    pub const fn len(self) -> usize {
        let mut n = 0;
        let mut w = 0;
        while w < WORDS {
            n += self.0[w].count_ones() as usize;
            w += 1;
        }
        n
    }

    /// The lowest CPU index in the set.
    #[inline(always)]
    pub const fn lowest(self) -> Option<usize> {
        let mut w = 0;
        while w < WORDS {
            if self.0[w] != 0 {
                return Some(w * WORD_BITS + self.0[w].trailing_zeros() as usize);
            }
            w += 1;
        }
        None
    }

    /// The CPU indices in ascending order.
    #[inline(always)]
    pub fn iter(self) -> Iter {
        Iter {
            set: self,
            word: 0,
            bits: self.0[0],
        }
    }

    #[inline(always)]
    const fn zip(mut self, other: CpuSet, op: Op) -> Self {
        let mut w = 0;
        while w < WORDS {
            self.0[w] = match op {
                Op::And => self.0[w] & other.0[w],
                Op::Or => self.0[w] | other.0[w],
                Op::Minus => self.0[w] & !other.0[w],
            };
            w += 1;
        }
        self
    }
}

#[derive(Clone, Copy)]
enum Op {
    And,
    Or,
    Minus,
}

#[inline(always)]
const fn bit(cpu: usize) -> u64 {
    1 << (cpu % WORD_BITS)
}

impl IntoIterator for CpuSet {
    type Item = usize;
    type IntoIter = Iter;

    fn into_iter(self) -> Iter {
        self.iter()
    }
}

/// The CPUs of a [`CpuSet`] in ascending order, word by word.
#[derive(Clone)]
pub struct Iter {
    set: CpuSet,
    word: usize,
    /// The bits of `word` not yet returned.
    bits: u64,
}

impl Iterator for Iter {
    type Item = usize;

    #[inline(always)]
    fn next(&mut self) -> Option<usize> {
        while self.bits == 0 {
            self.word += 1;
            self.bits = *self.set.0.get(self.word)?;
        }
        let cpu = self.word * WORD_BITS + self.bits.trailing_zeros() as usize;
        self.bits &= self.bits - 1;
        Some(cpu)
    }
}

impl fmt::Debug for CpuSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Formats as a Linux cpulist: `{0-2,5}`.
impl fmt::Display for CpuSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("{")?;
        let mut cpus = self.iter().peekable();
        let mut first = true;
        while let Some(start) = cpus.next() {
            let mut end = start;
            while cpus.next_if_eq(&(end + 1)).is_some() {
                end += 1;
            }
            if !first {
                f.write_str(",")?;
            }
            first = false;
            if start == end {
                write!(f, "{start}")?;
            } else {
                write!(f, "{start}-{end}")?;
            }
        }
        f.write_str("}")
    }
}

/// A [`CpuSet`] shared between CPUs: one [`AtomicU64`] per 64 CPUs.
///
/// Each operation on one CPU is a single atomic read-modify-write (or load) of its word,
/// with the ordering the caller passes, whose comment says what it pairs with.
/// [`load`](Self::load), [`store`](Self::store) and [`clear`](Self::clear) touch every
/// word one after the other: a snapshot is atomic per word, not for the whole set. A
/// reader racing with writers of several words may see a set that never existed at
/// one instant; use it where each CPU only ever changes its own bit, or where the
/// writers are quiescent (ordered before the load by some other acquire).
pub struct AtomicCpuSet([AtomicU64; WORDS]);

impl AtomicCpuSet {
    const_unless_loom! {
        /// The empty set.
        #[inline(always)]
        pub const fn new() -> Self {
            AtomicCpuSet(atomic_array![AtomicU64::new(0); WORDS])
        }
    }

    #[inline(always)]
    fn word(&self, cpu: usize) -> &AtomicU64 {
        assert!(cpu < MAX_CPUS, "CPU index out of range");
        &self.0[cpu / WORD_BITS]
    }

    /// Adds `cpu`; returns whether it was already in the set.
    ///
    /// # Panics
    /// If `cpu >= MAX_CPUS`.
    #[inline(always)]
    pub fn insert(&self, cpu: usize, order: Ordering) -> bool {
        self.word(cpu).fetch_or(bit(cpu), order) & bit(cpu) != 0
    }

    /// Removes `cpu`; returns whether it was in the set (a test-and-clear).
    ///
    /// # Panics
    /// If `cpu >= MAX_CPUS`.
    #[inline(always)]
    pub fn remove(&self, cpu: usize, order: Ordering) -> bool {
        self.word(cpu).fetch_and(!bit(cpu), order) & bit(cpu) != 0
    }

    /// Whether `cpu` is in the set (`false` for an index out of range).
    #[inline(always)]
    pub fn contains(&self, cpu: usize, order: Ordering) -> bool {
        self.0
            .get(cpu / WORD_BITS)
            .is_some_and(|w| w.load(order) & bit(cpu) != 0)
    }

    /// A snapshot, each word loaded with `order` (see the type's doc: per word atomic).
    #[inline(always)]
    pub fn load(&self, order: Ordering) -> CpuSet {
        let mut set = CpuSet::EMPTY;
        for (out, word) in set.0.iter_mut().zip(&self.0) {
            *out = word.load(order);
        }
        set
    }

    /// Replaces the set by `set`, each word stored with `order`.
    #[inline(always)]
    pub fn store(&self, set: CpuSet, order: Ordering) {
        for (word, value) in self.0.iter().zip(set.0) {
            word.store(value, order);
        }
    }

    /// Empties the set, each word stored with `order`.
    #[inline(always)]
    pub fn clear(&self, order: Ordering) {
        self.store(CpuSet::EMPTY, order);
    }
}

impl Default for AtomicCpuSet {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for AtomicCpuSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.load(Ordering::Relaxed), f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn displays_as_cpulist() {
        let set = CpuSet::first(3).with(5).with(7).with(8);
        assert_eq!(format!("{set}"), "{0-2,5,7-8}");
        assert_eq!(format!("{}", CpuSet::EMPTY), "{}");
        assert_eq!(CpuSet::first(32).len(), 32);
        let wide = CpuSet::first(70).minus(CpuSet::first(60)).with(511);
        assert_eq!(format!("{wide}"), "{60-69,511}");
        assert_eq!(format!("{}", CpuSet::first(MAX_CPUS)), "{0-511}");
    }

    #[test]
    fn operations_cross_word_boundaries() {
        for n in [0, 1, 63, 64, 65, 127, 128, 300, MAX_CPUS] {
            let set = CpuSet::first(n);
            assert_eq!(set.len(), n, "first({n})");
            assert_eq!(set.iter().collect::<Vec<_>>(), (0..n).collect::<Vec<_>>());
            assert_eq!(set.lowest(), (n > 0).then_some(0));
            assert_eq!(set.is_empty(), n == 0);
        }
        let a = CpuSet::of(&[0, 63, 64, 200, 511]);
        let b = CpuSet::of(&[63, 64, 65, 511]);
        assert_eq!(a.and(b), CpuSet::of(&[63, 64, 511]));
        assert_eq!(a.or(b), CpuSet::of(&[0, 63, 64, 65, 200, 511]));
        assert_eq!(a.minus(b), CpuSet::of(&[0, 200]));
        assert!(a.and(b).is_subset(a) && !a.is_subset(b));
        assert_eq!(a.minus(CpuSet::single(0)).lowest(), Some(63));
        assert_eq!(CpuSet::single(511).lowest(), Some(511));
        assert!(a.contains(200) && !a.contains(201) && !a.contains(MAX_CPUS));
        assert_eq!(
            a.without(200).without(MAX_CPUS),
            a.minus(CpuSet::single(200))
        );
        assert_eq!(a.into_iter().collect::<Vec<_>>(), [0, 63, 64, 200, 511]);
    }

    #[test]
    #[should_panic(expected = "CPU index out of range")]
    fn single_refuses_an_index_out_of_range() {
        let _ = CpuSet::single(MAX_CPUS);
    }

    #[test]
    fn atomic_set_matches_the_plain_one() {
        let shared = AtomicCpuSet::new();
        assert!(!shared.insert(3, Ordering::Relaxed));
        assert!(shared.insert(3, Ordering::Relaxed));
        assert!(!shared.insert(450, Ordering::Relaxed));
        assert!(shared.contains(450, Ordering::Relaxed));
        assert!(!shared.contains(MAX_CPUS, Ordering::Relaxed));
        assert_eq!(shared.load(Ordering::Relaxed), CpuSet::of(&[3, 450]));
        assert!(shared.remove(3, Ordering::Relaxed));
        assert!(!shared.remove(3, Ordering::Relaxed));
        shared.store(CpuSet::first(100), Ordering::Relaxed);
        assert_eq!(shared.load(Ordering::Relaxed), CpuSet::first(100));
        shared.clear(Ordering::Relaxed);
        assert_eq!(shared.load(Ordering::Relaxed), CpuSet::EMPTY);
    }
}
