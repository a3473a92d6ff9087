/*
 * Reference guest, ring-3 part: command-line parsing and the workloads.
 *
 * memwrite: each CPU owns a slice of the region and, pass after pass, writes
 * an increasing sequence number into the first word of every 4 KiB page of
 * its slice. From the second pass on, each page must hold exactly the value
 * the previous pass wrote, so a restore whose registers and RAM come from
 * different instants (or a lost or stale page) is caught by the guest itself.
 * Once a second each CPU reports the pages it wrote and the longest gap
 * between two consecutive page writes (the pause the guest felt); the time
 * spent printing is left out of the gaps.
 */
#include "guest.h"

#define PAGE 4096ULL
#define MAX_RANGES 16
#define MAX_CORRUPT_LINES 8

enum workload { WL_MEMWRITE, WL_IDLE, WL_EXIT, WL_RESET };

static struct {
    enum workload workload;
    u64 region;     /* bytes; 0 = default */
    u64 passes;     /* 0 = forever */
    u64 rate;       /* pages per second per CPU; 0 = unlimited */
    u32 exit_code;
    u64 tsc_khz;
} cfg;

static struct range {
    u64 base;
    u64 pages;
} ranges[MAX_RANGES];
static u32 nranges;
static u64 total_pages;
static u64 ram_bytes;

static volatile u32 go;         /* BSP has parsed the parameters */
static volatile u32 ncpus;      /* CPUs taking part */
static volatile u32 checked_in; /* APs that reached ring 3 */
static volatile u32 finished;
static volatile u64 corrupt_total;
static volatile u32 print_lock;

/* ---- system calls --------------------------------------------------- */

static u64 syscall2(u64 nr, u64 a, u64 b)
{
    u64 ret = nr;
    __asm__ volatile("ud2" : "+a"(ret) : "D"(a), "S"(b) : "memory");
    return ret;
}

static void sys_write(const char *s, u64 n) { syscall2(SYS_WRITE, (u64)s, n); }
static void __attribute__((noreturn)) sys_exit(u32 code)
{
    syscall2(SYS_EXIT, code, 0);
    for (;;)
        ;
}
static void __attribute__((noreturn)) sys_halt(void)
{
    syscall2(SYS_HALT, 0, 0);
    for (;;)
        ;
}

static inline u64 rdtsc(void)
{
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((u64)hi << 32) | lo;
}

static inline void cpuid(u32 leaf, u32 *a, u32 *b, u32 *c, u32 *d)
{
    __asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(0));
}

/* ---- formatting ----------------------------------------------------- */

struct buf {
    char s[160];
    u32 n;
};

static void put_str(struct buf *b, const char *s)
{
    while (*s && b->n < sizeof(b->s))
        b->s[b->n++] = *s++;
}

static void put_u64(struct buf *b, u64 v)
{
    char tmp[20];
    int i = 0;
    do {
        tmp[i++] = '0' + v % 10;
        v /= 10;
    } while (v);
    while (i && b->n < sizeof(b->s))
        b->s[b->n++] = tmp[--i];
}

static void put_kv(struct buf *b, const char *k, u64 v)
{
    put_str(b, k);
    put_u64(b, v);
}

static void emit(struct buf *b)
{
    if (b->n < sizeof(b->s))
        b->s[b->n++] = '\n';
    while (__atomic_exchange_n(&print_lock, 1, __ATOMIC_ACQUIRE))
        __asm__ volatile("pause");
    sys_write(b->s, b->n);
    __atomic_store_n(&print_lock, 0, __ATOMIC_RELEASE);
}

/* ---- parameters ----------------------------------------------------- */

static int word_is(const char *w, u32 n, const char *lit)
{
    u32 i = 0;
    for (; i < n && lit[i]; i++)
        if (w[i] != lit[i])
            return 0;
    return i == n && !lit[i];
}

static u64 parse_size(const char *v, u32 n)
{
    u64 x = 0;
    u32 i = 0;
    for (; i < n && v[i] >= '0' && v[i] <= '9'; i++)
        x = x * 10 + (v[i] - '0');
    if (i < n) {
        switch (v[i] | 0x20) {
        case 'k': x <<= 10; break;
        case 'm': x <<= 20; break;
        case 'g': x <<= 30; break;
        }
    }
    return x;
}

