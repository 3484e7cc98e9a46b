//! Exception handling: the Rust side of `boot/aarch64/vectors.S`.
//!
//! - IRQ from the current EL on SP_EL1 (the only asynchronous exception the kernel
//!   expects) goes to `irq::handle_irq_exception`, then the CPU resumes. It may
//!   nest (an NMI inside a normal handler, or inside the stop IPI's rendezvous).
//! - The vectors save ICC_PMR_EL1 in the frame on entry and write it back on return
//!   (see [`TrapFrame::pmr`]).
//! - A synchronous exception is first offered to the internal semihosting probe and to
//!   the registrable BRK hook ([`set_brk_handler`]); if the hook returns true the CPU
//!   resumes with the frame as the hook left it (it must have advanced ELR).
//! - A synchronous exception or an IRQ from EL0 (user mode, `user.rs`) is a kernel
//!   entry: before anything patchable runs, `from_user` switches the CPU's context
//!   state word to kernel with one atomic swap (`user_context::USER_CONTEXTS`), does the work a
//!   patcher deferred to this entry (waits out the stop that deferred it, then `ISB`),
//!   and only then hands the frame to the user-mode handler ([`set_user_handler`]); on
//!   the way back to EL0 it switches the word to user with one RMW, everything masked.
//!   All of that is in `.text.nopatch` up to the hand-off (tests/kernel_image.rs).
//! - Everything else (FIQ, SError, any SP_EL0 or AArch32 vector, an unclaimed
//!   synchronous exception, any exception on an unusable stack, or one nested inside a
//!   handler) prints an `UNEXPECTED EXCEPTION` report (kind, ESR decoded, ELR, FAR,
//!   SPSR, SP, CPU, registers) and ends the run with a failure status.

use super::user_context::USER_CONTEXTS;
use super::{console, cpu, exit, irq, semihosting, timer};
use core::fmt;
use core::sync::atomic::{AtomicUsize, Ordering};

/// The registers saved on exception entry. `#[repr(C)]`: the layout is shared with
/// `boot/aarch64/vectors.S` through `offset_of!` constants.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct TrapFrame {
    /// x0-x30 at the exception (restored on resume).
    pub x: [u64; 31],
    /// SP at the exception (informational; not restored).
    pub sp: u64,
    /// ELR_EL1: where the CPU resumes.
    pub elr: u64,
    /// SPSR_EL1: the PSTATE it resumes with.
    pub spsr: u64,
    /// ESR_EL1 (meaningful for synchronous exceptions and SError).
    pub esr: u64,
    /// FAR_EL1 (meaningful for aborts and alignment faults).
    pub far: u64,
    /// FPCR (restored).
    pub fpcr: u64,
    /// FPSR (restored).
    pub fpsr: u64,
    /// SP_EL0 (unused by this kernel).
    pub sp_el0: u64,
    /// Vector index 0..16 (see [`kind_name`]).
    pub kind: u64,
    /// Exception frames in flight on this CPU, this one included.
    pub depth: u64,
    /// Non-zero if the entry found SP unusable and switched to the exception stack.
    pub emergency: u64,
    /// ICC_PMR_EL1 at the exception, written back on return so that no handler can
    /// leave the priority mask changed (`u64::MAX`: not saved, the CPU's GIC interface
    /// was not up yet; see [`super::nmi_mode`]).
    pub pmr: u64,
    /// Keeps `q` 16-byte aligned.
    pub reserved: u64,
    /// q0-q31 (restored).
    pub q: [u128; 32],
}

/// Size of [`TrapFrame`]: a multiple of 16 so SP stays aligned.
pub const FRAME_SIZE: usize = size_of::<TrapFrame>();
const _: () = assert!(FRAME_SIZE.is_multiple_of(16));
const _: () = assert!(
    core::mem::offset_of!(TrapFrame, emergency) == core::mem::offset_of!(TrapFrame, depth) + 8
);
const _: () =
    assert!(core::mem::offset_of!(TrapFrame, kind) == core::mem::offset_of!(TrapFrame, sp_el0) + 8);
