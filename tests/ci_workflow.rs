//! Keeps `.github/workflows/ci.yml` in step with the tests it runs: its QEMU job's
//! `cell` list must be exactly the cells (`#[test]` functions) of
//! `tests/qemu_matrix.rs`, every file in `tests/` must be run by some job, and
//! every job must install what the tests it runs need (QEMU, the aarch64
//! binutils, the bare-metal Rust targets: read from the tests' code).
//! Host-only and textual: no YAML parser, no dependencies.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

const WORKFLOW: &str = ".github/workflows/ci.yml";
const MATRIX: &str = "tests/qemu_matrix.rs";

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(relative: &str) -> String {
    let path = root().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// The names of the `#[test]` functions of a Rust source file, in order.
fn test_functions(source: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut after_test_attribute = false;
    for line in source.lines().map(str::trim) {
        if line == "#[test]" {
            after_test_attribute = true;
        } else if after_test_attribute && let Some(rest) = line.strip_prefix("fn ") {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            names.push(name);
            after_test_attribute = false;
        }
    }
    names
}

/// The names given to `Cell::new("...")` in `tests/qemu_matrix.rs`.
fn cell_names(source: &str) -> Vec<String> {
    source
        .split("Cell::new(\"")
        .skip(1)
        .filter_map(|rest| rest.split_once('"').map(|(name, _)| name.to_string()))
        .collect()
}

/// The items of the block list under the first `cell:` key that follows a
/// `matrix:` key, with `(line number, item)`; `None` without such a list.
fn workflow_cells(yaml: &str) -> Option<Vec<(usize, String)>> {
    let lines: Vec<&str> = yaml.lines().collect();
    let matrix = lines.iter().position(|l| l.trim() == "matrix:")?;
    let key = matrix
        + 1
        + lines[matrix + 1..]
            .iter()
            .position(|l| l.trim() == "cell:")?;
    let key_indent = lines[key].len() - lines[key].trim_start().len();
    let mut cells = Vec::new();
    for (i, line) in lines.iter().enumerate().skip(key + 1) {
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let indent = line.len() - line.trim_start().len();
        let Some(item) = trimmed.strip_prefix("- ") else {
            break;
        };
        if indent < key_indent {
            break;
        }
        let item = item.split(" #").next().unwrap_or(item).trim();
        let item = item.trim_matches(|c| c == '"' || c == '\'');
        cells.push((i + 1, item.to_string()));
    }
    Some(cells)
}

fn describe(names: &BTreeSet<&str>) -> String {
    names.iter().copied().collect::<Vec<_>>().join(", ")
}

/// Compares the workflow's `cell` list with the cells of `tests/qemu_matrix.rs`;
/// the errors, each saying what to change.
fn cell_list_errors(yaml: &str, matrix_source: &str) -> Vec<String> {
    let mut errors = Vec::new();
    let tests = test_functions(matrix_source);
    if tests.is_empty() {
        errors.push(format!("{MATRIX}: no #[test] function found"));
    }
    let Some(listed) = workflow_cells(yaml) else {
        errors.push(format!(
            "{WORKFLOW}: no `cell:` block list under a `matrix:` key (the qemu job's \
             strategy.matrix.cell, one `- name` per line)"
        ));
        return errors;
    };

    let mut seen = BTreeSet::new();
    for (line, name) in &listed {
        if !seen.insert(name.as_str()) {
            errors.push(format!("{WORKFLOW}:{line}: cell {name} listed twice"));
        }
    }
    let in_workflow: BTreeSet<&str> = listed.iter().map(|(_, n)| n.as_str()).collect();
    let in_matrix: BTreeSet<&str> = tests.iter().map(String::as_str).collect();
    let missing: BTreeSet<&str> = in_matrix.difference(&in_workflow).copied().collect();
    let extra: BTreeSet<&str> = in_workflow.difference(&in_matrix).copied().collect();
    if !missing.is_empty() {
        errors.push(format!(
            "{WORKFLOW}: the qemu job's matrix lacks cell(s) of {MATRIX}: {} \
             (add each as `- name` under `cell:`)",
            describe(&missing)
        ));
    }
    if !extra.is_empty() {
        errors.push(format!(
            "{WORKFLOW}: the qemu job's matrix lists cell(s) that {MATRIX} does not have: {} \
             (`cargo test --test qemu_matrix -- --list` lists the cells)",
            describe(&extra)
        ));
    }

    // Each cell's log file and messages carry the name given to Cell::new: it must
    // be the test's own name.
    let named: BTreeSet<String> = cell_names(matrix_source).into_iter().collect();
    for test in &tests {
        if !named.contains(test) {
            errors.push(format!(
                "{MATRIX}: #[test] fn {test} builds no Cell::new(\"{test}\", ...): a cell's \
                 name must be its test's name"
            ));
        }
    }

    for needed in [
        "--exact ${{ matrix.cell }}",
        "name: qemu (${{ matrix.cell }})",
    ] {
        if !yaml.contains(needed) {
            errors.push(format!("{WORKFLOW}: the qemu job lacks `{needed}`"));
        }
    }
    errors
}

/// The loop over `tests/*.rs` of the host tests step, and the names it leaves
/// out (its `case` line `a | b) ;;`); `None` without the loop.
fn host_test_exclusions(yaml: &str) -> Option<Vec<String>> {
    let mut lines = yaml.lines().map(str::trim);
    lines.find(|l| l.starts_with("for f in tests/*.rs"))?;
    let excluded = lines
        .take_while(|l| *l != "done")
        .find(|l| l.ends_with(") ;;") && !l.starts_with("*)"))
        .map_or(Vec::new(), |l| {
            l.trim_end_matches(") ;;")
                .split('|')
                .map(|n| n.trim().to_string())
                .collect()
        });
    Some(excluded)
}

/// The stems of the `tests/*.rs` files that no job runs: those the host tests'
/// loop leaves out (all of them without the loop) and no `--test NAME` of a
/// command names (step names and comments do not count).
fn unrun_test_files(yaml: &str, files: &[String]) -> Vec<String> {
    let excluded = host_test_exclusions(yaml);
    let run: BTreeSet<&str> = yaml
        .lines()
        .map(str::trim)
        .filter(|l| {
            let l = l.strip_prefix("- ").unwrap_or(l);
            !l.starts_with("name:") && !l.starts_with('#')
        })
        .flat_map(|l| l.split("--test ").skip(1))
        .filter_map(|rest| rest.split_whitespace().next())
        .collect();
    files
        .iter()
        .filter(|f| excluded.as_ref().is_none_or(|ex| ex.contains(f)))
        .filter(|f| !run.contains(f.as_str()))
        .cloned()
        .collect()
}

/// What a test's code naming a program or target needs installed: (the name
/// it uses, the Debian/Ubuntu package or Rust target that provides it).
const PACKAGE_NEEDS: &[(&str, &str)] = &[
    ("aarch64-linux-gnu-", "binutils-aarch64-linux-gnu"),
    ("qemu-system-aarch64", "qemu-system-arm"),
    ("qemu-system-x86_64", "qemu-system-x86"),
];
const TARGETS: &[&str] = &["aarch64-unknown-none", "x86_64-unknown-none"];

/// What the code (not the comments) of a test file needs: (apt packages, Rust targets).
fn test_needs(source: &str) -> (BTreeSet<&'static str>, BTreeSet<&'static str>) {
    let code: Vec<&str> = source
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with("//"))
        .collect();
    let names = |needle: &str| code.iter().any(|l| l.contains(needle));
    let packages = PACKAGE_NEEDS
        .iter()
        .filter(|(used, _)| names(used))
        .map(|&(_, package)| package)
        .collect();
    let targets = TARGETS.iter().copied().filter(|t| names(t)).collect();
    (packages, targets)
}

