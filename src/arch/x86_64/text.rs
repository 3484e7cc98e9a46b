//! Kernel text as the patcher sees it ([`KERNEL_TEXT`]): bounds from the linker, writes
//! through the temporary alias ([`paging::poke_text`]).

use super::{layout, paging};
pub use crate::arch::kernel_text::{KERNEL_TEXT, KernelText};
use crate::arch::write_probe::call_write_probe;
use crate::patch::plan::Run;
use crate::patch::x86::{self, Insn};
use crate::patch::{Instruction, Patch, Text};
use core::mem::MaybeUninit;
use core::ops::Range;

/// What [`KernelText::read_insn`] returns for a length no instruction has (validation
/// never asks for one): the 5-byte NOP.
const NOP5: Insn = match x86::nop(5) {
    Ok(nop) => nop,
    Err(_) => panic!("a 5-byte NOP exists"),
};

/// Bytes [`KernelText::write_batch`] writes under one mapping of the alias at most
/// (x86: `poke_text` maps two pages, so any run this long fits). A page, so that a
/// batch of back-to-back sites needs few mappings (each ends in two `invlpg`s and a
/// serialising instruction); the buffer lives on the patching CPU's stack for the
/// length of the write.
const BYTES_PER_MAPPING: usize = 4096;

// SAFETY: the bounds come from the x86 linker script, whose text output section holds
// every executable input section; `.text.nopatch` (entry stubs, trap dispatch, the stop
// and NMI paths, the alias writer, boot code) and `.text.kprobes` (the kprobes hit path
// and XOL slots, which only their own registration writes) are the protected ranges;
// `paging::poke_text` writes through a temporary RW+NX alias and never makes text
// writable. x86 keeps instruction fetch coherent with stores to the same physical
// memory, so `sync_icache` has nothing to do; each CPU that will run the new bytes
// executes a serialising instruction (the core's `Exit` phase) before it does.
unsafe impl Text for KernelText {
    type Insn = Insn;

    fn text_range(&self) -> Range<usize> {
        layout::text_range()
    }

    fn protected_ranges(&self) -> &[Range<usize>] {
        self.protected(|| [layout::nopatch_range(), layout::kprobes_range()])
    }

    /// One 8-byte load where the text goes on for 8 bytes (a validation of 1000 sites
    /// read byte by byte cost 50 us under QEMU), byte by byte at its very end.
    #[unsafe(link_section = ".text.nopatch")]
    fn read_insn(&self, addr: usize, len: usize) -> Insn {
        if addr
            .checked_add(8)
            .is_some_and(|end| end <= layout::text().1)
            && let Some(insn) = Insn::from_le_word(
                // SAFETY: validation established that `addr..addr + len` is mapped text,
                // and text goes on to `addr + 8` (checked); x86 loads need no alignment.
                unsafe { core::ptr::read_unaligned(addr as *const u64) },
                len,
            )
        {
            return insn;
        }
        let mut bytes = [0u8; x86::MAX_LEN];
        let len = len.min(bytes.len());
        for (i, byte) in bytes.iter_mut().take(len).enumerate() {
            // SAFETY: validation established that `addr..addr + len` is mapped text.
            *byte = unsafe { core::ptr::read_volatile((addr + i) as *const u8) };
        }
        // `len` is 1..=MAX_LEN for any instruction validation accepted.
        Insn::from_bytes(bytes.get(..len.max(1)).unwrap_or(&bytes)).unwrap_or(NOP5)
    }

    #[unsafe(link_section = ".text.nopatch")]
    unsafe fn write_insn(&self, addr: usize, insn: Insn) {
        // SAFETY: forwarded from the caller (validated; no CPU executes `addr` meanwhile).
        unsafe { paging::poke_text(addr, insn.bytes()) };
        call_write_probe();
    }

