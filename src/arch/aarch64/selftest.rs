//! Platform self-tests: the checks of what only arm64 has, run as KTAP subtest suite
//! `platform` by the kernel's runner (`tests=platform`, or `tests=all,platform` before
//! the kernel's own tests; `tests=platform.NAME` runs one) on the boot CPU once all
//! CPUs are online and interrupts are enabled. A check that does not apply to this
//! configuration is a KTAP `# SKIP`.
//!
//! `platform_selftest=<mode>` instead provokes one fatal condition (as the run's only
//! KTAP test), to check that it is reported and ends the run with a failure status:
//!
//! | mode           | provokes                                                     |
//! |----------------|--------------------------------------------------------------|
//! | `text_write`   | a store to kernel text through its normal (read-only) mapping |
//! | `exec_data`    | a call into a writable data page (execute-never)             |
//! | `null`         | a load from address 0 (unmapped)                             |
//! | `brk`          | a BRK with no hook installed                                 |
//! | `nested`       | a fault inside the BRK hook (a nested exception)             |
//! | `overflow`     | unbounded recursion into the stack guard page                |
//! | `panic`        | a Rust panic                                                 |
//! | `exit_fail`    | `exit(false)`                                                |
//!
//! `platform_offline_cpu=N` (handled in [`super::boot`]) keeps CPU N from coming
//! online, to exercise the bring-up timeout. `platform_feat_nmi=off` (handled in
//! [`super::nmi_mode`]) uses GICv3 pseudo-NMIs even on a CPU with FEAT_NMI.
//! `platform_entry_el=N` tells `entry_el` the exception level the kernel must have
//! been entered at (without it: the one the PSCI conduit implies).
//!
//! The interrupt-masking and NMI checks (`nmi_tests`) adapt to the mode chosen at boot
//! (`pseudo_nmi=on|off`, FEAT_NMI or not): NMIs to one CPU, to all but self and to self
//! are taken and counted, with `in_nmi()` true and PSTATE.I (and ALLINT) set in the
//! handler; an NMI reaches a CPU spinning with IRQs masked while a normal SGI stays
//! pending there; nothing is taken under `mask_all`; PSTATE.I stops a pseudo-NMI but
//! not a superpriority one, ALLINT stops both; the PMR after an NMI or IRQ (whose
//! handler changed it) is the interrupted value; the stop IPI reaches a CPU spinning
//! with IRQs masked (`pseudo_nmi=off`: the call times out naming it); and
//! `stop_machine_nmi` runs the function in NMI context (off: ETIMEDOUT everywhere).
//! The NMI-only checks skip with `pseudo_nmi=off`, the two-CPU ones on one CPU.

use super::dtb::BootInfo;
use super::exceptions::TrapFrame;
use super::psci::Conduit;
use super::{assumptions, boot_info, cache, cpu, exceptions, exit, gic, layout, mmu, smp, timer};
use crate::harness::{Test, Verdict};
use crate::{CpuSet, MAX_CPUS, kprintln};
use core::arch::{asm, global_asm};
use core::fmt::Write;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

global_asm!(
    ".pushsection .text.pm_selftest, \"ax\"",
    ".balign 16",
    ".global pm_selftest_target",
    ".type pm_selftest_target, %function",
    "pm_selftest_target:",
    "    movz w0, #1",
    "    ret",
    ".size pm_selftest_target, . - pm_selftest_target",
    ".popsection",
);

unsafe extern "C" {
    /// Returns the immediate of its first instruction (`MOVZ W0, #imm`).
    fn pm_selftest_target() -> u32;
}

/// `MOVZ W0, #imm` (imm < 65536).
const fn movz_w0(imm: u32) -> u32 {
    0x5280_0000 | (imm << 5)
}

static SGI_HITS: [AtomicU32; MAX_CPUS] = [const { AtomicU32::new(0) }; MAX_CPUS];
static BRK_HITS: AtomicU32 = AtomicU32::new(0);
static BRK_ESR: AtomicU64 = AtomicU64::new(0);

fn sgi_hit(cpu: usize) {
    SGI_HITS[cpu].fetch_add(1, Ordering::Relaxed);
}

fn brk_hook(frame: &mut TrapFrame) -> bool {
    BRK_HITS.fetch_add(1, Ordering::Relaxed);
    BRK_ESR.store(frame.esr, Ordering::Relaxed);
    frame.x[0] = 42;
    frame.elr += 4;
    true
}

