// Functions the self-tests patch while other CPUs call them (x86_64, AT&T syntax). They
// live in ordinary kernel text, mapped read-only and executable like the rest. Every
// site is one 5-byte instruction: `mov $imm32, %eax` or the recommended 5-byte NOP.

    .section .text.patch_targets, "ax", @progbits
    .balign 64

// Returns one of three values; the torture test cycles the MOV through them with
// patch_machine.
    .global pm_torture_a
pm_torture_a:
    mov     $0x1111, %eax
    ret

// A second site, patched in the same batch as the first.
    .global pm_torture_b
pm_torture_b:
    mov     $0x2221, %eax
    ret

// Returns 1 while its first instruction is the NOP, 2 once it is a JMP rel32 to the
// second part: the nosync test flips it with the INT3 protocol (text_poke_bp) while
// other CPUs call it.
    .global pm_nosync_target
pm_nosync_target:
    .byte   0x0f, 0x1f, 0x44, 0x00, 0x00
    mov     $1, %eax
    ret
    .global pm_nosync_branch_dest
pm_nosync_branch_dest:
    mov     $2, %eax
    ret

// Sites for the bad-batch test (never called).
    .global pm_spare_site
pm_spare_site:
    mov     $0x5a5a, %eax
    ret

// Sites for the benchmarks' batches (never called), on pages of their own: under QEMU
// every store to a page that also holds translated code takes the emulator's slow
// self-modifying-code path, which would be measured instead of the patcher.
    .balign 4096
    .global pm_bench_sites
pm_bench_sites:
    .rept 1000
    .byte   0x0f, 0x1f, 0x44, 0x00, 0x00
    .endr
    ret
    .balign 4096

// Static-key sites of the benchmark (never called), on a page of their own as above:
// one site of BENCH_KEY_1 and 100 of BENCH_KEY_100, each a NOP5 with its __jump_table
// entry (site, target, key, kind 0 = unlikely), as static_branch_unlikely! emits.
    .macro pm_key_site key
997:
    .byte   0x0f, 0x1f, 0x44, 0x00, 0x00
    .pushsection __jump_table, "a"
    .balign 8
    .quad   997b, pm_key_bench_out, \key, 0
    .popsection
    .endm
    .global pm_key_bench_sites
pm_key_bench_sites:
    pm_key_site BENCH_KEY_1
    .rept 100
    pm_key_site BENCH_KEY_100
    .endr
pm_key_bench_out:
    ret
    .balign 4096
