//! The in-kernel self-tests, reported as KTAP.
//!
//! Each test checks one property of the running kernel and says what it saw when the
//! property does not hold. Every one of them has been seen to fail against a kernel with
//! that property broken (the README lists how).

use super::platform::{
    self, Insn, NOP, SITE_LEN, STOP, current_cpu, now_ns, online_cpus, returning,
};
use super::platform::{KERNEL_TEXT, set_write_probe};
use super::smp::run_on;
use crate::harness::{self, Msg, Verdict};
use crate::patch::{Instruction, Patch, PatchError, Text, patch_machine, patch_nosync};
use crate::stop::{Arch, StopError, StopOptions};
use crate::{AtomicCpuSet, CpuSet};
use core::fmt::Write;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

unsafe extern "C" {
    fn pm_torture_a() -> u64;
    fn pm_torture_b() -> u64;
    fn pm_nosync_target() -> u64;
    fn pm_nosync_branch_dest();
    fn pm_spare_site();
}

/// Parameters from the kernel command line.
#[derive(Clone, Copy, Debug)]
pub struct Params {
    /// Torture flips (`flips=N`).
    pub flips: u32,
    /// Nosync and call-site flips (`nosync_flips=N`).
    pub nosync_flips: u32,
    /// Static key flips (`static_key_flips=N`).
    pub static_key_flips: u32,
    /// kprobe arm/disarm cycles of `kprobe_hammer` (`kprobe_cycles=N`).
    pub kprobe_cycles: u32,
    /// CPU down/up cycles of `hotplug_torture` (`hotplug_cycles=N`).
    pub hotplug_cycles: u32,
    /// The NMI mechanism `nmi_mechanism` must find in use (`expect_nmi=NAME`).
    pub expect_nmi: Option<platform::NmiMechanism>,
    /// The CPU features `alternatives` must find (`expect_features=a,b|none`).
    pub expect_features: Option<crate::patch::alternatives::Features>,
    /// Isolated CPUs (`isolcpus=`/`nohz_full=`): the isolation tests run user code there.
    pub isolated: CpuSet,
    /// User-loop iterations between two kernel entries in `isolation_torture`
    /// (`user_spins=N`).
    pub user_spins: u32,
    /// Patches of `isolation_quiet` and `isolation_torture` (`isolation_rounds=N`).
    pub isolation_rounds: u32,
}

impl Params {
    /// The defaults: 10,000 torture flips, 200 kprobe cycles (`kprobe_cycles=10000`
    /// for the long run).
    pub const DEFAULT: Params = Params {
        flips: 10_000,
        nosync_flips: 2_000,
        static_key_flips: 1_000,
        kprobe_cycles: 200,
        hotplug_cycles: 20,
        expect_nmi: None,
        expect_features: None,
        isolated: CpuSet::EMPTY,
        user_spins: 10,
        isolation_rounds: 200,
    };
}

mod alternatives;
mod bench;
mod call_site;
mod faults;
mod hotplug;
mod isolation;
mod kprobes;
mod nmi;
mod static_keys;

/// A kernel self-test: `tests=all` (the default) runs those `by_default`.
pub type Test = harness::Test<fn(&Params) -> Verdict>;

