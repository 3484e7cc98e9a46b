//! The kernel command line, parsed without any architecture so that the host tests it
//! (`cargo test --lib bootargs`). The kernel (`kernel::primary_main`) passes in the
//! names it knows and a table of numeric arguments with their ranges; every word it
//! does not accept comes back as a [`BadArg`] naming the word and the limit.

use crate::patch::alternatives::Features;
use crate::{CpuSet, MAX_CPUS};
use core::fmt;

/// The names the kernel accepts, and where each one is.
pub struct Known<'k> {
    /// Index of a kernel self-test by name.
    pub test: &'k dyn Fn(&str) -> Option<usize>,
    /// The tests `tests=all` (and no `tests=`) selects, bit `n` for test `n`.
    pub default_tests: u64,
    /// Index of a platform check (`tests=platform.NAME`) by name.
    pub platform_test: &'k dyn Fn(&str) -> Option<usize>,
    /// How many platform checks there are (`tests=platform` selects them all).
    pub platform_tests: usize,
    /// The fatal conditions `platform_selftest=` provokes.
    pub fault_modes: &'k [&'static str],
    /// Index of an NMI mechanism by its `expect_nmi=` spelling.
    pub nmi_mechanism: &'k dyn Fn(&str) -> Option<usize>,
    /// Bit number of a CPU feature by its `expect_features=` spelling.
    pub feature: &'k dyn Fn(&str) -> Option<u16>,
}

/// A numeric argument `key=N`, `min <= N <= max`, stored into `P` by `set`.
pub struct Numeric<P> {
    /// The word's key, before `=`.
    pub key: &'static str,
    /// The smallest count that tests something.
    pub min: u64,
    /// The largest count accepted.
    pub max: u64,
    /// Stores an accepted value.
    pub set: fn(&mut P, u64),
}

/// What the command line asked for.
#[derive(Debug, PartialEq, Eq)]
pub struct Selection<'a, P> {
    /// Bit `n` selects kernel test `n`.
    pub tests: u64,
    /// Bit `n` selects platform check `n`, run as subtest suite `platform`.
    pub platform: u64,
    /// `platform_selftest=MODE`: provoke this fatal condition instead of testing.
    pub fault: Option<&'a str>,
    /// `expect_nmi=NAME`: the index of the mechanism `nmi_mechanism` must find.
    pub expect_nmi: Option<usize>,
    /// `expect_features=none|NAME,...`: the CPU features `alternatives` must find.
    pub expect_features: Option<Features>,
    /// `isolcpus=LIST` and `nohz_full=LIST` (Linux's spelling, e.g. `1-3,5`; the union of
    /// both): CPUs whose patching synchronisation is deferred to their next kernel entry
    /// while they run user code.
    pub isolated: CpuSet,
    /// The numeric arguments, defaults where not given.
    pub params: P,
}

/// The name of the suite of the platform's own checks in `tests=` and in KTAP.
pub const PLATFORM_SUITE: &str = "platform";

/// Why a word was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Problem<'a> {
    /// A key no one reads.
    UnknownArgument,
    /// `tests=` names no such test (this one).
    UnknownTest(&'a str),
    /// `tests=platform.NAME` names no such platform check (this one).
    UnknownPlatformTest(&'a str),
    /// `tests=` with an empty name (`tests=`, `tests=a,,b`).
    EmptyTestName,
    /// A numeric argument whose value has a non-digit (or is empty).
    NotANumber,
    /// A numeric argument outside its range (a value past `u64` included).
    OutOfRange {
        /// Smallest accepted.
        min: u64,
        /// Largest accepted.
        max: u64,
    },
    /// `pseudo_nmi=` other than on or off.
    NotOnOff,
    /// `platform_selftest=` other than a fault mode.
    UnknownFaultMode,
    /// `expect_nmi=` other than a mechanism of this architecture.
    UnknownNmiMechanism,
    /// `expect_features=` naming no feature of this architecture (this one).
    UnknownFeature(&'a str),
    /// `isolcpus=`/`nohz_full=` that is not a CPU list (`1-3,5`).
    NotACpuList,
    /// A CPU number in a list at or past [`MAX_CPUS`].
    CpuOutOfRange(u64),
}

impl fmt::Display for Problem<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UnknownArgument => f.write_str("unknown kernel argument"),
            Self::UnknownTest(name) => write!(f, "unknown test '{name}'"),
            Self::UnknownPlatformTest(name) => write!(f, "unknown platform test '{name}'"),
            Self::EmptyTestName => f.write_str("empty test name in tests="),
            Self::NotANumber => f.write_str("takes a decimal number"),
            Self::OutOfRange { min, max } => write!(f, "out of range (min {min}, max {max})"),
            Self::NotOnOff => f.write_str("takes on or off"),
            Self::UnknownFaultMode => {
                f.write_str("takes a fault mode (the platform's checks are tests=platform)")
            }
            Self::UnknownNmiMechanism => f.write_str("takes an NMI mechanism of this architecture"),
            Self::UnknownFeature(name) => write!(
                f,
                "unknown CPU feature '{name}' (takes none or feature names of this architecture)"
            ),
            Self::NotACpuList => f.write_str("takes a CPU list (e.g. 1-3,5)"),
            Self::CpuOutOfRange(cpu) => write!(
                f,
                "CPU {cpu} out of range (max {} = MAX_CPUS - 1)",
                MAX_CPUS - 1
            ),
        }
    }
}

