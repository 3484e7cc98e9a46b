//! The layers of the tree, read from the sources (nothing here needs a kernel build):
//!
//! - the kernel proper (`src/kernel/` outside `platform/`) and the binary's panic
//!   handler (`src/main.rs`) reach the machine only through `kernel::platform`: they
//!   name no `arch::` path (`core::arch` included), no `target_arch` and no `asm!`;
//! - the platform code (`src/arch/`) names nothing of `crate::kernel` except the two
//!   boot hand-offs (`primary_main`, `secondary_main`), which are listed below;
//! - the stop-machine core, the patcher and the kprobes core (`src/stop/`, `src/patch/`,
//!   `src/kprobes/`) name no architecture and nothing above them;
//! - inside each architecture's directory the modules form a DAG: the module graph,
//!   computed from the `super::`/`crate::arch::<arch>::` paths (and `use` trees) of each
//!   file and from the crate macros it invokes, has no cycle.
//!
//! Comments, string and character literals are blanked before any check, so docs may
//! still link wherever they like.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The calls from `src/arch/` up into the kernel that are allowed: the boot CPU's and
/// the secondaries' hand-off once the platform is up. They stay direct, type-checked
/// calls: an `extern "Rust"` symbol defined by the kernel would hide the same
/// dependency behind an unchecked link-time contract. Each must exist exactly once.
const KERNEL_ENTRY_CALLS: &[(&str, &str)] = &[
    ("aarch64/boot.rs", "crate::kernel::primary_main()"),
    ("aarch64/boot.rs", "crate::kernel::secondary_main(cpu)"),
    ("x86_64/boot.rs", "crate::kernel::primary_main()"),
    ("x86_64/boot.rs", "crate::kernel::secondary_main(index)"),
];

/// Edges allowed to close a loop, each with its reason (none today: keep it that way).
const KNOWN_EDGES: &[(&str, &str, &str, &str)] = &[];

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())) {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// `text` with comments and the contents of string and character literals replaced
/// by spaces (newlines kept, so line numbers stay right).
fn code_only(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = b.to_vec();
    let blank = |out: &mut Vec<u8>, from: usize, to: usize| {
        for c in &mut out[from..to] {
            if *c != b'\n' {
                *c = b' ';
            }
        }
    };
    let mut i = 0;
    while i < b.len() {
        let rest = &b[i..];
        if rest.starts_with(b"//") {
            let end = rest
                .iter()
                .position(|&c| c == b'\n')
                .map_or(b.len(), |p| i + p);
            blank(&mut out, i, end);
            i = end;
        } else if rest.starts_with(b"/*") {
            let (mut depth, mut j) = (0usize, i);
            while j < b.len() {
                if b[j..].starts_with(b"/*") {
                    depth += 1;
                    j += 2;
                } else if b[j..].starts_with(b"*/") {
                    depth -= 1;
                    j += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    j += 1;
                }
            }
            blank(&mut out, i, j);
            i = j;
        } else if rest.starts_with(b"r\"") || rest.starts_with(b"r#") {
            let hashes = rest[1..].iter().take_while(|&&c| c == b'#').count();
            if rest.get(1 + hashes) != Some(&b'"') {
                i += 1;
                continue;
            }
            let close: Vec<u8> = std::iter::once(b'"')
                .chain(std::iter::repeat_n(b'#', hashes))
                .collect();
            let body = i + 2 + hashes;
            let end = b[body..]
                .windows(close.len())
                .position(|w| w == close.as_slice())
                .map_or(b.len(), |p| body + p + close.len());
            blank(&mut out, body, end - close.len().min(end - body));
            i = end;
        } else if rest[0] == b'"' {
            let mut j = i + 1;
            while j < b.len() && b[j] != b'"' {
                j += if b[j] == b'\\' { 2 } else { 1 };
            }
            blank(&mut out, i + 1, j.min(b.len()));
            i = j + 1;
        } else if rest[0] == b'\'' {
            // A character literal ('x', '\n', '\u{..}'), not a lifetime ('a, 'static).
            let len = if rest.get(1) == Some(&b'\\') {
                rest[2..].iter().position(|&c| c == b'\'').map(|p| p + 3)
            } else {
                let ch = std::str::from_utf8(&rest[1..rest.len().min(5)])
                    .ok()
                    .or_else(|| std::str::from_utf8(&rest[1..rest.len().min(2)]).ok())
                    .and_then(|s| s.chars().next())
                    .map_or(1, char::len_utf8);
                (rest.get(1 + ch) == Some(&b'\'')).then_some(ch + 2)
            };
            match len {
                Some(len) => {
                    blank(&mut out, i + 1, i + len - 1);
                    i += len;
                }
                None => i += 1,
            }
        } else {
            i += 1;
        }
    }
    String::from_utf8(out).expect("blanking keeps UTF-8 (only ASCII is replaced)")
}

/// Whether `code` contains `word` not preceded by an identifier character.
fn names(code: &str, word: &str) -> bool {
    code.match_indices(word).any(|(at, _)| {
        !code[..at]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_alphanumeric() || c == '_')
    })
}