const _: () =
    assert!(core::mem::offset_of!(TrapFrame, spsr) == core::mem::offset_of!(TrapFrame, elr) + 8);
const _: () =
    assert!(core::mem::offset_of!(TrapFrame, far) == core::mem::offset_of!(TrapFrame, esr) + 8);
const _: () =
    assert!(core::mem::offset_of!(TrapFrame, fpsr) == core::mem::offset_of!(TrapFrame, fpcr) + 8);
const _: () = assert!(core::mem::offset_of!(TrapFrame, q) % 16 == 0);
const _: () = assert!(
    core::mem::offset_of!(TrapFrame, pmr) == core::mem::offset_of!(TrapFrame, emergency) + 8
);

/// Deepest nesting the Rust handler is trusted with (the vectors exit directly beyond).
pub const MAX_DEPTH: u64 = 4;

/// The BRK hook: a `fn(&mut TrapFrame) -> bool` as usize, 0 = none.
static BRK_HANDLER: AtomicUsize = AtomicUsize::new(0);

/// The kprobes' BRK hook (same type), for [`KPROBE_BRK_IMM`] and [`KPROBE_XOL_BRK_IMM`].
static KPROBE_BRK_HANDLER: AtomicUsize = AtomicUsize::new(0);

/// `BRK` immediate of an armed kprobe (Linux's arm64 kprobes use the same value).
pub const KPROBE_BRK_IMM: u16 = 0x004;
/// `BRK` immediate that ends a kprobe's out-of-line step.
pub const KPROBE_XOL_BRK_IMM: u16 = 0x006;

/// Vector indices.
pub mod kind {
    /// Synchronous exception from the current EL on SP_EL1.
    pub const SYNC_SPX: u64 = 4;
    /// IRQ from the current EL on SP_EL1.
    pub const IRQ_SPX: u64 = 5;
    /// Synchronous exception from EL0 (AArch64): SVC, aborts.
    pub const SYNC_EL0: u64 = 8;
    /// IRQ from EL0 (AArch64).
    pub const IRQ_EL0: u64 = 9;
}

/// The user-mode handler: a `fn(&mut TrapFrame)` as usize, 0 = none (`user.rs`).
static USER_HANDLER: AtomicUsize = AtomicUsize::new(0);

/// How long a kernel entry waits for the stop that deferred it to close: longer than any
/// stop may take (arrival timeout plus stall timeout of the default options); past it
/// the stop is stuck and the run ends.
const ENTRY_WAIT_LIMIT_NS: u64 = 30_000_000_000;

/// Installs the handler of exceptions from EL0, called after the entry's deferred work.
/// It may run patchable code; if it leaves `frame.spsr` returning to EL0, the CPU goes
/// back to user mode.
pub fn set_user_handler(f: fn(&mut TrapFrame)) {
    // Release pairs with the Acquire in `from_user`.
    USER_HANDLER.store(f as usize, Ordering::Release);
}

/// Registers a hook for synchronous exceptions caused by a `BRK` instruction (ESR EC
/// 0x3c). If it returns true the CPU resumes from the frame as the hook left it: the
/// hook must have moved `elr` past the BRK (`frame.elr += 4`). If it returns false the
/// exception is reported as unexpected. Runs with every exception masked.
pub fn set_brk_handler(f: fn(&mut TrapFrame) -> bool) {
    // Release pairs with the Acquire in `handle_sync`.
    BRK_HANDLER.store(f as usize, Ordering::Release);
}

/// Registers the kprobes' hook: it gets the BRKs with [`KPROBE_BRK_IMM`] and
/// [`KPROBE_XOL_BRK_IMM`] before [`set_brk_handler`]'s hook, with the same contract.
pub fn set_kprobe_brk_handler(f: fn(&mut TrapFrame) -> bool) {
    // Release pairs with the Acquire in `handle_sync`.
    KPROBE_BRK_HANDLER.store(f as usize, Ordering::Release);
}

/// Removes the BRK hook.
pub fn clear_brk_handler() {
    BRK_HANDLER.store(0, Ordering::Release);
}

