//! Property tests of the x86-64 kprobes decoder (`src/patch/x86_decode.rs`): no byte
//! string of 0 to 16 bytes at any address panics; an accepted instruction is at most
//! 15 bytes and at most what was given, is decided by its own bytes alone, and every
//! truncation of it is refused; JMP/CALL/Jcc targets are exact modular arithmetic on
//! the address; an out-of-line copy names the same RIP-relative address from the slot,
//! or is refused exactly when the displacement cannot reach; each refused class is
//! always refused with its reason; and, on a seeded sample, GNU objdump finds the same
//! lengths, branch targets and RIP-relative displacements.

use patch_machine::patch::x86_decode::{Decoded, Execute, MAX_INSN_LEN, decode};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, TestRunner};

#[path = "support/objdump.rs"]
mod objdump;
mod support;

/// The host's objdump (binutils), which reads x86-64.
const OBJDUMP: &str = "objdump";
/// Generated instructions in the objdump sample (one objdump run).
const OBJDUMP_SAMPLE: usize = 4096;
/// A kernel text address (Linux's `__START_KERNEL_map` plus 16 MiB).
const SAMPLE_VMA: u64 = 0xffff_ffff_8100_0000;
/// Legacy prefixes the decoder accepts (67 is refused, so it comes up separately).
const PREFIXES: [u8; 11] = [
    0x66, 0xf0, 0xf2, 0xf3, 0x2e, 0x36, 0x3e, 0x26, 0x64, 0x65, 0x67,
];
/// Reasons that say only that the bytes given ran out.
const TRUNCATED: &str = "the text ends inside the instruction";

fn config() -> Config {
    Config {
        failure_persistence: None,
        ..Config::default()
    }
}

/// Any address, weighted towards both ends of the address space and the signed
/// boundary in the middle.
fn any_addr() -> impl Strategy<Value = usize> {
    prop_oneof![
        any::<usize>(),
        0usize..1 << 16,
        (0usize..1 << 16).prop_map(|a| usize::MAX - a),
        (0usize..32).prop_map(|a| usize::MAX - a),
        (0usize..32).prop_map(|a| (isize::MAX as usize).wrapping_add(a).wrapping_sub(16)),
    ]
}

/// A ModRM byte: any, or one of the forms that change the length (RIP-relative,
/// SIB, disp8, disp32, register).
fn modrm() -> impl Strategy<Value = u8> {
    prop_oneof![
        any::<u8>(),
        (0u8..8).prop_map(|reg| reg << 3 | 5),
        (0u8..4, 0u8..8).prop_map(|(md, reg)| md << 6 | reg << 3 | 4),
        (0u8..8, 0u8..8).prop_map(|(reg, rm)| 0x40 | reg << 3 | rm),
        (0u8..8, 0u8..8).prop_map(|(reg, rm)| 0x80 | reg << 3 | rm),
        (0u8..8, 0u8..8).prop_map(|(reg, rm)| 0xc0 | reg << 3 | rm),
    ]
}

/// A SIB byte: any, or one with base 5 (a disp32 with mod 0).
fn sib() -> impl Strategy<Value = u8> {
    prop_oneof![any::<u8>(), any::<u8>().prop_map(|s| s & !7 | 5)]
}

/// An instruction built from its parts, each with random fields: 0 to 3 legacy
/// prefixes, maybe a REX, a one-byte, two-byte (0F) or three-byte (0F 38 / 0F 3A)
/// opcode, a ModRM and a SIB byte, then random bytes (displacements, immediates) up
/// to 16 bytes in all.
fn structured() -> impl Strategy<Value = Vec<u8>> {
    let opcode = prop_oneof![
        3 => any::<u8>().prop_map(|op| vec![op]),
        2 => any::<u8>().prop_map(|op| vec![0x0f, op]),
        1 => (prop::sample::select(vec![0x38u8, 0x3a]), any::<u8>())
            .prop_map(|(escape, op)| vec![0x0f, escape, op]),
    ];
    (
        prop::collection::vec(prop::sample::select(PREFIXES.to_vec()), 0..=3),
        prop::option::weighted(0.4, 0x40u8..=0x4f),
        opcode,
        modrm(),
        sib(),
        prop::collection::vec(any::<u8>(), 0..=12),
    )
        .prop_map(|(prefixes, rex, opcode, modrm, sib, tail)| {
            let mut bytes = prefixes;
            bytes.extend(rex);
            bytes.extend(opcode);
            bytes.extend([modrm, sib]);
            bytes.extend(tail);
            bytes.truncate(16);
            bytes
        })
}