fn relative(path: &Path) -> String {
    path.strip_prefix(ROOT)
        .unwrap_or(path)
        .display()
        .to_string()
}

/// Every line of the files under `dir` (filtered by `skip`) naming one of `banned`.
fn offending_lines(
    files: &[PathBuf],
    banned: &[&str],
    allowed: impl Fn(&Path, &str) -> bool,
) -> Vec<String> {
    let mut found = Vec::new();
    for path in files {
        let text = fs::read_to_string(path).unwrap();
        let code = code_only(&text);
        for (number, (line, original)) in code.lines().zip(text.lines()).enumerate() {
            for word in banned {
                if names(line, word) && !allowed(path, line) {
                    found.push(format!(
                        "{}:{}: names `{word}`: {}",
                        relative(path),
                        number + 1,
                        original.trim()
                    ));
                }
            }
        }
    }
    found
}

#[test]
fn the_kernel_reaches_the_platform_only_through_kernel_platform() {
    let platform = Path::new(ROOT).join("src/kernel/platform");
    let mut files: Vec<PathBuf> = rust_files(&Path::new(ROOT).join("src/kernel"))
        .into_iter()
        .filter(|p| !p.starts_with(&platform))
        .collect();
    assert!(files.len() >= 4, "found only {files:?} in src/kernel");
    files.push(Path::new(ROOT).join("src/main.rs"));
    let found = offending_lines(&files, &["arch::", "target_arch", "asm!"], |_, _| false);
    assert!(
        found.is_empty(),
        "the kernel proper (and the panic handler) must reach the machine only through \
         kernel::platform:\n{}",
        found.join("\n")
    );
}

#[test]
fn the_platform_does_not_reach_up_into_the_kernel() {
    let files = rust_files(&Path::new(ROOT).join("src/arch"));
    assert!(
        files.len() >= 20,
        "found only {} files in src/arch",
        files.len()
    );
    let entry = |path: &Path, line: &str| {
        KERNEL_ENTRY_CALLS
            .iter()
            .any(|(file, call)| path.ends_with(file) && line.trim().trim_end_matches(';') == *call)
    };
    let found = offending_lines(&files, &["kernel::"], entry);
    assert!(
        found.is_empty(),
        "src/arch names the kernel beyond its boot hand-offs:\n{}",
        found.join("\n")
    );
    for (file, call) in KERNEL_ENTRY_CALLS {
        let code =
            code_only(&fs::read_to_string(Path::new(ROOT).join("src/arch").join(file)).unwrap());
        let count = code
            .lines()
            .filter(|l| l.trim().trim_end_matches(';') == *call)
            .count();
        assert_eq!(
            count, 1,
            "src/arch/{file}: expected `{call}` once (update KERNEL_ENTRY_CALLS)"
        );
    }
}

#[test]
fn the_core_and_the_patcher_name_no_architecture() {
    for (dir, at_least) in [
        ("src/stop", 2),
        ("src/patch", 2),
        ("src/static_key", 1),
        ("src/kprobes", 4),
    ] {
        let files = rust_files(&Path::new(ROOT).join(dir));
        assert!(files.len() >= at_least, "found only {files:?} in {dir}");
        let found = offending_lines(
            &files,
            &[
                "crate::arch",
                "target_arch",
                "asm!",
                "global_asm",
                "kernel::",
            ],
            |_, _| false,
        );
        assert!(
            found.is_empty(),
            "{dir} must know no architecture:\n{}",
            found.join("\n")
        );
    }
}

