//! The AArch64 platform: QEMU `virt` (or anything with a DTB, GICv3, PSCI and a
//! PL011), booted at EL1 or EL2.
//!
//! | module          | concern                                                      |
//! |-----------------|--------------------------------------------------------------|
//! | [`selftest`]    | platform self-tests (`tests=platform`), `platform_selftest=`  |
//! | [`boot`]        | boot assembly, Rust entry points, the boot sequence          |
//! | [`alternatives`]| applying the alternatives tables (boot CPU, then `patch_machine`) |
//! | [`kprobes`]     | kprobes: the BRK hook, XOL slots, arming ([`kprobes::KPROBES`]) |
//! | [`kprobes_insn`]| which A64 instructions run out of line, simulating the rest  |
//! | [`user`]        | user mode (EL0): the user programs, entry/exit, syscalls, faults |
//! | [`text`]        | kernel text for the patcher ([`text::KERNEL_TEXT`])          |
//! | [`exceptions`]  | trap frames, the BRK hook, fatal exception reports           |
//! | [`fixup`]       | the fixup point of stop functions that fault (`setjmp`/`longjmp`) |
//! | [`irq`]         | the IRQ exception: acknowledge, dispatch, EOI                |
//! | [`nmi`]         | NMI IPIs, NMI handlers, per-CPU NMI state                    |
//! | [`gic`]         | GICv3 set-up, SGIs and their numbers, acknowledge/EOI        |
//! | [`smp`]         | secondary bring-up (PSCI), online CPUs                       |
//! | [`mmu`]         | identity map, W^X, the text-patching alias ([`mmu::poke_text`]) |
//! | [`exit`]        | ending the run (semihosting, then PSCI)                      |
//! | [`console`]     | PL011 console, [`kprint!`](crate::kprint)/[`kprintln!`](crate::kprintln) |
//! | [`irqflags`]    | IRQs off/on (`local_irq_*`), `mask_all`/`mask_irqs`          |
//! | [`cache`]       | instruction/data cache maintenance                           |
//! | [`dtb`]         | the machine description ([`BootInfo`], [`boot_info`])        |
//! | [`atomic`]      | counters with LSE atomics or LL/SC, chosen by alternatives   |
//! | [`cpu`]         | DAIF masking, barriers, identity registers, CPU features     |
//! | [`nmi_mode`]    | the NMI mode (pseudo-NMI, FEAT_NMI) and the priorities       |
//! | [`semihosting`] | Arm semihosting calls (console of last resort, exit status)  |
//! | [`psci`]        | PSCI calls through the DTB's conduit                         |
//! | [`timer`]       | nanosecond clock from the generic timer                      |
//! | [`layout`]      | linker symbols and stacks                                    |
//! | [`user_context`]| every CPU's context state word ([`user_context::USER_CONTEXTS`]) |
//! | [`nesting`]     | per-CPU exception nesting depth (the vectors', `call_context`'s) |
//!
//! The table goes from top to bottom: a module uses only modules below it (and this
//! one's [`Aarch64`]/[`STOP`], which `nmi`, `alternatives` and `boot` use), never one above, so the
//! modules form a DAG (`tests/layering.rs` checks it). The leaves ([`nmi_mode`],
//! [`semihosting`], [`psci`], [`layout`], [`user_context`]) use no other module of the port. //!
//! [`Aarch64`] implements [`crate::stop::Arch`], and [`STOP`] is the system's stop
//! machine, reached through [`gic::STOP_SGI`].

pub mod alternatives;
pub mod assumptions;
pub mod atomic;
pub mod boot;
pub mod cache;
pub mod console;
pub mod cpu;
pub mod dtb;
pub mod exceptions;
pub mod exit;
pub mod fixup;
pub mod gic;
pub mod irq;
pub mod irqflags;
pub mod jump_label;
pub mod kprobes;
pub mod kprobes_insn;
pub mod layout;
pub mod mmu;
pub mod nesting;
pub mod nmi;
pub mod nmi_mode;
pub mod psci;
pub mod selftest;
pub mod semihosting;
pub mod smp;
pub mod text;
pub mod timer;
pub mod user;
pub mod user_context;

