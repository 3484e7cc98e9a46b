/*
 * Interrupt and exception entry stubs. Each pushes an error code (0 where the CPU
 * pushes none) and its vector, then the common path saves the general registers and
 * calls {dispatch}(&frame) with a 16-byte aligned stack (5 + 2 + 15 quadwords above
 * the CPU's aligned frame). The kernel is soft-float: no FP/SIMD state to save.
 * {stop} is the stop-IPI vector, {spurious} the APIC spurious vector, {test0} and
 * {test1} the self-tests' normal-priority IPIs, {sync} the INT3 protocol's sync IPI.
 * x86_vector_table: one stub address per vector 0..31, then {stop}, {spurious},
 * {test0}, {test1}, {sync}, {syscall}.
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

.macro DISPATCH_SAVING_REGISTERS
    /* The trap frame (see TrapFrame): general registers below vector and error code. */
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
.endm

.irp v, 0,1,4,5,6,7,9,15,16,18,19,20,22,23,24,25,26,27,28,31
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
/* INT {syscall}: the user programs' system call (a DPL 3 gate, user.rs). */
STUB_NOERR {syscall}

/*
 * #BP (vector 3): no IST and kernel mode only (same privilege), so the CPU pushes its
 * frame on the interrupted stack, right below the interrupted RSP aligned down to 16.
 * The INT3 protocol emulates a CALL by pushing the return address at the interrupted
 * RSP - 8: inside that frame (its SS slot) whenever the interrupted RSP is 16-byte
 * aligned. So, like Linux's int3 entry (Josh Poimboeuf, "x86_64: Add gap to int3 to
 * allow for call emulation", LKML, 2019), copy the frame 6 quadwords lower (5, plus
 * one to keep the dispatch call 16-byte aligned) and work on the copy: the original
 * frame becomes the gap the handler pushes into, and IRETQ reads the copy. Nothing
 * live sits below the interrupted RSP: x86_64-unknown-none has no red zone.
 */
    .p2align 4
x86_stub_3:
    subq $8, %rsp
    .rept 5
    /* The address is formed before the push decrements %rsp: copies SS first, RIP last. */
    pushq 5*8(%rsp)
    .endr
    pushq $0
    pushq $3
    jmp x86_trap_common

/*
 * NMI (vector 2): nested-NMI safe entry (Steven Rostedt, "x86: Add workaround to
 * NMI iret woes", LKML, 2011; Linux's entry_64.S "nested NMI").
 *
 * The CPU blocks NMIs from NMI delivery until the next IRETQ, but ANY IRETQ ends the
 * blocking, including that of an exception taken inside the NMI handler (the #BP of
 * the INT3 protocol, the self-test's #UD). A second NMI then enters at the same IST
 * top and would overwrite the first one's hardware frame and saved registers. So the
 * first NMI works on copies of its frame, and a nested NMI only rewrites the copy the
 * outer one will IRETQ from so that it "returns" to x86_nmi_repeat, which runs the
 * handlers again: the nested NMI is latched, as the hardware would have done.
 *
 * The NMI stack, T = this CPU's IST top (gdt::IST_NMI; 4 KiB aligned):
 *   T-8   .. T-40   hardware frame (SS, RSP, RFLAGS, CS, RIP): every NMI's own,
 *                   so a nested NMI overwrites it: never used after the copy
 *   T-48            scratch %rdx: likewise overwritten by a nested NMI
 *   T-56            "NMI executing": 1 from x86_nmi_repeat until just before IRETQ
 *   T-64  .. T-96   "iret" frame: what the final IRETQ uses; a nested NMI rewrites
 *                   it to return to x86_nmi_repeat (with RSP = T-136)
 *   T-104 .. T-136  "outermost" frame: the first NMI's hardware frame, never
 *                   written again until the handlers are done; copied to "iret"
 *                   on every pass
 *   T-144           error code slot: how many nested NMIs the coming pass answers
 *                   (0 on the first pass; each latch adds 1; Rust swaps it to 0 at
 *                   the start of each pass, see nmi::handle_nmi)
 *   below           vector 2, general registers: with the slot above, a TrapFrame
 *                   whose rip..ss are the outermost frame (17 pushes: 16-aligned call)
 *
 * Nesting is detected by (a) the interrupted RIP in [x86_nmi_repeat, end_repeat):
 * the outer is copying outermost -> iret and is about to run the handlers anyway,
 * so rewriting the half-copied frame would corrupt it: just return; (b) "NMI
 * executing" set: covers an outer NMI that took an exception and so may be on
 * another stack (an IST one) when we arrive; (c) the interrupted RSP inside this
 * CPU's NMI stack: covers the window after the outer cleared "NMI executing" and
 * before its IRETQ. Kernel only (no user mode, no SWAPGS): RSP cannot be forged.
 * Nested NMIs run with NMIs blocked and return to kernel mode: their IRETQ cannot
 * fault. {nmi_latched} counts the nested NMIs that requested a repeat, and
 * {nmi_latched_by} the same per CPU (indexed by %gs:0, the CPU index); the self-test
 * checks every one of them was answered by a repeat pass of its outer NMI.
 */
    .p2align 4
