//! User mode (EL0): the user programs, entering and leaving them, their system calls
//! and their faults.
//!
//! - **Memory.** The user programs are in `.user_text` (linker.ld), mapped read-only and
//!   executable at EL0 only (EL1 cannot execute it: PXN); their mailboxes and stacks in
//!   `.user_data`, read-write at EL0 and never executable. Kernel text, data and devices
//!   have AP\[1\] = 0: EL0 can neither read nor write them (a probe that tries faults and is
//!   reported, [`UserExit::Fault`]). With FEAT_PAN, PSTATE.PAN is set on every CPU that
//!   runs user code and in every SPSR this file builds, so the kernel cannot touch user
//!   memory by accident either; it writes a mailbox only with `STTR` (an unprivileged
//!   store, as Linux's `put_user`). Both are outside `.text`: patching refuses them.
//! - **Entry and exit.** [`run_user`] masks everything, switches the CPU's context state
//!   word to user mode (`user_context::USER_CONTEXTS`), and `pm_enter_user` saves the
//!   callee-saved registers on the kernel stack and ERETs to EL0. Every exception from
//!   EL0 is a kernel entry (`exceptions::from_user`: the context-tracking protocol, then
//!   `handle_from_user`). `SYS_EXIT`, a fault or a bad call returns to the kernel by
//!   making the frame's ERET land on `pm_user_return` at EL1, which reloads the saved
//!   registers and returns from `pm_enter_user`.
//! - **The loop** (`pm_user_loop`): enters the kernel with `SVC` (`SYS_TICK`) once every
//!   `spins` iterations, or at once when its mailbox changes, and on each entry the
//!   kernel runs the tick hook ([`set_tick_hook`]), kernel code that is subject to
//!   patching; `x1 != 0` in the answer makes it exit.
//!
//! The vectors use TPIDR_EL0 and TPIDRRO_EL0 as scratch: user programs must not rely
//! on them.

use super::exceptions::{self, TrapFrame, kind};
use super::{cpu, irq, user_context};
use crate::MAX_CPUS;
use crate::arch::user_programs::{self, STATUS_BAD_CALL, STATUS_FAULT, USER_SLOT, count_irq, tick};
pub use crate::arch::user_programs::{
    Program, SYS_EXIT, SYS_TICK, Tick, USER_DATA, UserData, ticks, user_irqs,
};
use core::arch::{asm, global_asm};
use core::sync::atomic::{AtomicU64, Ordering};

