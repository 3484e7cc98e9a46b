//! Property tests of arm64's kprobes decoder and simulator
//! (`src/arch/aarch64/kprobes_insn.rs`, compiled here against a stand-in trap frame as
//! `tests/kprobes_host.rs` does): no word and no PC panics; the exception-generating,
//! exclusive and unallocated classes are always refused; a simulated instruction moves
//! the PC and the registers as the Arm ARM says, at any PC, the top of the address
//! space included; the branch offsets agree with `patch::insn`'s decoder; and, on a
//! seeded sample, every PC-relative instruction GNU objdump sees is simulated with the
//! target, register, bit and condition objdump prints, and nothing else is.

use patch_machine::patch::insn::{self, InsnClass};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, TestRunner};

#[path = "support/a64_words.rs"]
mod a64_words;
#[path = "support/objdump.rs"]
mod objdump;
mod support;

/// What `kprobes_insn` needs of its `super::exceptions`.
mod exceptions {
    #[derive(Clone, Debug, Default, PartialEq, Eq)]
    pub struct TrapFrame {
        pub x: [u64; 31],
        pub elr: u64,
        pub spsr: u64,
    }
}

#[path = "../src/arch/aarch64/kprobes_insn.rs"]
#[allow(dead_code)]
mod kprobes_insn;

use a64_words::a64_word;
use exceptions::TrapFrame;
use kprobes_insn::{Literal, Plan, Sim, decode, simulate};

const OBJDUMP: &str = "aarch64-linux-gnu-objdump";
/// Words in the objdump sample (one objdump run).
const OBJDUMP_SAMPLE: usize = 4096;
const SAMPLE_VMA: u64 = 0xffff_8000_2000_0000;

fn config() -> Config {
    Config {
        failure_persistence: None,
        ..Config::default()
    }
}

/// Any PC, weighted towards both ends of the address space.
fn any_pc() -> impl Strategy<Value = u64> {
    prop_oneof![
        any::<u64>().prop_map(|pc| pc & !3),
        (0u64..1 << 16).prop_map(|pc| pc & !3),
        (0u64..1 << 16).prop_map(|d| (u64::MAX - d) & !3),
        (0u64..64).prop_map(|d| (u64::MAX - d) & !3),
    ]
}

fn any_frame() -> impl Strategy<Value = TrapFrame> {
    (
        // Single bits too: a W register test or a TBZ differs from its neighbours there.
        prop::array::uniform31(prop_oneof![
            any::<u64>(),
            Just(0u64),
            Just(u64::MAX),
            (0u32..64).prop_map(|bit| 1u64 << bit),
        ]),
        any::<u64>(),
        any::<u64>(),
    )
        .prop_map(|(x, elr, spsr)| TrapFrame { x, elr, spsr })
}

/// Arm ARM C1.2.4 `ConditionHolds`, written out as its table.
fn holds(cond: u8, spsr: u64) -> bool {
    let (n, z, c, v) = (
        spsr >> 31 & 1 != 0,
        spsr >> 30 & 1 != 0,
        spsr >> 29 & 1 != 0,
        spsr >> 28 & 1 != 0,
    );
    [
        z,
        !z,
        c,
        !c,
        n,
        !n,
        v,
        !v,
        c && !z,
        !c || z,
        n == v,
        n != v,
        !z && n == v,
        z || n != v,
        true,
        true,
    ][usize::from(cond & 0xf)]
}

/// `X[r]` with 31 reading as XZR.
fn x(frame: &TrapFrame, r: u8) -> u64 {
    frame.x.get(usize::from(r)).copied().unwrap_or(0)
}

/// The frame after `sim` at `pc` per the Arm ARM (a literal reads `literal`).
fn expected(sim: Sim, pc: u64, before: &TrapFrame, literal: u64) -> TrapFrame {
    let mut after = before.clone();
    let next = pc.wrapping_add(4);
    let to = |offset: i64| pc.wrapping_add_signed(offset);
    let mut write = |r: u8, value: u64| {
        if let Some(slot) = after.x.get_mut(usize::from(r)) {
            *slot = value;
        }
    };
    let elr = match sim {
        Sim::Branch { offset, link } => {
            if link {
                write(30, next);
            }
            to(offset)
        }
        Sim::BranchCond { offset, cond } => {
            if holds(cond, before.spsr) {
                to(offset)
            } else {
                next
            }
        }
        Sim::CompareBranch {
            offset,
            rt,
            wide,
            nonzero,
        } => {
            let value = if wide {
                x(before, rt)
            } else {
                x(before, rt) as u32 as u64
            };
            if (value != 0) == nonzero {
                to(offset)
            } else {
                next
            }
        }
        Sim::TestBranch {
            offset,
            rt,
            bit,
            nonzero,
        } => {
            if (x(before, rt) & (1 << bit) != 0) == nonzero {
                to(offset)
            } else {
                next
            }
        }
        Sim::Address { rd, offset, page } => {
            let base = if page { pc & !0xfff } else { pc };
            write(rd, base.wrapping_add_signed(offset));
            next
        }
        Sim::Load { rt, kind, .. } => {
            match kind {
                Literal::Word => write(rt, literal as u32 as u64),
                Literal::Double => write(rt, literal),
                Literal::SignedWord => write(rt, literal as u32 as i32 as i64 as u64),
                Literal::Prefetch => {}
            }
            next
        }
        Sim::BranchReg { rn, link } => {
            let target = x(before, rn);
            if link {
                write(30, next);
            }
            target
        }
    };
    after.elr = elr;
    after
}

