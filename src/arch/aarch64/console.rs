//! The console: the DTB's PL011 through the `arm-pl011-uart` crate, line-buffered per
//! CPU so that lines from different CPUs never interleave.
//!
//! - [`kprint!`](crate::kprint)/[`kprintln!`](crate::kprintln) format into the calling
//!   CPU's line buffer with every exception masked; a complete line (or a full buffer)
//!   is written to the UART under one spin lock acquisition. Lines of up to
//!   [`LINE_CAPACITY`] bytes are therefore atomic; longer ones are split.
//! - Because the lock is only held with exceptions masked, an interrupt handler on the
//!   same CPU can never find it held by the code it interrupted.
//! - Fatal paths (panic, unexpected exception, exit) use [`write_forced`]: it spins for
//!   the lock for a bounded time, then breaks it (the holder is presumed dead or stuck)
//!   so that the report always gets out.
//! - Before the UART is set up (MMU off: no atomic read-modify-write allowed), output
//!   goes without any lock straight to the PL011's data register once the DTB has named
//!   it ([`set_early_uart`]), and to semihosting SYS_WRITE0 before that (or if the DTB
//!   names no PL011).

use super::{cpu, semihosting, timer};
use crate::MAX_CPUS;
use arm_pl011_uart::{DataBits, LineConfig, Parity, StopBits, Uart, UniqueMmioPointer};
use core::cell::UnsafeCell;
use core::fmt::{self, Write};
use core::ptr::NonNull;
use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Bytes one CPU buffers before a newline forces a write.
pub const LINE_CAPACITY: usize = 256;

/// The UART, once [`init`] ran.
/// Waiters yield ([`cpu::YieldRelax`]): with hundreds of emulated CPUs printing, a
/// waiter's turn goes to the holder.
static UART: spin::mutex::Mutex<Option<Uart<'static>>, cpu::YieldRelax> =
    spin::mutex::Mutex::new(None);

/// Whether the UART lock may be used (the MMU is on and [`init`] ran).
static READY: AtomicBool = AtomicBool::new(false);

/// The PL011 base for output before [`init`] (0: none): set as soon as the DTB names
/// it, used without a lock by the boot CPU alone (MMU off: Device memory anyway).
static EARLY_UART: AtomicUsize = AtomicUsize::new(0);

/// One CPU's partial line.
type LineBuf = crate::console_line::LineBuf<LINE_CAPACITY>;

/// Per-CPU line buffers. Slot `i` is only touched by CPU `i` with every exception
/// masked (so never re-entered: fatal paths do not use it).
struct LineBufs([UnsafeCell<LineBuf>; MAX_CPUS]);

// SAFETY: each slot is accessed only by its own CPU, with exceptions masked (see
// `with_line_buf`), so there is never concurrent or re-entrant access to a slot.
unsafe impl Sync for LineBufs {}

static LINE_BUFS: LineBufs =
    LineBufs([const { UnsafeCell::new(LineBuf::new(write_locked)) }; MAX_CPUS]);

/// Sets up the UART at `base` (from the DTB). `clock_hz` is the UART reference clock
/// from the DTB; without it the UART is used as the firmware left it. Boot CPU, once,
/// after the MMU is on and the UART range is mapped as device memory.
///
/// # Safety
/// `base` must be the PL011's register block, mapped Device-nGnRnE, and nothing else may
/// access it except through this module.
pub unsafe fn init(base: usize, clock_hz: Option<u32>) {
    let Some(regs) = NonNull::new(base as *mut arm_pl011_uart::PL011Registers) else {
        return;
    };
    // SAFETY: the caller guarantees `base` is the PL011 block, mapped as device memory,
    // and that this is its only user.
    let mut uart = Uart::new(unsafe { UniqueMmioPointer::new(regs) });
    if let Some(clock) = clock_hz {
        let config = LineConfig {
            data_bits: DataBits::Bits8,
            parity: Parity::None,
            stop_bits: StopBits::One,
        };
        // An impossible divisor leaves the UART as the firmware configured it.
        let _ = uart.enable(config, 115_200, clock);
    }
    *UART.lock() = Some(uart);
    READY.store(true, Ordering::Release);
}

/// Records the PL011 for early output (boot CPU, MMU off, before [`init`]): until
/// then, output goes straight to this UART's data register (before this, to
/// semihosting), so an early failure is visible whether or not semihosting is enabled.
pub fn set_early_uart(base: usize) {
    EARLY_UART.store(base, Ordering::Relaxed);
}

/// Early output: the early UART if known, else semihosting. No lock: only the boot CPU
/// runs before [`init`].
fn write_early(bytes: &[u8]) {
    let base = EARLY_UART.load(Ordering::Relaxed);
    if base == 0 {
        semihosting::write(bytes);
        return;
    }
    for &b in bytes {
        if b == b'\n' {
            early_put(base, b'\r');
        }
        early_put(base, b);
    }
}

/// PL011 UARTFR.TXFF and the data register, by offset.
fn early_put(base: usize, b: u8) {
    const UARTDR: usize = 0x000;
    const UARTFR: usize = 0x018;
    const TXFF: u32 = 1 << 5;
    let mut spins = 0u32;
    // Bounded wait: a disabled UART must not hang us.
    while spins < 1_000_000 {
        // SAFETY: `base` is the DTB's PL011; with the MMU off every access is Device
        // memory, and only the boot CPU runs.
        let flags = unsafe { core::ptr::read_volatile((base + UARTFR) as *const u32) };
        if flags & TXFF == 0 {
            break;
        }
        spins += 1;
    }
    // SAFETY: as above.
    unsafe { core::ptr::write_volatile((base + UARTDR) as *mut u32, b as u32) };
}

