//! Ring 3: the user programs, entering and leaving them, their system calls and their
//! faults.
//!
//! - **Memory.** The user programs are in `.user_text` (linker-x86_64.ld), mapped
//!   read-only and executable with U/S set; their mailboxes and stacks in `.user_data`,
//!   read-write, NX, U/S. Nothing else has U/S in its leaf entry (`paging`): ring 3 can
//!   neither read, write nor execute kernel memory (a probe that tries takes a #PF that
//!   is reported, [`UserExit::Fault`]). Where CPUID has them, CR4.SMEP and CR4.SMAP are
//!   set on every CPU ([`protect_kernel`]): the kernel cannot execute user pages, and
//!   touches user data only in [`post_to_mailbox`], between `STAC` and `CLAC`.
//! - **Entry: `INT 0x80`**, a DPL 3 interrupt gate, not `SYSCALL`: it reuses the trap
//!   stubs and their frame (so system calls, faults and interrupts from ring 3 all go
//!   through one entry, `traps::from_user`), switches to TSS.RSP0 in hardware (no
//!   SWAPGS, no stack switch by hand) and clears IF. GS keeps the kernel's per-CPU base
//!   in ring 3 (the user programs are the kernel's own and never load GS): a kernel
//!   with foreign user code would need SWAPGS. **Exit: `IRETQ`** (the stubs' own).
//! - **Enter and return.** [`run_user`] masks interrupts, switches the CPU's context
//!   state word to user mode and `pm_enter_user` saves the callee-saved registers,
//!   points TSS.RSP0 at its frame and IRETQs to ring 3. `SYS_EXIT`, a fault or a bad
//!   call ends the program by making the entry's IRETQ land on `pm_user_return` in
//!   ring 0, on that frame, which returns from `pm_enter_user`.
//! - **The loop** (`pm_user_loop`): enters the kernel (`SYS_TICK`) once every `spins`
//!   iterations, or at once when its mailbox changes; on each entry the kernel runs the
//!   tick hook ([`set_tick_hook`]), kernel code that is subject to patching; a non-zero
//!   RDX in the answer makes it exit.

use super::frame::TrapFrame;
use super::{cpu, gdt};
use crate::MAX_CPUS;
pub use crate::arch::user_programs::{
    Program, SYS_EXIT, SYS_TICK, Tick, USER_DATA, UserData, count_irq, set_tick_hook, ticks,
    user_irqs,
};
use crate::arch::user_programs::{STATUS_BAD_CALL, STATUS_FAULT, USER_SLOT, tick};
use core::arch::{asm, global_asm};
use core::sync::atomic::{AtomicU64, Ordering};

/// The system call vector (`INT 0x80`, a DPL 3 gate).
pub const SYSCALL_VECTOR: u8 = 0x80;

global_asm!(
    r#"
    .pushsection .user_text, "ax"
    .balign 4096
    // rdi = spins between entries, rsi = this CPU's mailbox.
    .global pm_user_loop
pm_user_loop:
    mov     %rdi, %r12
    mov     %rsi, %r13
    mov     (%r13), %r14
1:  mov     ${tick}, %eax
    int     ${vector}
    test    %rdx, %rdx
    jnz     4f
    mov     %r12, %rcx
2:  mov     (%r13), %r8
    cmp     %r14, %r8
    jne     3f
    pause
    sub     $1, %rcx
    ja      2b
3:  mov     %r8, %r14
    jmp     1b
4:  mov     ${exit}, %eax
    xor     %edi, %edi
    int     ${vector}
5:  jmp     5b

    // rdi = an address: load from it, store to it, or jump to it.
    .global pm_user_probe_read
pm_user_probe_read:
    mov     (%rdi), %rax
    jmp     6f
    .global pm_user_probe_write
pm_user_probe_write:
    movq    $0, (%rdi)
    jmp     6f
    .global pm_user_probe_exec
pm_user_probe_exec:
    jmp     *%rdi
6:  mov     ${exit}, %eax
    xor     %edi, %edi
    int     ${vector}
7:  jmp     7b
    .balign 4096
    .popsection

    .pushsection .text.nopatch, "ax"
    // rdi = user RIP, rsi = user RSP, rdx = user RDI, rcx = user RSI, r8 = &TSS.RSP0.
    // Returns the status `pm_user_return` is entered with (RAX). IF clear.
    .global pm_enter_user
pm_enter_user:
    push    %rbx
    push    %rbp
    push    %r12
    push    %r13
    push    %r14
    push    %r15
    sub     $8, %rsp
    // Interrupts from ring 3 start here, below the saved registers.
    mov     %rsp, (%r8)
    pushq   ${user_ds}
    push    %rsi
    pushq   $0x202
    pushq   ${user_cs}
    push    %rdi
    mov     %rdx, %rdi
    mov     %rcx, %rsi
    // No kernel value reaches ring 3.
    xor     %eax, %eax
    xor     %ebx, %ebx
    xor     %ecx, %ecx
    xor     %edx, %edx
    xor     %ebp, %ebp
    xor     %r8d, %r8d
    xor     %r9d, %r9d
    xor     %r10d, %r10d
    xor     %r11d, %r11d
    xor     %r12d, %r12d
    xor     %r13d, %r13d
    xor     %r14d, %r14d
    xor     %r15d, %r15d
    iretq
    // Reached by an IRETQ to ring 0 (`return_to_kernel`), RSP = the TSS.RSP0 set above.
    .global pm_user_return
pm_user_return:
    add     $8, %rsp
    pop     %r15
    pop     %r14
    pop     %r13
    pop     %r12
    pop     %rbp
    pop     %rbx
    ret
    .popsection
"#,
    tick = const SYS_TICK,
    exit = const SYS_EXIT,
    vector = const SYSCALL_VECTOR,
    user_cs = const gdt::USER_CS,
    user_ds = const gdt::USER_DS,
    options(att_syntax)
);

