//! The kernel proper: once the platform has brought every CPU up, the boot CPU runs the
//! self-tests and reports them as KTAP while the secondaries wait for jobs.

pub mod hotplug;
pub mod platform;
mod selftest;
mod smp;

pub use smp::secondary_main;

use crate::bootargs::{self, BadArg, Known, Numeric, PLATFORM_SUITE};
use crate::harness::{self, Verdict};
use crate::kprint;
use crate::ktap::Ktap;
use core::fmt::{self, Write};
use selftest::{Params, TESTS};

/// Writes KTAP to the console.
struct Console;

impl fmt::Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        kprint!("{s}");
        Ok(())
    }
}

/// What the command line asked for.
type Selection = bootargs::Selection<'static, Params>;

const _: () = assert!(TESTS.len() <= 64 && platform::SELFTESTS.len() <= 64);

/// The numeric kernel arguments and their ranges: a count of 0 would pass having tested
/// nothing, and a count past the maximum is a typo that would run into any timeout.
const NUMERIC: &[Numeric<Params>] = &[
    Numeric {
        key: "flips",
        min: 1,
        max: MAX_FLIPS,
        set: |p, n| p.flips = n as u32,
    },
    Numeric {
        key: "nosync_flips",
        min: 1,
        max: MAX_FLIPS,
        set: |p, n| p.nosync_flips = n as u32,
    },
    Numeric {
        key: "static_key_flips",
        min: 1,
        max: MAX_FLIPS,
        set: |p, n| p.static_key_flips = n as u32,
    },
    Numeric {
        key: "kprobe_cycles",
        min: 1,
        max: MAX_FLIPS,
        set: |p, n| p.kprobe_cycles = n as u32,
    },
    Numeric {
        key: "user_spins",
        min: 1,
        max: MAX_FLIPS,
        set: |p, n| p.user_spins = n as u32,
    },
    Numeric {
        key: "isolation_rounds",
        min: 1,
        max: MAX_ISOLATION_ROUNDS,
        set: |p, n| p.isolation_rounds = n as u32,
    },
    Numeric {
        key: "hotplug_cycles",
        min: 1,
        max: MAX_HOTPLUG_CYCLES,
        set: |p, n| p.hotplug_cycles = n as u32,
    },
    // Read by the platform at boot; checked here so that a typo is not silently no CPU.
    Numeric {
        key: "platform_offline_cpu",
        min: 1,
        max: crate::MAX_CPUS as u64 - 1,
        set: |_, _| {},
    },
];

/// The largest `hotplug_cycles=`: each cycle takes a CPU down and up (x86: a 10 ms
/// INIT delay each).
const MAX_HOTPLUG_CYCLES: u64 = 1_000_000;

/// The largest `flips=`, `nosync_flips=` and `static_key_flips=` (fits `Params`' `u32`).
const MAX_FLIPS: u64 = 10_000_000;
/// The largest `isolation_rounds=`: each round's version is a 16-bit immediate.
const MAX_ISOLATION_ROUNDS: u64 = 20_000;