fn ensure(cond: bool, why: &'static str) -> Result<(), &'static str> {
    if cond { Ok(()) } else { Err(why) }
}

/// The platform's checks, in the order they run.
pub const SELFTESTS: &[Test] = &[
    Test::new("cpus_online", || cpus_online(boot_info()).into()),
    Test::new("entry_el", entry_el),
    Test::new("timer", || timer_test().into()),
    Test::new("memory_permissions", || permissions().into()),
    Test::new("stack_guards", || stack_guards(boot_info()).into()),
    Test::new("sgi_to_all_others", || sgi_all().into()),
    Test::new("sgi_self_pending_while_masked", || sgi_self_masked().into()),
    Test::new("brk_hook_resumes_with_frame", || brk_test().into()),
    Test::new("poke_text_via_alias", || poke_test().into()),
    Test::new("alias_private_to_its_cpu", || {
        with_other_cpu(|_| alias_private().into())
    }),
    Test::new("icache_sync_lines", || icache_test().into()),
    Test::new("irq_mode_matches_boot_choice", || {
        nmi_tests::installed(nmi_tests::mode_test)
    }),
    Test::new("local_irq_save_restore", || {
        nmi_tests::installed(nmi_tests::local_irq_test)
    }),
    Test::new("nmi_to_one_cpu", || {
        with_other_cpu(|other| nmi_tests::with_nmis(|| nmi_tests::nmi_one(other)))
    }),
    Test::new("nmi_to_all_but_self", || {
        nmi_tests::with_nmis(nmi_tests::nmi_all_but_self)
    }),
    Test::new("nmi_to_self_in_nmi_context", || {
        nmi_tests::with_nmis(nmi_tests::nmi_self)
    }),
    Test::new("nmi_while_irqs_masked_probe_pending", || {
        nmi_tests::with_nmis(nmi_tests::nmi_self_irqs_masked)
    }),
    Test::new("nmi_reaches_cpu_spinning_irqs_off", || {
        with_other_cpu(|other| nmi_tests::with_nmis(|| nmi_tests::nmi_spinner(other)))
    }),
    Test::new("nmi_not_taken_under_mask_all", || {
        nmi_tests::with_nmis(nmi_tests::nmi_mask_all)
    }),
    Test::new("nmi_vs_pstate_i_and_allint", || {
        nmi_tests::with_nmis(nmi_tests::nmi_pstate)
    }),
    Test::new("pmr_restored_after_nmi_and_irq", || {
        nmi_tests::with_nmis(nmi_tests::pmr_restored)
    }),
    Test::new("no_nmis_with_pseudo_nmi_off", nmi_tests::no_nmis),
    Test::new("stop_ipi_vs_cpu_spinning_irqs_off", || {
        with_other_cpu(|other| nmi_tests::installed(|| nmi_tests::stop_vs_spinner(other)))
    }),
    Test::new("stop_machine_nmi_runs_in_nmi", nmi_tests::stop_machine_nmi),
    Test::new(
        "gic_single_security_state",
        assumptions::gic_single_security_state,
    ),
    Test::new("gic_eoimode_0", assumptions::gic_eoimode_0),
    Test::new("sctlr_spintmask_0", assumptions::sctlr_spintmask_0),
    Test::new("sctlr_eis_1", assumptions::sctlr_eis_1),
    Test::new("no_sdei_firmware", assumptions::no_sdei_firmware),
];

/// Runs `check` with a CPU other than this one, or skips.
fn with_other_cpu(check: impl FnOnce(usize) -> Verdict) -> Verdict {
    match smp::online_cpus().without(cpu::current_cpu()).lowest() {
        Some(other) => check(other),
        None => Verdict::Skip(msg!("needs a second CPU")),
    }
}

/// The kernel was entered at the exception level the boot set-up calls for:
/// `platform_entry_el=N` if given, else the one QEMU `virt`'s PSCI conduit implies
/// (SMC: the firmware hands EL2 to the kernel, `virtualization=on`; HVC: a hypervisor
/// owns EL2, so EL1). Whatever the entry, the kernel runs at EL1.
fn entry_el() -> Verdict {
    use aarch64_cpu::registers::{CurrentEL, Readable};
    let info = boot_info();
    let (expected, source) = match (info.bootarg("platform_entry_el"), info.psci_conduit) {
        (Some("1"), _) => (1, "platform_entry_el=1"),
        (Some("2"), _) => (2, "platform_entry_el=2"),
        (Some(other), _) => fail!("platform_entry_el={other}: takes 1 or 2"),
        (None, Conduit::Smc) => (2, "PSCI conduit SMC"),
        (None, Conduit::Hvc) => (1, "PSCI conduit HVC"),
    };
    check!(
        info.entry_el == expected,
        "entered at EL{}, but {source} calls for EL{expected}",
        info.entry_el
    );
    let now = CurrentEL.read(CurrentEL::EL);
    check!(now == 1, "running at EL{now}, not EL1");
    Verdict::Pass(msg!(
        "entered at EL{expected} as {source} calls for; running at EL1"
    ))
}

fn cpus_online(info: &BootInfo) -> Result<(), &'static str> {
    ensure(
        smp::online_cpus() == CpuSet::first(info.cpu_count),
        "not every DTB CPU is online",
    )?;
    ensure(
        smp::cpu_count() == info.cpu_count,
        "cpu_count disagrees with the DTB",
    )
}

fn timer_test() -> Result<(), &'static str> {
    let a = timer::now_ns();
    timer::delay_ns(1_000_000);
    let b = timer::now_ns();
    ensure(b >= a + 1_000_000, "delay_ns(1 ms) returned early")?;
    ensure(b - a < 1_000_000_000, "delay_ns(1 ms) took over a second")
}

fn permissions() -> Result<(), &'static str> {
    let text = mmu::text_range();
    let nopatch = mmu::nopatch_range();
    ensure(
        text.start <= nopatch.start && nopatch.end <= text.end && nopatch.start < nopatch.end,
        "nopatch range is not inside text",
    )?;
    ensure(
        nopatch.contains(&super::boot::vectors()),
        "vectors are not in .text.nopatch",
    )?;
    ensure(
        nopatch.contains(&(mmu::poke_text as *const () as usize))
            && nopatch.contains(&(cache::sync_icache_range as *const () as usize))
            && nopatch.contains(&(gic::send_sgi as *const () as usize))
            && nopatch.contains(&(super::irq::handle_irq_exception as *const () as usize))
            && nopatch.contains(&(super::nmi::send_nmi as *const () as usize)),
        "poke_text/sync_icache_range/send_sgi/IRQ entry/send_nmi are not in .text.nopatch",
    )?;
    let image = layout::image_range();
    let mut addr = image.start;
    while addr < image.end {
        if let Some(p) = mmu::page_info(addr) {
            ensure(
                !(p.valid && p.writable && p.executable),
                "a page is writable and executable",
            )?;
            let in_text = text.contains(&addr);
            if p.valid {
                ensure(
                    in_text == p.executable,
                    "executable pages do not match the text range",
                )?;
            }
            if in_text {
                ensure(
                    p.valid && !p.writable,
                    "a text page is writable or unmapped",
                )?;
            }
            if layout::rodata_range().contains(&addr) {
                ensure(
                    p.valid && !p.writable,
                    "a rodata page is writable or unmapped",
                )?;
            }
        }
        addr += mmu::PAGE_SIZE;
    }
    ensure(
        !mmu::is_text_writable(pm_selftest_target as *const () as usize),
        "patch target is writable",
    )?;
    ensure(!mmu::alias_mapped(), "the patch alias is mapped")
}