/// Every test, in the order they run.
pub const TESTS: &[Test] = &[
    Test {
        name: "cpus_online",
        run: cpus_online,
        by_default: true,
    },
    Test {
        name: "stop_machine_active_cpus",
        run: stop_machine_active_cpus,
        by_default: true,
    },
    Test {
        name: "stop_machine_errors",
        run: stop_machine_errors,
        by_default: true,
    },
    Test {
        name: "stop_machine_timeout",
        run: stop_machine_timeout,
        by_default: true,
    },
    Test {
        name: "patch_quiescence",
        run: patch_quiescence,
        by_default: true,
    },
    Test {
        name: "patch_masking",
        run: patch_masking,
        by_default: true,
    },
    Test {
        name: "bad_batches",
        run: bad_batches,
        by_default: true,
    },
    Test {
        name: "large_batches",
        run: bench::large_batches,
        by_default: true,
    },
    Test {
        name: "nosync",
        run: nosync,
        by_default: true,
    },
    Test {
        name: "call_site_live",
        run: call_site::call_site_live,
        by_default: true,
    },
    Test {
        name: "torture",
        run: torture,
        by_default: true,
    },
    Test {
        name: "static_keys",
        run: static_keys::static_keys,
        by_default: true,
    },
    Test {
        name: "static_key_errors",
        run: static_keys::static_key_errors,
        by_default: true,
    },
    Test {
        name: "static_key_refs",
        run: static_keys::static_key_refs,
        by_default: true,
    },
    Test {
        name: "static_key_hook",
        run: static_keys::static_key_hook,
        by_default: true,
    },
    Test {
        name: "nmi_mechanism",
        run: nmi::nmi_mechanism,
        by_default: true,
    },
    Test {
        name: "nmi_ipi",
        run: nmi::nmi_ipi,
        by_default: true,
    },
    Test {
        name: "nmi_reaches_irqs_off",
        run: nmi::nmi_reaches_irqs_off,
        by_default: true,
    },
    Test {
        name: "stop_machine_nmi",
        run: nmi::stop_machine_nmi,
        by_default: true,
    },
    Test {
        name: "nmi_safe_patching",
        run: nmi::nmi_safe_patching,
        by_default: true,
    },
    Test {
        name: "alternatives",
        run: alternatives::alternatives,
        by_default: true,
    },
    Test {
        name: "kprobe_refusals",
        run: kprobes::kprobe_refusals,
        by_default: true,
    },
    Test {
        name: "kprobe_simulate",
        run: kprobes::kprobe_simulate,
        by_default: true,
    },
    Test {
        name: "kprobe_contexts",
        run: kprobes::kprobe_contexts,
        by_default: true,
    },
    Test {
        name: "kprobe_registry",
        run: kprobes::kprobe_registry,
        by_default: true,
    },
    Test {
        name: "kprobe_hammer",
        run: kprobes::kprobe_hammer,
        by_default: true,
    },
    Test {
        name: "user_faults",
        run: isolation::user_faults,
        by_default: true,
    },
    Test {
        name: "isolation_quiet",
        run: isolation::isolation_quiet,
        by_default: true,
    },
    Test {
        name: "isolation_torture",
        run: isolation::isolation_torture,
        by_default: true,
    },
    Test {
        name: "fault_cpu_never_arrives",
        run: faults::fault_cpu_never_arrives,
        by_default: true,
    },
    Test {
        name: "fault_stop_fn_errors",
        run: faults::fault_stop_fn_errors,
        by_default: true,
    },
    Test {
        name: "fault_stop_fn_faults",
        run: faults::fault_stop_fn_faults,
        by_default: true,
    },
    Test {
        name: "fault_concurrent_patchers",
        run: faults::fault_concurrent_patchers,
        by_default: true,
    },
    Test {
        name: "fault_wrong_context",
        run: faults::fault_wrong_context,
        by_default: true,
    },
    Test {
        name: "fault_nmi_storm",
        run: faults::fault_nmi_storm,
        by_default: true,
    },
    Test {
        name: "hotplug_refusals",
        run: hotplug::hotplug_refusals,
        by_default: true,
    },
    Test {
        name: "hotplug_cycle",
        run: hotplug::hotplug_cycle,
        by_default: true,
    },
    Test {
        name: "hotplug_patch_offline",
        run: hotplug::hotplug_patch_offline,
        by_default: true,
    },
    Test {
        name: "hotplug_torture",
        run: hotplug::hotplug_torture,
        by_default: true,
    },
    Test {
        name: "bench",
        run: bench::bench,
        by_default: false,
    },
];

const OPTIONS: StopOptions = StopOptions::DEFAULT;
const JOB_TIMEOUT_NS: u64 = 30_000_000_000;
/// How long the timeout test lets the others arrive: long enough for emulated CPUs on a
/// loaded host, short enough to wait out once.
const HOLD_TIMEOUT_NS: u64 = 250_000_000;

fn others() -> CpuSet {
    online_cpus().without(current_cpu())
}

fn cpus_online(_: &Params) -> Verdict {
    let expected = platform::cpu_count();
    let table = platform::CPU_TABLE;
    // (More CPUs than MAX_CPUS in the DTB/MADT: the kernel refuses the run before any
    // test, see `kernel::primary_main`.)
    let online = online_cpus();
    check!(
        online == CpuSet::first(expected),
        "online CPUs {online}, but the {table} lists {expected}"
    );
    Verdict::Pass(msg!("{expected} CPUs"))
}

