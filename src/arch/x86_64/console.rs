//! The console: the 16550 UART at I/O port 0x3f8 (COM1), line-buffered per CPU so that
//! lines from different CPUs never interleave.
//!
//! - [`kprint!`](crate::kprint)/[`kprintln!`](crate::kprintln) format into the calling
//!   CPU's line buffer with interrupts off; a complete line (or a full buffer) is
//!   written under one spin lock acquisition, so lines up to [`LINE_CAPACITY`] bytes
//!   are atomic.
//! - The lock is only held with interrupts off, so an interrupt handler on the same
//!   CPU never finds it held by the code it interrupted. NMI handlers must not print
//!   (IF does not mask NMIs).
//! - Fatal paths use [`write_forced`]: a bounded wait for the lock, then it is broken.

use super::{cpu, timer};
use crate::MAX_CPUS;
use core::cell::UnsafeCell;
use core::fmt::{self, Write};

/// Bytes one CPU buffers before a newline forces a write.
pub const LINE_CAPACITY: usize = 256;

const COM1: u16 = 0x3f8;

/// Serialises UART output between CPUs.
static UART_LOCK: spin::Mutex<()> = spin::Mutex::new(());

/// 115200 8N1, FIFOs on, no interrupts. Boot CPU, once, before anything prints.
pub fn init() {
    // SAFETY: COM1's registers, programmed as a 16550 expects (the sequence of its data
    // sheet); nothing else drives them yet.
    unsafe {
        cpu::outb(COM1 + 1, 0x00); // IER: no interrupts
        cpu::outb(COM1 + 3, 0x80); // LCR: DLAB
        cpu::outb(COM1, 0x01); // DLL: 115200
        cpu::outb(COM1 + 1, 0x00); // DLM
        cpu::outb(COM1 + 3, 0x03); // LCR: 8N1
        cpu::outb(COM1 + 2, 0xc7); // FCR: enable and clear FIFOs
        cpu::outb(COM1 + 4, 0x03); // MCR: DTR, RTS
    }
}

fn put(b: u8) {
    // Bounded: a missing UART must not hang the kernel (LSR reads 0xff then anyway).
    for _ in 0..100_000 {
        // SAFETY: COM1's line status register; reading it has no side effect.
        if unsafe { cpu::inb(COM1 + 5) } & 0x20 != 0 {
            break;
        }
        cpu::pause();
    }
    // SAFETY: COM1's transmit register (DLAB is off after `init`).
    unsafe { cpu::outb(COM1, b) };
}

fn write_uart(bytes: &[u8]) {
    for &b in bytes {
        if b == b'\n' {
            put(b'\r');
        }
        put(b);
    }
}

/// One CPU's partial line.
type LineBuf = crate::console_line::LineBuf<LINE_CAPACITY>;

struct LineBufs([UnsafeCell<LineBuf>; MAX_CPUS]);

// SAFETY: slot `i` is only accessed by CPU `i` with interrupts off (`with_line_buf`),
// and NMI handlers do not print, so there is never concurrent or re-entrant access.
unsafe impl Sync for LineBufs {}

static LINE_BUFS: LineBufs =
    LineBufs([const { UnsafeCell::new(LineBuf::new(write_raw_forced)) }; MAX_CPUS]);

fn with_line_buf(f: impl FnOnce(&mut LineBuf)) {
    let saved = cpu::cli_save();
    let me = cpu::current_cpu();
    if me < MAX_CPUS {
        // SAFETY: slot `me` belongs to this CPU and interrupts are off (see LineBufs).
        f(unsafe { &mut *LINE_BUFS.0[me].get() });
    }
    cpu::restore_if(saved);
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
        $crate::arch::x86_64::console::_print(format_args!($($arg)*))
    };
}

/// Prints a line to the console; the line is written atomically with respect to other
/// CPUs' lines.
#[macro_export]
macro_rules! kprintln {
    () => {
        $crate::arch::x86_64::console::_print(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::arch::x86_64::console::_print(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// How long a fatal path waits for the console lock before breaking it.
const FORCE_WAIT_NS: u64 = 20_000_000;
const FORCE_WAIT_SPINS: u32 = 20_000_000;

struct ForcedWriter;

impl Write for ForcedWriter {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        write_raw_forced(s.as_bytes());
        Ok(())
    }
}

/// Writes `args` for a fatal report even if the console lock is held (possibly by the
/// code this CPU interrupted): waits a bounded time, then breaks the lock.
pub fn write_forced(args: fmt::Arguments<'_>) {
    let _ = ForcedWriter.write_fmt(args);
}

/// Raw bytes for a fatal report; see [`write_forced`].
pub fn write_raw_forced(bytes: &[u8]) {
    let start = timer::now_ns();
    let mut spins = 0u32;
    let _guard = loop {
        if let Some(guard) = UART_LOCK.try_lock() {
            break guard;
        }
        spins += 1;
        if spins >= FORCE_WAIT_SPINS || timer::now_ns().wrapping_sub(start) >= FORCE_WAIT_NS {
            // SAFETY: the holder had ample time and the run ends after this report; at
            // worst characters of two CPUs interleave.
            unsafe { UART_LOCK.force_unlock() };
            spins = 0;
        }
        cpu::pause();
    };
    write_uart(bytes);
}

/// Flushes the calling CPU's partial line on the way out, without waiting forever.
pub(crate) fn flush_for_exit() {
    let me = cpu::current_cpu();
    if me >= MAX_CPUS {
        return;
    }
    // SAFETY: interrupts are off (exit path) and this is our own slot; a fatal path may
    // have interrupted an update, but `len` stays <= LINE_CAPACITY.
    let buf = unsafe { &mut *LINE_BUFS.0[me].get() };
    let (line, len) = buf.take();
    if len > 0 {
        write_raw_forced(line.get(..len).unwrap_or(&[]));
        write_raw_forced(b"\n");
    }
}
