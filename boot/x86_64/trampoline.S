/*
 * Application-processor trampoline: copied to {base} (a page below 1 MiB) and started
 * by a SIPI in real mode at {base}:0. It never runs in place. It goes to long mode
 * with the kernel's final page tables, finds its logical index by looking its APIC ID
 * up in the table smp.rs wrote, and calls the Rust AP entry with that index on the
 * index's own stack. Many CPUs run it at once (parallel bring-up): it writes no
 * memory and uses no stack before it has its own. The parameter page {data}:
 *   +0 CR3, +8 stack top of index 0, +16 entry (extern "C" fn(index: usize) -> !),
 *   +24 table entries (u32), +32 bytes between stack tops, +64 APIC IDs (u32 each,
 *   by logical index).
 * The APIC ID is CPUID leaf 0xb's 32-bit x2APIC ID where the CPU has the leaf (it
 * names CPUs above 255), else leaf 1's 8-bit initial APIC ID. An ID not in the table
 * halts (a CPU nobody started).
 * The GDT has its accessed bits preset, so loading segments never writes to this
 * (read-only once paging is on) page.
 */
    .section .text.ap_trampoline, "ax", @progbits
    .code16
    .global ap_trampoline_start
ap_trampoline_start:
    cli
    cld
    xor %ax, %ax
    mov %ax, %ds
    lgdtl {base} + (tramp_gdtr - ap_trampoline_start)
    mov %cr0, %eax
    or $1, %eax
    mov %eax, %cr0
    ljmpl $0x08, ${base} + (tramp32 - ap_trampoline_start)

    .code32
tramp32:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov %cr4, %eax
    or $0x20, %eax          /* PAE */
    mov %eax, %cr4
    mov {data}, %eax
    mov %eax, %cr3
    mov $0xc0000080, %ecx   /* EFER */
    rdmsr
    or $0x900, %eax         /* LME | NXE */
    wrmsr
    mov %cr0, %eax
    or $0x80010001, %eax    /* PG | WP | PE */
    mov %eax, %cr0
    ljmp $0x18, ${base} + (tramp64 - ap_trampoline_start)

    .code64
tramp64:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    xor %eax, %eax
    cpuid
    mov %eax, %esi          /* highest basic leaf */
    mov $1, %eax
    cpuid
    shr $24, %ebx
    mov %ebx, %edi          /* initial APIC ID, 8 bits */
    cmp $0xb, %esi
    jb 2f
    mov $0xb, %eax
    xor %ecx, %ecx
    cpuid
    test %ebx, %ebx         /* EBX = 0: leaf 0xb not implemented */
    jz 2f
    mov %edx, %edi          /* x2APIC ID, 32 bits */
2:
    mov {data} + 24, %ecx
    xor %esi, %esi
3:
    cmp %ecx, %esi
    jae 1f                  /* not in the table */
    cmp {ids}(, %rsi, 4), %edi
    je 4f
    inc %esi
    jmp 3b
4:
    mov %rsi, %rax
    imul {data} + 32, %rax
    add {data} + 8, %rax
    mov %rax, %rsp
    mov %rsi, %rdi
    mov {data} + 16, %rax
    xor %ebp, %ebp
    call *%rax
1:
    cli
    hlt
    jmp 1b

    .p2align 3
tramp_gdt:
    .quad 0
    .quad 0x00cf9b000000ffff    /* 0x08: 32-bit code */
    .quad 0x00cf93000000ffff    /* 0x10: data */
    .quad 0x00af9b000000ffff    /* 0x18: 64-bit code */
tramp_gdt_end:
tramp_gdtr:
    .word tramp_gdt_end - tramp_gdt - 1
    .long {base} + (tramp_gdt - ap_trampoline_start)
    .global ap_trampoline_end
ap_trampoline_end:
