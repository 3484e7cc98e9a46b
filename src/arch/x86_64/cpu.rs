//! Single instructions: interrupt flag, MSRs, CPUID, port I/O, TSC, per-CPU index.

use core::arch::asm;

/// RFLAGS.IF.
pub const RFLAGS_IF: u64 = 1 << 9;

/// Clears RFLAGS.IF and returns the previous RFLAGS.
#[inline(always)]
pub fn cli_save() -> u64 {
    let flags: u64;
    // SAFETY: reads RFLAGS and clears IF; the stack push/pop is balanced. Not `nomem`:
    // it must be a compiler barrier so memory accesses stay inside the masked region.
    unsafe { asm!("pushfq", "pop {}", "cli", out(reg) flags) };
    flags
}

/// Sets RFLAGS.IF back if `flags` had it.
#[inline(always)]
pub fn restore_if(flags: u64) {
    if flags & RFLAGS_IF != 0 {
        // SAFETY: re-enables interrupts the caller had enabled; a compiler barrier.
        unsafe { asm!("sti") };
    }
}

/// Enables interrupts.
#[inline(always)]
pub fn sti() {
    // SAFETY: the IDT and the local APIC are set up before any CPU calls this.
    unsafe { asm!("sti") };
}

/// Current RFLAGS.
#[inline(always)]
pub fn rflags() -> u64 {
    let flags: u64;
    // SAFETY: reads RFLAGS; balanced push/pop.
    unsafe { asm!("pushfq", "pop {}", out(reg) flags, options(preserves_flags)) };
    flags
}

/// Whether interrupts are enabled.
#[inline(always)]
pub fn irqs_enabled() -> bool {
    rflags() & RFLAGS_IF != 0
}

/// Spin-wait hint.
#[inline(always)]
pub fn pause() {
    core::hint::spin_loop();
}

/// Waits for an interrupt (with IF set: `sti; hlt` makes the pair atomic).
#[inline(always)]
pub fn sti_hlt() {
    // SAFETY: `sti` takes effect after the next instruction, so an interrupt cannot
    // slip in between it and `hlt` and be missed.
    unsafe { asm!("sti", "hlt") };
}

/// Halts forever with interrupts off (NMIs still arrive and return here).
pub fn halt_forever() -> ! {
    loop {
        // SAFETY: stops the CPU; nothing is left to do on it.
        unsafe { asm!("cli", "hlt") };
    }
}

/// `rdmsr`.
#[inline(always)]
pub fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: callers name MSRs that exist on every CPU this kernel supports (checked
    // through CPUID where optional).
    unsafe { asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nostack)) };
    (u64::from(hi) << 32) | u64::from(lo)
}

/// `wrmsr`.
///
/// # Safety
/// `msr` exists and `value` is valid for it, and the write does not break memory safety
/// (e.g. does not move the per-CPU GS base of a running CPU elsewhere).
#[inline(always)]
pub unsafe fn wrmsr(msr: u32, value: u64) {
    // SAFETY: the caller's contract.
    unsafe {
        asm!("wrmsr", in("ecx") msr, in("eax") value as u32, in("edx") (value >> 32) as u32,
             options(nostack))
    };
}

/// CPUID leaf/subleaf: [eax, ebx, ecx, edx]. CPUID is serialising.
#[inline(always)]
pub fn cpuid(leaf: u32, sub: u32) -> [u32; 4] {
    let (a, b, c, d): (u32, u64, u32, u32);
    // SAFETY: CPUID has no side effects; RBX is reserved by LLVM, so it is swapped
    // through a scratch register.
    unsafe {
        asm!("mov {t}, rbx", "cpuid", "xchg {t}, rbx", t = out(reg) b,
             inout("eax") leaf => a, inout("ecx") sub => c, out("edx") d, options(nostack))
    };
    [a, b as u32, c, d]
}

/// Time stamp counter.
#[inline(always)]
pub fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: reads the TSC; no side effects.
    unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack)) };
    (u64::from(hi) << 32) | u64::from(lo)
}

