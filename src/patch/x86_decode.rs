//! x86-64 instruction length decoding and the kprobes classification of what was
//! decoded: how a hit on the instruction executes it (emulated on the trap frame, or
//! single-stepped out of line with a fix-up afterwards), or why it cannot be probed.
//!
//! Hand-written rather than taken from a crate: the decoders on crates.io (iced-x86,
//! yaxpeax-x86, zydis) are full disassemblers (iced-x86's tables alone are hundreds of
//! KiB in a kernel whose whole text is smaller) and none returns the one thing kprobes
//! needs beyond the length: where a RIP-relative displacement lies. Linux's own
//! (arch/x86/lib/insn.c) is table-driven for the same reason. This one knows the
//! integer instructions a `no_std`, soft-float kernel is built from, and refuses the
//! rest with the reason, as a probe on something it does not understand must be.
//!
//! Arch-free (pure functions of bytes and RFLAGS): the host tests check it.

/// The longest x86 instruction.
pub const MAX_INSN_LEN: usize = 15;

/// RFLAGS.CF.
pub const CF: u64 = 1 << 0;
/// RFLAGS.PF.
pub const PF: u64 = 1 << 2;
/// RFLAGS.ZF.
pub const ZF: u64 = 1 << 6;
/// RFLAGS.SF.
pub const SF: u64 = 1 << 7;
/// RFLAGS.TF.
pub const TF: u64 = 1 << 8;
/// RFLAGS.IF.
pub const IF: u64 = 1 << 9;
/// RFLAGS.OF.
pub const OF: u64 = 1 << 11;

/// What a single step out of line leaves to fix once the copy has run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fixup {
    /// Falls through: the CPU ends right after the copy; resume after the original.
    Next,
    /// Goes to an absolute address it read (RET, JMP through a register or memory):
    /// RIP is already right.
    Absolute,
    /// CALL through a register or memory: RIP is right, but the return address it
    /// pushed is the copy's end; it must be the original's end.
    CallIndirect,
}

/// How a hit executes the probed instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Execute {
    /// `JMP rel8/rel32`: continue at the target.
    Jump {
        /// The target.
        target: usize,
    },
    /// `CALL rel32`: push `ret`, continue at `target` (Linux's `int3_emulate_call`).
    Call {
        /// The target.
        target: usize,
        /// The return address (the next instruction).
        ret: usize,
    },
    /// `Jcc rel8/rel32`: continue at `target` if condition `cond` (the low nibble of the
    /// opcode) holds in RFLAGS, else at `next`.
    Jcc {
        /// The condition code (0 = O ... 15 = G).
        cond: u8,
        /// Where the branch goes when taken.
        target: usize,
        /// The next instruction.
        next: usize,
    },
    /// Single-step a copy out of line, then apply the fix-up.
    Step {
        /// What to fix after the step.
        fixup: Fixup,
        /// Offset of a RIP-relative disp32 in the instruction, to rebase in the copy.
        rip_disp: Option<u8>,
    },
}

/// A decoded instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decoded {
    /// The instruction's bytes (the first `len`).
    pub bytes: [u8; MAX_INSN_LEN],
    /// Its length.
    pub len: u8,
    /// How a hit executes it.
    pub execute: Execute,
}

impl Decoded {
    /// The instruction's bytes.
    pub fn bytes(&self) -> &[u8] {
        self.bytes
            .get(..usize::from(self.len))
            .unwrap_or(&self.bytes)
    }

    /// The bytes of an out-of-line copy at `xol`: the instruction, with a RIP-relative
    /// displacement rebased so that it names the same address from there; `None` if
    /// the rebased displacement does not fit 32 bits.
    pub fn xol_copy(&self, addr: usize, xol: usize) -> Option<[u8; MAX_INSN_LEN]> {
        let mut copy = self.bytes;
        if let Execute::Step {
            rip_disp: Some(at), ..
        } = self.execute
        {
            let at = usize::from(at);
            let disp = copy.get(at..at + 4)?;
            let disp = i64::from(i32::from_le_bytes(disp.try_into().ok()?));
            // Same length at both places: the displacement is from the end of each.
            // Modulo 2^64, as the CPU adds it: the slot may lie across either end of
            // the address space, or across the signed midpoint, from the original.
            let rebased = (addr.wrapping_sub(xol) as i64).wrapping_add(disp);
            let rebased = i32::try_from(rebased).ok()?;
            copy.get_mut(at..at + 4)?
                .copy_from_slice(&rebased.to_le_bytes());
        }
        Some(copy)
    }
}

