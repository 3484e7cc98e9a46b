//! The boot assembly (`boot/aarch64/entry.S`, `boot/aarch64/vectors.S`) and the Rust
//! entry points it calls.
//!
//! Boot CPU: console-less DTB parse and MMU set-up with the MMU off, then console,
//! exceptions, GIC and the NMI mechanism ([`super::nmi_mode`]), secondaries, IRQs on,
//! [`crate::kernel::primary_main`].
//! Secondary: (MMU and VBAR already on from the assembly) timer, GIC, NMI set-up,
//! online, IRQs on,
//! [`crate::kernel::secondary_main`].

use super::exceptions::{self, FRAME_SIZE, MAX_DEPTH, TrapFrame};
use super::{
    alternatives, cache, console, cpu, dtb, exit, gic, irqflags, layout, mmu, nesting, nmi_mode,
    psci, semihosting, smp, timer,
};
use crate::MAX_CPUS;
use core::arch::global_asm;
use core::mem::offset_of;

/// Margin (bytes) below a trap frame the vectors insist on before trusting SP.
const STACK_MARGIN: usize = 256;

global_asm!(
    include_str!("../../../boot/aarch64/entry.S"),
    stacks = sym layout::STACKS,
    vectors = sym pm_vectors_sym::pm_vectors,
    mmu_regs = sym mmu::MMU_REGS,
    primary_rust = sym primary_entry,
    secondary_rust = sym secondary_entry,
    max_cpus = const MAX_CPUS,
    sctlr_off_lo = const mmu::SCTLR_MMU_OFF & 0xffff,
    sctlr_off_hi = const mmu::SCTLR_MMU_OFF >> 16,
);

global_asm!(
    include_str!("../../../boot/aarch64/vectors.S"),
    stacks = sym layout::STACKS,
    estacks = sym layout::EXCEPTION_STACKS,
    depth = sym nesting::DEPTH,
    handler = sym exceptions::handle_exception,
    exit_block = sym semihosting::EXIT_FAILURE_BLOCK,
    conduit = sym psci::CONDUIT,
    guard = const layout::STACK_GUARD,
    low = const FRAME_SIZE + STACK_MARGIN,
    limit = const layout::STACK_SIZE - FRAME_SIZE - STACK_MARGIN,
    eshift = const layout::EXCEPTION_STACK_SHIFT,
    frame_size = const FRAME_SIZE,
    off_sp = const offset_of!(TrapFrame, sp),
    off_elr = const offset_of!(TrapFrame, elr),
    off_esr = const offset_of!(TrapFrame, esr),
    off_fpcr = const offset_of!(TrapFrame, fpcr),
    off_sp_el0 = const offset_of!(TrapFrame, sp_el0),
    off_depth = const offset_of!(TrapFrame, depth),
    off_q = const offset_of!(TrapFrame, q),
    off_pmr = const offset_of!(TrapFrame, pmr),
    pmr_live = sym nmi_mode::PMR_LIVE,
    pmr_sync = sym nmi_mode::PMR_SYNC,
    max_depth = const MAX_DEPTH,
);

// The vectors' immediates must be encodable.
const _: () = assert!(FRAME_SIZE + STACK_MARGIN < 4096);
const _: () = assert!(layout::STACK_SIZE - FRAME_SIZE - STACK_MARGIN < 65536);
const _: () = assert!(offset_of!(TrapFrame, q) + 15 * 32 <= 1008);
const _: () = assert!(FRAME_SIZE < layout::EXCEPTION_STACK_SIZE / 2);

/// The vector table symbol (defined in vectors.S).
mod pm_vectors_sym {
    unsafe extern "C" {
        /// VBAR_EL1 value: 2 KiB aligned, in `.text.nopatch`.
        pub safe static pm_vectors: [u8; 0];
    }
}

/// The vector table's address.
pub fn vectors() -> usize {
    pm_vectors_sym::pm_vectors.as_ptr() as usize
}

