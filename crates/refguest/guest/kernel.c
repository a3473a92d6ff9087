/*
 * Reference guest, ring-0 part: per-CPU TSS and IDT, the system calls that
 * need ring 0 (port I/O, halt, starting the application processors), and
 * the drop to ring 3. Kept minimal: on PVM hosts ring 0 is emulated.
 */
#include "guest.h"

struct tss {
    u32 reserved0;
    u64 rsp0;
    u64 rsp1;
    u64 rsp2;
    u64 reserved1;
    u64 ist[7];
    u64 reserved2;
    u16 reserved3;
    u16 iomap_base;
} __attribute__((packed));

struct idt_entry {
    u16 off_lo;
    u16 selector;
    u8 ist;
    u8 type_attr;
    u16 off_mid;
    u32 off_hi;
    u32 zero;
} __attribute__((packed));

extern u64 gdt[];
extern u8 ap_tramp[], ap_tramp_end[];
extern void vec0(void), vec1(void), vec2(void), vec3(void), vec4(void), vec5(void), vec6(void),
    vec7(void), vec8(void), vec9(void), vec10(void), vec11(void), vec12(void), vec13(void),
    vec14(void), vec15(void), vec16(void), vec17(void), vec18(void), vec19(void);
extern void enter_user(void (*entry)(u64), u64 stack_top, u64 arg) __attribute__((noreturn));

static struct tss tss[MAX_CPUS];
static struct idt_entry idt[256];
static volatile u32 idt_ready;
u8 kstacks[MAX_CPUS][1 << KSTACK_SHIFT] __attribute__((aligned(4096)));
static u8 ustacks[MAX_CPUS][1 << USTACK_SHIFT] __attribute__((aligned(4096)));

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" ::"a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" ::"a"(v), "Nd"(port)); }

static void set_gate(int vec, void (*fn)(void), int dpl)
{
    u64 a = (u64)fn;
    idt[vec].off_lo = a & 0xffff;
    idt[vec].selector = GDT_KCODE64;
    idt[vec].ist = 0;
    idt[vec].type_attr = 0x8e | (dpl << 5); /* present, 64-bit interrupt gate */
    idt[vec].off_mid = (a >> 16) & 0xffff;
    idt[vec].off_hi = a >> 32;
    idt[vec].zero = 0;
}

static void build_idt(void)
{
    static void (*const vecs[20])(void) = {
        vec0, vec1, vec2, vec3, vec4, vec5, vec6, vec7, vec8, vec9,
        vec10, vec11, vec12, vec13, vec14, vec15, vec16, vec17, vec18, vec19,
    };
    for (int i = 0; i < 20; i++)
        set_gate(i, vecs[i], 0);
}

static void load_tss(u32 cpu)
{
    u64 base = (u64)&tss[cpu];
    u64 limit = sizeof(struct tss) - 1;
    tss[cpu].rsp0 = (u64)&kstacks[cpu + 1][0];
    tss[cpu].iomap_base = sizeof(struct tss);
    u32 slot = (GDT_TSS0 >> 3) + 2 * cpu;
    gdt[slot] = (limit & 0xffff) | ((base & 0xffffff) << 16) | (0x89ULL << 40) |
                (((limit >> 16) & 0xf) << 48) | (((base >> 24) & 0xff) << 56);
    gdt[slot + 1] = base >> 32;
    u16 sel = GDT_TSS0 + 16 * cpu;
    __asm__ volatile("ltr %0" ::"r"(sel));
}

static void load_idt(void)
{
    struct {
        u16 limit;
        u64 base;
    } __attribute__((packed)) ptr = { sizeof(idt) - 1, (u64)idt };
    __asm__ volatile("lidt %0" ::"m"(ptr));
}

/* The hypervisor's TSC frequency (KVM/VMware timing leaf), read here at ring 0:
 * on PVM hosts a ring-3 CPUID runs natively and sees the host's leaves, not the VM's. */
