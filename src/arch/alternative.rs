//! The `alternative!` macro of each port (the tables it fills are
//! [`crate::patch::alternatives`]'s): one `asm!` statement whose original sequence is
//! emitted inline, whose replacement goes to `.altinstr_replacement` (read-only data)
//! and whose entry goes to `.altinstructions` (`runtime`: patchable text, applied
//! through `patch_machine` once every CPU is online) or `.altinstructions.boot`
//! (`boot`: the site is in `.text.nopatch`, written on the boot CPU before any other
//! starts). Defined here, above the ports, so that using it adds no edge between a
//! port's modules (`tests/layering.rs`): it names nothing but `core::arch::asm`.

#[cfg(target_arch = "aarch64")]
/// An instruction sequence with a replacement the boot applies when a CPU feature is
/// present (Linux's `ALTERNATIVE`), as one `asm!` statement:
///
/// ```ignore
/// alternative!(runtime,
///     orig: "0: ldxr {old:w}, [{ptr}]\n add ... \n cbnz {status:w}, 0b",
///     repl: ".arch_extension lse\n staddl {val:w}, [{ptr}]\n nop\n nop\n nop",
///     feature: cpu::FEATURE_LSE,
///     ptr = in(reg) counter, ..., options(nostack));
/// ```
///
/// The original is emitted inline, the replacement into `.altinstr_replacement`
/// (read-only data) and an entry into `.altinstructions` (`runtime`: patchable text,
/// applied through `patch_machine`) or `.altinstructions.boot` (`boot`: the site is in
/// `.text.nopatch`, written before any secondary starts). The two `.org` lines fail the
/// build ("attempt to move .org backwards") unless both sequences have the same
/// length, as in Linux's arm64 `alternative-macros.h`. Operands must be named or
/// explicit registers (the macro appends the named `alt_feature`). The replacement is
/// copied elsewhere, so it must not be PC-relative (no B, BL, ADR, ADRP, literal
/// loads).
macro_rules! alternative {
    (boot, $($rest:tt)*) => {
        alternative!(@emit ".altinstructions.boot", $($rest)*)
    };
    (runtime, $($rest:tt)*) => {
        alternative!(@emit ".altinstructions", $($rest)*)
    };
    (@emit $section:literal, orig: $orig:literal, repl: $repl:literal, feature: $feature:expr,
     $($operands:tt)*) => {
        core::arch::asm!(
            concat!(
                "661:\n", $orig, "\n662:\n",
                ".pushsection .altinstr_replacement, \"a\"\n",
                "663:\n", $repl, "\n664:\n",
                ".org . - (664b - 663b) + (662b - 661b)\n",
                ".org . - (662b - 661b) + (664b - 663b)\n",
                ".popsection\n",
                ".pushsection ", $section, ", \"a\"\n",
                ".balign 4\n",
                ".long 661b - .\n",
                ".long 663b - .\n",
                ".short {alt_feature}\n",
                ".byte 662b - 661b\n",
                ".byte 664b - 663b\n",
                ".popsection\n",
            ),
            alt_feature = const $feature,
            $($operands)*
        )
    };
}

#[cfg(target_arch = "x86_64")]
/// An instruction sequence with a replacement the boot applies when a CPU feature is
/// present (Linux's `ALTERNATIVE`), as one `asm!` statement (Intel syntax):
///
/// ```ignore
/// alternative!(runtime,
///     orig: "mov rax, gs:[0]",
///     repl: ".byte 0xf3, 0x0f, 0xc7, 0xf8", // rdpid rax
///     feature: cpu::FEATURE_RDPID,
///     out("rax") index, options(nostack, readonly));
/// ```
///
/// The original is emitted inline, the replacement into `.altinstr_replacement`
/// (read-only data) and an entry into `.altinstructions` (`runtime`: applied through
/// `patch_machine`) or `.altinstructions.boot` (`boot`: the site is in `.text.nopatch`,
/// written before any AP starts). A replacement may be shorter than the original (the
/// rest of the site becomes NOPs when it is applied), never longer: the `.org` line
/// fails the build then ("attempt to move .org backwards"). Operands must be named or
/// explicit registers. The replacement is copied elsewhere, so it must not be
/// RIP-relative (no rel32 jumps or calls, no `[rip + x]`).
macro_rules! alternative {
    (boot, $($rest:tt)*) => {
        alternative!(@emit ".altinstructions.boot", $($rest)*)
    };
    (runtime, $($rest:tt)*) => {
        alternative!(@emit ".altinstructions", $($rest)*)
    };
    (@emit $section:literal, orig: $orig:literal, repl: $repl:literal, feature: $feature:expr,
     $($operands:tt)*) => {
        core::arch::asm!(
            concat!(
                "661:\n", $orig, "\n662:\n",
                ".pushsection .altinstr_replacement, \"a\"\n",
                "663:\n", $repl, "\n664:\n",
                ".org . - (664b - 663b) + (662b - 661b)\n",
                ".popsection\n",
                ".pushsection ", $section, ", \"a\"\n",
                ".balign 4\n",
                ".long 661b - .\n",
                ".long 663b - .\n",
                ".short {alt_feature}\n",
                ".byte 662b - 661b\n",
                ".byte 664b - 663b\n",
                ".popsection\n",
            ),
            alt_feature = const $feature,
            $($operands)*
        )
    };
}
