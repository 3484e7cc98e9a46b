//! Property tests of the A64 encoders, decoders and CMODX classifier
//! (`src/patch/insn.rs`): no input panics; an encoder refuses exactly the inputs the
//! Arm ARM cannot encode, with the error that names the reason; what it encodes
//! decodes back to the same fields; and, on a seeded sample, GNU objdump reads the
//! same instruction, target, condition and immediate.
//!
//! Cases per property: proptest's `PROPTEST_CASES` (256 unless set); the longer run is
//! in README, "Property tests".

use patch_machine::patch::insn::{
    self, B_COND_MAX_BACKWARD, B_COND_MAX_FORWARD, B_MAX_BACKWARD, B_MAX_FORWARD, Cond,
    EncodeError, InsnClass,
};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, TestRunner};

#[path = "support/a64_words.rs"]
mod a64_words;
#[path = "support/objdump.rs"]
mod objdump;
mod support;

use a64_words::{CLASSES, a64_word, any_addr, word_of};

const OBJDUMP: &str = "aarch64-linux-gnu-objdump";

/// Words in the objdump sample: one objdump run, well under a second.
const OBJDUMP_SAMPLE: usize = 4096;

/// Where the sample is disassembled: a kernel-half address, so that targets are
/// near the top of the address space.
const SAMPLE_VMA: u64 = 0xffff_8000_1000_0000;

fn config() -> Config {
    Config {
        // Failures are reproduced by the regression tests below, not a file in tests/.
        failure_persistence: None,
        ..Config::default()
    }
}

/// A branch and a target: unrelated, or the target within a few branch ranges of the
/// branch (so both sides of each limit come up), aligned or not.
fn branch_and_target() -> impl Strategy<Value = (usize, usize)> {
    prop_oneof![
        (any_addr(), any_addr()),
        (any_addr(), -(1isize << 29)..(1isize << 29))
            .prop_map(|(pc, delta)| (pc, pc.wrapping_add_signed(delta))),
        (any_addr(), -(1isize << 21)..(1isize << 21))
            .prop_map(|(pc, delta)| (pc & !3, pc.wrapping_add_signed(delta & !3))),
        // Exactly at a limit, or one word past it.
        (any_addr(), prop::sample::select(limits()))
            .prop_map(|(pc, delta)| (pc & !3, (pc & !3).wrapping_add_signed(delta))),
    ]
}

fn limits() -> Vec<isize> {
    let mut out = Vec::new();
    for (back, fwd) in [
        (B_MAX_BACKWARD, B_MAX_FORWARD),
        (B_COND_MAX_BACKWARD, B_COND_MAX_FORWARD),
    ] {
        let (back, fwd) = (back as isize, fwd as isize);
        out.extend([-back, -back - 4, fwd, fwd + 4]);
    }
    out
}

