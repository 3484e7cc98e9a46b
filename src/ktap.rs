//! KTAP output, the format of Linux's kselftest and KUnit.
//!
//! ```text
//! KTAP version 1
//! 1..3
//! ok 1 cpus_online
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

impl<W: Write> Ktap<W> {
    /// Starts a report of `planned` tests: writes the version and plan lines.
    pub fn start(mut out: W, planned: usize) -> Self {
        let _ = write!(out, "KTAP version 1\n1..{planned}\n");
        Ktap {
            out,
            planned,
            next: 1,
            pass: 0,
            fail: 0,
            skip: 0,
        }
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

    /// A diagnostic line: `# ...`.
    pub fn diag(&mut self, line: fmt::Arguments<'_>) {
        let _ = writeln!(self.out, "# {line}");
    }

    /// Writes the totals line and returns whether every planned test ran and none failed.
    pub fn finish(mut self) -> bool {
        let ran = self.next - 1;
        if ran != self.planned {
            let _ = writeln!(self.out, "# planned {} tests but ran {ran}", self.planned);
        }
        let _ = writeln!(
            self.out,
            "# Totals: pass:{} fail:{} skip:{}",
            self.pass, self.fail, self.skip
        );
        self.fail == 0 && ran == self.planned
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
}