/// One dependency of a module on a sibling, with where it is written.
type Graph = BTreeMap<String, BTreeMap<String, String>>;

/// Identifier, `::`, or a single punctuation character, with its line.
fn tokens(code: &str) -> Vec<(String, usize)> {
    let mut out = Vec::new();
    for (number, line) in code.lines().enumerate() {
        let chars: Vec<char> = line.chars().collect();
        let mut i = 0;
        while i < chars.len() {
            let c = chars[i];
            if c.is_alphanumeric() || c == '_' || c == '$' {
                let start = i;
                while i < chars.len()
                    && (chars[i].is_alphanumeric() || chars[i] == '_' || chars[i] == '$')
                {
                    i += 1;
                }
                out.push((chars[start..i].iter().collect(), number + 1));
            } else if c == ':' && chars.get(i + 1) == Some(&':') {
                out.push(("::".into(), number + 1));
                i += 2;
            } else {
                if !c.is_whitespace() {
                    out.push((c.to_string(), number + 1));
                }
                i += 1;
            }
        }
    }
    out
}

fn is_ident(t: &str) -> bool {
    t.chars()
        .next()
        .is_some_and(|c| c.is_alphabetic() || c == '_' || c == '$')
}

/// Reads a path starting at `tokens[*i]`, expanding `{..}` groups: every full path with
/// the line it starts on.
fn read_paths(
    tokens: &[(String, usize)],
    i: &mut usize,
    prefix: &[String],
    out: &mut Vec<(Vec<String>, usize)>,
) {
    let line = tokens.get(*i).map_or(0, |t| t.1);
    let mut path = prefix.to_vec();
    loop {
        match tokens.get(*i).map(|t| t.0.as_str()) {
            Some("{") => {
                *i += 1;
                loop {
                    match tokens.get(*i).map(|t| t.0.as_str()) {
                        Some("}") => {
                            *i += 1;
                            return;
                        }
                        Some(",") => *i += 1,
                        Some(t) if is_ident(t) || t == "*" => read_paths(tokens, i, &path, out),
                        _ => {
                            *i += 1;
                        }
                    }
                    if *i >= tokens.len() {
                        return;
                    }
                }
            }
            Some(t) if is_ident(t) || t == "*" => {
                path.push(t.to_string());
                *i += 1;
                if tokens.get(*i).map(|t| t.0.as_str()) == Some("::") {
                    *i += 1;
                    continue;
                }
                out.push((path, line));
                return;
            }
            _ => {
                out.push((path, line));
                return;
            }
        }
    }
}

