//! The hit path: what the architecture's breakpoint handler calls, lock-free and
//! NMI-safe, all in `.text.kprobes` (a section the architecture forbids probing).

use super::arch::KprobeArch;
use super::registry::{FREE, Kprobes};
use super::{ProbeHit, ProbeId};
use core::sync::atomic::{Ordering, compiler_fence};

/// What [`Kprobes::hit`] found at a breakpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hit<P> {
    /// No probe is registered at the address: the breakpoint is someone else's.
    NotOurs,
    /// The pre handler ran; execute the original instruction by `plan`, then call
    /// [`Kprobes::finish`] with the token.
    Handle(HitToken, P),
    /// The CPU was already inside a probe's handlers: no handler ran and the hit was
    /// counted missed. Execute the original instruction by `plan`; no `finish`.
    Missed(P),
}

/// A hit whose post handler is still to run, on the CPU that took it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HitToken {
    slot: usize,
    cpu: usize,
    addr: usize,
    id: ProbeId,
}

impl HitToken {
    /// The probed address.
    pub fn addr(&self) -> usize {
        self.addr
    }
}

impl<A: KprobeArch, const N: usize> Kprobes<A, N> {
    /// The breakpoint at `addr` trapped on this CPU with `frame`: runs the probe's pre
    /// handler, unless this CPU is already inside a probe's handlers (then the hit is
    /// counted missed). Takes no lock. See [`KprobeArch`] for the protocol.
    #[unsafe(link_section = ".text.kprobes")]
    pub fn hit(&self, addr: usize, frame: &mut A::Frame) -> Hit<A::Plan> {
        let Some(slot_index) = self.find_hit(addr) else {
            return Hit::NotOurs;
        };
        let slot = &self.slots[slot_index];
        // SAFETY: `find_hit` saw the key published (Acquire), and the site's breakpoint
        // trapped, so the probe is armed and its slot cannot be freed before this CPU
        // leaves the hit path (the `KprobeArch::write` contract).
        let probe = unsafe { slot.probe() };
        let plan = probe.decoded.plan;
        let cpu = self.arch.cpu_id();
        let Some(busy) = self.busy.get(cpu) else {
            slot.missed.fetch_add(1, Ordering::Relaxed);
            return Hit::Missed(plan);
        };
        // Only this CPU writes its entry; a nested hit on it (from inside a handler)
        // reads it after the store below in program order.
        if busy.load(Ordering::Relaxed) != 0 {
            slot.missed.fetch_add(1, Ordering::Relaxed);
            return Hit::Missed(plan);
        }
        busy.store(slot_index + 1, Ordering::Relaxed);
        // A breakpoint inside the handler is an exception on this CPU: the store must be
        // made before the handler runs, as if for a signal handler.
        compiler_fence(Ordering::SeqCst);
        slot.hits.fetch_add(1, Ordering::Relaxed);
        let token = HitToken {
            slot: slot_index,
            cpu,
            addr,
            id: ProbeId {
                slot: slot_index as u32,
                generation: slot.generation.load(Ordering::Relaxed),
            },
        };
        if let Some(pre) = probe.pre {
            pre(&token.probe_hit(), frame);
        }
        Hit::Handle(token, plan)
    }

    /// The original instruction of `token`'s hit has executed: runs the post handler and
    /// ends the CPU's "inside a probe" state.
    #[unsafe(link_section = ".text.kprobes")]
    pub fn finish(&self, token: HitToken, frame: &mut A::Frame) {
        // SAFETY: the token comes from `hit` on this CPU, which is still on the hit path
        // for it, so the slot is still published.
        let probe = unsafe { self.slots[token.slot].probe() };
        if let Some(post) = probe.post {
            post(&token.probe_hit(), frame);
        }
        compiler_fence(Ordering::SeqCst);
        self.busy[token.cpu].store(0, Ordering::Relaxed);
    }

    /// Whether this CPU is inside a probe's handlers (between `hit` and `finish`).
    #[unsafe(link_section = ".text.kprobes")]
    pub fn in_probe(&self) -> bool {
        self.busy
            .get(self.arch.cpu_id())
            .is_some_and(|busy| busy.load(Ordering::Relaxed) != 0)
    }

    #[unsafe(link_section = ".text.kprobes")]
    fn find_hit(&self, addr: usize) -> Option<usize> {
        if addr == FREE {
            return None;
        }
        // Acquire pairs with the Release publishing the key in `register_kprobe`.
        self.slots
            .iter()
            .position(|slot| slot.addr.load(Ordering::Acquire) == addr)
    }
}

impl HitToken {
    #[unsafe(link_section = ".text.kprobes")]
    fn probe_hit(&self) -> ProbeHit {
        ProbeHit {
            id: self.id,
            addr: self.addr,
            cpu: self.cpu,
        }
    }
}
