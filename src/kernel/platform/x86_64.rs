//! The kernel's platform names on x86_64 (see the table in the parent module).

use super::KprobeFixture;
use crate::arch::x86_64::{boot, cpu, layout, smp};
use crate::patch::{Patch, PatchError, x86};
use core::ops::Range;

pub use crate::arch::write_probe::set_write_probe;
pub use crate::arch::x86_64::alternatives::{
    ALTERNATIVES, PATHS as ALTERNATIVE_PATHS, bench_sites_applied,
};
pub use crate::arch::x86_64::console::{write_forced, write_raw_forced};
pub use crate::arch::x86_64::cpu::FEATURE_NAMES;
pub use crate::arch::x86_64::exit::exit;
pub use crate::arch::x86_64::frame::TrapFrame as KprobeFrame;
pub use crate::arch::x86_64::ipi::{TEST_IPIS, clear_ipi_handler, send_ipi, set_ipi_handler};
pub use crate::arch::x86_64::irq::{IrqFlags, irqs_disabled, local_irq_restore, local_irq_save};
pub use crate::arch::x86_64::jump_label::{KernelKeys, STATIC_KEYS};
pub use crate::arch::x86_64::kprobes::{KPROBES, X86Kprobes as KprobePlatform};
pub use crate::arch::x86_64::paging::alias_mapped;
pub use crate::arch::x86_64::selftest::{FAULT_MODES, SELFTESTS, provoke};

/// The platform checks the design's assumptions need at every boot: none on x86 (its
/// NMI, masking and serialising rules are architectural).
pub const ASSUMPTIONS: [&str; 0] = [];
pub use crate::arch::x86_64::smp::{
    StartAgainError as HotplugFirmwareError, cpu_die, cpu_is_down, cpu_power_on, online_cpus,
    online_syncs,
};

/// How a CPU goes down and comes back here.
pub const HOTPLUG_MECHANISM: &str = "halt loop with interrupts off / INIT-SIPI-SIPI";
pub use crate::arch::x86_64::text::{KERNEL_TEXT, KernelText};
pub use crate::arch::x86_64::timer::now_ns;
pub use crate::arch::x86_64::{STOP, X86_64 as Platform, nmi};
pub use crate::patch::x86::Insn;

/// Bytes of one patch site: `MOV $imm32, %eax` and the 5-byte NOP.
pub const SITE_LEN: usize = 5;

/// The 5-byte NOP the Intel SDM recommends (`nopl 0x0(%rax,%rax,1)`).
pub const NOP: Insn = match x86::nop(SITE_LEN) {
    Ok(nop) => nop,
    Err(_) => panic!("SITE_LEN has a recommended NOP"),
};

/// Masks interrupts on the calling CPU for good (`cli`): the panic handler's first
/// step. NMIs still arrive; the run ends before that matters.
pub fn mask_for_panic() {
    cpu::cli_save();
}

/// The calling CPU's index (`RDPID` where the CPU has it: a runtime alternative).
pub fn current_cpu() -> usize {
    cpu::processor_id()
}

/// The calling CPU's features, as the alternatives see them.
pub fn cpu_features() -> crate::patch::alternatives::Features {
    cpu::features()
}

/// `counter += value`, Release (`lock xadd`: x86 has one form).
pub fn counter_add_release(counter: &core::sync::atomic::AtomicU32, value: u32) {
    counter.fetch_add(value, core::sync::atomic::Ordering::Release);
}

/// CPUs the ACPI MADT lists.
pub fn cpu_count() -> usize {
    smp::cpu_count()
}

/// CPUs the MADT lists enabled, including any beyond [`MAX_CPUS`](crate::MAX_CPUS).
pub fn firmware_cpu_count() -> usize {
    smp::present()
}

/// What lists the CPUs here.
pub const CPU_TABLE: &str = "MADT";

/// The kernel command line (PVH start info).
pub fn bootargs() -> &'static str {
    boot::cmdline()
}

/// The command line was longer than the kernel's copy of it (PVH `cmdline_paddr`).
pub fn bootargs_too_long() -> Option<crate::bootargs::TooLong> {
    boot::cmdline_overflow().map(|len| crate::bootargs::TooLong {
        len,
        capacity: boot::CMDLINE_MAX,
    })
}

/// `MOV $value, %eax`: a site that makes its function return `value`.
pub fn returning(value: u16) -> Insn {
    x86::mov_eax_imm32(u32::from(value))
}

/// `PAUSE`: under single-threaded TCG it ends the vCPU's turn, so the poster of a job
/// runs; no interrupt is needed to leave it.
pub fn idle_wait() {
    cpu::pause();
}

/// Nothing to do: [`idle_wait`] does not sleep.
pub fn wake_idle() {}

