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

// kprobes fixtures (src/kernel/selftest/kprobes.rs), on pages of their own: arming a
// probe writes the page, which under QEMU throws away its translated code.
// Each `pm_kp_<name>(x0) -> x0` has its probed instruction at `pm_kp_<name>_site`;
// the test compares what it returns probed and unprobed.
    .section .text.kprobe_targets, "ax"
    .balign 4096

// The hammer target: x0 * 3 + 7, probed at its first instruction (run out of line).
    .global pm_kp_target
pm_kp_target:
    .global pm_kp_target_site
pm_kp_target_site:
    add     x1, x0, x0, lsl #1
    add     x0, x1, #7
    ret

// Out of line, through SP: stores and reloads across the probed instruction.
    .global pm_kp_xol_sp
pm_kp_xol_sp:
    sub     sp, sp, #16
    .global pm_kp_xol_sp_site
pm_kp_xol_sp_site:
    str     x0, [sp, #8]
    ldr     x1, [sp, #8]
    add     sp, sp, #16
    add     x0, x1, #0x55
    ret

    .global pm_kp_b
pm_kp_b:
    .global pm_kp_b_site
pm_kp_b_site:
    b       1f
    mov     x0, #0xbad
    ret
1:  add     x0, x0, #1
    ret

    .global pm_kp_bl
pm_kp_bl:
    stp     x29, x30, [sp, #-16]!
    .global pm_kp_bl_site
pm_kp_bl_site:
    bl      pm_kp_helper
    ldp     x29, x30, [sp], #16
    add     x0, x0, #0x100
    ret
pm_kp_helper:
    add     x0, x0, #2
    ret

// B.cond: x0 == 5 / x0 < 5 signed / x0 > 5 unsigned, each taken for one argument of
// the test and not for the other.
    .global pm_kp_beq
pm_kp_beq:
    cmp     x0, #5
    .global pm_kp_beq_site
pm_kp_beq_site:
    b.eq    1f
    mov     x0, #0x10
    ret
1:  mov     x0, #0x20
    ret

    .global pm_kp_blt
pm_kp_blt:
    cmp     x0, #5
    .global pm_kp_blt_site
pm_kp_blt_site:
    b.lt    1f
    mov     x0, #0x10
    ret
1:  mov     x0, #0x20
    ret

    .global pm_kp_bhi
pm_kp_bhi:
    cmp     x0, #5
    .global pm_kp_bhi_site
pm_kp_bhi_site:
    b.hi    1f
    mov     x0, #0x10
    ret
1:  mov     x0, #0x20
    ret

    .global pm_kp_cbz
pm_kp_cbz:
    .global pm_kp_cbz_site
pm_kp_cbz_site:
    cbz     x0, 1f
    mov     x0, #0x10
    ret
1:  mov     x0, #0x20
    ret

// CBNZ on W0: 0x1_0000_0000 is zero in 32 bits.
    .global pm_kp_cbnz_w
pm_kp_cbnz_w:
    .global pm_kp_cbnz_w_site
pm_kp_cbnz_w_site:
    cbnz    w0, 1f
    mov     x0, #0x10
    ret
1:  mov     x0, #0x20
    ret

    .global pm_kp_tbz
pm_kp_tbz:
    .global pm_kp_tbz_site
pm_kp_tbz_site:
    tbz     x0, #3, 1f
    mov     x0, #0x10
    ret
1:  mov     x0, #0x20
    ret

    .global pm_kp_tbnz
pm_kp_tbnz:
    .global pm_kp_tbnz_site
pm_kp_tbnz_site:
    tbnz    x0, #40, 1f
    mov     x0, #0x10
    ret
1:  mov     x0, #0x20
    ret

    .global pm_kp_adr
pm_kp_adr:
    .global pm_kp_adr_site
pm_kp_adr_site:
    adr     x1, pm_kp_adr_site + 0x40
    add     x0, x0, x1
    ret

    .global pm_kp_adrp
pm_kp_adrp:
    .global pm_kp_adrp_site
pm_kp_adrp_site:
    adrp    x1, pm_kp_literals + 0x3000
    add     x0, x0, x1
    ret

    .global pm_kp_ldr_x
pm_kp_ldr_x:
    .global pm_kp_ldr_x_site
pm_kp_ldr_x_site:
    ldr     x1, pm_kp_literals
    add     x0, x0, x1
    ret

    .global pm_kp_ldr_w
pm_kp_ldr_w:
    .global pm_kp_ldr_w_site
pm_kp_ldr_w_site:
    ldr     w1, pm_kp_literals + 8
    add     x0, x0, x1
    ret

    .global pm_kp_ldrsw
pm_kp_ldrsw:
    .global pm_kp_ldrsw_site
pm_kp_ldrsw_site:
    ldrsw   x1, pm_kp_literals + 8
    add     x0, x0, x1
    ret

    .global pm_kp_ret
pm_kp_ret:
    add     x0, x0, #3
    .global pm_kp_ret_site
pm_kp_ret_site:
    ret

    .global pm_kp_br
pm_kp_br:
    adr     x1, 1f
    .global pm_kp_br_site
pm_kp_br_site:
    br      x1
    mov     x0, #0xbad
    ret
1:  add     x0, x0, #4
    ret

    .global pm_kp_blr
pm_kp_blr:
    stp     x29, x30, [sp, #-16]!
    adr     x1, pm_kp_helper
    .global pm_kp_blr_site
pm_kp_blr_site:
    blr     x1
    ldp     x29, x30, [sp], #16
    add     x0, x0, #0x200
    ret

// Instructions kprobes must refuse (never called).
    .global pm_kp_ldxr_site
pm_kp_ldxr_site:
    ldxr    x0, [x1]
    ret
    .global pm_kp_msr_site
pm_kp_msr_site:
    msr     daifset, #2
    ret

    .balign 8
pm_kp_literals:
    .quad   0x1122334455667788
    .word   0x80000010
    .word   0
    .balign 4096

// Fault injection for `fault_stop_fn_faults`: a load from the address in x0, and an
// undefined instruction. Never patched.
    .pushsection .text.pm_faults, "ax"
    .balign 4
    .global pm_fault_load
pm_fault_load:
    ldr     x0, [x0]
    ret
    .global pm_fault_udf
pm_fault_udf:
    udf     #0
    ret
    .popsection