proptest! {
    #![proptest_config(config())]

    /// Every word decodes without a panic, the same way twice; the classes that must
    /// never run anywhere but in place (or at all) are refused.
    #[test]
    fn decode_refuses_what_cannot_be_probed(word in a64_word()) {
        let plan = decode(word);
        prop_assert_eq!(plan, decode(word));
        let op0 = (word >> 25) & 0xf;
        let refused = op0 <= 0b0011 // UDF, unallocated, SVE, SME
            || word & 0xff00_0000 == 0xd400_0000 // SVC, HVC, SMC, BRK, HLT, DCPS
            || word & 0x3f00_0000 == 0x0800_0000 // exclusive and ordered loads/stores
            || word & 0xff00_0010 == 0x5400_0010 // BC.cond
            || word & 0xfffff01f == 0xd503_401f; // MSR (immediate): DAIFSet and the like
        if refused {
            prop_assert!(plan.is_err(), "{:#010x} accepted: {:?}", word, plan);
        }
        if let Err(why) = plan {
            prop_assert!(!why.is_empty());
        }
    }

    /// B, BL and B.cond: the simulator's offset is the one `patch::insn` decodes (two
    /// decoders written apart).
    #[test]
    fn branch_offsets_agree_with_the_patch_decoder(word in a64_word(), pc in any_pc()) {
        let Ok(pc_usize) = usize::try_from(pc) else { return Ok(()) };
        let offset = match decode(word) {
            Ok(Plan::Simulate(Sim::Branch { offset, link })) => {
                prop_assert_eq!(link, insn::classify(word) == InsnClass::Bl);
                offset
            }
            Ok(Plan::Simulate(Sim::BranchCond { offset, cond })) => {
                prop_assert_eq!(insn::classify(word), InsnClass::BCond);
                prop_assert_eq!(u32::from(cond), word & 0xf);
                offset
            }
            _ => {
                prop_assert!(!matches!(
                    insn::classify(word),
                    InsnClass::B | InsnClass::Bl | InsnClass::BCond
                ), "{:#010x}: patch::insn sees a branch, kprobes does not", word);
                return Ok(());
            }
        };
        let exact = i128::from(pc) + i128::from(offset);
        let fits = (0..=usize::MAX as i128).contains(&exact);
        prop_assert_eq!(
            insn::branch_target(pc_usize, word),
            fits.then_some(exact as usize)
        );
    }

    /// Simulating any simulated word at any PC with any registers does what the Arm
    /// ARM says, and nothing else in the frame changes.
    #[test]
    fn simulation_moves_the_pc_and_registers_as_the_arm_arm_says(
        word in a64_word(),
        pc in any_pc(),
        frame in any_frame(),
        literal in any::<u64>(),
        focus in 0usize..4,
    ) {
        let Ok(Plan::Simulate(sim)) = decode(word) else { return Ok(()) };
        // The tested register often holds a value at the edge of the test: the bit alone
        // or cleared, only the W register's top bit, only a bit above it.
        let mut frame = frame;
        let edge = match sim {
            Sim::CompareBranch { rt, .. } => Some((rt, [1u64 << 31, 1 << 32, 0][focus % 3])),
            Sim::TestBranch { rt, bit, .. } => {
                Some((rt, [1u64 << bit, !(1u64 << bit), 0][focus % 3]))
            }
            _ => None,
        };
        if let Some((rt, value)) = edge
            && focus < 3
            && let Some(slot) = frame.x.get_mut(usize::from(rt))
        {
            *slot = value;
        }
        // A literal load reads memory: place the instruction so that its literal is
        // `literal`'s bytes.
        let pool = literal.to_le_bytes();
        let pc = match sim {
            Sim::Load { offset, .. } => (pool.as_ptr() as u64).wrapping_add_signed(-offset),
            _ => pc,
        };
        let mut after = frame.clone();
        simulate(sim, pc, &mut after);
        prop_assert_eq!(after, expected(sim, pc, &frame, literal), "{:#010x} at {:#x}: {:?}", word, pc, sim);
    }
}