fn stack_guards(info: &BootInfo) -> Result<(), &'static str> {
    for cpu in 0..info.cpu_count {
        let guard = layout::stack_guard(cpu);
        ensure(
            mmu::page_info(guard.start).is_some_and(|p| !p.valid),
            "a stack guard page is mapped",
        )?;
        let stack = layout::stack_range(cpu);
        ensure(
            mmu::page_info(stack.start).is_some_and(|p| p.valid && p.writable && !p.executable),
            "a stack page is not RW/XN",
        )?;
    }
    Ok(())
}

fn sgi_all() -> Result<(), &'static str> {
    let sgi = gic::TEST_SGIS[0];
    gic::set_sgi_handler(sgi, sgi_hit);
    let me = cpu::current_cpu();
    let others = smp::online_cpus().without(me);
    let before: [u32; MAX_CPUS] = core::array::from_fn(|c| SGI_HITS[c].load(Ordering::Relaxed));
    gic::send_sgi(sgi, others);
    let start = timer::now_ns();
    let done = || {
        others
            .iter()
            .all(|c| SGI_HITS[c].load(Ordering::Relaxed) > before[c])
    };
    while !done() && timer::now_ns() - start < 500_000_000 {
        core::hint::spin_loop();
    }
    ensure(done(), "not every other CPU took the SGI within 500 ms")?;
    ensure(
        SGI_HITS[me].load(Ordering::Relaxed) == before[me],
        "the sender took its own SGI",
    )?;
    gic::clear_sgi_handler(sgi);
    Ok(())
}

fn sgi_self_masked() -> Result<(), &'static str> {
    let sgi = gic::TEST_SGIS[1];
    gic::set_sgi_handler(sgi, sgi_hit);
    let me = cpu::current_cpu();
    let before = SGI_HITS[me].load(Ordering::Relaxed);
    let saved = cpu::mask_all();
    gic::send_sgi_self(sgi);
    let start = timer::now_ns();
    while !gic::pending_sgi(me, sgi) && timer::now_ns() - start < 100_000_000 {
        core::hint::spin_loop();
    }
    let pending = gic::pending_sgi(me, sgi);
    let early = SGI_HITS[me].load(Ordering::Relaxed) != before;
    cpu::restore(saved);
    // The ISB in the unmask path is not needed: restore() is followed by our loads, and
    // the interrupt is taken at the latest at the next context synchronisation.
    cpu::isb();
    let start = timer::now_ns();
    while SGI_HITS[me].load(Ordering::Relaxed) == before && timer::now_ns() - start < 100_000_000 {
        core::hint::spin_loop();
    }
    gic::clear_sgi_handler(sgi);
    ensure(!early, "the SGI was taken while masked")?;
    ensure(pending, "the SGI did not show as pending while masked")?;
    ensure(
        SGI_HITS[me].load(Ordering::Relaxed) == before + 1,
        "the SGI was not taken after unmasking",
    )
}

fn brk_test() -> Result<(), &'static str> {
    exceptions::set_brk_handler(brk_hook);
    let before = BRK_HITS.load(Ordering::Relaxed);
    let out: u64;
    // SAFETY: BRK traps into the hook, which sets x0 = 42 and skips the BRK.
    unsafe {
        asm!(
            "mov x0, #5",
            "brk #0x77",
            "mov {out}, x0",
            out = out(reg) out,
            out("x0") _,
            options(nostack),
        )
    };
    exceptions::clear_brk_handler();
    ensure(
        BRK_HITS.load(Ordering::Relaxed) == before + 1,
        "the hook did not run once",
    )?;
    let esr = BRK_ESR.load(Ordering::Relaxed);
    ensure(
        exceptions::esr_ec(esr) == 0x3c && esr & 0xffff == 0x77,
        "wrong ESR for BRK #0x77",
    )?;
    ensure(
        out == 42,
        "the frame's x0 was not restored from the hook's change",
    )?;
    ensure(exceptions::depth() == 0, "exception depth not back to 0")
}

/// Polls `done` until it holds or `timeout_ns` passed; returns its last value.
fn wait_until(timeout_ns: u64, mut done: impl FnMut() -> bool) -> bool {
    let start = timer::now_ns();
    while !done() {
        if timer::now_ns() - start > timeout_ns {
            return done();
        }
        core::hint::spin_loop();
    }
    true
}

/// The text alias is writable only on the CPU that maps it: while the boot CPU holds
/// it (inside a stop-machine call, so the other CPU's probe cannot miss the window),
/// another CPU's `AT S1E1W` of the alias faults, and the boot CPU's own succeeds (so the
/// probe can tell). With the alias in the shared tables, the other CPU's probe would
/// succeed.
fn alias_private() -> Result<(), &'static str> {
    use super::STOP;
    use crate::stop::StopOptions;
    use core::sync::atomic::AtomicBool;
    static MAPPED: AtomicBool = AtomicBool::new(false);
    /// 0: not probed yet; 1: the other CPU could not write the alias; 2: it could.
    static PROBED: AtomicU32 = AtomicU32::new(0);
    const PROBE_WAIT_NS: u64 = 1_000_000_000;

    ensure(
        !mmu::alias_writable_here(),
        "the alias is writable outside with_alias",
    )?;
    let me = cpu::current_cpu();
    let Some(other) = smp::online_cpus().without(me).iter().next() else {
        return Ok(());
    };
    MAPPED.store(false, Ordering::Relaxed);
    PROBED.store(0, Ordering::Relaxed);
    let page = pm_selftest_target as *const () as usize & !(mmu::PAGE_SIZE - 1);
    let mine = AtomicU32::new(0);
    let result = STOP.stop_machine(
        &|cpu| {
            if cpu == me {
                // SAFETY: a kernel text page; nothing is written through the alias.
                let alias = unsafe { mmu::TextAlias::map(page) };
                let writable = mmu::alias_writable_here();
                // Release pairs with the other CPU's Acquire: it probes only while the
                // alias is mapped here.
                MAPPED.store(true, Ordering::Release);
                wait_until(PROBE_WAIT_NS, || PROBED.load(Ordering::Acquire) != 0);
                drop(alias);
                mine.store(u32::from(writable), Ordering::Relaxed);
            } else {
                if !wait_until(PROBE_WAIT_NS, || MAPPED.load(Ordering::Acquire)) {
                    return Err(-110);
                }
                let writable = mmu::alias_writable_here();
                PROBED.store(if writable { 2 } else { 1 }, Ordering::Release);
            }
            Ok(())
        },
        CpuSet::single(me).with(other),
        StopOptions::DEFAULT,
    );
    ensure(result.is_ok(), "the stop-machine call of the probe failed")?;
    ensure(
        mine.load(Ordering::Relaxed) == 1,
        "the mapping CPU could not write its own alias",
    )?;
    match PROBED.load(Ordering::Relaxed) {
        1 => {}
        2 => return Err("another CPU could write the alias while it was mapped"),
        _ => return Err("the other CPU never probed the alias"),
    }
    ensure(
        !mmu::alias_writable_here(),
        "the alias is still writable after with_alias",
    )
}

