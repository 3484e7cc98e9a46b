//! A fixed-size set of CPU indices.

use core::fmt;

/// The most CPUs the kernel supports.
///
/// The stop-machine core packs its generation, phase and acknowledgement mask into one
/// 64-bit word so that every transition is a single compare-and-swap; 32 CPUs is the
/// width of that mask.
pub const MAX_CPUS: usize = 32;

/// A set of logical CPU indices (`0..MAX_CPUS`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct CpuSet(u32);

impl CpuSet {
    /// The empty set.
    pub const EMPTY: CpuSet = CpuSet(0);

    /// A set from its bit representation (bit `n` is CPU `n`).
    pub const fn from_bits(bits: u32) -> Self {
        CpuSet(bits)
    }

    /// The bit representation (bit `n` is CPU `n`).
    pub const fn bits(self) -> u32 {
        self.0
    }

    /// The set `{cpu}`.
    ///
    /// # Panics
    /// If `cpu >= MAX_CPUS`.
    pub const fn single(cpu: usize) -> Self {
        assert!(cpu < MAX_CPUS, "CPU index out of range");
        CpuSet(1 << cpu)
    }

    /// The set `{0, 1, .., n - 1}`.
    ///
    /// # Panics
    /// If `n > MAX_CPUS`.
    pub const fn first(n: usize) -> Self {
        assert!(n <= MAX_CPUS, "CPU count out of range");
        if n == MAX_CPUS {
            CpuSet(u32::MAX)
        } else {
            CpuSet((1u32 << n) - 1)
        }
    }

    /// Whether `cpu` is in the set.
    pub const fn contains(self, cpu: usize) -> bool {
        cpu < MAX_CPUS && self.0 & (1 << cpu) != 0
    }

    /// The set with `cpu` added.
    pub const fn with(self, cpu: usize) -> Self {
        CpuSet(self.0 | CpuSet::single(cpu).0)
    }

    /// The set with `cpu` removed.
    pub const fn without(self, cpu: usize) -> Self {
        CpuSet(self.0 & !CpuSet::single(cpu).0)
    }

    /// Elements in both sets.
    pub const fn and(self, other: CpuSet) -> Self {
        CpuSet(self.0 & other.0)
    }

    /// Elements in either set.
    pub const fn or(self, other: CpuSet) -> Self {
        CpuSet(self.0 | other.0)
    }

    /// Elements of `self` not in `other`.
    pub const fn minus(self, other: CpuSet) -> Self {
        CpuSet(self.0 & !other.0)
    }

    /// Whether every element of `self` is in `other`.
    pub const fn is_subset(self, other: CpuSet) -> bool {
        self.0 & !other.0 == 0
    }

    /// Whether the set is empty.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Number of CPUs in the set.
    pub const fn len(self) -> usize {
        self.0.count_ones() as usize
    }

    /// The lowest CPU index in the set.
    pub const fn lowest(self) -> Option<usize> {
        if self.0 == 0 {
            None
        } else {
            Some(self.0.trailing_zeros() as usize)
        }
    }

    /// The CPU indices in ascending order.
    pub fn iter(self) -> impl Iterator<Item = usize> {
        (0..MAX_CPUS).filter(move |&cpu| self.contains(cpu))
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
        let mut first = true;
        let mut cpu = 0;
        while cpu < MAX_CPUS {
            if !self.contains(cpu) {
                cpu += 1;
                continue;
            }
            let start = cpu;
            while cpu + 1 < MAX_CPUS && self.contains(cpu + 1) {
                cpu += 1;
            }
            if !first {
                f.write_str(",")?;
            }
            first = false;
            if start == cpu {
                write!(f, "{start}")?;
            } else {
                write!(f, "{start}-{cpu}")?;
            }
            cpu += 1;
        }
        f.write_str("}")
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
    }
}