/// What objdump says an instruction must be to kprobes.
#[derive(Debug)]
enum Verdict {
    /// Simulated, with these fields.
    Simulated(fn(&Sim, &objdump::Line, u64) -> bool),
    /// Refused.
    Refused,
    /// Not PC-relative: anything but `Simulate`.
    NotSimulated,
}

fn reg(operand: &str) -> Option<u8> {
    let operand = operand.trim();
    if operand == "xzr" || operand == "wzr" {
        return Some(31);
    }
    operand
        .strip_prefix('x')
        .or_else(|| operand.strip_prefix('w'))?
        .parse()
        .ok()
}

fn operand(line: &objdump::Line, i: usize) -> &str {
    line.operands.split(',').nth(i).unwrap_or("").trim()
}

fn cond_suffix(suffix: &str) -> Option<u8> {
    let names = [
        "eq", "ne", "cs", "cc", "mi", "pl", "vs", "vc", "hi", "ls", "ge", "lt", "gt", "le", "al",
        "nv",
    ];
    match suffix {
        "hs" => Some(2),
        "lo" => Some(3),
        _ => names.iter().position(|&n| n == suffix).map(|i| i as u8),
    }
}

fn verdict(line: &objdump::Line) -> Verdict {
    use Verdict::*;
    let m = line.mnemonic.as_str();
    let literal = line.address_operand().is_some();
    match m {
        "b" | "bl" => Simulated(|sim, line, pc| {
            matches!(*sim, Sim::Branch { offset, link }
                if link == (line.mnemonic == "bl")
                    && Some(pc.wrapping_add_signed(offset)) == line.address_operand())
        }),
        _ if m.starts_with("b.") => Simulated(|sim, line, pc| {
            matches!(*sim, Sim::BranchCond { offset, cond }
                if Some(cond) == cond_suffix(&line.mnemonic[2..])
                    && Some(pc.wrapping_add_signed(offset)) == line.address_operand())
        }),
        "cbz" | "cbnz" => Simulated(|sim, line, pc| {
            matches!(*sim, Sim::CompareBranch { offset, rt, wide, nonzero }
                if Some(rt) == reg(operand(line, 0))
                    && wide == operand(line, 0).starts_with('x')
                    && nonzero == (line.mnemonic == "cbnz")
                    && Some(pc.wrapping_add_signed(offset)) == line.address_operand())
        }),
        "tbz" | "tbnz" => Simulated(|sim, line, pc| {
            matches!(*sim, Sim::TestBranch { offset, rt, bit, nonzero }
                if Some(rt) == reg(operand(line, 0))
                    && Some(u64::from(bit)) == line.immediate()
                    && nonzero == (line.mnemonic == "tbnz")
                    && Some(pc.wrapping_add_signed(offset)) == line.address_operand())
        }),
        "adr" | "adrp" => Simulated(|sim, line, pc| {
            matches!(*sim, Sim::Address { rd, offset, page }
                if Some(rd) == reg(operand(line, 0))
                    && page == (line.mnemonic == "adrp")
                    && Some((if page { pc & !0xfff } else { pc }).wrapping_add_signed(offset))
                        == line.address_operand())
        }),
        "ldr" | "ldrsw" | "prfm" if literal => {
            let first = operand(line, 0);
            if m == "ldr" && !(first.starts_with('x') || first.starts_with('w')) {
                // SIMD/FP register: not simulated.
                return Refused;
            }
            Simulated(|sim, line, pc| {
                let first = operand(line, 0);
                let want = match line.mnemonic.as_str() {
                    "prfm" => Literal::Prefetch,
                    "ldrsw" => Literal::SignedWord,
                    _ if first.starts_with('x') => Literal::Double,
                    _ => Literal::Word,
                };
                matches!(*sim, Sim::Load { rt, offset, kind }
                    if kind == want
                        && (kind == Literal::Prefetch || Some(rt) == reg(first))
                        && Some(pc.wrapping_add_signed(offset)) == line.address_operand())
            })
        }
        "br" | "blr" | "ret" => Simulated(|sim, line, _| {
            let rn = if line.operands.is_empty() {
                Some(30)
            } else {
                reg(&line.operands)
            };
            matches!(*sim, Sim::BranchReg { rn: r, link } if Some(r) == rn && link == (line.mnemonic == "blr"))
        }),
        // The barrier group's encodings objdump has no name for (CRn = 3, e.g. `msr
        // s0_3_c3_c4_0, xzr`): the decoder steps the whole group out of line, as Linux's
        // aarch64_insn_is_steppable does; an unallocated one then UNDEFs in the slot.
        "msr" if line.operands.starts_with("s0_3_c3_") => NotSimulated,
        "svc" | "hvc" | "smc" | "brk" | "hlt" | "dcps1" | "dcps2" | "dcps3" | "udf" | "eret"
        | "drps" | "msr" | "mrs" | "sys" | "sysl" => Refused,
        _ if m.starts_with("bc.") => Refused,
        _ if [
            "retaa", "retab", "braa", "brab", "blraa", "blrab", "eretaa", "eretab",
        ]
        .iter()
        .any(|p| m.starts_with(p)) =>
        {
            Refused
        }
        _ if [
            "ldxr", "ldaxr", "stxr", "stlxr", "ldxp", "ldaxp", "stxp", "stlxp", "ldar", "stlr",
            "ldlar", "stllr", "cas",
        ]
        .iter()
        .any(|p| m.starts_with(p)) =>
        {
            Refused
        }
        _ => NotSimulated,
    }
}