/// Prints an early fatal message (semihosting console: the UART may not be up) and
/// exits with a failure status.
fn early_fatal(args: core::fmt::Arguments<'_>) -> ! {
    console::write_forced(format_args!("PANIC cpu 0: early boot: {args}\n"));
    exit::exit(false)
}

/// The boot CPU's Rust entry: x0 = DTB address from the loader (0 for an ELF
/// `-kernel`), x1 = exception level at entry. Runs at EL1 with everything masked and
/// the MMU off.
extern "C" fn primary_entry(dtb_x0: usize, entry_el: u64) -> ! {
    // --- MMU off: plain loads/stores only (no locks, no atomic RMW). ---
    timer::init();
    // SAFETY: x0 from the loader, or the RAM base; both readable with the MMU off.
    let dtb_addr = match unsafe { dtb::locate(dtb_x0) } {
        Ok(a) => a,
        Err(e) => early_fatal(format_args!("{e}")),
    };
    // SAFETY: only this CPU runs; the DTB is not written by anyone.
    let early = match unsafe { dtb::early_devices(dtb_addr) } {
        Ok(early) => early,
        Err(e) => early_fatal(format_args!("DTB at {dtb_addr:#x}: {e}")),
    };
    // Early output and PSCI (exit paths) work from here on, even if parsing fails below.
    if early.uart.size != 0 {
        console::set_early_uart(early.uart.base);
    }
    if let Some(conduit) = early.psci {
        psci::set_conduit(conduit);
    }
    // SAFETY: as above.
    let info = match unsafe { dtb::parse(dtb_addr, cpu::mpidr(), entry_el as u8) } {
        Ok(info) => info,
        Err(e) => early_fatal(format_args!("DTB at {dtb_addr:#x}: {e}")),
    };
    // SAFETY: once, boot CPU, MMU off; `info` comes from the DTB.
    if let Err(e) = unsafe { mmu::init_primary(info) } {
        early_fatal(format_args!("MMU: {e}"));
    }
    // --- MMU and caches on. ---
    if info.uart.size != 0 {
        // SAFETY: the DTB's PL011, mapped device memory by init_primary; only the
        // console module uses it.
        unsafe { console::init(info.uart.base, info.uart_clock_hz) };
    }
    timer::init_cpu();
    print_banner(info);

    // SAFETY: the DTB's GIC, mapped device memory; only the gic module uses it.
    if let Err(e) = unsafe { gic::init(info) } {
        crate::kprintln!("PANIC cpu 0: GIC: {e}");
        exit::exit(false);
    }
    irqflags::init_cpu(0);
    crate::kprintln!("{}", nmi_mode::describe());
    gic::set_sgi_handler(gic::STOP_SGI, super::stop_sgi_handler);
    // SAFETY: the boot CPU, before any secondary starts; the MMU (and so the text
    // alias) is on.
    unsafe { alternatives::ALTERNATIVES.apply_boot() };

    gic::set_sgi_handler(gic::WAKE_SGI, |_| {});
    let online = smp::start_secondaries(info);
    smp::release_secondaries();
    // One write (IRM) when every CPU came up; DSB ISHST first, so the flag is visible.
    gic::send_sgi(gic::WAKE_SGI, online.without(0));
    crate::kprintln!(
        "smp: {} of {} CPUs online {online} in {} us{}",
        online.len(),
        info.cpu_count,
        smp::bringup_ns() / 1000,
        if online.len() == info.cpu_count {
            ""
        } else {
            " (some CPUs FAILED to start)"
        }
    );
    cpu::unmask_all();
    crate::kernel::primary_main()
}

