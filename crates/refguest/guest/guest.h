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
extern char _end[];

void user_main(u64 cpu) __attribute__((noreturn));
void *memset(void *d, int c, unsigned long n);
void *memcpy(void *d, const void *s, unsigned long n);

#endif