/// The verdict the Arm ARM gives, computed without wrapping: aligned, and
/// `-back <= target - pc <= fwd` over the integers.
fn expected_branch(pc: usize, target: usize, back: usize, fwd: usize) -> Result<(), EncodeError> {
    if !pc.is_multiple_of(4) || !target.is_multiple_of(4) {
        return Err(EncodeError::MisalignedBranch { pc, target });
    }
    let delta = target as i128 - pc as i128;
    if delta < -(back as i128) || delta > fwd as i128 {
        return Err(EncodeError::BranchOutOfRange {
            pc,
            target,
            range: back,
        });
    }
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn b_and_bl_encode_exactly_the_reachable_aligned_targets(
        (pc, target) in branch_and_target()
    ) {
        let expected = expected_branch(pc, target, B_MAX_BACKWARD, B_MAX_FORWARD);
        for (encode, opcode, class) in [
            (insn::b as fn(usize, usize) -> _, 0x1400_0000u32, InsnClass::B),
            (insn::bl, 0x9400_0000, InsnClass::Bl),
        ] {
            let got = encode(pc, target);
            prop_assert_eq!(got.map(|_| ()), expected);
            if let Ok(word) = got {
                prop_assert_eq!(word & 0xfc00_0000, opcode);
                prop_assert_eq!(insn::classify(word), class);
                prop_assert_eq!(insn::branch_target(pc, word), Some(target));
                prop_assert!(insn::is_cmodx_safe(word));
            }
        }
    }

    #[test]
    fn b_cond_encodes_exactly_the_reachable_aligned_targets(
        (pc, target) in branch_and_target(),
        bits in 0u32..16,
    ) {
        let cond = Cond::from_bits(bits);
        let expected = expected_branch(pc, target, B_COND_MAX_BACKWARD, B_COND_MAX_FORWARD);
        let got = insn::b_cond(pc, target, cond);
        prop_assert_eq!(got.map(|_| ()), expected);
        if let Ok(word) = got {
            prop_assert_eq!(word & 0xff00_0010, 0x5400_0000);
            prop_assert_eq!(word & 0xf, bits);
            prop_assert_eq!(insn::classify(word), InsnClass::BCond);
            prop_assert_eq!(insn::branch_target(pc, word), Some(target));
            prop_assert!(!insn::is_cmodx_safe(word), "B.cond is not in the CMODX list");
        }
    }

    /// Decode then encode: every branch word at any PC whose target does not wrap is
    /// what the encoder makes for that target, bit for bit.
    #[test]
    fn branch_words_decode_and_re_encode_to_themselves(
        word in a64_word(),
        pc in any_addr(),
    ) {
        let pc = pc & !3;
        let target = insn::branch_target(pc, word);
        let offset = match insn::classify(word) {
            InsnClass::B | InsnClass::Bl => i64::from(((word << 6) as i32) >> 6) * 4,
            InsnClass::BCond => i64::from((((word >> 5) << 13) as i32) >> 13) * 4,
            _ => {
                prop_assert_eq!(target, None);
                return Ok(());
            }
        };
        let exact = pc as i128 + i128::from(offset);
        let fits = (0..=usize::MAX as i128).contains(&exact);
        prop_assert_eq!(target, fits.then_some(exact as usize), "pc {:#x} word {:#010x}", pc, word);
        let Some(target) = target else { return Ok(()) };
        let again = match insn::classify(word) {
            InsnClass::B => insn::b(pc, target),
            InsnClass::Bl => insn::bl(pc, target),
            _ => insn::b_cond(pc, target, Cond::from_bits(word)),
        };
        prop_assert_eq!(again, Ok(word));
    }

    #[test]
    fn movz_refuses_exactly_bad_registers_and_shifts(
        rd in any::<u8>(),
        imm in any::<u16>(),
        shift in prop_oneof![any::<u8>(), prop::sample::select(vec![0u8, 16, 32, 48])],
    ) {
        let got = insn::movz_x(rd, imm, shift);
        let expected = if rd > 30 {
            Err(EncodeError::InvalidRegister { reg: rd })
        } else if ![0, 16, 32, 48].contains(&shift) {
            Err(EncodeError::InvalidShift { shift })
        } else {
            Ok(())
        };
        prop_assert_eq!(got.map(|_| ()), expected);
        if let Ok(word) = got {
            prop_assert_eq!(word & 0xff80_0000, 0xd280_0000);
            prop_assert_eq!(word & 0x1f, u32::from(rd));
            prop_assert_eq!((word >> 5) & 0xffff, u32::from(imm));
            prop_assert_eq!((word >> 21) & 3, u32::from(shift / 16));
            prop_assert_eq!(insn::classify(word), InsnClass::Other);
        }
    }

    #[test]
    fn exception_encoders_keep_their_immediate_and_class(imm in any::<u16>()) {
        for (encode, class, opcode) in [
            (insn::brk as fn(u16) -> u32, InsnClass::Brk, 0xd420_0000u32),
            (insn::hvc, InsnClass::Hvc, 0xd400_0002),
            (insn::smc, InsnClass::Smc, 0xd400_0003),
            (insn::svc, InsnClass::Svc, 0xd400_0001),
        ] {
            let word = encode(imm);
            prop_assert_eq!(word & 0xffe0_001f, opcode);
            prop_assert_eq!((word >> 5) & 0xffff, u32::from(imm));
            prop_assert_eq!(insn::classify(word), class);
            prop_assert!(insn::is_cmodx_safe(word));
        }
    }

    /// The classifier against the Arm ARM's fields, written out separately: a word is
    /// CMODX-safe exactly when it is one of the eight listed instructions, and a pair
    /// may change live exactly when both words are.
    #[test]
    fn classifier_matches_the_encoding_fields(old in a64_word(), new in a64_word()) {
        for word in [old, new] {
            let field = |lsb: u32, bits: u32| (word >> lsb) & ((1 << bits) - 1);
            let exception = field(24, 8) == 0xd4 && field(2, 3) == 0;
            let expected = if field(26, 6) == 0b00_0101 {
                InsnClass::B
            } else if field(26, 6) == 0b10_0101 {
                InsnClass::Bl
            } else if field(24, 8) == 0x54 && field(4, 1) == 0 {
                InsnClass::BCond
            } else if word == 0xd503_201f {
                InsnClass::Nop
            } else if word == 0xd503_3fdf {
                InsnClass::Isb
            } else if exception && field(21, 3) == 0b001 && field(0, 2) == 0 {
                InsnClass::Brk
            } else if exception && field(21, 3) == 0 && field(0, 2) == 0b01 {
                InsnClass::Svc
            } else if exception && field(21, 3) == 0 && field(0, 2) == 0b10 {
                InsnClass::Hvc
            } else if exception && field(21, 3) == 0 && field(0, 2) == 0b11 {
                InsnClass::Smc
            } else {
                InsnClass::Other
            };
            prop_assert_eq!(insn::classify(word), expected, "{:#010x}", word);
            let listed = !matches!(expected, InsnClass::BCond | InsnClass::Other);
            prop_assert_eq!(insn::is_cmodx_safe(word), listed, "{:#010x}", word);
        }
        let both = insn::is_cmodx_safe(old) && insn::is_cmodx_safe(new);
        prop_assert_eq!(insn::cmodx_pair_allowed(old, new), both);
        prop_assert_eq!(insn::cmodx_pair_allowed(new, old), both);
    }

    /// Every error prints, whatever its fields (`Display` does arithmetic on them).
    #[test]
    fn every_error_message_prints(pc in any_addr(), target in any_addr(), reg in any::<u8>()) {
        for err in [
            EncodeError::BranchOutOfRange { pc, target, range: pc },
            EncodeError::MisalignedBranch { pc, target },
            EncodeError::InvalidRegister { reg },
            EncodeError::InvalidShift { shift: reg },
        ] {
            prop_assert!(!err.to_string().is_empty());
        }
    }
}