/// The module graph of `src/arch/<arch>/`: module (file stem, `mod` for mod.rs) ->
/// sibling module it names -> where.
fn module_graph(arch: &str) -> Graph {
    let dir = Path::new(ROOT).join("src/arch").join(arch);
    let files = rust_files(&dir);
    let module = |p: &Path| p.file_stem().unwrap().to_string_lossy().into_owned();
    let modules: BTreeSet<String> = files.iter().map(|p| module(p)).collect();
    let codes: Vec<(String, String, String)> = files
        .iter()
        .map(|p| {
            (
                module(p),
                relative(p),
                code_only(&fs::read_to_string(p).unwrap()),
            )
        })
        .collect();
    // Crate macros (`macro_rules!`) and the module defining each.
    let mut macros = BTreeMap::new();
    for (name, _, code) in &codes {
        let toks = tokens(code);
        for w in toks.windows(3) {
            if w[0].0 == "macro_rules" && w[1].0 == "!" {
                macros.insert(w[2].0.clone(), name.clone());
            }
        }
    }
    let mut graph = Graph::new();
    for (name, file, code) in &codes {
        let edges = graph.entry(name.clone()).or_default();
        let mut add = |target: &str, line: usize| {
            let target = if modules.contains(target) && target != "mod" {
                target
            } else {
                "mod"
            };
            if target != name {
                edges
                    .entry(target.to_string())
                    .or_insert_with(|| format!("{file}:{line}"));
            }
        };
        let toks = tokens(code);
        for (j, w) in toks.windows(2).enumerate() {
            if let Some(defining) = macros.get(&w[0].0)
                && w[1].0 == "!"
                && (j == 0 || toks[j - 1].0 != "macro_rules")
            {
                add(defining, w[0].1);
            }
        }
        // Braces of inline `mod name { .. }` blocks: `super::` inside one stays in the file.
        let mut braces: Vec<bool> = Vec::new();
        let mut i = 0;
        while i < toks.len() {
            let t = toks[i].0.as_str();
            let after_colons = i > 0 && toks[i - 1].0 == "::";
            match t {
                "{" => {
                    let inline_mod = i >= 2 && toks[i - 2].0 == "mod";
                    braces.push(inline_mod);
                    i += 1;
                    continue;
                }
                "}" => {
                    braces.pop();
                    i += 1;
                    continue;
                }
                _ => {}
            }
            if !is_ident(t) || after_colons {
                i += 1;
                continue;
            }
            let mut paths = Vec::new();
            read_paths(&toks, &mut i, &[], &mut paths);
            let depth = braces.iter().filter(|&&m| m).count();
            for (path, line) in paths {
                let segs: Vec<&str> = path.iter().map(String::as_str).collect();
                let supers = segs.iter().take_while(|s| **s == "super").count();
                let target = match segs.as_slice() {
                    ["crate" | "$crate", "arch", a, rest @ ..] if *a == arch => {
                        rest.first().copied()
                    }
                    // (`pub(super)` is a visibility, not a path.)
                    [first, ..] if *first == "super" => {
                        if name == "mod" || supers != depth + 1 || supers == segs.len() {
                            None
                        } else {
                            Some(segs.get(supers).copied().unwrap_or("mod"))
                        }
                    }
                    // mod.rs names its children directly (`cpu::current_cpu()`).
                    [first, _, ..] if name == "mod" && depth == 0 && modules.contains(*first) => {
                        Some(*first)
                    }
                    ["self", first, ..] if name == "mod" && depth == 0 => Some(*first),
                    _ => None,
                };
                if let Some(target) = target {
                    add(if target == "self" { "mod" } else { target }, line);
                }
            }
        }
    }
    graph
}

/// The strongly connected components of `graph` with more than one module (Tarjan).
fn cycles(graph: &Graph) -> Vec<Vec<String>> {
    struct State<'a> {
        graph: &'a Graph,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        out: Vec<Vec<String>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a str) {
        let n = s.index.len();
        s.index.insert(v, n);
        s.low.insert(v, n);
        s.stack.push(v);
        s.on_stack.insert(v);
        for w in s.graph.get(v).into_iter().flat_map(|e| e.keys()) {
            let w = w.as_str();
            if !s.index.contains_key(w) {
                visit(s, w);
                let lw = s.low[w];
                let lv = s.low[v];
                s.low.insert(v, lv.min(lw));
            } else if s.on_stack.contains(w) {
                let iw = s.index[w];
                let lv = s.low[v];
                s.low.insert(v, lv.min(iw));
            }
        }
        if s.low[v] == s.index[v] {
            let mut component = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack.remove(w);
                component.push(w.to_string());
                if w == v {
                    break;
                }
            }
            if component.len() > 1 {
                component.sort();
                s.out.push(component);
            }
        }
    }
    let mut state = State {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        out: Vec::new(),
    };
    for v in graph.keys() {
        if !state.index.contains_key(v.as_str()) {
            visit(&mut state, v);
        }
    }
    state.out
}

/// One cycle through `start` inside `component`, as "a -> b (where)" steps.
fn one_cycle(graph: &Graph, component: &[String], start: &str) -> Vec<String> {
    let mut previous: BTreeMap<String, String> = BTreeMap::new();
    let mut queue = std::collections::VecDeque::from([start.to_string()]);
    while let Some(v) = queue.pop_front() {
        for w in graph[&v].keys().filter(|w| component.contains(w)) {
            if w == start {
                let mut steps = vec![format!("{v} -> {w} ({})", graph[&v][w])];
                let mut at = v.clone();
                while at != start {
                    let p = previous[&at].clone();
                    steps.push(format!("{p} -> {at} ({})", graph[&p][&at]));
                    at = p;
                }
                steps.reverse();
                return steps;
            }
            if !previous.contains_key(w) {
                previous.insert(w.clone(), v.clone());
                queue.push_back(w.clone());
            }
        }
    }
    Vec::new()
}

