/* Constants shared by the reference guest's assembly and C code. */
#ifndef REFGUEST_LAYOUT_H
#define REFGUEST_LAYOUT_H

#define MAX_CPUS        32
#define IDENT_GIB       16          /* identity-mapped guest-physical space */
#define KSTACK_SHIFT    14          /* 16 KiB ring-0 stack per CPU */
#define USTACK_SHIFT    15          /* 32 KiB ring-3 stack per CPU */
#define AP_TRAMP_ADDR   0x8000      /* SIPI vector 0x08 */

#define GDT_KCODE64     0x08
#define GDT_KDATA       0x10
#define GDT_KCODE32     0x18
#define GDT_UDATA       (0x20 | 3)
#define GDT_UCODE64     (0x28 | 3)
#define GDT_TSS0        0x30
#define GDT_LIMIT       (0x30 + 16 * MAX_CPUS - 1)

#define CR0_PE          (1 << 0)
#define CR0_MP          (1 << 1)
#define CR0_EM          (1 << 2)
#define CR0_NE          (1 << 5)
#define CR0_PG          (1 << 31)
#define CR4_PAE         (1 << 5)
#define CR4_OSFXSR      (1 << 9)
#define CR4_OSXMMEXCPT  (1 << 10)

/* I/O ports the guest uses (the same on snapvmm and on QEMU). */
#define PORT_SERIAL     0x3f8
#define PORT_DEBUG_EXIT 0xf4        /* QEMU isa-debug-exit,iobase=0xf4,iosize=4 */

/* System calls (ud2 from ring 3, %rax = number; see kernel.c). */
#define SYS_WRITE       1           /* rdi = buffer, rsi = length */
#define SYS_EXIT        2           /* rdi = exit code */
#define SYS_HALT        3           /* halt this CPU forever */
#define SYS_START_APS   4           /* INIT-SIPI-SIPI to all other CPUs */
#define SYS_RESET       5           /* pulse reset through the i8042 */
#define PORT_I8042_CMD  0x64

#endif