/// A kernel argument that was refused: the whole word and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BadArg<'a> {
    /// The word as given (`flips=0`).
    pub word: &'a str,
    /// Why.
    pub problem: Problem<'a>,
}

impl fmt::Display for BadArg<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "'{}': {}", self.word, self.problem)
    }
}

/// A command line longer than the kernel's copy of it: refused whole rather than cut
/// (a cut `flips=300000` would read as `flips=30000`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TooLong {
    /// Bytes the firmware passed (at least this many, if it had no end in reach).
    pub len: usize,
    /// Bytes the kernel keeps.
    pub capacity: usize,
}

impl fmt::Display for TooLong {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the command line is {} bytes, out of range (max {}): refused rather than cut",
            self.len, self.capacity
        )
    }
}

/// `value` as a number in `min..=max`: digits only, and a number too large for `u64`
/// is out of range, not "not a number".
pub fn number(value: &str, min: u64, max: u64) -> Result<u64, Problem<'static>> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Problem::NotANumber);
    }
    match value.parse::<u64>() {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(Problem::OutOfRange { min, max }),
    }
}

/// `value` as a CPU list: comma-separated CPUs and inclusive ranges `a-b` (`a <= b`),
/// each below [`MAX_CPUS`]; not empty.
pub fn cpu_list(value: &str) -> Result<CpuSet, Problem<'static>> {
    let mut set = CpuSet::EMPTY;
    for item in value.split(',') {
        let (first, last) = item.split_once('-').unwrap_or((item, item));
        let cpu = |text: &str| match number(text, 0, MAX_CPUS as u64 - 1) {
            Ok(n) => Ok(n as usize),
            Err(Problem::OutOfRange { .. }) => Err(Problem::CpuOutOfRange(
                text.parse::<u64>().unwrap_or(u64::MAX),
            )),
            Err(_) => Err(Problem::NotACpuList),
        };
        let (first, last) = (cpu(first)?, cpu(last)?);
        if first > last {
            return Err(Problem::NotACpuList);
        }
        for c in first..=last {
            set = set.with(c);
        }
    }
    Ok(set)
}

