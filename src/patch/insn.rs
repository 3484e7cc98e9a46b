//! AArch64 instruction encoders and a classifier for live patching.
//!
//! Everything here is plain `core` arithmetic on 32-bit instruction words, so it runs
//! unchanged in the kernel and in host tests. The encodings follow the Arm Architecture
//! Reference Manual for A-profile (Arm ARM, DDI 0487), chapter C6 "A64 Base Instruction
//! Descriptions", and every constant and encoder is checked against GNU `as` by
//! `tests/insn_encoding.rs`.
//!
//! A64 instructions are always fetched little-endian, whatever the data endianness
//! (Arm ARM "Instruction endianness", in B2 "The AArch64 Application Level Memory Model"),
//! so callers storing an [`Insn`] must use `u32::to_le_bytes`.
//!
//! The classifier ([`classify`], [`is_cmodx_safe`], [`cmodx_pair_allowed`]) encodes the
//! rule of Arm ARM B2.2.5 "Concurrent modification and execution of instructions": only a
//! handful of instructions may be rewritten while another CPU may be executing them.

use core::fmt;

/// One A64 instruction word, in its architectural (little-endian when stored) value.
pub type Insn = u32;

/// `NOP` (Arm ARM C6.2 "NOP": the `HINT #0` encoding).
pub const NOP: Insn = 0xd503_201f;

/// `ISB SY` (Arm ARM C6.2 "ISB": `CRm = 0b1111`, the only non-reserved option).
pub const ISB: Insn = 0xd503_3fdf;

/// `RET` (return to the address in `X30`; Arm ARM C6.2 "RET" with `Rn = 30`).
pub const RET: Insn = 0xd65f_03c0;

/// `BRK #0` (Arm ARM C6.2 "BRK").
pub const BRK_0: Insn = 0xd420_0000;

/// Largest forward byte offset of `B`/`BL` (`imm26` words): `+128 MiB - 4`.
pub const B_MAX_FORWARD: usize = (1 << 27) - 4;
/// Largest backward byte offset of `B`/`BL` (`imm26` words): `-128 MiB`.
pub const B_MAX_BACKWARD: usize = 1 << 27;
/// Largest forward byte offset of `B.cond` (`imm19` words): `+1 MiB - 4`.
pub const B_COND_MAX_FORWARD: usize = (1 << 20) - 4;
/// Largest backward byte offset of `B.cond` (`imm19` words): `-1 MiB`.
pub const B_COND_MAX_BACKWARD: usize = 1 << 20;

// Fixed opcode bits and masks (Arm ARM C4.1 "A64 instruction set encoding").
const B_OPCODE: u32 = 0x1400_0000;
const BL_OPCODE: u32 = 0x9400_0000;
const B_MASK: u32 = 0xfc00_0000;
const B_COND_OPCODE: u32 = 0x5400_0000;
/// Bits 31..24 and bit 4 (bit 4 set is `BC.cond`, FEAT_HBC, which is not `B.cond`).
const B_COND_MASK: u32 = 0xff00_0010;
/// Exception generation: opc (23..21), op2 (4..2) and LL (1..0) fixed, `imm16` free.
const EXC_MASK: u32 = 0xffe0_001f;
const SVC_OPCODE: u32 = 0xd400_0001;
const HVC_OPCODE: u32 = 0xd400_0002;
const SMC_OPCODE: u32 = 0xd400_0003;
const BRK_OPCODE: u32 = 0xd420_0000;
const MOVZ_X_OPCODE: u32 = 0xd280_0000;