volatile u64 hv_tsc_khz;
/* CPUs the VM has (CPUID.1 EBX[23:16] when HTT is set), read at ring 0 for the same reason. */
volatile u32 hv_cpus;

static u32 cpuid1_cpus(void)
{
    u32 a, b, c, d;
    __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(1), "c"(0));
    if (!(d & (1 << 28)))
        return 1;
    u32 n = (b >> 16) & 0xff;
    return n ? n : 1;
}

static u64 timing_leaf_khz(void)
{
    u32 a, b, c, d;
    __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(0x40000000), "c"(0));
    if (a < 0x40000010 || a >= 0x40010000)
        return 0;
    __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(0x40000010), "c"(0));
    return a;
}

void kmain(u32 cpu)
{
    if (cpu == 0) {
        hv_tsc_khz = timing_leaf_khz();
        hv_cpus = cpuid1_cpus();
        build_idt();
        __atomic_store_n(&idt_ready, 1, __ATOMIC_RELEASE);
    } else {
        while (!__atomic_load_n(&idt_ready, __ATOMIC_ACQUIRE))
            __asm__ volatile("pause");
    }
    load_idt();
    load_tss(cpu);
    enter_user(user_main, (u64)&ustacks[cpu + 1][0], cpu);
}

static void serial_write(const char *s, u64 n)
{
    for (u64 i = 0; i < n; i++)
        outb(PORT_SERIAL, (u8)s[i]);
}

static void power_off(u32 code)
{
    /* snapvmm and QEMU's isa-debug-exit both end the VM on this write. */
    outl(PORT_DEBUG_EXIT, code);
    for (;;)
        __asm__ volatile("cli; hlt");
}

static void start_aps(void)
{
    volatile u32 *icr_lo = (volatile u32 *)0xfee00300;
    for (u8 *s = ap_tramp, *d = (u8 *)AP_TRAMP_ADDR; s < ap_tramp_end; s++, d++)
        *d = *s;
    *icr_lo = 0x000c4500; /* INIT, all excluding self */
    *icr_lo = 0x000c4600 | (AP_TRAMP_ADDR >> 12); /* SIPI */
    *icr_lo = 0x000c4600 | (AP_TRAMP_ADDR >> 12); /* second SIPI, as the MP spec asks */
}

static void put_hex(char *buf, u64 v)
{
    for (int i = 15; i >= 0; i--) {
        buf[i] = "0123456789abcdef"[v & 0xf];
        v >>= 4;
    }
}

/* System calls are `ud2` from ring 3: PVM hosts raise #UD for `int $0x80` from
 * ring 3 (and #GP for port I/O), while exceptions do reach our IDT. The #UD
 * handler recognises the ud2 opcode at a ring-3 RIP and steps over it. */
static int is_syscall(struct trap_frame *f)
{
    return f->vec == 6 && (f->cs & 3) == 3 && *(const u16 *)f->rip == 0x0b0f;
}

void trap(struct trap_frame *f)
{
    if (is_syscall(f)) {
        f->rip += 2;
        switch (f->rax) {
        case SYS_WRITE:
            serial_write((const char *)f->rdi, f->rsi);
            return;
        case SYS_EXIT:
            power_off((u32)f->rdi);
            return;
        case SYS_HALT:
            for (;;)
                __asm__ volatile("hlt");
        case SYS_START_APS:
            start_aps();
            return;
        case SYS_RESET:
            outb(PORT_I8042_CMD, 0xfe);
            for (;;)
                __asm__ volatile("cli; hlt");
        default:
            f->rax = (u64)-1;
            return;
        }
    }
    /* An unexpected exception: report it and power off with status 3. */
    char line[] = "refguest: FAULT vec=0000000000000000 err=0000000000000000 rip=0000000000000000\n";
    put_hex(line + 20, f->vec);
    put_hex(line + 41, f->err);
    put_hex(line + 62, f->rip);
    serial_write(line, sizeof(line) - 1);
    power_off(3);
}
