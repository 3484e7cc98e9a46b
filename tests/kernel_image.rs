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

/// Runs `program` with `args` on `image` and returns its standard output. The aarch64
/// binutils are installed when missing (tests/support); x86_64 uses the host's.
fn run_on(program: &str, args: &[&str], image: &Path) -> String {
    if program.starts_with("aarch64-linux-gnu-") {
        support::ensure_installed(program).unwrap_or_else(|e| panic!("{e}"));
    }
    let output = Command::new(program)
        .args(args)
        .arg(image)
        .output()
        .unwrap_or_else(|err| {
            panic!(
                "cannot run {program} ({err}); install it with: apt-get install -y \
                 binutils-aarch64-linux-gnu (or run .ci/install-qemu.sh); x86_64 needs the \
                 host's binutils"
            )
        });
    assert!(
        output.status.success(),
        "{program} failed on {}",
        image.display()
    );
    String::from_utf8(output.stdout).unwrap()
}

/// Runs a binutils tool from Debian's binutils-aarch64-linux-gnu on the image.
fn binutils(tool: &str, args: &[&str]) -> String {
    run_on(&format!("aarch64-linux-gnu-{tool}"), args, kernel_image())
}

/// `objdump -d` (demangled, no raw bytes) of `start..end`, run through `run` (the tool
/// runner of the image in question).
fn disassemble(run: impl Fn(&str, &[&str]) -> String, start: u64, end: u64) -> String {
    run(
        "objdump",
        &[
            "-d",
            "--no-show-raw-insn",
            "--demangle",
            &format!("--start-address={start:#x}"),
            &format!("--stop-address={end:#x}"),
        ],
    )
}

/// Every direct A64 branch in `disassembly` (B, BL, B.cond, CBZ/CBNZ, TBZ/TBNZ) with its
/// target: `(function header, line, operand, target)`.
fn a64_direct_branches(disassembly: &str) -> Vec<(&str, &str, &str, u64)> {
    let mut branches = Vec::new();
    let mut function = "";
    for line in disassembly.lines() {
        if line.ends_with(">:") {
            function = line;
            continue;
        }
        // "  40201f44:\tbl\t402161d4 <memcpy>", "  ...:\ttbz\tw0, #3, 40201f60 <...>"
        let fields: Vec<&str> = line.split('\t').collect();
        if fields.len() < 3 {
            continue;
        }
        let mnemonic = fields[1].trim();
        if !matches!(mnemonic, "b" | "bl" | "cbz" | "cbnz" | "tbz" | "tbnz")
            && !mnemonic.starts_with("b.")
        {
            continue;
        }
        let operand = fields[2].trim();
        // The target is the operand's one hexadecimal address (a TBZ bit number is
        // decimal and below 0x1000).
        if let Some(target) = operand
            .split([' ', ','])
            .filter_map(|t| u64::from_str_radix(t, 16).ok())
            .find(|t| *t > 0x1000)
        {
            branches.push((function, line, operand, target));
        }
    }
    branches
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
    ];
    let nm = binutils("nm", &[]);
    let (start, end) = (symbol(&nm, "__nopatch_start"), symbol(&nm, "__nopatch_end"));
    assert!(end > start);
    let disassembly = disassemble(binutils, start, end);
    let escapes: Vec<String> = a64_direct_branches(&disassembly)
        .into_iter()
        .filter(|&(_, _, operand, target)| {
            !(start..end).contains(&target)
                && !ALLOWED.iter().any(|(callee, _)| operand.contains(callee))
        })
        .map(|(function, line, _, _)| format!("{function} {line}"))
        .collect();
    assert!(
        escapes.is_empty(),
        ".text.nopatch branches into patchable text:\n{}",
        escapes.join("\n")
    );
}

/// A kprobe may not be placed in the code its own hit path runs (it would trap inside
/// its handling), so the arm64 hit path lives in `.text.kprobes`, which probes and
/// patching refuse. That is only true if it never leaves it: every direct branch out of
/// `.text.kprobes` goes to `.text.nopatch` (also refused) or a failure path. The pre and
/// post handlers are reached through a register: they are the probe's user's code.
#[test]
fn kprobes_hit_path_stays_unprobeable() {
    const ALLOWED: &[&str] = &[
        "core::panicking::",
        "core::slice::index::",
        "exceptions::fatal",
    ];
    let nm = binutils("nm", &[]);
    let (start, end) = (symbol(&nm, "__kprobes_start"), symbol(&nm, "__kprobes_end"));
    let nopatch = symbol(&nm, "__nopatch_start")..symbol(&nm, "__nopatch_end");
    assert!(end > start, "empty .text.kprobes");
    let disassembly = disassemble(binutils, start, end);
    let branches = a64_direct_branches(&disassembly);
    let calls_hit = branches
        .iter()
        .any(|(_, _, operand, _)| operand.contains("Kprobes<A,_>>::hit>"));
    let escapes: Vec<String> = branches
        .into_iter()
        .filter(|&(_, _, operand, target)| {
            !(start..end).contains(&target)
                && !nopatch.contains(&target)
                && !ALLOWED.iter().any(|callee| operand.contains(callee))
        })
        .map(|(function, line, _, _)| format!("{function} {line}"))
        .collect();
    assert!(
        calls_hit,
        "no call of the core's Kprobes::hit in .text.kprobes: the BRK hook or the scan is broken"
    );
    assert!(
        escapes.is_empty(),
        ".text.kprobes branches into probeable text:\n{}",
        escapes.join("\n")
    );
}