    /// Entries that follow each other back to back (as a table of call sites or a run
    /// of NOPs does) are written with one mapping of the alias, up to
    /// `BYTES_PER_MAPPING` bytes at a time; order within the batch is kept.
    #[unsafe(link_section = ".text.nopatch")]
    unsafe fn write_batch(&self, batch: &[Patch<Insn>]) {
        // No indexing that can panic: the rendezvous path stays in `.text.nopatch`.
        let mut rest = batch;
        while let Some(first) = rest.first() {
            // Not zeroed: only the bytes the run fills are read. Zeroing the whole page
            // first cost more than the rest of a one-site write under QEMU (about 2.5 us
            // of a 4.5 us `Run`, measured with the TSC around each step).
            let mut bytes = [const { MaybeUninit::<u8>::uninit() }; BYTES_PER_MAPPING];
            let (mut len, mut run) = (0, 0);
            for patch in rest {
                let new = patch.new.bytes();
                let Some(slot) = bytes.get_mut(len..len + new.len()) else {
                    break;
                };
                if patch.addr != first.addr + len {
                    break;
                }
                slot.write_copy_of_slice(new);
                len += new.len();
                run += 1;
            }
            let filled = bytes.get(..len).unwrap_or(&[]);
            // SAFETY: the loop above wrote `bytes[..len]`, back to back from index 0.
            let filled = unsafe { filled.assume_init_ref() };
            // SAFETY: forwarded from the caller, for each entry of the run.
            unsafe { paging::poke_text(first.addr, filled) };
            call_write_probe();
            rest = rest.get(run.max(1)..).unwrap_or(&[]);
        }
    }

    /// One 8-byte load and a masked compare where the text goes on for 8 bytes.
    #[inline(always)]
    fn holds(&self, addr: usize, insn: &Insn) -> bool {
        let len = insn.size();
        if (1..=8).contains(&len) && addr <= layout::text().1.saturating_sub(8) {
            // SAFETY: validation established that `addr..addr + len` is mapped text,
            // and text goes on to `addr + 8` (checked); x86 loads need no alignment.
            let found = unsafe { core::ptr::read_unaligned(addr as *const u64) };
            return (found ^ insn.to_le_word()) & (u64::MAX >> (64 - 8 * len)) == 0;
        }
        self.read_insn(addr, len) == *insn
    }

    /// Compares the run's text with its old bytes eight at a time, without a branch per
    /// word.
    #[unsafe(link_section = ".text.nopatch")]
    fn run_holds(&self, run: &Run<'_, Insn>) -> bool {
        let mut words = run.old.chunks_exact(8);
        let mut at = run.addr;
        // Differences OR-ed together rather than a loop that stops at the first: one
        // branch a word fewer, and under TCG each branch ends a translation block.
        let mut differ = 0;
        for word in words.by_ref() {
            let expected = u64::from_le_bytes(word.try_into().unwrap_or([0; 8]));
            // SAFETY: `prepare` placed the whole run in mapped text; x86 loads need no
            // alignment.
            differ |= unsafe { core::ptr::read_unaligned(at as *const u64) } ^ expected;
            at += 8;
        }
        for &byte in words.remainder() {
            // SAFETY: as above, a byte of the run.
            differ |= u64::from(unsafe { core::ptr::read_volatile(at as *const u8) } ^ byte);
            at += 1;
        }
        differ == 0
    }

    /// The run's bytes straight from the plan, with one alias mapping per two pages
    /// (`poke_text` stores quadwords).
    #[unsafe(link_section = ".text.nopatch")]
    unsafe fn write_run(&self, run: &Run<'_, Insn>) {
        let (mut addr, mut rest) = (run.addr, run.new);
        while !rest.is_empty() {
            let room = 0x2000 - (addr & 0xfff);
            let (part, tail) = rest.split_at_checked(room).unwrap_or((rest, &[]));
            // SAFETY: forwarded from the caller; `part` touches at most two pages.
            unsafe { paging::poke_text(addr, part) };
            call_write_probe();
            addr += part.len();
            rest = tail;
        }
    }

    #[unsafe(link_section = ".text.nopatch")]
    fn sync_icache(&self, _range: Range<usize>) {}

    fn writer_lock(&self) -> &spin::Mutex<()> {
        self.writer()
    }
}
