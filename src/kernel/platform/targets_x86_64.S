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

// The call_site_live test's site: pm_call_site is a 5-byte NOP, CALL pm_call_target_a
// or CALL pm_call_target_b, flipped by the INT3 protocol while other CPUs run
// pm_call_site_caller(pad). The caller lowers RSP by `pad` (0 or 8: RSP at the site
// both 16-byte aligned and not), keeps a canary in a callee-saved register across the
// site and returns 0x100 + what the site left in EAX (0x30 from the NOP, 0xa or 0xb
// from a target): computed after the site, so only a correct return produces it;
// 0xbad1 if RSP changed across the site, 0xbad2 if the canary did.
    .global pm_call_site_caller
pm_call_site_caller:
    push    %rbx
    push    %r12
    push    %r13
    mov     %rdi, %r13
    sub     %rdi, %rsp
    mov     %rsp, %rbx
    movabs  $0x0123456789abcdef, %r12
    mov     $0x30, %eax
    .global pm_call_site
pm_call_site:
    .byte   0x0f, 0x1f, 0x44, 0x00, 0x00
    cmp     %rsp, %rbx
    jne     1f
    movabs  $0x0123456789abcdef, %rcx
    cmp     %rcx, %r12
    jne     2f
    add     $0x100, %eax
    jmp     3f
1:  mov     $0xbad1, %eax
    jmp     3f
2:  mov     $0xbad2, %eax
3:  add     %r13, %rsp
    pop     %r13
    pop     %r12
    pop     %rbx
    ret

// The two call targets: count the call in pm_call_hits[0] / [1] and return 0xa / 0xb.
// Each checks it was called from the site: the return address on top of its stack is
// pm_call_site + 5 and RSP is the caller's (kept in RBX) minus 8; otherwise it counts
// pm_call_bad_returns and keeps the return address it found in pm_call_bad_return.
    .global pm_call_target_a
pm_call_target_a:
    lock incq pm_call_hits(%rip)
    mov     $0xa, %eax
    jmp     pm_call_check_return
    .global pm_call_target_b
pm_call_target_b:
    lock incq pm_call_hits+8(%rip)
    mov     $0xb, %eax
pm_call_check_return:
    lea     pm_call_site+5(%rip), %rcx
    cmp     (%rsp), %rcx
    jne     1f
    lea     -8(%rbx), %rcx
    cmp     %rsp, %rcx
    jne     1f
    ret
1:  mov     (%rsp), %rcx
    mov     %rcx, pm_call_bad_return(%rip)
    lock incq pm_call_bad_returns(%rip)
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

// kprobes fixtures (src/kernel/selftest/kprobes.rs), on pages of their own: arming a
// probe writes the page, and under QEMU a write to a page of translated code costs the
// whole page's translations. Each `pm_kp_<name>(rdi) -> rax` has its probed instruction
// at `pm_kp_<name>_site`; both arguments of each fixture give different results, so a
// branch emulated the wrong way, a step that did not run, or a fix-up that went wrong
// changes what it returns.
    .section .text.kprobe_targets, "ax", @progbits
    .balign 4096

// The hammered target: x * 3 + 7, probed at the LEA (stepped out of line).
    .global pm_kp_target
pm_kp_target:
    .global pm_kp_target_site
pm_kp_target_site:
    lea     (%rdi,%rdi,2), %rax
    add     $7, %rax
    ret

// A plain ALU op, stepped: x * 5 + 1.
    .global pm_kp_alu
pm_kp_alu:
    .global pm_kp_alu_site
pm_kp_alu_site:
    imul    $5, %rdi, %rax
    inc     %rax
    ret

// PUSH through RSP, stepped: the copy writes the real stack. x + 0x100.
    .global pm_kp_push
pm_kp_push:
    .global pm_kp_push_site
pm_kp_push_site:
    push    %rdi
    pop     %rax
    add     $0x100, %rax
    ret

// JMP rel8, emulated: x + 1 (falling through would give x + 2).
    .global pm_kp_jmp8
pm_kp_jmp8:
    mov     $1, %eax
    .global pm_kp_jmp8_site
pm_kp_jmp8_site:
    .byte   0xeb, 1f - 2f
2:  mov     $2, %eax
1:  add     %rdi, %rax
    ret

// JMP rel32, emulated: x + 3 (falling through would give x + 4).
    .global pm_kp_jmp32
pm_kp_jmp32:
    mov     $3, %eax
    .global pm_kp_jmp32_site
pm_kp_jmp32_site:
    .byte   0xe9
    .long   1f - 2f
2:  mov     $4, %eax
1:  add     %rdi, %rax
    ret

// CALL rel32, emulated (the return address pushed into the #BP entry's gap): 2x + 3;
// the callee also checks the return address and RSP (0xbad otherwise).
    .global pm_kp_call
