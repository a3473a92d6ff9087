/* Reference guest: shared types and declarations. */
#ifndef REFGUEST_GUEST_H
#define REFGUEST_GUEST_H
#include "layout.h"

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef long long i64;

/* Frame built by trap_common in entry.S (lowest address first). */
struct trap_frame {
    u64 r15, r14, r13, r12, r11, r10, r9, r8, rbp, rdi, rsi, rdx, rcx, rbx, rax;
    u64 vec, err, rip, cs, rflags, rsp, ss;
};

/* hvm_start_info, from Xen's public/arch-x86/hvm/start_info.h (PVH ABI). */
struct hvm_start_info {
    u32 magic;
    u32 version;
    u32 flags;
    u32 nr_modules;
    u64 modlist_paddr;
    u64 cmdline_paddr;
    u64 rsdp_paddr;
    u64 memmap_paddr;
    u32 memmap_entries;
    u32 reserved;
};

struct hvm_memmap_entry {
    u64 addr;
    u64 size;
    u32 type;
    u32 reserved;
};

#define HVM_START_MAGIC 0x336ec578

extern u32 start_info_paddr;
extern volatile u32 cpu_counter;
extern volatile u64 hv_tsc_khz; /* 0: the hypervisor does not say */
extern volatile u32 hv_cpus;    /* vCPUs the VM has, from CPUID at ring 0 */
extern char _end[];

void user_main(u64 cpu) __attribute__((noreturn));
void *memset(void *d, int c, unsigned long n);
void *memcpy(void *d, const void *s, unsigned long n);

/* ---- ring-3 helpers shared by user.c, diskwrite.c and virtio_blk.c ---- */

#define PAGE 4096ULL
#define MAX_CORRUPT_LINES 8

static inline u64 rdtsc(void)
{
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((u64)hi << 32) | lo;
}

/* One output line, built up and then written whole by emit(). */
struct buf {
    char s[256];
    u32 n;
};

void put_str(struct buf *b, const char *s);
void put_u64(struct buf *b, u64 v);
void put_hexnum(struct buf *b, u64 v);      /* 0x-prefixed */
void put_kv(struct buf *b, const char *k, u64 v);
void put_time(struct buf *b, u64 ticks);    /* " t=S.mmm" */
void emit(struct buf *b);                   /* appends '\n', prints under a lock */
void sys_exit(u32 code) __attribute__((noreturn));
u64 parse_num(const char *v, u32 n, u32 *used); /* decimal or 0x hex, K/M/G suffix */

extern u64 tsc_khz;                         /* TSC ticks per millisecond */

/* ---- diskwrite.c: the disk half of workload=diskwrite ---- */

struct disk_setup {
    u64 mmio_base;      /* virtio-mmio transport in use */
    u64 capacity;       /* device size in 512-byte sectors */
    u64 blocks;         /* 4 KiB blocks the loop covers */
    int clamped;        /* disk_region was larger than the device */
};

/* Finds and initialises the virtio-blk device named on the command line and
 * sizes the loop; prints a FAULT line and exits 3 when there is none. */
void disk_setup(const char *cmdline, u64 region, u64 passes, struct disk_setup *out);
/* Places expected[] (blocks * 8 bytes) at addr, which must be reserved RAM. */
void disk_place_expected(u64 addr);
/* One block (read back and check from pass 2 on, then write); returns 0 once
 * all passes are done. */
int disk_step(void);
/* Called after time the disk loop must not count as its own gap (the other
 * workload's report line, on a single CPU). */
void disk_resync(void);
u64 disk_reports(void);     /* report lines printed so far */
u64 disk_corrupt(void);     /* corrupt blocks found so far */
u64 disk_passes(void);      /* completed passes */

#endif
