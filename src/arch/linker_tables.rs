//! The tables the linker scripts (`linker.ld`, `linker-x86_64.ld`) gather between pairs
//! of symbols, the same on both ports: the alternatives (`.altinstructions.boot`,
//! `.altinstructions`), the static-key jump table (`__jump_table`) and the key table
//! (`.static_keys`).

use crate::patch::alternatives::AltEntry;
use crate::static_key::{JumpEntry, StaticKey};

unsafe extern "C" {
    safe static __alt_boot_start: [u8; 0];
    safe static __alt_boot_end: [u8; 0];
    safe static __alt_start: [u8; 0];
    safe static __alt_end: [u8; 0];
    safe static __jump_table_start: [u8; 0];
    safe static __jump_table_end: [u8; 0];
    safe static __static_keys_start: [u8; 0];
    safe static __static_keys_end: [u8; 0];
}

/// The `T`s between two linker symbols.
///
/// # Safety
/// The linker script places only whole, aligned `T`s between `start` and `end`, in
/// read-only data that is never written.
unsafe fn section<T>(start: &'static [u8; 0], end: &'static [u8; 0]) -> &'static [T] {
    let (first, last) = (start.as_ptr() as usize, end.as_ptr() as usize);
    let len = last.saturating_sub(first) / core::mem::size_of::<T>();
    // SAFETY: forwarded from the caller.
    unsafe { core::slice::from_raw_parts(start.as_ptr().cast::<T>(), len) }
}

/// The boot alternatives (`.altinstructions.boot`: sites in `.text.nopatch`).
pub fn alt_boot_table() -> &'static [AltEntry] {
    // SAFETY: only `alternative!(boot, ...)` emits into this section: 12-byte,
    // 4-aligned entries with `AltEntry`'s layout.
    unsafe { section(&__alt_boot_start, &__alt_boot_end) }
}

/// The runtime alternatives (`.altinstructions`: sites in patchable text).
pub fn alt_runtime_table() -> &'static [AltEntry] {
    // SAFETY: only `alternative!(runtime, ...)` emits into this section, as above.
    unsafe { section(&__alt_start, &__alt_end) }
}

/// The static-key sites (`__jump_table`).
pub fn jump_entries() -> &'static [JumpEntry] {
    // SAFETY: only `static_branch_*!` emits into this section: whole, 8-aligned
    // `JumpEntry`s.
    unsafe { section(&__jump_table_start, &__jump_table_end) }
}

/// The static keys (`.static_keys`).
pub fn static_keys() -> &'static [&'static StaticKey] {
    // SAFETY: only `define_static_key!` emits into this section: one 8-aligned
    // `&'static StaticKey` each.
    unsafe { section(&__static_keys_start, &__static_keys_end) }
}
