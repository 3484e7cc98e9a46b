//! A64 instruction words for the property tests: arbitrary `u32`s, and words built
//! from the encoding classes the classifiers tell apart (Arm ARM C4.1) with random
//! free fields and sometimes one fixed bit flipped, so that every class and its near
//! misses come up often (a uniform `u32` is a `NOP` once in 4 billion).
//!
//! Included by path (`#[path = "support/a64_words.rs"]`).
#![allow(dead_code)]

use proptest::prelude::*;
use proptest::sample::select;

/// `(fixed bits mask, fixed bits)` of each class.
pub const CLASSES: [(u32, u32); 24] = [
    (0xfc00_0000, 0x1400_0000), // B
    (0xfc00_0000, 0x9400_0000), // BL
    (0xff00_0010, 0x5400_0000), // B.cond
    (0xff00_0010, 0x5400_0010), // BC.cond
    (0xffe0_001f, 0xd400_0001), // SVC
    (0xffe0_001f, 0xd400_0002), // HVC
    (0xffe0_001f, 0xd400_0003), // SMC
    (0xffe0_001f, 0xd420_0000), // BRK
    (0xffe0_001f, 0xd440_0000), // HLT
    (0xffff_ffff, 0xd503_201f), // NOP
    (0xffff_ffff, 0xd503_3fdf), // ISB SY
    (0xffff_f01f, 0xd503_201f), // hints
    (0xffff_f01f, 0xd503_301f), // barriers
    (0xfff0_0000, 0xd500_0000), // MSR/SYS
    (0xff80_0000, 0xd280_0000), // MOVZ X
    (0x7e00_0000, 0x3400_0000), // CBZ/CBNZ
    (0x7e00_0000, 0x3600_0000), // TBZ/TBNZ
    (0x1f00_0000, 0x1000_0000), // ADR/ADRP
    (0x3b00_0000, 0x1800_0000), // LDR (literal), LDRSW, PRFM, SIMD/FP
    (0xffff_fc1f, 0xd61f_0000), // BR
    (0xffff_fc1f, 0xd63f_0000), // BLR
    (0xffff_fc1f, 0xd65f_0000), // RET
    (0x3f00_0000, 0x0800_0000), // load/store exclusive and ordered
    (0xfe00_0000, 0xd600_0000), // branch (register), ERET, PAC
];

/// A word of class `class` with `free` in its free bits, and bit `flip` flipped when
/// `flip < 32`.
pub fn word_of((mask, bits): (u32, u32), free: u32, flip: u32) -> u32 {
    let word = bits | (free & !mask);
    if flip < 32 { word ^ (1 << flip) } else { word }
}

/// Any word: uniform, or of a class (a third of those with one bit flipped).
pub fn a64_word() -> impl Strategy<Value = u32> {
    prop_oneof![
        1 => any::<u32>(),
        3 => (select(&CLASSES[..]), any::<u32>(), 0u32..96)
            .prop_map(|(class, free, flip)| word_of(class, free, flip)),
    ]
}

/// Any address, weighted towards the ends of the address space and to 4-byte
/// alignment.
pub fn any_addr() -> impl Strategy<Value = usize> {
    prop_oneof![
        any::<usize>(),
        any::<usize>().prop_map(|a| a & !3),
        (0usize..1 << 16),
        (0usize..1 << 16).prop_map(|a| usize::MAX - a),
        (0usize..1 << 16).prop_map(|a| (usize::MAX - a) & !3),
        (0usize..64).prop_map(|a| usize::MAX - a),
    ]
}
