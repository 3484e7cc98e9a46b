//! Kernel text as the patcher sees it ([`KERNEL_TEXT`]): bounds from the linker, writes
//! through the temporary alias ([`mmu::poke_text`]), cache maintenance to the point of
//! unification ([`cache::sync_icache_range`]).

use super::{cache, layout, mmu};
pub use crate::arch::kernel_text::{KERNEL_TEXT, KernelText};
use crate::arch::write_probe::call_write_probe;
use crate::patch::insn::Insn;
use crate::patch::plan::Run;
use crate::patch::{Patch, Text};
use core::ops::Range;

/// Words [`KernelText::write_batch`] writes under one mapping of the alias at most.
const WORDS_PER_MAPPING: usize = 64;

/// A plan's run as the instruction words it holds: `None` unless `bytes` is 4-byte
/// aligned and whole words long (a plan's buffers are 8-byte aligned and every A64
/// instruction is 4 bytes, so it always is).
#[inline(always)]
fn words(bytes: &[u8]) -> Option<&[u32]> {
    // SAFETY: every bit pattern is a valid u32; `align_to` only reinterprets the aligned
    // middle, and the check below refuses any unaligned head or tail.
    let (head, words, tail) = unsafe { bytes.align_to::<u32>() };
    (head.is_empty() && tail.is_empty()).then_some(words)
}

// SAFETY: the bounds come from the linker script, whose text output section holds every
// executable input section; `.text.nopatch` (exception vectors, IRQ entry, the stop IPI
// handler, masking, cache maintenance, the alias writer) and boot code are the protected
// range; `mmu::poke_text` writes one aligned word through a temporary alias and never
// makes text writable; `cache::sync_icache_range` is DC CVAU, DSB ISH, IC IVAU, DSB ISH.
unsafe impl Text for KernelText {
    type Insn = Insn;

    fn text_range(&self) -> Range<usize> {
        layout::text_range()
    }

    fn protected_ranges(&self) -> &[Range<usize>] {
        // Boot code is inside the nopatch range; the kprobes' hit path and XOL slots
        // are written only by their own code.
        self.protected(|| [layout::nopatch_range(), layout::kprobes_range()])
    }

    #[unsafe(link_section = ".text.nopatch")]
    fn read_insn(&self, addr: usize, _len: usize) -> Insn {
        // SAFETY: validation established that `addr` is aligned and inside mapped text.
        unsafe { core::ptr::read_volatile(addr as *const Insn) }
    }

    #[unsafe(link_section = ".text.nopatch")]
    unsafe fn write_insn(&self, addr: usize, insn: Insn) {
        // SAFETY: forwarded from the caller (validated address; no CPU executes it
        // unless the pair is CMODX-safe or the machine is stopped).
        unsafe { mmu::poke_text(addr, insn) };
        call_write_probe();
    }

    /// Groups consecutive entries that share a page (up to `WORDS_PER_MAPPING` at a
    /// time) under one mapping of the alias, then maintains the caches once over the
    /// span they cover. Instruction order within the batch is kept.
    #[unsafe(link_section = ".text.nopatch")]
    unsafe fn write_batch(&self, batch: &[Patch]) {
        // No indexing that can panic here: a bounds-check failure would branch out of
        // `.text.nopatch` (tests/kernel_image.rs checks).
        let mut rest = batch;
        while let Some(first) = rest.first() {
            let page = first.addr & !(mmu::PAGE_SIZE - 1);
            let mut words = [(0usize, 0u32); WORDS_PER_MAPPING];
            let mut run = 0;
            let (mut low, mut high) = (usize::MAX, 0);
            for (word, patch) in words.iter_mut().zip(rest) {
                if patch.addr & !(mmu::PAGE_SIZE - 1) != page {
                    break;
                }
                *word = (patch.addr, patch.new);
                (low, high) = (low.min(patch.addr), high.max(patch.addr + 4));
                run += 1;
            }
            let (written, tail) = rest.split_at_checked(run).unwrap_or((rest, &[]));
            let words = words.get(..written.len()).unwrap_or(&[]);
            // SAFETY: forwarded from the caller; every word is in `page`.
            unsafe { mmu::poke_text_page(words) };
            call_write_probe();
            cache::sync_icache_range(low, high);
            rest = tail;
        }
    }

    /// Compares the run's text with its old bytes a word at a time, without a branch per
    /// word.
    #[unsafe(link_section = ".text.nopatch")]
    fn run_holds(&self, run: &Run<'_, Insn>) -> bool {
        let Some(old) = words(run.old) else {
            return run.entries().all(|p| self.read_insn(p.addr, 4) == p.old);
        };
        let text = run.addr as *const u32;
        // Differences OR-ed together rather than a loop that stops at the first: one
        // branch a word fewer, and under TCG each branch ends a translation block.
        let mut differ = 0;
        for (i, &old) in old.iter().enumerate() {
            // SAFETY: `prepare` placed every entry of the run in mapped text, back to
            // back from `run.addr` (4-byte aligned).
            differ |= unsafe { text.add(i).read_volatile() } ^ old;
        }
        differ == 0
    }

    /// One alias mapping per page of the run, its words stored straight from the plan,
    /// then one maintenance sweep over that page's part (`sync_icache_range`: every D
    /// line cleaned, one DSB, every I line invalidated, one DSB).
    #[unsafe(link_section = ".text.nopatch")]
    unsafe fn write_run(&self, run: &Run<'_, Insn>) {
        let Some(mut rest) = words(run.new) else {
            for patch in run.entries() {
                // SAFETY: forwarded from the caller.
                unsafe { self.write_insn(patch.addr, patch.new) };
                self.sync_icache(patch.range());
            }
            return;
        };
        let mut addr = run.addr;
        while !rest.is_empty() {
            let room = (mmu::PAGE_SIZE - (addr & (mmu::PAGE_SIZE - 1))) / 4;
            let (part, tail) = rest.split_at_checked(room).unwrap_or((rest, &[]));
            // SAFETY: forwarded from the caller; `part` ends at or before the end of
            // `addr`'s page.
            unsafe { mmu::poke_text_run(addr, part) };
            call_write_probe();
            let end = addr + 4 * part.len();
            cache::sync_icache_range(addr, end);
            addr = end;
            rest = tail;
        }
    }

    #[unsafe(link_section = ".text.nopatch")]
    fn sync_icache(&self, range: Range<usize>) {
        cache::sync_icache_range(range.start, range.end);
    }

    fn writer_lock(&self) -> &spin::Mutex<()> {
        self.writer()
    }
}
