/*
 * Reference guest: a minimal virtio-blk driver over the virtio-mmio transport
 * (modern, version 2 only), polled, one request in flight, run at ring 3.
 */
#ifndef REFGUEST_VIRTIO_BLK_H
#define REFGUEST_VIRTIO_BLK_H
#include "guest.h"

#define VIRTIO_BLK_T_IN     0   /* read */
#define VIRTIO_BLK_T_OUT    1   /* write */
#define VIRTIO_BLK_T_FLUSH  4

#define VBLK_SECTOR         512

/* Why a transport was not taken (vblk_init's result). */
enum vblk_err {
    VBLK_OK = 0,
    VBLK_NOT_VIRTIO,        /* MagicValue is not "virt" */
    VBLK_NOT_MODERN,        /* Version != 2 */
    VBLK_NOT_BLOCK,         /* DeviceID != 2 */
    VBLK_NO_VERSION_1,      /* VIRTIO_F_VERSION_1 not offered */
    VBLK_FEATURES_REFUSED,  /* FEATURES_OK did not stick */
    VBLK_QUEUE_UNUSABLE,    /* queue 0 missing, too small or already live */
};

struct vblk {
    volatile u8 *regs;      /* MMIO base */
    u64 capacity;           /* sectors */
    u16 qsize;
    u16 avail_idx;          /* next avail ring index (free running) */
    u16 used_idx;           /* next used ring index we expect */
};

/* Calls fn(base, size, irq) for each virtio_mmio.device=<size>@<base>:<irq>
 * on the command line, in order, until fn returns non-zero; returns that. */
int vblk_each_cmdline_device(const char *cmdline, int (*fn)(u64 base, u64 size, u32 irq, void *arg),
                             void *arg);

/* Resets and initialises the device at base (see enum vblk_err). */
enum vblk_err vblk_init(struct vblk *d, u64 base);
const char *vblk_err_str(enum vblk_err e);

/* One request, waited for by polling: type VIRTIO_BLK_T_*, len a multiple of
 * 512 (0 for FLUSH). Returns the device's status byte (0 = OK). */
u8 vblk_request(struct vblk *d, u32 type, u64 sector, void *buf, u32 len);

#endif
