/* A fake guest driver for device tests: split rings in the fake VM's RAM and virtio-mmio bring-up as Linux does it. */
#ifndef SMOLVM_FAKE_DRIVER_H
#define SMOLVM_FAKE_DRIVER_H

#include <stdbool.h>
#include <stdint.h>

#include <linux/virtio_ring.h>

#include "vm.h"

#define FAKE_RING_MAX 256u /* the largest queue a fake ring can be */

/* Where queue qi's rings go by default: descriptors at the base, avail at +0x1000, used at +0x2000. */
#define FAKE_RING_BASE(qi) (0x10000ull * ((qi) + 1))

/* One buffer of a chain: guest address, length, device-writable or not. */
struct fake_seg {
	uint64_t gpa;
	uint32_t len;
	bool write;
};

/* The driver's side of one split virtqueue (this thread is the guest's). */
struct fake_ring {
	struct vm *vm;
	unsigned qi;
	uint16_t size;
	uint64_t base;
	struct vring_desc *desc;
	struct vring_avail *avail;
	struct vring_used *used;
	uint16_t avail_idx, last_used;
	uint16_t free_stack[FAKE_RING_MAX]; /* free descriptors */
	int nfree;
	int tag[FAKE_RING_MAX]; /* the caller's tag of each chain, by head */
};

/* Zero the rings of queue qi (size <= FAKE_RING_MAX, 0x3000 bytes at base in vm's RAM); all descriptors free. */
void fake_ring_init(struct fake_ring *q, struct vm *vm, unsigned qi, uint16_t size, uint64_t base);

/*
 * Tell the device where the rings are, like Linux's vm_setup_vq(): select the
 * queue, CHECK it is not ready and takes q->size, write size and addresses, set
 * QueueReady. The caller checks the device took it (QueueReady reads 1).
 */
void fake_ring_setup(struct fake_ring *q);

/* Post a chain of n segments tagged tag (no kick); returns its head, or -1 when fewer than n descriptors are free. */
int fake_ring_add(struct fake_ring *q, const struct fake_seg *s, int n, int tag);

/* Take the next used entry, if any: its chain's tag and used length; its descriptors are free again. */
bool fake_ring_used(struct fake_ring *q, int *tag, uint32_t *len);

/* Wait up to 10 s for the next used entry (the device runs on another thread); false if the device broke instead. */
bool fake_ring_wait(struct fake_ring *q, int *tag, uint32_t *len);

/* QueueNotify for this queue. */
void fake_ring_kick(struct fake_ring *q);

/*
 * Probe and negotiate as drivers/virtio/virtio_mmio.c does: CHECK magic, version
 * 2 and device_id; reset (CHECKed), ACKNOWLEDGE, DRIVER; read the features
 * (CHECK VERSION_1 is offered), accept every low feature and VERSION_1 alone of
 * the high ones; FEATURES_OK (CHECKed). Returns the features offered. Then set
 * up the queues and call fake_driver_ok().
 */
uint64_t fake_driver_negotiate(struct vm *vm, uint32_t device_id);

/* ACKNOWLEDGE | DRIVER, VERSION_1 only, FEATURES_OK, nothing checked (a device just reset). */
void fake_driver_features_ok(struct vm *vm);

/* DRIVER_OK, CHECKed. */
void fake_driver_ok(struct vm *vm);

/* The device set DEVICE_NEEDS_RESET. */
bool fake_driver_broken(struct vm *vm);

#endif