fn sample() -> Vec<u32> {
    let mut runner = TestRunner::deterministic();
    let strategy = a64_word();
    (0..OBJDUMP_SAMPLE)
        .map(|_| {
            strategy
                .new_tree(&mut runner)
                .expect("no filters")
                .current()
        })
        .collect()
}

/// GNU objdump and the decoder agree on every word of the sample: each PC-relative
/// instruction objdump names is simulated with its fields, each refused class is
/// refused, and no other instruction is simulated.
#[test]
fn objdump_and_the_kprobes_decoder_agree_on_the_sample() {
    let words = sample();
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    let lines = objdump::disassemble(OBJDUMP, "aarch64", SAMPLE_VMA, &bytes);
    assert_eq!(lines.len(), words.len(), "one objdump line per word");
    let mut problems = Vec::new();
    let (mut simulated, mut refused) = (0, 0);
    for (i, (line, &word)) in lines.iter().zip(&words).enumerate() {
        let pc = SAMPLE_VMA + 4 * i as u64;
        let plan = decode(word);
        let agrees = match (verdict(line), plan) {
            (Verdict::Simulated(fields), Ok(Plan::Simulate(sim))) => fields(&sim, line, pc),
            (Verdict::Simulated(_), _) => false,
            (Verdict::Refused, plan) => plan.is_err(),
            (Verdict::NotSimulated, plan) => !matches!(plan, Ok(Plan::Simulate(_))),
        };
        match plan {
            Ok(Plan::Simulate(_)) => simulated += 1,
            Err(_) => refused += 1,
            _ => {}
        }
        if !agrees {
            problems.push(format!(
                "{pc:#x}: {word:#010x} objdump `{} {}`, decode {plan:?}",
                line.mnemonic, line.operands
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "{} disagreements with objdump:\n{}",
        problems.len(),
        problems.join("\n")
    );
    assert!(simulated > OBJDUMP_SAMPLE / 4 && refused > OBJDUMP_SAMPLE / 8);
    println!(
        "# kprobes objdump sample: {} words, {simulated} simulated, {refused} refused",
        words.len()
    );
}

/// Regression (found by `simulation_moves_the_pc_and_registers_as_the_arm_arm_says`:
/// `word = 0x34000000` (CBZ W0), `pc = 0xfffffffffffffffc`, "attempt to add with
/// overflow" in `simulate`): at the last word of the address space the next PC and the
/// link wrap to 0 instead of panicking.
#[test]
fn simulation_at_the_last_word_wraps() {
    let pc = u64::MAX - 3;
    let run = |word: u32| {
        let Ok(Plan::Simulate(sim)) = decode(word) else {
            panic!("{word:#010x} is not simulated");
        };
        let mut frame = TrapFrame::default();
        frame.x[0] = 1;
        frame.x[1] = 0x1234;
        simulate(sim, pc, &mut frame);
        (frame.elr, frame.x[30])
    };
    assert_eq!(run(0x3400_0040), (0, 0), "CBZ W0, . + 8 (not taken)");
    assert_eq!(run(0x9400_0002), (4, 0), "BL . + 8");
    assert_eq!(run(0xd63f_0020), (0x1234, 0), "BLR X1");
}