/// What a sample word is, as the encoders made it (or just a word).
#[derive(Clone, Copy, Debug)]
enum Made {
    Branch { link: bool, target: u64 },
    BranchCond { cond: Cond, target: u64 },
    Exception { mnemonic: &'static str, imm: u16 },
    Movz { rd: u8, value: u64 },
    Word,
}

/// Condition suffixes as objdump prints them, written out apart from `Cond::name`.
fn objdump_cond(suffix: &str) -> Option<u32> {
    let names = [
        "eq", "ne", "cs", "cc", "mi", "pl", "vs", "vc", "hi", "ls", "ge", "lt", "gt", "le", "al",
        "nv",
    ];
    match suffix {
        "hs" => Some(2),
        "lo" => Some(3),
        _ => names.iter().position(|&n| n == suffix).map(|i| i as u32),
    }
}

/// The sample: `OBJDUMP_SAMPLE` words drawn with proptest's seeded RNG, word `i`
/// made for its place at `SAMPLE_VMA + 4 i`.
fn sample() -> Vec<(u32, Made)> {
    let mut runner = TestRunner::deterministic();
    let mut draw = |strategy: BoxedStrategy<(u32, Made)>| {
        strategy
            .new_tree(&mut runner)
            .expect("a strategy with no filters")
            .current()
    };
    (0..OBJDUMP_SAMPLE)
        .map(|i| {
            let pc = SAMPLE_VMA as usize + 4 * i;
            let strategy = match i % 6 {
                0 | 1 => (any::<bool>(), -(1isize << 25)..(1 << 25))
                    .prop_map(move |(link, words)| {
                        let target = pc.wrapping_add_signed(words * 4);
                        let encode = if link { insn::bl } else { insn::b };
                        let word = encode(pc, target).expect("in range");
                        (
                            word,
                            Made::Branch {
                                link,
                                target: target as u64,
                            },
                        )
                    })
                    .boxed(),
                2 => (0u32..16, -(1isize << 18)..(1 << 18))
                    .prop_map(move |(bits, words)| {
                        let target = pc.wrapping_add_signed(words * 4);
                        let cond = Cond::from_bits(bits);
                        let word = insn::b_cond(pc, target, cond).expect("in range");
                        (
                            word,
                            Made::BranchCond {
                                cond,
                                target: target as u64,
                            },
                        )
                    })
                    .boxed(),
                3 => (0usize..4, any::<u16>())
                    .prop_map(|(kind, imm)| {
                        let (mnemonic, encode) = [
                            ("brk", insn::brk as fn(u16) -> u32),
                            ("hvc", insn::hvc),
                            ("smc", insn::smc),
                            ("svc", insn::svc),
                        ][kind];
                        (encode(imm), Made::Exception { mnemonic, imm })
                    })
                    .boxed(),
                4 => (0u8..31, any::<u16>(), 0u8..4)
                    .prop_map(|(rd, imm, hw)| {
                        let word = insn::movz_x(rd, imm, hw * 16).expect("valid");
                        (
                            word,
                            Made::Movz {
                                rd,
                                value: u64::from(imm) << (hw * 16),
                            },
                        )
                    })
                    .boxed(),
                _ => (prop::sample::select(&CLASSES[..]), any::<u32>(), 0u32..64)
                    .prop_map(|(class, free, flip)| (word_of(class, free, flip), Made::Word))
                    .boxed(),
            };
            draw(strategy)
        })
        .collect()
}

/// The classifier and the encoders agree with GNU objdump on every word of the sample:
/// the class (b, bl, b.cond, nop, isb, brk, hvc, smc, svc, or none of them), branch
/// targets, conditions, immediates and MOVZ's register and value.
#[test]
fn objdump_reads_the_sample_as_the_classifier_does() {
    let sample = sample();
    let bytes: Vec<u8> = sample.iter().flat_map(|(w, _)| w.to_le_bytes()).collect();
    let lines = objdump::disassemble(OBJDUMP, "aarch64", SAMPLE_VMA, &bytes);
    assert_eq!(lines.len(), sample.len(), "one objdump line per word");
    let mut problems = Vec::new();
    let mut classes = std::collections::BTreeMap::<String, usize>::new();
    for (i, (line, &(word, made))) in lines.iter().zip(&sample).enumerate() {
        let pc = SAMPLE_VMA + 4 * i as u64;
        let mut check = |ok: bool, what: &str| {
            if !ok {
                problems.push(format!(
                    "{pc:#x}: {word:#010x} objdump `{} {}`: {what}",
                    line.mnemonic, line.operands
                ));
            }
        };
        check(line.addr == pc, "address");
        check(line.encoding == format!("{word:08x}"), "encoding");
        let class = insn::classify(word);
        *classes.entry(format!("{class:?}")).or_default() += 1;
        let m = line.mnemonic.as_str();
        let objdump_class = match m {
            "b" => InsnClass::B,
            "bl" => InsnClass::Bl,
            "nop" => InsnClass::Nop,
            "isb" if line.operands.is_empty() => InsnClass::Isb,
            "brk" => InsnClass::Brk,
            "hvc" => InsnClass::Hvc,
            "smc" => InsnClass::Smc,
            "svc" => InsnClass::Svc,
            _ if m.starts_with("b.") => InsnClass::BCond,
            _ => InsnClass::Other,
        };
        check(class == objdump_class, &format!("classified {class:?}"));
        if matches!(class, InsnClass::B | InsnClass::Bl | InsnClass::BCond) {
            let ours = insn::branch_target(pc as usize, word).map(|t| t as u64);
            check(
                ours == line.address_operand(),
                &format!("branch_target {ours:x?}"),
            );
        }
        if class == InsnClass::BCond {
            let suffix = m.strip_prefix("b.").unwrap_or("");
            check(objdump_cond(suffix) == Some(word & 0xf), "condition");
        }
        match made {
            Made::Branch { link, target } => {
                check(m == if link { "bl" } else { "b" }, "encoded a branch");
                check(line.address_operand() == Some(target), "encoded target");
            }
            Made::BranchCond { cond, target } => {
                check(
                    objdump_cond(m.strip_prefix("b.").unwrap_or("")) == Some(cond.bits()),
                    "encoded condition",
                );
                check(line.address_operand() == Some(target), "encoded target");
            }
            Made::Exception { mnemonic, imm } => {
                check(m == mnemonic, "encoded mnemonic");
                check(
                    line.immediate() == Some(u64::from(imm)),
                    "encoded immediate",
                );
            }
            Made::Movz { rd, value } => {
                let reg = line.operands.split(',').next().unwrap_or("");
                check(reg == format!("x{rd}"), "encoded register");
                // `mov x1, #0x12340000` (the alias), or `movz x0, #0x0, lsl #16`.
                let shown = match m {
                    "mov" => line.immediate(),
                    "movz" => {
                        let lsl = line
                            .operands
                            .rsplit_once("lsl #")
                            .and_then(|(_, s)| s.parse::<u32>().ok());
                        line.immediate().map(|imm| imm << lsl.unwrap_or(0))
                    }
                    _ => None,
                };
                check(shown == Some(value), "encoded value");
            }
            Made::Word => {}
        }
    }
    assert!(
        problems.is_empty(),
        "{} disagreements with objdump:\n{}",
        problems.len(),
        problems.join("\n")
    );
    // The sample reached every class (else it compared little).
    for class in [
        "B", "Bl", "BCond", "Nop", "Isb", "Brk", "Hvc", "Smc", "Svc", "Other",
    ] {
        assert!(
            classes.get(class).copied().unwrap_or(0) > 0,
            "no {class} in the sample: {classes:?}"
        );
    }
    println!(
        "# objdump sample: {} words, by class {classes:?}",
        sample.len()
    );
}
