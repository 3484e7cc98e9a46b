//! Property tests of the x86 encoders and the INT3 handler's decoder
//! (`src/patch/x86.rs`): no input panics; a rel32 encoder refuses exactly the targets
//! a 32-bit displacement cannot reach; every byte string of 1 to 8 bytes is an
//! instruction and nothing else is; what is encoded decodes (`emulation`) to the same
//! target, return address, immediate or next instruction, and what `emulation`
//! accepts is exactly the forms the encoders make; and, on a seeded sample, GNU
//! objdump reads each encoding as the same instruction with the same operand.

use patch_machine::patch::Instruction;
use patch_machine::patch::x86::{self, Emulation, EncodeError, Insn, MAX_LEN};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, TestRunner};

#[path = "support/objdump.rs"]
mod objdump;
mod support;

/// The host's objdump (binutils), which reads x86-64.
const OBJDUMP: &str = "objdump";
/// Instructions in the objdump sample (one objdump run).
const OBJDUMP_SAMPLE: usize = 4096;
/// A kernel text address (Linux's `__START_KERNEL_map` plus 16 MiB).
const SAMPLE_VMA: u64 = 0xffff_ffff_8100_0000;

/// The Intel SDM's recommended NOPs (Vol. 2B, "NOP"), written out apart from
/// `x86.rs`'s table.
const SDM_NOPS: [&[u8]; 8] = [
    &[0x90],
    &[0x66, 0x90],
    &[0x0f, 0x1f, 0x00],
    &[0x0f, 0x1f, 0x40, 0x00],
    &[0x0f, 0x1f, 0x44, 0x00, 0x00],
    &[0x66, 0x0f, 0x1f, 0x44, 0x00, 0x00],
    &[0x0f, 0x1f, 0x80, 0x00, 0x00, 0x00, 0x00],
    &[0x0f, 0x1f, 0x84, 0x00, 0x00, 0x00, 0x00, 0x00],
];

fn config() -> Config {
    Config {
        failure_persistence: None,
        ..Config::default()
    }
}

/// Any address, weighted towards the ends of the address space.
fn any_addr() -> impl Strategy<Value = usize> {
    prop_oneof![
        any::<usize>(),
        0usize..1 << 16,
        (0usize..1 << 16).prop_map(|a| usize::MAX - a),
        (0usize..16).prop_map(|a| usize::MAX - a),
    ]
}

/// A branch and its target: unrelated, or the target a rel32 or so away (both sides
/// of each limit come up).
fn branch_and_target() -> impl Strategy<Value = (usize, usize)> {
    let limits = [
        i32::MIN as i64,
        i32::MIN as i64 - 1,
        i32::MAX as i64,
        i32::MAX as i64 + 1,
    ];
    // The displacement counts from the end of the 5-byte instruction.
    let from_end =
        |(pc, delta): (usize, i64)| (pc, pc.wrapping_add(5).wrapping_add_signed(delta as isize));
    prop_oneof![
        (any_addr(), any_addr()),
        (any_addr(), -(1i64 << 33)..(1i64 << 33)).prop_map(from_end),
        (any_addr(), prop::sample::select(limits.to_vec())).prop_map(from_end),
    ]
}

