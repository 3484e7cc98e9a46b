// patch-machine exception vectors (VBAR_EL1). Included by src/arch/aarch64/boot.rs with
// global_asm!; names in braces are `const`/`sym` operands (no C preprocessor). All of it lives
// in .text.nopatch: the rendezvous runs it, so the patcher must never touch it.
//
// Every one of the 16 entries builds a TrapFrame (exceptions.rs: x0-x30, the
// interrupted SP, ELR/SPSR/ESR/FAR, FPCR/FPSR, SP_EL0, kind, depth, ICC_PMR_EL1,
// q0-q31) on the stack and calls the Rust handler with x0 = &mut TrapFrame. If the
// handler returns, the (possibly modified) registers, ELR and SPSR are restored, the
// saved PMR is written back (a handler cannot leave the priority mask changed; SPSR
// carries DAIF and, with FEAT_NMI, ALLINT) and the CPU ERETs; SP always returns to its
// value at the exception (frame.sp is informational).
//
// Stack safety. Before it stores anything, an entry checks that SP lies on the calling
// CPU's own stack with room for a frame plus a margin. If not (a stack overflow into
// the guard page, or an exception while already on the exception stack), it switches
// to the CPU's exception stack and marks the frame `emergency`; the Rust side reports
// and ends the run. x0/x1 are parked in TPIDR_EL0/TPIDRRO_EL0 for the check (this
// kernel has no EL0, so those registers are free scratch).
//
// Nesting. A per-CPU depth counter counts frames in flight (plain loads and stores:
// only its own CPU touches a slot, and that also works with the MMU off). Rust reports
// any exception at depth > 1 that no hook resumes as a nested exception. Beyond
// max_depth (an operand) the Rust side is not trusted any more: the entry exits through
// semihosting directly, then tries PSCI SYSTEM_OFF, then waits with everything masked.
// Nothing recurses forever.

.macro PM_VENTRY kind
    .balign 0x80
    msr     tpidr_el0, x0
    msr     tpidrro_el0, x1
    mrs     x0, tpidr_el1                   // logical CPU index
    adrp    x1, {stacks}
    add     x1, x1, :lo12:{stacks}
    add     x1, x1, x0, lsl #16
    add     x1, x1, x0, lsl #12             // this CPU's slot: guard page, then stack
    add     x1, x1, #{guard}
    add     x1, x1, #{low}                  // lowest SP with room for a frame + margin
    mov     x0, sp
    sub     x0, x0, x1                      // unsigned: huge if SP is below
    mov     x1, #{limit}
    cmp     x0, x1
    b.hi    pm_exc_emergency_\kind
    mrs     x0, tpidr_el0
    mrs     x1, tpidrro_el0
    sub     sp, sp, #{frame_size}
    stp     x0, x1, [sp]
    mov     x0, #\kind
    mov     x1, #0                          // not on the exception stack
    b       pm_exc_common
.endm