fn poke_test() -> Result<(), &'static str> {
    let addr = pm_selftest_target as *const () as usize;
    // SAFETY: the target is ordinary text only this test calls.
    let initial = unsafe { pm_selftest_target() };
    ensure(initial == 1, "target does not return 1 initially")?;
    // SAFETY: aligned kernel text; nobody else executes the target.
    unsafe { mmu::poke_text(addr, movz_w0(2)) };
    cache::sync_icache_range(addr, addr + 4);
    cpu::isb();
    ensure(!mmu::alias_mapped(), "alias left mapped after poke_text")?;
    // SAFETY: reading kernel text.
    let word = unsafe { core::ptr::read_volatile(addr as *const u32) };
    ensure(word == movz_w0(2), "text does not read back the poked word")?;
    // SAFETY: as above; the new instruction is a valid MOVZ.
    let got = unsafe { pm_selftest_target() };
    // SAFETY: as above: restore the original instruction.
    unsafe { mmu::poke_text(addr, movz_w0(1)) };
    cache::sync_icache_range(addr, addr + 4);
    cpu::isb();
    ensure(got == 2, "the patched function did not return 2")?;
    // SAFETY: as above.
    let restored = unsafe { pm_selftest_target() };
    ensure(restored == 1, "restoring the target failed")?;
    ensure(!mmu::is_text_writable(addr), "text became writable")
}

fn icache_test() -> Result<(), &'static str> {
    let d = cache::dcache_line_size();
    let i = cache::icache_line_size();
    ensure(
        d.is_power_of_two() && d >= 4 && i.is_power_of_two() && i >= 4,
        "bad cache line sizes",
    )?;
    // The whole text, unaligned ends: must not fault.
    let text = mmu::text_range();
    cache::sync_icache_range(text.start + 3, text.end - 5);
    cpu::isb();
    Ok(())
}

#[inline(never)]
fn recurse(depth: u64) -> u64 {
    let buf = core::hint::black_box([depth; 64]);
    // Always true at run time; hidden from the compiler so it keeps the recursion.
    if core::hint::black_box(depth) != u64::MAX {
        recurse(depth + 1) + buf[depth as usize % 64]
    } else {
        buf[0]
    }
}

static DATA_WORD: AtomicU32 = AtomicU32::new(0xd65f_03c0); // RET

fn faulting_hook(_frame: &mut TrapFrame) -> bool {
    // SAFETY: deliberately faults (address 8 is unmapped) inside the exception handler.
    unsafe { core::ptr::read_volatile(core::hint::black_box(8usize) as *const u64) };
    false
}

/// The modes of `platform_selftest=`: the fatal conditions [`provoke`] knows.
pub const FAULT_MODES: &[&str] = &[
    "text_write",
    "exec_data",
    "null",
    "brk",
    "nested",
    "overflow",
    "panic",
    "exit_fail",
];

/// Provokes the fatal condition `mode` (one of [`FAULT_MODES`]); returns only if it
/// did not bring the kernel down.
pub fn provoke(mode: &str) {
    kprintln!("# platform_selftest={mode}: provoking it (expect a fatal report, failure status)");
    match mode {
        "text_write" => {
            // SAFETY: deliberately faults: text is mapped read-only.
            unsafe {
                core::ptr::write_volatile(pm_selftest_target as *const () as usize as *mut u32, 0)
            };
        }
        "exec_data" => {
            // SAFETY: deliberately faults: data pages are execute-never.
            let f: extern "C" fn() = unsafe { core::mem::transmute(DATA_WORD.as_ptr()) };
            f();
        }
        "null" => {
            // SAFETY: deliberately faults: page 0 is unmapped.
            let v =
                unsafe { core::ptr::read_volatile(core::hint::black_box(0usize) as *const u64) };
            kprintln!("read {v}");
        }
        "brk" => {
            exceptions::clear_brk_handler();
            // SAFETY: deliberately traps with no hook.
            unsafe { asm!("brk #0x99", options(nostack)) };
        }
        "nested" => {
            exceptions::set_brk_handler(faulting_hook);
            // SAFETY: deliberately traps into a hook that faults.
            unsafe { asm!("brk #0x98", options(nostack)) };
        }
        "overflow" => {
            kprintln!("{}", recurse(0));
        }
        "panic" => panic!("platform_selftest=panic"),
        "exit_fail" => exit::exit(false),
        _ => kprintln!("# platform_selftest: unknown mode '{mode}'"),
    }
}

