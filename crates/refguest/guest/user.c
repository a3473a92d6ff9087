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
 *
 * hot=PERCENT: pass 1 fills the whole slice; later passes rewrite only the
 * first PERCENT % of it (the hot part). The cold rest keeps pass 1's values,
 * and is still checked: after each hot page write the CPU reads one cold page
 * (round robin) and compares it with its pass-1 value.
 *
 * diskwrite: CPU 0 runs the disk loop of diskwrite.c, every other CPU runs
 * memwrite; with a single CPU, CPU 0 alternates between one disk block and a
 * slice of memwrite pages.
 */
#include "guest.h"

#define MAX_RANGES 16
#define INTERLEAVE_PAGES 256    /* memwrite pages per disk block on one CPU */
#define COLD_CHECK_EVERY 4      /* hot=: hot page writes per cold page check */

enum workload { WL_MEMWRITE, WL_IDLE, WL_EXIT, WL_RESET, WL_DISKWRITE };

static struct {
    enum workload workload;
    u64 region;     /* bytes; 0 = default */
    u64 passes;     /* 0 = forever */
    u64 rate;       /* pages per second per CPU; 0 = unlimited */
    u32 exit_code;
    u64 tsc_khz;
    u64 disk_region; /* bytes; 0 = default */
    u64 hot;        /* percent of each slice rewritten from pass 2 on, 1..100 */
    u64 report_ms;  /* memwrite reports every this many ms (default 1000) */
} cfg;

u64 tsc_khz;

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
void sys_exit(u32 code)
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


/* ---- formatting ----------------------------------------------------- */

void put_str(struct buf *b, const char *s)
{
    while (*s && b->n < sizeof(b->s))
        b->s[b->n++] = *s++;
}

void put_u64(struct buf *b, u64 v)
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

void put_hexnum(struct buf *b, u64 v)
{
    int shift = 60;
    put_str(b, "0x");
    while (shift > 0 && !(v >> shift))
        shift -= 4;
    for (; shift >= 0 && b->n < sizeof(b->s); shift -= 4)
        b->s[b->n++] = "0123456789abcdef"[(v >> shift) & 0xf];
}

void put_kv(struct buf *b, const char *k, u64 v)
{
    put_str(b, k);
    put_u64(b, v);
}

/* " t=S.mmm" for a TSC interval. */
void put_time(struct buf *b, u64 ticks)
{
    u64 ms = ticks / tsc_khz;
    put_kv(b, " t=", ms / 1000);
    put_str(b, ".");
    put_u64(b, ms / 100 % 10);
    put_u64(b, ms / 10 % 10);
    put_u64(b, ms % 10);
}

void emit(struct buf *b)
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

/* A number: decimal, or hex with 0x, optionally followed by K, M or G.
 * *used (if given) receives the characters consumed. */
u64 parse_num(const char *v, u32 n, u32 *used)
{
    u64 x = 0;
    u32 i = 0;
    if (n >= 2 && v[0] == '0' && (v[1] | 0x20) == 'x') {
        for (i = 2; i < n; i++) {
            char c = v[i] | 0x20;
            if (v[i] >= '0' && v[i] <= '9')
                x = x * 16 + (v[i] - '0');
            else if (c >= 'a' && c <= 'f')
                x = x * 16 + (c - 'a' + 10);
            else
                break;
        }
    } else {
        for (; i < n && v[i] >= '0' && v[i] <= '9'; i++)
            x = x * 10 + (v[i] - '0');
    }
    if (i < n) {
        switch (v[i] | 0x20) {
        case 'k': x <<= 10; i++; break;
        case 'm': x <<= 20; i++; break;
        case 'g': x <<= 30; i++; break;
        }
    }
    if (used)
        *used = i;
    return x;
}

static u64 parse_size(const char *v, u32 n) { return parse_num(v, n, 0); }

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
            else if (word_is(v, vn, "diskwrite"))
                cfg.workload = WL_DISKWRITE;
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
        } else if (word_is(k, kn, "disk_region")) {
            cfg.disk_region = parse_size(v, vn);
        } else if (word_is(k, kn, "report_ms")) {
            cfg.report_ms = parse_size(v, vn);
            if (cfg.report_ms < 1)
                cfg.report_ms = 1;
        } else if (word_is(k, kn, "hot")) {
            cfg.hot = parse_size(v, vn);
            if (cfg.hot < 1)
                cfg.hot = 1;
            if (cfg.hot > 100)
                cfg.hot = 100;
        }
    }
}

/* TSC frequency: the KVM/VMware timing leaf, read by the ring-0 part (snapvmm
 * sets it; QEMU with -cpu host,vmware-cpuid-freq=on,+invtsc too), or tsc_khz=
 * on the command line. */