/// Condition codes of `B.cond` (Arm ARM C1.2.4 "Condition code").
///
/// The aliases `HS` (= [`Cond::Cs`]) and `LO` (= [`Cond::Cc`]) are associated constants
/// named [`Cond::Hs`] and [`Cond::Lo`], so they can be written like variants.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Cond {
    /// Equal (`Z == 1`).
    Eq = 0b0000,
    /// Not equal (`Z == 0`).
    Ne = 0b0001,
    /// Carry set / unsigned higher or same (`C == 1`); alias [`Cond::Hs`].
    Cs = 0b0010,
    /// Carry clear / unsigned lower (`C == 0`); alias [`Cond::Lo`].
    Cc = 0b0011,
    /// Minus, negative (`N == 1`).
    Mi = 0b0100,
    /// Plus, positive or zero (`N == 0`).
    Pl = 0b0101,
    /// Overflow (`V == 1`).
    Vs = 0b0110,
    /// No overflow (`V == 0`).
    Vc = 0b0111,
    /// Unsigned higher (`C == 1 && Z == 0`).
    Hi = 0b1000,
    /// Unsigned lower or same (`!(C == 1 && Z == 0)`).
    Ls = 0b1001,
    /// Signed greater than or equal (`N == V`).
    Ge = 0b1010,
    /// Signed less than (`N != V`).
    Lt = 0b1011,
    /// Signed greater than (`Z == 0 && N == V`).
    Gt = 0b1100,
    /// Signed less than or equal (`!(Z == 0 && N == V)`).
    Le = 0b1101,
    /// Always.
    Al = 0b1110,
    /// `NV`: architecturally also "always" for `B.cond`; present so that every 4-bit
    /// condition field decodes. Prefer [`Cond::Al`].
    Nv = 0b1111,
}

#[allow(non_upper_case_globals)]
impl Cond {
    /// Unsigned higher or same: the same encoding as [`Cond::Cs`].
    pub const Hs: Cond = Cond::Cs;
    /// Unsigned lower: the same encoding as [`Cond::Cc`].
    pub const Lo: Cond = Cond::Cc;

    /// All sixteen condition codes in encoding order.
    pub const ALL: [Cond; 16] = [
        Cond::Eq,
        Cond::Ne,
        Cond::Cs,
        Cond::Cc,
        Cond::Mi,
        Cond::Pl,
        Cond::Vs,
        Cond::Vc,
        Cond::Hi,
        Cond::Ls,
        Cond::Ge,
        Cond::Lt,
        Cond::Gt,
        Cond::Le,
        Cond::Al,
        Cond::Nv,
    ];

    /// The 4-bit `cond` field value.
    pub const fn bits(self) -> u32 {
        self as u32
    }

    /// The condition whose encoding is the low four bits of `bits`.
    pub const fn from_bits(bits: u32) -> Cond {
        Cond::ALL[(bits & 0xf) as usize]
    }

    /// The assembler suffix, e.g. `"eq"` for `b.eq` (`cs`/`cc` rather than `hs`/`lo`).
    pub const fn name(self) -> &'static str {
        match self {
            Cond::Eq => "eq",
            Cond::Ne => "ne",
            Cond::Cs => "cs",
            Cond::Cc => "cc",
            Cond::Mi => "mi",
            Cond::Pl => "pl",
            Cond::Vs => "vs",
            Cond::Vc => "vc",
            Cond::Hi => "hi",
            Cond::Ls => "ls",
            Cond::Ge => "ge",
            Cond::Lt => "lt",
            Cond::Gt => "gt",
            Cond::Le => "le",
            Cond::Al => "al",
            Cond::Nv => "nv",
        }
    }
}

/// Why an instruction could not be encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EncodeError {
    /// The branch target is farther from the branch than its immediate can reach.
    BranchOutOfRange {
        /// Address of the branch instruction.
        pc: usize,
        /// Requested destination.
        target: usize,
        /// Reach in bytes either way: `128 MiB` for `B`/`BL`, `1 MiB` for `B.cond`
        /// (the forward limit is this minus 4).
        range: usize,
    },
    /// The branch or its target is not 4-byte aligned (A64 instructions are words).
    MisalignedBranch {
        /// Address of the branch instruction.
        pc: usize,
        /// Requested destination.
        target: usize,
    },
    /// A register number above 30 (31 would mean `XZR`/`SP`, never wanted here).
    InvalidRegister {
        /// The rejected register number.
        reg: u8,
    },
    /// A `MOVZ` shift other than 0, 16, 32 or 48.
    InvalidShift {
        /// The rejected shift, in bits.
        shift: u8,
    },
}