pub use dtb::{BootInfo, boot_info};

use crate::stop::{Arch, StopMachine};
use crate::{CpuSet, MAX_CPUS};
use core::sync::atomic::{AtomicU8, Ordering};

/// The AArch64 implementation of [`Arch`]: a handle to "this machine".
///
/// [`Arch::mask_all`] masks D, A, I and F (`MSR DAIFSet, #0xf`) and, with FEAT_NMI in
/// use, PSTATE.ALLINT, so a masked CPU takes no asynchronous exception at all: IRQ,
/// FIQ, NMIs (pseudo or superpriority), SError and debug exceptions all wait (this
/// kernel has no SDEI). [`Arch::mask_irqs`] masks normal interrupts only and lets NMIs
/// in: with `pseudo_nmi=on` it lowers ICC_PMR_EL1 to [`nmi_mode::PMR_IRQOFF`] and clears
/// PSTATE.I (and ALLINT) if set; with `pseudo_nmi=off` it sets PSTATE.I. The saved state
/// is DAIF, ALLINT and the PMR ([`irqflags::MaskState`]). Waiting uses `WFE`, woken by
/// [`Arch::wake_waiters`] (`SEV`) or at the latest by the timer event stream (~100 us),
/// so a wait never depends on an event arriving.
///
/// With NMIs, the stop IPI is NMI-class ([`gic`]): it reaches a CPU that spins with
/// IRQs masked by the PMR (not one that used [`Arch::mask_all`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct Aarch64;

// SAFETY: see each method. `cpu_id` is TPIDR_EL1, written once per CPU by the boot code
// with its logical index (< MAX_CPUS), which is unique, stable and in `online_cpus` for
// any CPU that runs kernel code after bring-up; `mask_all` masks D, A, I, F (and ALLINT
// with FEAT_NMI) until `restore`; `send_stop_ipi` sends STOP_SGI, whose handler
// (registered before any CPU unmasks IRQs) calls `STOP.handle_stop_ipi()`, and every
// online CPU has it enabled; `sync_context` is an ISB.
unsafe impl Arch for Aarch64 {
    type MaskState = irqflags::MaskState;

    #[inline(always)]
    fn cpu_id(&self) -> usize {
        cpu::current_cpu()
    }

    #[inline(always)]
    fn online_cpus(&self) -> CpuSet {
        smp::online_cpus()
    }

    #[inline(always)]
    fn mask_all(&self) -> irqflags::MaskState {
        irqflags::mask_all()
    }

    #[inline(always)]
    fn mask_irqs(&self) -> irqflags::MaskState {
        irqflags::mask_irqs()
    }

    #[inline(always)]
    fn restore(&self, saved: irqflags::MaskState) {
        irqflags::restore(saved)
    }

    #[inline(always)]
    fn all_masked(&self) -> bool {
        irqflags::all_masked()
    }