static u64 detect_tsc_khz(void)
{
    return hv_tsc_khz;
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

/* The stalls a CPU felt: gaps between two page writes of at least
 * stall_us[0] microseconds, counted by length in NSTALL buckets
 * [stall_us[k], stall_us[k + 1]) (the last open-ended) and reported as
 * stalls=a.b.c.d.e.f.g.h: what a host turns into the guest's p99 stall. */
#define NSTALL 8
static const u32 stall_us[NSTALL] = { 50, 100, 200, 500, 1000, 2000, 5000, 10000 };

static void count_stall(u32 *stalls, u64 gap)
{
    u64 us = gap * 1000 / tsc_khz;
    int k = NSTALL - 1;
    while (k > 0 && us < stall_us[k])
        k--;
    stalls[k]++;
}

static void report(u32 cpu, u64 now, u64 t0, u64 pages, u64 maxgap, u64 gapend,
                   const u32 *stalls, u64 passes)
{
    struct buf b = { .n = 0 };
    put_kv(&b, "refguest: cpu=", cpu);
    put_time(&b, now - t0);
    put_kv(&b, " pages=", pages);
    put_kv(&b, " maxgap_us=", maxgap * 1000 / tsc_khz);
    /* When the longest gap ended, as time before this line: lets a host that
     * notes when each line arrives place the gap on its own clock. (Before
     * passes=, which readers take as the line's last field.) */
    put_kv(&b, " gap_ago_us=", gapend && now > gapend ? (now - gapend) * 1000 / tsc_khz : 0);
    put_str(&b, " stalls=");
    for (int k = 0; k < NSTALL; k++) {
        if (k)
            put_str(&b, ".");
        put_u64(&b, stalls[k]);
    }
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

/* One CPU's memwrite, as a resumable loop so that a single CPU can interleave
 * it with the disk loop. */
struct memwrite {
    u32 cpu;
    u64 first, n;           /* slice: pages [first, first + n) of the region */
    u64 hot;                /* pages [0, hot) of the slice are rewritten from pass 2 on */
    u64 pass, j;            /* next page to write: page j of pass `pass` */
    struct cursor c;
    u64 cj;                 /* next cold page to check, in [hot, n) */
    struct cursor cc;
    u64 t0, last, next_report, maxgap, gapend, written, corrupt;
    u64 stall_min;          /* stall_us[0] in TSC ticks */
    u32 stalls[NSTALL];     /* since the last report (see count_stall) */
    u64 reports;            /* report lines printed */
    int rate_hold;          /* rate reached: report due at next_report */
    u64 hold_passes;
};

static void mw_init(struct memwrite *m, u32 cpu, u32 slice, u32 nslices)
{
    memset(m, 0, sizeof(*m));
    m->cpu = cpu;
    m->first = total_pages * slice / nslices;
    m->n = total_pages * (slice + 1) / nslices - m->first;
    m->hot = m->n * cfg.hot / 100;
    if (m->hot == 0)
        m->hot = m->n < 1 ? m->n : 1;
    m->cj = m->hot;
    m->pass = 1;
    m->t0 = rdtsc();
    m->last = m->t0;
    m->stall_min = tsc_khz * stall_us[0] / 1000;
    m->next_report = m->t0 + tsc_khz * cfg.report_ms;
}

static void mw_report(struct memwrite *m, u64 now, u64 passes)
{
    report(m->cpu, now, m->t0, m->written, m->maxgap, m->gapend, m->stalls, passes);
    m->written = 0;
    memset(m->stalls, 0, sizeof(m->stalls));
    m->maxgap = 0;
    m->gapend = 0;
    m->next_report = now + tsc_khz * cfg.report_ms;
    m->reports++;
    m->last = rdtsc();
}

static int mw_more(const struct memwrite *m)
{
    return cfg.passes == 0 || m->pass <= cfg.passes;
}

/* Pass 2 on with hot < 100: checks the next cold page against its pass-1 value. */
static void mw_check_cold(struct memwrite *m)
{
    if (m->cj == m->hot)
        m->cc = cursor_at(m->first + m->hot);
    if (m->cc.off == ranges[m->cc.r].pages) {
        m->cc.r++;
        m->cc.off = 0;
    }
    u64 found = *(volatile u64 *)(ranges[m->cc.r].base + m->cc.off * PAGE);
    m->cc.off++;
    if (found != m->cj + 1) {
        if (m->corrupt++ < MAX_CORRUPT_LINES)
            report_corrupt(m->cpu, m->first + m->cj, m->cj + 1, found);
        m->last = rdtsc();
    }
    if (++m->cj == m->n)
        m->cj = m->hot;
}

/* Writes up to `budget` pages. When the rate limit is reached it spins until
 * the next second if may_wait, else returns and holds off until then.
 * Returns 0 once all passes are done. */
static int mw_step(struct memwrite *m, u64 budget, int may_wait)
{
    if (m->rate_hold) {
        u64 now = rdtsc();
        if (now < m->next_report)
            return 1;
        m->rate_hold = 0;
        mw_report(m, now, m->hold_passes);
    }
    for (; budget && mw_more(m); budget--) {
        if (m->j == 0)
            m->c = cursor_at(m->first);
        if (m->c.off == ranges[m->c.r].pages) {
            m->c.r++;
            m->c.off = 0;
        }
        volatile u64 *word = (volatile u64 *)(ranges[m->c.r].base + m->c.off * PAGE);
        m->c.off++;
        /* Pass 1 writes j + 1 to all n pages; pass p >= 2 writes
         * n + (p-2)*hot + j + 1 to the hot pages only (with hot=100:
         * (p-1)*n + j + 1 throughout). */
        u64 value = m->pass == 1 ? m->j + 1 : m->n + (m->pass - 2) * m->hot + m->j + 1;
        if (m->pass > 1) {
            u64 prev = value - (m->pass == 2 ? m->n : m->hot);
            u64 found = *word;
            if (found != prev) {
                if (m->corrupt++ < MAX_CORRUPT_LINES)
                    report_corrupt(m->cpu, m->first + m->j, prev, found);
                m->last = rdtsc();
            }
        }
        *word = value;
        m->written++;
        if (m->pass > 1 && m->hot < m->n && m->j % COLD_CHECK_EVERY == 0)
            mw_check_cold(m);
        u64 passes_done = m->pass - 1;
        if (++m->j == (m->pass == 1 ? m->n : m->hot)) {
            m->j = 0;
            m->pass++;
        }

        u64 now = rdtsc();
        if (now - m->last > m->maxgap) {
            m->maxgap = now - m->last;
            m->gapend = now;
        }
        if (now - m->last >= m->stall_min)
            count_stall(m->stalls, now - m->last);
        m->last = now;
        /* rate= is per second: per report, its share of a second. */
        u64 cap = cfg.rate * cfg.report_ms / 1000;
        if (cfg.rate && cap < 1)
            cap = 1;
        if (now >= m->next_report || (cfg.rate && m->written >= cap)) {
            if (cfg.rate && m->written >= cap) {
                if (!may_wait && rdtsc() < m->next_report) {
                    m->rate_hold = 1;
                    m->hold_passes = passes_done;
                    return 1;
                }
                while ((now = rdtsc()) < m->next_report)
                    __asm__ volatile("pause");
            }
            mw_report(m, now, passes_done);
        }
    }
    return mw_more(m) || m->rate_hold;
}

static void memwrite(u32 cpu, u32 slice, u32 nslices)
{
    struct memwrite m;
    mw_init(&m, cpu, slice, nslices);
    while (mw_step(&m, ~0ULL, 1))
        ;
    if (m.corrupt)
        __atomic_fetch_add(&corrupt_total, m.corrupt, __ATOMIC_RELAXED);
    __atomic_fetch_add(&finished, 1, __ATOMIC_RELEASE);
}

/* ---- diskwrite ------------------------------------------------------ */

/* CPU 0 of workload=diskwrite: the disk loop alone, or (on a single CPU)
 * alternately one disk block and INTERLEAVE_PAGES memwrite pages. Each side
 * leaves the other's report lines out of its own gaps. */
static void diskwrite_cpu0(void)
{
    struct memwrite m;
    int disk_left = 1, mem_left = ncpus == 1;
    memset(&m, 0, sizeof(m));
    if (mem_left)
        mw_init(&m, 0, 0, 1);
    while (disk_left || mem_left) {
        if (disk_left) {
            u64 r = disk_reports();
            disk_left = disk_step();
            if (mem_left && disk_reports() != r)
                m.last = rdtsc();
        }
        if (mem_left) {
            u64 r = m.reports;
            mem_left = mw_step(&m, INTERLEAVE_PAGES, !disk_left);
            if (disk_left && m.reports != r)
                disk_resync();
        }
    }
    u64 bad = disk_corrupt() + (ncpus == 1 ? m.corrupt : 0);
    if (bad)
        __atomic_fetch_add(&corrupt_total, bad, __ATOMIC_RELAXED);
    __atomic_fetch_add(&finished, 1, __ATOMIC_RELEASE);
}

/* ---- entry ---------------------------------------------------------- */

/* From the ring-0 part: a ring-3 CPUID on PVM hosts runs natively and reports the
 * host's CPU count, which made the wait below stop early (or wait for nobody). */
static u32 expected_cpus(void)
{
    return hv_cpus ? hv_cpus : 1;
}

static void wait_for_aps(void)
{
    u32 want = expected_cpus();
    if (want > MAX_CPUS)
        want = MAX_CPUS;
    if (want <= 1)
        return;
    syscall2(SYS_START_APS, 0, 0);
    u64 deadline = rdtsc() + tsc_khz * 500; /* 0.5 s */
    while (checked_in + 1 < want && rdtsc() < deadline)
        __asm__ volatile("pause");
}

/* Reserves expected[] for the disk loop at the bottom of the workload RAM,
 * rounded up to 2 MiB; memwrite's region starts above it. */
static u64 reserve_expected(u64 blocks)
{
    const u64 align = 2ULL << 20;
    u64 bytes = (blocks * sizeof(u64) + align - 1) & ~(align - 1);
    if (!nranges || ranges[0].pages * PAGE <= bytes) {
        struct buf b = { .n = 0 };
        put_str(&b, "refguest: no RAM for the disk's expected[]");
        emit(&b);
        sys_exit(4);
    }
    u64 addr = ranges[0].base;
    ranges[0].base += bytes;
    ranges[0].pages -= bytes / PAGE;
    total_pages -= bytes / PAGE;
    return addr;
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
    const char *cmdline = (const char *)si->cmdline_paddr;
    cfg.hot = 100;
    cfg.report_ms = 1000;
    if (cmdline)
        parse_cmdline(cmdline);
    u64 khz = detect_tsc_khz();
    if (!cfg.tsc_khz)
        cfg.tsc_khz = khz ? khz : 2000000;
    tsc_khz = cfg.tsc_khz;
    collect_ranges(si);

    const int disk = cfg.workload == WL_DISKWRITE;
    struct disk_setup ds;
    u64 expected_addr = 0;
    if (disk) {
        disk_setup(cmdline, cfg.disk_region ? cfg.disk_region : 64ULL << 20, cfg.passes, &ds);
        expected_addr = reserve_expected(ds.blocks);
        disk_place_expected(expected_addr);
    }
    if (cfg.region) {
        u64 want = cfg.region / PAGE;
        if (want < total_pages)
            total_pages = want;
    } else if (total_pages > (256ULL << 20) / PAGE) {
        total_pages = (256ULL << 20) / PAGE;
    }

    if (cfg.workload == WL_MEMWRITE || disk)
        wait_for_aps();
    ncpus = 1 + checked_in;
    /* memwrite slices: one per CPU, but CPU 0 only joins in on its own. */
    u32 slices = disk && ncpus > 1 ? ncpus - 1 : ncpus;
    if (total_pages < slices)
        total_pages = 0;

    struct buf b = { .n = 0 };
    static const char *const names[] = { "memwrite", "idle", "exit", "reset", "diskwrite" };
    put_kv(&b, "refguest: ready cpus=", ncpus);
    put_kv(&b, " ram_mib=", ram_bytes >> 20);
    put_str(&b, " workload=");
    put_str(&b, names[cfg.workload]);
    put_kv(&b, " region_mib=", total_pages * PAGE >> 20);
    if (cfg.hot != 100)
        put_kv(&b, " hot=", cfg.hot);
    put_kv(&b, " passes=", cfg.passes);
    put_kv(&b, " tsc_khz=", cfg.tsc_khz);
    if (!khz)
        put_str(&b, " (tsc_khz guessed)");
    if (disk) {
        put_kv(&b, " disk_mib=", ds.blocks * PAGE >> 20);
        put_kv(&b, " disk_capacity_sectors=", ds.capacity);
        put_str(&b, " disk_mmio=");
        put_hexnum(&b, ds.mmio_base);
        put_str(&b, " disk_expected=");
        put_hexnum(&b, expected_addr);
        if (ds.clamped)
            put_str(&b, " (disk_region clamped to the device)");
    }
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
    if (disk)
        diskwrite_cpu0();
    else
        memwrite(0, 0, ncpus);
    while (finished < ncpus)
        __asm__ volatile("pause");
    struct buf d = { .n = 0 };
    put_kv(&d, "refguest: done cpus=", ncpus);
    put_kv(&d, " passes=", cfg.passes);
    put_kv(&d, " corrupt=", corrupt_total);
    if (disk)
        put_kv(&d, " disk_passes=", disk_passes());
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
    if (cpu < ncpus) {
        if (cfg.workload == WL_DISKWRITE)
            memwrite((u32)cpu, (u32)cpu - 1, ncpus - 1);
        else
            memwrite((u32)cpu, (u32)cpu, ncpus);
    }
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