impl fmt::Display for EncodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            EncodeError::BranchOutOfRange { pc, target, range } => write!(
                f,
                "branch from {pc:#x} to {target:#x} is out of range (+/-{} MiB)",
                range >> 20
            ),
            EncodeError::MisalignedBranch { pc, target } => {
                let what = match (!pc.is_multiple_of(4), !target.is_multiple_of(4)) {
                    (true, true) => "branch address and target are",
                    (true, false) => "branch address is",
                    _ => "target is",
                };
                write!(
                    f,
                    "branch from {pc:#x} to {target:#x}: {what} not 4-byte aligned"
                )
            }
            EncodeError::InvalidRegister { reg } => {
                write!(f, "register x{reg} is invalid here (expected x0..=x30)")
            }
            EncodeError::InvalidShift { shift } => {
                write!(
                    f,
                    "movz shift {shift} is invalid (expected 0, 16, 32 or 48)"
                )
            }
        }
    }
}

impl core::error::Error for EncodeError {}

/// Checks alignment and range of `target - pc` and returns the signed word offset
/// masked to `bits` bits. `max_back`/`max_fwd` are byte limits.
const fn branch_imm(
    pc: usize,
    target: usize,
    max_back: usize,
    max_fwd: usize,
    bits: u32,
) -> Result<u32, EncodeError> {
    if !pc.is_multiple_of(4) || !target.is_multiple_of(4) {
        return Err(EncodeError::MisalignedBranch { pc, target });
    }
    // No wrap-around: a branch from near 0 to near usize::MAX is reported as out of
    // range even though 64-bit PC arithmetic would wrap, because no kernel wants that.
    let in_range = if target >= pc {
        target - pc <= max_fwd
    } else {
        pc - target <= max_back
    };
    if !in_range {
        return Err(EncodeError::BranchOutOfRange {
            pc,
            target,
            range: max_back,
        });
    }
    // Two's complement word offset, truncated to the field width.
    let words = (target.wrapping_sub(pc) as isize) >> 2;
    Ok((words as u32) & ((1u32 << bits) - 1))
}

/// `B <target>` placed at `pc` (Arm ARM C6.2 "B": `imm26` word offset, +/-128 MiB).
///
/// Fails if `pc` or `target` is not 4-byte aligned or if `target - pc` is outside
/// `-128 MiB ..= +128 MiB - 4`.
pub const fn b(pc: usize, target: usize) -> Result<Insn, EncodeError> {
    match branch_imm(pc, target, B_MAX_BACKWARD, B_MAX_FORWARD, 26) {
        Ok(imm) => Ok(B_OPCODE | imm),
        Err(e) => Err(e),
    }
}

/// `BL <target>` placed at `pc` (Arm ARM C6.2 "BL"); same range rules as [`b`].
pub const fn bl(pc: usize, target: usize) -> Result<Insn, EncodeError> {
    match branch_imm(pc, target, B_MAX_BACKWARD, B_MAX_FORWARD, 26) {
        Ok(imm) => Ok(BL_OPCODE | imm),
        Err(e) => Err(e),
    }
}

/// `B.<cond> <target>` placed at `pc` (Arm ARM C6.2 "B.cond": `imm19`, +/-1 MiB).
///
/// Fails if `pc` or `target` is not 4-byte aligned or if `target - pc` is outside
/// `-1 MiB ..= +1 MiB - 4`. Note that `B.cond` is *not* safe to patch concurrently.
pub const fn b_cond(pc: usize, target: usize, cond: Cond) -> Result<Insn, EncodeError> {
    match branch_imm(pc, target, B_COND_MAX_BACKWARD, B_COND_MAX_FORWARD, 19) {
        Ok(imm) => Ok(B_COND_OPCODE | (imm << 5) | cond.bits()),
        Err(e) => Err(e),
    }
}

