/*
 * libFuzzer harness: virtio-blk requests (csrc/vmm/virtio/blk.c) from a hostile
 * driver, served by the real io_uring against a 1 MiB sparse image. The
 * harness sets the queue up as Linux does, then each input posts requests
 * whose header, segment layout, lengths, flags and addresses it chooses, kicks
 * the device and runs the loop; a device reset at the end waits for every
 * request in flight, so nothing outlives the input.
 *
 * Input: [flags] then requests [nseg][type][sector:4][kick] + nseg x [where][len:2][dflags].
 *   flags & 1: the read-only disk; flags & 2: well-formed driver status sequence skipped
 *   kick & 1: QueueNotify and run the loop; & 2: a config/ISR read; & 8: a register write [value]
 *   where 0 = the request's header, 1 = its status byte, 2..254 = a data page, 255 = past RAM
 */
#include "fuzz_common.h"

#include <fcntl.h>
#include <unistd.h>

#include <linux/virtio_blk.h>
#include <linux/virtio_config.h>
#include <linux/virtio_mmio.h>
#include <linux/virtio_ring.h>

#include "virtio/blk.h"
#include "virtio/mmio.h"

#define RAM (1u << 20)
#define QSIZE 64u
#define QBASE 0x1000ull /* desc; avail at +0x1000, used at +0x2000 */
#define HDRS 0x4000ull  /* 16-byte request headers */
#define STATS 0x5000ull /* status bytes */
#define DISK (1u << 20)

static struct evloop *loop;
static struct vm *vm;
static struct blk *disks[2];

static int fuzz_disk(bool ro, struct blk **out)
{
	const char *tmp = getenv("TMPDIR");
	char path[256];
	struct blk_config cfg = { .base = ro ? 0xd0001000ull : 0xd0000000ull, .gsi = ro ? 6 : 5, .read_only = ro,
				  .serial = "fuzz-serial-0123456" };
	int fd, err;

	snprintf(path, sizeof(path), "%s/smolvm-fuzz-blk-XXXXXX", tmp && *tmp ? tmp : "/tmp");
	fd = mkstemp(path);
	FUZZ_CHECK(fd >= 0 && ftruncate(fd, DISK) == 0);
	close(fd);
	cfg.path = path;
	err = blk_new(vm, &cfg, out);
	unlink(path); /* the device keeps its fd */
	return err;
}

