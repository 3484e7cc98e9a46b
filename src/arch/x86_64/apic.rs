//! The local APIC, driven directly: x2APIC through MSRs when the CPU has it, xAPIC
//! through its MMIO page otherwise. Also masks the legacy 8259 PICs.

use super::cpu;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// The local APIC spurious vector.
pub const SPURIOUS_VECTOR: u8 = 0xff;

const MSR_APIC_BASE: u32 = 0x1b;
const XAPIC_BASE: usize = 0xfee0_0000;

/// Whether x2APIC mode is in use (decided once by the boot CPU).
static X2APIC: AtomicBool = AtomicBool::new(false);

// Register offsets in xAPIC MMIO (x2APIC MSR = 0x800 + offset / 16).
const REG_ID: usize = 0x20;
const REG_EOI: usize = 0xb0;
const REG_LDR: usize = 0xd0;
const REG_SVR: usize = 0xf0;
const REG_ICR_LOW: usize = 0x300;
const REG_ICR_HIGH: usize = 0x310;
const REG_LVT_LINT0: usize = 0x350;
const REG_LVT_LINT1: usize = 0x360;

/// ICR delivery modes and flags.
pub const DM_FIXED: u32 = 0 << 8;
/// NMI delivery.
pub const DM_NMI: u32 = 4 << 8;
/// INIT.
pub const DM_INIT: u32 = 5 << 8;
/// Start-up.
pub const DM_SIPI: u32 = 6 << 8;
const LEVEL_ASSERT: u32 = 1 << 14;
const DELIVERY_PENDING: u32 = 1 << 12;
/// Destination mode logical (x2APIC: cluster mode, `dest` = cluster << 16 | bits).
pub const DEST_LOGICAL: u32 = 1 << 11;
/// Destination shorthand: all excluding self.
pub const ALL_BUT_SELF: u32 = 3 << 18;

#[inline(always)]
fn x2() -> bool {
    // Relaxed: set by the boot CPU before secondaries start.
    X2APIC.load(Ordering::Relaxed)
}

#[inline(always)]
fn read(reg: usize) -> u32 {
    if x2() {
        cpu::rdmsr(0x800 + (reg >> 4) as u32) as u32
    } else {
        // SAFETY: the xAPIC page is identity-mapped (uncached by QEMU's emulation) and
        // `reg` is a valid register offset.
        unsafe { core::ptr::read_volatile((XAPIC_BASE + reg) as *const u32) }
    }
}

#[inline(always)]
fn write(reg: usize, value: u32) {
    if x2() {
        // SAFETY: a valid x2APIC register MSR.
        unsafe { cpu::wrmsr(0x800 + (reg >> 4) as u32, u64::from(value)) };
    } else {
        // SAFETY: as in `read`.
        unsafe { core::ptr::write_volatile((XAPIC_BASE + reg) as *mut u32, value) };
    }
}

/// Masks both 8259 PICs (all their lines), so only the APIC delivers interrupts.
pub fn mask_pic() {
    // SAFETY: the 8259s' data ports (OCW1); all ones masks every line.
    unsafe {
        cpu::outb(0x21, 0xff);
        cpu::outb(0xa1, 0xff);
    }
}

/// Whether the CPU has x2APIC mode (CPUID.1:ECX bit 21).
pub fn has_x2apic() -> bool {
    cpu::cpuid(1, 0)[2] & (1 << 21) != 0
}

/// Chooses x2APIC mode where the CPU has it (as Linux does), xAPIC otherwise; refuses
/// xAPIC when a CPU has an APIC ID above `xapic_max` (0xfe: the xAPIC's 8-bit
/// destination cannot name it, and 0xff is its broadcast). Boot CPU, once, before
/// [`init_cpu`].
pub fn init_boot(max_apic_id: u32, xapic_max: u32) -> Result<bool, u32> {
    let x2 = choose_mode(has_x2apic(), max_apic_id, xapic_max)?;
    // Relaxed: see `x2`.
    X2APIC.store(x2, Ordering::Relaxed);
    Ok(x2)
}

/// [`init_boot`]'s choice: x2APIC mode (`true`) where the CPU has it, else xAPIC unless
/// an APIC ID above `xapic_max` needs x2APIC (`Err` with that ID).
pub fn choose_mode(has_x2apic: bool, max_apic_id: u32, xapic_max: u32) -> Result<bool, u32> {
    if !has_x2apic && max_apic_id > xapic_max {
        return Err(max_apic_id);
    }
    Ok(has_x2apic)
}

