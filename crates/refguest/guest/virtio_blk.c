/*
 * Reference guest: virtio-blk over virtio-mmio (virtio 1.x, version 2 only).
 *
 * Runs at ring 3: the registers are plain memory accesses to guest-physical
 * addresses outside RAM (identity mapped, user-accessible), which trap to the
 * VMM like any MMIO. One split virtqueue (queue 0) of at most 16 entries, one
 * request in flight, completion by polling the used ring (the guest runs with
 * IF=0, so the interrupt line is only acknowledged, never taken). Only
 * VIRTIO_F_VERSION_1 is negotiated.
 */
#include "virtio_blk.h"

/* virtio-mmio registers (virtio 1.x, section 4.2.2). */
#define VIRTIO_MMIO_MAGIC_VALUE         0x000
#define VIRTIO_MMIO_VERSION             0x004
#define VIRTIO_MMIO_DEVICE_ID           0x008
#define VIRTIO_MMIO_DEVICE_FEATURES     0x010
#define VIRTIO_MMIO_DEVICE_FEATURES_SEL 0x014
#define VIRTIO_MMIO_DRIVER_FEATURES     0x020
#define VIRTIO_MMIO_DRIVER_FEATURES_SEL 0x024
#define VIRTIO_MMIO_QUEUE_SEL           0x030
#define VIRTIO_MMIO_QUEUE_NUM_MAX       0x034
#define VIRTIO_MMIO_QUEUE_NUM           0x038
#define VIRTIO_MMIO_QUEUE_READY         0x044
#define VIRTIO_MMIO_QUEUE_NOTIFY        0x050
#define VIRTIO_MMIO_INTERRUPT_STATUS    0x060
#define VIRTIO_MMIO_INTERRUPT_ACK       0x064
#define VIRTIO_MMIO_STATUS              0x070
#define VIRTIO_MMIO_QUEUE_DESC_LOW      0x080
#define VIRTIO_MMIO_QUEUE_DESC_HIGH     0x084
#define VIRTIO_MMIO_QUEUE_DRIVER_LOW    0x090
#define VIRTIO_MMIO_QUEUE_DRIVER_HIGH   0x094
#define VIRTIO_MMIO_QUEUE_DEVICE_LOW    0x0a0
#define VIRTIO_MMIO_QUEUE_DEVICE_HIGH   0x0a4
#define VIRTIO_MMIO_CONFIG_GENERATION   0x0fc
#define VIRTIO_MMIO_CONFIG              0x100

#define VIRTIO_MAGIC            0x74726976  /* "virt" */
#define VIRTIO_ID_BLOCK         2

#define STATUS_ACKNOWLEDGE      1
#define STATUS_DRIVER           2
#define STATUS_DRIVER_OK        4
#define STATUS_FEATURES_OK      8
#define STATUS_FAILED           128

#define VIRTIO_F_VERSION_1_HI   (1u << 0)   /* feature bit 32 */

#define VIRTQ_DESC_F_NEXT       1
#define VIRTQ_DESC_F_WRITE      2

#define QMAX                    16

struct virtq_desc {
    u64 addr;
    u32 len;
    u16 flags;
    u16 next;
};

struct virtq_avail {
    u16 flags;
    u16 idx;
    u16 ring[QMAX];
    u16 used_event;
};

struct virtq_used_elem {
    u32 id;
    u32 len;
};

struct virtq_used {
    u16 flags;
    u16 idx;
    struct virtq_used_elem ring[QMAX];
    u16 avail_event;
};

struct blk_req_hdr {
    u32 type;
    u32 reserved;
    u64 sector;
};

/* The one queue and its request header/status, in guest RAM (identity
 * mapped, so their addresses are their guest-physical addresses). */
static struct {
    struct virtq_desc desc[QMAX];           /* 16-byte alignment needed */
    struct virtq_avail avail;               /* 2 */
    struct virtq_used used __attribute__((aligned(4)));
    struct blk_req_hdr hdr __attribute__((aligned(16)));
    u8 status;
} vq __attribute__((aligned(4096)));

static inline void barrier(void) { __asm__ volatile("mfence" ::: "memory"); }

static inline u32 rd32(const struct vblk *d, u32 off) { return *(volatile u32 *)(d->regs + off); }
static inline void wr32(const struct vblk *d, u32 off, u32 v) { *(volatile u32 *)(d->regs + off) = v; }

/* ---- command line --------------------------------------------------- */

