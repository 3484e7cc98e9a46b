//! Arm semihosting (QEMU runs with `-semihosting-config enable=on,target=native`): the
//! console of last resort and the way the run reports its exit status.
//!
//! A call is `HLT #0xF000` with the operation in x0 and a parameter in x1. If
//! semihosting is not enabled, the `HLT` traps as an undefined instruction: the
//! exception handler asks `trapped`, which recognises that exact instruction, marks
//! semihosting unavailable and has the handler skip it; every later call then returns
//! `None` at once. A leaf: it names no other module of the port.

use core::arch::global_asm;
use core::sync::atomic::{AtomicBool, Ordering};

/// Semihosting operation SYS_WRITE0: write a NUL-terminated string to the console.
const SYS_WRITE0: u64 = 0x04;
/// Semihosting operation SYS_EXIT.
const SYS_EXIT: u64 = 0x18;
/// SYS_EXIT reason: the application exited (the subcode is the exit status).
const ADP_STOPPED_APPLICATION_EXIT: u64 = 0x20026;

/// The SYS_EXIT block for a failure, used by the exception vectors' runaway path.
pub(crate) static EXIT_FAILURE_BLOCK: [u64; 2] = [ADP_STOPPED_APPLICATION_EXIT, 1];

/// Set once a semihosting `HLT` trapped: semihosting is off, do not try again.
static SEMIHOSTING_BROKEN: AtomicBool = AtomicBool::new(false);

global_asm!(
    ".pushsection .text.nopatch, \"ax\"",
    ".balign 4",
    ".global pm_semihost_call",
    ".type pm_semihost_call, %function",
    "pm_semihost_call:",
    ".global pm_semihost_hlt",
    "pm_semihost_hlt:",
    "    hlt #0xf000",
    "    ret",
    ".size pm_semihost_call, . - pm_semihost_call",
    ".popsection",
);

unsafe extern "C" {
    /// `HLT #0xF000` with x0 = operation, x1 = parameter; returns x0.
    fn pm_semihost_call(op: u64, param: u64) -> u64;
    /// The address of that `HLT` (to recognise its trap).
    safe static pm_semihost_hlt: [u8; 0];
}

/// Makes a semihosting call; `None` if semihosting is unavailable.
///
/// # Safety
/// `param` must be what operation `op` expects (for the operations used here, a pointer
/// to memory that stays valid and readable during the call).
unsafe fn semihost(op: u64, param: u64) -> Option<u64> {
    if SEMIHOSTING_BROKEN.load(Ordering::Relaxed) {
        return None;
    }
    // SAFETY: the debugger (QEMU) reads the parameter block as the caller promised;
    // the call follows the AAPCS64 (an `extern "C"` function).
    let ret = unsafe { pm_semihost_call(op, param) };
    if SEMIHOSTING_BROKEN.load(Ordering::Relaxed) {
        None
    } else {
        Some(ret)
    }
}

/// Called by the synchronous-exception handler: if `elr` is the semihosting `HLT`, the
/// call trapped because semihosting is disabled. Marks it unavailable and returns true
/// (the handler then skips the instruction).
pub(crate) fn trapped(elr: u64) -> bool {
    if elr as usize == pm_semihost_hlt.as_ptr() as usize {
        SEMIHOSTING_BROKEN.store(true, Ordering::Relaxed);
        true
    } else {
        false
    }
}

/// Writes bytes to the semihosting console (used before the UART is up, and when the
/// DTB names no UART). Silently drops them if semihosting is unavailable.
pub fn write(bytes: &[u8]) {
    for chunk in bytes.chunks(63) {
        let mut buf = [0u8; 64];
        buf[..chunk.len()].copy_from_slice(chunk);
        // Interior NULs would end the string early; show them as '?'.
        for b in &mut buf[..chunk.len()] {
            if *b == 0 {
                *b = b'?';
            }
        }
        // SAFETY: SYS_WRITE0 reads the NUL-terminated string at `buf`, which lives
        // until the call returns.
        if unsafe { semihost(SYS_WRITE0, buf.as_ptr() as u64) }.is_none() {
            return;
        }
    }
}

/// SYS_EXIT with reason `ADP_Stopped_ApplicationExit`: QEMU exits with status 0 if
/// `success`, 1 otherwise. Returns only if semihosting is unavailable.
pub fn exit(success: bool) {
    let block = [ADP_STOPPED_APPLICATION_EXIT, if success { 0 } else { 1 }];
    // SAFETY: SYS_EXIT reads the two-word block, which lives on this stack.
    let _ = unsafe { semihost(SYS_EXIT, block.as_ptr() as u64) };
}