pm_kp_call:
    mov     %rsp, %rcx
    .global pm_kp_call_site
pm_kp_call_site:
    call    pm_kp_call_callee
    add     $3, %rax
    ret
pm_kp_call_callee:
    lea     pm_kp_call_site+5(%rip), %rdx
    cmp     (%rsp), %rdx
    jne     1f
    lea     -8(%rcx), %rdx
    cmp     %rsp, %rdx
    jne     1f
    lea     (%rdi,%rdi), %rax
    ret
1:  mov     $0xbad, %eax
    ret

// Jcc, emulated; each returns 1 (not taken) or 2 (taken).
    .macro  pm_kp_jcc name, cmp, jcc_bytes:vararg
    .global pm_kp_\name
pm_kp_\name:
    cmp     $\cmp, %rdi
    .global pm_kp_\name\()_site
pm_kp_\name\()_site:
    .byte   \jcc_bytes
    .long   1f - 2f
2:  mov     $1, %eax
    ret
1:  mov     $2, %eax
    ret
    .endm

// rel8 forms (the displacement byte instead of the long).
    .macro  pm_kp_jcc8 name, cmp, opcode
    .global pm_kp_\name
pm_kp_\name:
    cmp     $\cmp, %rdi
    .global pm_kp_\name\()_site
pm_kp_\name\()_site:
    .byte   \opcode, 1f - 2f
2:  mov     $1, %eax
    ret
1:  mov     $2, %eax
    ret
    .endm

    pm_kp_jcc8 je8, 5, 0x74
    pm_kp_jcc8 jl8, 5, 0x7c
    pm_kp_jcc8 jb8, 5, 0x72
    pm_kp_jcc ja32, 5, 0x0f, 0x87
    pm_kp_jcc jle32, 5, 0x0f, 0x8e
    pm_kp_jcc jns32, 0, 0x0f, 0x89

// RIP-relative load, stepped with the displacement rebased: 0x5eed + x.
    .global pm_kp_riprel
pm_kp_riprel:
    .global pm_kp_riprel_site
pm_kp_riprel_site:
    mov     pm_kp_riprel_data(%rip), %rax
    add     %rdi, %rax
    ret

// RIP-relative LEA, stepped: the address of pm_kp_riprel_data + x, minus the address
// taken without a probe (so 0 + x when right).
    .global pm_kp_riplea
pm_kp_riplea:
    .global pm_kp_riplea_site
pm_kp_riplea_site:
    lea     pm_kp_riprel_data(%rip), %rax
    lea     pm_kp_riprel_data(%rip), %rcx
    sub     %rcx, %rax
    add     %rdi, %rax
    ret

// RET, stepped (RIP is where it went): x + 9.
    .global pm_kp_ret
pm_kp_ret:
    lea     9(%rdi), %rax
    .global pm_kp_ret_site
pm_kp_ret_site:
    ret

// CALL through a register, stepped: the pushed return address is fixed from the slot's
// to the original's (the callee checks it). 2x + 3.
    .global pm_kp_callr
pm_kp_callr:
    mov     %rsp, %rcx
    lea     pm_kp_callr_callee(%rip), %rsi
    .global pm_kp_callr_site
pm_kp_callr_site:
    call    *%rsi
    add     $3, %rax
    ret
pm_kp_callr_callee:
    lea     pm_kp_callr_site+2(%rip), %rdx
    cmp     (%rsp), %rdx
    jne     1f
    lea     (%rdi,%rdi), %rax
    ret
1:  mov     $0xbad, %eax
    ret

// JMP through a register, stepped: x + 5.
    .global pm_kp_jmpr
pm_kp_jmpr:
    lea     1f(%rip), %rsi
    .global pm_kp_jmpr_site
pm_kp_jmpr_site:
    jmp     *%rsi
    ud2
1:  lea     5(%rdi), %rax
    ret

// Instructions kprobes must refuse (never executed).
    .global pm_kp_pushf_site
pm_kp_pushf_site:
    pushfq
    .global pm_kp_cli_site
pm_kp_cli_site:
    cli
    .global pm_kp_ud2_site
pm_kp_ud2_site:
    ud2
    .global pm_kp_syscall_site
pm_kp_syscall_site:
    syscall
    .global pm_kp_loop_site
pm_kp_loop_site:
    loop    pm_kp_loop_site
    .balign 4096

    .section .rodata.kprobe_targets, "a", @progbits
    .balign 8
pm_kp_riprel_data:
    .quad   0x5eed

// Fault injection for `fault_stop_fn_faults`: a load from the address in %rdi, and an
// undefined instruction. Never patched.
    .pushsection .text.pm_faults, "ax", @progbits
    .balign 16
    .global pm_fault_load
pm_fault_load:
    movq    (%rdi), %rax
    ret
    .global pm_fault_udf
pm_fault_udf:
    ud2
    ret
    .popsection