/// Byte strings of 0 to 16 bytes: uniform, or built from known parts.
fn byte_string() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..=16),
        structured(),
        // Only prefixes, then anything: the 15-byte limit.
        (
            prop::collection::vec(prop::sample::select(PREFIXES[..10].to_vec()), 10..=16),
            prop::collection::vec(any::<u8>(), 0..=6)
        )
            .prop_map(|(p, rest)| [p, rest].concat()),
    ]
}

/// `addr + offset` in the 2^64 address space, the way the CPU computes RIP.
fn wrap(addr: usize, offset: i128) -> usize {
    (addr as i128 + offset).rem_euclid(1i128 << 64) as usize
}

/// The relative branch `bytes` starts with, written out apart from the decoder: what
/// `decode` must emulate (kind, condition, length, displacement), or `None`.
fn relative_branch(bytes: &[u8]) -> Option<(&'static str, u8, usize, i128)> {
    let rel8 = |at: usize| Some(i128::from(*bytes.get(at)? as i8));
    let rel32 = |at: usize| {
        let b = bytes.get(at..at + 4)?;
        Some(i128::from(i32::from_le_bytes(b.try_into().ok()?)))
    };
    match *bytes {
        [op @ 0x70..=0x7f, ..] => Some(("jcc", op & 0xf, 2, rel8(1)?)),
        [0xeb, ..] => Some(("jmp", 0, 2, rel8(1)?)),
        [0xe9, ..] => Some(("jmp", 0, 5, rel32(1)?)),
        [0xe8, ..] => Some(("call", 0, 5, rel32(1)?)),
        [0x0f, op @ 0x80..=0x8f, ..] => Some(("jcc", op & 0xf, 6, rel32(2)?)),
        _ => None,
    }
}

/// What `decoded` at `addr` branches to, as the oracle's tuple.
fn emulated(decoded: &Decoded, addr: usize) -> Option<(&'static str, u8, usize)> {
    let len = usize::from(decoded.len);
    match decoded.execute {
        Execute::Jump { target } => Some(("jmp", 0, target)),
        Execute::Call { target, ret } => {
            (ret == wrap(addr, len as i128)).then_some(("call", 0, target))
        }
        Execute::Jcc { cond, target, next } => {
            (next == wrap(addr, len as i128)).then_some(("jcc", cond, target))
        }
        Execute::Step { .. } => None,
    }
}

/// The RIP-relative displacement of `decoded`, if it has one.
fn rip_disp(decoded: &Decoded) -> Option<(usize, i32)> {
    match decoded.execute {
        Execute::Step {
            rip_disp: Some(at), ..
        } => {
            let at = usize::from(at);
            let disp = decoded
                .bytes()
                .get(at..at + 4)
                .expect("inside the instruction");
            Some((at, i32::from_le_bytes(disp.try_into().unwrap())))
        }
        _ => None,
    }
}

/// A slot for the out-of-line copy of an instruction at `addr`: unrelated, or the
/// rebased displacement just inside and just outside of rel32 reach.
fn xol_for(addr: usize) -> impl Strategy<Value = usize> {
    prop_oneof![
        any_addr(),
        (-(1i128 << 33)..(1i128 << 33)).prop_map(move |d| wrap(addr, d)),
        (
            -4i128..=4,
            prop::sample::select(vec![i32::MIN as i128, i32::MAX as i128])
        )
            .prop_map(move |(d, limit)| wrap(addr, limit + d)),
    ]
}