    #[inline(always)]
    fn send_stop_ipi(&self, targets: CpuSet) {
        gic::send_sgi(gic::STOP_SGI, targets.without(cpu::current_cpu()));
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

    fn context_states(&self) -> Option<&crate::stop::ContextStates> {
        Some(&user_context::USER_CONTEXTS)
    }

    /// Through [`fixup`]: a context save, then the function; a fatal synchronous
    /// exception in it resumes there.
    #[unsafe(link_section = ".text.nopatch")]
    #[inline(always)]
    unsafe fn call_catching_faults(
        &self,
        cpu: usize,
        function: &dyn crate::stop::StopFunction,
    ) -> Result<crate::stop::StopFnResult, crate::stop::StopFault> {
        // SAFETY: forwarded from the caller.
        unsafe { fixup::call_catching_faults(cpu, function) }
    }

    /// NMI: this CPU's NMI nesting count ([`nesting::in_nmi_of`]); interrupt or exception
    /// handler: the vectors' nesting depth; masked: PSTATE.I, or the PMR at or below
    /// [`nmi_mode::PMR_IRQOFF`] with pseudo-NMI ([`irqflags::irqs_disabled`]).
    #[inline(always)]
    fn call_context(&self) -> crate::stop::CallContext {
        use crate::stop::CallContext;
        let depth = nesting::depth_of(cpu::current_cpu());
        if nesting::in_nmi_of(cpu::current_cpu()) {
            CallContext::Nmi
        } else if depth > 0 {
            CallContext::Irq
        } else if irqflags::irqs_disabled() {
            CallContext::IrqsMasked
        } else {
            CallContext::Normal
        }
    }
}

/// The system's stop machine.
pub static STOP: StopMachine<Aarch64> = StopMachine::new(Aarch64);

/// The [`gic::STOP_SGI`] handler.
///
/// With NMIs ([`nmi_mode::pseudo_nmi_enabled`]) the stop IPI is NMI-class, so it also reaches
/// a CPU that spins with IRQs PMR-masked. [`irq::handle_irq_exception`] then ends it
/// (EOI) before calling this, and runs this with IRQs off (PMR = [`nmi_mode::PMR_IRQOFF`])
/// but NMIs on (PSTATE.I and ALLINT clear): a `MaskLevel::IrqsOnly` window still lets
/// the self-NMI of `stop_machine_nmi` in, and `MaskLevel::All` masks everything when
/// this CPU arrives in the core's rendezvous. The interrupted PMR, DAIF and ALLINT come back on return (trap
/// frame and SPSR). A CPU with everything masked ([`Arch::mask_all`]) is not reached;
/// the core's arrival timeout then names it. Without NMIs it is a normal interrupt and
/// this runs with PSTATE.I set, as before.
///
/// Re-entrancy. Because the stop IPI was ended before this runs and NMIs are open, a
/// second stop IPI can interrupt this handler. The core would cope with a nested call:
/// `handle_stop_ipi` joins a call only in its `Arrive` phase and only if this CPU has
/// not acknowledged it yet, so a stale IPI arriving while this CPU is in the rendezvous
/// (acknowledged `Arrive`, or any later phase) returns at once; and if one arrived after
/// this CPU loaded the state but before it acknowledged, the nested handler would take
/// part in the whole call and the outer one would fail its first acknowledgement (wrong
/// phase or generation) and leave, unmasking what it had just masked. But each new call's IPI
/// landing in the last instructions of the previous handler would nest one level deeper,
/// and trap frames are limited. So a nested stop IPI only records itself, and the outer
/// handler calls `handle_stop_ipi` again before it leaves (which returns at once if there
/// is nothing to join): nothing is lost, and the nesting is at most one stop IPI (plus
/// one NMI). The final check happens with everything masked, and the handler returns
/// that way (the IRQ path restores the interrupted state), so no IPI slips in between
/// the check and the return.
#[unsafe(link_section = ".text.nopatch")]
fn stop_sgi_handler(cpu: usize) {
    const IDLE: u8 = 0;
    const RUNNING: u8 = 1;
    const AGAIN: u8 = 2;
    // Relaxed throughout: only this CPU touches its slot (from nested handlers, which a
    // CPU sees in program order).
    let Some(state) = STOP_IPI_STATE.get(cpu) else {
        return;
    };
    if state.load(Ordering::Relaxed) != IDLE {
        state.store(AGAIN, Ordering::Relaxed);
        return;
    }
    loop {
        state.store(RUNNING, Ordering::Relaxed);
        STOP.handle_stop_ipi();
        let saved = cpu::mask_all();
        if state.load(Ordering::Relaxed) != AGAIN {
            state.store(IDLE, Ordering::Relaxed);
            // Return masked; the IRQ path restores the interrupted state.
            return;
        }
        cpu::restore(saved);
    }
}

/// Per CPU: whether [`stop_sgi_handler`] is running, and whether another stop IPI
/// arrived meanwhile.
static STOP_IPI_STATE: [AtomicU8; MAX_CPUS] = [const { AtomicU8::new(0) }; MAX_CPUS];
