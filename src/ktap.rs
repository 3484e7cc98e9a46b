//! KTAP output, the format of Linux's kselftest and KUnit, with KUnit-style subtest
//! suites (indented by four spaces, their verdict the parent's next result).
//!
//! ```text
//! KTAP version 1
//! 1..3
//!     KTAP version 1
//!     # Subtest: platform
//!     1..2
//!     ok 1 timer
//!     ok 2 nmi_to_one_cpu # SKIP needs a second CPU
//!     # Totals: pass:1 fail:0 skip:1
//! ok 1 platform
//! not ok 2 torture # cpu2 saw 0x7 after the patch returned
//! ok 3 fiq_window # SKIP no FIQ on this CPU
//! # Totals: pass:1 fail:1 skip:1
//! ```

use core::fmt::{self, Write};

/// The outcome of one test case.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The property held.
    Pass,
    /// The property did not hold.
    Fail,
    /// The test could not run here.
    Skip,
}

/// Writes one KTAP report: header and plan, one result line per test, totals.
pub struct Ktap<W: Write> {
    out: W,
    planned: usize,
    next: usize,
    pass: usize,
    fail: usize,
    skip: usize,
}

/// A writer that indents every line by one KTAP nesting level (four spaces).
pub struct Indented<'a, W: Write> {
    out: &'a mut W,
    at_line_start: bool,
}

impl<W: Write> Write for Indented<'_, W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for line in s.split_inclusive('\n') {
            if self.at_line_start {
                self.out.write_str("    ")?;
            }
            self.out.write_str(line)?;
            self.at_line_start = line.ends_with('\n');
        }
        Ok(())
    }
}

impl<W: Write> Ktap<W> {
    /// Starts a report of `planned` tests: writes the version and plan lines.
    pub fn start(mut out: W, planned: usize) -> Self {
        let _ = write!(out, "KTAP version 1\n1..{planned}\n");
        Self::planned(out, planned)
    }

    fn planned(out: W, planned: usize) -> Self {
        Ktap {
            out,
            planned,
            next: 1,
            pass: 0,
            fail: 0,
            skip: 0,
        }
    }

    /// Starts subtest suite `name` of `planned` tests, one level deeper: its header,
    /// name and plan. Once [`finish_suite`](Self::finish_suite) gave its outcome, report
    /// that as this report's next result, under the same `name`.
    pub fn subtest(&mut self, name: &str, planned: usize) -> Ktap<Indented<'_, W>> {
        let mut out = Indented {
            out: &mut self.out,
            at_line_start: true,
        };
        let _ = write!(out, "KTAP version 1\n# Subtest: {name}\n1..{planned}\n");
        Ktap::planned(out, planned)
    }

    /// Records the next test's result; a non-empty `reason` follows `#` (for a skip:
    /// `# SKIP reason`).
    pub fn result(&mut self, name: &str, outcome: Outcome, reason: &str) {
        let number = self.next;
        self.next += 1;
        let _ = match outcome {
            Outcome::Pass => {
                self.pass += 1;
                if !reason.is_empty() {
                    writeln!(self.out, "ok {number} {name} # {reason}")
                } else {
                    writeln!(self.out, "ok {number} {name}")
                }
            }
            Outcome::Fail => {
                self.fail += 1;
                writeln!(self.out, "not ok {number} {name} # {reason}")
            }
            Outcome::Skip => {
                self.skip += 1;
                writeln!(self.out, "ok {number} {name} # SKIP {reason}")
            }
        };
    }

    /// Results reported so far.
    pub fn ran(&self) -> usize {
        self.next - 1
    }

    /// Failures reported so far.
    pub fn failed(&self) -> usize {
        self.fail
    }

    /// A diagnostic line: `# ...`.
    pub fn diag(&mut self, line: fmt::Arguments<'_>) {
        let _ = writeln!(self.out, "# {line}");
    }

    /// Writes the totals line and returns whether every planned test ran and none failed.
    pub fn finish(self) -> bool {
        self.finish_suite() != Outcome::Fail
    }

    /// Writes the totals line and returns the outcome of the whole report: a failure if
    /// a test failed or not every planned test ran, a skip if every test skipped.
    pub fn finish_suite(mut self) -> Outcome {
        let ran = self.next - 1;
        if ran != self.planned {
            let _ = writeln!(self.out, "# planned {} tests but ran {ran}", self.planned);
        }
        let _ = writeln!(
            self.out,
            "# Totals: pass:{} fail:{} skip:{}",
            self.pass, self.fail, self.skip
        );
        if self.fail != 0 || ran != self.planned {
            Outcome::Fail
        } else if ran > 0 && self.skip == ran {
            Outcome::Skip
        } else {
            Outcome::Pass
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_like_kselftest() {
        let mut out = String::new();
        let mut ktap = Ktap::start(&mut out, 3);
        ktap.result("a", Outcome::Pass, "");
        ktap.diag(format_args!("note {}", 7));
        ktap.result("b", Outcome::Fail, "cpu2 late");
        ktap.result("c", Outcome::Skip, "no FEAT_NMI");
        assert!(!ktap.finish());
        assert_eq!(
            out,
            "KTAP version 1\n1..3\nok 1 a\n# note 7\nnot ok 2 b # cpu2 late\n\
             ok 3 c # SKIP no FEAT_NMI\n# Totals: pass:1 fail:1 skip:1\n"
        );
    }

    #[test]
    fn missing_results_fail_the_report() {
        let mut out = String::new();
        let mut ktap = Ktap::start(&mut out, 2);
        ktap.result("a", Outcome::Pass, "");
        assert!(!ktap.finish());
        assert!(out.contains("planned 2 tests but ran 1"));
    }

    #[test]
    fn subtests_are_indented_and_give_the_parent_result() {
        let mut out = String::new();
        let mut ktap = Ktap::start(&mut out, 2);
        let mut suite = ktap.subtest("platform", 2);
        suite.result("a", Outcome::Pass, "");
        suite.diag(format_args!("multi\nline"));
        suite.result("b", Outcome::Skip, "one CPU");
        let outcome = suite.finish_suite();
        assert_eq!(outcome, Outcome::Pass);
        ktap.result("platform", outcome, "");
        ktap.result("c", Outcome::Pass, "");
        assert!(ktap.finish());
        assert_eq!(
            out,
            "KTAP version 1\n1..2\n    KTAP version 1\n    # Subtest: platform\n    1..2\n\
             \x20   ok 1 a\n    # multi\n    line\n    ok 2 b # SKIP one CPU\n\
             \x20   # Totals: pass:1 fail:0 skip:1\nok 1 platform\nok 2 c\n\
             # Totals: pass:2 fail:0 skip:0\n"
        );
    }

    #[test]
    fn a_suite_fails_on_a_failure_or_a_missing_result_and_skips_when_all_skip() {
        let mut out = String::new();
        let mut ktap = Ktap::start(&mut out, 3);
        let mut failing = ktap.subtest("failing", 2);
        failing.result("a", Outcome::Skip, "");
        failing.result("b", Outcome::Fail, "broken");
        assert_eq!(failing.finish_suite(), Outcome::Fail);
        let mut short = ktap.subtest("short", 2);
        short.result("a", Outcome::Pass, "");
        assert_eq!(short.finish_suite(), Outcome::Fail);
        let mut skipped = ktap.subtest("skipped", 1);
        skipped.result("a", Outcome::Skip, "one CPU");
        assert_eq!(skipped.finish_suite(), Outcome::Skip);
    }
}