/// `NOP` (Arm ARM C6.2 "NOP"); the same as [`NOP`].
pub const fn nop() -> Insn {
    NOP
}

/// `ISB SY` (Arm ARM C6.2 "ISB"); the same as [`ISB`].
pub const fn isb() -> Insn {
    ISB
}

/// `RET` (returns through `X30`; Arm ARM C6.2 "RET"); the same as [`RET`].
pub const fn ret() -> Insn {
    RET
}

/// `BRK #imm16`, a software breakpoint (Arm ARM C6.2 "BRK").
pub const fn brk(imm16: u16) -> Insn {
    BRK_OPCODE | ((imm16 as u32) << 5)
}

/// `HVC #imm16`, a hypervisor call (Arm ARM C6.2 "HVC").
pub const fn hvc(imm16: u16) -> Insn {
    HVC_OPCODE | ((imm16 as u32) << 5)
}

/// `SMC #imm16`, a secure monitor call (Arm ARM C6.2 "SMC").
pub const fn smc(imm16: u16) -> Insn {
    SMC_OPCODE | ((imm16 as u32) << 5)
}

/// `SVC #imm16`, a supervisor call (Arm ARM C6.2 "SVC").
pub const fn svc(imm16: u16) -> Insn {
    SVC_OPCODE | ((imm16 as u32) << 5)
}

/// `MOVZ X<rd>, #imm16, LSL #shift` (Arm ARM C6.2 "MOVZ", 64-bit variant).
///
/// `rd` must be `0..=30` and `shift` one of 0, 16, 32, 48 (bits).
pub const fn movz_x(rd: u8, imm16: u16, shift: u8) -> Result<Insn, EncodeError> {
    if rd > 30 {
        return Err(EncodeError::InvalidRegister { reg: rd });
    }
    let hw = match shift {
        0 => 0,
        16 => 1,
        32 => 2,
        48 => 3,
        _ => return Err(EncodeError::InvalidShift { shift }),
    };
    Ok(MOVZ_X_OPCODE | (hw << 21) | ((imm16 as u32) << 5) | rd as u32)
}

/// What an instruction word is, as far as patching cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum InsnClass {
    /// `B <label>` (unconditional immediate branch).
    B,
    /// `BL <label>`.
    Bl,
    /// `B.<cond> <label>` (not `BC.<cond>`).
    BCond,
    /// `BRK #imm16`.
    Brk,
    /// `HVC #imm16`.
    Hvc,
    /// `ISB SY` exactly (other `CRm` options are reserved; they are [`InsnClass::Other`]).
    Isb,
    /// `NOP` exactly (other hints such as `YIELD` or `BTI` are [`InsnClass::Other`]).
    Nop,
    /// `SMC #imm16`.
    Smc,
    /// `SVC #imm16`.
    Svc,
    /// Anything else.
    Other,
}

impl InsnClass {
    /// Whether instructions of this class may be concurrently modified and executed;
    /// see [`is_cmodx_safe`].
    pub const fn is_cmodx_safe(self) -> bool {
        !matches!(self, InsnClass::BCond | InsnClass::Other)
    }
}

/// Classifies an instruction word by its exact encoding.
///
/// Exception-generating instructions must have their fixed fields exactly right
/// (`op2 = 0b000`, correct `LL`); anything unallocated is [`InsnClass::Other`].
pub const fn classify(insn: Insn) -> InsnClass {
    if insn & B_MASK == B_OPCODE {
        InsnClass::B
    } else if insn & B_MASK == BL_OPCODE {
        InsnClass::Bl
    } else if insn & B_COND_MASK == B_COND_OPCODE {
        InsnClass::BCond
    } else if insn == NOP {
        InsnClass::Nop
    } else if insn == ISB {
        InsnClass::Isb
    } else {
        match insn & EXC_MASK {
            BRK_OPCODE => InsnClass::Brk,
            HVC_OPCODE => InsnClass::Hvc,
            SMC_OPCODE => InsnClass::Smc,
            SVC_OPCODE => InsnClass::Svc,
            _ => InsnClass::Other,
        }
    }
}

