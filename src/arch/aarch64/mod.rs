//! The AArch64 platform: QEMU `virt` (or anything with a DTB, GICv3, PSCI and a
//! PL011), booted at EL1 or EL2.
//!
//! | module          | concern                                                      |
//! |-----------------|--------------------------------------------------------------|
//! | [`boot`]        | boot assembly, Rust entry points, the boot sequence          |
//! | [`dtb`]         | the machine description ([`BootInfo`], [`boot_info`])        |
//! | [`console`]     | PL011 console, [`kprint!`](crate::kprint)/[`kprintln!`](crate::kprintln) |
//! | [`mmu`]         | identity map, W^X, the text-patching alias ([`mmu::poke_text`]) |
//! | [`cache`]       | instruction/data cache maintenance                           |
//! | [`exceptions`]  | trap frames, the BRK hook, fatal exception reports           |
//! | [`gic`]         | GICv3 set-up, SGIs, IRQ dispatch                             |
//! | [`smp`]         | secondary bring-up (PSCI), online CPUs                       |
//! | [`psci`]        | PSCI calls through the DTB's conduit                         |
//! | [`timer`]       | nanosecond clock from the generic timer                      |
//! | [`exit`]        | ending the run (semihosting, PSCI)                           |
//! | [`cpu`]         | DAIF masking, barriers, identity registers                   |
//! | [`layout`]      | linker symbols and stacks                                    |
//! | [`selftest`]    | platform self-tests (bootarg `platform_selftest`)            |
//!
//! [`Aarch64`] implements [`crate::stop::Arch`], and [`STOP`] is the system's stop
//! machine, reached through [`gic::STOP_SGI`].

pub mod boot;
pub mod cache;
pub mod console;
pub mod cpu;
pub mod dtb;
pub mod exceptions;
pub mod exit;
pub mod gic;
pub mod layout;
pub mod mmu;
pub mod psci;
pub mod selftest;
pub mod smp;
pub mod timer;

pub use dtb::{BootInfo, boot_info};

use crate::CpuSet;
use crate::stop::{Arch, StopMachine};

/// The AArch64 implementation of [`Arch`]: a handle to "this machine".
///
/// Masking covers D, A, I and F (`MSR DAIFSet, #0xf`), so a masked CPU takes no
/// asynchronous exception: IRQ, FIQ, SError and debug exceptions all wait. (This kernel
/// uses no pseudo-NMI and no SDEI.) Waiting uses `WFE`, woken by [`Arch::wake_waiters`]
/// (`SEV`) or at the latest by the timer event stream (~100 us), so a wait never
/// depends on an event arriving.
#[derive(Clone, Copy, Debug, Default)]
pub struct Aarch64;

// SAFETY: see each method. `cpu_id` is TPIDR_EL1, written once per CPU by the boot code
// with its logical index (< MAX_CPUS), which is unique, stable and in `online_cpus` for
// any CPU that runs kernel code after bring-up; `mask_all` masks D, A, I and F until
// `restore`; `send_stop_ipi` sends STOP_SGI, whose handler (registered before any CPU
// unmasks IRQs) calls `STOP.handle_stop_ipi()`, and every online CPU has it enabled;
// `sync_context` is an ISB.
unsafe impl Arch for Aarch64 {
    type MaskState = u64;

    #[inline(always)]
    fn cpu_id(&self) -> usize {
        cpu::current_cpu()
    }

    #[inline(always)]
    fn online_cpus(&self) -> CpuSet {
        smp::online_cpus()
    }

    #[inline(always)]
    fn mask_all(&self) -> u64 {
        cpu::mask_all()
    }

    #[inline(always)]
    fn restore(&self, saved: u64) {
        cpu::restore(saved)
    }

    #[inline(always)]
    fn all_masked(&self) -> bool {
        cpu::all_masked()
    }

    #[inline(always)]
    fn send_stop_ipi(&self, targets: CpuSet) {
        gic::send_sgi(gic::STOP_SGI, targets.without(cpu::current_cpu()))
    }

    #[inline(always)]
    fn sync_context(&self) {
        cpu::isb()
    }

    #[inline(always)]
    fn relax(&self) {
        cpu::wfe()
    }

    #[inline(always)]
    fn wake_waiters(&self) {
        cpu::sev()
    }

    #[inline(always)]
    fn now_ns(&self) -> u64 {
        timer::now_ns()
    }
}

/// The system's stop machine.
pub static STOP: StopMachine<Aarch64> = StopMachine::new(Aarch64);

/// The [`gic::STOP_SGI`] handler.
#[unsafe(link_section = ".text.nopatch")]
fn stop_sgi_handler(_cpu: usize) {
    STOP.handle_stop_ipi();
}
