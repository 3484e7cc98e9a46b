//! The registry: a fixed array of slots, changed under one bounded lock, read by the
//! hit path without it.
//!
//! A slot's probe is written only while its address key is [`FREE`] (no hit can match
//! it) and read by the hit path only after it matched the key; the key is published
//! (Release) after the probe is written and before the site is armed, and cleared only
//! after the disarming write returned, when no CPU is on the hit path for it (the
//! [`KprobeArch`] contract).

use super::arch::{Decoded, KprobeArch};
use super::{Handler, KprobeError, ProbeId, ProbeStats};
use crate::MAX_CPUS;
use crate::patch::{Instruction, Patch};
use crate::stop::{LockTimeout, lock_within};
use core::cell::UnsafeCell;
use core::mem::MaybeUninit;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};

/// The key of a slot that holds no probe: no address in text can equal it (a text
/// range ends at or below it, exclusive).
pub(super) const FREE: usize = usize::MAX;

/// How long a registry call waits for another CPU's registry call (which may be
/// stopping the machine twice: arming and disarming take one stop each).
pub const REGISTRY_LOCK_TIMEOUT_NS: u64 = 2_000_000_000;

/// What a registered probe is: fixed from registration to removal.
pub(super) struct Probe<A: KprobeArch> {
    pub(super) decoded: Decoded<A::Insn, A::Plan>,
    pub(super) pre: Option<Handler<A::Frame>>,
    pub(super) post: Option<Handler<A::Frame>>,
}

pub(super) struct Slot<A: KprobeArch> {
    /// The probed address, or [`FREE`]: the hit path's key.
    pub(super) addr: AtomicUsize,
    /// Bumped at every registration, so that a stale [`ProbeId`] is refused.
    pub(super) generation: AtomicU32,
    /// The site holds the breakpoint.
    armed: AtomicBool,
    pub(super) hits: AtomicU64,
    pub(super) missed: AtomicU64,
    probe: UnsafeCell<MaybeUninit<Probe<A>>>,
}

impl<A: KprobeArch> Slot<A> {
    const fn new() -> Self {
        Slot {
            addr: AtomicUsize::new(FREE),
            generation: AtomicU32::new(0),
            armed: AtomicBool::new(false),
            hits: AtomicU64::new(0),
            missed: AtomicU64::new(0),
            probe: UnsafeCell::new(MaybeUninit::uninit()),
        }
    }

    /// The registered probe.
    ///
    /// # Safety
    /// The caller saw `addr` (Acquire) hold a probed address, on the hit path for that
    /// address or under the registry lock.
    #[unsafe(link_section = ".text.kprobes")]
    pub(super) unsafe fn probe(&self) -> &Probe<A> {
        // SAFETY: the key is published after the probe was written and cleared only
        // once nobody reads it (module header); the caller saw it published.
        unsafe { (*self.probe.get()).assume_init_ref() }
    }
}

/// Registered kernel probes on architecture `A`, at most `N` at once.
///
/// Registration, removal, enabling and disabling may be called from several CPUs at
/// once (they serialise on a bounded lock, interrupts enabled, outside any handler); the
/// hit path ([`Kprobes::hit`], [`Kprobes::finish`]) takes no lock and may run in any
/// context, NMI included.
pub struct Kprobes<A: KprobeArch, const N: usize = 16> {
    pub(super) arch: A,
    lock: spin::Mutex<()>,
    pub(super) slots: [Slot<A>; N],
    /// Per CPU: 1 + the slot whose handlers this CPU is running (from `hit` to
    /// `finish`), 0 when none. Only the owning CPU writes its entry.
    pub(super) busy: [AtomicUsize; MAX_CPUS],
}

// SAFETY: the slots' probes are written only under `lock` while unpublished, and read
// only after their key was published (module header); everything else is atomic.
unsafe impl<A: KprobeArch, const N: usize> Sync for Kprobes<A, N> {}

