//! Static keys on x86_64 (Linux's arch/x86/include/asm/jump_label.h and
//! arch/x86/kernel/jump_label.c): a site is a 5-byte NOP or a `JMP rel32`. No pair of
//! multi-byte instructions may change under a running CPU on x86, so a key's sites
//! change through the INT3 protocol ([`text_poke_bp`], Linux's
//! `smp_text_poke_batch_*`): the whole batch in one round, three syncs of every CPU for
//! the batch, not per site.

use super::text::KERNEL_TEXT;
use super::text_poke::{TP_VEC_MAX, text_poke_bp};
use super::{cpu, layout, timer};
use crate::patch::x86::{self, Insn};
use crate::patch::{Patch, PatchError, Text};
use crate::static_key::{JumpEntry, KeyText, StaticKey, StaticKeys};
use core::ops::Range;

/// A site that is a 5-byte NOP while its key is disabled: `true` while the key is
/// enabled (Linux's `static_branch_unlikely`). The key must be a [`StaticKey`] defined
/// with [`define_static_key!`](crate::define_static_key).
#[macro_export]
macro_rules! static_branch_unlikely {
    ($key:path) => {{
        let mut enabled = false;
        // SAFETY: a NOP5 with a `__jump_table` entry (site, target, key, kind 0); the
        // static key code only ever makes it a JMP rel32 to the label or a NOP5 again.
        unsafe {
            ::core::arch::asm!(
                "998: .byte 0x0f, 0x1f, 0x44, 0x00, 0x00",
                ".pushsection __jump_table, \"a\"",
                ".balign 8",
                ".quad 998b, {target}, {key}, 0",
                ".popsection",
                key = sym $key,
                target = label { enabled = true; },
                options(att_syntax, nomem, nostack, preserves_flags),
            )
        };
        enabled
    }};
}

/// A site that is a 5-byte NOP while its key is enabled: `true` while the key is
/// enabled, laid out for that case (Linux's `static_branch_likely`; keys start
/// disabled, so the site starts as the JMP rel32, spelled out so the assembler cannot
/// pick the 2-byte form).
#[macro_export]
macro_rules! static_branch_likely {
    ($key:path) => {{
        let mut enabled = true;
        // SAFETY: as in `static_branch_unlikely!`, kind 1, starting as the jump.
        unsafe {
            ::core::arch::asm!(
                "998: .byte 0xe9",
                ".long {target} - (998b + 5)",
                ".pushsection __jump_table, \"a\"",
                ".balign 8",
                ".quad 998b, {target}, {key}, 1",
                ".popsection",
                key = sym $key,
                target = label { enabled = false; },
                options(att_syntax, nomem, nostack, preserves_flags),
            )
        };
        enabled
    }};
}

/// Sites per key at most: one round of the INT3 protocol, so one set of syncs.
pub const MAX_SITES: usize = TP_VEC_MAX;

/// The site's NOP: the 5-byte NOP the Intel SDM recommends.
const NOP5: Insn = match x86::nop(5) {
    Ok(nop) => nop,
    Err(_) => panic!("5 bytes have a recommended NOP"),
};

/// The kernel's jump table and key table.
pub struct KernelKeys;

impl KeyText for KernelKeys {
    type Insn = Insn;

    fn entries(&self) -> &[JumpEntry] {
        crate::arch::linker_tables::jump_entries()
    }

    fn keys(&self) -> &[&StaticKey] {
        crate::arch::linker_tables::static_keys()
    }

    fn text_range(&self) -> Range<usize> {
        layout::text_range()
    }

    fn protected_ranges(&self) -> &[Range<usize>] {
        KERNEL_TEXT.protected_ranges()
    }

    fn nop(&self) -> Insn {
        NOP5
    }

    fn branch(&self, site: usize, target: usize) -> Result<Insn, &'static str> {
        x86::jmp_rel32(site, target).map_err(|_| "the branch target is out of rel32 range")
    }

    fn patch(&self, batch: &[Patch<Insn>]) -> Result<(), PatchError<Insn>> {
        text_poke_bp(&KERNEL_TEXT, batch)
    }

    fn read(&self, site: usize) -> Insn {
        KERNEL_TEXT.read_insn(site, 5)
    }

    fn now_ns(&self) -> u64 {
        timer::now_ns()
    }

    fn relax(&self) {
        cpu::pause();
    }
}

/// The kernel's static keys.
pub static STATIC_KEYS: StaticKeys<KernelKeys, MAX_SITES> = StaticKeys::new(KernelKeys, NOP5);
