//! Which cache lines an arm64 text write must clean and invalidate to the point of
//! unification, decided from CTR_EL0 alone.
//!
//! Plain arithmetic, like [`insn`](super::insn)'s encoders, so that the host tests the
//! decision QEMU's TCG cannot observe (it keeps instruction fetch coherent whatever the
//! kernel does): `src/arch/aarch64/cache.rs` executes the plan (`DC CVAU` over
//! [`Plan::clean`], `DSB ISH`, `IC IVAU` over [`Plan::invalidate`], `DSB ISH`), and
//! `tests/kernel_image.rs` checks that order in the built image.
//!
//! The rule is CTR_EL0's, in the Arm ARM (DDI 0487): with CTR_EL0.IDC the data side
//! needs no clean to the PoU, with CTR_EL0.DIC the instruction side needs no
//! invalidation; the barriers stay in either case.

use core::ops::Range;

/// The CTR_EL0 fields the maintenance depends on, decoded (the arch reads the register).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheType {
    /// Smallest data cache line in bytes (4 << DminLine): a power of two.
    pub dcache_line: usize,
    /// Smallest instruction cache line in bytes (4 << IminLine): a power of two.
    pub icache_line: usize,
    /// CTR_EL0.IDC: a data cache clean to the PoU is not needed for instruction
    /// coherence.
    pub idc: bool,
    /// CTR_EL0.DIC: an instruction cache invalidation to the PoU is not needed.
    pub dic: bool,
}

/// The line addresses of one sweep by virtual address: `first`, `first + line`, ...
/// while below `end`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lines {
    /// The first line's address (the range's start, aligned down to `line`).
    pub first: usize,
    /// The end of the range (exclusive).
    pub end: usize,
    /// The line size in bytes (a power of two).
    pub line: usize,
}

impl Lines {
    #[inline(always)]
    const fn covering(range: &Range<usize>, line: usize) -> Lines {
        Lines {
            first: range.start & !(line - 1),
            end: range.end,
            line,
        }
    }
}

impl Iterator for Lines {
    type Item = usize;

    #[inline(always)]
    fn next(&mut self) -> Option<usize> {
        if self.first >= self.end {
            return None;
        }
        let addr = self.first;
        // Saturating: a range ending at the top of the address space stops there.
        self.first = self.first.saturating_add(self.line);
        Some(addr)
    }
}

/// The maintenance that makes instructions written to a range visible to instruction
/// fetch: `None` for a side CTR_EL0 says needs none (or for an empty range).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    /// The lines to clean to the PoU (`DC CVAU`), by data cache line.
    pub clean: Option<Lines>,
    /// The lines to invalidate to the PoU (`IC IVAU`), by instruction cache line.
    pub invalidate: Option<Lines>,
}

/// The plan for `range` on a CPU whose CTR_EL0 says `ctr`.
#[inline(always)]
pub const fn plan(ctr: CacheType, range: Range<usize>) -> Plan {
    if range.start >= range.end {
        return Plan {
            clean: None,
            invalidate: None,
        };
    }
    Plan {
        clean: if ctr.idc {
            None
        } else {
            Some(Lines::covering(&range, ctr.dcache_line))
        },
        invalidate: if ctr.dic {
            None
        } else {
            Some(Lines::covering(&range, ctr.icache_line))
        },
    }
}