/// A secondary CPU's Rust entry: x0 = logical CPU index, x1 = EL at entry. The MMU,
/// stack and vectors are already set up by entry.S; everything is masked.
extern "C" fn secondary_entry(cpu: usize, _entry_el: u64) -> ! {
    // Before any patchable code (boot or hotplug): this CPU may hold I-cache lines from
    // before text was patched while it was off.
    smp::online_sync(cpu);
    // Test hook: `platform_offline_cpu=N` makes CPU N stay dark, to exercise the boot
    // CPU's bring-up timeout (it is reported and left out of the online set).
    if dtb::boot_info().bootarg("platform_offline_cpu") == Some(cpu_str(cpu).as_str()) {
        loop {
            cpu::wfe();
        }
    }
    timer::init_cpu();
    if let Err(e) = gic::init_cpu(cpu) {
        crate::kprintln!("PANIC cpu {cpu}: GIC: {e}");
        exit::exit(false);
    }
    irqflags::init_cpu(cpu);
    // At boot, start this CPU's children in the bring-up tree; back from hotplug, they
    // are running already.
    if !smp::bringup_done() {
        smp::start_children(cpu, dtb::boot_info());
    }
    smp::mark_online(cpu);
    smp::wait_for_bringup();
    cpu::unmask_all();
    crate::kernel::secondary_main(cpu)
}

fn print_banner(info: &dtb::BootInfo) {
    let (idc, dic) = cache::idc_dic();
    let psci_version = psci::version();
    crate::kprintln!(
        "patch-machine: aarch64 kernel, entered at EL{}",
        info.entry_el
    );
    crate::kprintln!(
        "dtb: {} ({} CPUs in DTB{}), PSCI {:?} v{}.{}, GICD {}, GICR {} ({} region(s)), \
         UART {} (clock {} Hz)",
        info.dtb,
        info.dtb_cpu_count,
        if info.dtb_cpu_count > MAX_CPUS {
            ", more than MAX_CPUS: the run is refused"
        } else {
            ""
        },
        info.psci_conduit,
        psci_version.map_or(0, |v| v.major),
        psci_version.map_or(0, |v| v.minor),
        info.gicd,
        info.gicr,
        info.gicr_regions,
        info.uart,
        info.uart_clock_hz.unwrap_or(0),
    );
    for (i, r) in info.gicr_regions().iter().enumerate().skip(1) {
        crate::kprintln!("dtb: GICR region[{i}] {r}");
    }
    for (i, r) in info.memory().iter().enumerate() {
        crate::kprintln!("dtb: memory[{i}] {r}");
    }
    crate::kprintln!(
        "dtb: bootargs \"{}\"{}",
        info.bootargs,
        if info.bootargs_len > info.bootargs.len() {
            " (truncated: refused)"
        } else {
            ""
        }
    );
    crate::kprintln!(
        "mmu: text {:#x}..{:#x} RX (nopatch {:#x}..{:#x}), rodata {:#x}..{:#x} R, data {:#x}..{:#x} RW, {} table pages, alias {:#x}",
        mmu::text_range().start,
        mmu::text_range().end,
        mmu::nopatch_range().start,
        mmu::nopatch_range().end,
        layout::rodata_range().start,
        layout::rodata_range().end,
        layout::writable_range().start,
        layout::writable_range().end,
        mmu::page_table_pages_used(),
        mmu::ALIAS_VA,
    );
    crate::kprintln!(
        "cpu: timer {} Hz, D-line {} B, I-line {} B, IDC {}, DIC {}",
        timer::frequency(),
        cache::dcache_line_size(),
        cache::icache_line_size(),
        idc as u8,
        dic as u8,
    );
}

/// A CPU index as a decimal string (no allocation).
struct CpuStr {
    buf: [u8; 4],
    len: usize,
}

impl CpuStr {
    fn as_str(&self) -> &str {
        core::str::from_utf8(&self.buf[4 - self.len..]).unwrap_or("")
    }
}

fn cpu_str(mut cpu: usize) -> CpuStr {
    let mut s = CpuStr {
        buf: [0; 4],
        len: 0,
    };
    loop {
        s.len += 1;
        s.buf[4 - s.len] = b'0' + (cpu % 10) as u8;
        cpu /= 10;
        if cpu == 0 || s.len == 4 {
            return s;
        }
    }
}
