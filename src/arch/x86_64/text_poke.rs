//! The INT3 live-patching protocol (Linux's `text_poke_bp_batch`,
//! arch/x86/kernel/alternative.c): change instructions other CPUs may be executing,
//! without stopping them.
//!
//! For each batch of up to [`TP_VEC_MAX`] sites: publish the in-flight table (address,
//! emulation of the NEW instruction), write INT3 over every site's first byte, sync
//! every CPU ([`ipi::sync_all`]), write every tail (bytes `1..len`), sync, write every
//! first byte, sync, retire the table. A CPU that reaches a site meanwhile takes #BP;
//! `handle_int3` finds the site and emulates the new instruction on the trap frame,
//! as Linux's `poke_int3_handler` does. So another CPU runs the old instruction, INT3
//! (= the new one) or the new one, never a mix of old and new bytes.
//!
//! `CALL rel32` is emulated as Linux's `int3_emulate_call` does: push the return address
//! onto the interrupted stack, continue at the target. Vector 3 runs on that stack (no
//! IST), so its entry stub (`boot/x86_64/vectors.S`) moves the CPU's frame down and
//! leaves a gap below the interrupted RSP for the push.

use super::frame::TrapFrame;
use super::{X86_64, ipi, paging, timer};
use crate::patch::x86::{self, Emulation, Insn};
use crate::patch::{Patch, PatchError, Text, lock_bounded, validate};
use crate::stop::{StopError, StopOptions};
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Sites per round of the protocol (Linux's `TP_VEC_MAX` is a page of them); a longer
/// batch is patched in rounds. A static key's sites fit in one round (three syncs).
pub const TP_VEC_MAX: usize = 256;

/// How long each sync and the table's drain may take.
const TIMEOUT_NS: u64 = StopOptions::DEFAULT.arrival_timeout_ns;

struct Table(UnsafeCell<[(usize, Emulation); TP_VEC_MAX]>);

// SAFETY: written only by the holder of KERNEL_TEXT's writer lock while `REFS` is 0
// (no handler can hold a reference: they only take one while it is non-zero); read by
// handlers only between their successful increment and their decrement.
unsafe impl Sync for Table {}

static TABLE: Table = Table(UnsafeCell::new([(0, Emulation::Next(0)); TP_VEC_MAX]));
/// Valid entries of `TABLE`.
static LEN: AtomicUsize = AtomicUsize::new(0);
/// CALLs the #BP handler has emulated (a self-test's evidence that a caller really
/// reached a CALL site in flight).
static CALLS_EMULATED: AtomicU64 = AtomicU64::new(0);

/// How many CALLs the #BP handler (`handle_int3`) has emulated so far.
pub fn calls_emulated() -> u64 {
    CALLS_EMULATED.load(Ordering::Relaxed)
}

/// Linux's `bp_desc.refs`: 0 = no table; the patcher holds 1 while the table is
/// published; each INT3 handler holds one more while it reads it.
static REFS: AtomicUsize = AtomicUsize::new(0);

/// Patches `batch` in `text` (the kernel's: its writer lock serialises us with every
/// other writer; the bytes go through [`paging::poke_text`]) while other CPUs may
/// execute it: validated whole first, every new
/// instruction must be one [`x86::emulation`] can emulate (JMP rel32, CALL rel32,
/// `MOV $imm32, %eax`, recommended NOPs), else
/// [`PatchError::NotCmodxSafe`]; nothing is written on a refusal.
///
/// A sync that some CPU does not acknowledge in time (one spinning with IF clear cannot
/// take the IPI) fails with [`StopError::Timeout`] naming it. Linux cannot fail here;
/// this does, as follows. After the INT3 or the tail round the round's bytes are put
/// back (tails first, then first bytes) and the error returned: the text is the old
/// text. After the last round every byte is new and the call succeeds. Either way the
/// table stays published, because the silent CPU may still fetch an INT3 it has not
/// serialised away: the next call retires it only once a sync succeeds (until then it
/// returns that sync's error and writes nothing), so no INT3 byte is ever reachable
/// without the handler's table.
pub fn text_poke_bp<T: Text<Insn = Insn>>(
    text: &T,
    batch: &[Patch<Insn>],
) -> Result<(), PatchError<Insn>> {
    let _writer = lock_bounded(&X86_64, text.writer_lock(), TIMEOUT_NS)?;
    // Every sync waits for each online CPU: no CPU goes down or comes up meanwhile
    // (Linux's `text_poke_bp` runs under `text_mutex` with CPUs read-locked by its
    // callers). After the writer lock, the order `patch_machine` takes them in.
    let _cpus = super::STOP
        .cpus_read_lock(TIMEOUT_NS)
        .map_err(StopError::from)?;
    if REFS.load(Ordering::Relaxed) != 0 {
        // Left published by a failed sync: retire it once every CPU serialised.
        sync()?;
        retire();
    }
    validate(text, batch)?;
    if let Some((index, patch)) = batch.iter().enumerate().find(|(_, p)| {
        !matches!(
            x86::emulation(p.addr, &p.new),
            Some(
                Emulation::Next(_)
                    | Emulation::Jump(_)
                    | Emulation::Call { .. }
                    | Emulation::MovEax { .. }
            )
        )
    }) {
        return Err(PatchError::NotCmodxSafe {
            index,
            addr: patch.addr,
            old: patch.old,
            new: patch.new,
        });
    }
    for round in batch.chunks(TP_VEC_MAX) {
        poke_round(round)?;
    }
    Ok(())
}

/// One round of the protocol over at most [`TP_VEC_MAX`] validated, emulatable sites.
fn poke_round(round: &[Patch<Insn>]) -> Result<(), PatchError<Insn>> {
    {
        // SAFETY: we hold the writer lock and REFS is 0 (checked or retired above, and
        // every round retires), so no handler reads the table (see Table).
        let table = unsafe { &mut *TABLE.0.get() };
        for (slot, p) in table.iter_mut().zip(round) {
            let emulation = x86::emulation(p.addr, &p.new).unwrap_or(Emulation::Next(0));
            *slot = (p.addr, emulation);
        }
    }
    LEN.store(round.len().min(TP_VEC_MAX), Ordering::Relaxed);
    // Release pairs with the Acquire increment in `handle_int3`: a handler that sees
    // the table published sees its entries and LEN. Published before the first INT3.
    REFS.store(1, Ordering::Release);

    for p in round {
        // SAFETY: a validated site, no other writer (writer lock); one byte becoming an
        // INT3 that the handler, through the table published above, covers.
        unsafe { paging::poke_text(p.addr, &[x86::INT3]) };
    }
    if let Err(err) = sync() {
        for p in round {
            // SAFETY: the INT3 written above becomes the old first byte again; the
            // rest of the site never changed.
            unsafe { paging::poke_text(p.addr, p.old.bytes().get(..1).unwrap_or(&[])) };
        }
        return Err(err);
    }
    for p in round {
        if let Some(tail) = p.new.bytes().get(1..).filter(|t| !t.is_empty()) {
            // SAFETY: every CPU serialised since the INT3 went in, so none executes
            // the bytes after it: they all trap on the INT3 first.
            unsafe { paging::poke_text(p.addr + 1, tail) };
        }
    }
    if let Err(err) = sync() {
        // Tails back while the INT3s still guard them, then the first bytes.
        for p in round {
            if let Some(tail) = p.old.bytes().get(1..).filter(|t| !t.is_empty()) {
                // SAFETY: as for the new tail: the INT3 still guards it.
                unsafe { paging::poke_text(p.addr + 1, tail) };
            }
        }
        for p in round {
            // SAFETY: the INT3 becomes the old first byte, in front of the old tail.
            unsafe { paging::poke_text(p.addr, p.old.bytes().get(..1).unwrap_or(&[])) };
        }
        return Err(err);
    }
    for p in round {
        // SAFETY: the INT3 becomes the new first byte, in front of the new tail that
        // every CPU serialised onto.
        unsafe { paging::poke_text(p.addr, p.new.bytes().get(..1).unwrap_or(&[])) };
    }
    if sync().is_ok() {
        retire();
    }
    // Else every byte is new; the table stays published for the silent CPU (see
    // `text_poke_bp`).
    Ok(())
}

/// Every online CPU serialises, or the error naming those that did not.
fn sync() -> Result<(), PatchError<Insn>> {
    ipi::sync_all(TIMEOUT_NS)
        .map_err(|(missing, waited_ns)| PatchError::Stop(StopError::Timeout { missing, waited_ns }))
}

/// Drops the patcher's reference and waits for handlers still reading the table.
fn retire() {
    // Release pairs with the Acquire increment in `handle_int3`: handlers that still
    // get in see the same table (we change nothing before the count drains).
    REFS.fetch_sub(1, Ordering::Release);
    let start = timer::now_ns();
    // Acquire pairs with the handlers' Release decrement: their reads of the table are
    // done before we overwrite it in the next round.
    while REFS.load(Ordering::Acquire) != 0 {
        // A handler runs a few dozen instructions with IF clear; a second means one is
        // stuck, and rewriting the table under it would be worse than stopping.
        assert!(
            timer::now_ns().saturating_sub(start) < TIMEOUT_NS,
            "text_poke_bp: an INT3 handler held the in-flight table for a second"
        );
        core::hint::spin_loop();
    }
}

/// The #BP handler's part: if `frame.rip - 1` is the first byte of a site in flight,
/// emulate the site's new instruction on `frame` and return true; false otherwise (an
/// unexpected breakpoint, or a CALL with no gap to push into). Runs with IF clear, on
/// the interrupted stack, below the gap its entry stub leaves.
#[unsafe(link_section = ".text.nopatch")]
pub(crate) fn handle_int3(frame: &mut TrapFrame) -> bool {
    let addr = frame.rip.wrapping_sub(1) as usize;
    // Linux's `try_get_desc`: increment only while non-zero, so no handler gets in once
    // the patcher has retired the table.
    let mut refs = REFS.load(Ordering::Relaxed);
    loop {
        if refs == 0 {
            return false;
        }
        // Acquire pairs with the Release store publishing the table in `poke_round`.
        match REFS.compare_exchange_weak(refs, refs + 1, Ordering::Acquire, Ordering::Relaxed) {
            Ok(_) => break,
            Err(now) => refs = now,
        }
    }
    // SAFETY: we hold a reference, so the table is not written until we drop it.
    let table = unsafe { &*TABLE.0.get() };
    let len = LEN.load(Ordering::Relaxed);
    let found = table
        .get(..len)
        .and_then(|t| t.iter().find(|(a, _)| *a == addr))
        .map(|&(_, emulation)| emulation);
    // Release pairs with the Acquire load in `retire`: our reads are done.
    REFS.fetch_sub(1, Ordering::Release);
    match found {
        Some(Emulation::Next(next)) => frame.rip = next as u64,
        Some(Emulation::Jump(target)) => frame.rip = target as u64,
        Some(Emulation::MovEax { imm, next }) => {
            frame.rax = u64::from(imm);
            frame.rip = next as u64;
        }
        Some(Emulation::Call { target, ret }) => return emulate_call(frame, target, ret),
        None => return false,
    }
    true
}

/// Linux's `int3_emulate_call`: push `ret` onto the interrupted stack and continue at
/// `target`. False, with nothing changed, if the slot below the interrupted RSP lies in
/// `frame` (an entry stub without the gap): pushing would overwrite the frame IRETQ is
/// about to read.
#[unsafe(link_section = ".text.nopatch")]
fn emulate_call(frame: &mut TrapFrame, target: usize, ret: usize) -> bool {
    let slot = frame.rsp.wrapping_sub(8);
    let frame_start = &raw const *frame as u64;
    let frame_end = frame_start.wrapping_add(size_of::<TrapFrame>() as u64);
    if (frame_start..frame_end).contains(&slot) {
        return false;
    }
    // SAFETY: kernel-mode #BP without IST: the interrupted stack is ours and mapped, and
    // the 8 bytes below its RSP hold nothing live (no red zone on x86_64-unknown-none;
    // the CPU pushed its own frame there, which the entry stub has copied below, and we
    // checked the copy does not hold the slot). A CALL would write exactly this slot.
    unsafe { (slot as *mut u64).write(ret as u64) };
    frame.rsp = slot;
    frame.rip = target as u64;
    CALLS_EMULATED.fetch_add(1, Ordering::Relaxed);
    true
}
