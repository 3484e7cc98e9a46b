//! KTAP self-tests of what only the x86_64 platform has (the text alias, test IPI
//! vectors and the ICR's destination forms, a CPU held inside an NMI, nested NMIs), run as KTAP subtest suite
//! `platform` by the kernel's runner (`tests=platform`, `tests=platform.NAME` for one)
//! on the boot CPU once every CPU is up. The tests both architectures share (CPUs
//! online, stop_machine, NMI IPIs, stop_machine_nmi, patching) are the kernel's, in
//! `src/kernel/selftest`, and run by default.
//! Bootargs: `platform_offline_cpu=N` (never start CPU N: the kernel's `cpus_online`
//! must then fail naming it); `platform_selftest=<mode>` provokes one fatal condition
//! (as the run's only KTAP test), which must be reported and end the run with the
//! failure status: `text_write` (store to kernel text), `exec_data` (call into a
//! non-executable data page), `null` (load from page 0), `ud` (`ud2`), `panic`,
//! `overflow` (stack overflow into the guard page: a #DF on its IST stack), `exit_fail`
//! (`exit(false)`).

use super::text::KERNEL_TEXT;
use super::text_poke::text_poke_bp;
use super::{STOP, ipi, irq, layout, nmi, paging, smp, timer};
use crate::harness::{Test, Verdict};
use crate::patch::{Patch, PatchError, x86};
use crate::stop::{StopError, StopOptions};
use crate::{AtomicCpuSet, CpuSet};
use core::arch::global_asm;
use core::fmt::Write;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

const OPTIONS: StopOptions = StopOptions::DEFAULT;

/// The platform's checks, in the order they run.
pub const SELFTESTS: &[Test] = &[
    Test::new("poke_text", poke_text),
    Test::new("alias_private", alias_private),
    Test::new("stop_machine_timeout", stop_machine_timeout),
    Test::new("test_ipi", test_ipi),
    Test::new("ipi_forms", ipi_forms),
    Test::new("madt_entries", madt_entries),
    Test::new("nested_nmi", nested_nmi),
];

global_asm!(
    ".pushsection .text.pm_poke_target, \"ax\"",
    ".balign 16",
    ".global pm_poke_target",
    "pm_poke_target:",
    "    mov eax, 0x11111111",
    "    ret",
    ".popsection",
);

unsafe extern "C" {
    /// Returns the immediate of its `mov eax, imm32` (bytes 1..5).
    fn pm_poke_target() -> u32;
}

fn call_target() -> u32 {
    // SAFETY: pm_poke_target is a leaf function following the C ABI.
    unsafe { pm_poke_target() }
}

/// Text written through the alias is what runs afterwards, on this CPU and (inside a
/// stop-machine call, which serialises every CPU) on all others; the alias is gone
/// afterwards, and text stays read-only and executable.
fn poke_text() -> Verdict {
    let site = pm_poke_target as *const () as usize + 1;
    let (ts, te) = layout::text();
    check!((ts..te).contains(&site), "target {site:#x} outside text");
    check!(
        call_target() == 0x1111_1111,
        "target returns {:#x}",
        call_target()
    );
    // SAFETY: the target's immediate; only this test runs the target, not now.
    unsafe { paging::poke_text(site, &0x2222_2222u32.to_le_bytes()) };
    check!(
        !paging::alias_mapped(),
        "alias still mapped after poke_text"
    );
    check!(
        call_target() == 0x2222_2222,
        "after poke: {:#x}",
        call_target()
    );
    let seen = AtomicCpuSet::new();
    let result = STOP.stop_machine(
        &|c| {
            if c == 0 {
                // SAFETY: as above, and every other CPU is in the rendezvous.
                unsafe { paging::poke_text(site, &0x3333_3333u32.to_le_bytes()) };
            }
            Ok(())
        },
        CpuSet::single(0),
        OPTIONS,
    );
    check!(result.is_ok(), "stop_machine: {}", result.unwrap_err());
    // Every other CPU serialised on its way out of the call: let them run the target.
    let others = smp::online_cpus().without(0);
    let run = STOP.stop_machine(
        &|c| {
            if call_target() == 0x3333_3333 {
                seen.insert(c, Ordering::Relaxed);
            }
            Ok(())
        },
        smp::online_cpus(),
        OPTIONS,
    );
    check!(run.is_ok(), "second stop_machine: {}", run.unwrap_err());
    let seen = seen.load(Ordering::Relaxed);
    check!(
        seen == smp::online_cpus(),
        "new text seen on {seen} only (others {others})"
    );
    // SAFETY: as for the first write.
    unsafe { paging::poke_text(site, &0x1111_1111u32.to_le_bytes()) };
    check!(
        call_target() == 0x1111_1111,
        "restore: {:#x}",
        call_target()
    );
    check!(!paging::alias_mapped(), "alias still mapped");
    Verdict::Pass(msg!("written through the alias, seen on {seen}"))
}

