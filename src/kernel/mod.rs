//! The kernel proper: once the platform has brought every CPU up, the boot CPU runs the
//! self-tests and reports them as KTAP while the secondaries wait for jobs.

pub mod platform;
mod selftest;
mod smp;

pub use smp::secondary_main;

use crate::kprint;
use crate::ktap::{Ktap, Outcome};
use core::fmt;
use selftest::{Params, TESTS, Verdict};

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
    params: Params,
}

/// A kernel argument that was not understood.
struct BadArg<'a> {
    word: &'a str,
    why: &'static str,
}

/// Parses `tests=a,b flips=N nosync_flips=N`; anything else is an error naming it.
fn parse_bootargs(bootargs: &str) -> Result<Selection, BadArg<'_>> {
    let mut selection = Selection {
        tests: default_tests(),
        params: Params::DEFAULT,
    };
    for word in bootargs.split_ascii_whitespace() {
        let (key, value) = word.split_once('=').unwrap_or((word, ""));
        match key {
            "tests" if value != "all" => {
                selection.tests = 0;
                for name in value.split(',') {
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
            "tests" => {}
            // Read by the platform at boot (arch::aarch64::nmi_mode).
            "pseudo_nmi" if matches!(value, "on" | "off") => {}
            "pseudo_nmi" => {
                return Err(BadArg {
                    word,
                    why: "pseudo_nmi= takes on or off",
                });
            }
            // Consumed by the platform before the kernel runs (see arch::aarch64::selftest).
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

/// The tests `tests=all` (and no `tests=`) selects: all but the benchmarks.
fn default_tests() -> u64 {
    TESTS
        .iter()
        .enumerate()
        .filter(|(_, test)| test.by_default)
        .fold(0, |mask, (index, _)| mask | 1 << index)
}

/// Entry of the boot CPU once every CPU is online and interrupts are enabled.
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
                "known: tests=all|{} (bench: only when named) flips=N nosync_flips=N pseudo_nmi=on|off",
                TestNames
            ));
            ktap.result("bootargs", Outcome::Fail, bad.why);
            ktap.finish();
            platform::exit(false);
        }
    };
    let planned = selection.tests.count_ones() as usize;
    let mut ktap = Ktap::start(Console, planned);
    ktap.diag(format_args!(
        "patch-machine: {} CPUs, bootargs \"{}\"",
        platform::cpu_count(),
        bootargs
    ));
    for (index, test) in TESTS.iter().enumerate() {
        if selection.tests & (1 << index) == 0 {
            continue;
        }
        let (outcome, note) = match (test.run)(&selection.params) {
            Verdict::Pass(note) => (Outcome::Pass, note),
            Verdict::Fail(why) => (Outcome::Fail, why),
            Verdict::Skip(why) => (Outcome::Skip, why),
        };
        ktap.result(test.name, outcome, note.as_str());
    }
    platform::exit(ktap.finish())
}

/// Displays the known test names, comma-separated.
struct TestNames;

impl fmt::Display for TestNames {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, test) in TESTS.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            f.write_str(test.name)?;
        }
        Ok(())
    }
}