static void parse_cmdline(const char *s)
{
    while (s && *s) {
        while (*s == ' ')
            s++;
        const char *k = s;
        while (*s && *s != '=' && *s != ' ')
            s++;
        u32 kn = s - k;
        const char *v = s;
        u32 vn = 0;
        if (*s == '=') {
            v = ++s;
            while (*s && *s != ' ')
                s++;
            vn = s - v;
        }
        if (word_is(k, kn, "workload")) {
            if (word_is(v, vn, "idle"))
                cfg.workload = WL_IDLE;
            else if (word_is(v, vn, "exit"))
                cfg.workload = WL_EXIT;
            else if (word_is(v, vn, "reset"))
                cfg.workload = WL_RESET;
            else
                cfg.workload = WL_MEMWRITE;
        } else if (word_is(k, kn, "region")) {
            cfg.region = parse_size(v, vn);
        } else if (word_is(k, kn, "passes")) {
            cfg.passes = parse_size(v, vn);
        } else if (word_is(k, kn, "rate")) {
            cfg.rate = parse_size(v, vn);
        } else if (word_is(k, kn, "exit")) {
            cfg.exit_code = (u32)parse_size(v, vn);
        } else if (word_is(k, kn, "tsc_khz")) {
            cfg.tsc_khz = parse_size(v, vn);
        }
    }
}

/* TSC frequency: the KVM/VMware timing leaf (snapvmm sets it; QEMU with
 * -cpu host,vmware-cpuid-freq=on,+invtsc too), or tsc_khz= on the command line. */
static u64 detect_tsc_khz(void)
{
    u32 a, b, c, d;
    cpuid(0x40000000, &a, &b, &c, &d);
    if (a >= 0x40000010 && a < 0x40010000) {
        cpuid(0x40000010, &a, &b, &c, &d);
        if (a)
            return a;
    }
    return 0;
}

/* Usable RAM for the workload: e820 RAM above the guest image, inside the identity map. */
static void collect_ranges(const struct hvm_start_info *si)
{
    u64 floor = ((u64)_end + (2ULL << 20) - 1) & ~((2ULL << 20) - 1);
    if (floor < (4ULL << 20))
        floor = 4ULL << 20;
    const u64 ceiling = (u64)IDENT_GIB << 30;
    const struct hvm_memmap_entry *e = (const void *)si->memmap_paddr;
    for (u32 i = 0; si->version >= 1 && i < si->memmap_entries; i++) {
        if (e[i].type != 1)
            continue;
        ram_bytes += e[i].size;
        u64 lo = e[i].addr, hi = e[i].addr + e[i].size;
        if (lo < floor)
            lo = floor;
        if (hi > ceiling)
            hi = ceiling;
        lo = (lo + PAGE - 1) & ~(PAGE - 1);
        hi &= ~(PAGE - 1);
        if (hi <= lo || nranges == MAX_RANGES)
            continue;
        ranges[nranges].base = lo;
        ranges[nranges].pages = (hi - lo) / PAGE;
        total_pages += ranges[nranges].pages;
        nranges++;
    }
}

/* ---- memwrite ------------------------------------------------------- */

struct cursor {
    u32 r;    /* range index */
    u64 off;  /* page offset in that range */
};

static struct cursor cursor_at(u64 page)
{
    struct cursor c = { 0, page };
    while (c.r < nranges && c.off >= ranges[c.r].pages) {
        c.off -= ranges[c.r].pages;
        c.r++;
    }
    return c;
}

static void report(u32 cpu, u64 now, u64 t0, u64 pages, u64 maxgap, u64 passes)
{
    struct buf b = { .n = 0 };
    u64 ms = (now - t0) / cfg.tsc_khz;
    put_kv(&b, "refguest: cpu=", cpu);
    put_kv(&b, " t=", ms / 1000);
    put_str(&b, ".");
    put_u64(&b, ms / 100 % 10);
    put_u64(&b, ms / 10 % 10);
    put_u64(&b, ms % 10);
    put_kv(&b, " pages=", pages);
    put_kv(&b, " maxgap_us=", maxgap * 1000 / cfg.tsc_khz);
    put_kv(&b, " passes=", passes);
    emit(&b);
}

static void report_corrupt(u32 cpu, u64 page, u64 expected, u64 found)
{
    struct buf b = { .n = 0 };
    put_kv(&b, "refguest: CORRUPT cpu=", cpu);
    put_kv(&b, " page=", page);
    put_kv(&b, " expected=", expected);
    put_kv(&b, " found=", found);
    emit(&b);
}

static void memwrite(u32 cpu)
{
    u64 first = total_pages * cpu / ncpus;
    u64 n = total_pages * (cpu + 1) / ncpus - first;
    const u64 second = cfg.tsc_khz * 1000;
    u64 t0 = rdtsc(), last = t0, next_report = t0 + second;
    u64 maxgap = 0, written = 0, corrupt = 0;

    for (u64 pass = 1; cfg.passes == 0 || pass <= cfg.passes; pass++) {
        struct cursor c = cursor_at(first);
        for (u64 j = 0; j < n; j++) {
            if (c.off == ranges[c.r].pages) {
                c.r++;
                c.off = 0;
            }
            volatile u64 *word = (volatile u64 *)(ranges[c.r].base + c.off * PAGE);
            c.off++;
            u64 value = (pass - 1) * n + j + 1;
            if (pass > 1) {
                u64 found = *word;
                if (found != value - n) {
                    if (corrupt++ < MAX_CORRUPT_LINES)
                        report_corrupt(cpu, first + j, value - n, found);
                    last = rdtsc();
                }
            }
            *word = value;
            written++;

            u64 now = rdtsc();
            if (now - last > maxgap)
                maxgap = now - last;
            last = now;
            if (now >= next_report || (cfg.rate && written >= cfg.rate)) {
                if (cfg.rate && written >= cfg.rate)
                    while ((now = rdtsc()) < next_report)
                        __asm__ volatile("pause");
                report(cpu, now, t0, written, maxgap, pass - 1);
                written = 0;
                maxgap = 0;
                next_report = now + second;
                last = rdtsc();
            }
        }
    }
    if (corrupt)
        __atomic_fetch_add(&corrupt_total, corrupt, __ATOMIC_RELAXED);
    __atomic_fetch_add(&finished, 1, __ATOMIC_RELEASE);
}