static int key_is(const char *k, u32 n, const char *lit)
{
    u32 i = 0;
    for (; i < n && lit[i]; i++)
        if (k[i] != lit[i])
            return 0;
    return i == n && !lit[i];
}

int vblk_each_cmdline_device(const char *s, int (*fn)(u64 base, u64 size, u32 irq, void *arg),
                             void *arg)
{
    while (s && *s) {
        while (*s == ' ')
            s++;
        const char *k = s;
        while (*s && *s != '=' && *s != ' ')
            s++;
        u32 kn = s - k;
        if (*s != '=')
            continue;
        const char *v = ++s;
        while (*s && *s != ' ')
            s++;
        u32 vn = s - v;
        if (!key_is(k, kn, "virtio_mmio.device"))
            continue;
        /* <size>@<base>:<irq>[:<id>] */
        u32 used;
        u64 size = parse_num(v, vn, &used);
        if (used == 0 || used >= vn || v[used] != '@')
            continue;
        v += used + 1;
        vn -= used + 1;
        u64 base = parse_num(v, vn, &used);
        if (used == 0 || used >= vn || v[used] != ':')
            continue;
        v += used + 1;
        vn -= used + 1;
        u32 irq = (u32)parse_num(v, vn, &used);
        if (used == 0 || base == 0)
            continue;
        int r = fn(base, size, irq, arg);
        if (r)
            return r;
    }
    return 0;
}

/* ---- initialisation ------------------------------------------------- */

const char *vblk_err_str(enum vblk_err e)
{
    switch (e) {
    case VBLK_OK: return "ok";
    case VBLK_NOT_VIRTIO: return "bad magic";
    case VBLK_NOT_MODERN: return "not virtio-mmio version 2";
    case VBLK_NOT_BLOCK: return "not a block device";
    case VBLK_NO_VERSION_1: return "VIRTIO_F_VERSION_1 not offered";
    case VBLK_FEATURES_REFUSED: return "FEATURES_OK refused";
    case VBLK_QUEUE_UNUSABLE: return "queue 0 unusable";
    }
    return "?";
}

static void set_addr(struct vblk *d, u32 lo_reg, const void *p)
{
    u64 a = (u64)p;
    wr32(d, lo_reg, (u32)a);
    wr32(d, lo_reg + 4, (u32)(a >> 32));
}

static enum vblk_err fail(struct vblk *d, enum vblk_err e)
{
    wr32(d, VIRTIO_MMIO_STATUS, rd32(d, VIRTIO_MMIO_STATUS) | STATUS_FAILED);
    return e;
}

enum vblk_err vblk_init(struct vblk *d, u64 base)
{
    memset(d, 0, sizeof(*d));
    d->regs = (volatile u8 *)base;
    if (rd32(d, VIRTIO_MMIO_MAGIC_VALUE) != VIRTIO_MAGIC)
        return VBLK_NOT_VIRTIO;
    if (rd32(d, VIRTIO_MMIO_VERSION) != 2)
        return VBLK_NOT_MODERN;
    if (rd32(d, VIRTIO_MMIO_DEVICE_ID) != VIRTIO_ID_BLOCK)
        return VBLK_NOT_BLOCK;

    /* Reset, then announce ourselves. */
    wr32(d, VIRTIO_MMIO_STATUS, 0);
    while (rd32(d, VIRTIO_MMIO_STATUS) != 0)
        __asm__ volatile("pause");
    wr32(d, VIRTIO_MMIO_STATUS, STATUS_ACKNOWLEDGE);
    wr32(d, VIRTIO_MMIO_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);

