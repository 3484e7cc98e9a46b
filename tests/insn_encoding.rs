//! Checks `patch::insn` against an independent assembler and disassembler (GNU binutils
//! for AArch64).
//!
//! Each test writes an assembly file into a fresh temporary directory, assembles it with
//! `aarch64-linux-gnu-as`, and compares the `.text` words (extracted with `objcopy`) or
//! the `objdump -d` listing with what our encoders and classifier say. The tools are
//! required: if they are missing the tests fail with the install command.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

mod support;

use patch_machine::patch::insn::{self, Cond, EncodeError, Insn, InsnClass};

const AS: &str = "aarch64-linux-gnu-as";
const OBJCOPY: &str = "aarch64-linux-gnu-objcopy";
const OBJDUMP: &str = "aarch64-linux-gnu-objdump";
const INSTALL: &str = "apt-get install -y binutils-aarch64-linux-gnu";

/// Where our side places `.text` offset 0. Encodings depend only on `target - pc`, so
/// any base works; a large one keeps backward targets from underflowing `usize`.
const BASE: usize = 0x4000_0000;

/// Byte offsets of `B`/`BL` tried against the assembler, including both extremes.
const B_OFFSETS: [isize; 14] = [
    0,
    4,
    -4,
    8,
    0x1000,
    -0x1000,
    0x2aa_aaa8,
    -0x155_5554,
    0x400_0000,
    -0x400_0000,
    insn::B_MAX_FORWARD as isize - 4,
    -(insn::B_MAX_BACKWARD as isize) + 4,
    insn::B_MAX_FORWARD as isize,
    -(insn::B_MAX_BACKWARD as isize),
];

/// Byte offsets of `B.cond` tried against the assembler, including both extremes.
const B_COND_OFFSETS: [isize; 10] = [
    0,
    4,
    -4,
    0x1000,
    -0x1000,
    0x5_5554,
    -0x8_0000,
    insn::B_COND_MAX_FORWARD as isize - 4,
    insn::B_COND_MAX_FORWARD as isize,
    -(insn::B_COND_MAX_BACKWARD as isize),
];

/// Condition suffixes as GNU `as` spells them, written out independently of
/// `Cond::name`, including the `hs`/`lo` aliases.
const CONDS: [(&str, Cond); 18] = [
    ("eq", Cond::Eq),
    ("ne", Cond::Ne),
    ("cs", Cond::Cs),
    ("hs", Cond::Hs),
    ("cc", Cond::Cc),
    ("lo", Cond::Lo),
    ("mi", Cond::Mi),
    ("pl", Cond::Pl),
    ("vs", Cond::Vs),
    ("vc", Cond::Vc),
    ("hi", Cond::Hi),
    ("ls", Cond::Ls),
    ("ge", Cond::Ge),
    ("lt", Cond::Lt),
    ("gt", Cond::Gt),
    ("le", Cond::Le),
    ("al", Cond::Al),
    ("nv", Cond::Nv),
];

const IMM16S: [u16; 10] = [0, 1, 7, 0x80, 0x3e8, 0x5555, 0x8000, 0xaaaa, 0xfffe, 0xffff];

/// A scratch directory, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let dir = std::env::temp_dir().join(format!(
            "patch-machine-insn-{tag}-{}-{nanos}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs a binutils tool, failing the test with the install command if it is missing.
fn run(tool: &str, args: &[&std::ffi::OsStr]) -> Output {
    support::ensure_installed(tool).unwrap_or_else(|e| panic!("{e}"));
    match Command::new(tool).args(args).output() {
        Ok(out) => out,
        Err(e) => panic!(
            "cannot run `{tool}` ({e}); these tests need GNU binutils for AArch64. \
             Install them with: {INSTALL}"
        ),
    }
}

