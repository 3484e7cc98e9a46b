//! Keeps `.github/workflows/ci.yml` in step with the tests it runs: its QEMU job's
//! `cell` list must be exactly the cells (`#[test]` functions) of
//! `tests/qemu_matrix.rs`, and every file in `tests/` must be run by some job.
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