/// The calling CPU's exception nesting depth (0 in normal code).
pub fn depth() -> u64 {
    super::nesting::depth_of(cpu::current_cpu())
}

/// The name of vector `kind`.
pub fn kind_name(kind: u64) -> &'static str {
    const NAMES: [&str; 16] = [
        "synchronous, current EL with SP_EL0",
        "IRQ, current EL with SP_EL0",
        "FIQ, current EL with SP_EL0",
        "SError, current EL with SP_EL0",
        "synchronous, current EL with SP_EL1",
        "IRQ, current EL with SP_EL1",
        "FIQ, current EL with SP_EL1",
        "SError, current EL with SP_EL1",
        "synchronous, lower EL (AArch64)",
        "IRQ, lower EL (AArch64)",
        "FIQ, lower EL (AArch64)",
        "SError, lower EL (AArch64)",
        "synchronous, lower EL (AArch32)",
        "IRQ, lower EL (AArch32)",
        "FIQ, lower EL (AArch32)",
        "SError, lower EL (AArch32)",
    ];
    NAMES
        .get(kind as usize)
        .copied()
        .unwrap_or("unknown vector")
}

/// ESR_EL1.EC.
#[inline(always)]
pub fn esr_ec(esr: u64) -> u8 {
    ((esr >> 26) & 0x3f) as u8
}

/// Exception classes and their names, searched by [`ec_name`].
const EC_NAMES: [(u8, &str); 23] = [
    (0x00, "unknown reason (e.g. undefined instruction)"),
    (0x01, "trapped WFI/WFE"),
    (0x07, "trapped SVE/SIMD/FP access"),
    (0x0e, "illegal execution state"),
    (0x15, "SVC (AArch64)"),
    (0x16, "HVC (AArch64)"),
    (0x17, "SMC (AArch64)"),
    (0x18, "trapped MSR/MRS/system instruction"),
    (0x20, "instruction abort, lower EL"),
    (0x21, "instruction abort, same EL"),
    (0x22, "PC alignment fault"),
    (0x24, "data abort, lower EL"),
    (0x25, "data abort, same EL"),
    (0x26, "SP alignment fault"),
    (0x2c, "trapped floating-point exception"),
    (0x2f, "SError"),
    (0x30, "breakpoint"),
    (0x31, "breakpoint"),
    (0x32, "software step"),
    (0x33, "software step"),
    (0x34, "watchpoint"),
    (0x35, "watchpoint"),
    (0x3c, "BRK instruction (AArch64)"),
];

/// A name for an exception class. A table search, not a `match` (which compiles to a
/// jump table, an indirect branch): exception entry, in `.text.nopatch`, names the
/// fault it hands to a stop function's fixup point (`handle_sync`).
#[unsafe(link_section = ".text.nopatch")]
pub fn ec_name(ec: u8) -> &'static str {
    // Opaque to the optimiser, which would otherwise turn the search back into a
    // jump table.
    core::hint::black_box(&EC_NAMES)
        .iter()
        .find(|(class, _)| *class == ec)
        .map_or("other", |(_, name)| name)
}

/// A name for an abort's fault status code (ISS[5:0] of an instruction/data abort).
fn fault_status_name(fsc: u8) -> &'static str {
    match fsc {
        0x00..=0x03 => "address size fault",
        0x04..=0x07 => "translation fault",
        0x08..=0x0b => "access flag fault",
        0x0c..=0x0f => "permission fault",
        0x10 => "synchronous external abort",
        0x21 => "alignment fault",
        0x30 => "TLB conflict abort",
        _ => "other fault",
    }
}

struct Esr(u64);

