//! Secondary CPU bring-up (INIT-SIPI-SIPI into a real-mode trampoline) and the online
//! set. Logical indices: 0 is the boot CPU, then the MADT's other CPUs in MADT order.
//!
//! Bring-up is parallel, as Linux's since 6.5 (David Woodhouse, "x86/smpboot: Support
//! parallel startup of secondary CPUs", LKML, 2023): INIT to every CPU, one 10 ms wait,
//! then the two SIPIs to every CPU, and one bounded wait for all. Each AP finds its
//! index and stack by its APIC ID in the trampoline's table (Linux's `cpuid_to_apicid`
//! search in `head_64.S`), so nothing is handed over one CPU at a time: 287 APs start
//! in 65-120 ms under QEMU, where one at a time took 11 ms each. Each CPU's bring-up
//! state settles who decides about a late one: the AP's compare-and-swap to `Online`
//! or the boot CPU's to `Abandoned` when the wait ran out, never both.

use super::{apic, cpu, layout, madt, paging, timer};
use crate::{AtomicCpuSet, CpuSet, MAX_CPUS, kprintln};
use core::arch::global_asm;
use core::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering};

global_asm!(
    include_str!("../../../boot/x86_64/trampoline.S"),
    base = const layout::TRAMPOLINE_BASE,
    data = const layout::TRAMPOLINE_DATA,
    ids = const layout::TRAMPOLINE_DATA + PARAM_IDS,
    options(att_syntax)
);