/// The same property for the x86_64 image (host binutils read it): every direct call or
/// jump out of `.text.nopatch` goes to a failure path, is the boot hand-off, or enters
/// `.text.kprobes` (the #BP/#DB hooks; a protected range the patcher refuses too).
#[test]
fn x86_rendezvous_code_does_not_call_patchable_text() {
    const ALLOWED: &[(&str, &str)] = &[
        ("core::panicking::panic_fmt", "panic: the run ends"),
        ("core::option::expect_failed", "panic: the run ends"),
        ("traps::fatal", "unexpected exception: the run ends"),
        ("boot::boot_main", "boot hand-off, before any rendezvous"),
        (
            "user::handle_from_user",
            "the kernel entry from ring 3 hands over to the system call and user-fault \
             handler (patchable) only after its deferred synchronisation: \
             x86_user_entry_reaches_patchable_text_only_after_the_deferred_sync checks the \
             order; no rendezvous runs it (a CPU in a patch window takes no trap from ring 3)",
        ),
    ];
    let image = x86_kernel_image();
    let run = |tool: &str, args: &[&str]| run_on(tool, args, image);
    let nm = run("nm", &[]);
    let (start, end) = (symbol(&nm, "__nopatch_start"), symbol(&nm, "__nopatch_end"));
    assert!(end > start);
    // The #BP and #DB dispatch calls the kprobes hooks: `.text.kprobes` is a protected
    // range of the patcher too (src/arch/x86_64/text.rs), so never patched either.
    let kprobes = symbol(&nm, "__kprobes_start")..symbol(&nm, "__kprobes_end");
    let disassembly = disassemble(run, start, end);
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
        if !branch || (start..end).contains(&target) || kprobes.contains(&target) {
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

/// A built kernel image with the binutils that read it.
struct Image {
    path: &'static Path,
    /// "aarch64-linux-gnu-" or "" (host binutils read x86_64).
    tools: &'static str,
    elf: Vec<u8>,
    /// Function symbols (demangled), sorted by address.
    functions: Vec<(u64, String)>,
    nopatch: std::ops::Range<u64>,
    text: std::ops::Range<u64>,
}

impl Image {
    fn open(path: &'static Path, tools: &'static str) -> Image {
        let raw = run_on(&format!("{tools}nm"), &[], path);
        let nopatch = symbol(&raw, "__nopatch_start")..symbol(&raw, "__nopatch_end");
        let text = symbol(&raw, "__text_start")..symbol(&raw, "__text_end");
        assert!(nopatch.end > nopatch.start && text.start <= nopatch.start);
        // "0000000040212adc t patch_machine::patch::patch_machine::{{closure}}"
        let mut functions: Vec<(u64, String)> = run_on(&format!("{tools}nm"), &["-C"], path)
            .lines()
            .filter_map(|line| {
                let (addr, rest) = line.split_once(' ')?;
                let (kind, name) = rest.split_once(' ')?;
                let addr = u64::from_str_radix(addr, 16).ok()?;
                matches!(kind, "t" | "T" | "w" | "W").then(|| (addr, name.to_string()))
            })
            .collect();
        functions.sort();
        Image {
            path,
            tools,
            elf: std::fs::read(path).expect("reading the kernel image"),
            functions,
            nopatch,
            text,
        }
    }

    fn tool(&self, name: &str, args: &[&str]) -> String {
        run_on(&format!("{}{name}", self.tools), args, self.path)
    }

    /// The function symbol at exactly `addr`.
    fn function_at(&self, addr: u64) -> Option<&str> {
        let at = self.functions.partition_point(|(a, _)| *a < addr);
        self.functions
            .get(at)
            .filter(|(a, _)| *a == addr)
            .map(|(_, name)| name.as_str())
    }

    /// The address of the function whose demangled name is `name` or ends in `::name`.
    fn function_named(&self, name: &str) -> Option<u64> {
        let suffix = format!("::{name}");
        self.functions
            .iter()
            .find(|(_, f)| f == name || f.ends_with(&suffix))
            .map(|(a, _)| *a)
    }

    /// The 64-bit word the image loads at `vaddr`, if a segment holds it in the file.
    fn word_at(&self, vaddr: u64) -> Option<u64> {
        let segment = program_headers(&self.elf)
            .into_iter()
            .find(|s| s.kind == PT_LOAD && s.vaddr <= vaddr && vaddr + 8 <= s.vaddr + s.filesz)?;
        let at = (segment.offset + vaddr - segment.vaddr) as usize;
        Some(u64::from_le_bytes(self.elf[at..at + 8].try_into().ok()?))
    }

    /// `objdump -d` of `.text.nopatch`.
    fn nopatch_disassembly(&self) -> String {
        disassemble(
            |tool, args| self.tool(tool, args),
            self.nopatch.start,
            self.nopatch.end,
        )
    }

    /// Every vtable the debug info places, as `(implementor, trait, address, size)`.
    fn vtables(&self) -> Vec<(String, String, u64, u64)> {
        let dwarf = self.tool("readelf", &["--debug-dump=info"]);
        let name_of = |line: &str| line.rsplit_once("): ").map(|(_, n)| n.trim().to_string());
        let mut sizes = std::collections::HashMap::new();
        let mut found = Vec::new();
        let mut lines = dwarf.lines().peekable();
        while let Some(line) = lines.next() {
            if !line.contains("DW_AT_name") {
                continue;
            }
            let Some(name) = name_of(line) else { continue };
            if let Some(vtable) = name.strip_suffix("::{vtable_type}") {
                let vtable = format!("{vtable}::{{vtable}}");
                // The members follow; the size comes first.
                while let Some(next) = lines.peek() {
                    if next.contains("DW_TAG") {
                        break;
                    }
                    let next = lines.next().unwrap();
                    if let Some(size) = next.split("DW_AT_byte_size").nth(1) {
                        let size = size.trim_start_matches([' ', ':']).trim();
                        sizes.insert(vtable.clone(), size.parse::<u64>().unwrap());
                    }
                }
            } else if name.ends_with("::{vtable}") {
                while let Some(next) = lines.peek() {
                    if next.contains("DW_TAG") {
                        break;
                    }
                    let next = lines.next().unwrap();
                    if let Some(addr) = next.split("(DW_OP_addr: ").nth(1) {
                        let addr = u64::from_str_radix(addr.trim_end_matches(')'), 16).unwrap();
                        found.push((name.clone(), addr));
                    }
                }
            }
        }
        found.sort();
        found.dedup();
        found
            .into_iter()
            .map(|(name, addr)| {
                // 0: a vtable type without a size (only declared in this unit).
                let size = sizes.get(&name).copied().unwrap_or(0);
                let inner = name
                    .strip_prefix('<')
                    .and_then(|n| n.strip_suffix(">::{vtable}"))
                    .unwrap_or_else(|| panic!("unexpected vtable name {name}"));
                let (implementor, trait_) = inner.rsplit_once(" as ").unwrap();
                (implementor.to_string(), trait_.to_string(), addr, size)
            })
            .collect()
    }
}

/// The kinds of indirect branch `.text.nopatch` takes, named by the function they sit in
/// (inlining may put several kinds in one function). The targets of each checked kind
/// are checked image-wide; the table makes a new indirect branch fail the test until
/// someone says what it calls.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Indirect {
    /// A stop function or the NMI raiser, through its vtable: every vtable of the stop
    /// core's traits, and of the closures behind `StopFn`, is checked.
    StopCore,
    /// The text write probe, a `fn()`: every `set_write_probe(Some(f))` in the source is
    /// checked.
    WriteProbe,
    /// A compiler builtin (`memcpy`, `__udivti3`) through a GOT slot loaded earlier: every
    /// GOT slot `.text.nopatch` loads is checked.
    GotSlot,
    /// `pm_call_with_fixup` (`src/arch/*/fixup.rs`), calling the one trampoline
    /// `fault_fixup::trampoline` (`src/arch/fault_fixup.rs`) it is ever passed: checked
    /// to be in `.text.nopatch`.
    FixupTrampoline,
    /// Not in any rendezvous: the reason says why.
    Outside(&'static str),
}

const IRQ_DISPATCH: Indirect = Indirect::Outside(
    "interrupt and exception dispatch: the patch window masks every maskable exception, \
     and a synchronous exception in it is fatal (only a stop_machine_catching_faults call, \
     never patch_machine's, resumes at its fixup point instead)",
);
const NMI_DISPATCH: Indirect = Indirect::Outside(
    "NMI handlers: the stop machine's (checked, as StopCore) runs first; the others are \
     the self-tests' NMI sources, which run the patched sites on purpose. arm64's patch \
     window masks NMIs; x86's writes run in the patcher's own NMI, and the stop machine's \
     slot holds other CPUs' NMIs until they are done (nmi_safe_patching)",
);

const INDIRECT_SITES: &[(&str, Indirect)] = &[
    // Matched against the end of the function's name, so that moving code between
    // modules does not matter.
    ("StopFunction>::call", Indirect::StopCore),
    ("StopMachine<A>::participate", Indirect::StopCore),
    ("StopMachine<A>>::handle_nmi", Indirect::StopCore),
    ("StopMachine<A>>::run_in_nmi", Indirect::StopCore),
    ("StopMachine<A>::run_function", Indirect::StopCore),
    ("::fault_fixup::trampoline", Indirect::StopCore),
    ("::call_catching_faults", Indirect::StopCore),
    ("pm_call_with_fixup", Indirect::FixupTrampoline),
    ("::write_probe::call_write_probe", Indirect::WriteProbe),
    ("KernelText>::write_insn", Indirect::WriteProbe),
    ("KernelText>::write_batch", Indirect::WriteProbe),
    ("KernelText>::write_run", Indirect::WriteProbe),
    ("StopMachine<A>::wait_past", Indirect::GotSlot),
    ("StopMachine<A>::results", Indirect::GotSlot),
    ("TextAlias::map", Indirect::GotSlot),
    ("TextAlias::map_pages", Indirect::GotSlot),
    ("::gic::dispatch", IRQ_DISPATCH),
    ("::handle_irq_exception", IRQ_DISPATCH),
    ("::exceptions::handle_exception", IRQ_DISPATCH),
    (
        "::exceptions::from_user",
        Indirect::Outside(
            "the kernel entry from user mode hands over to the user-mode handler (patchable) \
             only after its deferred synchronisation: \
             user_entry_reaches_patchable_text_only_after_the_deferred_sync checks the order; \
             no rendezvous runs it (a CPU in a patch window takes no exception from EL0)",
        ),
    ),
    ("::traps::trap_dispatch", IRQ_DISPATCH),
    ("::traps::dispatch_kernel", IRQ_DISPATCH),
    ("::handle_int3", IRQ_DISPATCH),
    ("::ipi::dispatch", IRQ_DISPATCH),
    ("NmiHandlers::run", NMI_DISPATCH),
    ("::nmi::run_handlers", NMI_DISPATCH),
    ("::nmi::handle_nmi", NMI_DISPATCH),
    (
        "tramp64",
        Indirect::Outside("AP boot trampoline: before the CPU is online"),
    ),
];

/// Stop functions that may stay in patchable text, by implementing type.
const PATCHABLE_STOP_FUNCTIONS: &[(&str, &str)] = &[(
    "::selftest::",
    "self-tests' own stop functions: not patch_machine's window, and the sites they \
     write are the torture targets, never their own code",
)];

/// Every instruction a patch window executes is outside patchable text (Mark Rutland,
/// "arm64: ensure CPUs are quiescent before patching", linux-arm-kernel, 2021: patching
/// must not modify "portions of stop_machine() itself"). Direct branches are checked
/// above; this checks the indirect ones: every register-indirect branch in
/// `.text.nopatch` is of a known kind, the stop functions the core calls through their
/// vtables (from the debug info) and the write probes (from the source) live in
/// `.text.nopatch`, and so does every code pointer `.text.nopatch` loads from a GOT slot.
fn indirect_calls_stay_in_nopatch(image: &Image) {
    let text = &image.text;
    let in_nopatch = |addr: u64| image.nopatch.contains(&addr);
    let name = |addr: u64| image.function_at(addr).unwrap_or("?").to_string();
    let mut escapes = Vec::new();
    let mut kinds = Vec::new();
    let mut function = String::new();
    for line in image.nopatch_disassembly().lines() {
        if line.ends_with(">:") {
            function = line.to_string();
            continue;
        }
        let Some(insn) = line.split_once(":\t").map(|(_, i)| i.replace('\t', " ")) else {
            continue;
        };
        let mut fields = insn.split_whitespace();
        let (mnemonic, operand) = (fields.next().unwrap_or(""), fields.next().unwrap_or(""));
        // x86: a code pointer loaded from a data slot ("call *0x36(%rip) # 237240",
        // "mov 0x35(%rip),%rbx # 237240"): the slot's word is the target.
        if matches!(mnemonic, "call" | "jmp" | "mov")
            && let Some(slot) = insn
                .split("# ")
                .nth(1)
                .and_then(|s| u64::from_str_radix(s.split_whitespace().next()?, 16).ok())
            && !text.contains(&slot)
            && let Some(target) = image.word_at(slot).filter(|t| text.contains(t))
            && !in_nopatch(target)
        {
            escapes.push(format!(
                "{function} {line}\n    loads {target:#x} <{}> from slot {slot:#x}",
                name(target)
            ));
            continue;
        }
        let indirect = match image.tools {
            "" => matches!(mnemonic, "call" | "jmp") && operand.starts_with('*'),
            _ => matches!(mnemonic, "blr" | "br"),
        };
        if !indirect || insn.contains("(%rip)") {
            continue;
        }
        let site = INDIRECT_SITES
            .iter()
            .find(|(f, _)| function.ends_with(&format!("{f}>:")));
        match site {
            Some((_, kind)) => kinds.push(*kind),
            None => escapes.push(format!(
                "{function} {line}\n    an indirect branch of unknown kind: add it to \
                 INDIRECT_SITES with how its targets are known"
            )),
        }
    }
    if kinds.contains(&Indirect::FixupTrampoline) {
        assert!(
            image
                .nopatch_disassembly()
                .lines()
                .any(|line| line.ends_with("::fault_fixup::trampoline>:")),
            "{}: pm_call_with_fixup is in .text.nopatch, but not the trampoline it calls",
            image.path.display()
        );
    }
    assert!(
        kinds.contains(&Indirect::StopCore) && kinds.contains(&Indirect::WriteProbe),
        "{}: found no stop-function or write-probe call in .text.nopatch; the disassembly \
         scan is broken",
        image.path.display()
    );

    // The core calls the last slot of each vtable: `Fn::call`, or the one method of
    // `StopFunction` / `RaiseNmi`.
    let mut windows = 0;
    for (implementor, trait_, addr, size) in image.vtables() {
        let called_by_core = trait_ == "core::ops::function::Fn<(usize)>"
            || trait_.starts_with("patch_machine::stop::");
        if !called_by_core {
            continue;
        }
        assert!(size >= 32, "no vtable size for {implementor} as {trait_}");
        let call = image
            .word_at(addr + size - 8)
            .unwrap_or_else(|| panic!("vtable {addr:#x} of {implementor} not in the file"));
        if implementor.starts_with("patch_machine::patch::") {
            windows += 1;
        }
        if in_nopatch(call)
            || PATCHABLE_STOP_FUNCTIONS
                .iter()
                .any(|(pattern, _)| implementor.contains(pattern))
        {
            continue;
        }
        escapes.push(format!(
            "stop function {implementor} (as {trait_}): the core calls {call:#x} <{}>",
            name(call)
        ));
    }
    assert!(
        windows > 0,
        "{}: no vtable of patch_machine's stop function in the debug info",
        image.path.display()
    );

    // The write probes, named where the self-tests install them.
    let mut probes = Vec::new();
    collect_write_probes(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        &mut probes,
    );
    assert!(!probes.is_empty(), "no set_write_probe(Some(..)) in src/");
    let mut built = 0;
    for probe in probes {
        let Some(addr) = image.function_named(&probe) else {
            continue; // not built for this arch
        };
        built += 1;
        if !in_nopatch(addr) {
            escapes.push(format!(
                "write probe {probe} at {addr:#x} <{}>: runs inside the patch window",
                name(addr)
            ));
        }
    }
    assert!(
        built > 0,
        "{}: no write probe in the image",
        image.path.display()
    );
    assert!(
        escapes.is_empty(),
        "{}: the patch window can execute patchable text:\n{}",
        image.path.display(),
        escapes.join("\n")
    );
}

/// The functions passed to `set_write_probe(Some(..))` anywhere under `dir`.
fn collect_write_probes(dir: &Path, probes: &mut Vec<String>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            collect_write_probes(&path, probes);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let source = std::fs::read_to_string(&path).unwrap();
            for call in source.split("set_write_probe(Some(").skip(1) {
                let probe: String = call
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !probe.is_empty() && !probes.contains(&probe) {
                    probes.push(probe);
                }
            }
        }
    }
}