impl fmt::Display for Esr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ec = esr_ec(self.0);
        let iss = self.0 & 0x1ff_ffff;
        write!(
            f,
            "{:#010x} (EC {ec:#04x}: {}; ISS {iss:#x}",
            self.0,
            ec_name(ec)
        )?;
        match ec {
            0x20 | 0x21 | 0x24 | 0x25 => {
                let fsc = (iss & 0x3f) as u8;
                write!(f, "; {} level {}", fault_status_name(fsc), fsc & 3)?;
                if ec >= 0x24 {
                    f.write_str(if iss & (1 << 6) != 0 {
                        ", write"
                    } else {
                        ", read"
                    })?;
                }
                if iss & (1 << 10) != 0 {
                    f.write_str(", FAR not valid")?;
                }
            }
            0x3c => write!(f, "; BRK #{:#x}", iss & 0xffff)?,
            _ => {}
        }
        f.write_str(")")
    }
}

/// The Rust exception handler, called by the vectors with everything masked.
#[unsafe(link_section = ".text.nopatch")]
pub(crate) extern "C" fn handle_exception(frame: &mut TrapFrame) {
    if frame.emergency != 0 {
        fatal(frame, "exception with an unusable stack (stack overflow?)");
    }
    match frame.kind {
        // At depth > 1 only an NMI-class interrupt may have been taken (inside a handler
        // that let NMIs in); the IRQ path reports anything else.
        kind::IRQ_SPX => {
            if let Err(why) = irq::handle_irq_exception(frame.depth, frame.pmr) {
                fatal(frame, why);
            }
        }
        kind::SYNC_SPX => {
            if !handle_sync(frame) {
                let why = if frame.depth > 1 {
                    "nested exception (inside an exception handler)"
                } else {
                    "unhandled synchronous exception"
                };
                fatal(frame, why);
            }
        }
        kind::SYNC_EL0 | kind::IRQ_EL0 if frame.depth == 1 => from_user(frame),
        _ if frame.depth > 1 => fatal(frame, "nested exception (inside an exception handler)"),
        _ => fatal(frame, "unexpected exception vector"),
    }
}

/// The entry's wait for the stop that deferred it (if one did) to close: bounded, the
/// run ends past [`ENTRY_WAIT_LIMIT_NS`].
#[unsafe(link_section = ".text.nopatch")]
#[inline(never)]
fn wait_out_stop(frame: &TrapFrame, deferred: crate::stop::Deferred) {
    let relax = || {
        // SAFETY: a hint; under single-threaded TCG it lets the stopping CPUs run.
        unsafe { core::arch::asm!("yield", options(nomem, nostack, preserves_flags)) }
    };
    if USER_CONTEXTS
        .finish_deferred(deferred, ENTRY_WAIT_LIMIT_NS, timer::now_ns, relax)
        .is_err()
    {
        fatal(
            frame,
            "a kernel entry from user mode waited 30 s for the stop that deferred it",
        );
    }
}

/// SPSR_EL1.M of a return to EL0 (EL0t).
const SPSR_M_MASK: u64 = 0xf;

/// A kernel entry from user mode, everything masked: the context-tracking protocol up to
/// the deferred work, all in this function and so in `.text.nopatch`, then the user-mode
/// handler, then (back to EL0) the switch to user mode. A function of its own, so that
/// tests/kernel_image.rs can check its order: swap, ISB, then the one indirect call.
#[unsafe(link_section = ".text.nopatch")]
#[inline(never)]
pub(crate) fn from_user(frame: &mut TrapFrame) {
    let cpu = cpu::current_cpu();
    let deferred = USER_CONTEXTS.enter_kernel(cpu);
    if deferred.pending {
        wait_out_stop(frame, deferred);
        // The writes a patcher deferred this CPU's synchronisation for are complete and
        // visible (the swap's and the window's Acquire): discard anything fetched before.
        cpu::isb();
    }
    // From here on patchable code may run. Acquire pairs with the Release in
    // `set_user_handler`.
    let handler = USER_HANDLER.load(Ordering::Acquire);
    if handler == 0 {
        fatal(frame, "exception from user mode, and no user-mode handler");
    }
    // SAFETY: only `set_user_handler` stores non-zero values, and those are
    // `fn(&mut TrapFrame)` pointers.
    let handler: fn(&mut TrapFrame) = unsafe { core::mem::transmute(handler) };
    handler(frame);
    if frame.spsr & SPSR_M_MASK == 0 {
        // Back to EL0: masked (the handler may have let NMIs in), then the state word,
        // then only the vectors' exit path, which patching refuses, up to the ERET.
        cpu::mask_all();
        USER_CONTEXTS.exit_to_user(cpu);
    }
}

