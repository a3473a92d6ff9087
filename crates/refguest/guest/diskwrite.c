/*
 * Reference guest: the disk loop of workload=diskwrite (run by CPU 0).
 *
 * Pass p writes every 4 KiB block j of the region in order. Block contents:
 *   word 0   DISK_MAGIC ("REFGDISK")
 *   word 1   seq = (p-1)*n + j + 1
 *   word 2   j
 *   word 3.. pattern(seq, i), i = word index
 * and expected[j] = seq is remembered in guest RAM (placed by user.c, so it is
 * part of any snapshot of the VM). From pass 2 on, block j is read back before
 * it is rewritten and must match expected[j] exactly. A FLUSH follows each
 * pass. Once a second a report line gives the blocks written, the longest gap
 * between two consecutive block completions and the completed passes.
 */
#include "virtio_blk.h"

#define DISK_MAGIC  0x4b53494447464552ULL   /* bytes "REFGDISK" */
#define WORDS       (PAGE / sizeof(u64))
#define SECTORS_PER_BLOCK (PAGE / VBLK_SECTOR)

static struct vblk dev;
static u64 wbuf[WORDS] __attribute__((aligned(4096)));
static u64 rbuf[WORDS] __attribute__((aligned(4096)));

static struct {
    u64 n;              /* blocks */
    u64 passes;         /* 0 = forever */
    u64 *expected;      /* n entries */
    u64 pass, j;        /* next block: block j of pass `pass` */
    u64 passes_done;
    int started;
    u64 t0, last, next_report, maxgap, written, corrupt, reports;
} st;

static u64 pattern(u64 seq, u64 i)
{
    u64 x = seq * 0x9e3779b97f4a7c15ULL + i * 0xbf58476d1ce4e5b9ULL;
    return x ^ (x >> 29);
}

/* ---- set-up --------------------------------------------------------- */

struct probe {
    u32 tried;
    u64 last_base;
    enum vblk_err last_err;
};

static int try_device(u64 base, u64 size, u32 irq, void *arg)
{
    struct probe *p = arg;
    (void)size;
    (void)irq;
    enum vblk_err e = vblk_init(&dev, base);
    if (e == VBLK_OK)
        return 1;
    p->tried++;
    p->last_base = base;
    p->last_err = e;
    return 0;
}

void disk_setup(const char *cmdline, u64 region, u64 passes, struct disk_setup *out)
{
    struct probe p = { 0, 0, VBLK_OK };
    if (!vblk_each_cmdline_device(cmdline, try_device, &p)) {
        struct buf b = { .n = 0 };
        put_str(&b, "refguest: FAULT no virtio-blk device");
        if (p.tried) {
            put_kv(&b, " (virtio_mmio.device entries tried=", p.tried);
            put_str(&b, ", last ");
            put_hexnum(&b, p.last_base);
            put_str(&b, ": ");
            put_str(&b, vblk_err_str(p.last_err));
            put_str(&b, ")");
        } else {
            put_str(&b, " (no virtio_mmio.device= on the command line)");
        }
        emit(&b);
        sys_exit(3);
    }
    u64 n = region / PAGE, fits = dev.capacity / SECTORS_PER_BLOCK;
    out->mmio_base = (u64)dev.regs;
    out->capacity = dev.capacity;
    out->clamped = fits < n;
    if (fits < n)
        n = fits;
    if (n == 0) {
        struct buf b = { .n = 0 };
        put_kv(&b, "refguest: FAULT virtio-blk device too small: sectors=", dev.capacity);
        emit(&b);
        sys_exit(3);
    }
    out->blocks = n;
    st.n = n;
    st.passes = passes;
    st.pass = 1;
}

void disk_place_expected(u64 addr) { st.expected = (u64 *)addr; }

/* ---- the loop ------------------------------------------------------- */

static void io(u32 type, u64 block, u64 *buf)
{
    u8 s = vblk_request(&dev, type, block * SECTORS_PER_BLOCK, buf, buf ? PAGE : 0);
    if (s == 0)
        return;
    static const char *const names[] = { "read", "write", "?", "?", "flush" };
    struct buf b = { .n = 0 };
    put_str(&b, "refguest: DISKERROR op=");
    put_str(&b, type < 5 ? names[type] : "?");
    put_kv(&b, " block=", block);
    put_kv(&b, " status=", s);
    emit(&b);
    sys_exit(3);
}

static void report_corrupt(u64 block, u64 expected, u64 found, const char *why)
{
    struct buf b = { .n = 0 };
    put_kv(&b, "refguest: CORRUPT disk block=", block);
    put_kv(&b, " expected=", expected);
    put_kv(&b, " found=", found);
    if (why) {
        put_str(&b, " bad=");
        put_str(&b, why);
    }
    emit(&b);
}

/* Checks rbuf holds block j as written with sequence number seq. */
static void check(u64 j, u64 seq)
{
    const char *why = 0;
    if (rbuf[1] != seq)
        why = "";
    else if (rbuf[0] != DISK_MAGIC)
        why = "magic";
    else if (rbuf[2] != j)
        why = "block";
    else
        for (u64 i = 3; i < WORDS && !why; i++)
            if (rbuf[i] != pattern(seq, i))
                why = "pattern";
    if (!why)
        return;
    if (st.corrupt++ < MAX_CORRUPT_LINES)
        report_corrupt(j, seq, rbuf[1], *why ? why : 0);
    st.last = rdtsc();
}

static void report(u64 now)
{
    struct buf b = { .n = 0 };
    put_str(&b, "refguest: disk");
    put_time(&b, now - st.t0);
    put_kv(&b, " blocks=", st.written);
    put_kv(&b, " maxgap_us=", st.maxgap * 1000 / tsc_khz);
    put_kv(&b, " passes=", st.passes_done);
    emit(&b);
    st.written = 0;
    st.maxgap = 0;
    st.next_report = now + tsc_khz * 1000;
    st.reports++;
    st.last = rdtsc();
}

int disk_step(void)
{
    if (!st.started) {
        st.started = 1;
        st.t0 = st.last = rdtsc();
        st.next_report = st.t0 + tsc_khz * 1000;
    }
    if (st.passes && st.pass > st.passes)
        return 0;
    u64 j = st.j, seq = (st.pass - 1) * st.n + j + 1;
    if (st.pass > 1) {
        io(VIRTIO_BLK_T_IN, j, rbuf);
        check(j, st.expected[j]);
    }
    wbuf[0] = DISK_MAGIC;
    wbuf[1] = seq;
    wbuf[2] = j;
    for (u64 i = 3; i < WORDS; i++)
        wbuf[i] = pattern(seq, i);
    io(VIRTIO_BLK_T_OUT, j, wbuf);
    st.expected[j] = seq;
    st.written++;
    if (++st.j == st.n) {
        io(VIRTIO_BLK_T_FLUSH, 0, 0);
        st.j = 0;
        st.pass++;
        st.passes_done++;
    }

    u64 now = rdtsc();
    if (now - st.last > st.maxgap)
        st.maxgap = now - st.last;
    st.last = now;
    if (now >= st.next_report)
        report(now);
    return !st.passes || st.pass <= st.passes;
}

void disk_resync(void) { st.last = rdtsc(); }
u64 disk_reports(void) { return st.reports; }
u64 disk_corrupt(void) { return st.corrupt; }
u64 disk_passes(void) { return st.passes_done; }
