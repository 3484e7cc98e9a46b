//! The x86 encoders of `patch::x86` against GNU as (the host's own assembler), and the
//! INT3 handler's decoder against the encoders.
//!
//! The assembler runs once, on a file with one instruction per case placed at a known
//! offset; the test compares the bytes it produced with the encoders'.

use patch_machine::patch::x86::{self, Emulation, Insn};
use patch_machine::patch::{Instruction, Patch};
use std::fmt::Write as _;
use std::process::Command;

/// Offset of case `i` in the assembled section: 16 bytes apart, room for any case.
fn slot(i: usize) -> usize {
    16 * i
}

struct Case {
    asm: String,
    ours: Insn,
}

fn cases() -> Vec<Case> {
    let mut cases = Vec::new();
    // Branch displacements across the rel32 range, both directions, from slot offsets.
    for delta in [
        5i64,
        0,
        -5,
        100,
        -100,
        0x7fff_0000,
        -0x7fff_0000,
        i32::MAX as i64 + 5,
        i32::MIN as i64 + 5,
    ] {
        for (kind, encode) in [
            ("jmp.d32", x86::jmp_rel32 as fn(usize, usize) -> _),
            ("call", x86::call_rel32),
        ] {
            let index = cases.len();
            let pc = 0x8000_0000_0000usize + slot(index);
            let target = (pc as i64 + delta) as usize;
            cases.push(Case {
                asm: format!("{kind} . + ({delta})"),
                ours: encode(pc, target).expect("in range"),
            });
        }
    }
    for imm in [0u32, 1, 0x1111, 0x8000_0000, u32::MAX] {
        cases.push(Case {
            asm: format!("mov ${imm:#x}, %eax"),
            ours: x86::mov_eax_imm32(imm),
        });
    }
    cases.push(Case {
        asm: "int3".into(),
        ours: x86::int3(),
    });
    cases.push(Case {
        asm: "ret".into(),
        ours: x86::ret(),
    });
    cases
}