/// Each class the decoder refuses, with the opcode bytes that make it and a word of
/// the reason. Random prefixes (not 66/67, which change the class), ModRM fields and
/// operands are added around them.
const REFUSED: &[(&[u8], &str)] = &[
    (&[0xcc], "INT3"),
    (&[0xcd], "INT"),
    (&[0xce], "INT"),
    (&[0xf1], "INT1"),
    (&[0x0f, 0x0b], "UD"),
    (&[0x0f, 0xb9], "UD"),
    (&[0x0f, 0xff], "UD"),
    (&[0xf4], "HLT"),
    (&[0xfa], "IF"),
    (&[0xfb], "IF"),
    (&[0x9c], "IF"),
    (&[0x9d], "IF"),
    (&[0xca], "far return"),
    (&[0xcb], "far return"),
    (&[0xcf], "IRET"),
    (&[0x8e], "segment register"),
    (&[0xe0], "LOOP"),
    (&[0xe1], "LOOP"),
    (&[0xe2], "LOOP"),
    (&[0xe3], "LOOP"),
    (&[0x0f, 0x00], "system"),
    (&[0x0f, 0x01], "system"),
    (&[0x0f, 0x05], "system"),
    (&[0x0f, 0x07], "system"),
    (&[0x0f, 0x20], "system"),
    (&[0x0f, 0x21], "system"),
    (&[0x0f, 0x22], "system"),
    (&[0x0f, 0x23], "system"),
    (&[0x0f, 0x34], "system"),
    (&[0x0f, 0x35], "system"),
    (&[0x0f, 0xaa], "system"),
    (&[0x62], "VEX"),
    (&[0xc4], "VEX"),
    (&[0xc5], "VEX"),
    (&[0xd8], "x87"),
    (&[0xdf], "x87"),
    (&[0x0f, 0x0f], "3DNow"),
    (&[0x0f, 0x38], "0F 38"),
    (&[0x0f, 0x3a], "0F 38"),
    (&[0x67], "address-size"),
    (&[0xff, 0x18], "far"),
    (&[0xff, 0x28], "far"),
    (&[0xff, 0x38], "not a valid"),
    (&[0xfe, 0x10], "not a valid"),
    (&[0xc7, 0xf8], "XBEGIN"),
    (&[0x06], "not a valid"),
    (&[0x27], "not a valid"),
    (&[0x9a], "not a valid"),
    (&[0xea], "not a valid"),
    (&[0xd6], "not a valid"),
    // Register forms of memory-only opcodes, and group 8 /0 to /3 (#UD).
    (&[0x8d, 0xc0], "not a valid"),
    (&[0x0f, 0xc3, 0xc1], "not a valid"),
    (&[0x0f, 0xb2, 0xd3], "not a valid"),
    (&[0x0f, 0xb4, 0xe5], "not a valid"),
    (&[0x0f, 0xb5, 0xe1], "not a valid"),
    (&[0x0f, 0x0d, 0xd6], "not a valid"),
    (&[0x0f, 0xc7, 0xc8], "not a valid"),
    (&[0x0f, 0xba, 0x59], "not a valid"),
    (&[0x0f, 0xba, 0xd8], "not a valid"),
];

/// A refused class, with 0 to 3 prefixes before it (segment, LOCK, REP and, where
/// the class allows, a REX) and random bytes after; the expected word of the reason.
fn refused() -> impl Strategy<Value = (Vec<u8>, &'static str)> {
    (
        prop::sample::select(REFUSED.to_vec()),
        prop::collection::vec(prop::sample::select(PREFIXES[1..10].to_vec()), 0..=3),
        prop::option::of(0x40u8..=0x4f),
        0u8..8,
        prop::collection::vec(any::<u8>(), 0..=8),
    )
        .prop_map(|((opcode, reason), prefixes, rex, reg_bits, tail)| {
            let mut bytes = prefixes;
            // A REX before the address-size prefix would make it the opcode; a
            // relative-branch class with ModRM keeps its ModRM.reg, which names it.
            if opcode != [0x67] {
                bytes.extend(rex);
            }
            bytes.extend(opcode);
            if opcode.len() == 2 && matches!(opcode[0], 0xff | 0xfe | 0xc7) {
                // ModRM: keep reg (the class), randomise mod and rm (not 0xf8 itself).
                let modrm = bytes.last_mut().unwrap();
                if *modrm != 0xf8 {
                    *modrm |= (reg_bits & 3) << 6 | reg_bits >> 2;
                }
            }
            bytes.extend(tail);
            (bytes, reason)
        })
}

