/*
 * libFuzzer harness: virtio-mmio register access (csrc/vmm/virtio/mmio.c) as a
 * hostile guest driver makes it, on a device with two queues whose kick pops
 * and completes chains, so queue set-up through the registers is exercised
 * end to end. No loop: QueueNotify runs the device on the "vCPU".
 *
 * The input is a list of 8-byte records [op][off:2][len][value:4]:
 *   op & 3 == 0: register/config write of len bytes at off
 *   op & 3 == 1: read
 *   op & 3 == 2: guest RAM store of value at off * 4 (rings, descriptors)
 *   op & 3 == 3: a "well-formed" step: off selects a register from a list, len unused
 */
#include "fuzz_common.h"

#include <linux/virtio_config.h>
#include <linux/virtio_mmio.h>

#include "virtio/mmio.h"

#define RAM (256u << 10)

struct fdev {
	struct virtio_mmio m;
	uint8_t config[24];
	struct virtq_chain c;
};

static void fdev_config_read(void *dev, uint32_t off, void *data, uint32_t len)
{
	struct fdev *d = dev;

	FUZZ_CHECK(off + len <= sizeof(d->config));
	memcpy(data, d->config + off, len);
}

static void fdev_config_write(void *dev, uint32_t off, const void *data, uint32_t len)
{
	struct fdev *d = dev;

	FUZZ_CHECK(off + len <= sizeof(d->config));
	memcpy(d->config + off, data, len);
	virtio_mmio_config_changed(&d->m);
}

static void fdev_notify(void *dev, unsigned qi)
{
	struct fdev *d = dev;
	struct virtq *q = virtio_mmio_queue(&d->m, qi);
	int n = 0, r;

	FUZZ_CHECK(q && q->ready);
	while (n++ < 64 && (r = virtq_pop(q, &d->c)) > 0) {
		uint8_t b[64];

		virtq_chain_from(&d->c, 0, b, sizeof(b));
		virtq_chain_to(&d->c, 0, b, sizeof(b));
		if (virtq_push(q, d->c.head, (uint32_t)d->c.write_len) < 0)
			r = -EINVAL;
		if (r < 0)
			break;
	}
	if (r < 0)
		virtio_mmio_fail(&d->m);
	else if (virtq_want_irq(q))
		virtio_mmio_signal(&d->m);
}

static const struct virtio_dev_ops fdev_ops = {
	.device_id = 42,
	.features = 1ull << 3 | 1ull << 40,
	.nr_queues = 2,
	.queue_max = 64,
	.config_size = 24,
	.config_read = fdev_config_read,
	.config_write = fdev_config_write,
	.queue_notify = fdev_notify,
};

static struct vm *vm;
static struct fdev *dev;

static const uint16_t regs[] = {
	VIRTIO_MMIO_DEVICE_FEATURES_SEL, VIRTIO_MMIO_DRIVER_FEATURES, VIRTIO_MMIO_DRIVER_FEATURES_SEL,
	VIRTIO_MMIO_QUEUE_SEL,           VIRTIO_MMIO_QUEUE_NUM,       VIRTIO_MMIO_QUEUE_READY,
	VIRTIO_MMIO_QUEUE_NOTIFY,        VIRTIO_MMIO_INTERRUPT_ACK,   VIRTIO_MMIO_STATUS,
	VIRTIO_MMIO_QUEUE_DESC_LOW,      VIRTIO_MMIO_QUEUE_DESC_HIGH, VIRTIO_MMIO_QUEUE_AVAIL_LOW,
	VIRTIO_MMIO_QUEUE_AVAIL_HIGH,    VIRTIO_MMIO_QUEUE_USED_LOW,  VIRTIO_MMIO_QUEUE_USED_HIGH,
	VIRTIO_MMIO_DEVICE_FEATURES,     VIRTIO_MMIO_QUEUE_NUM_MAX,   VIRTIO_MMIO_INTERRUPT_STATUS,
	VIRTIO_MMIO_CONFIG_GENERATION,   VIRTIO_MMIO_CONFIG,
};

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct fuzz_in in = { data, size, 0 };
	struct vm_mmio_dev *md;

	if (!vm) {
		vm = fake_vm_new(RAM, NULL);
		dev = calloc(1, sizeof(*dev));
		FUZZ_CHECK(dev && virtio_mmio_init(&dev->m, vm, 0xd0000000ull, 5, &fdev_ops, dev) == 0);
	}
	md = &vm->mmio[0];
	memset(vm->mem, 0, RAM);
	memset(dev->config, 0, sizeof(dev->config));
	fake_vm_mw(vm, VIRTIO_MMIO_STATUS, 0); /* device reset between inputs */
	while (fuzz_more(&in)) {
		uint8_t op = fuzz_u8(&in), len = fuzz_u8(&in);
		uint16_t off = fuzz_u16(&in);
		uint64_t v = fuzz_u32(&in);
		uint8_t buf[16];

		switch (op & 3) {
		case 0:
		case 1:
			memset(buf, 0xa5, sizeof(buf));
			memcpy(buf, &v, sizeof(v));
			md->access(md->opaque, off, buf, len & 15, (op & 3) == 0);
			break;
		case 2:
			if ((uint64_t)off * 4 + 4 <= RAM)
				memcpy(vm->mem + (uint64_t)off * 4, &v, 4);
			break;
		case 3:
			if (op & 4) {
				buf[0] = 0;
				md->access(md->opaque, regs[off % (sizeof(regs) / sizeof(regs[0]))], &v, 4, false);
			} else {
				fake_vm_mw(vm, regs[off % (sizeof(regs) / sizeof(regs[0]))], (uint32_t)v);
			}
			break;
		}
	}
	return 0;
}