/// Assembles `cases`, each at its slot, and returns the section's bytes.
fn assemble(cases: &[Case]) -> Vec<u8> {
    let dir = std::env::temp_dir().join(format!("pm-x86-insn-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut source = String::from(".text\n");
    for (i, case) in cases.iter().enumerate() {
        writeln!(source, ".org {}\n{}", slot(i), case.asm).unwrap();
    }
    writeln!(source, ".org {}", slot(cases.len())).unwrap();
    let (src, obj, bin) = (dir.join("t.s"), dir.join("t.o"), dir.join("t.bin"));
    std::fs::write(&src, source).unwrap();
    let run = |cmd: &mut Command| {
        let out = cmd
            .output()
            .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (needs GNU binutils)"));
        assert!(
            out.status.success(),
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(Command::new("as").arg("--64").arg("-o").arg(&obj).arg(&src));
    run(Command::new("objcopy")
        .args(["-O", "binary", "-j", ".text"])
        .arg(&obj)
        .arg(&bin));
    let bytes = std::fs::read(&bin).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    bytes
}

#[test]
fn encoders_match_gnu_as() {
    let cases = cases();
    let bytes = assemble(&cases);
    for (i, case) in cases.iter().enumerate() {
        let theirs = &bytes[slot(i)..slot(i) + case.ours.size()];
        assert_eq!(
            theirs,
            case.ours.bytes(),
            "`{}`: as gives {theirs:02x?}, we give {:x}",
            case.asm,
            case.ours
        );
        // Nothing more in the slot: the lengths agree too.
        assert!(
            bytes[slot(i) + case.ours.size()..slot(i + 1)]
                .iter()
                .all(|&b| b == 0),
            "`{}` is longer than our {} bytes",
            case.asm,
            case.ours.size()
        );
    }
}

#[test]
fn nops_decode_as_one_nop_each() {
    let mut source = String::from(".text\n");
    for len in 1..=x86::MAX_LEN {
        let nop = x86::nop(len).unwrap();
        assert_eq!(nop.size(), len);
        writeln!(source, ".org {}, 0xcc", slot(len)).unwrap();
        for byte in nop.bytes() {
            writeln!(source, ".byte {byte:#x}").unwrap();
        }
    }
    let dir = std::env::temp_dir().join(format!("pm-x86-nop-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (src, obj) = (dir.join("n.s"), dir.join("n.o"));
    std::fs::write(&src, source).unwrap();
    assert!(
        Command::new("as")
            .arg("--64")
            .arg("-o")
            .arg(&obj)
            .arg(&src)
            .status()
            .unwrap()
            .success()
    );
    let out = Command::new("objdump")
        .arg("-d")
        .arg(&obj)
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&out.stdout);
    let _ = std::fs::remove_dir_all(&dir);
    for len in 1..=x86::MAX_LEN {
        let lines: Vec<&str> = listing.lines().collect();
        let at = lines
            .iter()
            .position(|l| l.trim_start().starts_with(&format!("{:x}:", slot(len))))
            .unwrap_or_else(|| panic!("no instruction at {:#x}:\n{listing}", slot(len)));
        let line = lines[at];
        let fields: Vec<&str> = line.split('\t').collect();
        let mnemonic = fields.get(2).map_or("", |f| f.trim());
        // objdump continues encodings longer than 7 bytes on lines without a mnemonic.
        let encoded: usize = lines[at..]
            .iter()
            .enumerate()
            .take_while(|(i, l)| *i == 0 || l.split('\t').count() == 2)
            .map(|(_, l)| {
                l.split('\t')
                    .nth(1)
                    .map_or(0, |f| f.split_whitespace().count())
            })
            .sum();
        assert!(
            mnemonic.starts_with("nop") || mnemonic.starts_with("xchg   %ax,%ax"),
            "nop({len}) decodes as `{mnemonic}`"
        );
        assert_eq!(
            encoded, len,
            "nop({len}) decodes as {encoded} bytes: {line}"
        );
    }
    assert!(x86::nop(0).is_err() && x86::nop(x86::MAX_LEN + 1).is_err());
}

#[test]
fn emulation_follows_the_encoding() {
    let pc = 0xffff_ffff_8010_0000usize;
    let target = pc - 0x1234;
    assert_eq!(
        x86::emulation(pc, &x86::jmp_rel32(pc, target).unwrap()),
        Some(Emulation::Jump(target))
    );
    assert_eq!(
        x86::emulation(pc, &x86::call_rel32(pc, target).unwrap()),
        Some(Emulation::Call {
            target,
            ret: pc + 5
        })
    );
    assert_eq!(
        x86::emulation(pc, &x86::mov_eax_imm32(0x2222)),
        Some(Emulation::MovEax {
            imm: 0x2222,
            next: pc + 5
        })
    );
    for len in 1..=x86::MAX_LEN {
        assert_eq!(
            x86::emulation(pc, &x86::nop(len).unwrap()),
            Some(Emulation::Next(pc + len))
        );
    }
    assert_eq!(x86::emulation(pc, &x86::int3()), None);
    assert_eq!(x86::emulation(pc, &x86::ret()), None);
}

#[test]
fn out_of_range_and_bad_bytes_are_refused() {
    let pc = 0x1000usize;
    assert!(x86::jmp_rel32(pc, pc + 5 + (1 << 31)).is_err());
    assert!(x86::call_rel32(pc + (1 << 40), pc).is_err());
    assert!(x86::jmp_rel32(pc, pc + 5 + i32::MAX as usize).is_ok());
    assert_eq!(Insn::from_bytes(&[]), None);
    assert_eq!(Insn::from_bytes(&[0x90; x86::MAX_LEN + 1]), None);
    // x86 accepts no live pair: everything goes through the INT3 protocol or a stop.
    let nop5 = x86::nop(5).unwrap();
    let jmp = x86::jmp_rel32(pc, pc + 64).unwrap();
    assert!(!Insn::cmodx_pair_allowed(nop5, jmp));
    let patch = Patch::new(pc, nop5, jmp);
    assert_eq!(patch.range(), pc..pc + 5);
    assert_eq!(format!("{jmp:x}"), "e9 3b 00 00 00");
}

/// What the INT3 handler does for a CALL rel32 in flight: the target is relative to
/// the end of the 5-byte instruction, and the return address it pushes is that end
/// (site + 5), never the site itself.
#[test]
fn call_emulation_pushes_the_next_instruction() {
    let pc = 0x1_8022_203ausize;
    let call = |bytes: &[u8]| x86::emulation(pc, &Insn::from_bytes(bytes).unwrap());
    // rel32 = 0: the next instruction; -5: the site itself; forward and backward.
    assert_eq!(
        call(&[0xe8, 0, 0, 0, 0]),
        Some(Emulation::Call {
            target: pc + 5,
            ret: pc + 5
        })
    );
    assert_eq!(
        call(&[0xe8, 0xfb, 0xff, 0xff, 0xff]),
        Some(Emulation::Call {
            target: pc,
            ret: pc + 5
        })
    );
    assert_eq!(
        call(&[0xe8, 0x30, 0, 0, 0]),
        Some(Emulation::Call {
            target: pc + 5 + 0x30,
            ret: pc + 5
        })
    );
    assert_eq!(
        call(&[0xe8, 0x00, 0x00, 0x00, 0x80]),
        Some(Emulation::Call {
            target: pc + 5 - (1 << 31),
            ret: pc + 5
        })
    );
    // Every encodable target round-trips through the encoder and the decoder.
    for target in [pc - 0x1234, pc + 5 + i32::MAX as usize, pc + 5 - (1 << 31)] {
        assert_eq!(
            x86::emulation(pc, &x86::call_rel32(pc, target).unwrap()),
            Some(Emulation::Call {
                target,
                ret: pc + 5
            }),
            "call to {target:#x}"
        );
    }
    // Only the 5-byte form: E8 with a 16-bit or a truncated offset is not emulated.
    assert_eq!(call(&[0xe8, 0, 0, 0]), None);
    assert_eq!(call(&[0xe8, 0, 0, 0, 0, 0x90]), None);
    // A CALL and a JMP to the same place differ only in the return address pushed.
    let jmp = x86::emulation(pc, &x86::jmp_rel32(pc, pc + 0x100).unwrap());
    assert_eq!(jmp, Some(Emulation::Jump(pc + 0x100)));
}

/// RFLAGS after `cmp b, a` (computing `a - b`) on this (x86_64) host.
#[cfg(target_arch = "x86_64")]
fn flags_of_cmp(a: u64, b: u64) -> u64 {
    let flags: u64;
    // SAFETY: a compare and a push/pop of RFLAGS on our own stack.
    unsafe {
        std::arch::asm!("cmp {a}, {b}", "pushfq", "pop {f}", a = in(reg) a, b = in(reg) b,
            f = out(reg) flags)
    };
    flags
}

/// The kprobes Jcc emulation's condition evaluation against the host CPU's own flags of
/// a compare and what each condition means for the compared numbers.
#[cfg(target_arch = "x86_64")]
#[test]
fn jcc_conditions_match_the_cpu() {
    use patch_machine::patch::x86_decode::condition_holds;
    let values = [
        0u64,
        1,
        2,
        5,
        0x7f,
        0x80,
        i64::MAX as u64,
        1 << 63,
        u64::MAX - 1,
        u64::MAX,
    ];
    for &a in &values {
        for &b in &values {
            let flags = flags_of_cmp(a, b);
            let diff = a.wrapping_sub(b);
            let (sa, sb) = (a as i64, b as i64);
            let meaning = [
                sa.checked_sub(sb).is_none(),                // O
                a < b,                                       // B
                a == b,                                      // E
                a <= b,                                      // BE
                (diff as i64) < 0,                           // S
                (diff as u8).count_ones().is_multiple_of(2), // P
                sa < sb,                                     // L
                sa <= sb,                                    // LE
            ];
            for cond in 0..16u8 {
                let expected = meaning[usize::from(cond >> 1)] != (cond & 1 == 1);
                assert_eq!(
                    condition_holds(cond, flags),
                    expected,
                    "condition {cond:#x} after cmp {b:#x}, {a:#x} (RFLAGS {flags:#x})"
                );
            }
        }
    }
}

/// An out-of-line copy's RIP-relative displacement names the same address from the
/// slot; the rest of the copy is the instruction; a copy out of rel32 reach is refused.
#[test]
fn xol_copies_rebase_rip_relative_operands() {
    use patch_machine::patch::x86_decode::{Execute, decode};
    // mov 0x100(%rip), %rax
    let insn = [0x48, 0x8b, 0x05, 0x00, 0x01, 0x00, 0x00];
    let (addr, xol) = (0x20_0000usize, 0x30_0000usize);
    let decoded = decode(addr, &insn).unwrap();
    assert!(matches!(
        decoded.execute,
        Execute::Step {
            rip_disp: Some(3),
            ..
        }
    ));
    let copy = decoded.xol_copy(addr, xol).unwrap();
    let disp = i32::from_le_bytes(copy[3..7].try_into().unwrap()) as i64;
    assert_eq!(xol as i64 + 7 + disp, addr as i64 + 7 + 0x100);
    assert_eq!(copy[..3], insn[..3]);
    assert!(decoded.xol_copy(addr, addr + (1 << 32)).is_none());
    // Not RIP-relative: copied as it is.
    let lea = [0x48, 0x8d, 0x04, 0x7f];
    let decoded = decode(addr, &lea).unwrap();
    assert_eq!(decoded.xol_copy(addr, xol).unwrap()[..4], lea);
}