fn stop_machine_active_cpus(_: &Params) -> Verdict {
    let online = online_cpus();
    let last = online.len() - 1;
    let odd = online
        .iter()
        .filter(|c| c % 2 == 1)
        .fold(CpuSet::EMPTY, CpuSet::with);
    for active in [online, CpuSet::single(0), CpuSet::single(last), odd] {
        if active.is_empty() {
            continue;
        }
        let ran = AtomicCpuSet::new();
        let runs = AtomicU32::new(0);
        let result = STOP.stop_machine(
            &|cpu| {
                ran.insert(cpu, Ordering::Relaxed);
                runs.fetch_add(1, Ordering::Relaxed);
                Ok(())
            },
            active,
            OPTIONS,
        );
        check!(result.is_ok(), "active {active}: {}", result.unwrap_err());
        let ran = ran.load(Ordering::Relaxed);
        check!(
            ran == active && runs.load(Ordering::Relaxed) as usize == active.len(),
            "asked for {active}, ran on {ran} ({} runs)",
            runs.load(Ordering::Relaxed)
        );
    }
    Verdict::Pass(Msg::new())
}

/// Stops the machine with a function that only records where it ran.
fn stop_recording(active: CpuSet, options: StopOptions) -> (Result<(), StopError>, CpuSet) {
    let ran = AtomicCpuSet::new();
    let result = STOP.stop_machine(
        &|cpu| {
            ran.insert(cpu, Ordering::Relaxed);
            Ok(())
        },
        active,
        options,
    );
    (result, ran.load(Ordering::Relaxed))
}

fn stop_machine_errors(_: &Params) -> Verdict {
    let online = online_cpus();
    let result = STOP.stop_machine(
        &|cpu| {
            if cpu % 2 == 1 || cpu == 0 {
                Err(-100 - cpu as i32)
            } else {
                Ok(())
            }
        },
        online,
        OPTIONS,
    );
    let expected = online
        .iter()
        .filter(|c| c % 2 == 1 || *c == 0)
        .fold(CpuSet::EMPTY, CpuSet::with);
    match result {
        Err(StopError::Failed(failures)) => {
            check!(
                failures.cpus() == expected,
                "failing CPUs {} (expected {expected})",
                failures.cpus()
            );
            for cpu in expected.iter() {
                check!(
                    failures.code(cpu) == Some(-100 - cpu as i32),
                    "cpu{cpu} reported {:?}",
                    failures.code(cpu)
                );
            }
            Verdict::Pass(Msg::new())
        }
        other => fail!("expected failures on {expected}, got {other:?}"),
    }
}

struct Hold {
    holding: AtomicBool,
    release: AtomicBool,
    timed_out: AtomicBool,
}

fn hold_masked(_cpu: usize, hold: &Hold) {
    let saved = STOP.arch().mask_all();
    hold.holding.store(true, Ordering::Release);
    let start = now_ns();
    while !hold.release.load(Ordering::Acquire) {
        if now_ns() - start > 10_000_000_000 {
            hold.timed_out.store(true, Ordering::Relaxed);
            break;
        }
        core::hint::spin_loop();
    }
    STOP.arch().restore(saved);
}