proptest! {
    #![proptest_config(config())]

    /// No byte string panics; what is accepted is 1 to 15 bytes, no more than given,
    /// decided by its own bytes (the same with anything after it), and every
    /// truncation of it is refused as truncated, never read as something shorter.
    #[test]
    fn accepted_lengths_fit_and_truncations_are_refused(
        bytes in byte_string(),
        addr in any_addr(),
        after in prop::collection::vec(any::<u8>(), 0..=16),
    ) {
        let Ok(decoded) = decode(addr, &bytes) else {
            return Ok(());
        };
        let len = usize::from(decoded.len);
        prop_assert!((1..=MAX_INSN_LEN).contains(&len), "length {len}");
        prop_assert!(len <= bytes.len(), "length {len} of {} bytes", bytes.len());
        prop_assert_eq!(decoded.bytes(), &bytes[..len]);
        prop_assert!(decoded.bytes[len..].iter().all(|&b| b == 0), "bytes past the end");
        prop_assert_eq!(decode(addr, &bytes[..len]), Ok(decoded));
        let longer = [&bytes[..len], &after].concat();
        prop_assert_eq!(decode(addr, &longer), Ok(decoded));
        for short in 0..len {
            prop_assert_eq!(
                decode(addr, &bytes[..short]),
                Err(TRUNCATED),
                "{:02x?} cut to {} bytes", &bytes[..len], short
            );
        }
    }

    /// JMP/CALL/Jcc are emulated exactly when the bytes are an unprefixed relative
    /// branch, with the target, return address and next instruction of exact
    /// arithmetic modulo 2^64 (the CPU's RIP wraps at both ends).
    #[test]
    fn branches_are_emulated_with_exact_targets(
        bytes in prop_oneof![
            byte_string(),
            (
                prop::sample::select(vec![
                    vec![0xeb], vec![0xe9], vec![0xe8], vec![0x70], vec![0x7f],
                    vec![0x0f, 0x80], vec![0x0f, 0x8f], vec![0x0f, 0x84],
                ]),
                prop::collection::vec(any::<u8>(), 0..=6)
            ).prop_map(|(op, rest)| [op, rest].concat()),
        ],
        addr in any_addr(),
    ) {
        let decoded = decode(addr, &bytes);
        match relative_branch(&bytes) {
            Some((kind, cond, len, rel)) => {
                let decoded = decoded.map_err(TestCaseError::fail)?;
                prop_assert_eq!(usize::from(decoded.len), len);
                prop_assert_eq!(
                    emulated(&decoded, addr),
                    Some((kind, cond, wrap(addr, len as i128 + rel)))
                );
            }
            None => {
                if let Ok(decoded) = decoded {
                    prop_assert_eq!(emulated(&decoded, addr), None, "{:02x?}", bytes);
                }
            }
        }
    }

    /// An out-of-line copy at any slot differs from the instruction only in a
    /// RIP-relative displacement, which, run at the slot, names the original's
    /// absolute address; it is refused exactly when no rel32 reaches it from there.
    #[test]
    fn xol_copies_address_the_same_target(
        (addr, xol, bytes) in any_addr().prop_flat_map(|addr| {
            (Just(addr), xol_for(addr), byte_string())
        }),
    ) {
        let Ok(decoded) = decode(addr, &bytes) else {
            return Ok(());
        };
        let len = usize::from(decoded.len);
        let copy = decoded.xol_copy(addr, xol);
        match rip_disp(&decoded) {
            None => prop_assert_eq!(copy, Some(decoded.bytes)),
            Some((at, disp)) => {
                prop_assert!(at + 4 <= len, "displacement at {at} of {len}");
                let target = wrap(addr, (len as i128) + i128::from(disp));
                // The displacement the slot needs, as the CPU adds it (modulo 2^64).
                let needed = target.wrapping_sub(wrap(xol, len as i128)) as isize;
                match (copy, i32::try_from(needed)) {
                    (Some(copy), Ok(need)) => {
                        let new = i32::from_le_bytes(copy[at..at + 4].try_into().unwrap());
                        prop_assert_eq!(new, need);
                        prop_assert_eq!(wrap(xol, len as i128 + i128::from(new)), target);
                        prop_assert_eq!(&copy[..at], &decoded.bytes[..at]);
                        prop_assert_eq!(&copy[at + 4..], &decoded.bytes[at + 4..]);
                    }
                    (None, Err(_)) => {}
                    (copy, need) => prop_assert!(
                        false,
                        "{:02x?} at {addr:#x}, slot {xol:#x}: copy {copy:02x?}, needed {need:?}",
                        decoded.bytes()
                    ),
                }
            }
        }
    }

    /// Every class the decoder lists as unprobeable is refused, whatever its
    /// prefixes, fields and operands, with a reason that names it.
    #[test]
    fn refused_classes_are_always_refused((bytes, reason) in refused(), addr in any_addr()) {
        match decode(addr, &bytes) {
            Ok(decoded) => prop_assert!(false, "{:02x?} accepted: {:?}", bytes, decoded),
            Err(why) => prop_assert!(
                why.contains(reason) || why == TRUNCATED && bytes.len() < MAX_INSN_LEN,
                "{:02x?}: {:?}, expected a reason naming {:?}", bytes, why, reason
            ),
        }
    }
}

