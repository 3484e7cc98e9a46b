//! GNU objdump as an independent decoder for the property tests: a buffer of
//! instructions disassembled at a chosen address, one [`Line`] per instruction.
//!
//! Included by path (`#[path = "support/objdump.rs"]`) next to `mod support;`, whose
//! `ensure_installed` provides the tool the way `./qemu.sh` does.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

/// One disassembled instruction.
#[derive(Clone, Debug)]
pub struct Line {
    /// Its address.
    pub addr: u64,
    /// The encoding as objdump prints it (hex word on arm64, hex bytes on x86).
    pub encoding: String,
    /// The mnemonic, e.g. `b.eq`, `jmp`.
    pub mnemonic: String,
    /// The operands, comments (`//`, `#`, `;`) removed.
    pub operands: String,
}

impl Line {
    /// The operand that is an absolute address (`0x...` with no `#`, `$`, `(`), e.g.
    /// the target of a branch.
    pub fn address_operand(&self) -> Option<u64> {
        self.operands
            .split(',')
            .map(str::trim)
            .find_map(|op| u64::from_str_radix(op.strip_prefix("0x")?, 16).ok())
    }

    /// The operand `#imm` (decimal or hex), e.g. `brk #0x3e8`.
    pub fn immediate(&self) -> Option<u64> {
        self.operands.split(',').map(str::trim).find_map(|op| {
            let value = op.strip_prefix('#')?;
            match value.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16).ok(),
                None => value.parse().ok(),
            }
        })
    }
}

/// Disassembles `bytes` placed at `vma` with `tool` (`objdump` or
/// `aarch64-linux-gnu-objdump`) for `machine` (`aarch64`, `i386:x86-64`).
///
/// # Panics
/// If the tool is missing and cannot be installed, fails, or prints a line it cannot
/// parse.
pub fn disassemble(tool: &str, machine: &str, vma: u64, bytes: &[u8]) -> Vec<Line> {
    super::support::ensure_installed(tool).unwrap_or_else(|e| panic!("{e}"));
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let file: PathBuf = std::env::temp_dir().join(format!(
        "patch-machine-prop-{}-{}.bin",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::write(&file, bytes).unwrap_or_else(|e| panic!("write {}: {e}", file.display()));
    // -z: zero words are instructions too (objdump skips runs of them otherwise);
    // --insn-width: one line per x86 instruction however long.
    let out = Command::new(tool)
        .args(["-D", "-z", "-b", "binary", "-m", machine, "--insn-width=16"])
        .arg(format!("--adjust-vma={vma:#x}"))
        .arg(&file)
        .output();
    let _ = std::fs::remove_file(&file);
    let out = out.unwrap_or_else(|e| panic!("cannot run {tool}: {e}"));
    assert!(
        out.status.success(),
        "{tool} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| parse_line(line, comment_marks(machine)))
        .collect()
}

/// What starts a comment: arm64 `// 305397760` and `; undefined`; x86 `# 0x1000`
/// (on arm64 `#` starts an immediate).
fn comment_marks(machine: &str) -> &'static [&'static str] {
    if machine == "aarch64" {
        &["//", ";"]
    } else {
        &["#"]
    }
}

/// `  addr:\tencoding\tmnemonic\toperands  // comment`; `None` for headers.
fn parse_line(line: &str, marks: &[&str]) -> Option<Line> {
    let (addr, rest) = line.split_once(":\t")?;
    let addr = u64::from_str_radix(addr.trim(), 16).ok()?;
    let (encoding, text) = rest.split_once('\t').unwrap_or((rest, ""));
    let text = marks
        .iter()
        .fold(text, |text, mark| text.split(mark).next().unwrap_or(""));
    let text = text.trim();
    let (mnemonic, operands) = text.split_once(char::is_whitespace).unwrap_or((text, ""));
    Some(Line {
        addr,
        encoding: encoding.trim().to_string(),
        mnemonic: mnemonic.to_string(),
        operands: operands.trim().to_string(),
    })
}
