//! The nanosecond clock: the TSC, calibrated once against PIT channel 2 (or taken from
//! CPUID leaf 0x15/0x16 when the CPU reports its frequency). QEMU's TSC is shared by all
//! vCPUs, so one calibration serves every CPU.

use super::cpu;
use core::sync::atomic::{AtomicU64, Ordering};

/// Nanoseconds per TSC tick times 2^32 (0: not calibrated; `now_ns` then assumes
/// 1 GHz so that early bounded waits still end). A multiply and a shift per reading,
/// not a 128-bit division: every bounded wait reads the clock each time round, and
/// under QEMU the division (a library call of some hundred instructions) was a good
/// part of a spinning CPU's loop.
static NS_PER_TICK_X2_32: AtomicU64 = AtomicU64::new(0);
/// TSC value at calibration.
static TSC_BASE: AtomicU64 = AtomicU64::new(0);

const PIT_HZ: u64 = 1_193_182;

/// Calibrates the TSC; returns its frequency in kHz and where it came from. Boot CPU,
/// interrupts off, before secondaries start.
pub fn init() -> (u64, &'static str) {
    let (khz, source) = match cpuid_tsc_khz() {
        Some(khz) => (khz, "CPUID"),
        None => match pit_calibrate_khz() {
            Some(khz) => (khz, "PIT"),
            None => (
                1_000_000,
                "assumed: PIT channel 2 never counted down in 10^8 polls",
            ),
        },
    };
    // Relaxed: secondaries are started (which orders everything before it) afterwards.
    // khz >= 1 (both sources say so): at most 10^6 << 32, which fits.
    NS_PER_TICK_X2_32.store(
        ((1_000_000u64 << 32) / khz.max(1)).max(1),
        Ordering::Relaxed,
    );
    TSC_BASE.store(cpu::rdtsc(), Ordering::Relaxed);
    (khz, source)
}

/// CPUID 0x15 (TSC/crystal ratio and crystal Hz) or 0x16 (base MHz), when reported.
fn cpuid_tsc_khz() -> Option<u64> {
    let max = cpu::cpuid(0, 0)[0];
    if max >= 0x15 {
        let [den, num, hz, _] = cpu::cpuid(0x15, 0);
        if den != 0 && num != 0 && hz != 0 {
            return Some(u64::from(hz) * u64::from(num) / u64::from(den) / 1000);
        }
    }
    if max >= 0x16 {
        let mhz = cpu::cpuid(0x16, 0)[0] & 0xffff;
        if mhz != 0 {
            return Some(u64::from(mhz) * 1000);
        }
    }
    None
}

/// Counts TSC ticks over 10 ms of PIT channel 2 (mode 0, gate on, polling OUT2);
/// `None` if OUT2 never rises.
fn pit_calibrate_khz() -> Option<u64> {
    const MS: u64 = 10;
    let count = (PIT_HZ * MS / 1000) as u16;
    // Gate high, speaker off.
    // SAFETY: port 0x61 (gate of PIT channel 2, speaker) and the PIT's command and
    // channel 2 ports, programmed as the 8254 expects; only this calibration uses them.
    unsafe {
        let gate = (cpu::inb(0x61) & !0x02) | 0x01;
        cpu::outb(0x61, gate);
        cpu::outb(0x43, 0b1011_0000); // channel 2, lobyte/hibyte, mode 0, binary
        cpu::outb(0x42, count as u8);
        cpu::outb(0x42, (count >> 8) as u8);
    }
    let start = cpu::rdtsc();
    // Bounded: a PIT that never counts down must not hang boot.
    let mut spins = 0u64;
    // SAFETY: port 0x61's OUT2 bit; reading it has no side effect.
    while unsafe { cpu::inb(0x61) } & 0x20 == 0 {
        spins += 1;
        if spins > 100_000_000 {
            return None;
        }
    }
    let ticks = cpu::rdtsc().wrapping_sub(start);
    Some((ticks / MS).max(1))
}

/// Nanoseconds since calibration.
#[inline(always)]
pub fn now_ns() -> u64 {
    // Relaxed: written once before any other CPU runs.
    let mult = NS_PER_TICK_X2_32.load(Ordering::Relaxed);
    let ticks = cpu::rdtsc().wrapping_sub(TSC_BASE.load(Ordering::Relaxed));
    if mult == 0 {
        return ticks;
    }
    ((u128::from(ticks) * u128::from(mult)) >> 32) as u64
}

/// Busy-waits `ns` nanoseconds.
pub fn delay_ns(ns: u64) {
    let start = now_ns();
    while now_ns().wrapping_sub(start) < ns {
        cpu::pause();
    }
}