/// The text alias exists only in the address space of the CPU that maps it: while CPU 0
/// holds it (inside a stop-machine call, so the other CPU cannot miss the window), the
/// tables another CPU walks (its CR3) do not map it writable, and CPU 0's do (so the
/// probe can tell). With the alias in the shared tables, the other CPU's would.
fn alias_private() -> Verdict {
    static MAPPED: AtomicBool = AtomicBool::new(false);
    /// 0: not probed yet; 1: the other CPU's tables lack the alias; 2: they map it.
    static PROBED: AtomicU32 = AtomicU32::new(0);
    const PROBE_WAIT_NS: u64 = 1_000_000_000;
    let wait = |done: &dyn Fn() -> bool| {
        let start = timer::now_ns();
        while !done() && timer::now_ns() - start < PROBE_WAIT_NS {
            core::hint::spin_loop();
        }
        done()
    };

    check!(
        !paging::maps_writable(paging::current_cr3(), paging::ALIAS_VA),
        "the kernel's own tables map the alias"
    );
    let Some(other) = smp::online_cpus().without(0).iter().next() else {
        return Verdict::Skip(msg!("one CPU: nobody to compare with"));
    };
    MAPPED.store(false, Ordering::Relaxed);
    PROBED.store(0, Ordering::Relaxed);
    let page = pm_poke_target as *const () as usize & !0xfff;
    let mine = AtomicBool::new(false);
    let result = STOP.stop_machine(
        &|cpu| {
            if cpu == 0 {
                // SAFETY: nothing is written through the alias.
                let alias = unsafe { paging::TextAlias::map(page) };
                mine.store(
                    paging::maps_writable(paging::current_cr3(), alias.addr()),
                    Ordering::Relaxed,
                );
                // Release pairs with the other CPU's Acquire: it probes only while the
                // alias is mapped here.
                MAPPED.store(true, Ordering::Release);
                wait(&|| PROBED.load(Ordering::Acquire) != 0);
                drop(alias);
            } else {
                if !wait(&|| MAPPED.load(Ordering::Acquire)) {
                    return Err(-110);
                }
                let mapped = paging::maps_writable(paging::current_cr3(), paging::ALIAS_VA);
                PROBED.store(if mapped { 2 } else { 1 }, Ordering::Release);
            }
            Ok(())
        },
        CpuSet::single(0).with(other),
        OPTIONS,
    );
    check!(result.is_ok(), "stop_machine: {}", result.unwrap_err());
    check!(
        mine.load(Ordering::Relaxed),
        "the mapping CPU's own tables lack the alias"
    );
    match PROBED.load(Ordering::Relaxed) {
        1 => {}
        2 => {
            return Verdict::Fail(msg!(
                "cpu{other}'s tables map the alias while cpu0 holds it"
            ));
        }
        _ => return Verdict::Fail(msg!("cpu{other} never probed")),
    }
    check!(
        !paging::maps_writable(paging::current_cr3(), paging::ALIAS_VA),
        "the alias is still mapped after the drop"
    );
    Verdict::Pass(msg!(
        "mapped on cpu0 only; cpu{other}'s tables never held it"
    ))
}

/// Recurses without end (each frame keeps a live buffer), into the stack guard page.
#[allow(unconditional_recursion, reason = "overflowing the stack is the point")]
fn recurse(n: u64) -> u64 {
    let buf = core::hint::black_box([n; 64]);
    recurse(buf[7] + 1) + buf[3]
}

/// A scratch data word (writable, so mapped non-executable).
static DATA_WORD: AtomicU64 = AtomicU64::new(0xc3); // `ret`

/// The modes of `platform_selftest=`: the fatal conditions [`provoke`] knows.
pub const FAULT_MODES: &[&str] = &[
    "text_write",
    "exec_data",
    "null",
    "ud",
    "panic",
    "overflow",
    "exit_fail",
];

/// Provokes the fatal condition `mode` (one of [`FAULT_MODES`], see the module docs);
/// returns only if it did not bring the kernel down.
pub fn provoke(mode: &str) {
    crate::kprintln!(
        "# platform_selftest={mode}: provoking it (expect a fatal report, failure status)"
    );
    match mode {
        "text_write" => {
            let p = pm_poke_target as *const () as *mut u8;
            // SAFETY: deliberately faults: text is mapped read-only (CR0.WP is set).
            unsafe { p.write_volatile(0x90) };
        }
        "exec_data" => {
            // SAFETY: deliberately faults: data pages are non-executable.
            let f: extern "C" fn() = unsafe { core::mem::transmute(DATA_WORD.as_ptr()) };
            f();
        }
        "null" => {
            // SAFETY: deliberately faults: page 0 is not mapped.
            let v = unsafe { core::ptr::read_volatile(core::ptr::null::<u64>().wrapping_add(1)) };
            crate::kprintln!("read {v:#x} from page 0");
        }
        // SAFETY: deliberately raises #UD.
        "ud" => unsafe { core::arch::asm!("ud2") },
        "panic" => panic!("platform_selftest=panic"),
        "overflow" => {
            let depth = recurse(core::hint::black_box(0));
            crate::kprintln!("recursed {depth} times");
        }
        "exit_fail" => super::exit::exit(false),
        _ => crate::kprintln!("# platform_selftest: unknown mode '{mode}'"),
    }
}

const HOLD_SLOT: usize = 2;
/// The CPU (index + 1; 0 = none) the next NMI should hold.
static HOLD_TARGET: AtomicU32 = AtomicU32::new(0);
/// CPUs currently held in the NMI handler.
static HOLDING: AtomicCpuSet = AtomicCpuSet::new();
static HOLD_RELEASE: AtomicU32 = AtomicU32::new(0);
const HOLD_LIMIT_NS: u64 = 2_000_000_000;