/// Parses the command line against the kernel's tests, the platform's checks and fault
/// modes and this architecture's NMI mechanisms and CPU features ([`bootargs::parse`]).
fn parse_bootargs(bootargs: &'static str) -> Result<Selection, BadArg<'static>> {
    let test = |name: &str| TESTS.iter().position(|t| t.name == name);
    let platform_test = |name: &str| platform::SELFTESTS.iter().position(|t| t.name == name);
    let nmi_mechanism = |name: &str| {
        platform::NmiMechanism::ALL
            .iter()
            .position(|m| m.name() == name)
    };
    let feature = |name: &str| {
        platform::FEATURE_NAMES
            .iter()
            .find(|(_, n)| *n == name)
            .map(|(bit, _)| *bit)
    };
    let known = Known {
        test: &test,
        default_tests: default_tests(),
        platform_test: &platform_test,
        platform_tests: platform::SELFTESTS.len(),
        fault_modes: platform::FAULT_MODES,
        nmi_mechanism: &nmi_mechanism,
        feature: &feature,
    };
    bootargs::parse(bootargs, &known, NUMERIC, Params::DEFAULT)
}

/// The tests `tests=all` (and no `tests=`) selects: all but the benchmarks.
fn default_tests() -> u64 {
    TESTS
        .iter()
        .enumerate()
        .filter(|(_, test)| test.by_default)
        .fold(0, |mask, (index, _)| mask | 1 << index)
}

/// Entry of the boot CPU once every CPU is online and interrupts are enabled. The KTAP
/// header and plan come first, before anything that can bring the kernel down, so that
/// a crash reads as a crashed test.
pub fn primary_main() -> ! {
    let bootargs = platform::bootargs();
    if let Some(too_long) = platform::bootargs_too_long() {
        refuse_run(bootargs, "bootargs", format_args!("{too_long}"));
    }
    // CPUs the firmware lists but the kernel cannot drive would never be stopped:
    // whatever `tests=` says, the run fails.
    let listed = platform::firmware_cpu_count();
    if listed > crate::MAX_CPUS {
        refuse_run(
            bootargs,
            "cpus_online",
            format_args!(
                "the {} lists {listed} CPUs, out of range (max {} = MAX_CPUS): {} would never be stopped",
                platform::CPU_TABLE,
                crate::MAX_CPUS,
                listed - crate::MAX_CPUS
            ),
        );
    }
    // The platform properties the design rests on (docs/porting.md, "Platform
    // assumptions"): a run on a platform that breaks one is refused, naming it, rather
    // than left to misbehave.
    for name in platform::ASSUMPTIONS {
        if let Some(check) = platform::SELFTESTS.iter().find(|t| t.name == name)
            && let Verdict::Fail(why) = (check.run)()
        {
            refuse_run(bootargs, name, format_args!("{}", why.as_str()));
        }
    }
    let mut selection = match parse_bootargs(bootargs) {
        Ok(selection) => selection,
        Err(bad) => refuse_run(bootargs, bad.word, format_args!("{bad}")),
    };
    selection.params.expect_nmi = selection.expect_nmi.map(|i| platform::NmiMechanism::ALL[i]);
    selection.params.expect_features = selection.expect_features;
    // Isolated CPUs run user code for the isolation tests, while the boot CPU patches.
    let isolated = selection.isolated;
    let allowed = platform::online_cpus().without(platform::current_cpu());
    if !isolated.is_subset(allowed) {
        let word = word_of(bootargs, "isolcpus");
        let word = if word == "isolcpus" {
            word_of(bootargs, "nohz_full")
        } else {
            word
        };
        refuse_run(
            bootargs,
            word,
            format_args!(
                "'{word}': CPUs {} are not online secondaries (online {}; the boot CPU patches)",
                isolated.minus(allowed),
                platform::online_cpus()
            ),
        );
    }
    platform::contexts().set_isolated(isolated);
    selection.params.isolated = isolated;
    let planned = match selection.fault {
        Some(_) => 1,
        None => selection.tests.count_ones() as usize + usize::from(selection.platform != 0),
    };
    let mut ktap = Ktap::start(Console, planned);
    ktap.diag(format_args!(
        "patch-machine: {} CPUs, bootargs \"{}\"",
        platform::cpu_count(),
        bootargs
    ));
    // Every CPU is online: the runtime alternatives go in now, through patch_machine
    // (the `alternatives` test checks the result).
    match platform::ALTERNATIVES.apply_runtime() {
        Ok(written) => ktap.diag(format_args!(
            "alternatives: runtime table applied through patch_machine, {written} chunks written"
        )),
        Err(err) => ktap.diag(format_args!(
            "alternatives: runtime table NOT applied: {err}"
        )),
    }
    // A jump site in code that is never patched disables every key: say so at boot.
    if let Err(err) = platform::STATIC_KEYS.check() {
        ktap.diag(format_args!("static keys refused: {err}"));
    }
    if let Some(mode) = selection.fault {
        harness::run(&mut ktap, word_of(bootargs, "platform_selftest"), || {
            platform::provoke(mode);
            Verdict::Fail(msg!("'{mode}' did not bring the kernel down"))
        });
        platform::exit(false);
    }
    if selection.platform != 0 {
        harness::run_suite(&mut ktap, PLATFORM_SUITE, platform::SELFTESTS, |index| {
            selection.platform & (1 << index) != 0
        });
    }
    for (index, test) in TESTS.iter().enumerate() {
        if selection.tests & (1 << index) != 0 {
            harness::run(&mut ktap, test.name, || (test.run)(&selection.params));
        }
    }
    platform::exit(ktap.finish())
}

/// Reports a refused run as one failing KTAP result named after what was refused, the
/// bad word of the command line (`not ok 1 flips=0 # 'flips=0': out of range (min 1,
/// max 10000000)`) or `cpus_online`, with what is known as `#` lines, and ends the run.
fn refuse_run(bootargs: &str, word: &str, why: fmt::Arguments<'_>) -> ! {
    let mut ktap = Ktap::start(Console, 1);
    ktap.diag(format_args!("refused: {why} (bootargs \"{bootargs}\")"));
    ktap.diag(format_args!(
        "known: tests=all|{},{PLATFORM_SUITE},{PLATFORM_SUITE}.NAME (bench, {PLATFORM_SUITE}: only when named) \
         flips=1..{MAX_FLIPS} nosync_flips=1..{MAX_FLIPS} static_key_flips=1..{MAX_FLIPS} hotplug_cycles=1..{MAX_HOTPLUG_CYCLES} user_spins=1..{MAX_FLIPS} isolation_rounds=1..{MAX_ISOLATION_ROUNDS} isolcpus=LIST nohz_full=LIST platform_offline_cpu=1..{} pseudo_nmi=on|off expect_nmi={} expect_features=none|{} platform_selftest={}",
        Names(TESTS.iter().map(|t| t.name), ","),
        crate::MAX_CPUS - 1,
        Names(platform::NmiMechanism::ALL.iter().map(|m| m.name()), "|"),
        Names(platform::FEATURE_NAMES.iter().map(|(_, n)| *n), ","),
        Names(platform::FAULT_MODES.iter().copied(), "|"),
    ));
    ktap.diag(format_args!(
        "platform tests: {}",
        Names(platform::SELFTESTS.iter().map(|t| t.name), ",")
    ));
    // A name is one word: a word with `#` would open a KTAP directive.
    let name = if word.contains('#') { "bootargs" } else { word };
    harness::run(&mut ktap, name, || Verdict::Fail(msg!("{why}")));
    ktap.finish();
    platform::exit(false);
}

/// The last word of `bootargs` that is `key=...` (the test name of a provoked fault).
fn word_of(bootargs: &'static str, key: &'static str) -> &'static str {
    bootargs
        .split_ascii_whitespace()
        .rfind(|word| word.split_once('=').is_some_and(|(k, _)| k == key))
        .unwrap_or(key)
}

/// Displays names, separated by the second field.
struct Names<I>(I, &'static str);

impl<'a, I: Iterator<Item = &'a str> + Clone> fmt::Display for Names<I> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, name) in self.0.clone().enumerate() {
            if i > 0 {
                f.write_str(self.1)?;
            }
            f.write_str(name)?;
        }
        Ok(())
    }
}