/// `outb`: writes `value` to I/O port `port`.
///
/// # Safety
/// `port` must belong to a device this kernel drives (16550, PIT, 8259,
/// isa-debug-exit) and `value` must be a write that device expects: port I/O changes
/// hardware state behind the compiler's back (a wrong port can reprogram a DMA engine,
/// reset the machine or unmask interrupts nobody handles).
#[inline(always)]
pub unsafe fn outb(port: u16, value: u8) {
    // SAFETY: the caller names a port and value its device accepts; no memory side
    // effects on the devices allowed.
    unsafe { asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack)) };
}

/// `inb`: reads I/O port `port`.
///
/// # Safety
/// As [`outb`]: reads can have side effects too (clearing a status, popping a FIFO).
#[inline(always)]
pub unsafe fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: as for `outb`, forwarded from the caller.
    unsafe { asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack)) };
    value
}

/// `outl`: writes `value` to I/O port `port`.
///
/// # Safety
/// As [`outb`].
#[inline(always)]
pub unsafe fn outl(port: u16, value: u32) {
    // SAFETY: as for `outb`, forwarded from the caller.
    unsafe { asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack)) };
}

/// CR2 (the faulting address of the last page fault).
#[inline(always)]
pub fn cr2() -> u64 {
    let v: u64;
    // SAFETY: reads a control register.
    unsafe { asm!("mov {}, cr2", out(reg) v, options(nomem, nostack)) };
    v
}

/// Invalidates the TLB entry of `va` on this CPU.
#[inline(always)]
pub fn invlpg(va: usize) {
    // SAFETY: only drops a translation; a compiler barrier, so it is ordered after the
    // page-table store that precedes it.
    unsafe { asm!("invlpg [{}]", in(reg) va, options(nostack)) };
}

/// A serialising instruction: no instruction after it is fetched or executed before
/// everything before it completed (SDM 9.3, cross-modifying code): `SERIALIZE` where
/// the CPU has it, else `CPUID` (which also clobbers four registers and may exit to a
/// hypervisor). Linux's `sync_core`. One site, in `.text.nopatch` (the rendezvous and
/// the text writer run it): a boot alternative.
#[inline(never)]
#[unsafe(link_section = ".text.nopatch")]
pub fn serialize() {
    // SAFETY: both variants only serialise (CPUID leaf 0 also writes EAX..EDX, declared
    // clobbered; RBX, reserved by LLVM, is saved in a scratch register). Not `nomem`:
    // a compiler barrier, as a serialising point must be.
    unsafe {
        alternative!(boot,
            orig: "mov {saved}, rbx\n xor eax, eax\n xor ecx, ecx\n cpuid\n mov rbx, {saved}",
            repl: ".byte 0x0f, 0x01, 0xe8", // serialize
            feature: FEATURE_SERIALIZE,
            saved = out(reg) _,
            out("eax") _,
            out("ecx") _,
            out("edx") _,
            options(nostack)
        )
    };
}

/// `CPUID` leaf 0, inlined into the caller: a serialising instruction with no call on
/// the way (the rendezvous's exit, whose image check wants it in place).
#[inline(always)]
pub fn serialize_inline() {
    let _ = cpuid(0, 0);
}

/// Feature number ([`crate::patch::alternatives::Features`]) of `SERIALIZE`
/// (CPUID.(EAX=7,ECX=0):EDX bit 14).
pub const FEATURE_SERIALIZE: u16 = 0;
/// `RDPID` (CPUID.(EAX=7,ECX=0):ECX bit 22): reads IA32_TSC_AUX, which each CPU sets to
/// its index.
pub const FEATURE_RDPID: u16 = 1;
/// Never set by the hardware: the benchmark's sites, flipped by turning it on and off.
pub const FEATURE_BENCH: u16 = 63;