fn check_acyclic(arch: &str, graph: &mut Graph) -> Result<(), String> {
    for (a, from, to, why) in KNOWN_EDGES.iter().filter(|e| e.0 == arch) {
        let removed = graph.get_mut(*from).and_then(|e| e.remove(*to));
        if removed.is_none() {
            return Err(format!(
                "KNOWN_EDGES lists {a}: {from} -> {to} ({why}), which no longer exists: remove the entry"
            ));
        }
    }
    let found = cycles(graph);
    if found.is_empty() {
        return Ok(());
    }
    let mut report = format!("src/arch/{arch}: the modules import each other in a loop:\n");
    for component in &found {
        report += &format!(
            "  cycle among {{{}}}:\n    {}\n",
            component.join(", "),
            one_cycle(graph, component, &component[0]).join("\n    ")
        );
    }
    Err(report)
}

#[test]
fn each_architecture_directory_is_a_dag() {
    let mut failures = Vec::new();
    for arch in ["aarch64", "x86_64"] {
        let mut graph = module_graph(arch);
        assert!(
            graph.len() >= 15,
            "{arch}: found only {} modules",
            graph.len()
        );
        let edges: usize = graph.values().map(BTreeMap::len).sum();
        assert!(
            edges >= 40,
            "{arch}: found only {edges} edges: is the path reader broken?"
        );
        if let Err(report) = check_acyclic(arch, &mut graph) {
            failures.push(report);
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The bottom of each port: modules that depend on no sibling.
#[test]
fn the_leaf_modules_stay_leaves() {
    for (arch, leaves) in [
        (
            "aarch64",
            &["nmi_mode", "semihosting", "layout", "psci"][..],
        ),
        ("x86_64", &["cpu", "layout", "madt"][..]),
    ] {
        let graph = module_graph(arch);
        for leaf in leaves {
            let edges = graph
                .get(*leaf)
                .unwrap_or_else(|| panic!("{arch}: no module {leaf}"));
            assert!(
                edges.is_empty(),
                "{arch}: {leaf} should be a leaf, but names {edges:?}"
            );
        }
    }
}

/// The reader itself: a loop written in the style of the sources is found and named.
#[test]
fn a_cycle_is_found_and_named() {
    let mut graph = Graph::new();
    for (from, to) in [("a", "b"), ("b", "c"), ("c", "a"), ("c", "d"), ("d", "d2")] {
        graph
            .entry(from.into())
            .or_default()
            .insert(to.into(), format!("{from}.rs:1"));
        graph.entry(to.into()).or_default();
    }
    let found = cycles(&graph);
    assert_eq!(found, vec![vec!["a".to_string(), "b".into(), "c".into()]]);
    let steps = one_cycle(&graph, &found[0], "a");
    assert_eq!(
        steps,
        ["a -> b (a.rs:1)", "b -> c (b.rs:1)", "c -> a (c.rs:1)"]
    );

    let code = code_only(
        "use super::{cpu, dtb::BootInfo};\n// super::fake\nlet s = \"super::fake\";\nmod inner { use super::Local; use super::super::gic; }\nsuper::STOP.x(); kprintln!(\"x\"); let c = '}';\n",
    );
    let toks = tokens(&code);
    let mut i = 0;
    let mut paths = Vec::new();
    while i < toks.len() {
        if toks[i].0 == "super" && (i == 0 || toks[i - 1].0 != "::") {
            read_paths(&toks, &mut i, &[], &mut paths);
        } else {
            i += 1;
        }
    }
    let joined: Vec<String> = paths
        .iter()
        .map(|(p, l)| format!("{}@{l}", p.join("::")))
        .collect();
    assert_eq!(
        joined,
        [
            "super::cpu@1",
            "super::dtb::BootInfo@1",
            "super::Local@4",
            "super::super::gic@4",
            "super::STOP@5"
        ]
    );
}

/// `cargo test --test layering -- --ignored --nocapture print_module_graphs` prints the
/// graphs (for docs and reviews).
#[test]
#[ignore]
fn print_module_graphs() {
    for arch in ["aarch64", "x86_64"] {
        for (module, edges) in module_graph(arch) {
            let targets: Vec<&str> = edges.keys().map(String::as_str).collect();
            println!("{arch}: {module} -> {}", targets.join(", "));
        }
    }
}