/// Parses `tests=a,b KEY=N pseudo_nmi=on|off expect_nmi=NAME platform_selftest=MODE`
/// and the `platform_...=` words the platform reads itself; anything else is refused,
/// naming it. In `tests=`, `all` is the default set, `platform` the platform's checks,
/// `platform.NAME` one of them.
pub fn parse<'a, P>(
    bootargs: &'a str,
    known: &Known<'_>,
    numeric: &[Numeric<P>],
    params: P,
) -> Result<Selection<'a, P>, BadArg<'a>> {
    let mut selection = Selection {
        tests: known.default_tests,
        platform: 0,
        fault: None,
        expect_nmi: None,
        expect_features: None,
        isolated: CpuSet::EMPTY,
        params,
    };
    for word in bootargs.split_ascii_whitespace() {
        let (key, value) = word.split_once('=').unwrap_or((word, ""));
        let bad = |problem| BadArg { word, problem };
        if let Some(arg) = numeric.iter().find(|arg| arg.key == key) {
            let n = number(value, arg.min, arg.max).map_err(bad)?;
            (arg.set)(&mut selection.params, n);
            continue;
        }
        match key {
            "tests" => {
                selection.tests = 0;
                for name in value.split(',') {
                    if name.is_empty() {
                        return Err(bad(Problem::EmptyTestName));
                    } else if name == "all" {
                        selection.tests |= known.default_tests;
                    } else if name == PLATFORM_SUITE {
                        selection.platform =
                            (0..known.platform_tests).fold(0, |mask, i| mask | 1 << i);
                    } else if let Some(case) = name.strip_prefix("platform.") {
                        let index = (known.platform_test)(case)
                            .ok_or(bad(Problem::UnknownPlatformTest(name)))?;
                        selection.platform |= 1 << index;
                    } else {
                        let index = (known.test)(name).ok_or(bad(Problem::UnknownTest(name)))?;
                        selection.tests |= 1 << index;
                    }
                }
            }
            // Read by the platform at boot (arch::aarch64::nmi_mode).
            "pseudo_nmi" if matches!(value, "on" | "off") => {}
            "pseudo_nmi" => return Err(bad(Problem::NotOnOff)),
            "platform_selftest" => match known.fault_modes.iter().find(|m| **m == value) {
                Some(_) => selection.fault = Some(value),
                None => return Err(bad(Problem::UnknownFaultMode)),
            },
            // Consumed by the platform before the kernel runs (`platform_offline_cpu=`...).
            platform if platform.starts_with("platform_") => {}
            "expect_nmi" => {
                selection.expect_nmi =
                    Some((known.nmi_mechanism)(value).ok_or(bad(Problem::UnknownNmiMechanism))?)
            }
            "expect_features" if value == "none" => {
                selection.expect_features = Some(Features::NONE)
            }
            "expect_features" => {
                let mut set = Features::NONE;
                for name in value.split(',') {
                    let bit = (known.feature)(name).ok_or(bad(Problem::UnknownFeature(name)))?;
                    set = set.with(bit);
                }
                selection.expect_features = Some(set);
            }
            "isolcpus" | "nohz_full" => {
                selection.isolated = selection.isolated.or(cpu_list(value).map_err(bad)?);
            }
            _ => return Err(bad(Problem::UnknownArgument)),
        }
    }
    Ok(selection)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Eq)]
    struct Counts {
        flips: u64,
        nosync_flips: u64,
    }

    const DEFAULTS: Counts = Counts {
        flips: 10_000,
        nosync_flips: 2_000,
    };

    const NUMERIC: &[Numeric<Counts>] = &[
        Numeric {
            key: "flips",
            min: 1,
            max: 10_000_000,
            set: |p, n| p.flips = n,
        },
        Numeric {
            key: "nosync_flips",
            min: 1,
            max: 10_000_000,
            set: |p, n| p.nosync_flips = n,
        },
    ];

    const TESTS: &[&str] = &["cpus_online", "torture", "bench"];
    const PLATFORM: &[&str] = &["timer", "cpus_online"];

    fn parse_with(bootargs: &str) -> Result<Selection<'_, Counts>, BadArg<'_>> {
        let test = |name: &str| TESTS.iter().position(|t| *t == name);
        let platform_test = |name: &str| PLATFORM.iter().position(|t| *t == name);
        let nmi_mechanism = |name: &str| ["x2apic", "xapic"].iter().position(|m| *m == name);
        let feature = |name: &str| {
            ["lse", "idc"]
                .iter()
                .position(|m| *m == name)
                .map(|i| i as u16)
        };
        let known = Known {
            test: &test,
            default_tests: 0b011,
            platform_test: &platform_test,
            platform_tests: PLATFORM.len(),
            fault_modes: &["text_write"],
            nmi_mechanism: &nmi_mechanism,
            feature: &feature,
        };
        parse(bootargs, &known, NUMERIC, DEFAULTS)
    }

    fn refused(bootargs: &str) -> String {
        match parse_with(bootargs) {
            Ok(selection) => panic!("{bootargs:?} accepted: {selection:?}"),
            Err(bad) => bad.to_string(),
        }
    }

    #[test]
    fn good_arguments_are_taken() {
        let s = parse_with("tests=torture,platform.timer flips=300000 nosync_flips=1 expect_nmi=xapic pseudo_nmi=off platform_offline_cpu=3").unwrap();
        assert_eq!(s.tests, 0b010);
        assert_eq!(s.platform, 0b01);
        assert_eq!(s.expect_nmi, Some(1));
        let f = parse_with("expect_features=idc,lse")
            .unwrap()
            .expect_features;
        assert_eq!(f, Some(Features::NONE.with(0).with(1)));
        let none = parse_with("expect_features=none").unwrap().expect_features;
        assert_eq!(none, Some(Features::NONE));
        assert_eq!(
            s.params,
            Counts {
                flips: 300_000,
                nosync_flips: 1
            }
        );
        assert_eq!(parse_with("").unwrap().params, DEFAULTS);
        assert_eq!(parse_with("tests=all,platform").unwrap().platform, 0b11);
        assert_eq!(
            parse_with("platform_selftest=text_write").unwrap().fault,
            Some("text_write")
        );
        let isolated = parse_with("isolcpus=1-3,5 nohz_full=7").unwrap().isolated;
        assert_eq!(
            isolated,
            CpuSet::EMPTY.with(1).with(2).with(3).with(5).with(7)
        );
        assert_eq!(parse_with("").unwrap().isolated, CpuSet::EMPTY);
    }

    /// Every bad word is refused, naming the word and, for numbers, the range.
    #[test]
    fn bad_arguments_are_refused_by_name() {
        let table = [
            ("flips=0", "'flips=0': out of range (min 1, max 10000000)"),
            (
                "nosync_flips=0",
                "'nosync_flips=0': out of range (min 1, max 10000000)",
            ),
            (
                "flips=99999999999999999999",
                "'flips=99999999999999999999': out of range (min 1, max 10000000)",
            ),
            (
                "flips=10000001",
                "'flips=10000001': out of range (min 1, max 10000000)",
            ),
            ("flips=", "'flips=': takes a decimal number"),
            ("flips", "'flips': takes a decimal number"),
            ("flips=-1", "'flips=-1': takes a decimal number"),
            ("flips=+5", "'flips=+5': takes a decimal number"),
            ("flips=1e6", "'flips=1e6': takes a decimal number"),
            (
                "tests=torture flips=2x",
                "'flips=2x': takes a decimal number",
            ),
            (
                "tests=torture,nope",
                "'tests=torture,nope': unknown test 'nope'",
            ),
            (
                "tests=platform.nope",
                "'tests=platform.nope': unknown platform test 'platform.nope'",
            ),
            ("tests=", "'tests=': empty test name in tests="),
            (
                "tests=torture,",
                "'tests=torture,': empty test name in tests=",
            ),
            ("pseudo_nmi=maybe", "'pseudo_nmi=maybe': takes on or off"),
            (
                "platform_selftest=oops",
                "'platform_selftest=oops': takes a fault mode (the platform's checks are tests=platform)",
            ),
            (
                "expect_nmi=feat_nmi",
                "'expect_nmi=feat_nmi': takes an NMI mechanism of this architecture",
            ),
            (
                "expect_features=lse,avx",
                "'expect_features=lse,avx': unknown CPU feature 'avx' (takes none or feature names of this architecture)",
            ),
            ("flip=5", "'flip=5': unknown kernel argument"),
            ("isolcpus=", "'isolcpus=': takes a CPU list (e.g. 1-3,5)"),
            (
                "isolcpus=3-1",
                "'isolcpus=3-1': takes a CPU list (e.g. 1-3,5)",
            ),
            (
                "isolcpus=1,,2",
                "'isolcpus=1,,2': takes a CPU list (e.g. 1-3,5)",
            ),
            (
                "nohz_full=a",
                "'nohz_full=a': takes a CPU list (e.g. 1-3,5)",
            ),
            (
                "isolcpus=1-512",
                "'isolcpus=1-512': CPU 512 out of range (max 511 = MAX_CPUS - 1)",
            ),
        ];
        for (bootargs, said) in table {
            assert_eq!(refused(bootargs), said, "bootargs {bootargs:?}");
        }
    }

    #[test]
    fn numbers_name_their_range() {
        assert_eq!(number("7", 1, 9), Ok(7));
        assert_eq!(number("007", 1, 9), Ok(7));
        assert_eq!(
            number("18446744073709551616", 1, u64::MAX),
            Err(Problem::OutOfRange {
                min: 1,
                max: u64::MAX
            })
        );
    }

    #[test]
    fn too_long_names_both_lengths() {
        let t = TooLong {
            len: 1030,
            capacity: 1024,
        };
        assert_eq!(
            t.to_string(),
            "the command line is 1030 bytes, out of range (max 1024): refused rather than cut"
        );
    }
}