/// Whether condition code `cond` (0-15, the Jcc/SETcc/CMOVcc nibble) holds in `rflags`.
#[inline(always)]
pub fn condition_holds(cond: u8, rflags: u64) -> bool {
    let f = |bit: u64| rflags & bit != 0;
    let holds = match cond >> 1 {
        0 => f(OF),
        1 => f(CF),
        2 => f(ZF),
        3 => f(CF) || f(ZF),
        4 => f(SF),
        5 => f(PF),
        6 => f(SF) != f(OF),
        _ => f(ZF) || f(SF) != f(OF),
    };
    // Odd codes are the negations of the even ones below them.
    holds != (cond & 1 == 1)
}

/// How an immediate follows the opcode (and ModRM).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Imm {
    None,
    /// 1 byte.
    B,
    /// 2 bytes.
    W,
    /// 16 or 32 bits by operand size (66 prefix).
    Z,
    /// `MOV r, imm`: 16, 32 or 64 bits (66, none, REX.W).
    V,
    /// `ENTER`: 2 + 1 bytes.
    Enter,
    /// `MOV` to/from a 64-bit absolute address.
    Moffs,
}

/// What the one-byte or two-byte opcode table says.
enum Op {
    /// A ModRM byte follows, then the immediate.
    ModRm(Imm),
    /// No ModRM, then the immediate.
    Plain(Imm),
    /// Refused, and why.
    No(&'static str),
}

const SYSTEM: &str =
    "a system instruction (privileged state or control flow the step cannot contain)";
const CHANGES_IF_TF: &str = "reads or writes RFLAGS.IF/TF, which the out-of-line step owns";
const TRAPS: &str = "raises an exception itself (INT3, INT n, INT1, UD)";
const INVALID: &str = "not a valid instruction in 64-bit mode";
const NOT_DECODED: &str =
    "an opcode this decoder does not know (SSE/AVX, the 0F 38/0F 3A maps, x87 or 3DNow!)";

fn one_byte(op: u8) -> Op {
    use Imm::*;
    match op {
        // ALU r/m,r and r,r/m; AL/eAX with an immediate; the rest of each row is
        // invalid in 64-bit mode (or a prefix, or the two-byte escape, handled before).
        0x00..=0x3f => match op & 7 {
            0..=3 => Op::ModRm(None),
            4 => Op::Plain(B),
            5 => Op::Plain(Z),
            _ => Op::No(INVALID),
        },
        0x50..=0x5f => Op::Plain(None),
        0x63 => Op::ModRm(None),
        0x68 => Op::Plain(Z),
        0x69 => Op::ModRm(Z),
        0x6a => Op::Plain(B),
        0x6b => Op::ModRm(B),
        0x6c..=0x6f => Op::Plain(None),
        0x80 | 0x83 => Op::ModRm(B),
        0x81 => Op::ModRm(Z),
        0x84..=0x8d | 0x8f => Op::ModRm(None),
        0x8e => Op::No("MOV to a segment register (MOV SS would hold off the step's trap)"),
        0x90..=0x99 | 0x9b | 0x9e | 0x9f => Op::Plain(None),
        0x9c | 0x9d => Op::No(CHANGES_IF_TF),
        0xa0..=0xa3 => Op::Plain(Moffs),
        0xa4..=0xa7 | 0xaa..=0xaf => Op::Plain(None),
        0xa8 => Op::Plain(B),
        0xa9 => Op::Plain(Z),
        0xb0..=0xb7 => Op::Plain(B),
        0xb8..=0xbf => Op::Plain(V),
        0xc0 | 0xc1 => Op::ModRm(B),
        0xc2 => Op::Plain(W),
        0xc3 | 0xc9 => Op::Plain(None),
        0xc6 => Op::ModRm(B),
        0xc7 => Op::ModRm(Z),
        0xc8 => Op::Plain(Enter),
        0xca | 0xcb | 0xcf => Op::No("far return or IRET"),
        0xcc..=0xce | 0xf1 => Op::No(TRAPS),
        0xd0..=0xd3 => Op::ModRm(None),
        0xd7 | 0xf5 | 0xf8 | 0xf9 | 0xfc | 0xfd => Op::Plain(None),
        0xd8..=0xdf => Op::No(NOT_DECODED),
        0xe0..=0xe3 => Op::No("LOOP/JRCXZ: a relative branch this port does not emulate"),
        0xe4..=0xe7 => Op::Plain(B),
        0xec..=0xef => Op::Plain(None),
        0xf4 => Op::No("HLT: would stop the CPU inside the step"),
        0xfa | 0xfb => Op::No(CHANGES_IF_TF),
        0xf6 | 0xf7 | 0xfe | 0xff => Op::ModRm(None), // immediates by ModRM.reg, below
        _ => Op::No(INVALID),
    }
}

fn two_byte(op: u8) -> Op {
    use Imm::*;
    match op {
        0x00 | 0x01 | 0x20..=0x23 | 0x05 | 0x07 | 0x34 | 0x35 | 0xaa => Op::No(SYSTEM),
        0x0b | 0xb9 | 0xff => Op::No(TRAPS),
        0x06 | 0x08 | 0x09 | 0x30..=0x33 | 0xa0..=0xa2 | 0xa8 | 0xa9 | 0xc8..=0xcf => {
            Op::Plain(None)
        }
        0x0d | 0x18..=0x1f | 0x40..=0x4f | 0x90..=0x9f => Op::ModRm(None),
        0xa3 | 0xa5 | 0xab | 0xad | 0xae | 0xaf | 0xb0..=0xb7 | 0xbb..=0xbf | 0xc0 | 0xc1 => {
            Op::ModRm(None)
        }
        0xc3 | 0xc7 => Op::ModRm(None),
        0xa4 | 0xac | 0xba => Op::ModRm(B),
        _ => Op::No(NOT_DECODED),
    }
}

/// Decodes the instruction at `addr` from `bytes` (what text holds there: at least its
/// length, up to [`MAX_INSN_LEN`]) and decides how a probe hit executes it, or why it
/// cannot be probed.
pub fn decode(addr: usize, bytes: &[u8]) -> Result<Decoded, &'static str> {
    let byte = |i: usize| {
        bytes
            .get(i)
            .copied()
            .ok_or("the text ends inside the instruction")
    };
    let mut i = 0;
    let mut opsize16 = false;
    let mut prefixed = false;
    // Legacy prefixes (any order), then at most one REX right before the opcode.
    loop {
        match byte(i)? {
            0x66 => opsize16 = true,
            0x67 => return Err("address-size prefix (67): EIP-relative forms are not decoded"),
            0xf0 | 0xf2 | 0xf3 | 0x2e | 0x36 | 0x3e | 0x26 | 0x64 | 0x65 => {}
            _ => break,
        }
        prefixed = true;
        i += 1;
        if i >= MAX_INSN_LEN {
            return Err("more prefixes than an instruction may have");
        }
    }
    let mut rex_w = false;
    if let 0x40..=0x4f = byte(i)? {
        rex_w = byte(i)? & 8 != 0;
        prefixed = true;
        i += 1;
    }
    let opcode = byte(i)?;
    i += 1;
    let next = |len: usize| addr.wrapping_add(len);
    let rel = |at: usize, width: usize| -> Result<isize, &'static str> {
        Ok(match width {
            1 => isize::from(byte(at)? as i8),
            _ => i32::from_le_bytes([byte(at)?, byte(at + 1)?, byte(at + 2)?, byte(at + 3)?])
                as isize,
        })
    };
    // The 0F-map opcode, for the ModRM checks below.
    let mut two_byte_op = None;
    let op = match opcode {
        0x0f => {
            let second = byte(i)?;
            i += 1;
            match second {
                0x80..=0x8f if !prefixed => {
                    let len = i + 4;
                    return finish(
                        bytes,
                        len,
                        Execute::Jcc {
                            cond: second & 0xf,
                            target: next(len).wrapping_add_signed(rel(i, 4)?),
                            next: next(len),
                        },
                    );
                }
                // The three-byte maps are SSSE3/SSE4/AES/SHA with MOVBE, CRC32 and
                // ADX among them, and undefined opcodes that raise #UD in the slot:
                // refused whole (this kernel's text has none of them).
                0x38 | 0x3a => Op::No(NOT_DECODED),
                _ => {
                    two_byte_op = Some(second);
                    two_byte(second)
                }
            }
        }
        0x62 | 0xc4 | 0xc5 => return Err("a VEX/EVEX prefix (vector instructions)"),
        0x70..=0x7f | 0xe8 | 0xe9 | 0xeb if prefixed => {
            return Err("a prefixed relative branch (its operand size is not decoded)");
        }
        0x70..=0x7f => {
            let len = i + 1;
            return finish(
                bytes,
                len,
                Execute::Jcc {
                    cond: opcode & 0xf,
                    target: next(len).wrapping_add_signed(rel(i, 1)?),
                    next: next(len),
                },
            );
        }
        0xeb => {
            let len = i + 1;
            return finish(
                bytes,
                len,
                Execute::Jump {
                    target: next(len).wrapping_add_signed(rel(i, 1)?),
                },
            );
        }
        0xe9 | 0xe8 => {
            let len = i + 4;
            let target = next(len).wrapping_add_signed(rel(i, 4)?);
            let execute = if opcode == 0xe9 {
                Execute::Jump { target }
            } else {
                Execute::Call {
                    target,
                    ret: next(len),
                }
            };
            return finish(bytes, len, execute);
        }
        _ => one_byte(opcode),
    };
    // REX.W wins over 66: a 64-bit operand, whose immediate is still 32 bits.
    let z = if opsize16 && !rex_w { 2 } else { 4 };
    let (has_modrm, imm) = match op {
        Op::No(why) => return Err(why),
        Op::ModRm(imm) => (true, imm),
        Op::Plain(imm) => (false, imm),
    };
    let mut fixup = match opcode {
        0xc2 | 0xc3 => Fixup::Absolute,
        _ => Fixup::Next,
    };
    let mut rip_disp = None;
    let mut imm_len = match imm {
        Imm::None => 0,
        Imm::B => 1,
        Imm::W => 2,
        Imm::Z => z,
        Imm::V if rex_w => 8,
        Imm::V => z,
        Imm::Enter => 3,
        Imm::Moffs => 8,
    };
    if has_modrm {
        let modrm = byte(i)?;
        i += 1;
        let (md, reg, rm) = (modrm >> 6, (modrm >> 3) & 7, modrm & 7);
        if md != 3 && rm == 4 {
            let sib = byte(i)?;
            i += 1;
            if md == 0 && sib & 7 == 5 {
                i += 4;
            }
        }
        match md {
            0 if rm == 5 => {
                rip_disp = Some(i as u8);
                i += 4;
            }
            1 => i += 1,
            2 => i += 4,
            _ => {}
        }
        // Forms that raise #UD, which the step would take in the slot: a register
        // operand where only memory is defined (LEA, LSS/LFS/LGS, MOVNTI, PREFETCH,
        // group 9 but RDRAND/RDSEED/RDPID), and group 8's undefined /0 to /3.
        let memory_only = match two_byte_op {
            Some(0x0d | 0xb2 | 0xb4 | 0xb5 | 0xc3) => true,
            Some(0xc7) => reg < 6,
            Some(_) => false,
            None => opcode == 0x8d,
        };
        if md == 3 && memory_only || two_byte_op == Some(0xba) && reg < 4 {
            return Err(INVALID);
        }
        // Groups whose immediate or meaning depends on ModRM.reg.
        match (opcode, reg) {
            (0xf6, 0 | 1) => imm_len = 1,
            (0xf7, 0 | 1) => imm_len = z,
            (0xfe, 2..) => return Err(INVALID),
            (0xff, 2) => fixup = Fixup::CallIndirect,
            (0xff, 4) => fixup = Fixup::Absolute,
            (0xff, 3 | 5) => return Err("far CALL/JMP"),
            (0xff, 7) => return Err(INVALID),
            (0xc7, _) if modrm == 0xf8 => return Err("XBEGIN: a transaction cannot be stepped"),
            (0xc6 | 0xc7 | 0x8f, 1..) if modrm != 0xf8 => return Err(INVALID),
            _ => {}
        }
    }
    let len = i + imm_len;
    finish(bytes, len, Execute::Step { fixup, rip_disp })
}

fn finish(bytes: &[u8], len: usize, execute: Execute) -> Result<Decoded, &'static str> {
    if len > MAX_INSN_LEN {
        return Err("longer than any x86 instruction");
    }
    let found = bytes
        .get(..len)
        .ok_or("the text ends inside the instruction")?;
    let mut out = [0; MAX_INSN_LEN];
    out[..len].copy_from_slice(found);
    Ok(Decoded {
        bytes: out,
        len: len as u8,
        execute,
    })
}
