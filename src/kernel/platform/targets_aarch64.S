// Functions the self-tests patch while other CPUs call them. They live in ordinary
// kernel text (the linker's .text.*), mapped read-only and executable like the rest.

    .section .text.patch_targets, "ax"
    .balign 64

// Returns one of three values; the torture test cycles the MOVZ through them with
// patch_machine (MOVZ is not CMODX-safe: it needs the stop).
    .global pm_torture_a
pm_torture_a:
    movz    x0, #0x1111
    ret

// A second site, patched in the same batch as the first.
    .global pm_torture_b
pm_torture_b:
    movz    x0, #0x2221
    ret

// Returns 1 or 2 depending on whether its first instruction is a NOP or a branch:
// B <-> NOP is CMODX-safe, so the nosync test flips it without stopping anyone.
    .global pm_nosync_target
pm_nosync_target:
    nop
    movz    x0, #1
    ret
    .global pm_nosync_branch_dest
pm_nosync_branch_dest:
    movz    x0, #2
    ret

// Sites for the bad-batch test (never called).
    .global pm_spare_site
pm_spare_site:
    movz    x0, #0x5a5a
    ret

// Sites for the benchmarks' batches (never called): patch_machine flips them between
// NOP and MOVZ, in batches of up to BENCH_SITES. On pages of their own: under QEMU
// every store to a page that also holds translated code takes the emulator's slow
// self-modifying-code path (3-4 us a store here), which would be measured instead of
// the patcher.
    .balign 4096
    .global pm_bench_sites
pm_bench_sites:
    .rept 1000
    nop
    .endr
    ret
    .balign 4096

// Static-key sites of the benchmark (never called), on a page of their own as above:
// one site of BENCH_KEY_1 and 100 of BENCH_KEY_100, each a NOP with its __jump_table
// entry (site, target, key, kind 0 = unlikely), as static_branch_unlikely! emits.
    .macro pm_key_site key
997:
    nop
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