/// The sample: `OBJDUMP_SAMPLE` byte strings drawn with proptest's seeded RNG (built
/// from known parts, and branches), those objdump can judge.
fn sample() -> Vec<Vec<u8>> {
    let mut runner = TestRunner::deterministic();
    let strategy = prop_oneof![
        4 => structured(),
        1 => (
            prop::sample::select(vec![vec![0xeb], vec![0xe9], vec![0xe8], vec![0x75], vec![0x0f, 0x8e]]),
            prop::collection::vec(any::<u8>(), 4..=4)
        ).prop_map(|(op, rest)| [op, rest].concat()),
    ];
    (0..OBJDUMP_SAMPLE)
        .map(|_| {
            strategy
                .new_tree(&mut runner)
                .expect("no filters")
                .current()
        })
        .filter(|bytes| !unjudged(bytes))
        .collect()
}

/// What the decoder accepts of `sample`, laid back to back from `SAMPLE_VMA`, each
/// decoded at its own address.
fn lay_out(sample: &[Vec<u8>]) -> Vec<(u64, Decoded)> {
    let mut pc = SAMPLE_VMA;
    let mut out = Vec::new();
    for bytes in sample {
        if let Ok(decoded) = decode(pc as usize, bytes) {
            out.push((pc, decoded));
            pc += u64::from(decoded.len);
        }
    }
    out
}

/// Forms objdump cannot judge: FWAIT (9B), whose prefixes objdump prints as
/// instructions of their own.
fn unjudged(bytes: &[u8]) -> bool {
    matches!(bytes[opcode_start(bytes)..], [0x9b, ..])
}

/// Where the opcode starts, after the legacy prefixes and REX.
fn opcode_start(bytes: &[u8]) -> usize {
    bytes
        .iter()
        .position(|b| !PREFIXES.contains(b) && !(0x40..=0x4f).contains(b))
        .unwrap_or(bytes.len())
}

/// Why the decoder may accept an encoding objdump prints as `(bad)`, or `None` (a
/// disagreement): objdump is stricter than the CPU on 0F 1A/1B (MPX forms objdump
/// rejects, hint NOPs on a CPU without MPX) and on a 66/F2/F3 prefix in a slot of
/// the 0F map the SDM leaves undefined (the CPU ignores it).
fn accepted_although_objdump_calls_it_invalid(bytes: &[u8]) -> Option<&'static str> {
    let start = opcode_start(bytes);
    let ignored_prefix = bytes[..start]
        .iter()
        .any(|b| [0x66, 0xf2, 0xf3].contains(b));
    match bytes[start..] {
        [0x0f, 0x1a | 0x1b, ..] => Some("MPX form, a hint NOP without MPX"),
        [0x0f, second, ..] if ignored_prefix && second != 0x38 && second != 0x3a => {
            Some("66/F2/F3 the CPU ignores")
        }
        _ => None,
    }
}