static void driver_up(struct vm_mmio_dev *md)
{
	static const struct {
		uint16_t off;
		uint32_t v;
	} seq[] = {
		{ VIRTIO_MMIO_STATUS, 0 },
		{ VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER },
		{ VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0 },
		{ VIRTIO_MMIO_DRIVER_FEATURES, (1u << VIRTIO_BLK_F_SEG_MAX) | (1u << VIRTIO_BLK_F_FLUSH) },
		{ VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1 },
		{ VIRTIO_MMIO_DRIVER_FEATURES, 1 }, /* VIRTIO_F_VERSION_1 */
		{ VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK },
		{ VIRTIO_MMIO_QUEUE_SEL, 0 },
		{ VIRTIO_MMIO_QUEUE_NUM, QSIZE },
		{ VIRTIO_MMIO_QUEUE_DESC_LOW, (uint32_t)QBASE },
		{ VIRTIO_MMIO_QUEUE_AVAIL_LOW, (uint32_t)QBASE + 0x1000 },
		{ VIRTIO_MMIO_QUEUE_USED_LOW, (uint32_t)QBASE + 0x2000 },
		{ VIRTIO_MMIO_QUEUE_READY, 1 },
		{ VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK |
					      VIRTIO_CONFIG_S_DRIVER_OK },
	};
	unsigned i;

	for (i = 0; i < sizeof(seq) / sizeof(seq[0]); i++) {
		uint32_t v = seq[i].v;

		md->access(md->opaque, seq[i].off, &v, 4, true);
	}
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct fuzz_in in = { data, size, 0 };
	struct vring_desc *desc = (void *)(vm ? vm->mem + QBASE : NULL);
	struct vring_avail *avail;
	struct vm_mmio_dev *md;
	uint16_t di = 0, ai = 0, reqs = 0;
	uint8_t flags;
	uint32_t zero = 0;

	if (!vm) {
		FUZZ_CHECK(evloop_new(&loop) == 0);
		vm = fake_vm_new(RAM, loop);
		FUZZ_CHECK(fuzz_disk(false, &disks[0]) == 0);
		FUZZ_CHECK(fuzz_disk(true, &disks[1]) == 0);
		desc = (void *)(vm->mem + QBASE);
	}
	avail = (void *)(vm->mem + QBASE + 0x1000);
	memset(vm->mem, 0, 0x10000);
	flags = fuzz_u8(&in);
	md = &vm->mmio[flags & 1];
	if (!(flags & 2))
		driver_up(md);
	while (fuzz_more(&in) && reqs < 4 * QSIZE) {
		uint8_t nseg = fuzz_u8(&in) % 10, kick;
		struct virtio_blk_outhdr h;
		uint16_t head = di % QSIZE, k;

		h.type = fuzz_u8(&in);
		h.ioprio = 0;
		h.sector = fuzz_u32(&in);
		kick = fuzz_u8(&in);
		memcpy(vm->mem + HDRS + 16 * (reqs % 64), &h, sizeof(h));
		for (k = 0; k < nseg; k++) {
			struct vring_desc *d = &desc[di % QSIZE];
			uint8_t where = fuzz_u8(&in), df = fuzz_u8(&in);
			uint16_t len = fuzz_u16(&in);

			d->addr = where == 0 ? HDRS + 16 * (reqs % 64) :
				  where == 1 ? STATS + (reqs % 64) :
				  where == 255 ? RAM - 512 : (uint64_t)where * 4096;
			d->len = len;
			d->flags = (uint16_t)(df & ~VRING_DESC_F_NEXT) | (k + 1 < nseg ? VRING_DESC_F_NEXT : 0);
			d->next = (uint16_t)((di + 1) % QSIZE);
			if (df & 0x80)
				d->next = df; /* a wild next index */
			di++;
		}
		avail->ring[ai % QSIZE] = head;
		ai++;
		reqs++;
		__atomic_store_n(&avail->idx, ai, __ATOMIC_RELEASE);
		if (kick & 1) {
			uint32_t q = kick >> 4;

			md->access(md->opaque, VIRTIO_MMIO_QUEUE_NOTIFY, &q, 4, true);
			fake_loop_settle(loop, 8);
		}
		if (kick & 8) { /* a register write mid-flight: QueueReady = 0, status changes, a new ring... */
			static const uint16_t regs[] = { VIRTIO_MMIO_QUEUE_READY, VIRTIO_MMIO_STATUS, VIRTIO_MMIO_QUEUE_NUM,
							 VIRTIO_MMIO_QUEUE_DESC_LOW, VIRTIO_MMIO_QUEUE_SEL,
							 VIRTIO_MMIO_INTERRUPT_ACK };
			uint32_t v = fuzz_u8(&in);

			md->access(md->opaque, regs[(kick >> 4) % 6], &v, 4, true);
		}
		if (kick & 2) {
			uint64_t v = 0;

			md->access(md->opaque, (kick & 4) ? VIRTIO_MMIO_INTERRUPT_STATUS : VIRTIO_MMIO_CONFIG + (kick >> 3),
				   &v, (kick & 4) ? 4 : 1 << ((kick >> 6) & 3), false);
		}
	}
	md->access(md->opaque, VIRTIO_MMIO_QUEUE_NOTIFY, &zero, 4, true);
	fake_loop_settle(loop, 16);
	md->access(md->opaque, VIRTIO_MMIO_STATUS, &zero, 4, true); /* reset: drains what is in flight */
	fake_loop_settle(loop, 4);
	return 0;
}