fn stop_machine_timeout(_: &Params) -> Verdict {
    let online = online_cpus();
    if online.len() < 2 {
        return Verdict::Skip(msg!("needs a second CPU to hold"));
    }
    let held = online.len() - 1;
    let hold = Hold {
        holding: AtomicBool::new(false),
        release: AtomicBool::new(false),
        timed_out: AtomicBool::new(false),
    };
    // SAFETY: `hold` outlives the job: we wait for it below before returning.
    let job = unsafe { run_on(CpuSet::single(held), hold_masked, &hold) };
    let start = now_ns();
    while !hold.holding.load(Ordering::Acquire) {
        if now_ns() - start > JOB_TIMEOUT_NS {
            fail!("cpu{held} never started holding");
        }
        core::hint::spin_loop();
    }
    let ran = AtomicU32::new(0);
    let result = STOP.stop_machine(
        &|_| {
            ran.fetch_add(1, Ordering::Relaxed);
            Ok(())
        },
        online,
        StopOptions {
            arrival_timeout_ns: HOLD_TIMEOUT_NS,
            ..OPTIONS
        },
    );
    hold.release.store(true, Ordering::Release);
    if let Err(pending) = job.wait(JOB_TIMEOUT_NS) {
        fail!("held CPUs {pending} never finished");
    }
    check!(
        !hold.timed_out.load(Ordering::Relaxed),
        "the held CPU was never released"
    );
    match result {
        Err(StopError::Timeout { missing, .. }) if missing == CpuSet::single(held) => {}
        other => fail!("expected a timeout naming cpu{held}, got {other:?}"),
    }
    check!(
        ran.load(Ordering::Relaxed) == 0,
        "the function ran despite the timeout"
    );
    // The CPUs that did arrive unmask on their own once they see the abort.
    let unmask_deadline = now_ns() + JOB_TIMEOUT_NS;
    while !STOP.in_masked_window().is_empty() && now_ns() < unmask_deadline {
        core::hint::spin_loop();
    }
    check!(
        STOP.in_masked_window().is_empty(),
        "CPUs {} still masked {} ms after the abort",
        STOP.in_masked_window(),
        JOB_TIMEOUT_NS / 1_000_000
    );
    let (again, ran) = stop_recording(online, OPTIONS);
    check!(
        again.is_ok(),
        "the next stop_machine failed: {}",
        again.unwrap_err()
    );
    check!(ran == online, "the next stop_machine ran on {ran}");
    Verdict::Pass(msg!("timed out naming cpu{held}, then recovered"))
}

fn spare_patch(from: u16, to: u16) -> Patch<Insn> {
    Patch::new(
        pm_spare_site as *const () as usize,
        returning(from),
        returning(to),
    )
}

fn patch_quiescence(_: &Params) -> Verdict {
    let site = pm_spare_site as *const () as usize;
    let before = KERNEL_TEXT.read_insn(site, SITE_LEN);
    check!(
        before == returning(0x5a5a),
        "spare site holds {before:#010x}"
    );
    let report = match patch_machine(&STOP, &KERNEL_TEXT, &[spare_patch(0x5a5a, 0x1234)], OPTIONS) {
        Ok(report) => report,
        Err(err) => fail!("patch_machine: {err}"),
    };
    let after = KERNEL_TEXT.read_insn(site, SITE_LEN);
    let restored = patch_machine(&STOP, &KERNEL_TEXT, &[spare_patch(0x1234, 0x5a5a)], OPTIONS);
    check!(
        after == returning(0x1234),
        "site reads {after:#010x} after the patch"
    );
    check!(restored.is_ok(), "patching back: {}", restored.unwrap_err());
    let online = online_cpus();
    check!(
        report.cpus == online,
        "rendezvous had {} of {online}",
        report.cpus
    );
    check!(
        report.quiescence.masked == online,
        "only {} reported DAIF fully masked at quiescence",
        report.quiescence.masked
    );
    check!(
        report.first_write_stamp > report.quiescence.last_ack_stamp,
        "first write (stamp {}) before the last quiescence ack (stamp {})",
        report.first_write_stamp,
        report.quiescence.last_ack_stamp
    );
    check!(
        !platform::alias_mapped(),
        "the writable alias is still mapped"
    );
    Verdict::Pass(msg!(
        "write stamp {} after last ack {}",
        report.first_write_stamp,
        report.quiescence.last_ack_stamp
    ))
}

/// The SGI the masking test sends from inside the patch window.
const PROBE_SGI: u32 = platform::TEST_IPIS[0];

/// Probe interrupts sent from inside the patch window, and where they landed.
static PROBES_LANDED: [AtomicU32; crate::MAX_CPUS] = [const { AtomicU32::new(0) }; crate::MAX_CPUS];
static PROBES_IN_WINDOW: AtomicCpuSet = AtomicCpuSet::new();
static PROBE_SENT: AtomicBool = AtomicBool::new(false);

fn probe_handler(cpu: usize) {
    if STOP.in_masked_window().contains(cpu) {
        PROBES_IN_WINDOW.insert(cpu, Ordering::Relaxed);
    }
    PROBES_LANDED[cpu].fetch_add(1, Ordering::Release);
}

/// A write probe: runs inside the patch window, so it lives in `.text.nopatch`.
#[unsafe(link_section = ".text.nopatch")]
fn send_probes_from_window() {
    if !PROBE_SENT.swap(true, Ordering::Relaxed) {
        platform::send_ipi(PROBE_SGI, online_cpus());
    }
}

