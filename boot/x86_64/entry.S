/*
 * x86_64 entry through the PVH boot protocol (QEMU -kernel with an ELF).
 *
 * QEMU finds the 32-bit entry in the Xen PHYS32_ENTRY note and jumps there in flat
 * 32-bit protected mode, paging off, EBX = physical address of hvm_start_info.
 * We zero .bss, keep EBX, build a throw-away identity map of the first GiB (2 MiB
 * pages, no permissions yet: paging.rs replaces it with the W^X map), enter long mode
 * and call the Rust boot path on CPU 0's stack.
 *
 * Operands: {start_info} (u64 static), {stack} (CPU 0 stack), {stack_size},
 * {pml4} {pdpt} {pd} (boot page tables, 4 KiB aligned, in .bss), {main}.
 */
    .section .note.Xen, "a", @note
    .p2align 2
    .long 4                 /* namesz: "Xen\0" */
    .long 8                 /* descsz */
    .long 18                /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .p2align 2
    .quad _start32

    .section .data.boot_gdt, "aw", @progbits
    .p2align 3
boot_gdt:
    .quad 0
    .quad 0x00af9b000000ffff    /* 0x08: 64-bit code, accessed bit preset */
    .quad 0x00cf93000000ffff    /* 0x10: data, accessed bit preset */
boot_gdt_end:
boot_gdtr:
    .word boot_gdt_end - boot_gdt - 1
    .quad boot_gdt

    .section .text.boot, "ax", @progbits
    .code32
    .global _start32
_start32:
    cli
    cld
    mov %ebx, %esi

    mov $__bss_start, %edi
    mov $__bss_end, %ecx
    sub %edi, %ecx
    xor %eax, %eax
    rep stosb

    mov %esi, {start_info}
    mov ${stack} + {stack_size}, %esp

    mov ${pdpt}, %eax
    or $3, %eax
    mov %eax, {pml4}
    mov ${pd}, %eax
    or $3, %eax
    mov %eax, {pdpt}
    mov ${pd}, %edi
    mov $0x83, %eax         /* present, writable, 2 MiB */
    mov $512, %ecx
1:
    mov %eax, (%edi)
    movl $0, 4(%edi)
    add $0x200000, %eax
    add $8, %edi
    loop 1b

    mov %cr4, %eax
    or $0x20, %eax          /* PAE */
    mov %eax, %cr4
    mov ${pml4}, %eax
    mov %eax, %cr3
    mov $0xc0000080, %ecx   /* EFER */
    rdmsr
    or $0x900, %eax         /* LME | NXE */
    wrmsr
    mov %cr0, %eax
    or $0x80010001, %eax    /* PG | WP | PE */
    mov %eax, %cr0
    lgdt boot_gdtr
    ljmp $0x08, $2f

    .code64
2:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    xor %eax, %eax
    mov %ax, %fs
    mov %ax, %gs
    mov ${stack} + {stack_size}, %rsp
    xor %ebp, %ebp
    call {main}
3:
    cli
    hlt
    jmp 3b