/// NMI and interrupt-masking checks (`pseudo_nmi=on|off`, FEAT_NMI or not).
mod nmi_tests {
    use super::super::nmi_mode::{self, NmiMode, PMR_IRQOFF, PMR_IRQON};
    use super::super::{STOP, cpu, gic, irq, irqflags, nmi, smp, timer};
    use super::{SGI_HITS, ensure, sgi_hit, wait_until};
    use crate::harness::Verdict;
    use crate::stop::{Arch, StopError, StopOptions};
    use crate::{AtomicCpuSet, CpuSet, MAX_CPUS};
    use core::arch::asm;
    use core::fmt::Write;
    use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};

    /// The NMI handler slot the checks use (unregistered afterwards).
    const SLOT: usize = nmi::NMI_SLOTS - 1;
    /// The SGI whose handler spins with IRQs masked ([`spin_handler`]).
    const SPIN_SGI: u32 = gic::TEST_SGIS[2];
    /// A normal SGI that must stay pending while IRQs are masked.
    const PROBE_SGI: u32 = gic::TEST_SGIS[3];
    /// How long a check waits for something that should happen.
    const WAIT_NS: u64 = 500_000_000;
    /// How long a check waits to be sure something does not happen.
    const QUIET_NS: u64 = 20_000_000;

    static NMI_HITS: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
    /// CPUs whose NMI handler saw `in_nmi()` false, PSTATE.I clear, or ALLINT clear
    /// (FEAT_NMI).
    static BAD_IN_NMI: AtomicCpuSet = AtomicCpuSet::new();
    static BAD_I: AtomicCpuSet = AtomicCpuSet::new();
    static BAD_ALLINT: AtomicCpuSet = AtomicCpuSet::new();
    /// If set, the NMI handler (or the spin handler) writes this PMR value before it
    /// returns, to check that the exception return puts the interrupted one back.
    static TAMPER_PMR: AtomicU32 = AtomicU32::new(0);

    fn test_nmi(cpu: usize) -> bool {
        if !nmi::in_nmi() {
            BAD_IN_NMI.insert(cpu, Ordering::Relaxed);
        }
        if cpu::daif() & cpu::DAIF_I == 0 {
            BAD_I.insert(cpu, Ordering::Relaxed);
        }
        if nmi_mode::feat_nmi_in_use() && cpu::allint() == 0 {
            BAD_ALLINT.insert(cpu, Ordering::Relaxed);
        }
        let tamper = TAMPER_PMR.load(Ordering::Relaxed);
        if tamper != 0 {
            gic::set_priority_mask(tamper as u8);
        }
        if let Some(n) = NMI_HITS.get(cpu) {
            // Release pairs with the waiters' Acquire: the flags above are visible.
            n.fetch_add(1, Ordering::Release);
        }
        true
    }

    fn hits(cpu: usize) -> u64 {
        NMI_HITS[cpu].load(Ordering::Acquire)
    }

    fn handler_flags_ok() -> Result<(), &'static str> {
        ensure(
            BAD_IN_NMI.load(Ordering::Relaxed).is_empty(),
            "in_nmi() was false inside an NMI handler",
        )?;
        ensure(
            BAD_I.load(Ordering::Relaxed).is_empty(),
            "an NMI handler ran with PSTATE.I clear",
        )?;
        ensure(
            BAD_ALLINT.load(Ordering::Relaxed).is_empty(),
            "an NMI handler ran with PSTATE.ALLINT clear (FEAT_NMI)",
        )
    }

    // --- The spinning CPU: a normal SGI handler that masks IRQs and spins. ---

    static SPIN_CPU: AtomicUsize = AtomicUsize::new(usize::MAX);
    static SPINNING: AtomicBool = AtomicBool::new(false);
    static SPIN_RELEASE: AtomicBool = AtomicBool::new(false);
    /// PMR the spinner read after it saw an NMI come and go (0: none seen).
    static SPIN_PMR_AFTER_NMI: AtomicU32 = AtomicU32::new(0);
    /// Whether the spinner saw IRQs masked the whole time.
    static SPIN_MASKED: AtomicBool = AtomicBool::new(false);

    fn spin_handler(cpu: usize) {
        if SPIN_CPU.load(Ordering::Relaxed) != cpu {
            return;
        }
        let flags = irqflags::local_irq_save();
        let mut masked = irqflags::irqs_disabled();
        let before = hits(cpu);
        SPINNING.store(true, Ordering::Release);
        let start = timer::now_ns();
        while !SPIN_RELEASE.load(Ordering::Acquire) && timer::now_ns() - start < 5_000_000_000 {
            if hits(cpu) != before && SPIN_PMR_AFTER_NMI.load(Ordering::Relaxed) == 0 {
                SPIN_PMR_AFTER_NMI.store(u32::from(irqflags::pmr()) | 0x100, Ordering::Relaxed);
            }
            masked &= irqflags::irqs_disabled();
            core::hint::spin_loop();
        }
        SPIN_MASKED.store(masked, Ordering::Relaxed);
        irqflags::local_irq_restore(flags);
        SPINNING.store(false, Ordering::Release);
    }

    /// Makes `cpu` spin in [`spin_handler`] with IRQs masked; returns once it does.
    fn start_spinner(cpu: usize) -> Result<(), &'static str> {
        SPIN_RELEASE.store(false, Ordering::Relaxed);
        SPIN_PMR_AFTER_NMI.store(0, Ordering::Relaxed);
        SPIN_CPU.store(cpu, Ordering::Relaxed);
        gic::set_sgi_handler(SPIN_SGI, spin_handler);
        gic::send_sgi(SPIN_SGI, CpuSet::single(cpu));
        ensure(
            wait_until(WAIT_NS, || SPINNING.load(Ordering::Acquire)),
            "the other CPU never started spinning",
        )
    }

    fn stop_spinner() -> Result<(), &'static str> {
        SPIN_RELEASE.store(true, Ordering::Release);
        let stopped = wait_until(6_000_000_000, || !SPINNING.load(Ordering::Acquire));
        SPIN_CPU.store(usize::MAX, Ordering::Relaxed);
        ensure(stopped, "the spinning CPU never came back")
    }

    /// Runs `check` with the checks' NMI handler and probe SGI installed.
    pub(super) fn installed(check: impl FnOnce() -> Result<(), &'static str>) -> Verdict {
        nmi::register_nmi_handler(SLOT, test_nmi);
        gic::set_sgi_handler(PROBE_SGI, sgi_hit);
        let result = check();
        nmi::unregister_nmi_handler(SLOT);
        gic::clear_sgi_handler(PROBE_SGI);
        gic::clear_sgi_handler(SPIN_SGI);
        result.into()
    }

    /// [`installed`], or a skip when there are no NMIs (`pseudo_nmi=off`).
    pub(super) fn with_nmis(check: impl FnOnce() -> Result<(), &'static str>) -> Verdict {
        if !nmi_mode::pseudo_nmi_enabled() {
            return Verdict::Skip(msg!("pseudo_nmi=off: no NMIs"));
        }
        installed(check)
    }

    /// With `pseudo_nmi=off`, no NMI is ever sent or taken.
    pub(super) fn no_nmis() -> Verdict {
        if nmi_mode::pseudo_nmi_enabled() {
            return Verdict::Skip(msg!("NMIs are in use (pseudo_nmi=on)"));
        }
        installed(nmi_off)
    }

    /// `stop_machine_nmi` runs the function in NMI context (`pseudo_nmi=off`: ETIMEDOUT).
    pub(super) fn stop_machine_nmi() -> Verdict {
        #[cfg(feature = "stop-machine-nmi")]
        return installed(stop_machine_nmi_test);
        #[cfg(not(feature = "stop-machine-nmi"))]
        Verdict::Skip(msg!("built without feature stop-machine-nmi"))
    }

    pub(super) fn mode_test() -> Result<(), &'static str> {
        let info = super::super::boot_info();
        let off = info.bootarg("pseudo_nmi") == Some("off");
        ensure(
            off == (nmi_mode::nmi_mode() == NmiMode::None),
            "the NMI mode does not follow pseudo_nmi=",
        )?;
        ensure(!irqflags::irqs_disabled(), "IRQs are masked in normal code")?;
        ensure(
            cpu::daif() & cpu::DAIF_I == 0,
            "PSTATE.I is set in normal code",
        )?;
        if nmi_mode::pseudo_nmi_enabled() {
            ensure(irqflags::pmr() == PMR_IRQON, "PMR is not the IRQs-on value")?;
        }
        let sctlr: u64;
        // SAFETY: reading SCTLR_EL1 has no side effect.
        unsafe {
            asm!("mrs {}, sctlr_el1", out(reg) sctlr, options(nomem, nostack, preserves_flags))
        };
        let feat = nmi_mode::feat_nmi_in_use();
        ensure(
            (sctlr >> 61) & 1 == u64::from(feat) && (sctlr >> 62) & 1 == 0,
            "SCTLR_EL1.NMI/SPINTMASK do not match the mode",
        )?;
        let expected = if feat {
            1 << gic::STOP_SGI | 1 << nmi::NMI_SGI
        } else {
            0
        };
        for cpu in smp::online_cpus().iter() {
            ensure(
                !feat || gic::nmi_property(cpu) == expected,
                "GICR_INMIR0 does not mark exactly the NMI SGIs",
            )?;
        }
        if feat {
            ensure(cpu::allint() == 0, "ALLINT is set in normal code")?;
        }
        Ok(())
    }

    pub(super) fn local_irq_test() -> Result<(), &'static str> {
        let flags = irqflags::local_irq_save();
        let masked = irqflags::irqs_disabled();
        let pmr = irqflags::pmr();
        let daif = cpu::daif();
        let inner = irqflags::local_irq_save();
        irqflags::local_irq_restore(inner);
        let still = irqflags::irqs_disabled();
        irqflags::local_irq_restore(flags);
        let after = irqflags::irqs_disabled();
        irqflags::local_irq_disable();
        let disabled = irqflags::irqs_disabled();
        irqflags::local_irq_enable();
        let enabled = !irqflags::irqs_disabled();
        ensure(masked && still, "local_irq_save did not mask")?;
        ensure(!after, "local_irq_restore did not unmask")?;
        ensure(
            disabled && enabled,
            "local_irq_disable/enable did not toggle",
        )?;
        if nmi_mode::pseudo_nmi_enabled() {
            ensure(
                pmr == PMR_IRQOFF && daif & cpu::DAIF_I == 0,
                "pseudo-NMI: IRQs off is not PMR = IRQOFF with PSTATE.I clear",
            )?;
            ensure(irqflags::pmr() == PMR_IRQON, "PMR not back to IRQs on")
        } else {
            ensure(
                daif & cpu::DAIF_I != 0,
                "pseudo_nmi=off: IRQs off is not PSTATE.I",
            )
        }
    }

    pub(super) fn nmi_one(other: usize) -> Result<(), &'static str> {
        let before: [u64; MAX_CPUS] = core::array::from_fn(hits);
        let taken = nmi::nmis_taken(other);
        nmi::send_nmi(CpuSet::single(other));
        ensure(
            wait_until(WAIT_NS, || hits(other) > before[other]),
            "the target never ran the NMI handler",
        )?;
        ensure(
            nmi::nmis_taken(other) > taken,
            "nmis_taken did not count it",
        )?;
        ensure(
            smp::online_cpus()
                .without(other)
                .iter()
                .all(|c| hits(c) == before[c]),
            "a CPU that was not a target took the NMI",
        )?;
        handler_flags_ok()
    }

    pub(super) fn nmi_all_but_self() -> Result<(), &'static str> {
        let me = cpu::current_cpu();
        let others = smp::online_cpus().without(me);
        let before: [u64; MAX_CPUS] = core::array::from_fn(hits);
        nmi::send_nmi_all_but_self();
        ensure(
            wait_until(WAIT_NS, || others.iter().all(|c| hits(c) > before[c])),
            "not every other CPU took the NMI",
        )?;
        timer::delay_ns(QUIET_NS);
        ensure(hits(me) == before[me], "the sender took its own NMI")?;
        handler_flags_ok()
    }

    pub(super) fn nmi_self() -> Result<(), &'static str> {
        let me = cpu::current_cpu();
        let before = hits(me);
        let taken = nmi::nmis_taken(me);
        let acks = irq::superpriority_acks();
        nmi::send_nmi_self();
        cpu::isb();
        ensure(
            wait_until(WAIT_NS, || hits(me) > before),
            "the NMI to self was not taken",
        )?;
        ensure(
            (irq::superpriority_acks() > acks) == nmi_mode::feat_nmi_in_use(),
            "the NMI was not acknowledged through ICC_NMIAR1_EL1 exactly when FEAT_NMI is in use",
        )?;
        ensure(nmi::nmis_taken(me) > taken, "nmis_taken did not count it")?;
        ensure(!nmi::in_nmi(), "in_nmi() still true after the NMI")?;
        handler_flags_ok()
    }

    pub(super) fn nmi_self_irqs_masked() -> Result<(), &'static str> {
        let me = cpu::current_cpu();
        let before = hits(me);
        let probes = SGI_HITS[me].load(Ordering::Relaxed);
        let flags = irqflags::local_irq_save();
        gic::send_sgi(PROBE_SGI, CpuSet::single(me));
        nmi::send_nmi_self();
        cpu::isb();
        let taken = wait_until(WAIT_NS, || hits(me) > before);
        let pmr_after = irqflags::pmr();
        timer::delay_ns(QUIET_NS);
        let probe_pending = gic::pending_sgi(me, PROBE_SGI);
        let probe_early = SGI_HITS[me].load(Ordering::Relaxed) != probes;
        irqflags::local_irq_restore(flags);
        cpu::isb();
        let probe_later = wait_until(WAIT_NS, || SGI_HITS[me].load(Ordering::Relaxed) != probes);
        ensure(taken, "the NMI was not taken with IRQs masked")?;
        ensure(
            pmr_after == PMR_IRQOFF,
            "PMR after the NMI is not the interrupted IRQs-off value",
        )?;
        ensure(
            !probe_early && probe_pending,
            "the normal SGI did not stay pending while IRQs were masked",
        )?;
        ensure(probe_later, "the normal SGI was not taken after unmasking")?;
        handler_flags_ok()
    }

    pub(super) fn nmi_spinner(other: usize) -> Result<(), &'static str> {
        let probes = SGI_HITS[other].load(Ordering::Relaxed);
        start_spinner(other)?;
        let before = hits(other);
        nmi::send_nmi(CpuSet::single(other));
        let taken = wait_until(WAIT_NS, || hits(other) > before);
        gic::send_sgi(PROBE_SGI, CpuSet::single(other));
        timer::delay_ns(QUIET_NS);
        let probe_pending = gic::pending_sgi(other, PROBE_SGI);
        let probe_early = SGI_HITS[other].load(Ordering::Relaxed) != probes;
        let seen_pmr = wait_until(WAIT_NS, || SPIN_PMR_AFTER_NMI.load(Ordering::Relaxed) != 0);
        stop_spinner()?;
        let probe_later = wait_until(WAIT_NS, || {
            SGI_HITS[other].load(Ordering::Relaxed) != probes
        });
        ensure(taken, "the spinning CPU did not take the NMI")?;
        ensure(seen_pmr, "the spinner never saw the NMI return")?;
        ensure(
            SPIN_PMR_AFTER_NMI.load(Ordering::Relaxed) == 0x100 | u32::from(PMR_IRQOFF),
            "the spinner's PMR after the NMI is not IRQs-off",
        )?;
        ensure(
            SPIN_MASKED.load(Ordering::Relaxed),
            "the spinner saw IRQs unmasked",
        )?;
        ensure(
            !probe_early && probe_pending,
            "a normal SGI did not stay pending at the spinning CPU",
        )?;
        ensure(probe_later, "the normal SGI was not taken after the spin")?;
        handler_flags_ok()
    }

    pub(super) fn nmi_mask_all() -> Result<(), &'static str> {
        let me = cpu::current_cpu();
        let before = hits(me);
        let saved = STOP.arch().mask_all();
        let all = STOP.arch().all_masked();
        nmi::send_nmi_self();
        cpu::isb();
        timer::delay_ns(QUIET_NS);
        let early = hits(me) != before;
        let pending = gic::pending_sgi(me, nmi::NMI_SGI);
        STOP.arch().restore(saved);
        cpu::isb();
        let later = wait_until(WAIT_NS, || hits(me) > before);
        ensure(all, "all_masked() is false after mask_all()")?;
        ensure(!early, "an NMI was taken under mask_all")?;
        ensure(pending, "the NMI did not show as pending under mask_all")?;
        ensure(later, "the NMI was not taken after restore")?;
        ensure(!STOP.arch().all_masked(), "all_masked() after restore")
    }

    /// PSTATE.I alone: a superpriority NMI (FEAT_NMI) gets through, a pseudo-NMI does
    /// not. ALLINT alone (FEAT_NMI): the NMI waits.
    pub(super) fn nmi_pstate() -> Result<(), &'static str> {
        let me = cpu::current_cpu();
        let feat = nmi_mode::feat_nmi_in_use();
        let before = hits(me);
        let daif = cpu::daif();
        // SAFETY: masks IRQs (PSTATE.I) only; restored below.
        unsafe { asm!("msr daifset, #2", options(nostack, preserves_flags)) };
        nmi::send_nmi_self();
        cpu::isb();
        let taken_under_i = wait_until(if feat { WAIT_NS } else { QUIET_NS }, || hits(me) > before);
        cpu::restore(daif);
        cpu::isb();
        let taken = wait_until(WAIT_NS, || hits(me) > before);
        ensure(taken, "the NMI was never taken")?;
        if feat {
            ensure(
                taken_under_i,
                "FEAT_NMI: a superpriority NMI was not taken with PSTATE.I set",
            )?;
            let before = hits(me);
            cpu::allint_set();
            nmi::send_nmi_self();
            cpu::isb();
            timer::delay_ns(QUIET_NS);
            let early = hits(me) != before;
            cpu::allint_clear();
            cpu::isb();
            let later = wait_until(WAIT_NS, || hits(me) > before);
            ensure(!early, "FEAT_NMI: an NMI was taken with ALLINT set")?;
            ensure(
                later,
                "FEAT_NMI: the NMI was not taken after clearing ALLINT",
            )?;
        } else {
            ensure(
                !taken_under_i,
                "pseudo-NMI: an NMI was taken with PSTATE.I set",
            )?;
        }
        handler_flags_ok()
    }

    static TAMPER_HITS: AtomicU32 = AtomicU32::new(0);

    fn tamper_handler(_cpu: usize) {
        gic::set_priority_mask(0x80);
        TAMPER_HITS.fetch_add(1, Ordering::Release);
    }

    pub(super) fn pmr_restored() -> Result<(), &'static str> {
        let me = cpu::current_cpu();
        // An NMI handler that changes PMR, taken with IRQs masked and with IRQs on.
        TAMPER_PMR.store(0x80, Ordering::Relaxed);
        let mut result = Ok(());
        for masked in [true, false] {
            let before = hits(me);
            let flags = masked.then(irqflags::local_irq_save);
            let expected = irqflags::pmr();
            nmi::send_nmi_self();
            cpu::isb();
            let taken = wait_until(WAIT_NS, || hits(me) > before);
            let after = irqflags::pmr();
            if let Some(flags) = flags {
                irqflags::local_irq_restore(flags);
            }
            if !taken {
                result = Err("the NMI was not taken");
            } else if after != expected {
                result =
                    Err("PMR after an NMI (whose handler changed it) is not the interrupted value");
            }
        }
        TAMPER_PMR.store(0, Ordering::Relaxed);
        result?;
        // A normal interrupt handler that changes PMR.
        gic::set_sgi_handler(SGI_TAMPER, tamper_handler);
        let before = TAMPER_HITS.load(Ordering::Relaxed);
        gic::send_sgi(SGI_TAMPER, CpuSet::single(me));
        cpu::isb();
        let taken = wait_until(WAIT_NS, || TAMPER_HITS.load(Ordering::Acquire) != before);
        let after = irqflags::pmr();
        gic::clear_sgi_handler(SGI_TAMPER);
        ensure(taken, "the SGI was not taken")?;
        ensure(
            after == PMR_IRQON,
            "PMR after an IRQ handler that changed it is not the interrupted value",
        )
    }

    const SGI_TAMPER: u32 = gic::TEST_SGIS[1];

    fn nmi_off() -> Result<(), &'static str> {
        let me = cpu::current_cpu();
        let taken: [u64; MAX_CPUS] = core::array::from_fn(nmi::nmis_taken);
        nmi::send_nmi_self();
        nmi::send_nmi_all_but_self();
        cpu::isb();
        timer::delay_ns(QUIET_NS);
        ensure(
            smp::online_cpus()
                .iter()
                .all(|c| nmi::nmis_taken(c) == taken[c] && !gic::pending_sgi(c, nmi::NMI_SGI)),
            "pseudo_nmi=off, yet an NMI was sent or taken",
        )?;
        ensure(!nmi::nmis_available(), "NMIs claimed available")?;
        ensure(hits(me) == 0, "the NMI handler ran")
    }

    /// With NMIs, the stop IPI reaches a CPU spinning with IRQs masked; without, the
    /// call times out naming it.
    pub(super) fn stop_vs_spinner(other: usize) -> Result<(), &'static str> {
        let online = smp::online_cpus();
        start_spinner(other)?;
        let ran = AtomicCpuSet::new();
        let result = STOP.stop_machine(
            &|cpu| {
                ran.insert(cpu, Ordering::Relaxed);
                Ok(())
            },
            online,
            StopOptions {
                arrival_timeout_ns: 250_000_000,
                ..StopOptions::DEFAULT
            },
        );
        let still_spinning = SPINNING.load(Ordering::Acquire);
        stop_spinner()?;
        ensure(
            still_spinning,
            "the spinner stopped spinning during the call",
        )?;
        if nmi_mode::pseudo_nmi_enabled() {
            ensure(
                result.is_ok(),
                "stop_machine failed with a CPU spinning IRQs-off",
            )?;
            ensure(
                ran.load(Ordering::Relaxed) == online,
                "the function did not run on every CPU",
            )
        } else {
            match result {
                Err(StopError::Timeout { missing, .. }) if missing == CpuSet::single(other) => {
                    ensure(
                        ran.load(Ordering::Relaxed).is_empty(),
                        "the function ran despite the timeout",
                    )
                }
                _ => Err("pseudo_nmi=off: expected a timeout naming the spinning CPU"),
            }
        }
    }

    #[cfg(feature = "stop-machine-nmi")]
    static IN_NMI_RUNS: AtomicCpuSet = AtomicCpuSet::new();
    #[cfg(feature = "stop-machine-nmi")]
    static RUNS: AtomicCpuSet = AtomicCpuSet::new();

    #[cfg(feature = "stop-machine-nmi")]
    fn stop_machine_nmi_test() -> Result<(), &'static str> {
        use crate::stop::{ETIMEDOUT, NmiSafe};
        let online = smp::online_cpus();
        IN_NMI_RUNS.clear(Ordering::Relaxed);
        RUNS.clear(Ordering::Relaxed);
        let f = |cpu: usize| {
            RUNS.insert(cpu, Ordering::Relaxed);
            if nmi::in_nmi() {
                IN_NMI_RUNS.insert(cpu, Ordering::Relaxed);
            }
            Ok(())
        };
        // SAFETY: the function only does relaxed atomic RMWs on statics: no lock, no
        // printing, no allocation, no exception.
        let function = unsafe { NmiSafe::new(&f) };
        let result = STOP.stop_machine_nmi(function, online, StopOptions::DEFAULT);
        if nmi_mode::pseudo_nmi_enabled() {
            ensure(result.is_ok(), "stop_machine_nmi failed")?;
            ensure(
                STOP.nmi_delivered() == online,
                "the self-NMI did not run on every CPU",
            )?;
            ensure(
                IN_NMI_RUNS.load(Ordering::Relaxed) == online,
                "the function did not run in NMI context everywhere",
            )
        } else {
            match result {
                Err(StopError::Failed(f))
                    if f.cpus() == online && f.iter().all(|(_, code)| code == ETIMEDOUT) =>
                {
                    ensure(
                        RUNS.load(Ordering::Relaxed).is_empty(),
                        "the function ran although no NMI exists",
                    )
                }
                _ => Err("pseudo_nmi=off: expected ETIMEDOUT on every CPU"),
            }
        }
    }
}