/// NMI handler: spins (bounded) on the CPU named by HOLD_TARGET, so that CPU neither
/// takes the stop IPI nor anything else meanwhile.
fn hold_in_nmi(cpu: usize) -> bool {
    // Acquire pairs with the test's Release store of the target.
    if HOLD_TARGET.load(Ordering::Acquire) != cpu as u32 + 1 {
        return false;
    }
    HOLD_TARGET.store(0, Ordering::Relaxed);
    // Release/Acquire with the test's wait: it sees the CPU held before it calls.
    HOLDING.insert(cpu, Ordering::Release);
    let start = timer::now_ns();
    while HOLD_RELEASE.load(Ordering::Acquire) == 0 && timer::now_ns() - start < HOLD_LIMIT_NS {
        core::hint::spin_loop();
    }
    HOLDING.remove(cpu, Ordering::Release);
    true
}

/// Waits (bounded) until `HOLDING` satisfies `done`.
fn wait_holding(done: impl Fn(CpuSet) -> bool) -> bool {
    let start = timer::now_ns();
    while !done(HOLDING.load(Ordering::Acquire)) {
        if timer::now_ns() - start > HOLD_LIMIT_NS {
            return false;
        }
        core::hint::spin_loop();
    }
    true
}

/// A CPU that cannot take the stop IPI (held inside an NMI handler, interrupts off) is
/// named in a timeout; the function runs nowhere; the next call succeeds.
fn stop_machine_timeout() -> Verdict {
    let online = smp::online_cpus();
    let Some(held) = online.without(0).iter().last() else {
        return Verdict::Skip(msg!("needs a second CPU"));
    };
    nmi::register_nmi_handler(HOLD_SLOT, hold_in_nmi);
    HOLD_RELEASE.store(0, Ordering::Relaxed);
    HOLD_TARGET.store(held as u32 + 1, Ordering::Release);
    nmi::send_nmi(CpuSet::single(held));
    let verdict = (|| {
        check!(
            wait_holding(|h| h.contains(held)),
            "cpu{held} never entered the holding NMI handler"
        );
        let ran = AtomicCpuSet::new();
        let options = StopOptions {
            arrival_timeout_ns: 100_000_000,
            ..OPTIONS
        };
        let result = STOP.stop_machine(
            &|cpu| {
                ran.insert(cpu, Ordering::Relaxed);
                Ok(())
            },
            online,
            options,
        );
        let ran = ran.load(Ordering::Relaxed);
        match result {
            Err(StopError::Timeout { missing, .. }) if missing == CpuSet::single(held) => {}
            other => {
                return Verdict::Fail(msg!(
                    "cpu{held} held: expected a timeout naming it, got {other:?}"
                ));
            }
        }
        check!(
            ran.is_empty(),
            "the function ran on {ran} despite the timeout"
        );
        // The INT3 protocol's first sync cannot reach the held CPU either: the call
        // fails naming it and puts the old bytes back.
        let (site, live) = live_site();
        let before = site_bytes(site);
        match text_poke_bp(
            &KERNEL_TEXT,
            &[Patch::new(site, x86::nop(5).unwrap_or(live), live)],
        ) {
            Err(PatchError::Stop(StopError::Timeout { missing, .. }))
                if missing == CpuSet::single(held) => {}
            other => {
                return Verdict::Fail(msg!(
                    "text_poke_bp with cpu{held} held: expected a timeout naming it, got {other:?}"
                ));
            }
        }
        check!(
            site_bytes(site) == before,
            "a failed text_poke_bp left {:02x?} at the site (was {before:02x?})",
            site_bytes(site)
        );
        Verdict::Pass(msg!("cpu{held} named by stop_machine and text_poke_bp"))
    })();
    HOLD_RELEASE.store(1, Ordering::Release);
    let released = wait_holding(CpuSet::is_empty);
    HOLD_TARGET.store(0, Ordering::Relaxed);
    nmi::unregister_nmi_handler(HOLD_SLOT);
    if !matches!(verdict, Verdict::Pass(_)) {
        return verdict;
    }
    check!(released, "cpu{held} did not leave the holding handler");
    let ran = AtomicCpuSet::new();
    let next = STOP.stop_machine(
        &|cpu| {
            ran.insert(cpu, Ordering::Relaxed);
            Ok(())
        },
        online,
        OPTIONS,
    );
    check!(next.is_ok(), "the next call failed: {}", next.unwrap_err());
    let ran = ran.load(Ordering::Relaxed);
    check!(ran == online, "the next call ran on {ran}");
    // Once everyone answers again, the INT3 protocol works (and retires what the failed
    // call left published).
    let (site, live) = live_site();
    let nop = x86::nop(5).unwrap_or(live);
    for (old, new) in [(nop, live), (live, nop)] {
        let result = text_poke_bp(&KERNEL_TEXT, &[Patch::new(site, old, new)]);
        check!(
            result.is_ok(),
            "text_poke_bp after the release: {}",
            result.unwrap_err()
        );
    }
    verdict
}

unsafe extern "C" {
    fn pm_nosync_target() -> u64;
    fn pm_nosync_branch_dest();
}

/// The kernel's live-patching site (a 5-byte NOP) and the JMP that may replace it.
fn live_site() -> (usize, x86::Insn) {
    let site = pm_nosync_target as *const () as usize;
    let dest = pm_nosync_branch_dest as *const () as usize;
    (site, x86::jmp_rel32(site, dest).unwrap_or(x86::int3()))
}