#[test]
fn patch_window_indirect_calls_stay_in_nopatch() {
    indirect_calls_stay_in_nopatch(&Image::open(kernel_image(), "aarch64-linux-gnu-"));
}

#[test]
fn x86_patch_window_indirect_calls_stay_in_nopatch() {
    indirect_calls_stay_in_nopatch(&Image::open(x86_kernel_image(), ""));
}

/// One disassembled instruction: address, mnemonic, operands.
#[derive(Debug)]
struct Insn {
    addr: u64,
    mnemonic: String,
    operands: String,
}

impl Insn {
    /// The target of a direct branch ("b.cc 40202e68 <...>", "cbz x8, 40201838 <...>",
    /// "jne 20130f <...>").
    fn direct_target(&self) -> Option<u64> {
        let operands = self.operands.split('<').next()?;
        let last = operands.split([',', ' ']).rfind(|t| !t.is_empty())?;
        u64::from_str_radix(last, 16).ok()
    }

    /// Whether this arm64 instruction may continue at its direct target and also falls
    /// through (a conditional branch).
    fn arm64_conditional(&self) -> bool {
        self.mnemonic.starts_with("b.")
            || matches!(self.mnemonic.as_str(), "cbz" | "cbnz" | "tbz" | "tbnz")
    }
}