/// Byte strings of 0 to 12 bytes, often starting like an instruction `emulation`
/// knows, or exactly a recommended NOP.
fn byte_string() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..=12),
        (
            prop::sample::select(vec![0xe8u8, 0xe9, 0xb8, 0x90, 0x66, 0x0f, 0xcc, 0xc3]),
            prop::collection::vec(any::<u8>(), 0..=7)
        )
            .prop_map(|(first, rest)| [vec![first], rest].concat()),
        prop::sample::select(SDM_NOPS.to_vec()).prop_map(<[u8]>::to_vec),
        // A NOP with one byte changed.
        (
            prop::sample::select(SDM_NOPS.to_vec()),
            any::<usize>(),
            any::<u8>()
        )
            .prop_map(|(nop, at, byte)| {
                let mut nop = nop.to_vec();
                let at = at % nop.len();
                nop[at] = byte;
                nop
            }),
    ]
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn rel32_encoders_refuse_exactly_the_unreachable_targets(
        (pc, target) in branch_and_target()
    ) {
        let delta = target as i128 - (pc as i128 + 5);
        let reachable = (i32::MIN as i128..=i32::MAX as i128).contains(&delta);
        for (encode, opcode) in [
            (x86::jmp_rel32 as fn(usize, usize) -> _, 0xe9u8),
            (x86::call_rel32, 0xe8),
        ] {
            let got = encode(pc, target);
            prop_assert_eq!(
                got.map(|_| ()),
                if reachable { Ok(()) } else { Err(EncodeError::OutOfRange { pc, target }) }
            );
            let Ok(insn) = got else { continue };
            prop_assert_eq!(insn.size(), 5);
            let bytes = insn.bytes();
            prop_assert_eq!(bytes[0], opcode);
            prop_assert_eq!(
                i32::from_le_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]) as i128,
                delta
            );
            let decoded = x86::emulation(pc, &insn);
            let expected = if opcode == 0xe9 {
                Emulation::Jump(target)
            } else {
                Emulation::Call { target, ret: pc.wrapping_add(5) }
            };
            prop_assert_eq!(decoded, Some(expected));
            prop_assert!(!Insn::cmodx_pair_allowed(insn, insn), "x86 allows no live pair");
        }
    }

    #[test]
    fn mov_eax_decodes_to_its_immediate(imm in any::<u32>(), pc in any_addr()) {
        let insn = x86::mov_eax_imm32(imm);
        prop_assert_eq!(insn.bytes()[0], 0xb8);
        prop_assert_eq!(&insn.bytes()[1..], &imm.to_le_bytes()[..]);
        prop_assert_eq!(
            x86::emulation(pc, &insn),
            Some(Emulation::MovEax { imm, next: pc.wrapping_add(5) })
        );
    }

    #[test]
    fn nop_has_exactly_the_lengths_of_the_sdm_table(len in prop_oneof![0usize..=10, any::<usize>()], pc in any_addr()) {
        let got = x86::nop(len);
        if !(1..=MAX_LEN).contains(&len) {
            prop_assert_eq!(got, Err(EncodeError::BadLength(len)));
            prop_assert!(!EncodeError::BadLength(len).to_string().is_empty());
            return Ok(());
        }
        let insn = got.expect("a length of the table");
        prop_assert_eq!(insn.bytes(), SDM_NOPS[len - 1]);
        prop_assert_eq!(x86::emulation(pc, &insn), Some(Emulation::Next(pc.wrapping_add(len))));
    }

    /// 1 to 8 bytes are an instruction, anything else is refused; the bytes come back
    /// as given through `bytes` and through the little-endian word.
    #[test]
    fn byte_strings_round_trip(bytes in byte_string(), word in any::<u64>(), len in 0usize..=12) {
        let insn = Insn::from_bytes(&bytes);
        prop_assert_eq!(insn.is_some(), (1..=MAX_LEN).contains(&bytes.len()));
        if let Some(insn) = insn {
            prop_assert_eq!(insn.bytes(), &bytes[..]);
            prop_assert_eq!(insn.size(), bytes.len());
            let mut padded = [0u8; 8];
            padded[..bytes.len()].copy_from_slice(&bytes);
            prop_assert_eq!(insn.to_le_word(), u64::from_le_bytes(padded));
            prop_assert_eq!(Insn::from_le_word(insn.to_le_word(), insn.size()), Some(insn));
            let hex = format!("{insn:x}");
            prop_assert_eq!(hex.split(' ').count(), bytes.len());
            let debug = format!("{insn:?}");
            prop_assert!(debug.starts_with("x86::Insn("));
        }
        let from_word = Insn::from_le_word(word, len);
        prop_assert_eq!(from_word.is_some(), (1..=MAX_LEN).contains(&len));
        if let Some(insn) = from_word {
            prop_assert_eq!(insn.bytes(), &word.to_le_bytes()[..len]);
        }
    }

    /// `emulation` accepts exactly JMP/CALL rel32, `MOV $imm32, %eax` and the
    /// recommended NOPs (the forms the encoders make), whatever the bytes and the
    /// address, and says what each does.
    #[test]
    fn emulation_accepts_exactly_the_encoders_forms(bytes in byte_string(), pc in any_addr()) {
        let Some(insn) = Insn::from_bytes(&bytes) else { return Ok(()) };
        let next = pc.wrapping_add(bytes.len());
        let rel = || i32::from_le_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]) as isize;
        let expected = match (bytes[0], bytes.len()) {
            (0xe9, 5) => Some(Emulation::Jump(next.wrapping_add_signed(rel()))),
            (0xe8, 5) => Some(Emulation::Call { target: next.wrapping_add_signed(rel()), ret: next }),
            (0xb8, 5) => Some(Emulation::MovEax {
                imm: u32::from_le_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]),
                next,
            }),
            _ if SDM_NOPS.contains(&&bytes[..]) => Some(Emulation::Next(next)),
            _ => None,
        };
        prop_assert_eq!(x86::emulation(pc, &insn), expected);
    }
}

