/* virtio-blk device (id 2): one request queue over a host disk image, I/O through the device's own io_uring. */
#ifndef SMOLVM_VIRTIO_BLK_H
#define SMOLVM_VIRTIO_BLK_H

#include <stdbool.h>
#include <stdint.h>

#include "virtio/queue.h"

struct vm;
struct blk;

#define BLK_SECTOR 512u
#define BLK_QUEUE_MAX 256u                /* QueueNumMax; also the most requests in flight */
#define BLK_SEG_MAX (VIRTQ_MAX_SEGS - 2u) /* data segments per request (header and status apart) */
#define BLK_MAX_DATA (128u << 20)         /* bytes of data one request may carry */
#define BLK_SERIAL_MAX 20u                /* VIRTIO_BLK_ID_BYTES */

struct blk_config {
	uint64_t base; /* MMIO window (VIRTIO_MMIO_SIZE bytes) */
	uint32_t gsi;
	const char *path; /* regular file or block device; size a multiple of BLK_SECTOR */
	bool read_only;   /* opened O_RDONLY, VIRTIO_BLK_F_RO offered, writes fail with IOERR */
	const char *serial; /* GET_ID answer, at most BLK_SERIAL_MAX bytes; NULL = empty */
};

/*
 * Create the device: open cfg->path (O_RDWR, or O_RDONLY when read_only),
 * take an advisory flock on it (exclusive for read-write, shared for
 * read-only: -EBUSY if another user holds a conflicting one), set up an
 * io_uring whose completion eventfd is watched on vm->loop, and register the
 * transport (virtio_mmio_init, so vm_add_mmio). The disk's capacity is fixed
 * here from the file's size. vm->loop must be set; call before the vCPUs and
 * evloop_run() start. Returns 0, -EINVAL (no loop or path, size not a multiple
 * of BLK_SECTOR, not a regular file or block device, serial too long), or the
 * -errno of the failing step (-ENOENT, -EACCES, ...). *out is NULL on error.
 *
 * Running: guest kicks and I/O completions are handled on the loop thread
 * under the transport lock; requests go to the kernel asynchronously, up to
 * BLK_QUEUE_MAX at once, reading and writing guest RAM in place. Every request
 * is checked (layout, direction, sector range, length) and a bad one gets
 * VIRTIO_BLK_S_IOERR or _UNSUPP; a chain the queue rejects or one without a
 * writable status byte marks the device DEVICE_NEEDS_RESET. A device reset
 * (on the vCPU thread) waits for the requests in flight before it returns, so
 * nothing touches guest memory after the reset.
 *
 * The guest learns of the disk from virtio_mmio_cmdline(base, gsi) on the
 * kernel command line; Linux names virtio disks /dev/vda, vdb, ... in probe
 * order and shows the serial in /sys/block/vdX/serial.
 */
int blk_new(struct vm *vm, const struct blk_config *cfg, struct blk **out);

/*
 * Wait for requests still in flight, then undo blk_new (loop watch, io_uring,
 * transport, file). Only once no vCPU runs and the loop has stopped (or on the
 * loop thread); vm->mem must still be mapped. NULL is allowed.
 */
void blk_free(struct blk *b);

/* The disk's size in BLK_SECTOR sectors, as the guest sees it. Any thread. */
uint64_t blk_capacity(const struct blk *b);

struct snap_writer;
struct snap_reader;

/*
 * Snapshot: with the VM paused (no vCPU runs; any thread, usually the loop),
 * finish every request the guest has posted (waiting for the kernel), so the
 * used ring in guest memory is complete and nothing is in flight, then append
 * the transport (SNAP_DEV_MMIO/index) and device (SNAP_DEV_BLK/index)
 * sections. `index` is the device's virtio-mmio window index
 * (virtio_mmio_alloc), distinct from every other device's. The disk file is not copied: guest
 * writes acknowledged so far are in it (page cache), nothing more.
 */
void blk_save(struct blk *b, struct snap_writer *w, uint32_t index);

/*
 * After blk_new() in a restoring VMM, before vCPUs run: put the sections of
 * blk_save() back. The image must have the capacity and read-only setting it
 * had, except that a writable disk empty (0 sectors) at save time may come
 * back with any size: the guest then gets a config-change interrupt and reads
 * the new capacity. Once the loop runs, the guest gets one used-ring
 * interrupt, in case the one raised at save time is not part of the
 * snapshot. Returns 0 or
 * -EINVAL (section missing, different disk, rings outside RAM).
 */
int blk_restore(struct blk *b, const struct snap_reader *r, uint32_t index);

#endif