/// The five bytes at `site`.
fn site_bytes(site: usize) -> [u8; 5] {
    // SAFETY: `site` is a 5-byte site in mapped kernel text.
    core::array::from_fn(|i| unsafe { core::ptr::read_volatile((site + i) as *const u8) })
}

/// CPUs where a test IPI handler ran, and where it ran with interrupts on (wrong).
static IPI_HIT: AtomicCpuSet = AtomicCpuSet::new();
static IPI_IRQS_ON: AtomicCpuSet = AtomicCpuSet::new();

fn ipi_hit(cpu: usize) {
    if !irq::irqs_disabled() {
        IPI_IRQS_ON.insert(cpu, Ordering::Relaxed);
    }
    // Release pairs with the test's Acquire load.
    IPI_HIT.insert(cpu, Ordering::Release);
}

/// Both test IPIs reach every online CPU, the sender included, and their handlers run
/// with interrupts off.
fn test_ipi() -> Verdict {
    let online = smp::online_cpus();
    for v in ipi::TEST_IPIS {
        IPI_HIT.clear(Ordering::Relaxed);
        IPI_IRQS_ON.clear(Ordering::Relaxed);
        ipi::set_ipi_handler(v, ipi_hit);
        ipi::send_ipi(v, online);
        let start = timer::now_ns();
        while IPI_HIT.load(Ordering::Acquire) != online && timer::now_ns() - start < 1_000_000_000 {
            core::hint::spin_loop();
        }
        ipi::clear_ipi_handler(v);
        let hit = IPI_HIT.load(Ordering::Acquire);
        check!(
            hit == online,
            "IPI {v:#x} reached {hit} of {online} within 1 s"
        );
        let on = IPI_IRQS_ON.load(Ordering::Relaxed);
        check!(
            on.is_empty(),
            "IPI {v:#x} handler ran with interrupts on, on {on}"
        );
    }
    Verdict::Pass(msg!(
        "vectors {:#x} and {:#x} on {online}",
        ipi::TEST_IPIS[0],
        ipi::TEST_IPIS[1]
    ))
}

/// A MADT Processor Local APIC entry (type 0).
const fn lapic(id: u8, flags: u8) -> [u8; 8] {
    [0, 8, id, id, flags, 0, 0, 0]
}

/// A MADT Processor Local x2APIC entry (type 9).
const fn x2apic(id: u32, flags: u8) -> [u8; 16] {
    let i = id.to_le_bytes();
    [
        9, 16, 0, 0, i[0], i[1], i[2], i[3], flags, 0, 0, 0, 0, 0, 0, 0,
    ]
}

/// The MADT parser on made-up tables: type 0 and type 9 CPUs together, each rule of
/// `madt` once (enabled, online capable, the invalid IDs 0xff and 0xffff_ffff, a type
/// 9 entry below 0xff beside type 0 CPUs, the same ID twice, other types skipped), the
/// malformed entries refused; and the APIC mode choice (x2APIC above ID 0xfe).
fn madt_entries() -> Verdict {
    use super::{apic, madt};
    let mut table = [0u8; 144];
    let mut len = 0;
    let mut put = |bytes: &[u8]| {
        table[len..len + bytes.len()].copy_from_slice(bytes);
        len += bytes.len();
    };
    put(&lapic(0, 1));
    put(&[1, 12, 0, 0, 0, 0, 0xc0, 0xfe, 0, 0, 0, 0]); // an I/O APIC: skipped
    put(&lapic(1, 1));
    put(&lapic(2, 2)); // online capable, not enabled
    put(&lapic(3, 2));
    put(&lapic(0xff, 1)); // no CPU
    put(&x2apic(1, 1)); // below 0xff beside type 0 CPUs: the same CPU again
    put(&x2apic(300, 1));
    put(&x2apic(300, 1)); // listed twice
    put(&x2apic(u32::MAX, 1)); // no CPU
    put(&x2apic(301, 0)); // neither enabled nor online capable
    let cpus = match madt::parse_entries(&table[..len]) {
        Ok(cpus) => cpus,
        Err(e) => return Verdict::Fail(msg!("a good table refused: {e}")),
    };
    let ids = &cpus.apic_ids[..cpus.count];
    check!(ids == [0, 1, 300], "APIC IDs {ids:?}, expected [0, 1, 300]");
    check!(
        (
            cpus.online_capable,
            cpus.duplicates,
            cpus.dropped,
            cpus.max_apic_id
        ) == (2, 1, 0, 300),
        "online capable {}, duplicates {}, dropped {}, highest ID {}: expected 2, 1, 0, 300",
        cpus.online_capable,
        cpus.duplicates,
        cpus.dropped,
        cpus.max_apic_id
    );
    // Only type 9 entries: IDs below 0xff count.
    let mut only_x2 = [0u8; 32];
    only_x2[..16].copy_from_slice(&x2apic(3, 1));
    only_x2[16..].copy_from_slice(&x2apic(4, 1));
    match madt::parse_entries(&only_x2) {
        Ok(c) if c.apic_ids[..c.count] == [3, 4] => {}
        Ok(c) => fail!("type 9 only: IDs {:?}", &c.apic_ids[..c.count]),
        Err(e) => fail!("type 9 only: refused: {e}"),
    }
    let x2 = x2apic(5, 1);
    let short_x2 = [9, 12, 0, 0, 5, 0, 0, 0, 1, 0, 0, 0];
    let bad: [(&str, &[u8]); 4] = [
        ("an entry past the end", &x2[..12]),
        ("a type 9 entry of 12 bytes", &short_x2),
        ("an entry of length 0", &[0, 0, 0, 0]),
        ("no enabled CPU", &lapic(7, 0)),
    ];
    for (what, bytes) in bad {
        check!(madt::parse_entries(bytes).is_err(), "{what} was accepted");
    }
    check!(
        apic::choose_mode(false, 0xfe, madt::XAPIC_MAX_ID) == Ok(false)
            && apic::choose_mode(false, 0xff, madt::XAPIC_MAX_ID) == Err(0xff)
            && apic::choose_mode(true, 300, madt::XAPIC_MAX_ID) == Ok(true),
        "APIC mode: xAPIC must serve IDs up to 0xfe and refuse 0xff without x2APIC"
    );
    Verdict::Pass(msg!(
        "IDs {ids:?} from type 0 and 9 entries; 4 malformed tables refused"
    ))
}

