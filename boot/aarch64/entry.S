// patch-machine boot code: the boot CPU's entry, the EL2 -> EL1 drop and the secondary
// CPUs' entry (PSCI CPU_ON). Included by src/arch/aarch64/boot.rs with global_asm!,
// which does no C preprocessing: constants and symbols come in as `const`/`sym`
// operands, written as the operand name in braces below.
//
// Register conventions at the Rust entry points:
//   primary:   x0 = DTB address from the boot loader (0 if none), x1 = EL at entry
//   secondary: x0 = logical CPU index (the PSCI context_id), x1 = EL at entry
// Both run at EL1h with D, A, I and F masked, FP/SIMD enabled, TPIDR_EL1 = logical
// CPU index, SP at the top of that CPU's stack and VBAR_EL1 set.
//
// About the DTB: the Linux arm64 boot protocol passes it in x0, and QEMU does so for a
// raw Image. For an ELF -kernel QEMU passes x0 = 0 and puts the DTB at the RAM base
// (0x4000_0000) if it fits below the image (hence the 0x4020_0000 link address); the
// Rust side (dtb.rs) then looks for the FDT magic there. Nothing else is assumed.

    .pushsection .text.boot, "ax"

// ---------------------------------------------------------------------------------
// Boot CPU entry (ELF entry point). The MMU is off: every data access is
// Device-nGnRnE until mmu.rs turns translation on.
// ---------------------------------------------------------------------------------
    .global _start
    .type _start, %function
_start:
    msr     daifset, #0xf
    mov     x19, x0                         // DTB address from the loader
    bl      pm_el_setup                     // -> EL1h; x0 = EL at entry
    mov     x20, x0
    msr     tpidr_el1, xzr                  // the boot CPU is logical CPU 0

    // SP = top of CPU 0's stack slot: slot i spans [i*stride, (i+1)*stride) of the
    // stack area, guard page first (stride = 2^16 + 2^12, checked in layout.rs).
    adrp    x0, {stacks}
    add     x0, x0, :lo12:{stacks}
    mov     x1, #1
    add     x0, x0, x1, lsl #16
    add     x0, x0, x1, lsl #12
    mov     sp, x0

    // Zero .bss (bounds 16-byte aligned by linker.ld). The stacks are not in .bss.
    adrp    x0, __bss_start
    add     x0, x0, :lo12:__bss_start
    adrp    x1, __bss_end
    add     x1, x1, :lo12:__bss_end
1:  cmp     x0, x1
    b.hs    2f
    stp     xzr, xzr, [x0], #16
    b       1b
2:
    adrp    x0, {vectors}
    add     x0, x0, :lo12:{vectors}
    msr     vbar_el1, x0
    isb

    mov     x0, x19
    mov     x1, x20
    bl      {primary_rust}
    b       pm_park
    .size _start, . - _start

// ---------------------------------------------------------------------------------
// Secondary CPU entry: PSCI CPU_ON with context_id = logical CPU index. The MMU is
// off; this code touches memory only to read the MMU register block the boot CPU
// published (and cleaned to the point of coherency) before CPU_ON, then turns the
// MMU on with the boot CPU's tables before it first uses its stack. That way nothing
// this CPU writes with the MMU off can be shadowed by stale cache lines.
// ---------------------------------------------------------------------------------
    .global pm_secondary_entry
    .type pm_secondary_entry, %function
