//! The self-test harness of the kernel suite and of both platforms' own checks: a
//! test's [`Verdict`] and its [`Msg`], the `msg!`, `fail!` and `check!` macros (in scope
//! crate-wide: `lib.rs` declares this module `#[macro_use]`, before the modules with
//! tests), the [`Test`] table entry, and [`run`] / [`run_suite`], which report through
//! [`Ktap`].
//!
//! Before each test the runner prints `# NAME: start`: if the test brings the kernel
//! down, the log names the test that was running (KTAP then reads it as crashed).

use crate::ktap::{Ktap, Outcome};
use core::fmt::{self, Write};

/// A [`Msg`] from `format!`-style arguments (`core::fmt::Write` must be in scope).
macro_rules! msg {
    ($($arg:tt)*) => {{
        let mut m = $crate::harness::Msg::new();
        let _ = write!(m, $($arg)*);
        m
    }};
}

/// Returns [`Verdict::Fail`] with a `msg!` from the enclosing test.
#[cfg_attr(
    not(target_os = "none"),
    allow(unused_macros, reason = "the host build has no kernel tests")
)]
macro_rules! fail {
    ($($arg:tt)*) => { return $crate::harness::Verdict::Fail(msg!($($arg)*)) };
}

/// Fails the enclosing test with the message unless the condition holds.
#[cfg_attr(
    not(target_os = "none"),
    allow(unused_macros, reason = "the host build has no kernel tests")
)]
macro_rules! check {
    ($cond:expr, $($arg:tt)*) => { if !$cond { fail!($($arg)*) } };
}

/// A failure or skip message, kept in a fixed buffer (the kernel has no heap); longer
/// text is cut.
pub struct Msg {
    buf: [u8; 200],
    len: usize,
}

impl Msg {
    /// An empty message.
    pub const fn new() -> Msg {
        Msg {
            buf: [0; 200],
            len: 0,
        }
    }

    /// The message text.
    pub fn as_str(&self) -> &str {
        match core::str::from_utf8(&self.buf[..self.len]) {
            Ok(text) => text,
            // Cut inside a character: keep the whole ones.
            Err(e) => core::str::from_utf8(&self.buf[..e.valid_up_to()]).unwrap_or(""),
        }
    }
}

impl Default for Msg {
    fn default() -> Self {
        Msg::new()
    }
}

impl Write for Msg {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for &byte in s.as_bytes() {
            if self.len < self.buf.len() {
                self.buf[self.len] = byte;
                self.len += 1;
            }
        }
        Ok(())
    }
}

/// The result of one test.
pub enum Verdict {
    /// Passed, with an optional note.
    Pass(Msg),
    /// Failed: what was seen.
    Fail(Msg),
    /// Could not run here: why.
    Skip(Msg),
}

impl Verdict {
    /// The KTAP outcome and the note that goes with it.
    pub fn into_parts(self) -> (Outcome, Msg) {
        match self {
            Verdict::Pass(note) => (Outcome::Pass, note),
            Verdict::Fail(why) => (Outcome::Fail, why),
            Verdict::Skip(why) => (Outcome::Skip, why),
        }
    }
}

/// A check written as `Result`: `Err` says what was seen.
impl From<Result<(), &str>> for Verdict {
    fn from(result: Result<(), &str>) -> Verdict {
        match result {
            Ok(()) => Verdict::Pass(Msg::new()),
            Err(why) => Verdict::Fail(msg!("{why}")),
        }
    }
}

/// One entry of a test table: the name KTAP prints (and `tests=` accepts) and the body.
pub struct Test<Body = fn() -> Verdict> {
    /// The name printed in KTAP and accepted by `tests=`.
    pub name: &'static str,
    /// The body.
    pub run: Body,
    /// Whether the table's default selection runs it (the benchmarks run only when
    /// named).
    pub by_default: bool,
}

impl<Body> Test<Body> {
    /// A test the default selection runs.
    pub const fn new(name: &'static str, run: Body) -> Self {
        Test {
            name,
            run,
            by_default: true,
        }
    }
}