/// Parameter page slots (8 bytes each): CR3, index 0's stack top, the entry, the table
/// length, the distance between stack tops.
const PARAM_CR3: usize = 0;
const PARAM_STACK0: usize = 1;
const PARAM_ENTRY: usize = 2;
const PARAM_COUNT: usize = 3;
const PARAM_STACK_STEP: usize = 4;
/// Byte offset of the APIC ID table (u32 per logical index) in the parameter page.
const PARAM_IDS: usize = 64;
const _: () = assert!(
    PARAM_IDS + 4 * MAX_CPUS <= 4096,
    "the APIC ID table must fit the trampoline's parameter page"
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
/// Each CPU's x2APIC logical ID (LDR), for cluster-mode IPIs; 0 in xAPIC mode.
static LOGICAL_IDS: [AtomicU32; MAX_CPUS] = [const { AtomicU32::new(0) }; MAX_CPUS];
/// Each logical CPU's [`BringUp`] state.
static STATE: [AtomicU8; MAX_CPUS] = [const { AtomicU8::new(BringUp::Idle as u8) }; MAX_CPUS];

/// Per CPU: how many times it serialised on its way online ([`online_sync`]).
static ONLINE_SYNCS: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
/// Per CPU: parked by [`cpu_die`] (interrupts off, halted), not yet started again.
static PARKED: AtomicCpuSet = AtomicCpuSet::new();
/// The boot-time bring-up is over: later starts are hotplug (and print nothing).
static BOOT_DONE: AtomicBool = AtomicBool::new(false);

/// Where a CPU is in its bring-up.
#[repr(u8)]
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum BringUp {
    /// Never started: the boot CPU, and indices the MADT does not fill.
    Idle = 0,
    /// INIT and SIPIs sent; the CPU may be on its way.
    Starting = 1,
    /// Arrived and set up: in the online set.
    Online = 2,
    /// The boot CPU stopped waiting for it (and sent it INIT): it must never run.
    Abandoned = 3,
}

/// How long the boot CPU waits for all secondaries: a base plus a share per CPU (under
/// single-threaded TCG every AP's start-up runs on the one host thread).
const ONLINE_TIMEOUT_NS: u64 = 1_000_000_000;
const ONLINE_TIMEOUT_PER_CPU_NS: u64 = 20_000_000;
/// INIT to SIPI (Intel SDM 8.4.4.1, MP initialisation example: 10 ms).
const INIT_DELAY_NS: u64 = 10_000_000;
/// Between the two SIPIs (200 us).
const SIPI_DELAY_NS: u64 = 200_000;

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

/// The x2APIC logical ID (cluster << 16 | bit) of online CPU `cpu`; 0 in xAPIC mode.
#[inline(always)]
pub fn logical_id(cpu: usize) -> u32 {
    // Relaxed: as for `apic_id`.
    LOGICAL_IDS[cpu].load(Ordering::Relaxed)
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
fn mark_online(cpu: usize) {
    LOGICAL_IDS[cpu].store(apic::logical_id(), Ordering::Relaxed);
    // Release: everything this CPU set up (GDT, IDT, APIC, its logical ID) happens
    // before anyone sends it a stop IPI or an NMI.
    ONLINE.insert(cpu, Ordering::Release);
}

/// Records what the MADT lists: [`cpu_count`] and [`present`]. Boot CPU, once, before
/// anything asks (and whether or not the other CPUs are then started).
pub fn set_listed(cpus: &madt::Cpus) {
    // Relaxed: read by the boot CPU itself, or by CPUs it starts afterwards.
    PRESENT.store(cpus.listed(), Ordering::Relaxed);
    COUNT.store(cpus.count, Ordering::Relaxed);
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
    // SAFETY: the parameter page is identity-mapped read-write; only the boot CPU
    // writes it, before it sends the first SIPI (APs only read it afterwards).
    unsafe { core::ptr::write_volatile((layout::TRAMPOLINE_DATA + slot * 8) as *mut u64, value) };
}

fn set_table_id(index: usize, id: u32) {
    // SAFETY: as for `set_param`; `index < MAX_CPUS` keeps it inside the page (checked
    // at compile time above).
    unsafe {
        core::ptr::write_volatile(
            (layout::TRAMPOLINE_DATA + PARAM_IDS + index * 4) as *mut u32,
            id,
        )
    };
}

fn state(cpu: usize) -> BringUp {
    // Acquire pairs with the Release compare-and-swaps: the winner's writes before it
    // (the AP's set-up) are visible.
    match STATE[cpu].load(Ordering::Acquire) {
        1 => BringUp::Starting,
        2 => BringUp::Online,
        3 => BringUp::Abandoned,
        _ => BringUp::Idle,
    }
}

fn send(id: u32, low: u32) {
    let saved = cpu::cli_save();
    apic::send_ipi(id, low);
    cpu::restore_if(saved);
}

/// Why the other CPUs were not (all) started.
pub enum StartError {
    /// The boot CPU's APIC ID is not among the MADT's enabled CPUs.
    BootCpuNotListed(u32),
    /// These many CPUs did not come online within the wait (each named on the console).
    Missing(usize),
}

/// Starts every other CPU of `cpus` at once (see the module docs) and waits, bounded,
/// for all of them; each arrives at `entry` in long mode on its own stack with its
/// logical index. CPU `offline` is never started (`platform_offline_cpu=N`, to
/// exercise the bounded wait). Each CPU that does not come up is named on the console
/// and sent INIT (back to wait-for-SIPI).
pub fn start_secondaries(
    cpus: &madt::Cpus,
    entry: extern "C" fn(usize) -> !,
    offline: Option<usize>,
) -> Result<(), StartError> {
    let me = apic::id();
    let ids = &cpus.apic_ids[..cpus.count];
    if !ids.contains(&me) {
        return Err(StartError::BootCpuNotListed(me));
    }
    set_param(PARAM_CR3, paging::cr3());
    set_param(PARAM_STACK0, layout::stack_top(0) as u64);
    set_param(PARAM_ENTRY, entry as *const () as u64);
    set_param(PARAM_STACK_STEP, layout::STACK_SLOT as u64);
    set_table_id(0, me);
    let others = (1..).zip(ids.iter().copied().filter(|&id| id != me));
    for (index, id) in others.clone() {
        APIC_IDS[index].store(id, Ordering::Relaxed);
        set_table_id(index, id);
        // Release pairs with the AP's compare-and-swap in `claim_online`: what the boot
        // CPU set up for it (APIC ID, tables) is visible to it. The offline CPU too: it
        // is never sent INIT or SIPI, and the wait below runs out on it.
        STATE[index].store(BringUp::Starting as u8, Ordering::Release);
    }
    // The trampoline reads the parameter page after its SIPI, and `apic::send_ipi`
    // fences before each ICR write: these plain stores are visible to it.
    set_param(PARAM_COUNT, cpus.count as u64);
    let starting = || {
        others
            .clone()
            .filter(|&(i, _)| state(i) == BringUp::Starting)
    };
    let to_start = || starting().filter(|&(i, _)| offline != Some(i));
    for (_, id) in to_start() {
        send(id, apic::DM_INIT);
    }
    timer::delay_ns(INIT_DELAY_NS);
    let sipi = apic::DM_SIPI | (layout::TRAMPOLINE_BASE >> 12) as u32;
    for _ in 0..2 {
        for (_, id) in to_start() {
            send(id, sipi);
        }
        timer::delay_ns(SIPI_DELAY_NS);
    }
    let timeout_ns = ONLINE_TIMEOUT_NS + ONLINE_TIMEOUT_PER_CPU_NS * cpus.count as u64;
    let start = timer::now_ns();
    while starting().next().is_some() && timer::now_ns() - start < timeout_ns {
        cpu::pause();
    }
    let mut missing = 0;
    for (index, id) in others {
        let abandoned = STATE[index]
            .compare_exchange(
                BringUp::Starting as u8,
                BringUp::Abandoned as u8,
                // Acquire/Release: pairs with the AP's compare-and-swap; exactly
                // one of the two wins.
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok();
        if abandoned {
            kprintln!(
                "smp: cpu {index} (APIC ID {id}) did not come online within {} ms{}",
                timeout_ns / 1_000_000,
                if offline == Some(index) {
                    " (platform_offline_cpu: never sent INIT or SIPI)"
                } else {
                    ""
                }
            );
            // Back to wait-for-SIPI: it must not run later on a state nobody expects.
            send(id, apic::DM_INIT);
            missing += 1;
            continue;
        }
        // It won its compare-and-swap: it marks itself online in a few instructions.
        let start = timer::now_ns();
        while !online_cpus().contains(index) && timer::now_ns() - start < ONLINE_TIMEOUT_NS {
            cpu::pause();
        }
        if !online_cpus().contains(index) {
            kprintln!(
                "smp: cpu {index} (APIC ID {id}) claimed its start but never marked itself online"
            );
            missing += 1;
        }
    }
    if missing > 0 {
        return Err(StartError::Missing(missing));
    }
    Ok(())
}

/// Called by a secondary once it is set up: marks it online unless the boot CPU gave
/// up on it (then it must halt: the boot CPU reported it missing).
pub fn claim_online(index: usize) -> bool {
    let won = STATE[index]
        .compare_exchange(
            BringUp::Starting as u8,
            BringUp::Online as u8,
            // AcqRel pairs with the boot CPU's Release store and compare-and-swap.
            Ordering::AcqRel,
            Ordering::Relaxed,
        )
        .is_ok();
    if won {
        mark_online(index);
    }
    won
}

/// The calling CPU, on its way online (boot or hotplug), before it runs any patchable
/// code: a serialising instruction (CPUID), then counts it. The SDM's cross-modifying
/// code rule asks the CPU that runs modified code to serialise after the write and
/// before it executes it; INIT and the trampoline's mode switches serialise too, but
/// this one is the kernel's own and the one the hotplug self-test sees.
pub fn online_sync(cpu: usize) {
    cpu::serialize_inline();
    if let Some(count) = ONLINE_SYNCS.get(cpu) {
        // Release pairs with the Acquire in `online_syncs`: counted after the sync.
        count.fetch_add(1, Ordering::Release);
    }
}

/// How many times `cpu` serialised on its way online (see [`online_sync`]).
pub fn online_syncs(cpu: usize) -> u64 {
    ONLINE_SYNCS
        .get(cpu)
        .map_or(0, |c| c.load(Ordering::Acquire))
}

/// Marks the boot-time bring-up over (boot CPU, after [`start_secondaries`]).
pub fn boot_done() {
    BOOT_DONE.store(true, Ordering::Release);
}

/// Whether the boot-time bring-up is over.
pub fn is_boot_done() -> bool {
    BOOT_DONE.load(Ordering::Acquire)
}

/// Parks the calling secondary for good (Linux's `native_play_dead` with
/// `hlt_play_dead`): interrupts off, out of the online set, then `HLT` in a loop until
/// [`cpu_power_on`]'s INIT resets it. An NMI still wakes it; its handler returns to the
/// loop. The caller (the hotplug core) holds the hotplug write side for it, so no stop
/// call is in flight and none targets this CPU once it is out of the set.
pub fn cpu_die(cpu: usize) -> ! {
    cpu::cli_save();
    // Release: everything this CPU did is visible to whoever sees it gone.
    ONLINE.remove(cpu, Ordering::Release);
    // Relaxed: the bring-up state is next written by `cpu_power_on`, after it saw
    // `PARKED` (Acquire) below.
    STATE[cpu].store(BringUp::Idle as u8, Ordering::Relaxed);
    // Release pairs with the Acquire in `cpu_is_down`: this CPU touches no shared state
    // after it.
    PARKED.insert(cpu, Ordering::Release);
    cpu::halt_forever()
}

/// Why a parked CPU could not be started again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StartAgainError(pub &'static str);

impl core::fmt::Display for StartAgainError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.0)
    }
}