/// The functions of `.text.nopatch`, each as its header line and its instructions.
fn nopatch_functions(image: &Image) -> Vec<(String, Vec<Insn>)> {
    let mut functions: Vec<(String, Vec<Insn>)> = Vec::new();
    for line in image.nopatch_disassembly().lines() {
        if line.ends_with(">:") {
            functions.push((line.to_string(), Vec::new()));
            continue;
        }
        // "  40202e68:\tdc\tcvau, x10" / "  20128c:\tcpuid  "
        let Some((addr, insn)) = line.split_once(":\t") else {
            continue;
        };
        let (Ok(addr), Some((_, insns))) =
            (u64::from_str_radix(addr.trim(), 16), functions.last_mut())
        else {
            continue;
        };
        let insn = insn.replace('\t', " ");
        let (mnemonic, operands) = insn.trim().split_once(' ').unwrap_or((insn.trim(), ""));
        insns.push(Insn {
            addr,
            mnemonic: mnemonic.to_string(),
            operands: operands.trim().to_string(),
        });
    }
    functions
}

fn function<'a>(functions: &'a [(String, Vec<Insn>)], name: &str) -> &'a [Insn] {
    let found: Vec<_> = functions.iter().filter(|(h, _)| h.contains(name)).collect();
    assert_eq!(
        found.len(),
        1,
        "expected one function matching {name} in .text.nopatch"
    );
    &found[0].1
}

