/* Split virtqueue (virtio 1.x, no packed ring, no indirect descriptors, no EVENT_IDX) over guest RAM. */
#ifndef SMOLVM_VIRTIO_QUEUE_H
#define SMOLVM_VIRTIO_QUEUE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

struct vm;

/* Longest descriptor chain a device accepts (a block device offers seg_max <= this - 2). */
#define VIRTQ_MAX_SEGS 64

/* One descriptor of a popped chain, already checked by vm_gpa(): ptr is valid for len bytes. */
struct virtq_seg {
	uint8_t *ptr;
	uint32_t len;
	bool write; /* device-writable */
};

/*
 * A popped chain. Readable segments come first (seg[0..n_read)), writable
 * ones after (seg[n_read..n)); the guest must order them so, pop enforces it.
 */
struct virtq_chain {
	uint16_t head; /* give it back to virtq_push() */
	uint16_t n, n_read;
	uint64_t read_len, write_len; /* byte totals of each kind */
	struct virtq_seg seg[VIRTQ_MAX_SEGS];
};

/*
 * Queue state. The transport fills size/desc_gpa/avail_gpa/used_gpa from the
 * driver's register writes, then calls virtq_enable(). All functions below are
 * called with the owning device's lock held; the guest may touch the rings
 * concurrently from other CPUs, which the barriers inside account for.
 */
struct virtq {
	struct vm *vm;
	uint16_t size; /* QueueNum as written by the driver; validated by virtq_enable() */
	uint64_t desc_gpa, avail_gpa, used_gpa;
	bool ready;  /* enabled and rings resolved */
	bool broken; /* the guest broke the ring: every call fails until virtq_reset() */
	uint16_t last_avail, used_idx, inflight;
	struct vring_desc *desc; /* guest-shared: only read/written with __atomic ops */
	struct vring_avail *avail;
	struct vring_used *used;
};

/* Forget everything (device reset / QueueReady = 0); keeps q->vm. */
void virtq_reset(struct virtq *q);

/*
 * Validate the staged layout and resolve the three rings through vm_gpa():
 * size a power of two in [1, max], rings aligned (16/2/4) and wholly in RAM.
 * Returns 0, or -EINVAL / -EFAULT (queue stays not ready).
 */
int virtq_enable(struct virtq *q, uint16_t max);

/* True when the driver has made at least one chain available (no validation). */
bool virtq_has_avail(struct virtq *q);

/*
 * Take the next available chain into *c, every segment gated by vm_gpa().
 * Returns 1 with a chain, 0 when the ring is empty, or -EINVAL (bad avail
 * idx, head or next index >= size, chain longer than the queue or than
 * VIRTQ_MAX_SEGS, INDIRECT flag, readable after writable) / -EFAULT (buffer
 * outside RAM) / -EIO (queue not ready or already broken). Any error marks
 * the queue broken: the device should then call virtio_mmio_fail().
 */
int virtq_pop(struct virtq *q, struct virtq_chain *c);

/* Give back the chain popped last, untouched and not yet pushed (retry later). */
void virtq_unpop(struct virtq *q);

/*
 * Return a chain to the used ring with `written` bytes written into its
 * writable part (clamped to write_len by the caller). Returns 0 or -EINVAL.
 */
int virtq_push(struct virtq *q, uint16_t head, uint32_t written);

/* After pushes: does the driver want an interrupt (VRING_AVAIL_F_NO_INTERRUPT clear)? */
bool virtq_want_irq(struct virtq *q);

/*
 * Copy between a chain and a flat buffer, `off` bytes into its readable
 * (from) or writable (to) part. Return the bytes copied (short at the end).
 */
size_t virtq_chain_from(const struct virtq_chain *c, uint64_t off, void *dst, size_t len);
size_t virtq_chain_to(const struct virtq_chain *c, uint64_t off, const void *src, size_t len);

/*
 * Describe up to `len` bytes of the readable (write=false) or writable part,
 * starting `off` bytes in, as at most `max` iovecs. Returns the iovec count.
 */
int virtq_chain_iov(const struct virtq_chain *c, bool write, uint64_t off, size_t len,
		    struct iovec *iov, int max);

#endif