fn patch_masking(_: &Params) -> Verdict {
    let online = online_cpus();
    platform::set_ipi_handler(PROBE_SGI, probe_handler);
    let before: [u32; crate::MAX_CPUS] =
        core::array::from_fn(|cpu| PROBES_LANDED[cpu].load(Ordering::Acquire));
    PROBES_IN_WINDOW.clear(Ordering::Relaxed);
    PROBE_SENT.store(false, Ordering::Relaxed);
    set_write_probe(Some(send_probes_from_window));
    let result = patch_machine(&STOP, &KERNEL_TEXT, &[spare_patch(0x5a5a, 0x4321)], OPTIONS);
    set_write_probe(None);
    let restored = patch_machine(&STOP, &KERNEL_TEXT, &[spare_patch(0x4321, 0x5a5a)], OPTIONS);
    check!(result.is_ok(), "patch_machine: {}", result.unwrap_err());
    check!(restored.is_ok(), "patching back: {}", restored.unwrap_err());
    check!(
        PROBE_SENT.load(Ordering::Relaxed),
        "the probe was never sent from the window"
    );
    let start = now_ns();
    let missing = loop {
        let missing = online
            .iter()
            .filter(|&cpu| PROBES_LANDED[cpu].load(Ordering::Acquire) == before[cpu])
            .fold(CpuSet::EMPTY, CpuSet::with);
        if missing.is_empty() || now_ns() - start > 1_000_000_000 {
            break missing;
        }
        core::hint::spin_loop();
    };
    check!(
        missing.is_empty(),
        "probe interrupts never landed on {missing}"
    );
    let inside = PROBES_IN_WINDOW.load(Ordering::Relaxed);
    check!(
        inside.is_empty(),
        "probe interrupts landed inside the masked window on {inside}"
    );
    Verdict::Pass(msg!("{} probes, all after the window", online.len()))
}

fn text_checksum() -> u64 {
    // FNV-1a over every text byte: any change anywhere shows.
    KERNEL_TEXT
        .text_range()
        .fold(0xcbf2_9ce4_8422_2325, |hash, addr| {
            // SAFETY: kernel text is mapped readable for its whole range.
            let byte = unsafe { core::ptr::read_volatile(addr as *const u8) };
            (hash ^ u64::from(byte)).wrapping_mul(0x100_0000_01b3)
        })
}

fn bad_batches(_: &Params) -> Verdict {
    static NOT_TEXT: u32 = 0;
    let site = pm_spare_site as *const () as usize;
    let good = spare_patch(0x5a5a, 0x7777);
    let protected = platform::protected_ranges()[0].start;
    let checksum = text_checksum();
    type Expect = fn(&PatchError<Insn>) -> bool;
    // Where sites must be aligned, a misaligned one; elsewhere (x86) one that overlaps
    // the first entry.
    let (second, second_name, second_expect): (Patch<Insn>, &str, Expect) = if Insn::ALIGN > 1 {
        (Patch::new(site + 2, returning(0), NOP), "misaligned", |e| {
            matches!(e, PatchError::Misaligned { index: 1, .. })
        })
    } else {
        (
            Patch::new(site + 1, returning(0), NOP),
            "overlapping",
            |e| {
                matches!(
                    e,
                    PatchError::Duplicate {
                        index: 1,
                        first: 0,
                        ..
                    }
                )
            },
        )
    };
    let cases: [(&str, &[Patch<Insn>], Expect); 6] = [
        ("empty", &[], |e| matches!(e, PatchError::EmptyBatch)),
        (second_name, &[good, second], second_expect),
        (
            "outside text",
            &[
                good,
                Patch::new(&NOT_TEXT as *const u32 as usize, returning(0), NOP),
            ],
            |e| matches!(e, PatchError::OutsideText { index: 1, .. }),
        ),
        (
            "rendezvous code",
            &[good, Patch::new(protected, returning(0), NOP)],
            |e| matches!(e, PatchError::Protected { index: 1, .. }),
        ),
        (
            "old mismatch",
            &[
                good,
                Patch::new(pm_torture_a as *const () as usize, returning(0x9999), NOP),
            ],
            |e| matches!(e, PatchError::OldMismatch { index: 1, .. }),
        ),
        ("duplicate", &[good, good], |e| {
            matches!(
                e,
                PatchError::Duplicate {
                    index: 1,
                    first: 0,
                    ..
                }
            )
        }),
    ];
    for (what, batch, expected) in cases {
        match patch_machine(&STOP, &KERNEL_TEXT, batch, OPTIONS) {
            Err(err) if expected(&err) => {}
            other => fail!("{what}: got {other:?}"),
        }
    }
    match patch_nosync(STOP.arch(), &KERNEL_TEXT, &[good]) {
        Err(PatchError::NotCmodxSafe { .. }) => {}
        other => fail!("nosync movz->movz: got {other:?}"),
    }
    check!(
        text_checksum() == checksum,
        "kernel text changed after rejected batches"
    );
    Verdict::Pass(msg!("7 kinds rejected, text unchanged"))
}

