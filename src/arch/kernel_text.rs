//! The running kernel's text, as one object both ports patch: the lock that serialises
//! every writer, and the protected ranges, computed once. Each port implements
//! [`crate::patch::Text`] for it next to its `poke_text` (`aarch64/text.rs`,
//! `x86_64/text.rs`).

use core::ops::Range;

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

impl KernelText {
    /// The lock every writer holds from validation to its last write.
    pub(crate) fn writer(&self) -> &spin::Mutex<()> {
        &self.writer
    }

    /// The code that must never be patched (the rendezvous's `.text.nopatch`, and boot
    /// code), from `ranges` the first time.
    pub(crate) fn protected(&self, ranges: fn() -> [Range<usize>; 2]) -> &[Range<usize>] {
        self.protected.call_once(ranges)
    }
}
