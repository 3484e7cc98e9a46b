//! Every code pointer of docs/porting.md exists: each `` `path:symbol` `` whose path is
//! in this repository (src/, boot/, tests/) names an existing file, and each
//! `::`-separated part of the symbol occurs in that file as a whole identifier.
//! Each `` `platform.NAME` `` is a platform self-test of one of the ports
//! (`Test::new("NAME", ...)` in src/arch/{aarch64,x86_64}/selftest.rs). Linux pointers
//! (`arch/...`, `kernel/...`, `drivers/...`, `include/...`) are not checked: they name
//! another tree.

use std::path::Path;

const REFERENCE: &str = "docs/porting.md";
const REPO_ROOTS: [&str; 3] = ["src/", "boot/", "tests/"];

/// The `path:symbol` pointers into this repository: the text of each inline code span
/// that starts with a repository root and has a `:` after the path.
fn repo_pointers(markdown: &str) -> Vec<(String, String)> {
    markdown
        .split('`')
        .skip(1)
        .step_by(2)
        .filter(|span| REPO_ROOTS.iter().any(|root| span.starts_with(root)))
        .filter_map(|span| span.split_once(':'))
        .map(|(path, symbol)| (path.to_string(), symbol.to_string()))
        .collect()
}

/// The repository paths named alone (a file or directory, no symbol).
fn repo_paths(markdown: &str) -> Vec<String> {
    markdown
        .split('`')
        .skip(1)
        .step_by(2)
        .filter(|span| REPO_ROOTS.iter().any(|root| span.starts_with(root)))
        .filter(|span| !span.contains(':') && !span.contains(' '))
        .map(str::to_string)
        .collect()
}

fn is_ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Whether `ident` occurs in `text` with no identifier character on either side.
fn has_identifier(text: &str, ident: &str) -> bool {
    text.match_indices(ident).any(|(at, _)| {
        let before = text[..at].chars().next_back();
        let after = text[at + ident.len()..].chars().next();
        !before.is_some_and(is_ident_char) && !after.is_some_and(is_ident_char)
    })
}

/// What is wrong with one pointer, if anything.
fn check_pointer(root: &Path, path: &str, symbol: &str) -> Option<String> {
    let file = root.join(path);
    let Ok(text) = std::fs::read_to_string(&file) else {
        return Some(format!("`{path}:{symbol}`: no file {path}"));
    };
    if symbol.is_empty()
        || !symbol
            .split("::")
            .all(|p| !p.is_empty() && p.chars().all(is_ident_char))
    {
        return Some(format!("`{path}:{symbol}`: not a symbol"));
    }
    symbol
        .split("::")
        .find(|part| !has_identifier(&text, part))
        .map(|part| format!("`{path}:{symbol}`: {path} has no identifier `{part}`"))
}

/// The `platform.NAME` test names the reference uses.
fn platform_tests(markdown: &str) -> Vec<String> {
    markdown
        .split('`')
        .skip(1)
        .step_by(2)
        .filter_map(|span| span.strip_prefix("platform."))
        .filter(|name| !name.is_empty())
        .map(str::to_string)
        .collect()
}

fn problems(root: &Path, markdown: &str) -> Vec<String> {
    let mut found: Vec<String> = repo_pointers(markdown)
        .iter()
        .filter_map(|(path, symbol)| check_pointer(root, path, symbol))
        .collect();
    found.extend(
        repo_paths(markdown)
            .iter()
            .filter(|p| !root.join(p.trim_end_matches('/')).exists())
            .map(|p| format!("`{p}`: no such file or directory")),
    );
    let selftests: String = [
        "src/arch/aarch64/selftest.rs",
        "src/arch/x86_64/selftest.rs",
    ]
    .iter()
    .map(|f| std::fs::read_to_string(root.join(f)).unwrap_or_default())
    .collect();
    found.extend(
        platform_tests(markdown)
            .iter()
            .filter(|name| !selftests.contains(&format!("Test::new(\"{name}\"")))
            .map(|name| format!("`platform.{name}`: no such platform self-test")),
    );
    found
}

#[test]
fn every_code_pointer_in_the_porting_reference_exists() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let markdown = std::fs::read_to_string(root.join(REFERENCE)).expect("docs/porting.md");
    let pointers = repo_pointers(&markdown);
    assert!(
        pointers.len() >= 40,
        "only {} path:symbol pointers found in {REFERENCE}: did the format change?",
        pointers.len()
    );
    let found = problems(root, &markdown);
    assert!(
        found.is_empty(),
        "{REFERENCE} points at code that does not exist:\n  {}",
        found.join("\n  ")
    );
}

#[test]
fn a_bad_pointer_is_reported() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let markdown = "`src/patch/mod.rs:patch_nosync` `src/patch/mod.rs:patch_nosyncx` \
                    `src/patch/nope.rs:patch_nosync` `src/stop/arch.rs:Arch::no_such` \
                    `boot/aarch64/nope.S` `arch/arm64/kernel/patching.c:not_checked` \
                    `platform.gic_eoimode_0` `platform.gic_eoimode_1`";
    let found = problems(root, markdown);
    assert_eq!(found.len(), 5, "{found:#?}");
    assert!(
        found[0].contains("no identifier `patch_nosyncx`"),
        "{found:#?}"
    );
    assert!(found[1].contains("no file src/patch/nope.rs"), "{found:#?}");
    assert!(found[2].contains("no identifier `no_such`"), "{found:#?}");
    assert!(found[3].contains("boot/aarch64/nope.S"), "{found:#?}");
    assert!(found[4].contains("platform.gic_eoimode_1"), "{found:#?}");
}