/// Whether `insn` may be modified while another CPU may concurrently execute it.
///
/// Arm ARM B2.2.5 "Concurrent modification and execution of instructions" says that
/// concurrent modification and execution can produce any behaviour achievable by any
/// sequence of instructions at the same Exception level, *except* where both the
/// instruction before and the instruction after the modification are one of `B`, `BL`,
/// `BRK`, `HVC`, `ISB`, `NOP`, `SMC` or `SVC`; then the CPU executes either the old or
/// the new instruction. (The write must still be a single-copy-atomic, naturally aligned
/// 32-bit store, and maintenance plus context synchronization are still needed before the
/// new instruction is guaranteed to be observed.)
///
/// This function is deliberately conservative, matching the manual's mnemonics by
/// exact encoding:
/// - `NOP` means only `0xd503201f`: other `HINT` encodings (`YIELD`, `WFE`, `BTI`,
///   `PACIASP`, unallocated hints, ...) are different instructions even though some of
///   them execute as `NOP` on a given CPU.
/// - `ISB` means only `ISB SY` (`CRm = 0b1111`): the other `CRm` values are reserved
///   and software must not rely on them behaving as `ISB SY`.
/// - `B.cond`, `BC.cond`, `CBZ`, `TBZ`, `RET`, `BR` and the like are *not* in the list.
pub const fn is_cmodx_safe(insn: Insn) -> bool {
    classify(insn).is_cmodx_safe()
}

/// Whether `old` may be replaced by `new` while other CPUs may be executing it: per
/// Arm ARM B2.2.5 both instructions must be concurrent-modification safe
/// ([`is_cmodx_safe`]).
pub const fn cmodx_pair_allowed(old: Insn, new: Insn) -> bool {
    is_cmodx_safe(old) && is_cmodx_safe(new)
}

