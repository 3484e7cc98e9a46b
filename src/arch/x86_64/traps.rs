//! The IDT and trap dispatch. Entry stubs are in `boot/x86_64/vectors.S`; every gate is
//! an interrupt gate (IF cleared on entry), NMI, #DF and #MC run on IST stacks.
//! Unexpected exceptions print vector, error code, RIP, CR2 and the CPU, then end the
//! run with a failure status.

use super::apic::SPURIOUS_VECTOR;
use super::frame::TrapFrame;
use super::ipi::STOP_VECTOR;
use super::user_context::USER_CONTEXTS;
use super::{apic, console, cpu, exit, gdt, ipi, nmi, user};
use core::arch::{asm, global_asm};
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicU64, Ordering};

global_asm!(
    include_str!("../../../boot/x86_64/vectors.S"),
    dispatch = sym trap_dispatch,
    stop = const STOP_VECTOR,
    spurious = const SPURIOUS_VECTOR,
    test0 = const ipi::TEST_IPIS[0],
    test1 = const ipi::TEST_IPIS[1],
    sync = const ipi::SYNC_VECTOR,
    syscall = const user::SYSCALL_VECTOR,
    nmi_stack_size = const super::layout::IST_SIZE,
    nmi_latched = sym nmi::NMI_LATCHED,
    nmi_latched_by = sym nmi::NMI_LATCHED_BY,
    kernel_cs = const gdt::KERNEL_CS,
    kernel_ds = const gdt::KERNEL_DS,
    options(att_syntax)
);

unsafe extern "C" {
    /// 32 exception stubs, then the stop, spurious, two test, the sync and the system
    /// call vectors' stubs.
    static x86_vector_table: [usize; 38];
}

#[repr(C, align(16))]
struct Idt(UnsafeCell<[[u64; 2]; 256]>);

// SAFETY: written only by the boot CPU in `init`, before any other CPU loads it or any
// interrupt is enabled; read-only afterwards.
unsafe impl Sync for Idt {}

static IDT: Idt = Idt(UnsafeCell::new([[0; 2]; 256]));

fn gate(handler: usize, ist: u8) -> [u64; 2] {
    gate_dpl(handler, ist, 0)
}

/// An interrupt gate that code at privilege `dpl` may reach with `INT n` (only the
/// system call's is 3: any other `INT n` from ring 3 is a #GP).
fn gate_dpl(handler: usize, ist: u8, dpl: u64) -> [u64; 2] {
    let h = handler as u64;
    let low = (h & 0xffff)
        | (u64::from(gdt::KERNEL_CS) << 16)
        | (u64::from(ist) << 32)
        | ((0x8e | dpl << 5) << 40) // present, DPL, 64-bit interrupt gate
        | ((h >> 16) & 0xffff) << 48;
    [low, h >> 32]
}

/// Fills the IDT. Boot CPU, once, before `load`.
pub fn init() {
    // SAFETY: the table of stub addresses is immutable assembler data.
    let table = unsafe { &x86_vector_table };
    // SAFETY: only the boot CPU runs and nothing has loaded the IDT yet (see Idt).
    let idt = unsafe { &mut *IDT.0.get() };
    for (vector, &stub) in table.iter().enumerate().take(32) {
        let ist = match vector {
            2 => gdt::IST_NMI,
            8 => gdt::IST_DF,
            18 => gdt::IST_MC,
            _ => 0,
        };
        idt[vector] = gate(stub, ist);
    }
    idt[usize::from(STOP_VECTOR)] = gate(table[32], 0);
    idt[usize::from(SPURIOUS_VECTOR)] = gate(table[33], 0);
    for (i, &v) in ipi::TEST_IPIS.iter().enumerate() {
        idt[v as usize] = gate(table[34 + i], 0);
    }
    idt[usize::from(ipi::SYNC_VECTOR)] = gate(table[36], 0);
    idt[usize::from(user::SYSCALL_VECTOR)] = gate_dpl(table[37], 0, 3);
}

/// Loads the IDT on the calling CPU.
pub fn load() {
    #[repr(C, packed)]
    struct Pointer {
        limit: u16,
        base: u64,
    }
    let ptr = Pointer {
        limit: (256 * 16 - 1) as u16,
        base: IDT.0.get() as u64,
    };
    // SAFETY: the IDT is complete (init ran) and lives forever.
    unsafe { asm!("lidt [{}]", in(reg) &ptr, options(readonly, nostack)) };
}