fn check(tool: &str, out: &Output) {
    assert!(
        out.status.success(),
        "`{tool}` failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Assembles `src` in `dir`; returns the object path, or the assembler's stderr.
fn assemble(dir: &Path, name: &str, src: &str) -> Result<PathBuf, String> {
    let s = dir.join(format!("{name}.s"));
    let o = dir.join(format!("{name}.o"));
    std::fs::write(&s, src).unwrap_or_else(|e| panic!("cannot write {}: {e}", s.display()));
    let out = run(AS, &[s.as_os_str(), "-o".as_ref(), o.as_os_str()]);
    if out.status.success() {
        Ok(o)
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// The little-endian words of the `.text` section of `obj`.
fn text_words(dir: &Path, obj: &Path) -> Vec<u32> {
    let bin = dir.join("text.bin");
    let out = run(
        OBJCOPY,
        &[
            "-O".as_ref(),
            "binary".as_ref(),
            "-j".as_ref(),
            ".text".as_ref(),
            obj.as_os_str(),
            bin.as_os_str(),
        ],
    );
    check(OBJCOPY, &out);
    let bytes = std::fs::read(&bin).unwrap();
    assert_eq!(bytes.len() % 4, 0, ".text is not a whole number of words");
    bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// `.+0x10` / `.-0x10` for a byte offset.
fn rel(off: isize) -> String {
    if off < 0 {
        format!(".-{:#x}", off.unsigned_abs())
    } else {
        format!(".+{off:#x}")
    }
}

/// Every encoding we can produce, paired with the assembly GNU `as` should turn into it.
/// Entry `i` lives at `.text` offset `4 * i`, i.e. at `BASE + 4 * i` for our encoders.
fn corpus() -> Vec<(String, Insn)> {
    let mut v: Vec<(String, Insn)> = Vec::new();
    let pc = |v: &Vec<(String, Insn)>| BASE + 4 * v.len();
    let target = |pc: usize, off: isize| pc.checked_add_signed(off).unwrap();

    for off in B_OFFSETS {
        let p = pc(&v);
        v.push((
            format!("b {}", rel(off)),
            insn::b(p, target(p, off)).unwrap(),
        ));
        let p = pc(&v);
        v.push((
            format!("bl {}", rel(off)),
            insn::bl(p, target(p, off)).unwrap(),
        ));
    }
    for (name, cond) in CONDS {
        for off in B_COND_OFFSETS {
            let p = pc(&v);
            let w = insn::b_cond(p, target(p, off), cond).unwrap();
            v.push((format!("b.{name} {}", rel(off)), w));
        }
    }
    for imm in IMM16S {
        v.push((format!("brk #{imm:#x}"), insn::brk(imm)));
        v.push((format!("hvc #{imm:#x}"), insn::hvc(imm)));
        v.push((format!("smc #{imm:#x}"), insn::smc(imm)));
        v.push((format!("svc #{imm:#x}"), insn::svc(imm)));
    }
    v.push(("brk #0".into(), insn::BRK_0));
    v.push(("nop".into(), insn::nop()));
    v.push(("nop".into(), insn::NOP));
    v.push(("isb".into(), insn::isb()));
    v.push(("isb sy".into(), insn::ISB));
    v.push(("ret".into(), insn::ret()));
    v.push(("ret x30".into(), insn::RET));
    for rd in [0u8, 1, 2, 7, 8, 15, 16, 17, 29, 30] {
        for shift in [0u8, 16, 32, 48] {
            for imm in [0u16, 1, 0x1234, 0x8000, 0xffff] {
                v.push((
                    format!("movz x{rd}, #{imm:#x}, lsl #{shift}"),
                    insn::movz_x(rd, imm, shift).unwrap(),
                ));
            }
        }
    }
    v
}

#[test]
fn encoders_match_gnu_as() {
    let dir = Scratch::new("enc");
    let corpus = corpus();
    let mut src = String::from("\t.text\n");
    for (line, _) in &corpus {
        writeln!(src, "\t{line}").unwrap();
    }
    let obj = assemble(&dir.0, "enc", &src).unwrap_or_else(|e| panic!("{AS} failed:\n{e}"));
    let words = text_words(&dir.0, &obj);
    assert_eq!(
        words.len(),
        corpus.len(),
        "assembler emitted a different count"
    );

    let mismatches: Vec<String> = corpus
        .iter()
        .zip(&words)
        .enumerate()
        .filter(|(_, ((_, ours), theirs))| ours != *theirs)
        .map(|(i, ((line, ours), theirs))| {
            format!(
                "  .text+{:#x} `{line}`: ours {ours:#010x}, as {theirs:#010x}",
                4 * i
            )
        })
        .collect();
    assert!(
        mismatches.is_empty(),
        "{} of {} encodings differ from GNU as:\n{}",
        mismatches.len(),
        corpus.len(),
        mismatches.join("\n")
    );
}

#[test]
fn out_of_range_and_misaligned_rejected_like_gnu_as() {
    let dir = Scratch::new("range");
    let p = BASE;
    let b_fwd = insn::B_MAX_FORWARD as isize + 4;
    let b_back = -(insn::B_MAX_BACKWARD as isize) - 4;
    let c_fwd = insn::B_COND_MAX_FORWARD as isize + 4;
    let c_back = -(insn::B_COND_MAX_BACKWARD as isize) - 4;
    type Enc = fn(usize, usize) -> Result<Insn, EncodeError>;
    let beq: Enc = |pc, t| insn::b_cond(pc, t, Cond::Eq);
    let cases: [(&str, Enc, isize, &str); 9] = [
        ("b", insn::b, b_fwd, "out of range"),
        ("b", insn::b, b_back, "out of range"),
        ("bl", insn::bl, b_fwd, "out of range"),
        ("bl", insn::bl, b_back, "out of range"),
        ("b.eq", beq, c_fwd, "out of range"),
        ("b.eq", beq, c_back, "out of range"),
        ("b", insn::b, 2, "not word aligned"),
        ("bl", insn::bl, -1, "not word aligned"),
        ("b.eq", beq, 6, "not word aligned"),
    ];
    for (i, (mnem, enc, off, gas_msg)) in cases.into_iter().enumerate() {
        let line = format!("{mnem} {}", rel(off));
        let target = p.checked_add_signed(off).unwrap();
        let ours = enc(p, target);
        match ours {
            Err(EncodeError::BranchOutOfRange { pc, target: t, .. })
                if gas_msg == "out of range" =>
            {
                assert_eq!((pc, t), (p, target))
            }
            Err(EncodeError::MisalignedBranch { .. }) if gas_msg == "not word aligned" => {}
            other => panic!("`{line}`: expected an error like `{gas_msg}`, ours gave {other:x?}"),
        }
        match assemble(&dir.0, &format!("bad{i}"), &format!("\t.text\n\t{line}\n")) {
            Ok(_) => panic!("GNU as accepted `{line}`, which we reject as {ours:x?}"),
            Err(stderr) => assert!(
                stderr.contains(gas_msg),
                "GNU as rejected `{line}` for another reason:\n{stderr}"
            ),
        }
    }
}

/// Extra words for the classifier: near misses of every class and pseudo-random words.
fn classify_words() -> Vec<u32> {
    let mut words: Vec<u32> = corpus().into_iter().map(|(_, w)| w).collect();
    let seeds = [
        insn::b(0, 8).unwrap(),
        insn::bl(0, 8).unwrap(),
        insn::b_cond(0, 8, Cond::Ne).unwrap(),
        insn::brk(0x1234),
        insn::hvc(0x1234),
        insn::smc(0x1234),
        insn::svc(0x1234),
        insn::NOP,
        insn::ISB,
        insn::RET,
    ];
    for s in seeds {
        for bit in 0..32 {
            words.push(s ^ (1 << bit));
        }
    }
    // Every HINT (CRm:op2) and every ISB/DSB/DMB option.
    for crm_op2 in 0..128u32 {
        words.push(0xd503_201f | (crm_op2 << 5));
    }
    for crm in 0..16u32 {
        for op2 in 4..7u32 {
            words.push(0xd503_301f | (crm << 8) | (op2 << 5));
        }
    }
    // Deterministic xorshift noise.
    let mut x: u32 = 0x9e37_79b9;
    for _ in 0..4000 {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        words.push(x);
    }
    words
}

/// What objdump's mnemonic and operands mean in our classification.
fn class_from_objdump(mnemonic: &str, operands: &str) -> InsnClass {
    match mnemonic {
        "b" => InsnClass::B,
        "bl" => InsnClass::Bl,
        m if m.starts_with("b.") => InsnClass::BCond,
        "brk" => InsnClass::Brk,
        "hvc" => InsnClass::Hvc,
        "smc" => InsnClass::Smc,
        "svc" => InsnClass::Svc,
        "nop" => InsnClass::Nop,
        // `isb` alone is ISB SY; reserved options print as `isb #0x..`.
        "isb" if operands.is_empty() => InsnClass::Isb,
        _ => InsnClass::Other,
    }
}

#[test]
fn classify_agrees_with_objdump() {
    let dir = Scratch::new("cls");
    let words = classify_words();
    let mut src = String::from("\t.text\n");
    for w in &words {
        writeln!(src, "\t.inst {w:#010x}").unwrap();
    }
    let obj = assemble(&dir.0, "cls", &src).unwrap_or_else(|e| panic!("{AS} failed:\n{e}"));
    let base = format!("{BASE:#x}");
    let out = run(
        OBJDUMP,
        &[
            "-d".as_ref(),
            "--adjust-vma".as_ref(),
            base.as_ref(),
            obj.as_os_str(),
        ],
    );
    check(OBJDUMP, &out);
    let listing = String::from_utf8(out.stdout).unwrap();

    let mut seen = 0;
    let mut errors = Vec::new();
    let mut by_class = std::collections::BTreeMap::<String, usize>::new();
    for line in listing.lines() {
        // "40000000:\td503201f \tnop" (then optionally "\toperands")
        let Some((addr, rest)) = line.trim_start().split_once(":\t") else {
            continue;
        };
        let Ok(addr) = usize::from_str_radix(addr, 16) else {
            continue;
        };
        let mut fields = rest.split('\t');
        let word = u32::from_str_radix(fields.next().unwrap().trim(), 16).unwrap();
        let mnemonic = fields.next().unwrap_or("").trim();
        let operands = fields.next().unwrap_or("").trim();
        let index = (addr - BASE) / 4;
        assert_eq!(
            word, words[index],
            "objdump listing out of step at {addr:#x}"
        );
        seen += 1;

        let want = class_from_objdump(mnemonic, operands);
        *by_class.entry(format!("{want:?}")).or_default() += 1;
        let got = insn::classify(word);
        if got != want {
            errors.push(format!(
                "  {word:#010x} `{mnemonic} {operands}`: classify {got:?}, objdump {want:?}"
            ));
        }
        let safe = matches!(
            want,
            InsnClass::B
                | InsnClass::Bl
                | InsnClass::Brk
                | InsnClass::Hvc
                | InsnClass::Isb
                | InsnClass::Nop
                | InsnClass::Smc
                | InsnClass::Svc
        );
        if insn::is_cmodx_safe(word) != safe {
            errors.push(format!(
                "  {word:#010x} `{mnemonic} {operands}`: is_cmodx_safe {}, expected {safe}",
                !safe
            ));
        }
        if insn::cmodx_pair_allowed(word, insn::NOP) != safe {
            errors.push(format!("  {word:#010x}: cmodx_pair_allowed(_, NOP) wrong"));
        }
        // Branch destinations: objdump prints the absolute target first.
        if matches!(want, InsnClass::B | InsnClass::Bl | InsnClass::BCond) {
            let printed = operands.split_whitespace().next().unwrap_or("");
            let theirs = usize::from_str_radix(printed, 16).ok();
            let ours = insn::branch_target(addr, word);
            if ours != theirs {
                errors.push(format!(
                    "  {addr:#x}: {word:#010x} `{mnemonic} {operands}`: branch_target {ours:x?}"
                ));
            }
        }
    }
    assert_eq!(seen, words.len(), "objdump listed a different count");
    assert!(
        errors.is_empty(),
        "{} disagreements with objdump:\n{}",
        errors.len(),
        errors.join("\n")
    );
    // Make sure the corpus really exercises every class.
    for class in [
        "B", "Bl", "BCond", "Brk", "Hvc", "Isb", "Nop", "Smc", "Svc", "Other",
    ] {
        assert!(
            by_class.get(class).copied().unwrap_or(0) > 0,
            "no {class} in the corpus: {by_class:?}"
        );
    }
}