/// Per CPU: deliveries of the IPI under test, and of the fence that follows it.
static FORM_HITS: [AtomicU32; crate::MAX_CPUS] = [const { AtomicU32::new(0) }; crate::MAX_CPUS];
static FORM_FENCED: [AtomicU32; crate::MAX_CPUS] = [const { AtomicU32::new(0) }; crate::MAX_CPUS];
const FORM_WAIT_NS: u64 = 2_000_000_000;

fn form_hit(cpu: usize) {
    // Release pairs with the test's Acquire loads.
    FORM_HITS[cpu].fetch_add(1, Ordering::Release);
}

fn form_fenced(cpu: usize) {
    // Release pairs with the test's Acquire loads.
    FORM_FENCED[cpu].fetch_add(1, Ordering::Release);
}

/// The CPUs of `set` whose counter in `counts` satisfies `keep`.
fn counted(counts: &[AtomicU32], set: CpuSet, keep: impl Fn(u32) -> bool) -> CpuSet {
    set.iter()
        .filter(|&c| keep(counts[c].load(Ordering::Acquire)))
        .fold(CpuSet::EMPTY, CpuSet::with)
}

/// Waits (bounded) until every CPU of `set` has a non-zero counter; the laggards.
fn wait_counted(counts: &[AtomicU32], set: CpuSet) -> CpuSet {
    let start = timer::now_ns();
    loop {
        let missing = counted(counts, set, |n| n == 0);
        if missing.is_empty() || timer::now_ns() - start > FORM_WAIT_NS {
            return missing;
        }
        core::hint::spin_loop();
    }
}

/// Distinct x2APIC clusters among `set`.
fn clusters(set: CpuSet) -> usize {
    let mut seen = [0u64; crate::MAX_CPUS.div_ceil(64)];
    let mut n = 0;
    for c in set.iter() {
        // The index of `c`'s cluster among the online CPUs' clusters, by first member.
        let cluster = smp::logical_id(c) >> 16;
        let first = smp::online_cpus()
            .iter()
            .find(|&o| smp::logical_id(o) >> 16 == cluster)
            .unwrap_or(c);
        if seen[first / 64] & (1 << (first % 64)) == 0 {
            seen[first / 64] |= 1 << (first % 64);
            n += 1;
        }
    }
    n
}

/// Sends the test IPI in `form` to `intended`, and checks that exactly those CPUs took
/// it, once each: the intended ones within 2 s, and no other by the time a later,
/// lower-priority fence IPI (sent to every online CPU one by one) reached them all (an
/// IRR holding both is served highest vector first, so a stray delivery of the IPI
/// under test runs before the fence). Returns the ICR writes made.
fn one_form(form: ipi::IpiForm, intended: CpuSet) -> Result<usize, crate::harness::Msg> {
    let online = smp::online_cpus();
    for c in online.iter() {
        FORM_HITS[c].store(0, Ordering::Relaxed);
        FORM_FENCED[c].store(0, Ordering::Relaxed);
    }
    let writes = ipi::send_ipi_as(ipi::TEST_IPIS[1], intended, form);
    let late = wait_counted(&FORM_HITS, intended);
    ipi::send_ipi_as(ipi::TEST_IPIS[0], online, ipi::IpiForm::Physical);
    let unfenced = wait_counted(&FORM_FENCED, online);
    let hit = counted(&FORM_HITS, online, |n| n > 0);
    let twice = counted(&FORM_HITS, online, |n| n > 1);
    let name = form.name();
    if !late.is_empty() {
        return Err(msg!(
            "{name} to {intended}: {late} never took it within 2 s (reached {hit})"
        ));
    }
    if !unfenced.is_empty() {
        return Err(msg!(
            "{name}: the fence IPI (physical, to every CPU) never reached {unfenced}"
        ));
    }
    if hit != intended {
        return Err(msg!(
            "{name} to {intended} also reached {}",
            hit.minus(intended)
        ));
    }
    if !twice.is_empty() {
        return Err(msg!("{name} to {intended}: taken twice on {twice}"));
    }
    Ok(writes)
}