/// Starts parked CPU `cpu` again: INIT, then SIPI, SIPI into the boot trampoline
/// (still in low memory, its parameter page unchanged), which finds the CPU's index
/// by its APIC ID; it sets itself up as at boot and marks itself online.
pub fn cpu_power_on(cpu: usize) -> Result<(), StartAgainError> {
    if cpu == 0 || cpu >= cpu_count() {
        return Err(StartAgainError("not a secondary CPU of the MADT"));
    }
    // Acquire pairs with the Release in `cpu_die`: it has stopped touching its state.
    if !PARKED.contains(cpu, Ordering::Acquire) {
        return Err(StartAgainError("not parked by cpu_die"));
    }
    PARKED.remove(cpu, Ordering::Relaxed);
    // Release pairs with the AP's compare-and-swap in `claim_online`.
    STATE[cpu].store(BringUp::Starting as u8, Ordering::Release);
    let id = apic_id(cpu);
    send(id, apic::DM_INIT);
    timer::delay_ns(INIT_DELAY_NS);
    let sipi = apic::DM_SIPI | (layout::TRAMPOLINE_BASE >> 12) as u32;
    for _ in 0..2 {
        send(id, sipi);
        timer::delay_ns(SIPI_DELAY_NS);
    }
    Ok(())
}

/// Whether `cpu` is parked (interrupts off, halted) by [`cpu_die`].
pub fn cpu_is_down(cpu: usize) -> Result<bool, StartAgainError> {
    Ok(PARKED.contains(cpu, Ordering::Acquire))
}