unsafe extern "C" {
    fn pm_enter_user(rip: usize, rsp: usize, rdi: u64, rsi: u64, rsp0: *mut u64) -> u64;
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
    /// An exception from ring 3: the kernel stopped the program.
    Fault {
        /// The vector (14: #PF, 13: #GP, ...).
        vector: u64,
        /// The error code (0 where the CPU pushes none).
        error: u64,
        /// CR2 (meaningful for #PF).
        cr2: u64,
        /// Where the program was.
        rip: u64,
    },
    /// A system call with an unknown number (RAX).
    BadCall(u64),
}

/// What a CPU's last run ended with, besides the status: written by the CPU only.
struct LastExit {
    vector: AtomicU64,
    error: AtomicU64,
    cr2: AtomicU64,
    rip: AtomicU64,
    call: AtomicU64,
}

static LAST_EXIT: [LastExit; MAX_CPUS] = [const {
    LastExit {
        vector: AtomicU64::new(0),
        error: AtomicU64::new(0),
        cr2: AtomicU64::new(0),
        rip: AtomicU64::new(0),
        call: AtomicU64::new(0),
    }
}; MAX_CPUS];

/// CR4.SMEP.
const CR4_SMEP: u64 = 1 << 20;
/// CR4.SMAP.
const CR4_SMAP: u64 = 1 << 21;

/// CPUID.(EAX=7,ECX=0):EBX: SMEP (bit 7) and SMAP (bit 20).
fn leaf7_ebx() -> u32 {
    if cpu::cpuid(0, 0)[0] >= 7 {
        cpu::cpuid(7, 0)[1]
    } else {
        0
    }
}

/// Whether the CPU has SMAP (the kernel's PAN).
pub fn has_smap() -> bool {
    leaf7_ebx() & (1 << 20) != 0
}

/// Whether CR4.SMAP is set on the calling CPU (the kernel cannot touch user data but
/// between `STAC` and `CLAC`).
pub fn smap_on() -> bool {
    let cr4: u64;
    // SAFETY: reads a control register.
    unsafe { asm!("mov {}, cr4", out(reg) cr4, options(nomem, nostack, preserves_flags)) };
    cr4 & CR4_SMAP != 0
}

/// Sets CR4.SMEP and CR4.SMAP on the calling CPU where CPUID says it has them. Once per
/// CPU, after its final page tables are loaded.
pub fn protect_kernel() {
    let ebx = leaf7_ebx();
    let mut bits = 0;
    if ebx & (1 << 7) != 0 {
        bits |= CR4_SMEP;
    }
    if ebx & (1 << 20) != 0 {
        bits |= CR4_SMAP;
    }
    if bits == 0 {
        return;
    }
    // SAFETY: the kernel executes no user page and touches user data only between STAC
    // and CLAC (`post_to_mailbox`); CPUID says both bits exist.
    unsafe {
        asm!(
            "mov {t}, cr4",
            "or {t}, {bits}",
            "mov cr4, {t}",
            t = out(reg) _,
            bits = in(reg) bits,
            options(nostack, preserves_flags)
        )
    };
}