/// One job of the workflow: its key and its lines.
struct Job<'a> {
    key: &'a str,
    lines: Vec<&'a str>,
}

/// The jobs under the top-level `jobs:` key (each a two-space-indented key).
fn jobs(yaml: &str) -> Vec<Job<'_>> {
    let mut jobs: Vec<Job> = Vec::new();
    let mut in_jobs = false;
    for line in yaml.lines() {
        if !line.starts_with(' ') && !line.trim().is_empty() && !line.starts_with('#') {
            in_jobs = line.trim_end() == "jobs:";
            continue;
        }
        if !in_jobs {
            continue;
        }
        let key = line
            .strip_prefix("  ")
            .filter(|rest| !rest.starts_with(' ') && !rest.starts_with('#'))
            .and_then(|rest| rest.trim_end().strip_suffix(':'));
        match (key, jobs.last_mut()) {
            (Some(key), _) => jobs.push(Job {
                key,
                lines: Vec::new(),
            }),
            (None, Some(job)) => job.lines.push(line),
            (None, None) => {}
        }
    }
    jobs
}

/// The job's shell lines (continuation lines joined) that start the given
/// command, each with the words that follow it (options left out).
fn command_args<'a>(job: &Job<'a>, command: &str) -> BTreeSet<String> {
    let mut logical = Vec::new();
    let mut current = String::new();
    for line in &job.lines {
        let line = line.trim();
        if let Some(head) = line.strip_suffix('\\') {
            current.push_str(head);
            current.push(' ');
        } else {
            current.push_str(line);
            logical.push(std::mem::take(&mut current));
        }
    }
    logical
        .iter()
        .filter(|l| !l.starts_with('#') && !l.starts_with("name:") && !l.starts_with("- name:"))
        .flat_map(|l| l.split(command).skip(1))
        .flat_map(|rest| {
            rest.split(['&', '|', ';'])
                .next()
                .unwrap_or("")
                .split_whitespace()
                .filter(|w| !w.starts_with('-'))
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The test files (stems) the job runs: those a `--test NAME` names, and with the
/// host tests' loop every file it does not leave out.
fn job_tests(job: &Job, files: &[String]) -> BTreeSet<String> {
    let text = job.lines.join("\n");
    let mut run: BTreeSet<String> = job
        .lines
        .iter()
        .map(|l| l.trim())
        .filter(|l| {
            let l = l.strip_prefix("- ").unwrap_or(l);
            !l.starts_with("name:") && !l.starts_with('#')
        })
        .flat_map(|l| l.split("--test ").skip(1))
        .filter_map(|rest| rest.split_whitespace().next())
        .filter(|name| files.iter().any(|f| f == name))
        .map(str::to_string)
        .collect();
    if let Some(excluded) = host_test_exclusions(&text) {
        run.extend(files.iter().filter(|f| !excluded.contains(f)).cloned());
    }
    run
}

/// For each job, what the tests it runs (and its `--target` builds) need and it
/// does not install; `sources` maps a test file's stem to its code.
fn missing_prerequisites(yaml: &str, sources: &[(String, String)]) -> Vec<String> {
    let files: Vec<String> = sources.iter().map(|(stem, _)| stem.clone()).collect();
    let mut errors = Vec::new();
    for job in jobs(yaml) {
        let packages = command_args(&job, "apt-get install");
        let targets = command_args(&job, "rustup target add");
        for test in job_tests(&job, &files) {
            let source = &sources.iter().find(|(stem, _)| *stem == test).unwrap().1;
            let (need_packages, need_targets) = test_needs(source);
            for package in need_packages.iter().filter(|p| !packages.contains(**p)) {
                errors.push(format!(
                    "{WORKFLOW}: job `{}` runs tests/{test}.rs, which needs {package}, but \
                     does not install it (add it to the job's `apt-get install`)",
                    job.key
                ));
            }
            for target in need_targets.iter().filter(|t| !targets.contains(**t)) {
                errors.push(format!(
                    "{WORKFLOW}: job `{}` runs tests/{test}.rs, which builds for {target}, \
                     but does not install it (add it to the job's `rustup target add`)",
                    job.key
                ));
            }
        }
        let built: BTreeSet<&str> = job
            .lines
            .iter()
            .flat_map(|l| l.split("--target ").skip(1))
            .filter_map(|rest| rest.split_whitespace().next())
            .collect();
        for target in built {
            if !targets.contains(target) {
                errors.push(format!(
                    "{WORKFLOW}: job `{}` builds with --target {target} but does not install \
                     it (add it to the job's `rustup target add`)",
                    job.key
                ));
            }
        }
    }
    errors
}

fn test_files() -> Vec<String> {
    let dir: PathBuf = root().join("tests");
    let mut stems: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "rs"))
        .filter_map(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .collect();
    stems.sort();
    stems
}

#[test]
fn workflow_matrix_lists_exactly_the_qemu_matrix_cells() {
    let errors = cell_list_errors(&read(WORKFLOW), &read(MATRIX));
    assert!(
        errors.is_empty(),
        "{WORKFLOW} and {MATRIX} disagree:\n  {}",
        errors.join("\n  ")
    );
}

#[test]
fn workflow_runs_every_test_file() {
    let unrun = unrun_test_files(&read(WORKFLOW), &test_files());
    assert!(
        unrun.is_empty(),
        "{WORKFLOW}: no job runs tests/{{{}}}.rs: the checks job's host tests leave it \
         out and no `cargo test --test NAME` runs it",
        unrun.join(",")
    );
}

#[test]
fn every_job_installs_what_its_tests_need() {
    let sources: Vec<(String, String)> = test_files()
        .into_iter()
        .map(|stem| {
            // This file names every program and target in its own tables.
            let code = if stem == "ci_workflow" {
                String::new()
            } else {
                read(&format!("tests/{stem}.rs"))
            };
            (stem, code)
        })
        .collect();
    let errors = missing_prerequisites(&read(WORKFLOW), &sources);
    assert!(
        errors.is_empty(),
        "{WORKFLOW}: jobs lack prerequisites:\n  {}",
        errors.join("\n  ")
    );
}

// The checks above must be able to fail.

const SAMPLE_YAML: &str = "\
jobs:
  qemu:
    name: qemu (${{ matrix.cell }})
    strategy:
      fail-fast: false
      matrix:
        # comment
        cell:
          - a_one
          - \"a_two\"  # quoted, with a comment

          - a_three
    steps:
      - run: cargo test --test qemu_matrix -- --exact ${{ matrix.cell }}
      - name: cargo test --test named_only
        run: cargo test --test named_onlyy
      - run: cargo test --test own_job
      - run: |
          for f in tests/*.rs; do
            case \"$name\" in
              # comment
              qemu_matrix | own_job | named_only) ;;
              *) args+=(--test \"$name\") ;;
            esac
          done
";

const SAMPLE_MATRIX: &str = "\
/// doc
#[test]
fn a_one() { run_cell(&Cell::new(\"a_one\", \"max\", 1)); }
#[test]
fn a_two() {
    run_cell(
        &Cell::new(\"a_two\", \"max\", 2)
            .bootargs(\"\"),
    );
}
#[test]
fn a_three() { run_cell(&Cell::new(\"a_three\", \"max\", 4)); }
fn helper() {}
";

#[test]
fn parsers_read_the_sample() {
    assert_eq!(test_functions(SAMPLE_MATRIX), ["a_one", "a_two", "a_three"]);
    let cells: Vec<String> = workflow_cells(SAMPLE_YAML)
        .unwrap()
        .into_iter()
        .map(|(_, n)| n)
        .collect();
    assert_eq!(cells, ["a_one", "a_two", "a_three"]);
    assert_eq!(
        cell_list_errors(SAMPLE_YAML, SAMPLE_MATRIX),
        Vec::<String>::new()
    );
}

#[test]
fn a_cell_missing_from_the_workflow_is_an_error() {
    let yaml = SAMPLE_YAML.replace("          - a_three\n", "");
    let errors = cell_list_errors(&yaml, SAMPLE_MATRIX);
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(errors[0].contains("lacks cell(s)") && errors[0].contains("a_three"));
}

#[test]
fn a_cell_only_in_the_workflow_is_an_error() {
    let yaml = SAMPLE_YAML.replace("- a_one\n", "- a_one\n          - a_gone\n");
    let errors = cell_list_errors(&yaml, SAMPLE_MATRIX);
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(errors[0].contains("does not have") && errors[0].contains("a_gone"));
}

#[test]
fn a_duplicate_or_misnamed_cell_is_an_error() {
    let yaml = SAMPLE_YAML.replace("- a_one\n", "- a_one\n          - a_one\n");
    assert!(cell_list_errors(&yaml, SAMPLE_MATRIX)[0].contains("listed twice"));
    let matrix = SAMPLE_MATRIX.replace("Cell::new(\"a_three\"", "Cell::new(\"a_3\"");
    let errors = cell_list_errors(SAMPLE_YAML, &matrix);
    assert!(
        errors.len() == 1 && errors[0].contains("fn a_three builds no Cell::new"),
        "{errors:?}"
    );
}

#[test]
fn a_workflow_without_the_list_or_the_cell_command_is_an_error() {
    let yaml = SAMPLE_YAML.replace("cell:", "cells:");
    assert!(cell_list_errors(&yaml, SAMPLE_MATRIX)[0].contains("no `cell:` block list"));
    let yaml = SAMPLE_YAML.replace("--exact ${{ matrix.cell }}", "${{ matrix.cell }}");
    let errors = cell_list_errors(&yaml, SAMPLE_MATRIX);
    assert!(
        errors.len() == 1 && errors[0].contains("--exact"),
        "{errors:?}"
    );
}

#[test]
fn an_unrun_test_file_is_reported() {
    assert_eq!(
        host_test_exclusions(SAMPLE_YAML).unwrap(),
        ["qemu_matrix", "own_job", "named_only"]
    );
    let files = ["host_a", "named_only", "own_job", "qemu_matrix", "new_one"].map(String::from);
    // named_only is left out of the loop and run by no command (only a step name).
    assert_eq!(unrun_test_files(SAMPLE_YAML, &files), ["named_only"]);
    // Without the loop every file needs a `--test NAME`.
    let yaml = SAMPLE_YAML.replace("for f in tests/*.rs", "for f in nothing");
    assert_eq!(
        unrun_test_files(&yaml, &files),
        ["host_a", "named_only", "new_one"]
    );
}

const SAMPLE_JOBS: &str = "\
on: push
jobs:
  checks:
    steps:
      - name: tools (apt-get install must not count from a name)
        run: |
          sudo apt-get install -y -qq --no-install-recommends \\
            binutils-aarch64-linux-gnu
      - run: rustup target add aarch64-unknown-none
      - run: cargo clippy --target aarch64-unknown-none
      - run: |
          for f in tests/*.rs; do
            case \"$name\" in
              boots) ;;
              *) args+=(--test \"$name\") ;;
            esac
          done
  boot:
    steps:
      - run: sudo apt-get install -y qemu-system-arm && echo qemu-system-x86
      - run: cargo test --test boots
";

#[test]
fn a_job_missing_a_prerequisite_is_an_error() {
    let sources = [
        ("disasm", "const AS: &str = \"aarch64-linux-gnu-as\";"),
        (
            "host",
            "// mentions qemu-system-x86_64 and x86_64-unknown-none in a comment",
        ),
        (
            "boots",
            "Arch::A => \"qemu-system-aarch64\",\nArch::X => \"qemu-system-x86_64\",\n\
             build(\"aarch64-unknown-none\")",
        ),
    ]
    .map(|(a, b)| (a.to_string(), b.to_string()));
    let errors = missing_prerequisites(SAMPLE_JOBS, &sources);
    // The boot job installs qemu-system-arm only (the `echo` is not an install),
    // and no target.
    assert_eq!(errors.len(), 2, "{errors:#?}");
    assert!(errors[0].contains("job `boot` runs tests/boots.rs, which needs qemu-system-x86"));
    assert!(
        errors[1].contains("job `boot` runs tests/boots.rs, which builds for aarch64-unknown-none")
    );

    // The checks job runs disasm through the loop: without binutils it is an error.
    let yaml = SAMPLE_JOBS.replace(
        "            binutils-aarch64-linux-gnu\n",
        "            make\n",
    );
    let errors = missing_prerequisites(&yaml, &sources);
    assert!(
        errors.iter().any(|e| e
            .contains("job `checks` runs tests/disasm.rs, which needs binutils-aarch64-linux-gnu")),
        "{errors:#?}"
    );
    // A --target build without the target installed.
    let yaml = SAMPLE_JOBS.replace("rustup target add aarch64-unknown-none", "rustup show");
    let errors = missing_prerequisites(&yaml, &sources);
    assert!(
        errors
            .iter()
            .any(|e| e.contains("job `checks` builds with --target aarch64-unknown-none")),
        "{errors:#?}"
    );
}
