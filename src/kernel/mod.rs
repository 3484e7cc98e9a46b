//! The kernel proper: once the platform has brought every CPU up, the boot CPU runs the
//! self-tests and reports them as KTAP while the secondaries wait for jobs.

pub mod platform;
mod selftest;
mod smp;

pub use smp::secondary_main;

use crate::harness::{self, Verdict};
use crate::kprint;
use crate::ktap::{Ktap, Outcome};
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
struct Selection {
    /// Bit `n` selects `TESTS[n]`.
    tests: u64,
    /// Bit `n` selects `platform::SELFTESTS[n]`, run as subtest suite `platform`.
    platform: u64,
    /// `platform_selftest=MODE`: provoke this fatal condition instead of testing.
    fault: Option<&'static str>,
    params: Params,
}

/// The name of the suite of the platform's own checks in `tests=` and in KTAP.
const PLATFORM_SUITE: &str = "platform";

const _: () = assert!(TESTS.len() <= 64 && platform::SELFTESTS.len() <= 64);

/// A kernel argument that was not understood.
struct BadArg<'a> {
    word: &'a str,
    why: &'static str,
}

/// Parses `tests=a,b flips=N nosync_flips=N static_key_flips=N expect_nmi=NAME platform_selftest=MODE`; anything else is
/// an error naming it. In `tests=`, `all` is the default set, `platform` the platform's
/// own checks, `platform.NAME` one of them.
fn parse_bootargs(bootargs: &'static str) -> Result<Selection, BadArg<'static>> {
    let mut selection = Selection {
        tests: default_tests(),
        platform: 0,
        fault: None,
        params: Params::DEFAULT,
    };
    for word in bootargs.split_ascii_whitespace() {
        let (key, value) = word.split_once('=').unwrap_or((word, ""));
        match key {
            "tests" => {
                selection.tests = 0;
                for name in value.split(',') {
                    if name == "all" {
                        selection.tests |= default_tests();
                    } else if name == PLATFORM_SUITE {
                        selection.platform =
                            (0..platform::SELFTESTS.len()).fold(0, |mask, i| mask | 1 << i);
                    } else if let Some(case) = name.strip_prefix("platform.") {
                        match platform::SELFTESTS.iter().position(|t| t.name == case) {
                            Some(index) => selection.platform |= 1 << index,
                            None => {
                                return Err(BadArg {
                                    word: name,
                                    why: "unknown platform test",
                                });
                            }
                        }
                    } else {
                        match TESTS.iter().position(|t| t.name == name) {
                            Some(index) => selection.tests |= 1 << index,
                            None => {
                                return Err(BadArg {
                                    word: name,
                                    why: "unknown test",
                                });
                            }
                        }
                    }
                }
            }
            // Read by the platform at boot (arch::aarch64::nmi_mode).
            "pseudo_nmi" if matches!(value, "on" | "off") => {}
            "pseudo_nmi" => {
                return Err(BadArg {
                    word,
                    why: "pseudo_nmi= takes on or off",
                });
            }
            "platform_selftest" if platform::FAULT_MODES.contains(&value) => {
                selection.fault = Some(value);
            }
            "platform_selftest" => {
                return Err(BadArg {
                    word,
                    why: "platform_selftest= takes a fault mode (the platform's checks are tests=platform)",
                });
            }
            // Consumed by the platform before the kernel runs (`platform_offline_cpu=`...).
            platform if platform.starts_with("platform_") => {}
            "flips" => {
                selection.params.flips = value.parse().map_err(|_| BadArg {
                    word,
                    why: "flips= takes a number",
                })?
            }
            "nosync_flips" => {
                selection.params.nosync_flips = value.parse().map_err(|_| BadArg {
                    word,
                    why: "nosync_flips= takes a number",
                })?
            }
            "expect_features" => {
                selection.params.expect_features = Some(parse_features(value).ok_or(BadArg {
                    word,
                    why: "expect_features= takes none or feature names of this architecture",
                })?)
            }
            "static_key_flips" => {
                selection.params.static_key_flips = value.parse().map_err(|_| BadArg {
                    word,
                    why: "static_key_flips= takes a number",
                })?
            }
            "expect_nmi" => {
                selection.params.expect_nmi = Some(
                    platform::NmiMechanism::ALL
                        .into_iter()
                        .find(|m| m.name() == value)
                        .ok_or(BadArg {
                            word,
                            why: "expect_nmi= takes an NMI mechanism of this architecture",
                        })?,
                )
            }
            _ => {
                return Err(BadArg {
                    word,
                    why: "unknown kernel argument",
                });
            }
        }
    }
    Ok(selection)
}

/// `none`, or comma-separated names of `platform::FEATURE_NAMES`.
fn parse_features(value: &str) -> Option<crate::patch::alternatives::Features> {
    if value == "none" {
        return Some(crate::patch::alternatives::Features::NONE);
    }
    value
        .split(',')
        .try_fold(crate::patch::alternatives::Features::NONE, |set, name| {
            platform::FEATURE_NAMES
                .iter()
                .find(|(_, n)| *n == name)
                .map(|(bit, _)| set.with(*bit))
        })
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
    let selection = match parse_bootargs(bootargs) {
        Ok(selection) => selection,
        Err(bad) => {
            let mut ktap = Ktap::start(Console, 1);
            ktap.diag(format_args!(
                "bootargs \"{}\": {}: '{}'",
                bootargs, bad.why, bad.word
            ));
            ktap.diag(format_args!(
                "known: tests=all|{},{PLATFORM_SUITE},{PLATFORM_SUITE}.NAME (bench, {PLATFORM_SUITE}: only when named) \
                 flips=N nosync_flips=N static_key_flips=N pseudo_nmi=on|off expect_nmi=MECHANISM expect_features=none|NAME,.. platform_selftest={}",
                Names(TESTS.iter().map(|t| t.name), ","),
                Names(platform::FAULT_MODES.iter().copied(), "|"),
            ));
            ktap.diag(format_args!(
                "platform tests: {}",
                Names(platform::SELFTESTS.iter().map(|t| t.name), ",")
            ));
            ktap.result("bootargs", Outcome::Fail, bad.why);
            ktap.finish();
            platform::exit(false);
        }
    };
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
    match platform::apply_alternatives() {
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
