//! Kernel text as the patcher sees it: bounds from the linker, writes through the
//! temporary alias, cache maintenance to the point of unification.

use super::platform::{self, Insn};
#[cfg(target_arch = "aarch64")]
use crate::arch::aarch64::{cache, mmu};
use crate::patch::{Patch, Text};
use core::ops::Range;
use core::sync::atomic::{AtomicUsize, Ordering};

/// A function called right after every text write, inside the patch window (0: none).
/// Only the self-tests set it, to prove what can and cannot happen in the window.
static WRITE_PROBE: AtomicUsize = AtomicUsize::new(0);

/// Installs (or with `None` removes) the write probe.
pub fn set_write_probe(probe: Option<fn()>) {
    WRITE_PROBE.store(probe.map_or(0, |f| f as usize), Ordering::SeqCst);
}

/// Bytes [`KernelText::write_batch`] writes under one mapping of the alias at most
/// (x86: `poke_text` maps two pages, so any run this long fits). A page, so that a
/// batch of back-to-back sites needs few mappings (each ends in two `invlpg`s and a
/// serialising instruction); the buffer lives on the patching CPU's stack for the
/// length of the write.
#[cfg(target_arch = "x86_64")]
const BYTES_PER_MAPPING: usize = 4096;

/// Words [`KernelText::write_batch`] writes under one mapping of the alias at most.
#[cfg(target_arch = "aarch64")]
const WORDS_PER_MAPPING: usize = 64;

impl KernelText {
    /// Calls the write probe, if one is installed.
    #[unsafe(link_section = ".text.nopatch")]
    fn probe(&self) {
        let probe = WRITE_PROBE.load(Ordering::Relaxed);
        if probe != 0 {
            // SAFETY: only `set_write_probe` stores non-zero values, and those are `fn()`.
            let probe: fn() = unsafe { core::mem::transmute(probe) };
            probe();
        }
    }
}

/// The running kernel's text.
pub struct KernelText {
    writer: spin::Mutex<()>,
    protected: spin::Once<[Range<usize>; 2]>,
}

/// The one instance: its lock serialises every writer of kernel text.
pub static KERNEL_TEXT: KernelText = KernelText {
    writer: spin::Mutex::new(()),
    protected: spin::Once::new(),
};

// SAFETY: the bounds come from the linker script, whose text output section holds every
// executable input section; `.text.nopatch` (exception vectors, IRQ entry, the stop IPI
// handler, masking, cache maintenance, the alias writer) and boot code are the protected
// range; `mmu::poke_text` writes one aligned word through a temporary alias and never
// makes text writable; `cache::sync_icache_range` is DC CVAU, DSB ISH, IC IVAU, DSB ISH.
#[cfg(target_arch = "aarch64")]
unsafe impl Text for KernelText {
    type Insn = Insn;

    fn text_range(&self) -> Range<usize> {
        platform::text_range()
    }

    fn protected_ranges(&self) -> &[Range<usize>] {
        self.protected.call_once(platform::protected_ranges)
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
        self.probe();
    }

    /// Groups consecutive entries that share a page (up to [`WORDS_PER_MAPPING`] at a
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
            self.probe();
            cache::sync_icache_range(low, high);
            rest = tail;
        }
    }

    #[unsafe(link_section = ".text.nopatch")]
    fn sync_icache(&self, range: Range<usize>) {
        cache::sync_icache_range(range.start, range.end);
    }

    fn writer_lock(&self) -> &spin::Mutex<()> {
        &self.writer
    }
}

// SAFETY: the bounds come from the x86 linker script, whose text output section holds
// every executable input section; `.text.nopatch` (entry stubs, trap dispatch, the stop
// and NMI paths, the alias writer) and boot code are the protected ranges;
// `paging::poke_text` writes through a temporary RW+NX alias and never makes text
// writable. x86 keeps instruction fetch coherent with stores to the same physical
// memory, so `sync_icache` has nothing to do; each CPU that will run the new bytes
// executes a serialising instruction (the core's `Exit` phase) before it does.
#[cfg(target_arch = "x86_64")]
unsafe impl Text for KernelText {
    type Insn = Insn;

    fn text_range(&self) -> Range<usize> {
        platform::text_range()
    }

    fn protected_ranges(&self) -> &[Range<usize>] {
        self.protected.call_once(platform::protected_ranges)
    }

    #[unsafe(link_section = ".text.nopatch")]
    fn read_insn(&self, addr: usize, len: usize) -> Insn {
        let mut bytes = [0u8; crate::patch::x86::MAX_LEN];
        let len = len.min(bytes.len());
        for (i, byte) in bytes.iter_mut().take(len).enumerate() {
            // SAFETY: validation established that `addr..addr + len` is mapped text.
            *byte = unsafe { core::ptr::read_volatile((addr + i) as *const u8) };
        }
        // `len` is 1..=MAX_LEN for any instruction validation accepted.
        Insn::from_bytes(bytes.get(..len.max(1)).unwrap_or(&bytes)).unwrap_or(platform::NOP)
    }

    #[unsafe(link_section = ".text.nopatch")]
    unsafe fn write_insn(&self, addr: usize, insn: Insn) {
        // SAFETY: forwarded from the caller (validated; no CPU executes `addr` meanwhile).
        unsafe { crate::arch::x86_64::paging::poke_text(addr, insn.bytes()) };
        self.probe();
    }

    /// Entries that follow each other back to back (as a table of call sites or a run
    /// of NOPs does) are written with one mapping of the alias, up to
    /// [`BYTES_PER_MAPPING`] bytes at a time; order within the batch is kept.
    #[unsafe(link_section = ".text.nopatch")]
    unsafe fn write_batch(&self, batch: &[Patch<Insn>]) {
        // No indexing that can panic: the rendezvous path stays in `.text.nopatch`.
        let mut rest = batch;
        while let Some(first) = rest.first() {
            let mut bytes = [0u8; BYTES_PER_MAPPING];
            let (mut len, mut run) = (0, 0);
            for patch in rest {
                let new = patch.new.bytes();
                let Some(slot) = bytes.get_mut(len..len + new.len()) else {
                    break;
                };
                if patch.addr != first.addr + len {
                    break;
                }
                slot.copy_from_slice(new);
                len += new.len();
                run += 1;
            }
            // SAFETY: forwarded from the caller, for each entry of the run.
            unsafe {
                crate::arch::x86_64::paging::poke_text(first.addr, bytes.get(..len).unwrap_or(&[]))
            };
            self.probe();
            rest = rest.get(run.max(1)..).unwrap_or(&[]);
        }
    }

    #[unsafe(link_section = ".text.nopatch")]
    fn sync_icache(&self, _range: Range<usize>) {}

    fn writer_lock(&self) -> &spin::Mutex<()> {
        &self.writer
    }
}