global_asm!(
    r#"
    .pushsection .user_text, "ax"
    .balign 4096
    // x0 = spins between entries, x1 = this CPU's mailbox.
    .global pm_user_loop
pm_user_loop:
    mov     x19, x0
    mov     x20, x1
    ldr     x21, [x20]
1:  mov     x8, #{tick}
    svc     #0
    cbnz    x1, 4f
    mov     x9, x19
2:  ldr     x10, [x20]
    cmp     x10, x21
    b.ne    3f
    yield                       // under single-threaded TCG: hands the host thread on
    subs    x9, x9, #1
    b.hi    2b
3:  mov     x21, x10
    b       1b
4:  mov     x8, #{exit}
    mov     x0, #0
    svc     #0
5:  b       5b

    // x0 = an address: load from it, store to it, or branch to it.
    .global pm_user_probe_read
pm_user_probe_read:
    ldr     x1, [x0]
    b       6f
    .global pm_user_probe_write
pm_user_probe_write:
    str     xzr, [x0]
    b       6f
    .global pm_user_probe_exec
pm_user_probe_exec:
    br      x0
6:  mov     x8, #{exit}
    mov     x0, #0
    svc     #0
7:  b       7b
    .balign 4096
    .popsection

    .pushsection .text.nopatch, "ax"
    // x0 = user PC, x1 = user SP, x2 = user x0, x3 = user x1, x4 = SPSR. Returns the
    // status `pm_user_return` is entered with (x0). Everything masked.
    .global pm_enter_user
pm_enter_user:
    stp     x29, x30, [sp, #-160]!
    stp     x19, x20, [sp, #16]
    stp     x21, x22, [sp, #32]
    stp     x23, x24, [sp, #48]
    stp     x25, x26, [sp, #64]
    stp     x27, x28, [sp, #80]
    stp     d8, d9, [sp, #96]
    stp     d10, d11, [sp, #112]
    stp     d12, d13, [sp, #128]
    stp     d14, d15, [sp, #144]
    msr     elr_el1, x0
    msr     sp_el0, x1
    msr     spsr_el1, x4
    mov     x0, x2
    mov     x1, x3
    // No kernel value reaches EL0.
    mov     x2, xzr
    mov     x3, xzr
    mov     x4, xzr
    mov     x5, xzr
    mov     x6, xzr
    mov     x7, xzr
    mov     x8, xzr
    mov     x9, xzr
    mov     x10, xzr
    mov     x11, xzr
    mov     x12, xzr
    mov     x13, xzr
    mov     x14, xzr
    mov     x15, xzr
    mov     x16, xzr
    mov     x17, xzr
    mov     x18, xzr
    mov     x19, xzr
    mov     x20, xzr
    mov     x21, xzr
    mov     x22, xzr
    mov     x23, xzr
    mov     x24, xzr
    mov     x25, xzr
    mov     x26, xzr
    mov     x27, xzr
    mov     x28, xzr
    mov     x29, xzr
    mov     x30, xzr
    eret
    // Reached by an ERET at EL1 (`return_to_kernel`), SP as `pm_enter_user` left it.
    .global pm_user_return
pm_user_return:
    ldp     d14, d15, [sp, #144]
    ldp     d12, d13, [sp, #128]
    ldp     d10, d11, [sp, #112]
    ldp     d8, d9, [sp, #96]
    ldp     x27, x28, [sp, #80]
    ldp     x25, x26, [sp, #64]
    ldp     x23, x24, [sp, #48]
    ldp     x21, x22, [sp, #32]
    ldp     x19, x20, [sp, #16]
    ldp     x29, x30, [sp], #160
    ret
    .popsection
"#,
    tick = const SYS_TICK,
    exit = const SYS_EXIT,
);

unsafe extern "C" {
    fn pm_enter_user(pc: usize, sp: usize, x0: u64, x1: u64, spsr: u64) -> u64;
    fn pm_user_return();
    fn pm_user_loop();
    fn pm_user_probe_read();
    fn pm_user_probe_write();
    fn pm_user_probe_exec();
}

/// How a run of user code ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UserExit {
    /// `SYS_EXIT` with this status.
    Exited(u64),
    /// A synchronous exception other than `SVC`: the kernel stopped the program.
    Fault {
        /// ESR_EL1.
        esr: u64,
        /// FAR_EL1.
        far: u64,
        /// Where the program was.
        elr: u64,
    },
    /// An `SVC` with an unknown number (x8).
    BadCall(u64),
}

/// What a CPU's last run ended with, besides the status: written by the CPU only.
struct LastExit {
    esr: AtomicU64,
    far: AtomicU64,
    elr: AtomicU64,
    call: AtomicU64,
}

static LAST_EXIT: [LastExit; MAX_CPUS] = [const {
    LastExit {
        esr: AtomicU64::new(0),
        far: AtomicU64::new(0),
        elr: AtomicU64::new(0),
        call: AtomicU64::new(0),
    }
}; MAX_CPUS];

/// Installs the kernel code each `SYS_TICK` runs (after the entry's deferred work: it may
/// be patchable), with the CPU's index.
pub fn set_tick_hook(hook: fn(usize) -> Tick) {
    user_programs::set_tick_hook(hook);
    exceptions::set_user_handler(handle_from_user);
}

/// Whether the CPU has FEAT_PAN (ID_AA64MMFR1_EL1.PAN).
pub fn has_pan() -> bool {
    let mmfr1: u64;
    // SAFETY: reads an ID register.
    unsafe {
        asm!("mrs {}, id_aa64mmfr1_el1", out(reg) mmfr1, options(nomem, nostack, preserves_flags))
    };
    (mmfr1 >> 20) & 0xf != 0
}

/// SPSR_EL1.PAN.
const SPSR_PAN: u64 = 1 << 22;
/// SPSR of the return to the kernel: EL1h, D, A, I, F masked.
const SPSR_EL1H_MASKED: u64 = 0x3c5;

/// The PAN bit for the SPSRs built here.
fn pan_bit() -> u64 {
    if has_pan() { SPSR_PAN } else { 0 }
}

/// Runs `program` at EL0 on the calling CPU until it exits or faults. Call it with IRQs
/// enabled (so the program takes the IPIs sent to it); everything is masked between the
/// switch of the context state word and the ERET.
pub fn run_user(program: Program) -> UserExit {
    let cpu = cpu::current_cpu();
    exceptions::set_user_handler(handle_from_user);
    let (pc, x0, x1) = match program {
        Program::Loop { spins } => (
            pm_user_loop as *const () as usize,
            spins,
            USER_DATA.slot(cpu) as u64,
        ),
        Program::ReadProbe(addr) => (pm_user_probe_read as *const () as usize, addr as u64, 0),
        Program::WriteProbe(addr) => (pm_user_probe_write as *const () as usize, addr as u64, 0),
        Program::ExecProbe(addr) => (pm_user_probe_exec as *const () as usize, addr as u64, 0),
    };
    let sp = USER_DATA.slot(cpu) + USER_SLOT;
    let pan = pan_bit();
    if pan != 0 {
        // SAFETY: `MSR PAN, #1`: the kernel no longer reaches user memory but through
        // STTR/LDTR, which it uses for the mailboxes only.
        unsafe { asm!(".inst 0xd500419f", options(nostack, preserves_flags)) };
    }
    let status = enter(cpu, pc, sp, x0, x1, pan);
    let last = &LAST_EXIT[cpu];
    match status {
        STATUS_FAULT => UserExit::Fault {
            esr: last.esr.load(Ordering::Relaxed),
            far: last.far.load(Ordering::Relaxed),
            elr: last.elr.load(Ordering::Relaxed),
        },
        STATUS_BAD_CALL => UserExit::BadCall(last.call.load(Ordering::Relaxed)),
        status => UserExit::Exited(status),
    }
}

/// The switch to user mode and the ERET, with nothing patchable in between.
#[unsafe(link_section = ".text.nopatch")]
#[inline(never)]
fn enter(cpu: usize, pc: usize, sp: usize, x0: u64, x1: u64, pan: u64) -> u64 {
    let saved = cpu::mask_all();
    user_context::USER_CONTEXTS.exit_to_user(cpu);
    // SAFETY: `pc` is a user program in `.user_text` and `sp` the top of this CPU's user
    // slot; EL0t with D, A, I, F and ALLINT clear. `pm_enter_user` returns only through
    // `pm_user_return`, with the callee-saved registers and SP it saved.
    let status = unsafe { pm_enter_user(pc, sp, x0, x1, pan) };
    cpu::restore(saved);
    status
}

/// Ends the program: the frame's ERET lands at `pm_user_return`, at EL1, masked.
fn return_to_kernel(frame: &mut TrapFrame, status: u64) {
    frame.elr = pm_user_return as *const () as u64;
    frame.spsr = SPSR_EL1H_MASKED | pan_bit();
    frame.x[0] = status;
}

/// Exceptions from EL0, after the entry's deferred work (`exceptions::from_user`).
fn handle_from_user(frame: &mut TrapFrame) {
    let cpu = cpu::current_cpu();
    if frame.kind == kind::IRQ_EL0 {
        count_irq(cpu);
        if let Err(why) = irq::handle_irq_exception(frame.depth, frame.pmr) {
            exceptions::fatal(frame, why);
        }
        return;
    }
    let last = &LAST_EXIT[cpu];
    match exceptions::esr_ec(frame.esr) {
        0x15 => match frame.x[8] {
            SYS_TICK => {
                let tick = tick(cpu);
                frame.x[0] = tick.value;
                frame.x[1] = u64::from(tick.exit);
            }
            SYS_EXIT => return_to_kernel(frame, frame.x[0] & !STATUS_FAULT),
            call => {
                last.call.store(call, Ordering::Relaxed);
                return_to_kernel(frame, STATUS_BAD_CALL);
            }
        },
        _ => {
            last.esr.store(frame.esr, Ordering::Relaxed);
            last.far.store(frame.far, Ordering::Relaxed);
            last.elr.store(frame.elr, Ordering::Relaxed);
            return_to_kernel(frame, STATUS_FAULT);
        }
    }
}

/// Writes `value` to `cpu`'s mailbox with an unprivileged store (`STTR`: allowed under
/// PAN, and a fault if the page were not EL0-writable).
pub fn post_to_mailbox(cpu: usize, value: u64) {
    let slot = USER_DATA.slot(cpu);
    // SAFETY: the mailbox is this CPU slot's word 0 in `.user_data`, mapped EL0
    // read-write; the user loop only reads it. Not `nomem`: a store.
    unsafe {
        asm!("sttr {v}, [{a}]", v = in(reg) value, a = in(reg) slot, options(nostack, preserves_flags))
    };
}
