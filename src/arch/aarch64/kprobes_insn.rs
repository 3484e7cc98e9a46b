//! A64 instructions for kprobes: which may be probed, which run out of line, and the
//! simulation of those that read the PC and so cannot run anywhere but at their own
//! address (B, BL, B.cond, CBZ/CBNZ, TBZ/TBNZ, ADR, ADRP, LDR literal, BR/BLR/RET).
//!
//! Written by hand from the Arm ARM's encoding tables (C4.1): kprobes needs a dozen
//! classes told apart by their fixed bits, and the simulation must run on the hit path
//! from `.text.kprobes` (no probe may be placed there); a general disassembler crate
//! would be far larger, and its code would have to be kept out of probeable text too.
//! `tests/kprobes_host.rs` checks it on the host against GNU as encodings.

use super::exceptions::TrapFrame;

/// How a hit executes the original instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plan {
    /// Not PC-relative: executed in the probe's out-of-line slot.
    OutOfLine,
    /// PC-relative: simulated against the frame.
    Simulate(Sim),
}

/// What LDR (literal) loads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Literal {
    /// `LDR Wt`: 32 bits, zero-extended.
    Word,
    /// `LDR Xt`: 64 bits.
    Double,
    /// `LDRSW Xt`: 32 bits, sign-extended.
    SignedWord,
    /// `PRFM (literal)`: a hint, nothing to do.
    Prefetch,
}

/// A PC-relative instruction's decoded fields (offsets are from the instruction's own
/// address, in bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sim {
    /// `B`, or `BL` (`link`: X30 = PC + 4).
    Branch {
        /// To the target.
        offset: i64,
        /// BL.
        link: bool,
    },
    /// `B.cond`.
    BranchCond {
        /// To the target.
        offset: i64,
        /// The condition (Arm ARM C1.2.4).
        cond: u8,
    },
    /// `CBZ`/`CBNZ`.
    CompareBranch {
        /// To the target.
        offset: i64,
        /// The register tested.
        rt: u8,
        /// 64-bit (`Xt`) or 32-bit (`Wt`).
        wide: bool,
        /// CBNZ.
        nonzero: bool,
    },
    /// `TBZ`/`TBNZ`.
    TestBranch {
        /// To the target.
        offset: i64,
        /// The register tested.
        rt: u8,
        /// The bit tested.
        bit: u8,
        /// TBNZ.
        nonzero: bool,
    },
    /// `ADR` (`page` false) or `ADRP`.
    Address {
        /// The destination register.
        rd: u8,
        /// The byte offset (ADRP: already shifted by 12).
        offset: i64,
        /// ADRP: relative to the PC's 4 KiB page.
        page: bool,
    },
    /// `LDR (literal)`, `LDRSW (literal)`, `PRFM (literal)`.
    Load {
        /// The destination register.
        rt: u8,
        /// To the literal.
        offset: i64,
        /// What is loaded.
        kind: Literal,
    },
    /// `BR`, `BLR` (`link`), `RET`.
    BranchReg {
        /// The register holding the target.
        rn: u8,
        /// BLR.
        link: bool,
    },
}

/// Sign-extends the low `bits` bits of `value`.
const fn sext(value: u32, bits: u32) -> i64 {
    let shift = 64 - bits;
    ((value as i64) << shift) >> shift
}

const fn field(insn: u32, lsb: u32, bits: u32) -> u32 {
    (insn >> lsb) & ((1 << bits) - 1)
}

/// Classifies `insn`: run out of line, simulate, or refuse (why).
pub const fn decode(insn: u32) -> Result<Plan, &'static str> {
    use Plan::{OutOfLine, Simulate};
    let op0 = field(insn, 25, 4);
    if op0 <= 0b0011 {
        return Err("UDF, unallocated or SVE/SME encoding");
    }
    if insn & 0xff00_0000 == 0xd400_0000 {
        return Err("exception-generating instruction (SVC/HVC/SMC/BRK/HLT/DCPS)");
    }
    if insn & 0xfe00_0000 == 0xd600_0000 {
        return match insn & 0xffff_fc1f {
            0xd61f_0000 | 0xd65f_0000 => Ok(Simulate(Sim::BranchReg {
                rn: field(insn, 5, 5) as u8,
                link: false,
            })),
            0xd63f_0000 => Ok(Simulate(Sim::BranchReg {
                rn: field(insn, 5, 5) as u8,
                link: true,
            })),
            _ => Err("ERET, DRPS or a pointer-authenticated branch"),
        };
    }
    if insn & 0xffc0_0000 == 0xd500_0000 {
        // Hints (NOP, YIELD, BTI, PAC*SP, ...) and barriers run anywhere.
        return match insn & 0xffff_f01f {
            0xd503_201f | 0xd503_301f => Ok(OutOfLine),
            _ => Err("system instruction (MSR/MRS/SYS): may read or change PSTATE"),
        };
    }
    if insn & 0x3f00_0000 == 0x0800_0000 {
        return Err("load/store exclusive or ordered: a trap between the pair breaks the monitor");
    }
    if insn & 0x7c00_0000 == 0x1400_0000 {
        return Ok(Simulate(Sim::Branch {
            offset: sext(field(insn, 0, 26), 26) * 4,
            link: insn >> 31 != 0,
        }));
    }
    if insn & 0xff00_0010 == 0x5400_0000 {
        return Ok(Simulate(Sim::BranchCond {
            offset: sext(field(insn, 5, 19), 19) * 4,
            cond: field(insn, 0, 4) as u8,
        }));
    }
    if insn & 0xff00_0000 == 0x5400_0000 {
        return Err("BC.cond (consistent conditional branch) is not simulated");
    }
    if insn & 0x7e00_0000 == 0x3400_0000 {
        return Ok(Simulate(Sim::CompareBranch {
            offset: sext(field(insn, 5, 19), 19) * 4,
            rt: field(insn, 0, 5) as u8,
            wide: insn >> 31 != 0,
            nonzero: field(insn, 24, 1) != 0,
        }));
    }
    if insn & 0x7e00_0000 == 0x3600_0000 {
        return Ok(Simulate(Sim::TestBranch {
            offset: sext(field(insn, 5, 14), 14) * 4,
            rt: field(insn, 0, 5) as u8,
            bit: ((insn >> 31) << 5 | field(insn, 19, 5)) as u8,
            nonzero: field(insn, 24, 1) != 0,
        }));
    }
    if insn & 0x1f00_0000 == 0x1000_0000 {
        let imm = sext(field(insn, 5, 19) << 2 | field(insn, 29, 2), 21);
        let page = insn >> 31 != 0;
        return Ok(Simulate(Sim::Address {
            rd: field(insn, 0, 5) as u8,
            offset: if page { imm << 12 } else { imm },
            page,
        }));
    }
    if insn & 0x3b00_0000 == 0x1800_0000 {
        if field(insn, 26, 1) != 0 {
            return Err("SIMD/FP LDR (literal) is not simulated");
        }
        return Ok(Simulate(Sim::Load {
            rt: field(insn, 0, 5) as u8,
            offset: sext(field(insn, 5, 19), 19) * 4,
            kind: match insn >> 30 {
                0 => Literal::Word,
                1 => Literal::Double,
                2 => Literal::SignedWord,
                _ => Literal::Prefetch,
            },
        }));
    }
    Ok(OutOfLine)
}