/// The destination of a `B`, `BL` or `B.cond` at `pc`, or `None` for other
/// instructions (or if the destination would wrap around the address space).
pub const fn branch_target(pc: usize, insn: Insn) -> Option<usize> {
    // Sign-extend the word offset by shifting the field to the top of an i32.
    let words = match classify(insn) {
        InsnClass::B | InsnClass::Bl => ((insn << 6) as i32) >> 6,
        InsnClass::BCond => (((insn >> 5) << 13) as i32) >> 13,
        _ => return None,
    };
    let bytes = (words as isize) * 4;
    pc.checked_add_signed(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PC: usize = 0x4020_1000;

    #[test]
    fn constants() {
        assert_eq!(nop(), 0xd503_201f);
        assert_eq!(isb(), 0xd503_3fdf);
        assert_eq!(ret(), 0xd65f_03c0);
        assert_eq!(brk(0), BRK_0);
        assert_eq!(Cond::Hs, Cond::Cs);
        assert_eq!(Cond::Lo, Cond::Cc);
        for (i, c) in Cond::ALL.iter().enumerate() {
            assert_eq!(c.bits(), i as u32);
            assert_eq!(Cond::from_bits(i as u32), *c);
        }
    }

    #[test]
    fn b_and_bl_offsets() {
        assert_eq!(b(PC, PC), Ok(0x1400_0000));
        assert_eq!(b(PC, PC + 4), Ok(0x1400_0001));
        assert_eq!(b(PC, PC - 4), Ok(0x17ff_ffff));
        assert_eq!(bl(PC, PC + 4), Ok(0x9400_0001));
        assert_eq!(bl(PC, PC - 4), Ok(0x97ff_ffff));
    }

    #[test]
    fn b_range_limits() {
        for enc in [b, bl] {
            let op = enc(PC, PC).unwrap() & B_MASK;
            assert_eq!(enc(PC, PC + B_MAX_FORWARD), Ok(op | 0x01ff_ffff));
            assert_eq!(enc(PC, PC - B_MAX_BACKWARD), Ok(op | 0x0200_0000));
            let fwd = PC + B_MAX_FORWARD + 4;
            assert_eq!(
                enc(PC, fwd),
                Err(EncodeError::BranchOutOfRange {
                    pc: PC,
                    target: fwd,
                    range: 128 << 20
                })
            );
            let back = PC - B_MAX_BACKWARD - 4;
            assert!(matches!(
                enc(PC, back),
                Err(EncodeError::BranchOutOfRange { .. })
            ));
            // Far away in either direction, and across the whole address space.
            assert!(enc(0, usize::MAX - 3).is_err());
            assert!(enc(usize::MAX - 3, 0).is_err());
        }
    }

    #[test]
    fn b_cond_range_limits() {
        for c in Cond::ALL {
            let cb = c.bits();
            assert_eq!(b_cond(PC, PC, c), Ok(0x5400_0000 | cb));
            assert_eq!(
                b_cond(PC, PC + B_COND_MAX_FORWARD, c),
                Ok(0x5400_0000 | (0x3_ffff << 5) | cb)
            );
            assert_eq!(
                b_cond(PC, PC - B_COND_MAX_BACKWARD, c),
                Ok(0x5400_0000 | (0x4_0000 << 5) | cb)
            );
            assert_eq!(
                b_cond(PC, PC + B_COND_MAX_FORWARD + 4, c),
                Err(EncodeError::BranchOutOfRange {
                    pc: PC,
                    target: PC + B_COND_MAX_FORWARD + 4,
                    range: 1 << 20
                })
            );
            assert!(b_cond(PC, PC - B_COND_MAX_BACKWARD - 4, c).is_err());
        }
    }

    #[test]
    fn misalignment_fails() {
        for (pc, target) in [(PC + 2, PC + 8), (PC, PC + 1), (PC + 3, PC + 5)] {
            let want = Err(EncodeError::MisalignedBranch { pc, target });
            assert_eq!(b(pc, target), want);
            assert_eq!(bl(pc, target), want);
            assert_eq!(b_cond(pc, target, Cond::Eq), want);
        }
        // Misalignment is reported even when the distance is also out of range.
        assert!(matches!(
            b(PC + 1, PC + (1 << 30)),
            Err(EncodeError::MisalignedBranch { .. })
        ));
    }

    #[test]
    fn movz_validation() {
        assert_eq!(movz_x(0, 0, 0), Ok(0xd280_0000));
        assert_eq!(movz_x(30, 0xffff, 48), Ok(0xd2ff_fffe));
        assert_eq!(movz_x(1, 0x1234, 16), Ok(0xd2a2_4681));
        assert_eq!(
            movz_x(31, 0, 0),
            Err(EncodeError::InvalidRegister { reg: 31 })
        );
        for shift in [1, 8, 15, 17, 64, 255] {
            assert_eq!(
                movz_x(0, 0, shift),
                Err(EncodeError::InvalidShift { shift })
            );
        }
    }

    #[test]
    fn exception_encodings() {
        assert_eq!(brk(0x3e8), 0xd420_7d00);
        assert_eq!(svc(0), 0xd400_0001);
        assert_eq!(hvc(0xffff), 0xd41f_ffe2);
        assert_eq!(smc(1), 0xd400_0023);
    }

    #[test]
    fn classify_and_cmodx() {
        let safe = [
            (b(PC, PC + 8).unwrap(), InsnClass::B),
            (bl(PC, PC - 8).unwrap(), InsnClass::Bl),
            (brk(0xffff), InsnClass::Brk),
            (hvc(0), InsnClass::Hvc),
            (smc(7), InsnClass::Smc),
            (svc(0x80), InsnClass::Svc),
            (NOP, InsnClass::Nop),
            (ISB, InsnClass::Isb),
        ];
        for (insn, class) in safe {
            assert_eq!(classify(insn), class, "{insn:#010x}");
            assert!(is_cmodx_safe(insn), "{insn:#010x}");
            assert!(cmodx_pair_allowed(insn, NOP));
            assert!(cmodx_pair_allowed(NOP, insn));
        }
        let unsafe_ = [
            b_cond(PC, PC + 8, Cond::Eq).unwrap(),
            0x5400_0010, // bc.eq .
            0xd503_203f, // yield
            0xd503_233f, // paciasp
            0xd503_241f, // bti
            0xd503_30df, // isb #0 (reserved option)
            0xd503_3f9f, // dsb sy
            RET,
            movz_x(0, 1, 0).unwrap(),
            0xd420_0001, // brk with LL != 0: unallocated
            0xd400_0004, // op2 != 0: unallocated
            0xd400_0000, // LL == 0 under opc 000: unallocated
            0xd4a0_0001, // dcps1
            0x0000_0000, // udf #0
        ];
        for insn in unsafe_ {
            assert!(!is_cmodx_safe(insn), "{insn:#010x}");
            assert!(!cmodx_pair_allowed(insn, NOP));
            assert!(!cmodx_pair_allowed(NOP, insn));
        }
        assert_eq!(classify(0x5400_0010), InsnClass::Other);
        assert_eq!(classify(b_cond(0, 0, Cond::Nv).unwrap()), InsnClass::BCond);
    }

    #[test]
    fn branch_target_round_trips() {
        for off in [
            0isize,
            4,
            -4,
            B_COND_MAX_FORWARD as isize,
            -(B_COND_MAX_BACKWARD as isize),
        ] {
            let t = PC.checked_add_signed(off).unwrap();
            assert_eq!(branch_target(PC, b(PC, t).unwrap()), Some(t));
            assert_eq!(branch_target(PC, bl(PC, t).unwrap()), Some(t));
            assert_eq!(branch_target(PC, b_cond(PC, t, Cond::Le).unwrap()), Some(t));
        }
        for off in [B_MAX_FORWARD as isize, -(B_MAX_BACKWARD as isize)] {
            let t = PC.checked_add_signed(off).unwrap();
            assert_eq!(branch_target(PC, b(PC, t).unwrap()), Some(t));
            assert_eq!(branch_target(PC, bl(PC, t).unwrap()), Some(t));
        }
        assert_eq!(branch_target(PC, NOP), None);
        assert_eq!(branch_target(PC, 0x5400_0010), None);
        // A backward branch from address 0 would wrap.
        assert_eq!(branch_target(0, 0x17ff_ffff), None);
    }

    #[test]
    fn display_messages() {
        let e = b(0x4020_1000, 0x5020_1000).unwrap_err();
        assert_eq!(
            e.to_string(),
            "branch from 0x40201000 to 0x50201000 is out of range (+/-128 MiB)"
        );
        let e = b_cond(0x1000, 0x20_1000, Cond::Eq).unwrap_err();
        assert_eq!(
            e.to_string(),
            "branch from 0x1000 to 0x201000 is out of range (+/-1 MiB)"
        );
        assert_eq!(
            b(0x1002, 0x2000).unwrap_err().to_string(),
            "branch from 0x1002 to 0x2000: branch address is not 4-byte aligned"
        );
        assert_eq!(
            b(0x1000, 0x2001).unwrap_err().to_string(),
            "branch from 0x1000 to 0x2001: target is not 4-byte aligned"
        );
        assert_eq!(
            movz_x(31, 0, 0).unwrap_err().to_string(),
            "register x31 is invalid here (expected x0..=x30)"
        );
        assert_eq!(
            movz_x(0, 0, 8).unwrap_err().to_string(),
            "movz shift 8 is invalid (expected 0, 16, 32 or 48)"
        );
    }
}
