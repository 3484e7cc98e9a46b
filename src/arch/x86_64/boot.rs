//! The boot path: PVH entry (assembly), then the boot CPU's set-up sequence, and each
//! secondary's once it leaves the trampoline.

use super::{
    alternatives, apic, console, cpu, exit, gdt, layout, madt, paging, smp, timer, traps, user,
};
use crate::kprintln;
use core::arch::global_asm;
use core::sync::atomic::{AtomicU64, Ordering};

/// hvm_start_info's physical address (written by the boot assembly).
static START_INFO: AtomicU64 = AtomicU64::new(0);

global_asm!(
    include_str!("../../../boot/x86_64/entry.S"),
    start_info = sym START_INFO,
    stack = sym layout::X86_STACKS,
    stack_size = const layout::STACK_SIZE + 4096,
    pml4 = sym paging::BOOT_PML4,
    pdpt = sym paging::BOOT_PDPT,
    pd = sym paging::BOOT_PD,
    main = sym boot_main,
    options(att_syntax)
);

const PVH_MAGIC: u32 = 0x336e_c578;
/// Longest kernel command line kept.
pub const CMDLINE_MAX: usize = 512;

/// How far past [`CMDLINE_MAX`] the end of a longer command line is looked for, so that
/// the refusal names its length (beyond it: "at least" this many).
const CMDLINE_SCAN: usize = 4096;

/// The kernel command line (`-append`), copied out of low memory, and the length the
/// firmware passed (more than the copy's if it was cut; the kernel then refuses it).
pub static CMDLINE: spin::Once<([u8; CMDLINE_MAX], usize, usize)> = spin::Once::new();

/// Bytes of the command line the firmware passed, when more than [`CMDLINE_MAX`].
pub fn cmdline_overflow() -> Option<usize> {
    CMDLINE
        .get()
        .and_then(|&(_, kept, given)| (given > kept).then_some(given))
}

/// The command line as text (invalid UTF-8 is cut at the first bad byte).
pub fn cmdline() -> &'static str {
    let Some((bytes, len, _)) = CMDLINE.get() else {
        return "";
    };
    match core::str::from_utf8(&bytes[..*len]) {
        Ok(s) => s,
        Err(e) => core::str::from_utf8(&bytes[..e.valid_up_to()]).unwrap_or(""),
    }
}

/// The value of bootarg `key=value`, if present (the last one wins).
pub fn bootarg(key: &str) -> Option<&'static str> {
    cmdline()
        .split_ascii_whitespace()
        .filter_map(|a| a.split_once('='))
        .filter(|(k, _)| *k == key)
        .map(|(_, v)| v)
        .next_back()
}

fn read<T: Copy>(pa: u64) -> T {
    // SAFETY: PVH start info fields and the command line lie in RAM that the boot map
    // identity-maps; read before anything reuses low memory.
    unsafe { core::ptr::read_unaligned(pa as usize as *const T) }
}

/// Copies what we need out of hvm_start_info: the command line and the RSDP address.
fn take_start_info() -> u64 {
    let info = START_INFO.load(Ordering::Relaxed);
    if info == 0 || read::<u32>(info) != PVH_MAGIC {
        kprintln!("boot: no PVH start info (EBX {info:#x}); boot with an ELF -kernel");
        exit::exit(false);
    }
    let cmdline = read::<u64>(info + 24);
    let rsdp = read::<u64>(info + 32);
    CMDLINE.call_once(|| {
        let mut buf = [0u8; CMDLINE_MAX];
        let mut len = 0;
        if cmdline != 0 {
            while len < CMDLINE_MAX {
                let b = read::<u8>(cmdline + len as u64);
                if b == 0 {
                    break;
                }
                buf[len] = b;
                len += 1;
            }
        }
        let mut given = len;
        if len == CMDLINE_MAX {
            while given < CMDLINE_SCAN && read::<u8>(cmdline + given as u64) != 0 {
                given += 1;
            }
        }
        (buf, len, given)
    });
    rsdp
}