/// Offers a synchronous exception to the semihosting probe, the kprobes' BRK hook and
/// the BRK hook. Inlined into `handle_exception`: exception entry stays in
/// `.text.nopatch`, which no kprobe may be placed in.
#[inline(always)]
fn handle_sync(frame: &mut TrapFrame) -> bool {
    if semihosting::trapped(frame.elr) {
        frame.x[0] = u64::MAX;
        frame.elr += 4;
        return true;
    }
    if esr_ec(frame.esr) == 0x3c {
        let imm = (frame.esr & 0xffff) as u16;
        // Acquire pairs with the Release in `set_kprobe_brk_handler`.
        let kprobe_hook = KPROBE_BRK_HANDLER.load(Ordering::Acquire);
        if (imm == KPROBE_BRK_IMM || imm == KPROBE_XOL_BRK_IMM) && kprobe_hook != 0 {
            // SAFETY: only `set_kprobe_brk_handler` stores non-zero values, and those
            // are `fn(&mut TrapFrame) -> bool` pointers.
            let hook: fn(&mut TrapFrame) -> bool = unsafe { core::mem::transmute(kprobe_hook) };
            return hook(frame);
        }
        // Acquire pairs with the Release in `set_brk_handler`.
        let hook = BRK_HANDLER.load(Ordering::Acquire);
        if hook != 0 {
            // SAFETY: only `set_brk_handler` stores non-zero values, and those are
            // `fn(&mut TrapFrame) -> bool` pointers.
            let hook: fn(&mut TrapFrame) -> bool = unsafe { core::mem::transmute(hook) };
            return hook(frame);
        }
    }
    // About to be fatal: a stop function run with its fixup point armed ends here
    // instead (`fixup`). Nothing else on the way pays for it.
    let ec = esr_ec(frame.esr);
    let fault = crate::stop::StopFault {
        what: ec_name(ec),
        pc: frame.elr as usize,
        // FAR_EL1 is meaningful for aborts only.
        addr: if (0x20..=0x25).contains(&ec) {
            frame.far as usize
        } else {
            0
        },
        syndrome: frame.esr,
    };
    if let Some((resume, ctx)) = super::fixup::resume_from_fault(fault) {
        frame.elr = resume;
        frame.x[0] = ctx;
        return true;
    }
    false
}

/// Prints the report for `frame` and ends the run with a failure status.
pub(crate) fn fatal(frame: &TrapFrame, why: &str) -> ! {
    cpu::mask_all();
    let cpu = cpu::current_cpu();
    console::write_forced(format_args!(
        "\nUNEXPECTED EXCEPTION on cpu {cpu}: {why}\n  vector: {} (depth {}{})\n  ESR_EL1 {}\n  \
         ELR_EL1 {:#018x}  FAR_EL1 {:#018x}\n  SPSR_EL1 {:#010x}  SP {:#018x}  PMR {:#x}\n",
        kind_name(frame.kind),
        frame.depth,
        if frame.emergency != 0 {
            ", on the exception stack"
        } else {
            ""
        },
        Esr(frame.esr),
        frame.elr,
        frame.far,
        frame.spsr,
        frame.sp,
        frame.pmr,
    ));
    for row in 0..8 {
        let mut line = [0u8; 96];
        let mut w = Buf {
            buf: &mut line,
            len: 0,
        };
        for i in (row * 4)..(row * 4 + 4).min(31) {
            let _ = fmt::Write::write_fmt(&mut w, format_args!(" x{i:<2} {:#018x}", frame.x[i]));
        }
        let len = w.len;
        console::write_raw_forced(&line[..len]);
        console::write_raw_forced(b"\n");
    }
    exit::exit(false)
}

/// A fixed buffer writer (no allocation on the fatal path).
struct Buf<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl fmt::Write for Buf<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}