/// Runs `program` in ring 3 on the calling CPU until it exits or faults. Call it with
/// interrupts enabled (so the program takes the IPIs sent to it); IF is clear between
/// the switch of the context state word and the IRETQ.
pub fn run_user(program: Program) -> UserExit {
    let cpu = cpu::current_cpu();
    let (rip, rdi, rsi) = match program {
        Program::Loop { spins } => (
            pm_user_loop as *const () as usize,
            spins,
            USER_DATA.slot(cpu) as u64,
        ),
        Program::ReadProbe(addr) => (pm_user_probe_read as *const () as usize, addr as u64, 0),
        Program::WriteProbe(addr) => (pm_user_probe_write as *const () as usize, addr as u64, 0),
        Program::ExecProbe(addr) => (pm_user_probe_exec as *const () as usize, addr as u64, 0),
    };
    let rsp = USER_DATA.slot(cpu) + USER_SLOT;
    let status = enter(cpu, rip, rsp, rdi, rsi);
    let last = &LAST_EXIT[cpu];
    match status {
        STATUS_FAULT => UserExit::Fault {
            vector: last.vector.load(Ordering::Relaxed),
            error: last.error.load(Ordering::Relaxed),
            cr2: last.cr2.load(Ordering::Relaxed),
            rip: last.rip.load(Ordering::Relaxed),
        },
        STATUS_BAD_CALL => UserExit::BadCall(last.call.load(Ordering::Relaxed)),
        status => UserExit::Exited(status),
    }
}

/// The switch to user mode and the IRETQ, with nothing patchable in between.
#[unsafe(link_section = ".text.nopatch")]
#[inline(never)]
fn enter(cpu: usize, rip: usize, rsp: usize, rdi: u64, rsi: u64) -> u64 {
    let saved = cpu::cli_save();
    super::user_context::USER_CONTEXTS.exit_to_user(cpu);
    // SAFETY: `rip` is a user program in `.user_text` and `rsp` the top of this CPU's
    // user slot; the slot is this CPU's own TSS.RSP0. `pm_enter_user` returns only
    // through `pm_user_return`, with the callee-saved registers and RSP it saved.
    let status = unsafe { pm_enter_user(rip, rsp, rdi, rsi, gdt::rsp0_slot(cpu)) };
    cpu::restore_if(saved);
    status
}

/// Ends the program: the entry's IRETQ lands at `pm_user_return`, in ring 0, IF clear,
/// on the stack `pm_enter_user` left in TSS.RSP0.
fn return_to_kernel(frame: &mut TrapFrame, status: u64) {
    let cpu = cpu::current_cpu();
    frame.rip = pm_user_return as *const () as u64;
    frame.cs = u64::from(gdt::KERNEL_CS);
    frame.ss = u64::from(gdt::KERNEL_DS);
    // SAFETY: this CPU's own slot, written only by this CPU (see `gdt::rsp0_slot`).
    frame.rsp = unsafe { gdt::rsp0_slot(cpu).read() };
    frame.rflags = 0x2;
    frame.rax = status;
}

/// A system call or an exception from ring 3, after the entry's deferred work
/// (`traps::from_user`).
pub fn handle_from_user(frame: &mut TrapFrame) {
    let cpu = cpu::current_cpu();
    let last = &LAST_EXIT[cpu];
    if frame.vector != u64::from(SYSCALL_VECTOR) {
        last.vector.store(frame.vector, Ordering::Relaxed);
        last.error.store(frame.error, Ordering::Relaxed);
        last.cr2.store(cpu::cr2(), Ordering::Relaxed);
        last.rip.store(frame.rip, Ordering::Relaxed);
        return return_to_kernel(frame, STATUS_FAULT);
    }
    match frame.rax {
        SYS_TICK => {
            let tick = tick(cpu);
            frame.rax = tick.value;
            frame.rdx = u64::from(tick.exit);
        }
        SYS_EXIT => return_to_kernel(frame, frame.rdi & !STATUS_FAULT),
        call => {
            last.call.store(call, Ordering::Relaxed);
            return_to_kernel(frame, STATUS_BAD_CALL);
        }
    }
}

/// Writes `value` to `cpu`'s mailbox: the kernel's one access to user data, with SMAP
/// lifted (`STAC`) for that store only.
pub fn post_to_mailbox(cpu: usize, value: u64) {
    let slot = USER_DATA.slot(cpu);
    let smap = has_smap();
    // SAFETY: the mailbox is this CPU slot's word 0 in `.user_data`, mapped read-write;
    // the user loop only reads it. STAC/CLAC exist where SMAP does; AC is set only
    // around the store. Not `nomem`: a store.
    unsafe {
        if smap {
            asm!("stac", options(nostack));
        }
        (slot as *mut u64).write_volatile(value);
        if smap {
            asm!("clac", options(nostack));
        }
    }
}
