//! Ending the run.
//!
//! [`exit`] tries semihosting SYS_EXIT ([`semihosting::exit`]) first, then PSCI
//! SYSTEM_OFF, then waits with everything masked.

use super::{console, cpu, psci, semihosting};

/// Ends the run: QEMU exits with status 0 if `success`, 1 otherwise.
///
/// Masks every exception on the calling CPU, flushes its console line, then tries
/// semihosting SYS_EXIT, PSCI SYSTEM_OFF (QEMU then exits 0, so a failure would look
/// like success: SYSTEM_OFF is tried only after semihosting is known to be missing),
/// and finally waits forever.
pub fn exit(success: bool) -> ! {
    cpu::mask_all();
    console::flush_for_exit();
    semihosting::exit(success);
    console::write_raw_forced(if success {
        b"exit: semihosting unavailable; PSCI SYSTEM_OFF\n"
    } else {
        b"exit: FAILURE, but semihosting is unavailable to report it; PSCI SYSTEM_OFF\n"
    });
    psci::system_off();
    loop {
        // SAFETY: WFI only waits; everything is masked, so this is the end.
        unsafe { core::arch::asm!("wfi", options(nomem, nostack, preserves_flags)) };
    }
}