x86_stub_2:
    pushq %rdx
    leaq x86_nmi_repeat(%rip), %rdx
    cmpq 8(%rsp), %rdx
    ja 1f
    leaq x86_nmi_end_repeat(%rip), %rdx
    cmpq 8(%rsp), %rdx
    ja x86_nmi_nested_out
1:
    cmpq $1, -8(%rsp)
    je x86_nmi_nested
    /* %rdx = T; the interrupted RSP is at T-16 */
    leaq 6*8(%rsp), %rdx
    cmpq %rdx, 4*8(%rsp)
    ja x86_nmi_first
    subq ${nmi_stack_size}, %rdx
    cmpq %rdx, 4*8(%rsp)
    jb x86_nmi_first
x86_nmi_nested:
    /*
     * Rewrite the "iret" frame (T-96..T-64) to enter x86_nmi_repeat on the outer's
     * stack at T-136 with IF clear; the outermost frame stays as it is.
     */
    subq $8, %rsp
    leaq -10*8(%rsp), %rdx
    pushq ${kernel_ds}
    pushq %rdx
    pushfq
    pushq ${kernel_cs}
    leaq x86_nmi_repeat(%rip), %rdx
    pushq %rdx
    addq $(6*8), %rsp
    /* One more for the repeat to answer (T-144; plain incq: only this CPU, and one
     * instruction, so atomic against the outer's swap). */
    incq -12*8(%rsp)
    lock incq {nmi_latched}(%rip)
    movq %gs:0, %rdx
    lock incq {nmi_latched_by}(,%rdx,8)
x86_nmi_nested_out:
    popq %rdx
    iretq

x86_nmi_first:
    /* Only the first NMI gets here, with NMIs blocked: no nested NMI until IRETQ. */
    movq (%rsp), %rdx
    pushq $0
    subq $(5*8), %rsp
    .rept 5
    pushq 11*8(%rsp)
    .endr
    /* The first pass answers no latch (T-144). */
    movq $0, -8(%rsp)
x86_nmi_repeat:
    /*
     * %rsp = T-136. After a latched NMI we arrive here by IRETQ, NMIs unblocked: a
     * nested NMI here just returns (check (a)), since we are about to run the
     * handlers, which drain every request counted so far.
     */
    movq $1, 10*8(%rsp)
    addq $(10*8), %rsp
    .rept 5
    pushq -6*8(%rsp)
    .endr
    subq $(5*8), %rsp
x86_nmi_end_repeat:
    /* The error code slot (T-144) keeps its count of latches for this pass. */
    subq $8, %rsp
    pushq $2
    DISPATCH_SAVING_REGISTERS
    /* Drop vector, error code and the outermost frame: %rsp = the "iret" frame. */
    addq $(7*8), %rsp
    /*
     * From here to IRETQ a nested NMI is recognised by check (c) only, and rewrites
     * the iret frame this IRETQ reads: it then enters x86_nmi_repeat instead.
     */
    movq $0, 5*8(%rsp)
    iretq

    .p2align 4
x86_trap_common:
    DISPATCH_SAVING_REGISTERS
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
    .quad x86_stub_{syscall}