/// Whether x2APIC mode is in use.
#[inline(always)]
pub fn x2apic_mode() -> bool {
    x2()
}

/// Enables the calling CPU's local APIC with [`SPURIOUS_VECTOR`];
/// LINT0 masked, LINT1 as NMI (the platform's NMI line).
pub fn init_cpu() {
    let mut base = cpu::rdmsr(MSR_APIC_BASE) | (1 << 11);
    if x2() {
        base |= 1 << 10;
    }
    // SAFETY: enabling the APIC (and x2APIC mode, which the CPU has) at its current base.
    unsafe { cpu::wrmsr(MSR_APIC_BASE, base) };
    write(REG_LVT_LINT0, 1 << 16);
    write(REG_LVT_LINT1, 4 << 8);
    write(REG_SVR, 0x100 | u32::from(SPURIOUS_VECTOR));
}

/// The calling CPU's APIC ID.
pub fn id() -> u32 {
    if x2() {
        read(REG_ID)
    } else {
        read(REG_ID) >> 24
    }
}

/// The calling CPU's x2APIC logical ID (LDR: cluster in bits 31:16, one bit of 16 in
/// 15:0), which logical-mode IPIs address; 0 (no logical ID) in xAPIC mode.
pub fn logical_id() -> u32 {
    if x2() { read(REG_LDR) } else { 0 }
}

/// End of interrupt.
#[inline(always)]
pub fn eoi() {
    write(REG_EOI, 0);
}

/// How often [`send_ipi`] polls a busy xAPIC ICR (delivery status pending) before it
/// writes anyway.
const ICR_POLLS: u32 = 1_000_000;
/// Times the xAPIC ICR stayed busy for [`ICR_POLLS`] polls.
static ICR_BUSY_TIMEOUTS: AtomicU64 = AtomicU64::new(0);

/// Times [`send_ipi`] found the xAPIC ICR still busy after 1,000,000 polls and wrote
/// anyway (the previous IPI may be lost).
pub fn icr_busy_timeouts() -> u64 {
    ICR_BUSY_TIMEOUTS.load(Ordering::Relaxed)
}

/// Sends an IPI: `low` = vector | delivery mode | shorthand, to APIC ID `dest` (ignored
/// with a shorthand). Callers keep interrupts off around it: in xAPIC mode the ICR is
/// two registers, and an interrupt handler sending its own IPI in between would mix
/// them up. An NMI handler that sends IPIs can still do that in xAPIC mode (`cli` does
/// not hold NMIs off); in x2APIC mode the ICR is one MSR write and the problem does not
/// exist. Waits (bounded) for the xAPIC to accept the previous IPI.
#[unsafe(link_section = ".text.nopatch")]
pub fn send_ipi(dest: u32, low: u32) {
    let low = low | LEVEL_ASSERT;
    if x2() {
        // WRMSR to the x2APIC ICR is not serialising (SDM 11.12.3): without a fence the
        // IPI can overtake this CPU's earlier stores, and its handler (or an AP's
        // trampoline) would read stale data. Linux's `weak_wrmsr_fence`: MFENCE; LFENCE.
        // SAFETY: fences only; a compiler barrier (no `nomem`) as the fence must be.
        unsafe { core::arch::asm!("mfence", "lfence", options(nostack, preserves_flags)) };
        // SAFETY: a write of the x2APIC ICR MSR; one atomic 64-bit write.
        unsafe { cpu::wrmsr(0x830, (u64::from(dest) << 32) | u64::from(low)) };
        return;
    }
    let mut polls = 0;
    while read(REG_ICR_LOW) & DELIVERY_PENDING != 0 {
        polls += 1;
        if polls == ICR_POLLS {
            // Bounded, and counted rather than printed (this may run in an NMI):
            // `platform.ipi_forms` reports a non-zero count.
            ICR_BUSY_TIMEOUTS.fetch_add(1, Ordering::Relaxed);
            break;
        }
        cpu::pause();
    }
    write(REG_ICR_HIGH, dest << 24);
    write(REG_ICR_LOW, low);
}
