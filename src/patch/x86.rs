//! x86 instructions as the patcher moves them: byte strings of 1 to [`MAX_LEN`] bytes,
//! with encoders for the few instructions kernel patching writes (JMP/CALL rel32, the
//! recommended multi-byte NOPs, INT3, `MOV $imm32, %eax`, RET) and the decoder the INT3
//! handler uses to emulate an instruction while it is being rewritten.
//!
//! Arch-free like [`super::insn`]: the host tests check every encoder against GNU as.

use super::Instruction;
use core::fmt;

/// The longest instruction this type holds: the longest recommended NOP (Linux's
/// text_poke_bp itself patches at most 5 bytes).
pub const MAX_LEN: usize = 8;
/// The INT3 opcode the INT3 protocol writes over the first byte.
pub const INT3: u8 = 0xcc;

/// One x86 instruction.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Insn {
    bytes: [u8; MAX_LEN],
    len: u8,
}

/// Why an instruction could not be encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EncodeError {
    /// A rel32 branch cannot reach the target from the instruction's end.
    OutOfRange {
        /// Where the instruction starts.
        pc: usize,
        /// Where it should go.
        target: usize,
    },
    /// No encoding of this length.
    BadLength(usize),
}

impl fmt::Display for EncodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            EncodeError::OutOfRange { pc, target } => {
                write!(f, "rel32 at {pc:#x} cannot reach {target:#x}")
            }
            EncodeError::BadLength(len) => write!(f, "no {len}-byte encoding"),
        }
    }
}

impl Insn {
    /// The instruction made of `bytes`, or `None` if empty or longer than [`MAX_LEN`].
    pub const fn from_bytes(bytes: &[u8]) -> Option<Insn> {
        if bytes.is_empty() || bytes.len() > MAX_LEN {
            return None;
        }
        let mut out = [0; MAX_LEN];
        let mut i = 0;
        while i < bytes.len() {
            out[i] = bytes[i];
            i += 1;
        }
        Some(Insn {
            bytes: out,
            len: bytes.len() as u8,
        })
    }

    /// The `len`-byte instruction in the low bytes of the little-endian `word` (the
    /// higher bytes are ignored), or `None` if `len` is not 1 to [`MAX_LEN`].
    #[inline(always)]
    pub const fn from_le_word(word: u64, len: usize) -> Option<Insn> {
        if len == 0 || len > MAX_LEN {
            return None;
        }
        let mask = if len == MAX_LEN {
            u64::MAX
        } else {
            (1 << (8 * len)) - 1
        };
        Some(Insn {
            bytes: (word & mask).to_le_bytes(),
            len: len as u8,
        })
    }

    /// The encoding.
    pub fn bytes(&self) -> &[u8] {
        // `get`: `len <= MAX_LEN` always, but the rendezvous path calls this and must not
        // hold a branch to a bounds-check panic out of `.text.nopatch`.
        self.bytes.get(..self.len as usize).unwrap_or(&self.bytes)
    }
}

impl fmt::Debug for Insn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "x86::Insn({self:x})")
    }
}

/// The bytes in hex, space-separated (`e9 fb 0f 00 00`); flags are ignored.
impl fmt::LowerHex for Insn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, byte) in self.bytes().iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl Instruction for Insn {
    const ALIGN: usize = 1;
    const CMODX_RULE: &'static str =
        "x86 guarantees no such pair; use the INT3 protocol (text_poke_bp)";

    fn size(&self) -> usize {
        self.len as usize
    }

    #[inline(always)]
    fn to_le_word(&self) -> u64 {
        u64::from_le_bytes(self.bytes)
    }

    /// x86 promises nothing about an instruction rewritten under a CPU executing it
    /// (the SDM's cross-modifying code rules ask for a serialising instruction on the
    /// executing CPU after the write): every live change needs the INT3 protocol.
    fn cmodx_pair_allowed(_old: Self, _new: Self) -> bool {
        false
    }
}

const fn rel32(pc: usize, len: usize, target: usize) -> Result<[u8; 4], EncodeError> {
    let delta = (target as i128) - (pc as i128 + len as i128);
    if delta < i32::MIN as i128 || delta > i32::MAX as i128 {
        return Err(EncodeError::OutOfRange { pc, target });
    }
    Ok((delta as i32).to_le_bytes())
}

