/* A fake guest driver for device tests: split rings and virtio-mmio bring-up (fake_driver.h). */
#define _GNU_SOURCE
#include "fake_driver.h"

#include <poll.h>
#include <string.h>

#include <linux/virtio_config.h>
#include <linux/virtio_mmio.h>

#include "fake_test.h"
#include "fake_vm.h"

void fake_ring_init(struct fake_ring *q, struct vm *vm, unsigned qi, uint16_t size, uint64_t base)
{
	int i;

	CHECK(size <= FAKE_RING_MAX);
	memset(q, 0, sizeof(*q));
	q->vm = vm;
	q->qi = qi;
	q->size = size;
	q->base = base;
	memset(vm->mem + base, 0, 0x3000);
	q->desc = (void *)(vm->mem + base);
	q->avail = (void *)(vm->mem + base + 0x1000);
	q->used = (void *)(vm->mem + base + 0x2000);
	for (i = size - 1; i >= 0; i--)
		q->free_stack[q->nfree++] = (uint16_t)i;
}

void fake_ring_setup(struct fake_ring *q)
{
	struct vm *vm = q->vm;

	fake_vm_mw(vm, VIRTIO_MMIO_QUEUE_SEL, q->qi);
	CHECK(fake_vm_mr(vm, VIRTIO_MMIO_QUEUE_READY) == 0);
	CHECK(fake_vm_mr(vm, VIRTIO_MMIO_QUEUE_NUM_MAX) >= q->size);
	fake_vm_mw(vm, VIRTIO_MMIO_QUEUE_NUM, q->size);
	fake_vm_mw(vm, VIRTIO_MMIO_QUEUE_DESC_LOW, (uint32_t)q->base);
	fake_vm_mw(vm, VIRTIO_MMIO_QUEUE_DESC_HIGH, (uint32_t)(q->base >> 32));
	fake_vm_mw(vm, VIRTIO_MMIO_QUEUE_AVAIL_LOW, (uint32_t)(q->base + 0x1000));
	fake_vm_mw(vm, VIRTIO_MMIO_QUEUE_AVAIL_HIGH, (uint32_t)((q->base + 0x1000) >> 32));
	fake_vm_mw(vm, VIRTIO_MMIO_QUEUE_USED_LOW, (uint32_t)(q->base + 0x2000));
	fake_vm_mw(vm, VIRTIO_MMIO_QUEUE_USED_HIGH, (uint32_t)((q->base + 0x2000) >> 32));
	fake_vm_mw(vm, VIRTIO_MMIO_QUEUE_READY, 1);
}

int fake_ring_add(struct fake_ring *q, const struct fake_seg *s, int n, int tag)
{
	uint16_t idx[FAKE_RING_MAX];
	int k;

	CHECK(n > 0);
	if (n > q->nfree)
		return -1;
	for (k = 0; k < n; k++)
		idx[k] = q->free_stack[--q->nfree];
	for (k = 0; k < n; k++) {
		struct vring_desc *d = &q->desc[idx[k]];

		d->addr = s[k].gpa;
		d->len = s[k].len;
		d->flags = (uint16_t)((s[k].write ? VRING_DESC_F_WRITE : 0) | (k + 1 < n ? VRING_DESC_F_NEXT : 0));
		d->next = k + 1 < n ? idx[k + 1] : 0;
	}
	q->tag[idx[0]] = tag;
	q->avail->ring[q->avail_idx % q->size] = idx[0];
	q->avail_idx++;
	__atomic_store_n(&q->avail->idx, q->avail_idx, __ATOMIC_RELEASE);
	return idx[0];
}

bool fake_ring_used(struct fake_ring *q, int *tag, uint32_t *len)
{
	uint16_t idx = __atomic_load_n(&q->used->idx, __ATOMIC_ACQUIRE);
	struct vring_used_elem e;
	uint16_t i;
	unsigned n;

	if (idx == q->last_used)
		return false;
	e = q->used->ring[q->last_used % q->size];
	q->last_used++;
	CHECK(e.id < q->size);
	for (i = (uint16_t)e.id, n = 0; n < q->size; n++) {
		q->free_stack[q->nfree++] = i;
		if (!(q->desc[i].flags & VRING_DESC_F_NEXT))
			break;
		i = q->desc[i].next;
	}
	*tag = q->tag[e.id];
	*len = e.len;
	return true;
}

bool fake_ring_wait(struct fake_ring *q, int *tag, uint32_t *len)
{
	int64_t t0 = fake_test_now_ms();

	while (!fake_ring_used(q, tag, len)) {
		if (fake_driver_broken(q->vm))
			return false;
		CHECK(fake_test_now_ms() - t0 < 10000);
		poll(NULL, 0, 1);
	}
	return true;
}

void fake_ring_kick(struct fake_ring *q)
{
	fake_vm_mw(q->vm, VIRTIO_MMIO_QUEUE_NOTIFY, q->qi);
}

uint64_t fake_driver_negotiate(struct vm *vm, uint32_t device_id)
{
	uint32_t lo, hi;

	CHECK(fake_vm_mr(vm, VIRTIO_MMIO_MAGIC_VALUE) == 0x74726976);
	CHECK(fake_vm_mr(vm, VIRTIO_MMIO_VERSION) == 2);
	CHECK(fake_vm_mr(vm, VIRTIO_MMIO_DEVICE_ID) == device_id);
	fake_vm_mw(vm, VIRTIO_MMIO_STATUS, 0);
	CHECK(fake_vm_mr(vm, VIRTIO_MMIO_STATUS) == 0);
	fake_vm_mw(vm, VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
	fake_vm_mw(vm, VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER);
	fake_vm_mw(vm, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
	hi = fake_vm_mr(vm, VIRTIO_MMIO_DEVICE_FEATURES);
	fake_vm_mw(vm, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
	lo = fake_vm_mr(vm, VIRTIO_MMIO_DEVICE_FEATURES);
	CHECK(hi & 1); /* VERSION_1 */
	fake_vm_mw(vm, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
	fake_vm_mw(vm, VIRTIO_MMIO_DRIVER_FEATURES, 1);
	fake_vm_mw(vm, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
	fake_vm_mw(vm, VIRTIO_MMIO_DRIVER_FEATURES, lo);
	fake_vm_mw(vm, VIRTIO_MMIO_STATUS, 0xb);
	CHECK(fake_vm_mr(vm, VIRTIO_MMIO_STATUS) == 0xb);
	return (uint64_t)hi << 32 | lo;
}

void fake_driver_features_ok(struct vm *vm)
{
	fake_vm_mw(vm, VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER);
	fake_vm_mw(vm, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
	fake_vm_mw(vm, VIRTIO_MMIO_DRIVER_FEATURES, 1);
	fake_vm_mw(vm, VIRTIO_MMIO_STATUS, 0xb);
}

void fake_driver_ok(struct vm *vm)
{
	fake_vm_mw(vm, VIRTIO_MMIO_STATUS, 0xf);
	CHECK(fake_vm_mr(vm, VIRTIO_MMIO_STATUS) == 0xf);
}

bool fake_driver_broken(struct vm *vm)
{
	return fake_vm_mr(vm, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET;
}