/// `PAUSE` (see [`idle_wait`]).
pub fn cpu_yield() {
    cpu::pause();
}

/// `JMP rel32` from `site` to `target`: the live pair (with the 5-byte NOP) that
/// [`patch_live`] changes through the INT3 protocol.
pub fn live_branch(site: usize, target: usize) -> Result<Insn, &'static str> {
    x86::jmp_rel32(site, target).map_err(|_| "the branch target is out of rel32 range")
}

/// `CALL rel32` at `site` to `target`: with the 5-byte NOP and other CALLs, the call
/// pairs [`patch_live`] changes (the #BP handler emulates the CALL meanwhile).
pub fn live_call(site: usize, target: usize) -> Result<Insn, &'static str> {
    x86::call_rel32(site, target).map_err(|_| "the call target is out of rel32 range")
}

/// Calls of a [`live_call`] site that ran while the site was in flight, by emulation
/// (x86: the #BP handler's), so far.
pub fn live_calls_emulated() -> Option<u64> {
    Some(crate::arch::x86_64::text_poke::calls_emulated())
}

/// Cross-CPU synchronisations one static key batch makes: the INT3 protocol's three.
pub const SYNCS_PER_KEY_BATCH: u64 = 3;

/// Cross-CPU synchronisations made so far by live patches, and the latest one `cpu`
/// took (x86: the INT3 protocol's sync IPIs).
pub fn key_syncs() -> (u64, fn(usize) -> u64) {
    (
        crate::arch::x86_64::ipi::sync_generation(),
        crate::arch::x86_64::ipi::sync_acked,
    )
}

/// Patches `batch` while other CPUs may run it, without stopping them: the INT3
/// protocol (`text_poke_bp`, Linux's `text_poke_bp_batch`).
pub fn patch_live(batch: &[Patch<Insn>]) -> Result<(), PatchError<Insn>> {
    crate::arch::x86_64::text_poke::text_poke_bp(&KERNEL_TEXT, batch)
}

/// NMIs through the local APIC always exist on x86.
pub fn nmi_mechanism() -> Result<&'static str, &'static str> {
    Ok("APIC NMIs (delivery mode NMI); IRQs off = RFLAGS.IF, which NMIs pass")
}

/// How NMI IPIs reach a CPU on x86: NMIs are architectural, the local APIC's mode is
/// the choice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NmiMechanism {
    /// x2APIC: the ICR is one MSR (0x830), written atomically.
    X2Apic,
    /// xAPIC: the ICR is two MMIO registers at 0xfee0_0000.
    XApic,
}

impl NmiMechanism {
    /// Every mechanism, by its `expect_nmi=` spelling ([`name`](Self::name)).
    pub const ALL: [NmiMechanism; 2] = [Self::X2Apic, Self::XApic];

    /// The `expect_nmi=` spelling.
    pub fn name(self) -> &'static str {
        match self {
            Self::X2Apic => "x2apic",
            Self::XApic => "xapic",
        }
    }
}

impl core::fmt::Display for NmiMechanism {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.name())
    }
}

/// What the mechanism is chosen from: CPUID.
#[derive(Clone, Copy, Debug)]
pub struct NmiInputs {
    /// CPUID.01H:ECX.x2APIC (bit 21).
    x2apic: bool,
}

impl core::fmt::Display for NmiInputs {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "CPUID.1:ECX.x2APIC={}", u8::from(self.x2apic))
    }
}

/// The mechanism the calling CPU calls for, read afresh from CPUID: x2APIC whenever
/// the CPU has it (the kernel has no reason to prefer the two-register ICR).
pub fn expected_nmi_mechanism() -> (NmiMechanism, NmiInputs) {
    let inputs = NmiInputs {
        x2apic: cpu::cpuid(1, 0)[2] & (1 << 21) != 0,
    };
    let expected = if inputs.x2apic {
        NmiMechanism::X2Apic
    } else {
        NmiMechanism::XApic
    };
    (expected, inputs)
}

/// What the calling CPU's local APIC really is, and whether a self-NMI through it
/// arrives.
#[derive(Clone, Copy, Debug, Default)]
pub struct NmiObserved {
    /// IA32_APIC_BASE (MSR 0x1b): EN (bit 11) and EXTD (bit 10, x2APIC mode).
    enabled: bool,
    extd: bool,
    /// A self-NMI sent with IF clear was taken.
    taken: bool,
}

impl NmiObserved {
    /// The mechanism these observations add up to, `None` if there is none.
    pub fn mechanism(&self) -> Option<NmiMechanism> {
        match (self.enabled, self.extd, self.taken) {
            (true, true, true) => Some(NmiMechanism::X2Apic),
            (true, false, true) => Some(NmiMechanism::XApic),
            _ => None,
        }
    }
}