/* ---- entry ---------------------------------------------------------- */

static u32 expected_cpus(void)
{
    u32 a, b, c, d;
    cpuid(1, &a, &b, &c, &d);
    if (!(d & (1 << 28)))
        return 1;
    u32 n = (b >> 16) & 0xff;
    return n ? n : 1;
}

static void wait_for_aps(void)
{
    u32 want = expected_cpus();
    if (want > MAX_CPUS)
        want = MAX_CPUS;
    if (want <= 1)
        return;
    syscall2(SYS_START_APS, 0, 0);
    u64 deadline = rdtsc() + cfg.tsc_khz * 500; /* 0.5 s */
    while (checked_in + 1 < want && rdtsc() < deadline)
        __asm__ volatile("pause");
}

static void bsp_main(void)
{
    const struct hvm_start_info *si = (const void *)(u64)start_info_paddr;
    if (si->magic != HVM_START_MAGIC) {
        struct buf b = { .n = 0 };
        put_str(&b, "refguest: bad hvm_start_info magic");
        emit(&b);
        sys_exit(4);
    }
    if (si->cmdline_paddr)
        parse_cmdline((const char *)si->cmdline_paddr);
    u64 khz = detect_tsc_khz();
    if (!cfg.tsc_khz)
        cfg.tsc_khz = khz ? khz : 2000000;
    collect_ranges(si);
    if (cfg.region) {
        u64 want = cfg.region / PAGE;
        if (want < total_pages)
            total_pages = want;
    } else if (total_pages > (256ULL << 20) / PAGE) {
        total_pages = (256ULL << 20) / PAGE;
    }

    if (cfg.workload == WL_MEMWRITE)
        wait_for_aps();
    ncpus = 1 + checked_in;
    if (total_pages < ncpus)
        total_pages = 0;

    struct buf b = { .n = 0 };
    static const char *const names[] = { "memwrite", "idle", "exit", "reset" };
    put_kv(&b, "refguest: ready cpus=", ncpus);
    put_kv(&b, " ram_mib=", ram_bytes >> 20);
    put_str(&b, " workload=");
    put_str(&b, names[cfg.workload]);
    put_kv(&b, " region_mib=", total_pages * PAGE >> 20);
    put_kv(&b, " passes=", cfg.passes);
    put_kv(&b, " tsc_khz=", cfg.tsc_khz);
    if (!khz)
        put_str(&b, " (tsc_khz guessed)");
    emit(&b);

    if (cfg.workload == WL_EXIT)
        sys_exit(cfg.exit_code);
    if (cfg.workload == WL_IDLE)
        sys_halt();
    if (cfg.workload == WL_RESET) {
        syscall2(SYS_RESET, 0, 0);
        sys_halt();
    }
    if (total_pages == 0) {
        struct buf e = { .n = 0 };
        put_str(&e, "refguest: no RAM for the region");
        emit(&e);
        sys_exit(4);
    }
    __atomic_store_n(&go, 1, __ATOMIC_RELEASE);
    memwrite(0);
    while (finished < ncpus)
        __asm__ volatile("pause");
    struct buf d = { .n = 0 };
    put_kv(&d, "refguest: done cpus=", ncpus);
    put_kv(&d, " passes=", cfg.passes);
    put_kv(&d, " corrupt=", corrupt_total);
    emit(&d);
    sys_exit(corrupt_total ? 2 : cfg.exit_code);
}

void user_main(u64 cpu)
{
    if (cpu == 0)
        bsp_main();
    __atomic_fetch_add(&checked_in, 1, __ATOMIC_RELEASE);
    while (!__atomic_load_n(&go, __ATOMIC_ACQUIRE))
        __asm__ volatile("pause");
    if (cpu < ncpus)
        memwrite((u32)cpu);
    for (;;)
        __asm__ volatile("pause");
}

void *memset(void *d, int c, unsigned long n)
{
    u8 *p = d;
    while (n--)
        *p++ = (u8)c;
    return d;
}

void *memcpy(void *d, const void *s, unsigned long n)
{
    u8 *p = d;
    const u8 *q = s;
    while (n--)
        *p++ = *q++;
    return d;
}
