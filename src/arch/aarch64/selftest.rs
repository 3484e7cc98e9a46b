//! Platform self-tests, run by the boot CPU before the kernel proper when the bootargs
//! contain `platform_selftest` (all CPUs are online and interrupts are enabled).
//!
//! `platform_selftest` alone runs the checks below and, if any fails, ends the run with
//! a failure status; otherwise the boot continues. Output lines start with `# ` so they
//! read as KTAP diagnostics. `platform_selftest=<mode>` instead provokes one fatal
//! condition, to check that it is reported and ends the run with a failure status:
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
//! online, to exercise the bring-up timeout.

use super::dtb::BootInfo;
use super::exceptions::TrapFrame;
use super::{cache, cpu, exceptions, exit, gic, layout, mmu, smp, timer};
use crate::{CpuSet, MAX_CPUS, kprintln};
use core::arch::{asm, global_asm};
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

struct Results {
    failed: u32,
    run: u32,
}

impl Results {
    fn check(&mut self, name: &str, result: Result<(), &'static str>) {
        self.run += 1;
        match result {
            Ok(()) => kprintln!("# platform_selftest: ok {name}"),
            Err(why) => {
                self.failed += 1;
                kprintln!("# platform_selftest: FAILED {name}: {why}");
            }
        }
    }
}

fn ensure(cond: bool, why: &'static str) -> Result<(), &'static str> {
    if cond { Ok(()) } else { Err(why) }
}

/// Runs the self-tests (or the fatal mode) selected by the bootargs.
pub fn run(info: &BootInfo) {
    if let Some(mode) = info.bootarg("platform_selftest") {
        provoke(mode);
    }
    let mut r = Results { failed: 0, run: 0 };
    r.check("cpus_online", cpus_online(info));
    r.check("timer", timer_test());
    r.check("memory_permissions", permissions());
    r.check("stack_guards", stack_guards(info));
    r.check("sgi_to_all_others", sgi_all());
    r.check("sgi_self_pending_while_masked", sgi_self_masked());
    r.check("brk_hook_resumes_with_frame", brk_test());
    r.check("poke_text_via_alias", poke_test());
    r.check("icache_sync_lines", icache_test());
    kprintln!(
        "# platform_selftest: {} of {} passed",
        r.run - r.failed,
        r.run
    );
    if r.failed != 0 {
        exit::exit(false);
    }
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
            && nopatch.contains(&(gic::send_sgi as *const () as usize)),
        "poke_text/sync_icache_range/send_sgi are not in .text.nopatch",
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

/// Provokes the fatal condition `mode`; never returns if it works.
fn provoke(mode: &str) {
    kprintln!("# platform_selftest: provoking '{mode}' (expect a fatal report and exit status 1)");
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
        _ => {
            kprintln!("# platform_selftest: unknown mode '{mode}'");
            exit::exit(false);
        }
    }
    kprintln!("# platform_selftest: '{mode}' did NOT fault");
    exit::exit(false);
}