struct Callers {
    stop: AtomicBool,
    /// Patches completed: bumped by the patcher after each patch returns.
    epoch: AtomicU64,
    calls: AtomicU64,
    /// Per CPU: calls it has made (the torture waits for each caller after each patch).
    calls_by: [AtomicU64; crate::MAX_CPUS],
    bad: AtomicU32,
    /// First bad observation: cpu, value, epoch before, epoch after.
    first_bad: spin::Mutex<Option<(usize, u64, u64, u64)>>,
}

impl Callers {
    const fn new() -> Callers {
        Callers {
            stop: AtomicBool::new(false),
            epoch: AtomicU64::new(0),
            calls: AtomicU64::new(0),
            calls_by: [const { AtomicU64::new(0) }; crate::MAX_CPUS],
            bad: AtomicU32::new(0),
            first_bad: spin::Mutex::new(None),
        }
    }

    /// `cpu` finished one call: counts it for `wait_for_callers` and, every
    /// [`CALLS_PER_YIELD`] calls, hands the emulator's thread on.
    fn count_call(&self, cpu: usize) {
        // Release pairs with the patcher's Acquire in `wait_for_callers`.
        self.calls_by[cpu].fetch_add(1, Ordering::Release);
        if self
            .calls
            .fetch_add(1, Ordering::Relaxed)
            .is_multiple_of(CALLS_PER_YIELD)
        {
            platform::cpu_yield();
        }
    }

    fn record_bad(&self, cpu: usize, value: u64, before: u64, after: u64) {
        if self.bad.fetch_add(1, Ordering::Relaxed) == 0 {
            *self.first_bad.lock() = Some((cpu, value, before, after));
        }
    }
}

const TORTURE_A: [u16; 3] = [0x1111, 0x1112, 0x1113];
const TORTURE_B: [u16; 3] = [0x2221, 0x2222, 0x2223];

/// Whether `value` may be returned by a call made between seeing `before` and `after`
/// patches complete: the code of patch `before`, any later one, or the one in flight.
fn allowed(values: &[u16; 3], value: u64, before: u64, after: u64) -> bool {
    (before..=(after + 1).min(before + 2)).any(|k| u64::from(values[(k % 3) as usize]) == value)
}

/// Calls both torture functions once and records any value that no patch completed
/// or in flight could have produced.
fn call_torture_targets(cpu: usize, callers: &Callers) {
    let before = callers.epoch.load(Ordering::Acquire);
    // SAFETY: plain assembly functions returning a value in x0.
    let (a, b) = unsafe { (pm_torture_a(), pm_torture_b()) };
    let after = callers.epoch.load(Ordering::Acquire);
    if !allowed(&TORTURE_A, a, before, after) {
        callers.record_bad(cpu, a, before, after);
    }
    if !allowed(&TORTURE_B, b, before, after) {
        callers.record_bad(cpu, b, before, after);
    }
}

fn torture_caller(cpu: usize, callers: &Callers) {
    while !callers.stop.load(Ordering::Acquire) {
        call_torture_targets(cpu, callers);
        callers.count_call(cpu);
    }
}

/// The verdict on the callers of a live-flip test, `None` if they did their part:
/// `starved` is `(None, cpus)` when they never started, `(Some(flip), cpus)` when they
/// went idle after that flip, `None` when every caller kept calling; `waited` is how
/// their jobs ended once told to stop.
fn callers_verdict(
    starved: Option<(Option<impl core::fmt::Display>, CpuSet)>,
    waited: Result<(), CpuSet>,
) -> Option<Verdict> {
    let ms = CALLER_WAIT_NS / 1_000_000;
    if let Some((flip, idle)) = starved {
        return Some(Verdict::Fail(match flip {
            None => msg!("CPUs {idle} never called the site within {ms} ms of being started"),
            Some(k) => msg!("after flip {k}, CPUs {idle} made no call within {ms} ms"),
        }));
    }
    let pending = waited.err()?;
    Some(Verdict::Fail(msg!("callers on {pending} did not stop")))
}

