//! The x86_64 platform: QEMU q35 (or anything with PVH boot, ACPI, a local APIC and a
//! 16550 at 0x3f8), booted through the PVH ELF note.
//!
//! | module         | concern                                                       |
//! |----------------|---------------------------------------------------------------|
//! | [`selftest`]   | the KTAP self-tests                                           |
//! | [`boot`]       | PVH entry (assembly), the boot CPU's and the APs' sequences, bootargs |
//! | [`alternatives`] | applying the alternatives tables (boot CPU, then `patch_machine`) |
//! | [`traps`]      | IDT, entry stubs, trap dispatch, kernel entry from ring 3, fatal exception reports |
//! | [`user`]       | ring 3: user programs, entering them, their system calls and faults, SMEP/SMAP |
//! | [`kprobes`]    | kprobes: INT3 arming, emulation, out-of-line single step (#DB) |
//! | [`fixup`]      | the fixup point of stop functions that fault (`setjmp`/`longjmp`) |
//! | [`text_poke`]  | the INT3 live-patching protocol ([`text_poke::text_poke_bp`]) |
//! | [`nmi`]        | NMI IPIs, NMI handlers, per-CPU NMI state                     |
//! | [`text`]       | kernel text for the patcher ([`text::KERNEL_TEXT`])           |
//! | [`ipi`]        | the IPI vectors, test IPIs and their handlers, the sync IPI   |
//! | [`smp`]        | INIT-SIPI-SIPI bring-up, online CPUs, APIC IDs                |
//! | [`paging`]     | identity map with W^X, the text alias ([`paging::poke_text`]) |
//! | [`exit`]       | ending the run through isa-debug-exit                         |
//! | [`console`]    | 16550 console, [`kprint!`](crate::kprint)/[`kprintln!`](crate::kprintln) |
//! | [`apic`]       | local APIC (x2APIC or xAPIC), IPIs, 8259 masking              |
//! | [`irq`]        | "IRQs off" (`cli`), which NMIs pass                           |
//! | [`gdt`]        | per-CPU GDT and TSS with IST stacks (NMI, #DF, #MC)           |
//! | [`timer`]      | the TSC nanosecond clock                                      |
//! | [`frame`]      | the trap frame the entry stubs build                          |
//! | [`madt`]       | APIC IDs from the ACPI MADT                                   |
//! | [`layout`]     | linker symbols, stacks, low-memory pages                      |
//! | [`nesting`]    | per-CPU count of trap handlers in flight (`call_context`'s)   |
//! | [`user_context`] | every CPU's context state word ([`user_context::USER_CONTEXTS`]) |
//! | [`cpu`]        | single instructions, the per-CPU index (GS base), CPU features |
//!
//! The table goes from top to bottom: a module uses only modules below it (and this
//! one's [`X86_64`]/[`STOP`], which `traps`, `text_poke` and `nmi` use), never one
//! above, so the modules form a DAG (`tests/layering.rs` checks it). One edge is still
//! known to point up: [`boot`] calls [`selftest`].
//!
//! [`X86_64`] implements [`crate::stop::Arch`]; [`STOP`] is the system's stop machine,
//! reached through [`ipi::STOP_VECTOR`].

pub mod alternatives;
pub mod apic;
pub mod boot;
pub mod console;
pub mod cpu;
pub mod exit;
pub mod fixup;
pub mod frame;
pub mod gdt;
pub mod ipi;
pub mod irq;
pub mod jump_label;
pub mod kprobes;
pub mod layout;
pub mod madt;
pub mod nesting;
pub mod nmi;
pub mod paging;
pub mod selftest;
pub mod smp;
pub mod text;
pub mod text_poke;
pub mod timer;
pub mod traps;
pub mod user;
pub mod user_context;

pub use paging::{alias_mapped, poke_text};

use crate::CpuSet;
use crate::stop::{Arch, StopMachine};