const NAMES: [&str; 32] = [
    "#DE divide error",
    "#DB debug",
    "NMI",
    "#BP breakpoint",
    "#OF overflow",
    "#BR bound range",
    "#UD invalid opcode",
    "#NM device not available",
    "#DF double fault",
    "coprocessor segment overrun",
    "#TS invalid TSS",
    "#NP segment not present",
    "#SS stack fault",
    "#GP general protection",
    "#PF page fault",
    "reserved",
    "#MF x87 error",
    "#AC alignment check",
    "#MC machine check",
    "#XM SIMD error",
    "#VE virtualization",
    "#CP control protection",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "#HV hypervisor injection",
    "#VC VMM communication",
    "#SX security",
    "reserved",
];

/// The address of a `ud2` that #UD skips instead of reporting (0: none): the NMI
/// self-test's, whose exception inside an NMI handler is the point.
static SKIPPED_UD2: AtomicU64 = AtomicU64::new(0);

/// Makes the `ud2` at `site` a no-op: a #UD there resumes after it. Set it before the
/// code that executes the `ud2` runs.
pub fn skip_ud2_at(site: u64) {
    // Release pairs with the Acquire in `is_skipped_ud2`.
    SKIPPED_UD2.store(site, Ordering::Release);
}

/// Whether a #UD at `rip` is the registered `ud2`.
#[inline(always)]
fn is_skipped_ud2(rip: u64) -> bool {
    let site = SKIPPED_UD2.load(Ordering::Acquire);
    site != 0 && rip == site
}

#[unsafe(link_section = ".text.nopatch")]
extern "C" fn trap_dispatch(frame: &mut TrapFrame) {
    // A kernel entry from ring 3: the context-tracking protocol first, before anything
    // patchable. So too an NMI taken in ring 0 while the state word still says user
    // mode (between `exit_to_user` and the IRETQ, or before an entry's swap): NMIs
    // cannot be masked, and a patcher may have deferred this CPU. Only this CPU clears
    // `USER`, so the test cannot go stale before `from_user`'s swap.
    if frame.from_user() || (frame.vector == 2 && USER_CONTEXTS.in_user(cpu::current_cpu())) {
        return from_user(frame);
    }
    dispatch_kernel(frame);
}

/// How long a kernel entry from ring 3 waits for the stop that deferred it.
const ENTRY_WAIT_LIMIT_NS: u64 = 30_000_000_000;

/// A kernel entry from ring 3 (or an NMI in the gap around one), IF clear (interrupt gates): the context-tracking protocol
/// up to the deferred work, all in this function and so in `.text.nopatch` (one RMW,
/// then the wait and the serialising `CPUID`), then the system call, the user fault or
/// the interrupt, then (back to ring 3) the switch to user mode just before the stub's
/// IRETQ. A function of its own, so that tests/kernel_image.rs can check its order.
#[unsafe(link_section = ".text.nopatch")]
#[inline(never)]
fn from_user(frame: &mut TrapFrame) {
    let cpu = cpu::current_cpu();
    let deferred = USER_CONTEXTS.enter_kernel(cpu);
    if deferred.pending {
        if USER_CONTEXTS
            .finish_deferred(
                deferred,
                ENTRY_WAIT_LIMIT_NS,
                super::timer::now_ns,
                cpu::pause,
            )
            .is_err()
        {
            fatal(frame)
        }
        // x86 does not serialise on INT or an interrupt (arm64's exception entry is
        // context-synchronising; Linux's deferral gets it from the CR3 write): the
        // writes a patcher deferred this CPU for are complete and visible (the swap's
        // and the window's Acquire), so discard anything fetched before, inline.
        cpu::serialize_inline();
    }
    // From here on patchable code may run.
    let v = frame.vector;
    // A system call or a fault of the program; NMI, #DF and #MC go to the kernel's
    // handlers (the latter two are fatal).
    let program = v == u64::from(user::SYSCALL_VECTOR) || (v < 32 && !matches!(v, 2 | 8 | 18));
    if program && frame.from_user() {
        user::handle_from_user(frame);
    } else {
        user::count_irq(cpu);
        dispatch_kernel(frame);
    }
    if frame.from_user() {
        // Still IF clear: the state word, then only the stub's pops and IRETQ. (An NMI
        // from the ring 0 gap leaves the word in kernel mode: the CPU is then
        // interrupted, not deferred, until its next exit.)
        USER_CONTEXTS.exit_to_user(cpu);
    }
}