/// What QEMU's TCG cannot observe (it keeps instruction fetch coherent whatever the
/// kernel does), checked in the arm64 image: `sync_icache_range` cleans to the PoU line
/// by line (a loop of DC CVAU), DSB ISH, invalidates line by line (a loop of IC IVAU),
/// DSB ISH, in that order, returning only after the last barrier; `KernelText` runs it
/// after every page it writes and for `sync_icache`. Which lines, and which side CTR_EL0
/// lets it skip, is `patch::icache::plan`'s decision, tested on the host
/// (tests/patch_host.rs).
#[test]
fn arm64_text_writes_are_cleaned_then_invalidated_with_barriers() {
    let image = Image::open(kernel_image(), "aarch64-linux-gnu-");
    let functions = nopatch_functions(&image);
    let sync = function(&functions, "cache::sync_icache_range>:");
    let step = |i: &Insn| {
        let op = i.operands.split([',', ' ']).next().unwrap_or("");
        match (i.mnemonic.as_str(), op) {
            ("dc", "cvau") => Some("dc cvau"),
            ("ic", "ivau") => Some("ic ivau"),
            ("dsb", "ish") => Some("dsb ish"),
            ("dc" | "ic" | "dsb" | "dmb" | "isb", _) => Some("other maintenance or barrier"),
            _ => None,
        }
    };
    let mut sequence: Vec<&str> = sync.iter().filter_map(step).collect();
    sequence.dedup();
    assert_eq!(
        sequence,
        ["dc cvau", "dsb ish", "ic ivau", "dsb ish"],
        "sync_icache_range must clean, DSB ISH, invalidate, DSB ISH, in that order"
    );
    for op in ["dc cvau", "ic ivau"] {
        let at = sync.iter().find(|i| step(i) == Some(op)).unwrap().addr;
        let in_loop = sync.iter().any(|b| {
            b.addr >= at
                && b.mnemonic.starts_with('b')
                && b.direct_target().is_some_and(|t| t <= at)
        });
        assert!(in_loop, "{op} at {at:#x} is not in a loop over the lines");
    }
    let first = sync.iter().find(|i| step(i).is_some()).unwrap().addr;
    let last = sync.iter().rev().find(|i| step(i).is_some()).unwrap().addr;
    for ret in sync.iter().filter(|i| i.mnemonic == "ret") {
        assert!(
            ret.addr < first || ret.addr > last,
            "sync_icache_range returns at {:#x}, before its last barrier",
            ret.addr
        );
    }

    // On every path from a page written through the alias, sync_icache_range runs
    // before the next page is written or the function returns: in `write_batch`, or
    // wherever it is inlined.
    // (`mmu::poke_text`, the one-word writer under `write_insn`, leaves the maintenance
    // to its caller, as `Text::write_insn` does: tests/patch_host.rs models that.)
    let mut pokes = 0;
    for (header, insns) in functions.iter().filter(|(h, _)| !h.contains("mmu::")) {
        for (at, poke) in insns.iter().enumerate() {
            let page_write = ["mmu::poke_text_page>", "mmu::poke_text_run>"]
                .iter()
                .any(|writer| poke.operands.contains(writer));
            if poke.mnemonic == "bl" && page_write {
                pokes += 1;
                if let Err(path) = maintained_after(insns, at) {
                    panic!(
                        "{header} writes a page at {:#x} and can reach {path} without \
                         sync_icache_range",
                        poke.addr
                    );
                }
            }
        }
    }
    assert!(
        pokes > 0,
        "no call of mmu::poke_text_page or poke_text_run in .text.nopatch"
    );
    let sync_icache = function(&functions, "KernelText>::sync_icache>:");
    assert!(
        sync_icache
            .iter()
            .any(|i| matches!(i.mnemonic.as_str(), "b" | "bl")
                && i.operands.contains("cache::sync_icache_range>")),
        "Text::sync_icache does not run sync_icache_range"
    );
}

