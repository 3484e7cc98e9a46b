/*
 * Interrupt and exception entry stubs. Each pushes an error code (0 where the CPU
 * pushes none) and its vector, then the common path saves the general registers and
 * calls {dispatch}(&frame) with a 16-byte aligned stack (5 + 2 + 15 quadwords above
 * the CPU's aligned frame). The kernel is soft-float: no FP/SIMD state to save.
 * {stop} is the stop-IPI vector, {spurious} the APIC spurious vector, {test0} and
 * {test1} the self-tests' normal-priority IPIs, {sync} the INT3 protocol's sync IPI.
 * x86_vector_table: one stub address per vector 0..31, then {stop}, {spurious},
 * {test0}, {test1}, {sync}.
 */
    .section .text.nopatch.vectors, "ax", @progbits
    .code64

.macro STUB_NOERR v
    .p2align 4
x86_stub_\v:
    pushq $0
    pushq $\v
    jmp x86_trap_common
.endm

.macro STUB_ERR v
    .p2align 4
x86_stub_\v:
    pushq $\v
    jmp x86_trap_common
.endm

.irp v, 0,1,2,3,4,5,6,7,9,15,16,18,19,20,22,23,24,25,26,27,28,31
STUB_NOERR \v
.endr
.irp v, 8,10,11,12,13,14,17,21,29,30
STUB_ERR \v
.endr
STUB_NOERR {stop}
STUB_NOERR {spurious}
STUB_NOERR {test0}
STUB_NOERR {test1}
STUB_NOERR {sync}

    .p2align 4
x86_trap_common:
    push %rax
    push %rbx
    push %rcx
    push %rdx
    push %rsi
    push %rdi
    push %rbp
    push %r8
    push %r9
    push %r10
    push %r11
    push %r12
    push %r13
    push %r14
    push %r15
    cld
    mov %rsp, %rdi
    call {dispatch}
    pop %r15
    pop %r14
    pop %r13
    pop %r12
    pop %r11
    pop %r10
    pop %r9
    pop %r8
    pop %rbp
    pop %rdi
    pop %rsi
    pop %rdx
    pop %rcx
    pop %rbx
    pop %rax
    add $16, %rsp
    iretq

    .section .rodata.x86_vector_table, "a", @progbits
    .p2align 3
    .global x86_vector_table
x86_vector_table:
.irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .quad x86_stub_\v
.endr
    .quad x86_stub_{stop}
    .quad x86_stub_{spurious}
    .quad x86_stub_{test0}
    .quad x86_stub_{test1}
    .quad x86_stub_{sync}