/// Waits (bounded) until every CPU in `cpus` has made a call since `since` was taken;
/// returns the CPUs that did not.
fn wait_for_callers(callers: &Callers, cpus: CpuSet, since: &[u64; crate::MAX_CPUS]) -> CpuSet {
    let start = now_ns();
    loop {
        // Acquire pairs with the Release in `Callers::count_call`.
        let idle = cpus
            .iter()
            .filter(|&cpu| callers.calls_by[cpu].load(Ordering::Acquire) == since[cpu])
            .fold(CpuSet::EMPTY, CpuSet::with);
        if idle.is_empty() || now_ns() - start > CALLER_WAIT_NS {
            return idle;
        }
        platform::cpu_yield();
    }
}

/// How long the torture waits for every caller to call again after a patch.
const CALLER_WAIT_NS: u64 = 1_000_000_000;

/// Calls a caller makes between two [`platform::cpu_yield`]s.
const CALLS_PER_YIELD: u64 = 64;

fn torture_batch(from: usize, to: usize) -> [Patch<Insn>; 2] {
    [
        Patch::new(
            pm_torture_a as *const () as usize,
            returning(TORTURE_A[from]),
            returning(TORTURE_A[to]),
        ),
        Patch::new(
            pm_torture_b as *const () as usize,
            returning(TORTURE_B[from]),
            returning(TORTURE_B[to]),
        ),
    ]
}

fn torture(params: &Params) -> Verdict {
    let callers = Callers::new();
    let others = others();
    // SAFETY: `callers` outlives the jobs: we wait for them before returning.
    let jobs = unsafe { run_on(others, torture_caller, &callers) };
    let mut patch_ns = 0;
    let mut failure = None;
    let mut starved = None;
    for k in 0..u64::from(params.flips) {
        let (from, to) = ((k % 3) as usize, ((k + 1) % 3) as usize);
        let start = now_ns();
        if let Err(err) = patch_machine(&STOP, &KERNEL_TEXT, &torture_batch(from, to), OPTIONS) {
            failure = Some((k, err));
            break;
        }
        patch_ns += now_ns() - start;
        callers.epoch.store(k + 1, Ordering::Release);
        // Every caller calls the patched functions between every two patches: without
        // this wait the patcher can keep the others inside back-to-back rendezvous, and
        // the test would check nothing.
        let since: [u64; crate::MAX_CPUS] =
            core::array::from_fn(|cpu| callers.calls_by[cpu].load(Ordering::Relaxed));
        let idle = wait_for_callers(&callers, others, &since);
        if !idle.is_empty() {
            starved = Some((k, idle));
            break;
        }
        // SAFETY: as above.
        let mine = unsafe { pm_torture_a() };
        if mine != u64::from(TORTURE_A[to]) {
            callers.record_bad(current_cpu(), mine, k + 1, k + 1);
        }
    }
    callers.stop.store(true, Ordering::Release);
    let waited = jobs.wait(JOB_TIMEOUT_NS);
    // Put the text back as it was, whatever happened.
    let current = (callers.epoch.load(Ordering::Relaxed) % 3) as usize;
    if current != 0 {
        let _ = patch_machine(&STOP, &KERNEL_TEXT, &torture_batch(current, 0), OPTIONS);
    }
    if let Some((k, err)) = failure {
        fail!("flip {k}: {err}");
    }
    if let Some(verdict) = callers_verdict(starved.map(|(k, idle)| (Some(k), idle)), waited) {
        return verdict;
    }
    if let Some((cpu, value, before, after)) = *callers.first_bad.lock() {
        fail!(
            "{} bad calls; first: cpu{cpu} got {value:#x} between patches {before} and {after}",
            callers.bad.load(Ordering::Relaxed)
        );
    }
    let flips = u64::from(params.flips).max(1);
    Verdict::Pass(msg!(
        "{} flips, {} calls on {} CPUs, {} us per patch_machine",
        params.flips,
        callers.calls.load(Ordering::Relaxed),
        others.len(),
        patch_ns / flips / 1000
    ))
}