/// The x86_64 implementation of [`Arch`]: a handle to "this machine".
///
/// [`Arch::mask_all`] and [`Arch::mask_irqs`] are both `cli`: RFLAGS.IF is the only
/// maskable-interrupt switch. NMIs cannot be masked by IF (nor by anything else
/// software controls, short of being inside an NMI handler), so on x86 a CPU inside a
/// `MaskLevel::All` window can still take an NMI; the core's quiescence evidence
/// ([`Arch::all_masked`]) therefore means "IF clear", and patching code that NMI
/// handlers run needs the NMI-side protocol, not masking: `nmis_pass_mask_all` hands the
/// core this CPU's self-NMI, so `patch_machine` writes from NMI context and the other
/// CPUs' NMIs wait for the writes in the stop machine's slot
/// (`StopMachine::stop_machine_nmi_free`).
#[derive(Clone, Copy, Debug, Default)]
pub struct X86_64;

// SAFETY: `cpu_id` reads `gs:[0]`, which each CPU points at its own logical index
// (< MAX_CPUS) once, before it runs any code that asks and before it is marked online,
// so it is unique, stable and in `online_cpus`. `mask_all` clears RFLAGS.IF, which keeps
// out every maskable interrupt until `restore` (NMIs and exceptions are out of scope, as
// the trait allows; see the type's docs). `send_stop_ipi` sends STOP_VECTOR by APIC ID
// to each target; every online CPU has the IDT with that gate loaded and its APIC
// enabled before it is marked online, and the handler calls `STOP.handle_stop_ipi()`.
// `sync_context` is `cpuid`, a serialising instruction (SDM 9.3: what a cross-modifying
// writer published is fetched afresh after it). `nmis_pass_mask_all` is `X86_64`'s own
// `NmiArch` self-NMI.
unsafe impl Arch for X86_64 {
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
        cpu::cli_save()
    }

    #[inline(always)]
    fn mask_irqs(&self) -> u64 {
        cpu::cli_save()
    }

    #[inline(always)]
    fn restore(&self, saved: u64) {
        cpu::restore_if(saved)
    }

    #[inline(always)]
    fn all_masked(&self) -> bool {
        !cpu::irqs_enabled()
    }

    /// One ICR write with the all-excluding-self shorthand when the targets are every
    /// other CPU and every CPU the MADT lists is online (the shorthand would also reach
    /// one still waiting for its SIPI); otherwise one write per x2APIC cluster (16
    /// CPUs), or per target in xAPIC mode ([`ipi::form_for`]).
    #[unsafe(link_section = ".text.nopatch")]
    fn send_stop_ipi(&self, targets: CpuSet) {
        let targets = targets.without(cpu::current_cpu());
        if targets.is_empty() {
            return;
        }
        let vector = apic::DM_FIXED | u32::from(ipi::STOP_VECTOR);
        ipi::send_to(targets, vector, ipi::form_for(targets));
    }

    #[inline(always)]
    fn context_states(&self) -> Option<&crate::stop::ContextStates> {
        Some(&user_context::USER_CONTEXTS)
    }

    fn sync_context(&self) {
        // Inline `cpuid`, not the `cpu::serialize` alternative: the rendezvous's exit
        // serialises in place, before its `sti`, where tests/kernel_image.rs sees it.
        cpu::serialize_inline()
    }

    #[inline(always)]
    fn relax(&self) {
        cpu::pause()
    }

    #[inline(always)]
    fn now_ns(&self) -> u64 {
        timer::now_ns()
    }

    /// Through [`fixup`]: a context save, then the function; a fatal exception in it
    /// resumes there.
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
    /// handler: the trap dispatcher's nesting count ([`nesting::in_handler`]); masked:
    /// RFLAGS.IF clear.
    #[inline(always)]
    fn call_context(&self) -> crate::stop::CallContext {
        use crate::stop::CallContext;
        if nesting::in_nmi_of(cpu::current_cpu()) {
            CallContext::Nmi
        } else if nesting::in_handler() {
            CallContext::Irq
        } else if !cpu::irqs_enabled() {
            CallContext::IrqsMasked
        } else {
            CallContext::Normal
        }
    }

    /// NMIs pass `cli`: code patching writes from the patcher's own NMI.
    #[cfg(feature = "stop-machine-nmi")]
    #[inline(always)]
    fn nmis_pass_mask_all(&self) -> Option<&dyn crate::stop::RaiseNmi> {
        Some(self)
    }
}

/// The system's stop machine.
pub static STOP: StopMachine<X86_64> = StopMachine::new(X86_64);
