//! The write probe: a function both ports' kernel text calls right after each text
//! write, inside the patch window. Only the self-tests install one, to prove what can
//! and cannot happen in the window (`kernel::platform` exports [`set_write_probe`]).

use core::sync::atomic::{AtomicUsize, Ordering};

/// The probe as a `fn()` address (0: none).
static WRITE_PROBE: AtomicUsize = AtomicUsize::new(0);

/// Installs (or with `None` removes) the write probe.
pub fn set_write_probe(probe: Option<fn()>) {
    WRITE_PROBE.store(probe.map_or(0, |f| f as usize), Ordering::SeqCst);
}

/// Calls the write probe, if one is installed.
#[unsafe(link_section = ".text.nopatch")]
pub(crate) fn call_write_probe() {
    let probe = WRITE_PROBE.load(Ordering::Relaxed);
    if probe != 0 {
        // SAFETY: only `set_write_probe` stores non-zero values, and those are `fn()`.
        let probe: fn() = unsafe { core::mem::transmute(probe) };
        probe();
    }
}
