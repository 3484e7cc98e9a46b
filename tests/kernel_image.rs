//! Properties of the built kernel image, checked without booting it.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// Builds the release aarch64 kernel once and returns its path.
fn kernel_image() -> &'static Path {
    static IMAGE: OnceLock<PathBuf> = OnceLock::new();
    IMAGE.get_or_init(|| build("aarch64-unknown-none"))
}

/// Builds the release x86_64 kernel once and returns its path.
fn x86_kernel_image() -> &'static Path {
    static IMAGE: OnceLock<PathBuf> = OnceLock::new();
    IMAGE.get_or_init(|| build("x86_64-unknown-none"))
}

fn build(target: &str) -> PathBuf {
    support::ensure_rust_target(target).unwrap_or_else(|e| panic!("{e}"));
    {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let output = Command::new(cargo)
            .current_dir(root)
            .args([
                "build",
                "--release",
                "--target",
                target,
                "--bin",
                "patch-machine",
            ])
            .output()
            .expect("running cargo build");
        assert!(
            output.status.success(),
            "kernel build failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let target_dir = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("target"));
        target_dir.join(target).join("release/patch-machine")
    }
}

struct Segment {
    kind: u32,
    flags: u32,
    offset: u64,
    vaddr: u64,
    filesz: u64,
    memsz: u64,
    align: u64,
}

const PT_LOAD: u32 = 1;
const PF_X: u32 = 1;
const PF_W: u32 = 2;

/// The program headers of a little-endian ELF64 file.
fn program_headers(elf: &[u8]) -> Vec<Segment> {
    assert_eq!(&elf[..4], b"\x7fELF", "not an ELF file");
    assert_eq!(elf[4], 2, "not ELF64");
    assert_eq!(elf[5], 1, "not little-endian");
    let u16_at = |at: usize| u16::from_le_bytes(elf[at..at + 2].try_into().unwrap());
    let u32_at = |at: usize| u32::from_le_bytes(elf[at..at + 4].try_into().unwrap());
    let u64_at = |at: usize| u64::from_le_bytes(elf[at..at + 8].try_into().unwrap());
    let phoff = u64_at(0x20) as usize;
    let phentsize = usize::from(u16_at(0x36));
    let phnum = usize::from(u16_at(0x38));
    (0..phnum)
        .map(|i| {
            let at = phoff + i * phentsize;
            Segment {
                kind: u32_at(at),
                flags: u32_at(at + 4),
                offset: u64_at(at + 8),
                vaddr: u64_at(at + 0x10),
                filesz: u64_at(at + 0x20),
                memsz: u64_at(at + 0x28),
                align: u64_at(at + 0x30),
            }
        })
        .collect()
}

#[test]
fn no_segment_is_both_writable_and_executable() {
    for image in [kernel_image(), x86_kernel_image()] {
        no_wx_segment(image);
    }
}

fn no_wx_segment(image: &Path) {
    let elf = std::fs::read(image).expect("reading the kernel image");
    let segments = program_headers(&elf);
    assert!(
        segments
            .iter()
            .any(|s| s.kind == PT_LOAD && s.flags & PF_X != 0)
    );
    for s in &segments {
        assert!(
            s.flags & (PF_W | PF_X) != (PF_W | PF_X),
            "{}: segment at {:#x} (+{:#x}) is writable and executable (flags {:#x})",
            image.display(),
            s.vaddr,
            s.memsz,
            s.flags
        );
    }
}

const PT_NOTE: u32 = 4;
/// XEN_ELFNOTE_PHYS32_ENTRY: the PVH entry point QEMU's `-kernel` looks for.
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

/// The x86_64 image boots with a plain `-kernel`: a 4-byte aligned PT_NOTE (QEMU refuses
/// 8-byte alignment) holding the "Xen" PVH entry note, whose entry lies in executable
/// code.
#[test]
fn x86_image_has_the_pvh_entry_note() {
    let elf = std::fs::read(x86_kernel_image()).expect("reading the x86 kernel image");
    let segments = program_headers(&elf);
    let u32_at = |at: usize| u32::from_le_bytes(elf[at..at + 4].try_into().unwrap());
    let mut entry = None;
    for note in segments.iter().filter(|s| s.kind == PT_NOTE) {
        assert_eq!(
            note.align, 4,
            "PT_NOTE at offset {:#x} is not 4-byte aligned",
            note.offset
        );
        let (mut at, end) = (note.offset as usize, (note.offset + note.filesz) as usize);
        while at + 12 <= end {
            let (namesz, descsz, kind) = (u32_at(at), u32_at(at + 4), u32_at(at + 8));
            let name = &elf[at + 12..at + 12 + namesz as usize];
            let desc = at + 12 + (namesz as usize).next_multiple_of(4);
            if name == b"Xen\0" && kind == XEN_ELFNOTE_PHYS32_ENTRY {
                entry = Some(u64::from(u32_at(desc)));
            }
            at = desc + (descsz as usize).next_multiple_of(4);
        }
    }
    let entry = entry.expect("no Xen PVH entry note (type 18) in any PT_NOTE");
    assert!(
        segments.iter().any(|s| s.kind == PT_LOAD
            && s.flags & PF_X != 0
            && (s.vaddr..s.vaddr + s.memsz).contains(&entry)),
        "PVH entry {entry:#x} is not in an executable segment"
    );
}

#[test]
fn kernel_is_linked_above_the_dtb_slot() {
    // QEMU places the DTB at the start of RAM only if it fits below the image.
    let elf = std::fs::read(kernel_image()).expect("reading the kernel image");
    let lowest = program_headers(&elf)
        .iter()
        .filter(|s| s.kind == PT_LOAD && s.memsz > 0)
        .map(|s| s.vaddr)
        .min()
        .unwrap();
    assert!(lowest >= 0x4020_0000, "image starts at {lowest:#x}");
}

/// Runs a binutils tool from Debian's binutils-aarch64-linux-gnu on the image.
fn binutils(tool: &str, args: &[&str]) -> String {
    let program = format!("aarch64-linux-gnu-{tool}");
    support::ensure_installed(&program).unwrap_or_else(|e| panic!("{e}"));
    let output = Command::new(&program)
        .args(args)
        .arg(kernel_image())
        .output()
        .unwrap_or_else(|err| {
            panic!(
                "cannot run {program} ({err}); install it with: \
                 apt-get install -y binutils-aarch64-linux-gnu (or run .ci/install-qemu.sh)"
            )
        });
    assert!(output.status.success(), "{program} failed");
    String::from_utf8(output.stdout).unwrap()
}

fn symbol(nm: &str, name: &str) -> u64 {
    nm.lines()
        .find_map(|line| {
            let mut fields = line.split_whitespace();
            let (addr, _, sym) = (fields.next()?, fields.next()?, fields.next()?);
            (sym == name).then(|| u64::from_str_radix(addr, 16).unwrap())
        })
        .unwrap_or_else(|| panic!("no symbol {name} in the image"))
}

/// Patch validation refuses `.text.nopatch` because the rendezvous runs it. That is only
/// true if the rendezvous never leaves it: every direct branch out of the region must
/// go to a failure path (the run ends there), the boot hand-off (before any rendezvous
/// exists), or code that runs after the call is over.
#[test]
fn rendezvous_code_does_not_call_patchable_text() {
    const ALLOWED: &[(&str, &str)] = &[
        ("core::panicking::panic_fmt", "panic: the run ends"),
        ("exceptions::fatal", "unexpected exception: the run ends"),
        ("console::_print", "printing from a fatal path"),
        (
            "boot::primary_entry",
            "boot hand-off, before any rendezvous",
        ),
        (
            "boot::secondary_entry",
            "boot hand-off, before any rendezvous",
        ),
        (
            "<memcpy>",
            "copies the per-CPU error codes after the call is done",
        ),
    ];
    let nm = binutils("nm", &[]);
    let (start, end) = (symbol(&nm, "__nopatch_start"), symbol(&nm, "__nopatch_end"));
    assert!(end > start);
    let disassembly = binutils(
        "objdump",
        &[
            "-d",
            "--no-show-raw-insn",
            "--demangle",
            &format!("--start-address={start:#x}"),
            &format!("--stop-address={end:#x}"),
        ],
    );
    let mut escapes = Vec::new();
    let mut function = String::new();
    for line in disassembly.lines() {
        if line.ends_with(">:") {
            function = line.to_string();
            continue;
        }
        // "  40201f44:\tbl\t402161d4 <memcpy>"
        let fields: Vec<&str> = line.split('\t').collect();
        if fields.len() < 3 {
            continue;
        }
        let mnemonic = fields[1].trim();
        if !matches!(mnemonic, "b" | "bl") && !mnemonic.starts_with("b.") {
            continue;
        }
        let operand = fields[2].trim();
        let Some(target) = operand
            .split_whitespace()
            .next()
            .and_then(|t| u64::from_str_radix(t, 16).ok())
        else {
            continue;
        };
        if (start..end).contains(&target) {
            continue;
        }
        if ALLOWED.iter().any(|(callee, _)| operand.contains(callee)) {
            continue;
        }
        escapes.push(format!("{function} {line}"));
    }
    assert!(
        escapes.is_empty(),
        ".text.nopatch branches into patchable text:\n{}",
        escapes.join("\n")
    );
}

/// The same property for the x86_64 image (host binutils read it): every direct call or
/// jump out of `.text.nopatch` goes to a failure path or is the boot hand-off.
#[test]
fn x86_rendezvous_code_does_not_call_patchable_text() {
    const ALLOWED: &[(&str, &str)] = &[
        ("core::panicking::panic_fmt", "panic: the run ends"),
        ("core::option::expect_failed", "panic: the run ends"),
        ("traps::fatal", "unexpected exception: the run ends"),
        ("boot::boot_main", "boot hand-off, before any rendezvous"),
    ];
    let image = x86_kernel_image();
    let run = |tool: &str, args: &[&str]| {
        let output = Command::new(tool)
            .args(args)
            .arg(image)
            .output()
            .unwrap_or_else(|err| panic!("cannot run {tool} ({err}): needs the host's binutils"));
        assert!(output.status.success(), "{tool} failed");
        String::from_utf8(output.stdout).unwrap()
    };
    let nm = run("nm", &[]);
    let (start, end) = (symbol(&nm, "__nopatch_start"), symbol(&nm, "__nopatch_end"));
    assert!(end > start);
    let disassembly = run(
        "objdump",
        &[
            "-d",
            "--no-show-raw-insn",
            "--demangle",
            &format!("--start-address={start:#x}"),
            &format!("--stop-address={end:#x}"),
        ],
    );
    let mut escapes = Vec::new();
    let mut function = "";
    for line in disassembly.lines() {
        if line.ends_with(">:") {
            function = line;
            continue;
        }
        // "  200f3c:\tcall   2034a0 <core::panicking::panic_fmt>"
        let Some(insn) = line.split('\t').nth(1) else {
            continue;
        };
        let mut fields = insn.split_whitespace();
        let (Some(mnemonic), Some(operand)) = (fields.next(), fields.next()) else {
            continue;
        };
        let branch = mnemonic == "call" || mnemonic.starts_with('j');
        let Ok(target) = u64::from_str_radix(operand, 16) else {
            continue;
        };
        if !branch || (start..end).contains(&target) {
            continue;
        }
        if ALLOWED.iter().any(|(callee, _)| insn.contains(callee)) {
            continue;
        }
        escapes.push(format!("{function} {line}"));
    }
    assert!(
        escapes.is_empty(),
        "x86 .text.nopatch branches into patchable text:\n{}",
        escapes.join("\n")
    );
}

/// The jump-table entries (site, target, key, kind) of `image`, read from the ELF
/// between `__jump_table_start` and `__jump_table_end`.
fn jump_entries(image: &Path, nm: &str) -> Vec<[u64; 4]> {
    let elf = std::fs::read(image).expect("reading the kernel image");
    let (start, end) = (
        symbol(nm, "__jump_table_start"),
        symbol(nm, "__jump_table_end"),
    );
    assert_eq!((end - start) % 32, 0, "the jump table holds whole entries");
    let segment = program_headers(&elf)
        .into_iter()
        .find(|s| s.kind == PT_LOAD && s.vaddr <= start && end <= s.vaddr + s.filesz)
        .expect("the jump table is in a loaded segment");
    let bytes = &elf[(segment.offset + start - segment.vaddr) as usize..][..(end - start) as usize];
    bytes
        .chunks(32)
        .map(|e| std::array::from_fn(|i| u64::from_le_bytes(e[i * 8..][..8].try_into().unwrap())))
        .collect()
}

/// Every static-key site is patchable text: inside `__text_start..__text_end` and
/// outside `.text.nopatch` and boot text (the kernel refuses such a site at its first
/// key operation; this refuses it before the image boots). Every entry names a key of
/// the key table.
fn jump_sites_are_patchable(image: &Path, nm: &str) {
    let entries = jump_entries(image, nm);
    assert!(entries.len() >= 101, "only {} jump entries", entries.len());
    let text = symbol(nm, "__text_start")..symbol(nm, "__text_end");
    let nopatch = symbol(nm, "__nopatch_start")..symbol(nm, "__nopatch_end");
    let keys = symbol(nm, "__static_keys_start")..symbol(nm, "__static_keys_end");
    let elf = std::fs::read(image).unwrap();
    let segment = program_headers(&elf)
        .into_iter()
        .find(|s| s.kind == PT_LOAD && s.vaddr <= keys.start && keys.end <= s.vaddr + s.filesz)
        .expect("the key table is in a loaded segment");
    let key_table: Vec<u64> = elf[(segment.offset + keys.start - segment.vaddr) as usize..]
        [..(keys.end - keys.start) as usize]
        .chunks(8)
        .map(|k| u64::from_le_bytes(k.try_into().unwrap()))
        .collect();
    let bad: Vec<String> = entries
        .iter()
        .filter(|[site, _, key, kind]| {
            !text.contains(site) || nopatch.contains(site) || !key_table.contains(key) || *kind > 1
        })
        .map(|[site, target, key, kind]| {
            format!("site {site:#x} -> {target:#x}, key {key:#x}, kind {kind}")
        })
        .collect();
    assert!(
        bad.is_empty(),
        "jump sites outside patchable text ({:#x}..{:#x} minus {:#x}..{:#x}) or naming no key:\n{}",
        text.start,
        text.end,
        nopatch.start,
        nopatch.end,
        bad.join("\n")
    );
}

#[test]
fn static_key_sites_are_in_patchable_text() {
    jump_sites_are_patchable(kernel_image(), &binutils("nm", &[]));
    let image = x86_kernel_image();
    let nm = Command::new("nm")
        .arg(image)
        .output()
        .expect("nm: needs the host's binutils");
    jump_sites_are_patchable(image, &String::from_utf8(nm.stdout).unwrap());
}