/// Each ICR destination form of `ipi::send_to` reaches exactly the CPUs meant: the
/// all-but-self shorthand every other CPU in one write (only when every CPU the MADT
/// lists is online), x2APIC cluster mode its targets in one write per cluster (sparse
/// sets, one CPU of the highest cluster, every other CPU), physical mode one CPU per
/// write; and `form_for` picks the shorthand exactly when it may.
fn ipi_forms() -> Verdict {
    let me = super::cpu::current_cpu();
    let online = smp::online_cpus();
    let others = online.without(me);
    let last = online.iter().last().unwrap_or(me);
    let every = |step: usize| {
        online
            .iter()
            .filter(|c| c % step == step - 1 || *c == last)
            .fold(CpuSet::EMPTY, CpuSet::with)
    };
    ipi::set_ipi_handler(ipi::TEST_IPIS[1], form_hit);
    ipi::set_ipi_handler(ipi::TEST_IPIS[0], form_fenced);
    let verdict = (|| {
        let mut done = 0;
        let all_online = online.len() == smp::present();
        let x2 = super::apic::x2apic_mode();
        // What `form_for` must pick for every other CPU, and for fewer.
        let (for_others, for_fewer) = match (all_online, x2) {
            (true, true) => (ipi::IpiForm::AllButSelf, ipi::IpiForm::Cluster),
            (true, false) => (ipi::IpiForm::AllButSelf, ipi::IpiForm::Physical),
            (false, _) => (ipi::IpiForm::Physical, ipi::IpiForm::Physical),
        };
        let fewer = CpuSet::single(last);
        for (targets, want) in [(others, for_others), (fewer, for_fewer)] {
            let got = ipi::form_for(targets);
            check!(
                targets.is_empty() || got == want,
                "form_for({targets}) with {} of {} CPUs online, x2APIC {x2}: {}, expected {}",
                online.len(),
                smp::present(),
                got.name(),
                want.name()
            );
        }
        if !others.is_empty() && all_online {
            let writes = match one_form(ipi::IpiForm::AllButSelf, others) {
                Ok(w) => w,
                Err(why) => return Verdict::Fail(why),
            };
            check!(writes == 1, "the shorthand took {writes} ICR writes");
            done += 1;
        }
        for targets in [every(3), CpuSet::single(last), online] {
            match one_form(ipi::IpiForm::Physical, targets) {
                Ok(w) if w == targets.len() => done += 1,
                Ok(w) => {
                    return Verdict::Fail(msg!(
                        "physical to {targets}: {w} ICR writes for {} CPUs",
                        targets.len()
                    ));
                }
                Err(why) => return Verdict::Fail(why),
            }
        }
        if !x2 {
            return Verdict::Pass(msg!(
                "{done} sends on {online}; xAPIC mode: no cluster form"
            ));
        }
        if !all_online {
            return Verdict::Pass(msg!(
                "{done} sends on {online}; cluster form not tried: {} of {} CPUs online (QEMU's logical delivery needs every APIC in x2APIC mode)",
                online.len(),
                smp::present()
            ));
        }
        for targets in [every(5), CpuSet::single(last), others, online] {
            match one_form(ipi::IpiForm::Cluster, targets) {
                Ok(w) if w == clusters(targets) => done += 1,
                Ok(w) => {
                    return Verdict::Fail(msg!(
                        "cluster to {targets}: {w} ICR writes for {} clusters",
                        clusters(targets)
                    ));
                }
                Err(why) => return Verdict::Fail(why),
            }
        }
        Verdict::Pass(msg!(
            "{done} sends on {online} ({} x2APIC clusters, highest APIC ID {}), each reached exactly its targets",
            clusters(online),
            smp::apic_id(last)
        ))
    })();
    ipi::clear_ipi_handler(ipi::TEST_IPIS[1]);
    ipi::clear_ipi_handler(ipi::TEST_IPIS[0]);
    let busy = super::apic::icr_busy_timeouts();
    check!(
        busy == 0 || !matches!(verdict, Verdict::Pass(_)),
        "the xAPIC ICR stayed busy through 1,000,000 polls {busy} times since boot"
    );
    verdict
}

global_asm!(
    ".pushsection .text.pm_nmi_ud2, \"ax\"",
    ".balign 16",
    ".global pm_nmi_ud2_probe",
    "pm_nmi_ud2_probe:",
    "    ud2",
    "    ret",
    ".popsection",
);

unsafe extern "C" {
    /// `ud2; ret`: the #UD handler recognises this `ud2` and skips it (`traps.rs`).
    fn pm_nmi_ud2_probe();
}

/// The address of the NMI self-test's `ud2`, for the #UD handler.
#[inline(always)]
fn nmi_ud2_site() -> u64 {
    pm_nmi_ud2_probe as *const () as u64
}

