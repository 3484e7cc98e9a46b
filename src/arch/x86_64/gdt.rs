//! Per-CPU GDT and TSS. The TSS exists for its interrupt stack table: NMI, #DF and #MC
//! always run on stacks of their own, so they work even when the interrupted stack is
//! bad (and an NMI hitting the entry path of another interrupt does not share its stack).
//! Its RSP0 is the stack an interrupt from ring 3 starts on: `user.rs` points it at the
//! frame of the `run_user` in progress.

use super::{cpu, layout};
use crate::MAX_CPUS;
use core::arch::asm;
use core::cell::UnsafeCell;

/// Kernel code selector.
pub const KERNEL_CS: u16 = 0x08;
/// Kernel data selector.
pub const KERNEL_DS: u16 = 0x10;
const TSS_SEL: u16 = 0x18;
/// Ring 3 code selector (RPL 3).
pub const USER_CS: u16 = 0x28 | 3;
/// Ring 3 data/stack selector (RPL 3).
pub const USER_DS: u16 = 0x30 | 3;

/// IST slots (1-based in the IDT).
pub const IST_NMI: u8 = 1;
/// #DF.
pub const IST_DF: u8 = 2;
/// #MC.
pub const IST_MC: u8 = 3;

#[repr(C, packed(4))]
struct Tss {
    _r0: u32,
    rsp: [u64; 3],
    _r1: u64,
    ist: [u64; 7],
    _r2: u64,
    _r3: u16,
    iomap_base: u16,
}

#[repr(C, align(16))]
struct CpuTables {
    gdt: [u64; 7],
    tss: Tss,
}

struct AllTables([UnsafeCell<CpuTables>; MAX_CPUS]);

// SAFETY: CPU `i` writes only slot `i`, once, in `load` before it uses it; afterwards
// only the CPU itself (the busy bit) touches it.
unsafe impl Sync for AllTables {}

static TABLES: AllTables = AllTables(
    [const {
        UnsafeCell::new(CpuTables {
            gdt: [0; 7],
            tss: Tss {
                _r0: 0,
                rsp: [0; 3],
                _r1: 0,
                ist: [0; 7],
                _r2: 0,
                _r3: 0,
                iomap_base: 104,
            },
        })
    }; MAX_CPUS],
);

#[repr(C, packed)]
struct Pointer {
    limit: u16,
    base: u64,
}

/// Builds and loads CPU `cpu`'s GDT and TSS (with its IST stacks) on the calling CPU.
pub fn load(cpu: usize) {
    // SAFETY: slot `cpu` is this CPU's own and nothing else uses it (see AllTables).
    let t = unsafe { &mut *TABLES.0[cpu].get() };
    t.tss.ist[usize::from(IST_NMI - 1)] = layout::ist_top(cpu, 0) as u64;
    t.tss.ist[usize::from(IST_DF - 1)] = layout::ist_top(cpu, 1) as u64;
    t.tss.ist[usize::from(IST_MC - 1)] = layout::ist_top(cpu, 2) as u64;
    let tss = &t.tss as *const Tss as u64;
    let limit = (core::mem::size_of::<Tss>() - 1) as u64;
    t.gdt = [
        0,
        0x00af_9b00_0000_ffff, // 64-bit code, accessed
        0x00cf_9300_0000_ffff, // data, accessed
        limit | ((tss & 0xff_ffff) << 16) | (0x89 << 40) | (((tss >> 24) & 0xff) << 56),
        tss >> 32,
        0x00af_fb00_0000_ffff, // 64-bit code, DPL 3
        0x00cf_f300_0000_ffff, // data, DPL 3
    ];
    let ptr = Pointer {
        limit: (core::mem::size_of::<[u64; 7]>() - 1) as u16,
        base: t.gdt.as_ptr() as u64,
    };
    // A null GS selector: an IRETQ to ring 3 nulls a DPL 0 one, which on some CPUs also
    // clears the base (the CPU index lives there). Loading null may clear it too, so
    // the base is written back.
    let gs_base = cpu::rdmsr(cpu::MSR_GS_BASE);
    // SAFETY: in 64-bit mode a null GS is valid; the base is restored right after.
    unsafe {
        asm!("mov gs, {0:x}", in(reg) 0u64, options(nomem, nostack, preserves_flags));
        cpu::wrmsr(cpu::MSR_GS_BASE, gs_base);
    }
    // SAFETY: the GDT has the same code/data selectors as the boot GDT, so reloading CS
    // (far return) and the data segments keeps the CPU running the same flat segments;
    // the TSS descriptor is fresh (not busy) for `ltr`; the tables live forever.
    unsafe {
        asm!(
            "lgdt [{ptr}]",
            "push {cs}",
            "lea {tmp}, [rip + 2f]",
            "push {tmp}",
            "retfq",
            "2:",
            "mov ss, {ds:x}",
            "mov ds, {ds:x}",
            "mov es, {ds:x}",
            "ltr {tss:x}",
            ptr = in(reg) &ptr,
            cs = const KERNEL_CS as u64,
            tmp = out(reg) _,
            ds = in(reg) KERNEL_DS as u64,
            tss = in(reg) TSS_SEL as u64,
        )
    };
}

/// Where CPU `cpu`'s TSS.RSP0 is: the stack top an interrupt or exception from ring 3
/// starts on. Only the CPU itself writes it (`user.rs`, masked, before it leaves for
/// ring 3) and only its own CPU reads it (the hardware, and the return to the kernel).
pub fn rsp0_slot(cpu: usize) -> *mut u64 {
    // SAFETY: only the address of the CPU's own slot is formed (see AllTables).
    unsafe { &raw mut (*TABLES.0[cpu % MAX_CPUS].get()).tss.rsp[0] }
}
