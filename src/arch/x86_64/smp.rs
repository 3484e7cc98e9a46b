//! Secondary CPU bring-up (INIT-SIPI-SIPI into a real-mode trampoline) and the online
//! set. Logical indices: 0 is the boot CPU, then the MADT's other CPUs in MADT order.

use super::{apic, cpu, layout, madt, paging, timer};
use crate::{AtomicCpuSet, CpuSet, MAX_CPUS, kprintln};
use core::arch::global_asm;
use core::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

global_asm!(
    include_str!("../../../boot/x86_64/trampoline.S"),
    base = const layout::TRAMPOLINE_BASE,
    data = const layout::TRAMPOLINE_DATA,
    options(att_syntax)
);

unsafe extern "C" {
    static ap_trampoline_start: u8;
    static ap_trampoline_end: u8;
}

pub use super::cpu::current_cpu;

static ONLINE: AtomicCpuSet = AtomicCpuSet::new();
/// CPUs the MADT lists that fit in MAX_CPUS.
static COUNT: AtomicUsize = AtomicUsize::new(1);
static APIC_IDS: [AtomicU32; MAX_CPUS] = [const { AtomicU32::new(u32::MAX) }; MAX_CPUS];
/// Enabled CPUs the MADT lists (including any beyond MAX_CPUS, which never start).
static PRESENT: AtomicUsize = AtomicUsize::new(1);
/// The logical index of the CPU being started (one at a time).
static STARTING: AtomicUsize = AtomicUsize::new(0);

/// How long the boot CPU waits for each secondary to report online.
const ONLINE_TIMEOUT_NS: u64 = 1_000_000_000;

/// The CPUs that are online and answer stop IPIs.
#[inline(always)]
pub fn online_cpus() -> CpuSet {
    // Acquire pairs with each CPU's Release in `mark_online`: its set-up is visible.
    ONLINE.load(Ordering::Acquire)
}

/// The APIC ID of logical CPU `cpu`.
#[inline(always)]
pub fn apic_id(cpu: usize) -> u32 {
    // Relaxed: written before the CPU is marked online, which senders acquire.
    APIC_IDS[cpu].load(Ordering::Relaxed)
}

/// How many CPUs the MADT lists (up to MAX_CPUS): the CPUs that should come online.
pub fn cpu_count() -> usize {
    COUNT.load(Ordering::Relaxed)
}

/// How many enabled CPUs the MADT listed (including any beyond MAX_CPUS).
pub fn present() -> usize {
    PRESENT.load(Ordering::Relaxed)
}

/// Marks `cpu` online, once its GDT, IDT and APIC are set up (it then gets stop IPIs
/// and NMIs).
pub fn mark_online(cpu: usize) {
    // Release: everything this CPU set up (GDT, IDT, APIC) happens before anyone sends
    // it a stop IPI or an NMI.
    ONLINE.insert(cpu, Ordering::Release);
}

/// Copies the trampoline to low memory. Boot CPU, before `paging::init` makes that
/// page read-only (the boot map is writable everywhere).
pub fn install_trampoline() {
    let start = &raw const ap_trampoline_start as usize;
    let end = &raw const ap_trampoline_end as usize;
    assert!(end - start <= 4096, "AP trampoline larger than a page");
    // SAFETY: 0x8000..0x9000 is free conventional memory below 1 MiB (PVH boot uses
    // none of it: the start info is copied out first) and identity-mapped writable by
    // the boot map; the source is kernel text.
    unsafe {
        core::ptr::copy_nonoverlapping(
            start as *const u8,
            layout::TRAMPOLINE_BASE as *mut u8,
            end - start,
        )
    };
}

/// Marks the boot CPU online as logical CPU 0.
pub fn boot_cpu_online() {
    APIC_IDS[0].store(apic::id(), Ordering::Relaxed);
    mark_online(0);
}

fn set_param(slot: usize, value: u64) {
    // SAFETY: the parameter page is identity-mapped read-write and only the boot CPU
    // writes it, while no AP is reading it (one AP at a time, before its SIPI).
    unsafe { core::ptr::write_volatile((layout::TRAMPOLINE_DATA + slot * 8) as *mut u64, value) };
}

/// Starts every other CPU of `cpus`, one at a time, each with a bounded wait; each
/// arrives at `entry` in long mode on its own stack (and finds its index with
/// [`starting_cpu`]). CPU `offline` is never started (`platform_offline_cpu=N`, to
/// exercise the bounded wait). Returns the CPUs (by logical index and APIC ID) that
/// did not come up.
pub fn start_secondaries(
    cpus: &madt::Cpus,
    entry: extern "C" fn() -> !,
    offline: Option<usize>,
) -> ([Option<u32>; MAX_CPUS], usize) {
    let me = apic::id();
    PRESENT.store(cpus.count + cpus.dropped, Ordering::Relaxed);
    COUNT.store(cpus.count, Ordering::Relaxed);
    set_param(0, paging::cr3());
    set_param(2, entry as *const () as u64);
    let mut missing = [None; MAX_CPUS];
    let mut n_missing = 0;
    for (index, &id) in (1..).zip(cpus.apic_ids[..cpus.count].iter().filter(|&&id| id != me)) {
        APIC_IDS[index].store(id, Ordering::Relaxed);
        set_param(1, layout::stack_top(index) as u64);
        // Release pairs with the AP's Acquire load in `ap_entry`: it sees its
        // parameters and APIC ID.
        STARTING.store(index, Ordering::Release);
        if offline != Some(index) {
            let saved = cpu::cli_save();
            apic::send_ipi(id, apic::DM_INIT);
            cpu::restore_if(saved);
            timer::delay_ns(10_000_000);
        }
        let sipi = apic::DM_SIPI | (layout::TRAMPOLINE_BASE >> 12) as u32;
        for _ in 0..2 {
            if online_cpus().contains(index) || offline == Some(index) {
                break;
            }
            let saved = cpu::cli_save();
            apic::send_ipi(id, sipi);
            cpu::restore_if(saved);
            timer::delay_ns(200_000);
        }
        let start = timer::now_ns();
        while !online_cpus().contains(index) && timer::now_ns() - start < ONLINE_TIMEOUT_NS {
            cpu::pause();
        }
        if !online_cpus().contains(index) {
            kprintln!(
                "smp: cpu {index} (APIC ID {id}) did not come online within {} ms",
                ONLINE_TIMEOUT_NS / 1_000_000
            );
            // Back to wait-for-SIPI: a late arrival would run on parameters (stack,
            // index) that by then belong to the next CPU.
            let saved = cpu::cli_save();
            apic::send_ipi(id, apic::DM_INIT);
            cpu::restore_if(saved);
            missing[n_missing] = Some(id);
            n_missing += 1;
        }
    }
    (missing, n_missing)
}

/// The logical index of the secondary being started, for it to read on arrival.
pub fn starting_cpu() -> usize {
    // Acquire pairs with the Release store in `start_secondaries`: the CPU sees its
    // parameters and APIC ID.
    STARTING.load(Ordering::Acquire)
}