const NESTED_SLOT: usize = 3;
const NESTED_ITERATIONS: u32 = 2000;
/// How long the armed handler spins after the `ud2` (NMIs unblocked), for nested NMIs
/// from the storm to arrive.
const NESTED_SPIN_NS: u64 = 20_000;
const NESTED_LIMIT_NS: u64 = 5_000_000_000;
/// The CPU under test (index + 1; 0 = none).
static NESTED_TARGET: AtomicU32 = AtomicU32::new(0);
/// Set by the runner before each self-NMI: the next handler pass takes the `ud2`.
static NESTED_ARMED: AtomicU32 = AtomicU32::new(0);
/// Armed passes completed.
static NESTED_DONE: AtomicU32 = AtomicU32::new(0);
/// Current and deepest nesting of the test handler on the target.
static NESTED_DEPTH: AtomicU32 = AtomicU32::new(0);
static NESTED_MAX_DEPTH: AtomicU32 = AtomicU32::new(0);
/// Runs of the test handler on the target inside a repeat pass (a latched NMI's).
static NESTED_REPEAT_RUNS: AtomicU64 = AtomicU64::new(0);
/// Stack canary and callee-saved register mismatches seen after the `ud2`.
static NESTED_BAD_CANARY: AtomicU32 = AtomicU32::new(0);
static NESTED_BAD_REGS: AtomicU32 = AtomicU32::new(0);
/// Per sender: NMIs sent to the target.
static NESTED_SENT: [AtomicU64; crate::MAX_CPUS] = [const { AtomicU64::new(0) }; crate::MAX_CPUS];
static STORM_STOP: AtomicU32 = AtomicU32::new(0);
static STORM_RUNNING: AtomicCpuSet = AtomicCpuSet::new();

/// NMI handler: on the target, when armed, raises #UD (whose `iretq` ends NMI
/// blocking), then spins while the other CPUs keep sending NMIs, and checks that its
/// stack and registers survived.
fn nested_nmi_handler(cpu: usize) -> bool {
    // Acquire pairs with the runner's Release store of the target.
    if NESTED_TARGET.load(Ordering::Acquire) != cpu as u32 + 1 {
        return false;
    }
    // Only this CPU touches the depth counters: Relaxed.
    let depth = NESTED_DEPTH.fetch_add(1, Ordering::Relaxed) + 1;
    NESTED_MAX_DEPTH.fetch_max(depth, Ordering::Relaxed);
    if nmi::in_repeat_pass() {
        NESTED_REPEAT_RUNS.fetch_add(1, Ordering::Relaxed);
    }
    if NESTED_ARMED.swap(0, Ordering::Acquire) != 0 {
        let mut canary = [0u64; 32];
        for (i, w) in canary.iter_mut().enumerate() {
            *w = 0x5a5a_0000_0000_0000 | i as u64;
        }
        let canary = core::hint::black_box(canary);
        let pattern: [u64; 4] = [
            0x1212_3434_5656_7878,
            0x2323_4545_6767_8989,
            0x3434_5656_7878_9a9a,
            0x4545_6767_8989_abab,
        ];
        let mut regs = pattern;
        // SAFETY: the probe is `ud2; ret`; the #UD handler skips the `ud2` and returns
        // with `iretq` (ending NMI blocking, the point of the test). The probe follows
        // the C ABI; r12-r15 are callee-saved, so they must come back unchanged.
        unsafe {
            core::arch::asm!(
                "call {probe}",
                probe = sym pm_nmi_ud2_probe,
                inout("r12") regs[0],
                inout("r13") regs[1],
                inout("r14") regs[2],
                inout("r15") regs[3],
                clobber_abi("C"),
            );
        }
        let start = timer::now_ns();
        while timer::now_ns() - start < NESTED_SPIN_NS {
            core::hint::spin_loop();
        }
        let canary = core::hint::black_box(canary);
        if canary
            .iter()
            .enumerate()
            .any(|(i, &w)| w != 0x5a5a_0000_0000_0000 | i as u64)
        {
            NESTED_BAD_CANARY.fetch_add(1, Ordering::Relaxed);
        }
        if regs != pattern {
            NESTED_BAD_REGS.fetch_add(1, Ordering::Relaxed);
        }
        // Release pairs with the runner's Acquire wait.
        NESTED_DONE.fetch_add(1, Ordering::Release);
    }
    NESTED_DEPTH.fetch_sub(1, Ordering::Relaxed);
    true
}

/// Test IPI handler on every other CPU: sends NMIs to the target, counting each,
/// until told to stop (bounded by `NESTED_LIMIT_NS`).
fn nmi_storm(cpu: usize) {
    // Acquire pairs with the runner's Release store of the target.
    let target = NESTED_TARGET.load(Ordering::Acquire);
    if target == 0 {
        return;
    }
    STORM_RUNNING.insert(cpu, Ordering::Release);
    let start = timer::now_ns();
    while STORM_STOP.load(Ordering::Acquire) == 0 && timer::now_ns() - start < NESTED_LIMIT_NS {
        nmi::send_nmi(CpuSet::single(target as usize - 1));
        NESTED_SENT[cpu].fetch_add(1, Ordering::Relaxed);
        for _ in 0..50 {
            core::hint::spin_loop();
        }
    }
    // Release pairs with the runner's Acquire: our sent count is final.
    STORM_RUNNING.remove(cpu, Ordering::Release);
}