/// The boot CPU's Rust entry, in long mode on CPU 0's stack with the boot map.
extern "C" fn boot_main() -> ! {
    cpu::set_cpu_index(0);
    console::init();
    let rsdp = take_start_info();
    kprintln!("patch-machine x86_64: bootargs \"{}\"", cmdline());
    gdt::load(0);
    traps::init();
    traps::load();
    let (khz, source) = timer::init();
    kprintln!("timer: TSC {khz} kHz ({source})");
    smp::install_trampoline();
    paging::init();
    user::protect_kernel();
    // SAFETY: the boot CPU, before any AP starts; paging (and so the text alias) is up.
    unsafe { alternatives::ALTERNATIVES.apply_boot() };
    apic::mask_pic();
    let cpus = match madt::parse(rsdp as usize) {
        Ok(c) => c,
        Err(e) => {
            kprintln!("acpi: {e}");
            exit::exit(false);
        }
    };
    let x2 = match apic::init_boot(cpus.max_apic_id, madt::XAPIC_MAX_ID) {
        Ok(x2) => x2,
        Err(id) => {
            kprintln!(
                "apic: the MADT lists APIC ID {id}, above the xAPIC's {} (0xff is its broadcast), and this CPU has no x2APIC (CPUID.1:ECX[21]): refused, use a CPU model with x2APIC (-cpu max)",
                madt::XAPIC_MAX_ID
            );
            exit::exit(false);
        }
    };
    apic::init_cpu();
    smp::set_listed(&cpus);
    smp::boot_cpu_online();
    kprintln!(
        "apic: {} mode, boot CPU APIC ID {}, MADT lists {} CPUs (highest APIC ID {}){}{}{}",
        if x2 { "x2APIC" } else { "xAPIC" },
        apic::id(),
        cpus.listed(),
        cpus.max_apic_id,
        if cpus.dropped > 0 {
            " (more than MAX_CPUS: the run is refused, no other CPU is started)"
        } else {
            ""
        },
        Counted(
            cpus.online_capable,
            "online-capable only (not enabled, never started)"
        ),
        Counted(cpus.duplicates, "duplicate entries (counted once)"),
    );
    if cpus.dropped == 0 {
        let t0 = timer::now_ns();
        // `platform_offline_cpu=N`: never start CPU N, to exercise the bounded wait.
        let offline = bootarg("platform_offline_cpu").and_then(|v| v.parse::<usize>().ok());
        let result = smp::start_secondaries(&cpus, ap_entry, offline);
        kprintln!(
            "smp: {} of {} CPUs online in {} us{}",
            smp::online_cpus().len(),
            cpus.count,
            (timer::now_ns() - t0) / 1000,
            match result {
                Ok(()) => "",
                Err(smp::StartError::Missing(_)) => "; missing CPUs named above",
                Err(smp::StartError::BootCpuNotListed(_)) =>
                    "; the boot CPU's APIC ID is not in the MADT: no other CPU started",
            }
        );
    }
    smp::boot_done();
    cpu::sti();
    crate::kernel::primary_main()
}

/// `, N what` when `n` is not 0.
struct Counted(usize, &'static str);

impl core::fmt::Display for Counted {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        if self.0 == 0 {
            return Ok(());
        }
        write!(f, ", {} {}", self.0, self.1)
    }
}

/// Where a secondary arrives from the trampoline, in long mode on the stack of logical
/// CPU `index` (the trampoline found it by this CPU's APIC ID).
extern "C" fn ap_entry(index: usize) -> ! {
    // Before any patchable code (boot or hotplug): text may have been patched while
    // this CPU was parked.
    smp::online_sync(index);
    apic::init_cpu();
    let id = apic::id();
    if index >= crate::MAX_CPUS || id != smp::apic_id(index) {
        // Not the CPU the table names (the trampoline's ID and the APIC's disagree): it
        // would share another CPU's index and stack. It cannot even print (no per-CPU
        // index yet).
        cpu::halt_forever();
    }
    cpu::set_cpu_index(index);
    // Off the trampoline's shared PML4 onto this CPU's own (see `paging`).
    paging::load();
    user::protect_kernel();
    gdt::load(index);
    traps::load();
    if !smp::claim_online(index) {
        // The boot CPU stopped waiting and reported this CPU missing.
        cpu::halt_forever();
    }
    if !smp::is_boot_done() {
        kprintln!("cpu {index} online (APIC ID {id})");
    }
    // Wait for jobs with interrupts on, so stop IPIs (and NMIs) are answered.
    cpu::sti();
    crate::kernel::secondary_main(index)
}