impl<A: KprobeArch, const N: usize> Kprobes<A, N> {
    /// An empty registry on `arch`.
    pub const fn new(arch: A) -> Self {
        Kprobes {
            arch,
            lock: spin::Mutex::new(()),
            slots: [const { Slot::new() }; N],
            busy: [const { AtomicUsize::new(0) }; MAX_CPUS],
        }
    }

    /// The architecture the registry runs on.
    pub fn arch(&self) -> &A {
        &self.arch
    }

    /// How many probes the registry holds at most.
    pub const fn capacity(&self) -> usize {
        N
    }

    /// Puts a probe on the instruction at `addr` and arms it: from then on every CPU that
    /// executes it first runs `pre`, then the original instruction, then `post`.
    ///
    /// Refused, with the text unchanged, if `addr` is not an instruction boundary in
    /// kernel text, is in a region the architecture forbids (exception entry, the probe
    /// machinery, `.text.nopatch`), holds an instruction that cannot be probed, or
    /// already has a probe; or if the registry is full.
    pub fn register_kprobe(
        &self,
        addr: usize,
        pre: Option<Handler<A::Frame>>,
        post: Option<Handler<A::Frame>>,
    ) -> Result<ProbeId, KprobeError<A::Insn>> {
        let _registry = self.lock()?;
        self.check_site(addr)?;
        if let Some(existing) = self.find_locked(addr) {
            return Err(KprobeError::Duplicate { addr, existing });
        }
        let mut decoded = self
            .arch
            .decode(addr)
            .map_err(|reason| KprobeError::Unprobeable { addr, reason })?;
        let index = self
            .slots
            .iter()
            .position(|s| s.addr.load(Ordering::Relaxed) == FREE)
            .ok_or(KprobeError::Full { capacity: N })?;
        self.arch.prepare(index, addr, &mut decoded)?;
        let slot = &self.slots[index];
        // SAFETY: the slot is free (key FREE), so no hit path reads the probe, and the
        // registry lock excludes every other writer.
        unsafe { (*slot.probe.get()).write(Probe { decoded, pre, post }) };
        let generation = slot.generation.load(Ordering::Relaxed).wrapping_add(1);
        slot.generation.store(generation, Ordering::Relaxed);
        slot.hits.store(0, Ordering::Relaxed);
        slot.missed.store(0, Ordering::Relaxed);
        // Release pairs with the hit path's Acquire of the key: a CPU that matches the
        // address sees the probe written above.
        slot.addr.store(addr, Ordering::Release);
        let armed = Patch::new(addr, decoded.insn, self.arch.breakpoint_for(decoded.insn));
        if let Err(err) = self.arch.write(armed) {
            // Never armed: no CPU can be on the hit path for it.
            slot.addr.store(FREE, Ordering::Relaxed);
            self.arch.release(index);
            return Err(err.into());
        }
        slot.armed.store(true, Ordering::Relaxed);
        Ok(ProbeId {
            slot: index as u32,
            generation,
        })
    }

    /// Disarms probe `id` (if armed), restoring the original instruction, and frees its
    /// slot; returns its final counters. When this returns no CPU runs its handlers.
    pub fn unregister_kprobe(&self, id: ProbeId) -> Result<ProbeStats, KprobeError<A::Insn>> {
        let _registry = self.lock()?;
        let slot = self.slot_locked(id)?;
        self.set_armed(slot, false)?;
        let stats = self.stats_of(id, slot);
        // The disarming write returned: nobody is on the hit path for this slot, and
        // nobody can newly arrive (the key is cleared after, not before).
        slot.addr.store(FREE, Ordering::Relaxed);
        self.arch.release(id.slot as usize);
        Ok(stats)
    }

    /// Arms probe `id` again after [`disable`](Kprobes::disable); a no-op if armed.
    pub fn enable(&self, id: ProbeId) -> Result<(), KprobeError<A::Insn>> {
        let _registry = self.lock()?;
        let slot = self.slot_locked(id)?;
        self.set_armed(slot, true)
    }

    /// Restores the original instruction but keeps the probe registered (its counters
    /// too); a no-op if disarmed. When this returns no CPU runs its handlers.
    pub fn disable(&self, id: ProbeId) -> Result<(), KprobeError<A::Insn>> {
        let _registry = self.lock()?;
        let slot = self.slot_locked(id)?;
        self.set_armed(slot, false)
    }