impl core::fmt::Display for NmiObserved {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "IA32_APIC_BASE.EN={} EXTD={}, self-NMI with IF=0 {}",
            u8::from(self.enabled),
            u8::from(self.extd),
            if self.taken { "taken" } else { "not taken" }
        )
    }
}

/// Observes the calling CPU's APIC mode (IA32_APIC_BASE) and sends it an NMI with
/// interrupts off, through the ICR of the mode in use.
pub fn observe_nmi_mechanism() -> NmiObserved {
    let me = current_cpu();
    let base = cpu::rdmsr(0x1b);
    let mut seen = NmiObserved {
        enabled: base & (1 << 11) != 0,
        extd: base & (1 << 10) != 0,
        taken: false,
    };
    let flags = local_irq_save();
    let taken0 = nmi::nmis_taken(me);
    nmi::send_nmi_self();
    let start = now_ns();
    while nmi::nmis_taken(me) == taken0 && now_ns() - start < 100_000_000 {
        cpu::pause();
    }
    seen.taken = nmi::nmis_taken(me) != taken0;
    local_irq_restore(flags);
    seen
}

/// The stop IPI is a normal vector: a CPU spinning with IF clear is not reached (the
/// arrival timeout names it).
pub fn stop_ipi_reaches_irqs_off() -> bool {
    false
}

/// Whether `patch_machine`'s window keeps NMI handlers away from the writes (`Err`:
/// why not). `cli` cannot keep NMIs out on x86, so the writes run from the patcher's
/// own NMI and the other CPUs' NMIs wait in the stop machine's slot until they are done.
#[cfg(feature = "stop-machine-nmi")]
pub fn nmi_free_window() -> Result<(), &'static str> {
    Ok(())
}

/// Without `stop-machine-nmi` there is no NMI-side protocol, and `cli` lets NMIs in.
#[cfg(not(feature = "stop-machine-nmi"))]
pub fn nmi_free_window() -> Result<(), &'static str> {
    Err(
        "x86 built without stop-machine-nmi: cli cannot keep NMIs out of the patch window, and writing from NMI context needs the NMI path",
    )
}

/// All kernel code.
pub fn text_range() -> Range<usize> {
    layout::text_range()
}

/// Code the patcher must never touch: what the rendezvous runs (with boot code), and
/// the kprobes' hit path and XOL slots.
pub fn protected_ranges() -> [Range<usize>; 2] {
    [layout::nopatch_range(), layout::kprobes_range()]
}

/// General register `n` of a kprobe handler's frame, in the encoding's numbering
/// (0 RAX, 1 RCX, 2 RDX, 3 RBX, 4 RSP, 5 RBP, 6 RSI, 7 RDI, 8-15 R8-R15).
pub fn kprobe_frame_reg(frame: &KprobeFrame, n: usize) -> u64 {
    frame.reg(n)
}

/// Whether `frame`, after [`KPROBE_TARGET`]'s probed instruction (`LEA (%rdi,%rdi,2),
/// %rax`), shows its effect: RAX = 3 * RDI.
pub fn kprobe_target_stepped(frame: &KprobeFrame) -> bool {
    kprobe_frame_reg(frame, 0) == kprobe_frame_reg(frame, 7).wrapping_mul(3)
}

/// Kprobes work here.
pub fn kprobes_unsupported() -> Option<&'static str> {
    None
}

/// An address kprobes must refuse as off the instruction grid, near `site` (a probed
/// instruction's address): none on x86, whose instructions have no grid and whose
/// kernel carries no symbol table to decode from a function's start (Linux uses
/// kallsyms); `src/arch/x86_64/kprobes.rs` says what is checked instead.
pub fn kprobe_misaligned_site(_site: usize) -> Option<usize> {
    None
}

/// Addresses kprobes must refuse for a region, with the region: the #BP entry stub
/// (exception entry), the core's hit path and the XOL slots (the machinery), the trap
/// dispatch (`.text.nopatch`).
pub fn kprobe_forbidden_sites() -> [(crate::kprobes::Forbidden, usize); 4] {
    use crate::arch::x86_64::kprobes::{CAPACITY, xol_area};
    use crate::kprobes::{Forbidden, Kprobes};
    type Registry = Kprobes<KprobePlatform, CAPACITY>;
    let hit: fn(&Registry, usize, &mut KprobeFrame) -> _ = Registry::hit;
    let vectors = layout::vectors_range();
    let nopatch: unsafe fn(usize, &[u8]) = crate::arch::x86_64::paging::poke_text;
    [
        (Forbidden::ExceptionEntry, vectors.start + 3 * 16),
        (Forbidden::Kprobes, hit as usize),
        (Forbidden::Kprobes, xol_area()),
        (Forbidden::NoPatch, nopatch as usize),
    ]
}

