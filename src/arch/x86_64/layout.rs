//! Linker symbols, stacks and fixed low-memory pages.

use crate::MAX_CPUS;
use core::cell::UnsafeCell;
use core::ops::Range;

/// Kernel stack per CPU: 64 KiB as on arm64, since frames holding per-CPU arrays
/// (`[u64; MAX_CPUS]` in the self-tests, a `StopError` with one code per CPU) grow
/// with `MAX_CPUS`.
pub const STACK_SIZE: usize = 64 * 1024;
/// Each IST stack (NMI, #DF, #MC) per CPU.
pub const IST_SIZE: usize = 8 * 1024;
/// Where the AP trampoline is copied (real-mode start address: page 8).
pub const TRAMPOLINE_BASE: usize = 0x8000;
/// The AP trampoline's parameter page (read-write, never executable).
pub const TRAMPOLINE_DATA: usize = 0x9000;

unsafe extern "C" {
    static __text_start: u8;
    static __text_end: u8;
    static __nopatch_start: u8;
    static __boot_start: u8;
    static __boot_end: u8;
    static __nopatch_end: u8;
    static __vectors_start: u8;
    static __vectors_end: u8;
    static __kprobes_start: u8;
    static __kprobes_end: u8;
    static __rodata_start: u8;
    static __rodata_end: u8;
    static __image_end: u8;
    static __user_text_start: u8;
    static __user_text_end: u8;
    static __user_data_start: u8;
    static __user_data_end: u8;
}

macro_rules! sym_addr {
    ($s:ident) => {
        // Only the address of a linker symbol is taken, never its contents.
        &raw const $s as usize
    };
}

/// Kernel text `[start, end)`.
pub fn text() -> (usize, usize) {
    (sym_addr!(__text_start), sym_addr!(__text_end))
}
/// Code the patcher must never touch (boot, rendezvous, entry stubs).
pub fn nopatch() -> (usize, usize) {
    (sym_addr!(__nopatch_start), sym_addr!(__nopatch_end))
}
/// The user programs (`.user_text`): ring 3 read-only and executable.
pub fn user_text() -> Range<usize> {
    sym_addr!(__user_text_start)..sym_addr!(__user_text_end)
}

/// The user programs' data (`.user_data`): ring 3 read-write, never executable.
pub fn user_data() -> Range<usize> {
    sym_addr!(__user_data_start)..sym_addr!(__user_data_end)
}

/// Kernel text as a range.
pub fn text_range() -> Range<usize> {
    let (s, e) = text();
    s..e
}

/// Code the patcher must never touch, as a range (contains [`boot_range`]).
pub fn nopatch_range() -> Range<usize> {
    let (s, e) = nopatch();
    s..e
}

/// The exception entry stubs (`boot/x86_64/vectors.S`, inside [`nopatch_range`]).
pub fn vectors_range() -> Range<usize> {
    sym_addr!(__vectors_start)..sym_addr!(__vectors_end)
}

/// `.text.kprobes`: the kprobes hit path and XOL slots (no probe there).
pub fn kprobes_range() -> Range<usize> {
    sym_addr!(__kprobes_start)..sym_addr!(__kprobes_end)
}

/// Boot code: the PVH entry and the AP trampoline's image (copied, never run in place).
pub fn boot_range() -> Range<usize> {
    sym_addr!(__boot_start)..sym_addr!(__boot_end)
}

/// Read-only data `[start, end)`.
pub fn rodata() -> (usize, usize) {
    (sym_addr!(__rodata_start), sym_addr!(__rodata_end))
}
/// End of the image.
pub fn image_end() -> usize {
    sym_addr!(__image_end)
}

/// Stack memory that Rust never reads or writes directly (only through the CPUs'
/// stack pointers).
#[repr(C, align(4096))]
pub struct Stacks<const N: usize>(UnsafeCell<[u8; N]>);

// SAFETY: each stack is used by exactly one CPU through its stack pointer; Rust code
// only computes addresses inside it.
unsafe impl<const N: usize> Sync for Stacks<N> {}

/// A stack slot: one unmapped guard page below each kernel stack, so an overflow
/// faults (and the #PF, unable to push on the dead stack, becomes a #DF on its IST
/// stack, which reports it) instead of running into the next CPU's stack.
pub const STACK_SLOT: usize = STACK_SIZE + GUARD_SIZE;
const GUARD_SIZE: usize = 4096;

/// Kernel stacks: CPU `i` has slot `i`, a guard page then its stack.
#[unsafe(link_section = ".pm_stacks")]
#[unsafe(no_mangle)]
pub static X86_STACKS: Stacks<{ STACK_SLOT * MAX_CPUS }> =
    Stacks(UnsafeCell::new([0; STACK_SLOT * MAX_CPUS]));

#[unsafe(link_section = ".pm_stacks")]
static IST_STACKS: Stacks<{ IST_SIZE * 3 * MAX_CPUS }> =
    Stacks(UnsafeCell::new([0; IST_SIZE * 3 * MAX_CPUS]));

/// Top of CPU `cpu`'s kernel stack.
pub fn stack_top(cpu: usize) -> usize {
    X86_STACKS.0.get() as usize + (cpu + 1) * STACK_SLOT
}

/// Whether the page at `pa` is a stack guard page (left unmapped).
pub fn is_stack_guard(pa: usize) -> bool {
    let base = X86_STACKS.0.get() as usize;
    pa >= base && pa < base + STACK_SLOT * MAX_CPUS && (pa - base) % STACK_SLOT < GUARD_SIZE
}

/// Top of CPU `cpu`'s IST stack `which` (0 NMI, 1 #DF, 2 #MC).
pub fn ist_top(cpu: usize, which: usize) -> usize {
    IST_STACKS.0.get() as usize + (cpu * 3 + which + 1) * IST_SIZE
}
