//! Ending the run through QEMU's `isa-debug-exit` (iobase 0xf4): writing v makes QEMU
//! exit with status (v << 1) | 1. Success is 0x10 (status 33), failure 0x11 (35):
//! both differ from 0, which is what a triple fault under `-no-reboot` gives.

use super::{console, cpu, timer};

const DEBUG_EXIT_PORT: u16 = 0xf4;
/// QEMU exit status 33.
pub const SUCCESS: u32 = 0x10;
/// QEMU exit status 35.
pub const FAILURE: u32 = 0x11;

/// Ends the run. Halts if the exit device is missing.
pub fn exit(success: bool) -> ! {
    cpu::cli_save();
    console::flush_for_exit();
    // SAFETY: QEMU's isa-debug-exit port; ending the run is the point.
    unsafe { cpu::outl(DEBUG_EXIT_PORT, if success { SUCCESS } else { FAILURE }) };
    // QEMU ends the run asynchronously to the vCPU: give it a moment before deciding
    // the device is missing.
    timer::delay_ns(500_000_000);
    console::write_raw_forced(b"exit: no isa-debug-exit device; halting\n");
    cpu::halt_forever()
}