/// Whether every path on from `insns[start]` (a page write) calls `sync_icache_range`
/// before it writes again, returns or leaves the function; `Err` names where one does
/// not.
fn maintained_after(insns: &[Insn], start: usize) -> Result<(), String> {
    let index = |addr: u64| insns.iter().position(|i| i.addr == addr);
    let mut seen = vec![false; insns.len()];
    let mut pending = vec![start + 1];
    while let Some(at) = pending.pop() {
        let Some(insn) = insns.get(at) else {
            return Err("the end of the function".into());
        };
        if std::mem::replace(&mut seen[at], true) {
            continue;
        }
        let what = || format!("{} {} at {:#x}", insn.mnemonic, insn.operands, insn.addr);
        let branch = matches!(insn.mnemonic.as_str(), "b" | "bl");
        if branch && insn.operands.contains("cache::sync_icache_range>") {
            continue;
        }
        if insn.mnemonic == "ret" || insn.mnemonic == "br" || insn.operands.contains("poke_text") {
            return Err(what());
        }
        if insn.mnemonic == "b" || insn.arm64_conditional() {
            let target = insn.direct_target().and_then(index).ok_or_else(what)?;
            pending.push(target);
        }
        if insn.mnemonic != "b" {
            pending.push(at + 1);
        }
    }
    Ok(())
}

/// Serialising instructions (Intel SDM vol. 3, "Serializing Instructions"): what a CPU
/// must execute before it runs code another CPU modified.
const X86_SERIALISING: &[&str] = &["cpuid", "serialize", "iretq", "iret"];