unsafe extern "C" {
    fn pm_kp_target(x: u64) -> u64;
    fn pm_kp_target_site();
    fn pm_kp_pushf_site();
    fn pm_kp_cli_site();
    fn pm_kp_ud2_site();
    fn pm_kp_syscall_site();
    fn pm_kp_loop_site();
}

kprobe_fixtures! {
    "stepped ALU (IMUL imm8)": pm_kp_alu at pm_kp_alu_site with [1, 2];
    "stepped PUSH (via RSP)": pm_kp_push at pm_kp_push_site with [1, 2];
    "JMP rel8": pm_kp_jmp8 at pm_kp_jmp8_site with [1, 2];
    "JMP rel32": pm_kp_jmp32 at pm_kp_jmp32_site with [1, 2];
    "CALL rel32": pm_kp_call at pm_kp_call_site with [1, 2];
    "JE rel8": pm_kp_je8 at pm_kp_je8_site with [5, 6];
    "JL rel8": pm_kp_jl8 at pm_kp_jl8_site with [u64::MAX, 5];
    "JB rel8": pm_kp_jb8 at pm_kp_jb8_site with [4, u64::MAX];
    "JA rel32": pm_kp_ja32 at pm_kp_ja32_site with [6, 5];
    "JLE rel32": pm_kp_jle32 at pm_kp_jle32_site with [5, 6];
    "JNS rel32": pm_kp_jns32 at pm_kp_jns32_site with [1, 1 << 63];
    "RIP-relative MOV load": pm_kp_riprel at pm_kp_riprel_site with [0, 1];
    "RIP-relative LEA": pm_kp_riplea at pm_kp_riplea_site with [0, 1];
    "stepped RET": pm_kp_ret at pm_kp_ret_site with [0, 1];
    "stepped CALL *%rsi": pm_kp_callr at pm_kp_callr_site with [1, 2];
    "stepped JMP *%rsi": pm_kp_jmpr at pm_kp_jmpr_site with [0, 1];
}

/// The hammered target: returns `x * 3 + 7` (wrapping), probed at its first instruction
/// (`LEA`, stepped out of line).
pub const KPROBE_TARGET: Option<KprobeFixture> = Some(KprobeFixture {
    name: "LEA (stepped)",
    call: pm_kp_target,
    site: pm_kp_target_site,
    args: [0, 1],
});

/// Instructions kprobes must refuse as unprobeable.
pub const KPROBE_UNPROBEABLE: &[(&str, unsafe extern "C" fn())] = &[
    ("PUSHF", pm_kp_pushf_site),
    ("CLI", pm_kp_cli_site),
    ("UD2", pm_kp_ud2_site),
    ("SYSCALL", pm_kp_syscall_site),
    ("LOOP", pm_kp_loop_site),
];

core::arch::global_asm!(include_str!("targets_x86_64.S"), options(att_syntax));

pub use crate::arch::x86_64::user::{
    Program as UserProgram, Tick as UserTick, UserExit, post_to_mailbox as post_to_user,
    set_tick_hook as set_user_tick, smap_on as user_pan, ticks as user_ticks, user_irqs,
};

/// The kernel entry from ring 3 up to its deferred work (patching must refuse it): the
/// trap dispatch every entry stub calls, whose first act for a ring 3 frame is
/// `traps::from_user`.
pub fn user_entry_code() -> Option<usize> {
    Some(crate::arch::x86_64::traps::user_entry() as usize)
}

/// User mode exists here (ring 3).
pub fn user_mode_unsupported() -> Option<&'static str> {
    None
}

/// Runs `program` in ring 3 on the calling CPU until it exits or faults (IRQs enabled).
pub fn run_user(program: UserProgram) -> UserExit {
    crate::arch::x86_64::user::run_user(program)
}

/// Every CPU's context state word (`crate::stop::ContextStates`).
pub fn contexts() -> &'static crate::stop::ContextStates {
    &crate::arch::x86_64::user_context::USER_CONTEXTS
}

/// Static-key kick targets (the INT3 protocol's syncs) deferred to their next kernel
/// entry so far.
pub fn kicks_deferred() -> u64 {
    crate::arch::x86_64::ipi::syncs_deferred()
}

/// Whether `exit` is the fault a user access to `addr` must take: a #PF at `addr` with
/// U/S set in the error code (from ring 3), W set for a store, I/D for the jump.
pub fn user_fault_is_refused_access(exit: &UserExit, addr: usize, exec: bool) -> bool {
    let UserExit::Fault {
        vector, error, cr2, ..
    } = *exit
    else {
        return false;
    };
    const USER: u64 = 1 << 2;
    const FETCH: u64 = 1 << 4;
    vector == 14 && cr2 == addr as u64 && error & USER != 0 && (error & FETCH != 0) == exec
}