/// Every feature number with its name, as the alternatives tables may use them.
pub const FEATURE_NAMES: [(u16, &str); 3] = [
    (FEATURE_SERIALIZE, "serialize"),
    (FEATURE_RDPID, "rdpid"),
    (FEATURE_BENCH, "bench"),
];

/// The calling CPU's features, from CPUID (never [`FEATURE_BENCH`]).
pub fn features() -> crate::patch::alternatives::Features {
    let leaf7 = if cpuid(0, 0)[0] >= 7 {
        cpuid(7, 0)
    } else {
        [0; 4]
    };
    crate::patch::alternatives::Features::NONE
        .set(FEATURE_SERIALIZE, leaf7[3] & (1 << 14) != 0)
        .set(FEATURE_RDPID, leaf7[2] & (1 << 22) != 0)
}

/// [`processor_id`] for the NMI entry (Linux's paranoid entry finds its per-CPU data
/// with RDPID the same way): one site in `.text.nopatch`, so a boot alternative.
#[inline(never)]
#[unsafe(link_section = ".text.nopatch")]
pub fn processor_id_nopatch() -> usize {
    let index: usize;
    // SAFETY: as for `processor_id`.
    unsafe {
        alternative!(boot,
            orig: "mov rax, gs:[0]",
            repl: ".byte 0xf3, 0x0f, 0xc7, 0xf8", // rdpid rax
            feature: FEATURE_RDPID,
            out("rax") index,
            options(readonly, nostack, preserves_flags)
        )
    };
    index
}

/// IA32_TSC_AUX, which `RDPID` (and `RDTSCP`) read.
const MSR_TSC_AUX: u32 = 0xc000_0103;

/// The calling CPU's logical index for code outside the patch window: `RDPID` (one
/// instruction, no segment override) where the CPU has it, else the GS-relative load
/// of [`current_cpu`]. A runtime alternative: one site, applied through
/// `patch_machine`.
#[inline(never)]
pub fn processor_id() -> usize {
    let index: usize;
    // SAFETY: both variants read the calling CPU's index: `gs:[0]` (see
    // `set_cpu_index`), or IA32_TSC_AUX, which `set_cpu_index` wrote with the same
    // index on every CPU that has RDPID, before it ran any kernel code.
    unsafe {
        alternative!(runtime,
            orig: "mov rax, gs:[0]",
            repl: ".byte 0xf3, 0x0f, 0xc7, 0xf8", // rdpid rax
            feature: FEATURE_RDPID,
            out("rax") index,
            options(readonly, nostack, preserves_flags)
        )
    };
    index
}

/// IA32_GS_BASE.
pub const MSR_GS_BASE: u32 = 0xc000_0101;

/// `CPU_INDEX[i] == i`: the GS base of CPU `i` points at element `i`, so `gs:[0]` is the
/// logical index without any mutable per-CPU state.
static CPU_INDEX: [usize; crate::MAX_CPUS] = {
    let mut a = [0; crate::MAX_CPUS];
    let mut i = 0;
    while i < crate::MAX_CPUS {
        a[i] = i;
        i += 1;
    }
    a
};

/// Makes the calling CPU logical CPU `index`. Once per CPU, before it prints.
pub fn set_cpu_index(index: usize) {
    assert!(index < crate::MAX_CPUS);
    // SAFETY: GS base points into an immutable static that outlives every CPU.
    unsafe { wrmsr(MSR_GS_BASE, &CPU_INDEX[index] as *const usize as u64) };
    if features().has(FEATURE_RDPID) {
        // SAFETY: IA32_TSC_AUX exists where RDPID does; only RDPID/RDTSCP read it.
        unsafe { wrmsr(MSR_TSC_AUX, index as u64) };
    }
}

/// The calling CPU's logical index (0 = the boot CPU).
#[inline(always)]
pub fn current_cpu() -> usize {
    let index: usize;
    // SAFETY: GS base was set by `set_cpu_index` before any code that asks runs.
    unsafe { asm!("mov {}, gs:[0]", out(reg) index, options(readonly, nostack, preserves_flags)) };
    index
}