/// What a sample instruction is.
#[derive(Clone, Copy, Debug)]
enum Made {
    Jmp(u64),
    Call(u64),
    MovEax(u32),
    Nop,
    Int3,
    Ret,
}

/// The sample: `OBJDUMP_SAMPLE` instructions drawn with proptest's seeded RNG, laid
/// back to back from `SAMPLE_VMA`, each encoded for its own address.
fn sample() -> Vec<(Insn, Made)> {
    let mut runner = TestRunner::deterministic();
    let choice = (0usize..6, any::<i32>(), any::<u32>(), 1usize..=MAX_LEN);
    let mut pc = SAMPLE_VMA as usize;
    (0..OBJDUMP_SAMPLE)
        .map(|_| {
            let (kind, delta, imm, len) =
                choice.new_tree(&mut runner).expect("no filters").current();
            // Targets above the top of the address space fold back below the branch.
            let end = pc + 5;
            let target = end
                .checked_add_signed(delta as isize)
                .unwrap_or(end - delta.unsigned_abs() as usize);
            let made = match kind {
                0 => (
                    x86::jmp_rel32(pc, target).expect("rel32"),
                    Made::Jmp(target as u64),
                ),
                1 => (
                    x86::call_rel32(pc, target).expect("rel32"),
                    Made::Call(target as u64),
                ),
                2 => (x86::mov_eax_imm32(imm), Made::MovEax(imm)),
                3 => (x86::nop(len).expect("1 to 8"), Made::Nop),
                4 => (x86::int3(), Made::Int3),
                _ => (x86::ret(), Made::Ret),
            };
            pc += made.0.size();
            made
        })
        .collect()
}

/// GNU objdump reads every instruction of the sample at its address, with its bytes,
/// as the encoder meant it: the JMP/CALL target (and `emulation`'s), MOV's immediate,
/// a NOP of any of its names, INT3, RET.
#[test]
fn objdump_reads_the_encoders_sample() {
    let sample = sample();
    let bytes: Vec<u8> = sample
        .iter()
        .flat_map(|(i, _)| i.bytes().to_vec())
        .collect();
    let lines = objdump::disassemble(OBJDUMP, "i386:x86-64", SAMPLE_VMA, &bytes);
    assert_eq!(
        lines.len(),
        sample.len(),
        "one objdump line per instruction"
    );
    let mut problems = Vec::new();
    let mut pc = SAMPLE_VMA;
    for (line, &(insn, made)) in lines.iter().zip(&sample) {
        let m = line.mnemonic.as_str();
        let ok = line.addr == pc
            && line.encoding == format!("{insn:x}")
            && match made {
                Made::Jmp(target) => m == "jmp" && line.address_operand() == Some(target),
                Made::Call(target) => m == "call" && line.address_operand() == Some(target),
                Made::MovEax(imm) => m == "mov" && line.operands == format!("${imm:#x},%eax"),
                Made::Nop => ["nop", "nopl", "nopw", "xchg"].contains(&m),
                Made::Int3 => m == "int3",
                Made::Ret => m == "ret",
            };
        let emulated = match (x86::emulation(pc as usize, &insn), made) {
            (Some(Emulation::Jump(t)), Made::Jmp(target)) => t as u64 == target,
            (Some(Emulation::Call { target: t, ret }), Made::Call(target)) => {
                t as u64 == target && ret as u64 == pc + 5
            }
            (Some(Emulation::MovEax { imm: i, .. }), Made::MovEax(imm)) => i == imm,
            (Some(Emulation::Next(next)), Made::Nop) => next as u64 == pc + insn.size() as u64,
            (None, Made::Int3 | Made::Ret) => true,
            _ => false,
        };
        if !ok || !emulated {
            problems.push(format!(
                "{pc:#x}: {insn:x} ({made:?}), objdump `{} {}` at {:#x}, emulation {:?}",
                line.mnemonic,
                line.operands,
                line.addr,
                x86::emulation(pc as usize, &insn)
            ));
        }
        pc += insn.size() as u64;
    }
    assert!(
        problems.is_empty(),
        "{} disagreements with objdump:\n{}",
        problems.len(),
        problems.join("\n")
    );
    println!(
        "# x86 objdump sample: {} instructions, {} bytes",
        sample.len(),
        bytes.len()
    );
}
