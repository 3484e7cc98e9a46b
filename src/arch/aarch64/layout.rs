//! The kernel image layout: linker-script symbols, the per-CPU stacks and the
//! exception stacks.
//!
//! Stack slot `i` (one per possible CPU) is `[guard page | stack]` at
//! `STACKS + i * STACK_STRIDE`; the guard page is left unmapped by [`super::mmu`], so a
//! stack overflow faults instead of silently running into the next CPU's stack, and the
//! exception entry switches to the CPU's exception stack to report it (see
//! `boot/aarch64/vectors.S`).

use crate::MAX_CPUS;
use core::cell::UnsafeCell;
use core::ops::Range;

/// Usable bytes of each CPU's stack.
pub const STACK_SIZE: usize = 64 * 1024;
/// Bytes of the unmapped guard gap below each CPU's stack.
pub const STACK_GUARD: usize = 4096;
/// Distance between two CPUs' stack slots.
pub const STACK_STRIDE: usize = STACK_SIZE + STACK_GUARD;
/// log2 of the size of each CPU's exception stack (used only to report a fatal
/// exception taken with an unusable SP).
pub const EXCEPTION_STACK_SHIFT: usize = 14;
/// Size of each CPU's exception stack.
pub const EXCEPTION_STACK_SIZE: usize = 1 << EXCEPTION_STACK_SHIFT;

// The assembly computes `slot = base + (i << 16) + (i << 12)`.
const _: () = assert!(STACK_STRIDE == (1 << 16) + (1 << 12));
const _: () = assert!(STACK_GUARD == 4096 && STACK_SIZE.is_multiple_of(4096));

/// Memory for stacks: only ever accessed through raw pointers (by the CPU that owns a
/// slot, as its stack), never through Rust references.
#[repr(C, align(4096))]
pub struct StackArea<const N: usize>(UnsafeCell<[u8; N]>);

// SAFETY: the area is never read or written through this type; each CPU uses only its
// own slot, as a stack, via SP.
unsafe impl<const N: usize> Sync for StackArea<N> {}

impl<const N: usize> StackArea<N> {
    /// Address of the first byte.
    pub fn base(&self) -> usize {
        self.0.get() as usize
    }
}

/// The per-CPU stacks (linker section `.stacks`: not zeroed at boot).
#[unsafe(link_section = ".bss.pm_stacks")]
pub static STACKS: StackArea<{ STACK_STRIDE * MAX_CPUS }> =
    StackArea(UnsafeCell::new([0; STACK_STRIDE * MAX_CPUS]));

/// The per-CPU exception stacks, used only when an exception finds SP unusable.
#[unsafe(link_section = ".bss.pm_stacks.exception")]
pub static EXCEPTION_STACKS: StackArea<{ EXCEPTION_STACK_SIZE * MAX_CPUS }> =
    StackArea(UnsafeCell::new([0; EXCEPTION_STACK_SIZE * MAX_CPUS]));

/// The stack bytes of `cpu` (without its guard page).
pub fn stack_range(cpu: usize) -> Range<usize> {
    let slot = STACKS.base() + cpu * STACK_STRIDE;
    slot + STACK_GUARD..slot + STACK_STRIDE
}

/// The guard page below the stack of `cpu`.
pub fn stack_guard(cpu: usize) -> Range<usize> {
    let slot = STACKS.base() + cpu * STACK_STRIDE;
    slot..slot + STACK_GUARD
}

// Linker-script symbols. Zero-sized so that naming them can never read memory.
unsafe extern "C" {
    safe static __image_start: [u8; 0];
    safe static __image_end: [u8; 0];
    safe static __text_start: [u8; 0];
    safe static __text_end: [u8; 0];
    safe static __nopatch_start: [u8; 0];
    safe static __nopatch_end: [u8; 0];
    safe static __boot_start: [u8; 0];
    safe static __boot_end: [u8; 0];
    safe static __kprobes_start: [u8; 0];
    safe static __kprobes_end: [u8; 0];
    safe static __rodata_start: [u8; 0];
    safe static __rodata_end: [u8; 0];
    safe static __data_start: [u8; 0];
    safe static __stacks_start: [u8; 0];
    safe static __stacks_end: [u8; 0];
    safe static __bss_start: [u8; 0];
    safe static __bss_end: [u8; 0];
    safe static __user_text_start: [u8; 0];
    safe static __user_text_end: [u8; 0];
    safe static __user_data_start: [u8; 0];
    safe static __user_data_end: [u8; 0];
}

fn range(start: &[u8; 0], end: &[u8; 0]) -> Range<usize> {
    start.as_ptr() as usize..end.as_ptr() as usize
}

/// All kernel code (`.text*`, page aligned): mapped read-only and executable.
#[inline]
pub fn text_range() -> Range<usize> {
    range(&__text_start, &__text_end)
}

/// Code that must never be patched: `.text.boot` followed by `.text.nopatch` (exception
/// vectors, IRQ entry and dispatch, the stop-IPI handler, DAIF masking, cache
/// maintenance, the alias poke). A subrange of [`text_range`].
#[inline]
pub fn nopatch_range() -> Range<usize> {
    range(&__nopatch_start, &__nopatch_end)
}

/// Boot code alone (`.text.boot`); the start of [`nopatch_range`].
#[inline]
pub fn boot_range() -> Range<usize> {
    range(&__boot_start, &__boot_end)
}

/// `.text.kprobes`: the kprobes hit path and XOL slots (no probe, no patch there).
#[inline]
pub fn kprobes_range() -> Range<usize> {
    range(&__kprobes_start, &__kprobes_end)
}

/// Read-only data (`.rodata`, page aligned).
#[inline]
pub fn rodata_range() -> Range<usize> {
    range(&__rodata_start, &__rodata_end)
}

/// Everything writable: `.data`, the stacks and `.bss`, up to the end of the image.
#[inline]
pub fn writable_range() -> Range<usize> {
    range(&__data_start, &__image_end)
}

/// The stack area (guard pages included).
#[inline]
pub fn stacks_range() -> Range<usize> {
    range(&__stacks_start, &__stacks_end)
}

/// `.bss`.
#[inline]
pub fn bss_range() -> Range<usize> {
    range(&__bss_start, &__bss_end)
}

/// The whole image, page aligned.
#[inline]
pub fn image_range() -> Range<usize> {
    range(&__image_start, &__image_end)
}

/// The user programs (`.user_text`, page aligned): EL0 read-only executable.
#[inline]
pub fn user_text_range() -> Range<usize> {
    range(&__user_text_start, &__user_text_end)
}

/// The user programs' data (`.user_data`, page aligned): EL0 read-write.
#[inline]
pub fn user_data_range() -> Range<usize> {
    range(&__user_data_start, &__user_data_end)
}
