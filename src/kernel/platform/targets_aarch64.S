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

// The call_site_live test's site: pm_call_site is a NOP, BL pm_call_target_a or
// BL pm_call_target_b (all CMODX-safe), flipped by patch_nosync while other CPUs run
// pm_call_site_caller(pad) (`pad` is unused here: SP stays 16-byte aligned). The
// caller keeps SP in x19 and a canary in x20 across the site and returns 0x100 + what
// the site left in x0 (0x30 from the NOP, 0xa or 0xb from a target), 0xbad1 if SP
// changed, 0xbad2 if the canary did.
    .global pm_call_site_caller
pm_call_site_caller:
    stp     x29, x30, [sp, #-32]!
    stp     x19, x20, [sp, #16]
    mov     x19, sp
    movz    x20, #0xcdef
    movk    x20, #0x89ab, lsl #16
    mov     x0, #0x30
    .global pm_call_site
pm_call_site:
    nop
    mov     x1, sp
    cmp     x1, x19
    b.ne    1f
    movz    x1, #0xcdef
    movk    x1, #0x89ab, lsl #16
    cmp     x1, x20
    b.ne    2f
    add     x0, x0, #0x100
    b       3f
1:  mov     x0, #0xbad1
    b       3f
2:  mov     x0, #0xbad2
3:  ldp     x19, x20, [sp, #16]
    ldp     x29, x30, [sp], #32
    ret

// The two call targets: count the call in pm_call_hits[0] / [1] and return 0xa / 0xb.
// Each checks it was called from the site: x30 is pm_call_site + 4 and SP the
// caller's (x19); otherwise it counts pm_call_bad_returns and keeps x30 in
// pm_call_bad_return.
    .global pm_call_target_a
pm_call_target_a:
    adrp    x1, pm_call_hits
    add     x1, x1, :lo12:pm_call_hits
    mov     x0, #0xa
    b       pm_call_count
    .global pm_call_target_b
pm_call_target_b:
    adrp    x1, pm_call_hits
    add     x1, x1, :lo12:pm_call_hits
    add     x1, x1, #8
    mov     x0, #0xb
pm_call_count:
1:  ldxr    x2, [x1]
    add     x2, x2, #1
    stxr    w3, x2, [x1]
    cbnz    w3, 1b
    adr     x1, pm_call_site + 4
    cmp     x1, x30
    b.ne    2f
    mov     x1, sp
    cmp     x1, x19
    b.ne    2f
    ret
2:  adrp    x1, pm_call_bad_return
    add     x1, x1, :lo12:pm_call_bad_return
    str     x30, [x1]
    adrp    x1, pm_call_bad_returns
    add     x1, x1, :lo12:pm_call_bad_returns
3:  ldxr    x2, [x1]
    add     x2, x2, #1
    stxr    w3, x2, [x1]
    cbnz    w3, 3b
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