pm_secondary_entry:
    msr     daifset, #0xf
    mov     x19, x0                         // logical CPU index
    bl      pm_el_setup                     // -> EL1h; x0 = EL at entry
    mov     x20, x0
    cmp     x19, #{max_cpus}
    b.hs    pm_park                         // bogus context_id: never run Rust
    msr     tpidr_el1, x19

    adrp    x0, {mmu_regs}
    add     x0, x0, :lo12:{mmu_regs}
    ldp     x1, x2, [x0]                    // MAIR_EL1, TCR_EL1
    ldp     x3, x4, [x0, #16]               // TTBR0_EL1, SCTLR_EL1
    ldr     x5, [x0, #32]                   // TTBR1_EL1: the empty root
    cbz     x4, pm_park                     // not published: refuse to run
    msr     mair_el1, x1
    msr     tcr_el1, x2
    msr     ttbr0_el1, x3
    msr     ttbr1_el1, x5
    isb
    tlbi    vmalle1                         // nothing stale from before us
    dsb     nsh
    ic      iallu
    dsb     nsh
    isb
    msr     sctlr_el1, x4                   // MMU, caches, WXN on
    isb

    adrp    x0, {stacks}
    add     x0, x0, :lo12:{stacks}
    add     x1, x19, #1
    add     x0, x0, x1, lsl #16
    add     x0, x0, x1, lsl #12
    mov     sp, x0

    adrp    x0, {vectors}
    add     x0, x0, :lo12:{vectors}
    msr     vbar_el1, x0
    isb

    mov     x0, x19
    mov     x1, x20
    bl      {secondary_rust}
    b       pm_park
    .size pm_secondary_entry, . - pm_secondary_entry

// ---------------------------------------------------------------------------------
// pm_el_setup: leaf (no stack, clobbers x0-x2). Returns at EL1h with DAIF masked and
// x0 = the exception level it was called at (1 or 2). Parks the CPU at any other EL.
//
// From EL2 (QEMU -machine virt,virtualization=on): EL1 is AArch64 (HCR_EL2.RW) with
// nothing trapped or routed to EL2, gets the physical counter and timer
// (CNTHCTL_EL2.EL1PCTEN|EL1PCEN) with CNTVOFF_EL2 = 0 so CNTVCT == CNTPCT, sees the
// real MIDR/MPIDR (VPIDR/VMPIDR_EL2), may use the GICv3 system-register interface
// (ICC_SRE_EL2.SRE|Enable) and FP/SIMD (CPTR_EL2). Then ERET to EL1h.
// At EL1 (either way): SCTLR_EL1 = MMU and caches off with the RES1 bits set, and
// CPACR_EL1.FPEN = 0b11 (Rust code uses NEON registers).
// ---------------------------------------------------------------------------------
    .type pm_el_setup, %function
pm_el_setup:
    mrs     x0, CurrentEL
    ubfx    x0, x0, #2, #2
    cmp     x0, #1
    b.eq    3f
    cmp     x0, #2
    b.ne    pm_park

    mov     x1, #(1 << 31)                  // HCR_EL2.RW; E2H, TGE, IMO/FMO/AMO = 0
    msr     hcr_el2, x1
    mrs     x1, cnthctl_el2
    orr     x1, x1, #3                      // EL1PCTEN | EL1PCEN
    msr     cnthctl_el2, x1
    msr     cntvoff_el2, xzr
    mrs     x1, midr_el1
    msr     vpidr_el2, x1
    mrs     x1, mpidr_el1
    msr     vmpidr_el2, x1
    mov     x1, #0x33ff                     // CPTR_EL2: RES1 bits, TFP = 0
    msr     cptr_el2, x1
    msr     hstr_el2, xzr
    msr     vttbr_el2, xzr
    mrs     x1, id_aa64pfr0_el1
    ubfx    x1, x1, #24, #4                 // GIC system registers implemented?
    cbz     x1, 1f
    mrs     x1, S3_4_C12_C9_5               // ICC_SRE_EL2
    orr     x1, x1, #0x1                    // SRE
    orr     x1, x1, #0x8                    // Enable (EL1 may use ICC_SRE_EL1)
    msr     S3_4_C12_C9_5, x1
    isb
    msr     S3_4_C12_C11_0, xzr             // ICH_HCR_EL2: no virtual CPU interface
1:
    movz    x1, #{sctlr_off_lo}
    movk    x1, #{sctlr_off_hi}, lsl #16
    msr     sctlr_el1, x1
    mov     x1, #0x3c5                      // EL1h, D, A, I, F masked
    msr     spsr_el2, x1
    adr     x1, 3f
    msr     elr_el2, x1
    eret                                    // x0 (= 2) and x30 survive the ERET

3:  movz    x1, #{sctlr_off_lo}
    movk    x1, #{sctlr_off_hi}, lsl #16
    msr     sctlr_el1, x1
    mov     x1, #(3 << 20)                  // CPACR_EL1.FPEN: no FP/SIMD traps
    msr     cpacr_el1, x1
    isb
    ret
    .size pm_el_setup, . - pm_el_setup

// A CPU that cannot run the kernel (wrong EL, bad context, or a Rust entry that
// returned) waits here forever with everything masked.
    .global pm_park
    .type pm_park, %function
pm_park:
    msr     daifset, #0xf
    wfe
    b       pm_park
    .size pm_park, . - pm_park

    .popsection