fn nosync_caller(cpu: usize, callers: &Callers) {
    while !callers.stop.load(Ordering::Acquire) {
        // SAFETY: a plain assembly function returning 1 or 2 in x0.
        let value = unsafe { pm_nosync_target() };
        if value != 1 && value != 2 {
            callers.record_bad(cpu, value, 0, 0);
        }
        callers.count_call(cpu);
    }
}

/// Live patching without a stop: a pair `patch_nosync` may not change is refused with
/// the text unchanged; then `platform::patch_live` flips the site between the NOP and
/// `platform::live_branch` (arm64: B through `patch_nosync`; x86: NOP5 <-> JMP rel32
/// through the INT3 protocol, `text_poke_bp`) `nosync_flips` times while every other
/// CPU calls it. Every call must return 1 (NOP) or 2 (branch taken); the patching CPU
/// must see the new one at once; every other CPU must call the site between every two
/// flips (as in `torture`: a flipping CPU that never lets the callers run, as under
/// single-threaded TCG, would otherwise check nothing).
fn nosync(params: &Params) -> Verdict {
    let site = pm_nosync_target as *const () as usize;
    // A pair that is not CMODX-safe is refused and changes nothing.
    match patch_nosync(
        STOP.arch(),
        &KERNEL_TEXT,
        &[Patch::new(site, NOP, returning(9))],
    ) {
        Err(PatchError::NotCmodxSafe { .. }) => {}
        other => fail!("NOP -> MOVZ without a stop: got {other:?}"),
    }
    check!(
        KERNEL_TEXT.read_insn(site, SITE_LEN) == NOP,
        "a refused nosync patch changed the text"
    );
    let branch = match platform::live_branch(site, pm_nosync_branch_dest as *const () as usize) {
        Ok(branch) => branch,
        Err(why) => return Verdict::Skip(msg!("NOP -> MOVZ refused; {why}")),
    };
    let callers = Callers::new();
    let others = others();
    // SAFETY: `callers` outlives the jobs: we wait for them before returning.
    let jobs = unsafe { run_on(others, nosync_caller, &callers) };
    let mut failure = None;
    let mut starved = None;
    // Every caller has started before the first flip.
    let idle = wait_for_callers(&callers, others, &[0; crate::MAX_CPUS]);
    if !idle.is_empty() {
        starved = Some((None, idle));
    }
    let calls_before = callers.calls.load(Ordering::Relaxed);
    let flips = if starved.is_none() {
        params.nosync_flips
    } else {
        0
    };
    for k in 0..flips {
        let patch = if k % 2 == 0 {
            Patch::new(site, NOP, branch)
        } else {
            Patch::new(site, branch, NOP)
        };
        if let Err(err) = platform::patch_live(&[patch]) {
            failure = Some((k, err));
            break;
        }
        // SAFETY: as above.
        let mine = unsafe { pm_nosync_target() };
        let expected = if k % 2 == 0 { 2 } else { 1 };
        if mine != expected {
            callers.record_bad(current_cpu(), mine, u64::from(k), u64::from(k));
        }
        // Every caller runs the site as this flip left it before the next flip.
        let since: [u64; crate::MAX_CPUS] =
            core::array::from_fn(|cpu| callers.calls_by[cpu].load(Ordering::Relaxed));
        let idle = wait_for_callers(&callers, others, &since);
        if !idle.is_empty() {
            starved = Some((Some(k), idle));
            break;
        }
    }
    let concurrent = callers.calls.load(Ordering::Relaxed) - calls_before;
    callers.stop.store(true, Ordering::Release);
    let waited = jobs.wait(JOB_TIMEOUT_NS);
    if KERNEL_TEXT.read_insn(site, SITE_LEN) != NOP {
        let _ = platform::patch_live(&[Patch::new(site, branch, NOP)]);
    }
    if let Some((k, err)) = failure {
        fail!("flip {k}: {err}");
    }
    if let Some(verdict) = callers_verdict(starved, waited) {
        return verdict;
    }
    if let Some((cpu, value, k, _)) = *callers.first_bad.lock() {
        fail!("cpu{cpu} got {value} (flip {k})");
    }
    Verdict::Pass(msg!(
        "{} flips without a stop, {concurrent} concurrent calls on {} CPUs",
        params.nosync_flips,
        others.len()
    ))
}
