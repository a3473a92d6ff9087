/*
 * Reference guest: boot path.
 *
 * pvh_start    32-bit PVH entry (paging off, %ebx = hvm_start_info).
 * ap_tramp     16-bit SIPI trampoline, copied to AP_TRAMP_ADDR by the BSP.
 * common64     every CPU: flat segments, per-CPU kernel stack, kmain(cpu).
 *
 * Everything here runs in guest ring 0, which on PVM hosts is emulated one
 * instruction at a time, so it is kept short: the page tables are static data.
 */
#include "layout.h"

        .section .note.pvh, "a"
        .balign 4
        .long 4                 /* namesz: "Xen\0" */
        .long 4                 /* descsz */
        .long 18                /* XEN_ELFNOTE_PHYS32_ENTRY */
        .asciz "Xen"
        .long pvh_start

/* ------------------------------------------------------------------ */
        .section .text.boot, "ax"
        .code32
        .globl pvh_start
pvh_start:
        cli
        movl %ebx, start_info_paddr
        jmp enter_long_mode

        .globl ap_start32
ap_start32:
        movw $GDT_KDATA, %ax
        movw %ax, %ds
        movw %ax, %es
        movw %ax, %ss

enter_long_mode:
        lgdt gdt_ptr
        movl %cr4, %eax
        orl $(CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT), %eax
        movl %eax, %cr4
        movl $pml4, %eax
        movl %eax, %cr3
        movl $0xC0000080, %ecx          /* EFER */
        rdmsr
        orl $0x100, %eax                /* LME */
        wrmsr
        movl %cr0, %eax
        andl $~(CR0_EM), %eax
        orl $(CR0_PG | CR0_PE | CR0_MP | CR0_NE), %eax
        movl %eax, %cr0
        ljmp $GDT_KCODE64, $common64

        .code64
common64:
        movw $GDT_KDATA, %ax
        movw %ax, %ds
        movw %ax, %es
        movw %ax, %ss
        xorl %eax, %eax
        movw %ax, %fs
        movw %ax, %gs
        movl $1, %eax
        lock xaddl %eax, cpu_counter    /* %eax = this CPU's index */
        cmpl $MAX_CPUS, %eax
        jae park
        movl %eax, %edi
        movq %rax, %rsp
        incq %rsp
        shlq $KSTACK_SHIFT, %rsp
        addq $kstacks, %rsp
        call kmain
park:
        hlt
        jmp park

/* ------------------------------------------------------------------ */
/* Interrupt/exception entry: build a uniform frame and call trap().  */
        .macro VEC_NOERR n
        .globl vec\n
vec\n:
        pushq $0
        pushq $\n
        jmp trap_common
        .endm
        .macro VEC_ERR n
        .globl vec\n
vec\n:
        pushq $\n
        jmp trap_common
        .endm

        VEC_NOERR 0
        VEC_NOERR 1
        VEC_NOERR 2
        VEC_NOERR 3
        VEC_NOERR 4
        VEC_NOERR 5
        VEC_NOERR 6
        VEC_NOERR 7
        VEC_ERR 8
        VEC_NOERR 9
        VEC_ERR 10
        VEC_ERR 11
        VEC_ERR 12
        VEC_ERR 13
        VEC_ERR 14
        VEC_NOERR 15
        VEC_NOERR 16
        VEC_ERR 17
        VEC_NOERR 18
        VEC_NOERR 19

trap_common:
        pushq %rax
        pushq %rbx
        pushq %rcx
        pushq %rdx
        pushq %rsi
        pushq %rdi
        pushq %rbp
        pushq %r8
        pushq %r9
        pushq %r10
        pushq %r11
        pushq %r12
        pushq %r13
        pushq %r14
        pushq %r15
        movq %rsp, %rdi
        call trap
        popq %r15
        popq %r14
        popq %r13
        popq %r12
        popq %r11
        popq %r10
        popq %r9
        popq %r8
        popq %rbp
        popq %rdi
        popq %rsi
        popq %rdx
        popq %rcx
        popq %rbx
        popq %rax
        addq $16, %rsp
        iretq

/* Drop to ring 3: enter_user(entry, user_stack_top, arg). */
        .globl enter_user
enter_user:
        movq %rdx, %r8
        pushq $GDT_UDATA            /* SS */
        pushq %rsi                  /* RSP */
        pushq $0x2                  /* RFLAGS: IF=0, IOPL=0 */
        pushq $GDT_UCODE64          /* CS */
        pushq %rdi                  /* RIP */
        movw $GDT_UDATA, %ax
        movw %ax, %ds
        movw %ax, %es
        movq %r8, %rdi
        iretq

/* ------------------------------------------------------------------ */
/* AP trampoline: position independent, copied to AP_TRAMP_ADDR.      */
        .globl ap_tramp, ap_tramp_end
        .code16
ap_tramp:
        cli
        xorw %ax, %ax
        movw %ax, %ds
        lgdtl (AP_TRAMP_ADDR + (ap_gdt_ptr - ap_tramp))
        movl %cr0, %eax
        orl $CR0_PE, %eax
        movl %eax, %cr0
        ljmpl $GDT_KCODE32, $ap_start32
        .balign 8
ap_gdt_ptr:
        .word GDT_LIMIT
        .long gdt
ap_tramp_end:

/* ------------------------------------------------------------------ */
        .section .data
        .balign 16
        .globl gdt, gdt_ptr
gdt:
        .quad 0                             /* null */
        .quad 0x00af9a000000ffff            /* 0x08 kernel code 64 */
        .quad 0x00cf92000000ffff            /* 0x10 kernel data */
        .quad 0x00cf9a000000ffff            /* 0x18 kernel code 32 */
        .quad 0x00cff2000000ffff            /* 0x20 user data (DPL3) */
        .quad 0x00affa000000ffff            /* 0x28 user code 64 (DPL3) */
        .fill 2 * MAX_CPUS, 8, 0            /* 0x30: one 16-byte TSS descriptor per CPU */
gdt_end:
        .balign 8
gdt_ptr:
        .word GDT_LIMIT
        .quad gdt

        .globl cpu_counter, start_info_paddr
        .balign 8
cpu_counter:
        .long 0
start_info_paddr:
        .long 0

/* Identity map of the low IDENT_GIB GiB with 2 MiB pages, user-accessible. */
        .section .data.pagetables, "aw"
        .balign 4096
        .globl pml4
pml4:
        .quad pdpt + 0x7                    /* P | RW | US */
        .fill 511, 8, 0
pdpt:
        .set i, 0
        .rept IDENT_GIB
        .quad pd + i * 4096 + 0x7
        .set i, i + 1
        .endr
        .fill 512 - IDENT_GIB, 8, 0
pd:
        .set i, 0
        .rept IDENT_GIB * 512
        .quad (i << 21) + 0x87              /* P | RW | US | PS */
        .set i, i + 1
        .endr
