//! The README and `./qemu.sh --help` say what the code does: every kernel self-test of
//! `TESTS` has a row in the README's self-test table, every option `qemu.sh` parses is in
//! its `--help`, and the help's exit statuses are the ones the script's header states.

use std::path::Path;
use std::process::Command;

fn read(relative: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// The `name: "..."` entries of `TESTS` in src/kernel/selftest/mod.rs.
fn kernel_tests(source: &str) -> Vec<String> {
    let start = source
        .find("pub const TESTS: &[Test] = &[")
        .expect("src/kernel/selftest/mod.rs has no `pub const TESTS`");
    let body = &source[start..];
    let body = &body[..body.find("\n];").expect("TESTS ends with `];`")];
    body.lines()
        .filter_map(|l| l.trim().strip_prefix("name: \""))
        .filter_map(|l| l.split('"').next())
        .map(String::from)
        .collect()
}

#[test]
fn the_self_test_table_lists_every_test() {
    let readme = read("README.md");
    let tests = kernel_tests(&read("src/kernel/selftest/mod.rs"));
    assert!(tests.len() > 10, "found only {tests:?} in TESTS");
    let missing: Vec<&String> = tests
        .iter()
        .filter(|t| !readme.contains(&format!("\n| `{t}` |")))
        .collect();
    assert!(
        missing.is_empty(),
        "README.md's self-test table has no row for {missing:?} (tests of src/kernel/selftest/mod.rs TESTS)"
    );
}

#[test]
fn the_help_names_every_option_and_the_exit_statuses() {
    let out = Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("qemu.sh"))
        .arg("--help")
        .output()
        .expect("run ./qemu.sh --help");
    assert!(out.status.success(), "./qemu.sh --help: {}", out.status);
    let help = String::from_utf8_lossy(&out.stdout);
    let script = read("qemu.sh");
    // The options of parse_args' `case` patterns.
    let parse = &script[script
        .find("parse_args() {")
        .expect("qemu.sh has parse_args")..];
    let mut options: Vec<&str> = parse
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("--") || l.starts_with("-h"))
        .filter_map(|l| l.split_once(')').map(|(pattern, _)| pattern))
        .flat_map(|pattern| pattern.split(" | "))
        .map(|o| o.trim_end_matches("=*"))
        .filter(|o| o.len() > 2)
        .collect();
    options.sort_unstable();
    options.dedup();
    assert!(options.len() >= 8, "found only {options:?} in parse_args");
    let missing: Vec<&&str> = options
        .iter()
        .filter(|o| {
            // An option's own line: two spaces, then its spellings ("-h, --help").
            !help.lines().any(|l| {
                l.starts_with("  -")
                    && l[2..]
                        .split(", ")
                        .any(|part| part.split_whitespace().next() == Some(**o))
            })
        })
        .collect();
    assert!(
        missing.is_empty(),
        "./qemu.sh --help does not list {missing:?}"
    );
    for status in [
        "0 = the kernel booted",
        "1 = anything went wrong",
        "2 = usage error",
    ] {
        assert!(script.contains(status), "qemu.sh's header lost {status:?}");
    }
    for said in [
        "Exit status: 0 pass; 1 build, boot or test failure",
        "2 usage or setup error",
    ] {
        assert!(
            help.contains(said),
            "./qemu.sh --help lacks {said:?}:\n{help}"
        );
    }
}