/// Whether `cond` holds for the NZCV flags in `spsr` (Arm ARM C1.2.4, `ConditionHolds`).
#[unsafe(link_section = ".text.kprobes")]
pub fn condition_holds(cond: u8, spsr: u64) -> bool {
    let (n, z, c, v) = (
        spsr >> 31 & 1 != 0,
        spsr >> 30 & 1 != 0,
        spsr >> 29 & 1 != 0,
        spsr >> 28 & 1 != 0,
    );
    let base = match cond >> 1 {
        0 => z,
        1 => c,
        2 => n,
        3 => v,
        4 => c && !z,
        5 => n == v,
        6 => n == v && !z,
        _ => true,
    };
    if cond & 1 != 0 && cond != 0xf {
        !base
    } else {
        base
    }
}

#[unsafe(link_section = ".text.kprobes")]
fn reg(frame: &TrapFrame, r: u8) -> u64 {
    frame.x.get(r as usize).copied().unwrap_or(0)
}

#[unsafe(link_section = ".text.kprobes")]
fn set_reg(frame: &mut TrapFrame, r: u8, value: u64) {
    if let Some(x) = frame.x.get_mut(r as usize) {
        *x = value;
    }
}

/// Executes `sim`, the instruction at `pc`, against `frame`: its registers and its
/// resume address (`elr`).
#[unsafe(link_section = ".text.kprobes")]
pub fn simulate(sim: Sim, pc: u64, frame: &mut TrapFrame) {
    let at = |offset: i64| pc.wrapping_add_signed(offset);
    // Wrapping, as the PC does: `pc + 4` overflowed (a debug-build panic) for the last
    // word of the address space (tests/prop_kprobes_decode.rs).
    let after = pc.wrapping_add(4);
    let mut next = after;
    match sim {
        Sim::Branch { offset, link } => {
            if link {
                set_reg(frame, 30, after);
            }
            next = at(offset);
        }
        Sim::BranchCond { offset, cond } => {
            if condition_holds(cond, frame.spsr) {
                next = at(offset);
            }
        }
        Sim::CompareBranch {
            offset,
            rt,
            wide,
            nonzero,
        } => {
            let value = reg(frame, rt);
            let value = if wide { value } else { value & 0xffff_ffff };
            if (value != 0) == nonzero {
                next = at(offset);
            }
        }
        Sim::TestBranch {
            offset,
            rt,
            bit,
            nonzero,
        } => {
            if (reg(frame, rt) >> bit & 1 != 0) == nonzero {
                next = at(offset);
            }
        }
        Sim::Address { rd, offset, page } => {
            let base = if page { pc & !0xfff } else { pc };
            set_reg(frame, rd, base.wrapping_add_signed(offset));
        }
        Sim::Load { rt, offset, kind } => {
            let addr = at(offset) as usize;
            // SAFETY: the literal pool of kernel code the compiler or assembler placed
            // next to it, in the mapped image (the probed instruction would have read it).
            let value = unsafe {
                match kind {
                    Literal::Word => u64::from(core::ptr::read_unaligned(addr as *const u32)),
                    Literal::Double => core::ptr::read_unaligned(addr as *const u64),
                    Literal::SignedWord => {
                        core::ptr::read_unaligned(addr as *const i32) as i64 as u64
                    }
                    Literal::Prefetch => 0,
                }
            };
            if kind != Literal::Prefetch {
                set_reg(frame, rt, value);
            }
        }
        Sim::BranchReg { rn, link } => {
            let target = reg(frame, rn);
            if link {
                set_reg(frame, 30, after);
            }
            next = target;
        }
    }
    frame.elr = next;
}