/// x86: every CPU leaving the rendezvous executes a serialising instruction before it
/// unmasks (the core's `sync_context` then `restore`, inlined in `participate`): each
/// `sti` / `popf` there is reached only through a CPUID (or SERIALIZE, IRETQ), with no
/// call and no branch target in between.
#[test]
fn x86_cpus_serialise_before_they_unmask() {
    let image = Image::open(x86_kernel_image(), "");
    let functions = nopatch_functions(&image);
    let participate = function(&functions, "StopMachine<A>::participate>:");
    let targets: Vec<u64> = participate
        .iter()
        .filter(|i| i.mnemonic.starts_with('j'))
        .filter_map(Insn::direct_target)
        .collect();
    let mut unmasks = 0;
    for (at, unmask) in participate.iter().enumerate() {
        if !matches!(unmask.mnemonic.as_str(), "sti" | "popf" | "popfq") {
            continue;
        }
        unmasks += 1;
        let mut serialised = false;
        for i in participate[..=at].iter().rev() {
            if X86_SERIALISING.contains(&i.mnemonic.as_str()) {
                serialised = true;
                break;
            }
            if targets.contains(&i.addr) || i.mnemonic.starts_with("call") {
                break;
            }
        }
        assert!(
            serialised,
            "participate unmasks at {:#x} ({}) without a serialising instruction on the way",
            unmask.addr, unmask.mnemonic
        );
    }
    assert!(
        unmasks > 0,
        "no sti/popf in participate: restore moved? (the check needs it inlined there)"
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

/// A kernel entry from user mode (issue 13) runs the context-tracking protocol before
/// anything patchable: `exceptions::from_user`, in `.text.nopatch`, swaps its CPU's state
/// word (one atomic: an LDAXR/STLXR loop, or SWP/CAS with LSE), reaches an ISB (the
/// deferred synchronisation), and only then makes its one indirect call, the hand-off to
/// the user-mode handler, which may run patchable code; the switch back to user mode
/// (an RMW setting bit 0) comes after it. Every direct branch in it stays in
/// `.text.nopatch` or ends the run. (Path-insensitive: it checks the order of the code,
/// which the function's straight-line structure makes the order of execution.)
#[test]
fn user_entry_reaches_patchable_text_only_after_the_deferred_sync() {
    let image = Image::open(kernel_image(), "aarch64-linux-gnu-");
    let functions = nopatch_functions(&image);
    let entry = function(&functions, "exceptions::from_user>:");
    let position = |what: &str, test: &dyn Fn(&Insn) -> bool| {
        entry
            .iter()
            .position(test)
            .unwrap_or_else(|| panic!("exceptions::from_user has no {what}"))
    };
    let is_atomic = |i: &Insn| {
        ["ldaxr", "swp", "cas"]
            .iter()
            .any(|m| i.mnemonic.starts_with(m))
    };
    let swap = position("atomic swap of the state word", &is_atomic);
    let indirect: Vec<usize> = entry
        .iter()
        .enumerate()
        .filter(|(_, i)| matches!(i.mnemonic.as_str(), "blr" | "br" | "blraa" | "blrab"))
        .map(|(at, _)| at)
        .collect();
    assert_eq!(
        indirect.len(),
        1,
        "exceptions::from_user must make exactly one indirect call (the hand-off): {:?}",
        indirect.iter().map(|&at| &entry[at]).collect::<Vec<_>>()
    );
    let handoff = indirect[0];
    assert!(
        swap < handoff,
        "the hand-off at {:#x} comes before the state word's swap at {:#x}",
        entry[handoff].addr,
        entry[swap].addr
    );
    assert!(
        entry[swap..handoff].iter().any(|i| i.mnemonic == "isb"),
        "no ISB between the state word's swap ({:#x}) and the hand-off ({:#x})",
        entry[swap].addr,
        entry[handoff].addr
    );
    let exit = entry[handoff..]
        .iter()
        .position(|i| i.mnemonic == "orr" && i.operands.ends_with("#0x1"))
        .or_else(|| {
            entry[handoff..]
                .iter()
                .position(|i| i.mnemonic.starts_with("ldset"))
        });
    assert!(
        exit.is_some(),
        "no switch back to user mode (bit 0 set) after the hand-off"
    );
    const ENDS_THE_RUN: &[&str] = &["exceptions::fatal", "core::panicking::"];
    for i in entry {
        let direct = matches!(
            i.mnemonic.as_str(),
            "b" | "bl" | "cbz" | "cbnz" | "tbz" | "tbnz"
        ) || i.mnemonic.starts_with("b.");
        let Some(target) = i
            .operands
            .split([' ', ','])
            .filter_map(|t| u64::from_str_radix(t, 16).ok())
            .find(|t| *t > 0x1000)
        else {
            continue;
        };
        assert!(
            !direct
                || image.nopatch.contains(&target)
                || ENDS_THE_RUN.iter().any(|f| i.operands.contains(f)),
            "exceptions::from_user branches into patchable text: {:#x} {} {}",
            i.addr,
            i.mnemonic,
            i.operands
        );
    }
}

/// The kprobes instruction decoder (`patch::x86_decode`) against objdump, on every
/// instruction of the x86_64 kernel's 64-bit text (boot code, which is 16- and 32-bit,
/// excluded): where it decodes, it finds objdump's length, and the relative JMP, CALL
/// and Jcc it emulates with objdump's targets, RET and indirect JMP/CALL with their
/// fix-ups, and a RIP-relative operand wherever objdump shows one. It may refuse, but
/// must decode nearly all of what the compiler emits.
#[test]
fn x86_kprobe_decoder_agrees_with_objdump() {
    use patch_machine::patch::x86_decode::{Execute, Fixup, decode};
    let image = x86_kernel_image();
    let run = |tool: &str, args: &[&str]| run_on(tool, args, image);
    let nm = run("nm", &[]);
    let (start, end) = (symbol(&nm, "__boot_end"), symbol(&nm, "__text_end"));
    let listing = run(
        "objdump",
        &[
            "-d",
            "--insn-width=15",
            &format!("--start-address={start:#x}"),
            &format!("--stop-address={end:#x}"),
        ],
    );
    let (mut decoded, mut refused, mut wrong) = (0usize, Vec::new(), Vec::new());
    for line in listing.lines() {
        // "  2001ae:\t6a 00                \tpush   $0x0"
        let mut fields = line.split('\t');
        let (Some(addr), Some(raw), Some(text)) = (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let Ok(addr) = usize::from_str_radix(addr.trim().trim_end_matches(':'), 16) else {
            continue;
        };
        let bytes: Vec<u8> = raw
            .split_whitespace()
            .map(|b| u8::from_str_radix(b, 16).unwrap())
            .collect();
        let text = text.trim();
        if bytes.is_empty() || text.starts_with("(bad)") || text == "int3" {
            continue;
        }
        let mnemonic = text.split_whitespace().next().unwrap_or("");
        let operand = text.split_whitespace().nth(1).unwrap_or("");
        let direct = u64::from_str_radix(operand, 16).ok().map(|t| t as usize);
        let found = match decode(addr, &bytes) {
            Err(why) => {
                refused.push(format!("{line}: {why}"));
                continue;
            }
            Ok(found) => found,
        };
        decoded += 1;
        let mut wrong_if = |bad: bool, what: &str| {
            if bad {
                wrong.push(format!("{line}: {what}: {found:?}"));
            }
        };
        wrong_if(usize::from(found.len) != bytes.len(), "length");
        match found.execute {
            Execute::Jump { target } => {
                wrong_if(mnemonic != "jmp" || direct != Some(target), "JMP target")
            }
            Execute::Call { target, .. } => {
                wrong_if(mnemonic != "call" || direct != Some(target), "CALL target")
            }
            Execute::Jcc { target, .. } => wrong_if(
                !mnemonic.starts_with('j') || mnemonic == "jmp" || direct != Some(target),
                "Jcc target",
            ),
            Execute::Step { fixup, rip_disp } => {
                wrong_if(
                    rip_disp.is_some() != text.contains("(%rip)"),
                    "RIP-relative operand",
                );
                let expected = match mnemonic {
                    "ret" => Fixup::Absolute,
                    "jmp" if operand.starts_with('*') => Fixup::Absolute,
                    "call" if operand.starts_with('*') => Fixup::CallIndirect,
                    _ => Fixup::Next,
                };
                wrong_if(fixup != expected, "fix-up");
                wrong_if(
                    direct.is_some() && (mnemonic == "jmp" || mnemonic == "call"),
                    "a direct branch stepped",
                );
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {decoded} decoded instructions disagree with objdump:\n{}",
        wrong.len(),
        wrong[..wrong.len().min(40)].join("\n")
    );
    let total = decoded + refused.len();
    println!(
        "{decoded} of {total} instructions decoded; refused (first 40):\n{}",
        refused[..refused.len().min(40)].join("\n")
    );
    assert!(
        decoded > 10_000 && refused.len() * 50 < total,
        "{decoded} decoded, {} refused of {total} (more than 2%):\n{}",
        refused.len(),
        refused[..refused.len().min(60)].join("\n")
    );
}

/// The x86_64 form of `kprobes_hit_path_stays_unprobeable`: every direct call or jump
/// out of `.text.kprobes` (the #BP and #DB hooks, the core's hit path, the XOL slots)
/// goes to `.text.nopatch` (also refused) or a failure path. A probe on a function the
/// hit path reached in ordinary text would trap inside its own handling (counted
/// missed, then executed by the same code: endless).
#[test]
fn x86_kprobes_hit_path_stays_unprobeable() {
    const ALLOWED: &[&str] = &["core::panicking::", "core::slice::index::", "traps::fatal"];
    let image = x86_kernel_image();
    let run = |tool: &str, args: &[&str]| run_on(tool, args, image);
    let nm = run("nm", &[]);
    let (start, end) = (symbol(&nm, "__kprobes_start"), symbol(&nm, "__kprobes_end"));
    let nopatch = symbol(&nm, "__nopatch_start")..symbol(&nm, "__nopatch_end");
    assert!(end > start, "empty .text.kprobes");
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
    let (mut escapes, mut calls_hit, mut function) = (Vec::new(), false, "");
    for line in disassembly.lines() {
        if line.ends_with(">:") {
            function = line;
            continue;
        }
        let Some(insn) = line.split('\t').nth(1) else {
            continue;
        };
        let mut fields = insn.split_whitespace();
        let (Some(mnemonic), Some(operand)) = (fields.next(), fields.next()) else {
            continue;
        };
        if !(mnemonic == "call" || mnemonic.starts_with('j')) {
            continue;
        }
        let Ok(target) = u64::from_str_radix(operand, 16) else {
            continue;
        };
        calls_hit |= insn.contains("Kprobes<A,_>>::hit>");
        if (start..end).contains(&target)
            || nopatch.contains(&target)
            || ALLOWED.iter().any(|callee| insn.contains(callee))
        {
            continue;
        }
        escapes.push(format!("{function} {line}"));
    }
    assert!(
        calls_hit,
        "no call of the core's Kprobes::hit in .text.kprobes: the #BP hook or the scan is broken"
    );
    assert!(
        escapes.is_empty(),
        "x86 .text.kprobes branches into probeable text:\n{}",
        escapes.join("\n")
    );
}

/// x86: the kernel entry from ring 3 (`traps::from_user`, every entry stub's first
/// stop for a ring 3 frame) swaps the state word (`XCHG`, one RMW), then, before any
/// branch into patchable text, executes `CPUID` (x86 does not serialise on `INT` or an
/// interrupt; Linux's deferral gets its serialisation from the CR3 write); it makes no
/// indirect call; after the hand-off it switches back to user mode (`LOCK OR $1`).
#[test]
fn x86_user_entry_reaches_patchable_text_only_after_the_deferred_sync() {
    let image = Image::open(x86_kernel_image(), "");
    let functions = nopatch_functions(&image);
    let entry = function(&functions, "traps::from_user>:");
    let position = |what: &str, test: &dyn Fn(&Insn) -> bool| {
        entry
            .iter()
            .position(test)
            .unwrap_or_else(|| panic!("traps::from_user has no {what}"))
    };
    let swap = position("atomic swap of the state word (xchg)", &|i| {
        i.mnemonic == "xchg" && !i.operands.contains("%rbx")
    });
    let serialise = position("serialising instruction", &|i| {
        X86_SERIALISING.contains(&i.mnemonic.as_str())
    });
    assert!(
        swap < serialise,
        "the serialising {:#x} comes before the state word's swap at {:#x}",
        entry[serialise].addr,
        entry[swap].addr
    );
    const ENDS_THE_RUN: &[&str] = &["traps::fatal", "core::panicking::"];
    let mut handoff = None;
    for (at, i) in entry.iter().enumerate() {
        let branch = i.mnemonic.starts_with('j') || i.mnemonic.starts_with("call");
        if !branch {
            continue;
        }
        assert!(
            !i.operands.starts_with('*'),
            "traps::from_user makes an indirect branch: {:#x} {} {}",
            i.addr,
            i.mnemonic,
            i.operands
        );
        let Some(target) = i.direct_target() else {
            continue;
        };
        if image.nopatch.contains(&target) || ENDS_THE_RUN.iter().any(|f| i.operands.contains(f)) {
            continue;
        }
        assert!(
            at > serialise,
            "traps::from_user branches into patchable text at {:#x} ({} {}) before its \
             serialising instruction at {:#x}",
            i.addr,
            i.mnemonic,
            i.operands,
            entry[serialise].addr
        );
        handoff.get_or_insert(at);
    }
    let handoff = handoff.expect("traps::from_user never hands over to patchable code");
    assert!(
        entry[handoff..].iter().any(|i| i.mnemonic == "lock"
            && i.operands.starts_with("or")
            && i.operands.contains("$0x1,")),
        "no switch back to user mode (LOCK OR $1) after the hand-off"
    );
}
