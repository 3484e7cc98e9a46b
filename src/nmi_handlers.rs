//! The NMI handler registry both architectures use: numbered slots of plain functions
//! that every NMI runs in order. Slot 0 is reserved for the stop machine, which the
//! architecture's NMI entry calls first (the stop function takes priority over any other
//! NMI work, as in Ankur Arora, "x86/alternatives: NMI safe runtime patching", LKML,
//! 2020).
//!
//! An NMI carries no message, so every handler runs on every NMI and says whether it
//! found work of its own. Lock-free: handlers are registered and run with atomics only,
//! as an NMI may arrive while the registry is being changed.

use core::sync::atomic::{AtomicUsize, Ordering};

/// Number of NMI handler slots.
pub const NMI_SLOTS: usize = 8;
/// The slot reserved for the stop machine.
pub const STOP_MACHINE_SLOT: usize = 0;

/// NMI handler slots: each a `fn(cpu) -> bool` as usize, 0 for none.
pub struct NmiHandlers {
    slots: [AtomicUsize; NMI_SLOTS],
}

impl NmiHandlers {
    /// An empty registry.
    pub const fn new() -> Self {
        NmiHandlers {
            slots: [const { AtomicUsize::new(0) }; NMI_SLOTS],
        }
    }

    /// Registers `f(cpu)` in `slot` (replacing any earlier one). It runs on every NMI,
    /// after the handlers of lower slots, in NMI context, and returns whether it found
    /// work of its own.
    ///
    /// # Panics
    /// If `slot` is [`STOP_MACHINE_SLOT`] (reserved) or not below [`NMI_SLOTS`].
    pub fn register(&self, slot: usize, f: fn(cpu: usize) -> bool) {
        assert!(
            slot != STOP_MACHINE_SLOT && slot < NMI_SLOTS,
            "NMI handler slot {slot}: 0 is the stop machine's, the others are 1..{NMI_SLOTS}"
        );
        // Release pairs with the Acquire in `run`: what `f` relies on that was set up
        // before registration is visible when it runs.
        self.slots[slot].store(f as usize, Ordering::Release);
    }

    /// Empties `slot`. An NMI already running the handler on another CPU finishes it.
    ///
    /// # Panics
    /// As [`register`](Self::register).
    pub fn unregister(&self, slot: usize) {
        assert!(
            slot != STOP_MACHINE_SLOT && slot < NMI_SLOTS,
            "NMI handler slot {slot} out of range"
        );
        self.slots[slot].store(0, Ordering::Release);
    }

    /// Runs every registered handler (slots 1.. in order) for `cpu`; returns whether any
    /// claimed the NMI. Called from the architecture's NMI entry, after the stop
    /// machine's slot.
    #[unsafe(link_section = ".text.nopatch")]
    pub fn run(&self, cpu: usize) -> bool {
        let mut claimed = false;
        for slot in self.slots.iter().skip(STOP_MACHINE_SLOT + 1) {
            // Acquire pairs with the Release in `register`.
            let f = slot.load(Ordering::Acquire);
            if f != 0 {
                // SAFETY: only `register` stores non-zero values, and those are
                // `fn(usize) -> bool` pointers.
                let f: fn(usize) -> bool = unsafe { core::mem::transmute(f) };
                claimed |= f(cpu);
            }
        }
        claimed
    }
}

impl Default for NmiHandlers {
    fn default() -> Self {
        Self::new()
    }
}