/// Whether output goes to the UART (rather than to semihosting).
pub fn uart_ready() -> bool {
    READY.load(Ordering::Acquire)
}

/// Writes bytes to the UART with the lock held (or to semihosting before [`init`]).
/// Callers have exceptions masked.
fn write_locked(bytes: &[u8]) {
    if !uart_ready() {
        write_early(bytes);
        return;
    }
    let mut uart = UART.lock();
    write_uart(&mut uart, bytes);
}

fn write_uart(uart: &mut Option<Uart<'static>>, bytes: &[u8]) {
    match uart {
        Some(uart) => {
            for &b in bytes {
                if b == b'\n' {
                    put(uart, b'\r');
                }
                put(uart, b);
            }
        }
        None => semihosting::write(bytes),
    }
}

fn put(uart: &mut Uart<'static>, b: u8) {
    while uart.is_tx_fifo_full() {
        cpu::relax();
    }
    uart.write_word(b);
}

/// Runs `f` on the calling CPU's line buffer with every exception masked.
fn with_line_buf(f: impl FnOnce(&mut LineBuf)) {
    let saved = cpu::mask_all();
    let cpu = cpu::current_cpu();
    if cpu < MAX_CPUS {
        // SAFETY: slot `cpu` belongs to the calling CPU and exceptions are masked, so
        // nothing else can access it until we return (see `LineBufs`).
        let buf = unsafe { &mut *LINE_BUFS.0[cpu].get() };
        f(buf);
    }
    cpu::restore(saved);
}

/// The implementation of [`kprint!`](crate::kprint) and [`kprintln!`](crate::kprintln).
#[doc(hidden)]
pub fn _print(args: fmt::Arguments<'_>) {
    with_line_buf(|buf| {
        let _ = buf.write_fmt(args);
    });
}

/// Writes out the calling CPU's partial line, if any.
pub fn flush() {
    with_line_buf(LineBuf::flush);
}

/// Prints to the console. Output is line-buffered per CPU: see the module docs.
#[macro_export]
macro_rules! kprint {
    ($($arg:tt)*) => {
        $crate::arch::aarch64::console::_print(format_args!($($arg)*))
    };
}

/// Prints a line to the console; the line is written atomically with respect to other
/// CPUs' lines.
#[macro_export]
macro_rules! kprintln {
    () => {
        $crate::arch::aarch64::console::_print(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::arch::aarch64::console::_print(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// How long a fatal path waits for the console lock before breaking it.
const FORCE_WAIT_NS: u64 = 20_000_000;
/// ... and in spin iterations, in case the timer is not running yet.
const FORCE_WAIT_SPINS: u32 = 20_000_000;

/// A writer for fatal paths: see [`write_forced`].
pub struct ForcedWriter(());

impl Write for ForcedWriter {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        write_raw_forced(s.as_bytes());
        Ok(())
    }
}

/// Writes `args` for a fatal report, even if the console lock is held (possibly by the
/// interrupted code on this very CPU): waits a bounded time, then breaks the lock.
/// Partial lines buffered by the calling CPU are discarded. Call with exceptions
/// masked.
pub fn write_forced(args: fmt::Arguments<'_>) {
    let _ = ForcedWriter(()).write_fmt(args);
}

/// Writes raw bytes for a fatal report; see [`write_forced`].
pub fn write_raw_forced(bytes: &[u8]) {
    if !uart_ready() {
        write_early(bytes);
        return;
    }
    let start = timer::now_ns();
    let mut spins = 0u32;
    let mut guard = loop {
        if let Some(guard) = UART.try_lock() {
            break guard;
        }
        spins += 1;
        if spins >= FORCE_WAIT_SPINS || timer::now_ns().wrapping_sub(start) >= FORCE_WAIT_NS {
            // SAFETY: the holder has had ample time; we are on a fatal path and the run
            // ends right after this report. At worst two CPUs drive the UART at once
            // and characters interleave; the registers themselves stay consistent
            // (every access is a single aligned MMIO word).
            unsafe { UART.force_unlock() };
            spins = 0;
        }
        cpu::relax();
    };
    write_uart(&mut guard, bytes);
}

/// Flushes the calling CPU's partial line on the way out ([`super::exit::exit`]), without
/// waiting forever for the lock.
pub(crate) fn flush_for_exit() {
    let cpu = cpu::current_cpu();
    if cpu >= MAX_CPUS {
        return;
    }
    // SAFETY: called with exceptions masked by `exit`, on the calling CPU's own slot. A
    // fatal path may have interrupted `with_line_buf` on this CPU; then the buffer may
    // be mid-update, but `len` is always <= LINE_CAPACITY, so the bytes read are in
    // bounds (possibly a torn line, which is acceptable on the way out).
    let buf = unsafe { &mut *LINE_BUFS.0[cpu].get() };
    let (line, len) = buf.take();
    if len > 0 {
        write_raw_forced(line.get(..len).unwrap_or(&[]));
        write_raw_forced(b"\n");
    }
}