    /* Features: VIRTIO_F_VERSION_1 is required, and the only one we take. */
    wr32(d, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
    u32 hi = rd32(d, VIRTIO_MMIO_DEVICE_FEATURES);
    if (!(hi & VIRTIO_F_VERSION_1_HI))
        return fail(d, VBLK_NO_VERSION_1);
    wr32(d, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
    wr32(d, VIRTIO_MMIO_DRIVER_FEATURES, 0);
    wr32(d, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    wr32(d, VIRTIO_MMIO_DRIVER_FEATURES, VIRTIO_F_VERSION_1_HI);
    wr32(d, VIRTIO_MMIO_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
    if (!(rd32(d, VIRTIO_MMIO_STATUS) & STATUS_FEATURES_OK))
        return fail(d, VBLK_FEATURES_REFUSED);

    /* Queue 0: the largest power of two <= min(QueueNumMax, QMAX), at least 4
     * (a request takes 3 descriptors). */
    wr32(d, VIRTIO_MMIO_QUEUE_SEL, 0);
    if (rd32(d, VIRTIO_MMIO_QUEUE_READY) != 0)
        return fail(d, VBLK_QUEUE_UNUSABLE);
    u32 max = rd32(d, VIRTIO_MMIO_QUEUE_NUM_MAX);
    u32 n = QMAX;
    while (n > max)
        n >>= 1;
    if (n < 4)
        return fail(d, VBLK_QUEUE_UNUSABLE);
    d->qsize = (u16)n;
    memset(&vq, 0, sizeof(vq));
    barrier();
    wr32(d, VIRTIO_MMIO_QUEUE_NUM, n);
    set_addr(d, VIRTIO_MMIO_QUEUE_DESC_LOW, vq.desc);
    set_addr(d, VIRTIO_MMIO_QUEUE_DRIVER_LOW, &vq.avail);
    set_addr(d, VIRTIO_MMIO_QUEUE_DEVICE_LOW, &vq.used);
    wr32(d, VIRTIO_MMIO_QUEUE_READY, 1);

    /* Capacity: u64 at config offset 0, read until the generation is stable. */
    u32 gen, lo, cap_hi;
    do {
        gen = rd32(d, VIRTIO_MMIO_CONFIG_GENERATION);
        lo = rd32(d, VIRTIO_MMIO_CONFIG);
        cap_hi = rd32(d, VIRTIO_MMIO_CONFIG + 4);
    } while (gen != rd32(d, VIRTIO_MMIO_CONFIG_GENERATION));
    d->capacity = ((u64)cap_hi << 32) | lo;

    wr32(d, VIRTIO_MMIO_STATUS,
         STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
    return VBLK_OK;
}

/* ---- requests ------------------------------------------------------- */

static void report_stall(u32 type, u64 sector)
{
    struct buf b = { .n = 0 };
    put_kv(&b, "refguest: disk request stalled (still waiting) type=", type);
    put_kv(&b, " sector=", sector);
    emit(&b);
}

u8 vblk_request(struct vblk *d, u32 type, u64 sector, void *buf, u32 len)
{
    vq.hdr.type = type;
    vq.hdr.reserved = 0;
    vq.hdr.sector = sector;
    vq.status = 0xff;   /* the device overwrites it */

    vq.desc[0].addr = (u64)&vq.hdr;
    vq.desc[0].len = sizeof(vq.hdr);
    vq.desc[0].flags = VIRTQ_DESC_F_NEXT;
    vq.desc[0].next = len ? 1 : 2;
    if (len) {
        vq.desc[1].addr = (u64)buf;
        vq.desc[1].len = len;
        vq.desc[1].flags = VIRTQ_DESC_F_NEXT | (type == VIRTIO_BLK_T_IN ? VIRTQ_DESC_F_WRITE : 0);
        vq.desc[1].next = 2;
    }
    vq.desc[2].addr = (u64)&vq.status;
    vq.desc[2].len = 1;
    vq.desc[2].flags = VIRTQ_DESC_F_WRITE;
    vq.desc[2].next = 0;
    vq.avail.ring[d->avail_idx % d->qsize] = 0;     /* chain head */
    barrier();          /* descriptors and ring entry before the index */
    d->avail_idx++;
    *(volatile u16 *)&vq.avail.idx = d->avail_idx;
    barrier();          /* index before the notification */
    wr32(d, VIRTIO_MMIO_QUEUE_NOTIFY, 0);

    /* Poll. A wait past 5 s prints one warning (keeps waiting); the clock
     * jumps after a restore, so the 5 s restart once when first exceeded. */
    u64 start = rdtsc(), limit = tsc_khz * 5000;
    int rearmed = 0, warned = 0;
    while (*(volatile u16 *)&vq.used.idx == d->used_idx) {
        __asm__ volatile("pause");
        u64 now = rdtsc();
        if (!warned && now - start > limit) {
            if (!rearmed) {
                rearmed = 1;
                start = now;
            } else {
                warned = 1;
                report_stall(type, sector);
            }
        }
    }
    barrier();          /* the used entry and our buffers after the index */
    u32 id = vq.used.ring[d->used_idx % d->qsize].id;
    d->used_idx++;
    u32 isr = rd32(d, VIRTIO_MMIO_INTERRUPT_STATUS);
    if (isr)
        wr32(d, VIRTIO_MMIO_INTERRUPT_ACK, isr);
    if (id != 0)
        return 0xfe;    /* not our chain: the device is confused */
    return *(volatile u8 *)&vq.status;
}