    /// Probe `id`'s counters now (lock-free; the counters may move meanwhile).
    pub fn stats(&self, id: ProbeId) -> Result<ProbeStats, KprobeError<A::Insn>> {
        let slot = self
            .slots
            .get(id.slot as usize)
            .ok_or(KprobeError::UnknownProbe(id))?;
        let stats = self.stats_of(id, slot);
        // Re-checked after the reads: the slot was not freed or reused meanwhile.
        if slot.addr.load(Ordering::Acquire) == FREE
            || slot.generation.load(Ordering::Relaxed) != id.generation
        {
            return Err(KprobeError::UnknownProbe(id));
        }
        Ok(stats)
    }

    /// The probe registered at `addr`, if any.
    pub fn lookup(&self, addr: usize) -> Option<ProbeId> {
        self.find_locked(addr)
    }

    fn stats_of(&self, id: ProbeId, slot: &Slot<A>) -> ProbeStats {
        ProbeStats {
            id,
            addr: slot.addr.load(Ordering::Acquire),
            armed: slot.armed.load(Ordering::Relaxed),
            hits: slot.hits.load(Ordering::Relaxed),
            missed: slot.missed.load(Ordering::Relaxed),
        }
    }

    fn lock(&self) -> Result<spin::MutexGuard<'_, ()>, KprobeError<A::Insn>> {
        lock_within(
            &self.lock,
            "the kprobe registry lock",
            REGISTRY_LOCK_TIMEOUT_NS,
            || self.arch.now_ns(),
            || self.arch.relax(),
        )
        .map_err(|LockTimeout { waited_ns, .. }| KprobeError::Busy { waited_ns })
    }

    fn check_site(&self, addr: usize) -> Result<(), KprobeError<A::Insn>> {
        let align = A::Insn::ALIGN;
        if !addr.is_multiple_of(align) {
            return Err(KprobeError::Misaligned { addr, align });
        }
        if let Some(f) = self
            .arch
            .forbidden_ranges()
            .iter()
            .find(|f| f.range.contains(&addr))
        {
            return Err(KprobeError::Forbidden {
                addr,
                why: f.why,
                range: (f.range.start, f.range.end),
            });
        }
        let text = self.arch.text_range();
        if !text.contains(&addr) {
            return Err(KprobeError::OutsideText {
                addr,
                text: (text.start, text.end),
            });
        }
        Ok(())
    }

    fn find_locked(&self, addr: usize) -> Option<ProbeId> {
        self.slots.iter().enumerate().find_map(|(index, slot)| {
            (addr != FREE && slot.addr.load(Ordering::Acquire) == addr).then(|| ProbeId {
                slot: index as u32,
                generation: slot.generation.load(Ordering::Relaxed),
            })
        })
    }

    fn slot_locked(&self, id: ProbeId) -> Result<&Slot<A>, KprobeError<A::Insn>> {
        self.slots
            .get(id.slot as usize)
            .filter(|s| {
                s.addr.load(Ordering::Relaxed) != FREE
                    && s.generation.load(Ordering::Relaxed) == id.generation
            })
            .ok_or(KprobeError::UnknownProbe(id))
    }

    /// Writes the breakpoint (`arm`) or the original back, if the site does not hold it
    /// already. Under the registry lock.
    fn set_armed(&self, slot: &Slot<A>, arm: bool) -> Result<(), KprobeError<A::Insn>> {
        if slot.armed.load(Ordering::Relaxed) == arm {
            return Ok(());
        }
        let addr = slot.addr.load(Ordering::Relaxed);
        // SAFETY: under the registry lock, with the key published.
        let original = unsafe { slot.probe() }.decoded.insn;
        let armed = Patch::new(addr, original, self.arch.breakpoint_for(original));
        self.arch
            .write(if arm { armed } else { armed.reversed() })?;
        slot.armed.store(arm, Ordering::Relaxed);
        Ok(())
    }
}