/// A trap as the kernel handles it: an interrupt, an NMI or a kernel exception (for an
/// interrupt from ring 3, after the entry's deferred work).
#[unsafe(link_section = ".text.nopatch")]
#[inline(never)]
pub(super) fn dispatch_kernel(frame: &mut TrapFrame) {
    // The NMI keeps its own count (`nmi::in_nmi`); an NMI taken inside another handler
    // must still read as an NMI, so it does not count here (`nesting`).
    let counted = (frame.vector != 2).then(super::nesting::counter).flatten();
    if let Some(n) = counted {
        // Relaxed: this CPU's own slot.
        n.fetch_add(1, Ordering::Relaxed);
    }
    dispatch_vector(frame);
    if let Some(n) = counted {
        n.fetch_sub(1, Ordering::Relaxed);
    }
}

#[unsafe(link_section = ".text.nopatch")]
#[inline(always)]
fn dispatch_vector(frame: &mut TrapFrame) {
    match frame.vector {
        // SAFETY: the NMI frame's error slot counts the latches this pass answers; only
        // this CPU's nested NMIs touch it besides, each with one `incq`.
        2 => unsafe { nmi::handle_nmi(&raw mut frame.error) },
        // A site the INT3 protocol has in flight (emulated), else a kprobe's INT3,
        // else fatal like any #BP.
        3 => {
            if !super::text_poke::handle_int3(frame)
                && !super::kprobes::on_int3(frame)
                && !resume_from_fault(frame)
            {
                fatal(frame)
            }
        }
        // The end of a kprobe's out-of-line single step; any other #DB is fatal (or ends
        // a stop function that catches faults).
        1 => {
            if !super::kprobes::on_debug(frame) && !resume_from_fault(frame) {
                fatal(frame)
            }
        }
        // The registered `ud2` (the NMI self-test's: an exception inside an NMI
        // handler, whose IRETQ ends NMI blocking): skip it. Anything else is fatal.
        6 if is_skipped_ud2(frame.rip) => frame.rip += 2,
        v if v == u64::from(ipi::SYNC_VECTOR) => {
            apic::eoi();
            ipi::handle_sync();
        }
        v if v == u64::from(STOP_VECTOR) => {
            // EOI first: a stop IPI for the next call may then be accepted (and is
            // delivered after this handler's iretq, since IF stays clear until then).
            apic::eoi();
            super::STOP.handle_stop_ipi();
        }
        v if v == u64::from(SPURIOUS_VECTOR) => {} // no EOI for spurious interrupts
        v if ipi::TEST_IPIS.contains(&(v as u32)) => {
            apic::eoi();
            ipi::dispatch(v as u32);
        }
        _ => {
            if !resume_from_fault(frame) {
                fatal(frame)
            }
        }
    }
}

/// About to be fatal: an exception in a stop function run with its fixup point armed
/// ends the function instead ([`super::fixup`]). Not for #DF and #MC (IST stacks, not
/// the function's) or anything that is not an exception.
#[unsafe(link_section = ".text.nopatch")]
#[inline(always)]
fn resume_from_fault(frame: &mut TrapFrame) -> bool {
    let v = frame.vector;
    if v >= 32 || v == 2 || v == 8 || v == 18 {
        return false;
    }
    let fault = crate::stop::StopFault {
        what: NAMES.get(v as usize).copied().unwrap_or("exception"),
        pc: frame.rip as usize,
        addr: if v == 14 { cpu::cr2() as usize } else { 0 },
        syndrome: frame.error,
    };
    match super::fixup::resume_from_fault(fault) {
        Some((resume, ctx)) => {
            frame.rip = resume;
            frame.rax = ctx;
            true
        }
        None => false,
    }
}

fn fatal(frame: &TrapFrame) -> ! {
    cpu::cli_save();
    let v = frame.vector as usize;
    console::write_forced(format_args!(
        "\nUNEXPECTED EXCEPTION on cpu {}: vector {} ({}), error code {:#x}, RIP {:#018x}, CR2 {:#018x}, RFLAGS {:#x}\n{:#x?}\n",
        cpu::current_cpu(),
        v,
        NAMES.get(v).copied().unwrap_or("?"),
        frame.error,
        frame.rip,
        cpu::cr2(),
        frame.rflags,
        frame,
    ));
    exit::exit(false)
}

/// The kernel entry from ring 3 (`from_user`): its address, for the patch refusal test.
pub fn user_entry() -> *const () {
    from_user as *const ()
}