const fn with_rel32(opcode: u8, rel: [u8; 4]) -> Insn {
    Insn {
        bytes: [opcode, rel[0], rel[1], rel[2], rel[3], 0, 0, 0],
        len: 5,
    }
}

/// `JMP rel32` at `pc` to `target`.
pub const fn jmp_rel32(pc: usize, target: usize) -> Result<Insn, EncodeError> {
    match rel32(pc, 5, target) {
        Ok(rel) => Ok(with_rel32(0xe9, rel)),
        Err(err) => Err(err),
    }
}

/// `CALL rel32` at `pc` to `target`.
pub const fn call_rel32(pc: usize, target: usize) -> Result<Insn, EncodeError> {
    match rel32(pc, 5, target) {
        Ok(rel) => Ok(with_rel32(0xe8, rel)),
        Err(err) => Err(err),
    }
}

/// `MOV $imm, %eax` (5 bytes; zero-extends into RAX).
pub const fn mov_eax_imm32(imm: u32) -> Insn {
    with_rel32(0xb8, imm.to_le_bytes())
}

/// `INT3`.
pub const fn int3() -> Insn {
    Insn {
        bytes: [INT3, 0, 0, 0, 0, 0, 0, 0],
        len: 1,
    }
}

/// `RET`.
pub const fn ret() -> Insn {
    Insn {
        bytes: [0xc3, 0, 0, 0, 0, 0, 0, 0],
        len: 1,
    }
}

/// The NOPs the Intel SDM recommends (Vol. 2B, "NOP"), by length.
const NOPS: [&[u8]; MAX_LEN] = [
    &[0x90],
    &[0x66, 0x90],
    &[0x0f, 0x1f, 0x00],
    &[0x0f, 0x1f, 0x40, 0x00],
    &[0x0f, 0x1f, 0x44, 0x00, 0x00],
    &[0x66, 0x0f, 0x1f, 0x44, 0x00, 0x00],
    &[0x0f, 0x1f, 0x80, 0x00, 0x00, 0x00, 0x00],
    &[0x0f, 0x1f, 0x84, 0x00, 0x00, 0x00, 0x00, 0x00],
];

/// The recommended single NOP instruction of `len` bytes (1 to [`MAX_LEN`]).
pub const fn nop(len: usize) -> Result<Insn, EncodeError> {
    if len == 0 || len > MAX_LEN {
        return Err(EncodeError::BadLength(len));
    }
    match Insn::from_bytes(NOPS[len - 1]) {
        Some(insn) => Ok(insn),
        None => Err(EncodeError::BadLength(len)),
    }
}

/// What executing an instruction does, for the INT3 handler to do instead while the
/// instruction is being rewritten.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Emulation {
    /// Continue at the next instruction (a NOP).
    Next(usize),
    /// Jump to the address.
    Jump(usize),
    /// Push the return address, then jump to the target.
    Call {
        /// Where the call goes.
        target: usize,
        /// The return address (the next instruction).
        ret: usize,
    },
    /// Set RAX (zero-extended 32-bit immediate), then continue at `next`.
    MovEax {
        /// The value.
        imm: u32,
        /// The next instruction.
        next: usize,
    },
}

/// How to emulate `insn` located at `pc`, for the instructions the encoders above
/// produce; `None` for anything else (which the INT3 protocol then refuses to patch).
pub fn emulation(pc: usize, insn: &Insn) -> Option<Emulation> {
    let b = insn.bytes();
    let next = pc.wrapping_add(b.len());
    let rel = |b: &[u8]| i32::from_le_bytes([b[1], b[2], b[3], b[4]]) as isize;
    match b {
        [0xe9, ..] if b.len() == 5 => Some(Emulation::Jump(next.wrapping_add_signed(rel(b)))),
        [0xe8, ..] if b.len() == 5 => Some(Emulation::Call {
            target: next.wrapping_add_signed(rel(b)),
            ret: next,
        }),
        [0xb8, ..] if b.len() == 5 => Some(Emulation::MovEax {
            imm: u32::from_le_bytes([b[1], b[2], b[3], b[4]]),
            next,
        }),
        _ if NOPS.contains(&b) => Some(Emulation::Next(next)),
        _ => None,
    }
}
