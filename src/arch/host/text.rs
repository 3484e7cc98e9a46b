//! Kernel text on the host: a row of A64 words at a made-up address, so that the patch
//! API runs under `cargo test` and in the rustdoc examples with [`HostArch`] CPUs.
//!
//! [`HostArch`]: super::HostArch

use crate::patch::Text;
use crate::patch::insn::Insn;
use std::ops::Range;
use std::sync::atomic::{AtomicU32, Ordering};

/// Where the first word "lives": any 4-byte aligned address would do.
const BASE: usize = 0x4020_0000;

/// A row of instruction words that plays kernel text.
pub struct HostText {
    words: Box<[AtomicU32]>,
    protected: Range<usize>,
    writer: spin::Mutex<()>,
}

impl HostText {
    /// Text holding `words`, none of them protected.
    pub fn new(words: &[Insn]) -> Self {
        Self::with_protected(words, 0..0)
    }

    /// Text holding `words`, of which the word indices in `protected` play the code the
    /// rendezvous runs (`.text.nopatch`): validation refuses to patch them.
    pub fn with_protected(words: &[Insn], protected: Range<usize>) -> Self {
        HostText {
            words: words.iter().map(|&w| AtomicU32::new(w)).collect(),
            protected: BASE + 4 * protected.start..BASE + 4 * protected.end,
            writer: spin::Mutex::new(()),
        }
    }

    /// The address of word `index`.
    pub fn addr(&self, index: usize) -> usize {
        BASE + 4 * index
    }

    /// Word `index` as it is now.
    ///
    /// # Panics
    /// If `index` is past the end of the text.
    pub fn word(&self, index: usize) -> Insn {
        self.words[index].load(Ordering::Relaxed)
    }

    fn at(&self, addr: usize) -> &AtomicU32 {
        &self.words[(addr - BASE) / 4]
    }
}

// SAFETY: every address in `text_range` is backed by a word; a write is one atomic
// 32-bit store (single-copy atomic, as an A64 instruction write must be), and
// "instruction fetch" is an atomic load, so there is no cache to maintain.
unsafe impl Text for HostText {
    type Insn = Insn;

    fn text_range(&self) -> Range<usize> {
        BASE..BASE + 4 * self.words.len()
    }

    fn protected_ranges(&self) -> &[Range<usize>] {
        core::slice::from_ref(&self.protected)
    }

    fn read_insn(&self, addr: usize, _len: usize) -> Insn {
        self.at(addr).load(Ordering::Relaxed)
    }

    unsafe fn write_insn(&self, addr: usize, insn: Insn) {
        // Relaxed: the stop machine's phase transitions (or, on the live path, the
        // caller's own synchronisation) order the write against other CPUs' fetches.
        self.at(addr).store(insn, Ordering::Relaxed);
    }

    fn sync_icache(&self, _range: Range<usize>) {}

    fn writer_lock(&self) -> &spin::Mutex<()> {
        &self.writer
    }
}