/// objdump's displacement in `disp(%rip)` (`0x10(%rip)`, `-0x10(%rip)`, `(%rip)`).
fn objdump_rip_disp(operands: &str) -> Option<i64> {
    let before = &operands[..operands.find("(%rip)")?];
    let disp = before.rsplit([',', ' ', ':', '*']).next()?;
    let (negative, hex) = match disp.strip_prefix('-') {
        Some(hex) => (true, hex),
        None => (false, disp),
    };
    let value = match hex.strip_prefix("0x") {
        Some(hex) => i64::from_str_radix(hex, 16).ok()?,
        None if hex.is_empty() => 0,
        None => return None,
    };
    Some(if negative { -value } else { value })
}

/// GNU objdump reads each accepted instruction of the sample at its address with the
/// decoder's length, as a valid instruction, the relative branches as the same kind
/// with the same target, and a RIP-relative operand exactly where the decoder found
/// one, with the same displacement.
#[test]
fn objdump_agrees_on_a_generated_sample() {
    let mut sample = sample();
    let drawn = sample.len();
    // Instructions objdump calls `(bad)` are left out (and counted), and the rest laid
    // out again: objdump loses the byte stream after one.
    let mut invalid = std::collections::BTreeMap::new();
    let (laid, lines) = loop {
        let laid = lay_out(&sample);
        let bytes: Vec<u8> = laid.iter().flat_map(|(_, d)| d.bytes().to_vec()).collect();
        let lines = objdump::disassemble(OBJDUMP, "i386:x86-64", SAMPLE_VMA, &bytes);
        let bad: std::collections::HashSet<u64> = lines
            .iter()
            .filter(|line| line.mnemonic.contains("(bad)") || line.operands.contains("(bad)"))
            .map(|line| line.addr)
            .collect();
        let (keep, drop): (Vec<_>, Vec<_>) = laid.iter().partition(|(pc, _)| !bad.contains(pc));
        for (_, decoded) in &drop {
            let why = accepted_although_objdump_calls_it_invalid(decoded.bytes());
            let why = why.unwrap_or_else(|| {
                panic!(
                    "{:02x?} decoded as {decoded:?}; objdump calls it invalid",
                    decoded.bytes()
                )
            });
            *invalid.entry(why).or_insert(0usize) += 1;
        }
        if drop.is_empty() {
            break (laid, lines);
        }
        sample = keep.iter().map(|(_, d)| d.bytes().to_vec()).collect();
    };
    let at: std::collections::HashMap<u64, &objdump::Line> =
        lines.iter().map(|line| (line.addr, line)).collect();
    let mut problems = Vec::new();
    let (mut branches, mut rip_relative) = (0, 0);
    for (pc, decoded) in &laid {
        let hex: Vec<String> = decoded.bytes().iter().map(|b| format!("{b:02x}")).collect();
        let Some(line) = at.get(pc) else {
            problems.push(format!(
                "{pc:#x}: {}: objdump starts no instruction here",
                hex.join(" ")
            ));
            continue;
        };
        let m = line.mnemonic.as_str();
        let mut wrong = |bad: bool, what: &str| {
            if bad {
                problems.push(format!(
                    "{pc:#x}: {}: {what}: objdump `{} {}` ({}), decoder {:?}",
                    hex.join(" "),
                    line.mnemonic,
                    line.operands,
                    line.encoding,
                    decoded.execute
                ));
            }
        };
        wrong(line.encoding != hex.join(" "), "length");
        if let Some((kind, _, target)) = emulated(decoded, *pc as usize) {
            branches += 1;
            let named = match kind {
                "jcc" => m.starts_with('j') && m != "jmp",
                kind => m == kind,
            };
            wrong(!named, "branch kind");
            wrong(
                line.address_operand() != Some(target as u64),
                "branch target",
            );
        }
        let ours = rip_disp(decoded).map(|(_, disp)| i64::from(disp));
        rip_relative += usize::from(ours.is_some());
        wrong(
            ours != objdump_rip_disp(&line.operands),
            "RIP-relative operand",
        );
    }
    assert!(
        problems.is_empty(),
        "{} disagreements with objdump:\n{}",
        problems.len(),
        problems[..problems.len().min(40)].join("\n")
    );
    println!(
        "# x86 kprobes decoder objdump sample: {drawn} drawn, {} accepted and judged, \
         {branches} branches, {rip_relative} RIP-relative; accepted that objdump calls \
         invalid: {invalid:?}",
        laid.len(),
    );
}