/// Steven Rostedt, "x86: Add workaround to NMI iret woes" (LKML, 2011): an exception inside the NMI handler ends NMI blocking; NMIs then
/// arriving (from every other CPU) must be latched by the entry stub and run after
/// the first, never on top of its stack. Every request is drained exactly once, the
/// handler never nests, its stack canary and callee-saved registers survive, and every
/// latched NMI was answered by a repeat pass (the handlers ran again) of its own outer
/// NMI, before that one returned (`nmi::latch_counts`).
fn nested_nmi() -> Verdict {
    super::traps::skip_ud2_at(nmi_ud2_site());
    let me = super::cpu::current_cpu();
    let others = smp::online_cpus().without(me);
    for s in &NESTED_SENT {
        s.store(0, Ordering::Relaxed);
    }
    for a in [
        &NESTED_ARMED,
        &NESTED_DONE,
        &NESTED_DEPTH,
        &NESTED_MAX_DEPTH,
        &NESTED_BAD_CANARY,
        &NESTED_BAD_REGS,
        &STORM_STOP,
    ] {
        a.store(0, Ordering::Relaxed);
    }
    NESTED_REPEAT_RUNS.store(0, Ordering::Relaxed);
    let drained0 = nmi::requests_drained(me);
    let latched0 = nmi::nmis_latched();
    let latches0 = nmi::latch_counts(me);
    nmi::register_nmi_handler(NESTED_SLOT, nested_nmi_handler);
    NESTED_TARGET.store(me as u32 + 1, Ordering::Release);
    ipi::set_ipi_handler(ipi::TEST_IPIS[1], nmi_storm);
    ipi::send_ipi(ipi::TEST_IPIS[1], others);
    let start = timer::now_ns();
    while STORM_RUNNING.load(Ordering::Acquire) != others && timer::now_ns() - start < 1_000_000_000
    {
        core::hint::spin_loop();
    }
    let storming = STORM_RUNNING.load(Ordering::Acquire);
    let mut self_sent = 0u64;
    let mut stuck = None;
    for i in 0..NESTED_ITERATIONS {
        NESTED_ARMED.store(1, Ordering::Release);
        nmi::send_nmi_self();
        self_sent += 1;
        let start = timer::now_ns();
        // Acquire pairs with the handler's Release increment.
        while NESTED_DONE.load(Ordering::Acquire) <= i {
            if timer::now_ns() - start > 1_000_000_000 {
                stuck = Some(i);
                break;
            }
            core::hint::spin_loop();
        }
        if stuck.is_some() {
            break;
        }
    }
    STORM_STOP.store(1, Ordering::Release);
    let start = timer::now_ns();
    while !STORM_RUNNING.load(Ordering::Acquire).is_empty()
        && timer::now_ns() - start < NESTED_LIMIT_NS
    {
        core::hint::spin_loop();
    }
    let still = STORM_RUNNING.load(Ordering::Acquire);
    let sent = self_sent
        + NESTED_SENT
            .iter()
            .map(|s| s.load(Ordering::Relaxed))
            .sum::<u64>();
    // The last NMIs may still be in flight: wait (bounded) for their requests.
    let start = timer::now_ns();
    while nmi::requests_drained(me) - drained0 < sent && timer::now_ns() - start < 1_000_000_000 {
        core::hint::spin_loop();
    }
    let handled = nmi::requests_drained(me) - drained0;
    let latched = nmi::nmis_latched() - latched0;
    let latches = nmi::latch_counts(me);
    let (mine, answered, repeats, lost) = (
        latches.latched - latches0.latched,
        latches.answered - latches0.answered,
        latches.repeats - latches0.repeats,
        latches.lost - latches0.lost,
    );
    ipi::clear_ipi_handler(ipi::TEST_IPIS[1]);
    NESTED_TARGET.store(0, Ordering::Release);
    nmi::unregister_nmi_handler(NESTED_SLOT);
    check!(
        storming == others,
        "NMI storm started on {storming} of {others} within 1 s"
    );
    check!(
        stuck.is_none(),
        "armed NMI {stuck:?} never completed within 1 s"
    );
    check!(still.is_empty(), "storm still running on {still} after 5 s");
    // Every latch made its outer NMI run the handlers again before returning.
    check!(
        lost == 0 && answered == mine,
        "cpu{me}: {mine} nested NMIs latched, {answered} answered by {repeats} repeat passes, {lost} lost (the outer NMI returned without repeating)"
    );
    check!(
        repeats > 0 && repeats <= mine || others.is_empty(),
        "cpu{me}: {repeats} repeat passes for {mine} latched NMIs"
    );
    let reran = NESTED_REPEAT_RUNS.load(Ordering::Relaxed);
    check!(
        reran >= repeats,
        "cpu{me}: the test handler ran in {reran} of {repeats} repeat passes"
    );
    check!(
        latched >= mine,
        "cpu{me}: {mine} latched here but {latched} on all CPUs"
    );
    check!(
        handled == sent,
        "cpu{me}: {sent} NMI requests sent, {handled} drained within 1 s"
    );
    let depth = NESTED_MAX_DEPTH.load(Ordering::Relaxed);
    check!(depth == 1, "NMI handler nesting depth {depth}");
    let canary = NESTED_BAD_CANARY.load(Ordering::Relaxed);
    check!(canary == 0, "stack canary corrupted in {canary} passes");
    let regs = NESTED_BAD_REGS.load(Ordering::Relaxed);
    check!(regs == 0, "r12-r15 corrupted in {regs} passes");
    check!(
        latched > 0 || others.is_empty(),
        "no nested NMI latched in {NESTED_ITERATIONS} passes: the window was not exercised"
    );
    Verdict::Pass(msg!(
        "cpu{me}: {NESTED_ITERATIONS} #UD passes, {sent} sent = {handled} drained, {mine} nested latched = answered by {repeats} repeats, depth 1"
    ))
}