/// Runs one test as the next result of `ktap`: announces it (so that a crash names
/// it), runs `body` and reports its verdict.
pub fn run<W: Write>(ktap: &mut Ktap<W>, name: &str, body: impl FnOnce() -> Verdict) -> Outcome {
    ktap.diag(format_args!("{name}: start"));
    let (outcome, note) = body().into_parts();
    ktap.result(name, outcome, note.as_str());
    outcome
}

/// Runs the tests of `tests` that `selected` picks (by index) as subtest suite `name`,
/// then reports the suite's outcome as the next result of `ktap`.
pub fn run_suite<W: Write>(
    ktap: &mut Ktap<W>,
    name: &str,
    tests: &[Test],
    selected: impl Fn(usize) -> bool,
) -> Outcome {
    let planned = (0..tests.len()).filter(|&i| selected(i)).count();
    let mut suite = ktap.subtest(name, planned);
    for (index, test) in tests.iter().enumerate() {
        if selected(index) {
            run(&mut suite, test.name, test.run);
        }
    }
    let (failed, ran) = (suite.failed(), suite.ran());
    let outcome = suite.finish_suite();
    let note = match outcome {
        Outcome::Pass => msg!(""),
        Outcome::Skip => msg!("every test skipped"),
        Outcome::Fail if ran < planned => msg!("{failed} failed, ran {ran} of {planned}"),
        Outcome::Fail => msg!("{failed} of {planned} failed"),
    };
    ktap.result(name, outcome, note.as_str());
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    fn passes() -> Verdict {
        Verdict::Pass(msg!("{} CPUs", 4))
    }

    fn skips() -> Verdict {
        Verdict::Skip(msg!("needs a second CPU"))
    }

    fn fails() -> Verdict {
        check!(1 + 1 == 3, "1 + 1 is {}", 1 + 1);
        Verdict::Pass(Msg::new())
    }

    const TESTS: [Test; 3] = [
        Test::new("passes", passes),
        Test::new("skips", skips),
        Test::new("fails", fails),
    ];

    #[test]
    fn a_suite_reports_each_test_and_then_its_verdict() {
        let mut out = String::new();
        let mut ktap = Ktap::start(&mut out, 2);
        let suite = run_suite(&mut ktap, "platform", &TESTS, |i| i != 2);
        assert_eq!(suite, Outcome::Pass);
        run(&mut ktap, "fails", fails);
        assert!(!ktap.finish());
        assert_eq!(
            out,
            "KTAP version 1\n1..2\n    KTAP version 1\n    # Subtest: platform\n    1..2\n\
             \x20   # passes: start\n    ok 1 passes # 4 CPUs\n\
             \x20   # skips: start\n    ok 2 skips # SKIP needs a second CPU\n\
             \x20   # Totals: pass:1 fail:0 skip:1\nok 1 platform\n\
             # fails: start\nnot ok 2 fails # 1 + 1 is 2\n# Totals: pass:1 fail:1 skip:0\n"
        );
    }

    #[test]
    fn a_failing_test_fails_its_suite() {
        let mut out = String::new();
        let mut ktap = Ktap::start(&mut out, 1);
        assert_eq!(
            run_suite(&mut ktap, "platform", &TESTS, |_| true),
            Outcome::Fail
        );
        assert!(!ktap.finish());
        assert!(out.contains("    not ok 3 fails # 1 + 1 is 2\n"));
        assert!(
            out.ends_with("not ok 1 platform # 1 of 3 failed\n# Totals: pass:0 fail:1 skip:0\n")
        );
    }

    #[test]
    fn results_become_verdicts_and_long_messages_are_cut() {
        assert!(matches!(Verdict::from(Ok(())), Verdict::Pass(_)));
        let Verdict::Fail(why) = Verdict::from(Err("late")) else {
            panic!("Err must fail");
        };
        assert_eq!(why.as_str(), "late");
        let long = msg!("{}", "é".repeat(150));
        assert_eq!(long.as_str().len(), 200);
    }
}