.macro PM_EMERGENCY kind
pm_exc_emergency_\kind:
    mrs     x0, tpidr_el1
    adrp    x1, {estacks}
    add     x1, x1, :lo12:{estacks}
    add     x0, x0, #1
    add     x1, x1, x0, lsl #{eshift}       // top of this CPU's exception stack
    mov     x0, sp
    mov     sp, x1
    sub     sp, sp, #{frame_size}
    str     x0, [sp, #{off_sp}]             // the SP we abandoned
    mrs     x0, tpidr_el0
    mrs     x1, tpidrro_el0
    stp     x0, x1, [sp]
    mov     x0, #\kind
    mov     x1, #1                          // on the exception stack
    b       pm_exc_common
.endm

    .pushsection .text.nopatch, "ax"
    .balign 0x800
    .global pm_vectors
pm_vectors:
    PM_VENTRY 0                             // current EL, SP_EL0: sync
    PM_VENTRY 1                             //                     IRQ
    PM_VENTRY 2                             //                     FIQ
    PM_VENTRY 3                             //                     SError
    PM_VENTRY 4                             // current EL, SP_ELx: sync
    PM_VENTRY 5                             //                     IRQ
    PM_VENTRY 6                             //                     FIQ
    PM_VENTRY 7                             //                     SError
    PM_VENTRY 8                             // lower EL, AArch64:  sync
    PM_VENTRY 9                             //                     IRQ
    PM_VENTRY 10                            //                     FIQ
    PM_VENTRY 11                            //                     SError
    PM_VENTRY 12                            // lower EL, AArch32:  sync
    PM_VENTRY 13                            //                     IRQ
    PM_VENTRY 14                            //                     FIQ
    PM_VENTRY 15                            //                     SError
    .balign 0x80

    PM_EMERGENCY 0
    PM_EMERGENCY 1
    PM_EMERGENCY 2
    PM_EMERGENCY 3
    PM_EMERGENCY 4
    PM_EMERGENCY 5
    PM_EMERGENCY 6
    PM_EMERGENCY 7
    PM_EMERGENCY 8
    PM_EMERGENCY 9
    PM_EMERGENCY 10
    PM_EMERGENCY 11
    PM_EMERGENCY 12
    PM_EMERGENCY 13
    PM_EMERGENCY 14
    PM_EMERGENCY 15

// x0 = kind, x1 = 1 if on the exception stack (frame.sp already stored), SP = frame
// with x0/x1 stored. Everything else is still live.
pm_exc_common:
    stp     x2, x3, [sp, #16]
    stp     x4, x5, [sp, #32]
    stp     x6, x7, [sp, #48]
    stp     x8, x9, [sp, #64]
    stp     x10, x11, [sp, #80]
    stp     x12, x13, [sp, #96]
    stp     x14, x15, [sp, #112]
    stp     x16, x17, [sp, #128]
    stp     x18, x19, [sp, #144]
    stp     x20, x21, [sp, #160]
    stp     x22, x23, [sp, #176]
    stp     x24, x25, [sp, #192]
    stp     x26, x27, [sp, #208]
    stp     x28, x29, [sp, #224]
    str     x30, [sp, #240]
    cbnz    x1, 1f
    add     x2, sp, #{frame_size}
    str     x2, [sp, #{off_sp}]
1:  mrs     x2, elr_el1
    mrs     x3, spsr_el1
    stp     x2, x3, [sp, #{off_elr}]
    mrs     x2, esr_el1
    mrs     x3, far_el1
    stp     x2, x3, [sp, #{off_esr}]
    mrs     x2, fpcr
    mrs     x3, fpsr
    stp     x2, x3, [sp, #{off_fpcr}]
    mrs     x2, sp_el0
    stp     x2, x0, [sp, #{off_sp_el0}]     // sp_el0, kind
    // ICC_PMR_EL1, once this CPU's GIC system-register interface is on (before that an
    // access would be UNDEFINED): the exit path writes it back (irq.rs).
    mrs     x2, tpidr_el1
    adrp    x3, {pmr_live}
    add     x3, x3, :lo12:{pmr_live}
    ldrb    w3, [x3, x2]
    mov     x4, #-1                         // not saved
    cbz     w3, 2f
    mrs     x4, S3_0_C4_C6_0                // ICC_PMR_EL1
2:  str     x4, [sp, #{off_pmr}]
    stp     q0, q1, [sp, #({off_q} + 0 * 32)]
    stp     q2, q3, [sp, #({off_q} + 1 * 32)]
    stp     q4, q5, [sp, #({off_q} + 2 * 32)]
    stp     q6, q7, [sp, #({off_q} + 3 * 32)]
    stp     q8, q9, [sp, #({off_q} + 4 * 32)]
    stp     q10, q11, [sp, #({off_q} + 5 * 32)]
    stp     q12, q13, [sp, #({off_q} + 6 * 32)]
    stp     q14, q15, [sp, #({off_q} + 7 * 32)]
    stp     q16, q17, [sp, #({off_q} + 8 * 32)]
    stp     q18, q19, [sp, #({off_q} + 9 * 32)]
    stp     q20, q21, [sp, #({off_q} + 10 * 32)]
    stp     q22, q23, [sp, #({off_q} + 11 * 32)]
    stp     q24, q25, [sp, #({off_q} + 12 * 32)]
    stp     q26, q27, [sp, #({off_q} + 13 * 32)]
    stp     q28, q29, [sp, #({off_q} + 14 * 32)]
    stp     q30, q31, [sp, #({off_q} + 15 * 32)]

    mrs     x2, tpidr_el1
    adrp    x3, {depth}
    add     x3, x3, :lo12:{depth}
    add     x3, x3, x2, lsl #3
    ldr     x4, [x3]
    add     x4, x4, #1
    str     x4, [x3]
    stp     x4, x1, [sp, #{off_depth}]      // depth, emergency
    cmp     x4, #{max_depth}
    b.hi    pm_exc_runaway

    mov     x0, sp
    bl      {handler}

    // The handler returned: resume. (It never returns for an emergency frame; if it
    // did, SP could not be restored, so treat that as a runaway.)
    ldr     x1, [sp, #({off_depth} + 8)]
    cbnz    x1, pm_exc_runaway
    mrs     x2, tpidr_el1
    adrp    x3, {depth}
    add     x3, x3, :lo12:{depth}
    add     x3, x3, x2, lsl #3
    ldr     x4, [x3]
    sub     x4, x4, #1
    str     x4, [x3]

    // Put the interrupted PMR back, with I (and, from the Rust side, ALLINT) masked so
    // the write cannot let anything in before ERET. ERET is the context synchronisation;
    // DSB SY only if ICC_CTLR_EL1.PMHE asks for it (see irq.rs).
    msr     daifset, #0xf
    ldr     x2, [sp, #{off_pmr}]
    cmn     x2, #1
    b.eq    3f
    msr     S3_0_C4_C6_0, x2                // ICC_PMR_EL1
    adrp    x3, {pmr_sync}
    ldrb    w3, [x3, :lo12:{pmr_sync}]
    cbz     w3, 3f
    dsb     sy
3:
    ldp     q0, q1, [sp, #({off_q} + 0 * 32)]
    ldp     q2, q3, [sp, #({off_q} + 1 * 32)]
    ldp     q4, q5, [sp, #({off_q} + 2 * 32)]
    ldp     q6, q7, [sp, #({off_q} + 3 * 32)]
    ldp     q8, q9, [sp, #({off_q} + 4 * 32)]
    ldp     q10, q11, [sp, #({off_q} + 5 * 32)]
    ldp     q12, q13, [sp, #({off_q} + 6 * 32)]
    ldp     q14, q15, [sp, #({off_q} + 7 * 32)]
    ldp     q16, q17, [sp, #({off_q} + 8 * 32)]
    ldp     q18, q19, [sp, #({off_q} + 9 * 32)]
    ldp     q20, q21, [sp, #({off_q} + 10 * 32)]
    ldp     q22, q23, [sp, #({off_q} + 11 * 32)]
    ldp     q24, q25, [sp, #({off_q} + 12 * 32)]
    ldp     q26, q27, [sp, #({off_q} + 13 * 32)]
    ldp     q28, q29, [sp, #({off_q} + 14 * 32)]
    ldp     q30, q31, [sp, #({off_q} + 15 * 32)]
    ldp     x2, x3, [sp, #{off_fpcr}]
    msr     fpcr, x2
    msr     fpsr, x3
    ldp     x2, x3, [sp, #{off_elr}]
    msr     elr_el1, x2
    msr     spsr_el1, x3
    ldp     x2, x3, [sp, #16]
    ldp     x4, x5, [sp, #32]
    ldp     x6, x7, [sp, #48]
    ldp     x8, x9, [sp, #64]
    ldp     x10, x11, [sp, #80]
    ldp     x12, x13, [sp, #96]
    ldp     x14, x15, [sp, #112]
    ldp     x16, x17, [sp, #128]
    ldp     x18, x19, [sp, #144]
    ldp     x20, x21, [sp, #160]
    ldp     x22, x23, [sp, #176]
    ldp     x24, x25, [sp, #192]
    ldp     x26, x27, [sp, #208]
    ldp     x28, x29, [sp, #224]
    ldr     x30, [sp, #240]
    ldp     x0, x1, [sp]
    add     sp, sp, #{frame_size}
    eret

// Too deeply nested (x4 = depth): the Rust side is not trusted any more. One try at
// semihosting SYS_EXIT with a failure status, then (if that faulted back in here) one
// try at PSCI SYSTEM_OFF through the conduit the DTB named, then wait forever.
pm_exc_runaway:
    msr     daifset, #0xf
    cmp     x4, #({max_depth} + 1)
    b.hi    1f
    mov     x0, #0x18                       // SYS_EXIT
    adrp    x1, {exit_block}
    add     x1, x1, :lo12:{exit_block}      // [ADP_Stopped_ApplicationExit, 1]
    hlt     #0xf000
1:  cmp     x4, #({max_depth} + 2)
    b.hi    3f
    adrp    x1, {conduit}
    add     x1, x1, :lo12:{conduit}
    ldrb    w1, [x1]
    movz    x0, #0x0008
    movk    x0, #0x8400, lsl #16            // PSCI SYSTEM_OFF
    cmp     w1, #1
    b.ne    2f
    hvc     #0
2:  cmp     w1, #2
    b.ne    3f
    smc     #0
3:  wfi
    b       3b

    .popsection