/// Found by `xol_copies_address_the_same_target`: `xol_copy` added the addresses as
/// `i64`, which overflowed (a panic with overflow checks) when the instruction and
/// its slot lay on either side of the signed midpoint of the address space, even
/// when the slot was in reach.
#[test]
fn xol_copy_across_the_signed_midpoint() {
    // mov 0x10(%rip), %rax
    let insn = [0x48, 0x8b, 0x05, 0x10, 0x00, 0x00, 0x00];
    let addr = 1usize << 63;
    let decoded = decode(addr, &insn).unwrap();
    let xol = addr - 0x1000;
    let copy = decoded.xol_copy(addr, xol).expect("in reach");
    assert_eq!(copy[3..7], 0x1010i32.to_le_bytes());
    assert_eq!(decoded.xol_copy(addr, 0), None, "2^63 away");
    assert_eq!(
        decoded.xol_copy(0, addr - 0x1000),
        None,
        "2^63 - 0x1000 away"
    );
}

/// Found by the objdump sample: with both 66 and REX.W, REX.W sets the operand size
/// (64 bits, a 32-bit immediate), but the decoder took the 66 and read a 16-bit
/// immediate, two bytes short (`66 48 3d imm32` is `cmp $imm32, %rax`).
#[test]
fn rex_w_overrides_the_operand_size_prefix() {
    for insn in [
        &[0x66, 0x48, 0x3d, 1, 2, 3, 4][..],
        &[0x66, 0x48, 0x81, 0xc0, 1, 2, 3, 4],
        &[0x66, 0x48, 0xc7, 0x05, 0, 0, 0, 0, 1, 2, 3, 4],
        &[0x66, 0x48, 0xf7, 0xc0, 1, 2, 3, 4],
    ] {
        let decoded = decode(0x1000, insn).unwrap();
        assert_eq!(usize::from(decoded.len), insn.len(), "{insn:02x?}");
    }
    // 66 alone: a 16-bit immediate.
    assert_eq!(decode(0x1000, &[0x66, 0x3d, 1, 2]).unwrap().len, 4);
}

/// Found by the objdump sample: register forms of memory-only opcodes and group 8's
/// /0 to /3 were accepted and would raise #UD in the out-of-line slot.
#[test]
fn undefined_modrm_forms_are_refused() {
    for insn in [
        &[0x48, 0x8d, 0xc0][..],
        &[0x0f, 0xc3, 0xc5],
        &[0x0f, 0xb2, 0xd3],
        &[0x0f, 0xb4, 0xe5],
        &[0x0f, 0xb5, 0xe1],
        &[0x0f, 0x0d, 0xd6],
        &[0x0f, 0xc7, 0xed],
        &[0x0f, 0xba, 0x59, 0x4e, 0x2a],
    ] {
        assert_eq!(
            decode(0x1000, insn),
            Err("not a valid instruction in 64-bit mode"),
            "{insn:02x?}"
        );
    }
    // Their memory forms, and RDRAND (0F C7 /6 with a register), still decode.
    for insn in [
        &[0x48, 0x8d, 0x04, 0x7f][..],
        &[0x0f, 0xc3, 0x07],
        &[0x0f, 0xb2, 0x13],
        &[0x0f, 0x0d, 0x08],
        &[0x0f, 0xc7, 0x0f],
        &[0x48, 0x0f, 0xc7, 0xf0],
        &[0x0f, 0xba, 0xe0, 0x05],
    ] {
        let decoded = decode(0x1000, insn).unwrap();
        assert_eq!(usize::from(decoded.len), insn.len(), "{insn:02x?}");
    }
}

/// Found by the objdump sample: the 0F 38 and 0F 3A maps were taken whole by their
/// ModRM form, undefined opcodes (which raise #UD in the slot) included.
#[test]
fn three_byte_maps_are_refused() {
    for insn in [
        &[0x0f, 0x38, 0x50, 0xc0][..],
        &[0x0f, 0x3a, 0x3d, 0x73, 0xad],
        &[0x66, 0x0f, 0x38, 0x00, 0xc1],
    ] {
        let why = decode(0x1000, insn).unwrap_err();
        assert!(why.contains("0F 38/0F 3A"), "{insn:02x?}: {why}");
    }
}
