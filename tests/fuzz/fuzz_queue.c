/*
 * libFuzzer harness: the split virtqueue (csrc/vmm/virtio/queue.c). The input is
 * guest RAM as a hostile driver wrote it: descriptor table, avail ring and
 * buffers, plus the queue size, the ring addresses, the starting ring indices
 * (wrap-around) and what the device does with each chain it pops.
 *
 * Layout: [size:2][desc:2][avail:2][used:2][start:2][ops:16][gpa gate: 24] then RAM bytes.
 * Ring addresses are offsets in a 64 KiB RAM; the rest of the input is copied
 * to RAM from offset 0 (descriptor addresses reach past RAM on purpose).
 */
#include "fuzz_common.h"

#include <linux/virtio_ring.h>

#include "virtio/queue.h"

#define RAM (64u << 10)
#define QMAX 256

static struct vm *vm;

/*
 * vm_gpa(), the one guest-address gate, on a VM of any size (up to 1 TiB, RAM split around
 * the 32-bit MMIO gap): whatever it returns must lie inside the RAM mapping. Pointers are
 * only compared, never followed, so no such mapping is needed.
 */
static void gpa_gate(struct fuzz_in *in)
{
	struct vm big = { .mem = (uint8_t *)(uintptr_t)0x100000000000ull };
	uint64_t gpa = fuzz_u64(in), len = fuzz_u64(in);
	uint8_t *p;

	big.mem_size = fuzz_u64(in) & ((1ull << 40) - 1);
	if (len & 1)
		len >>= 32; /* short ranges too */
	if (gpa & 1)
		gpa = VM_GAP_START - (gpa >> 48) + (gpa & 2 ? VM_GAP_END - VM_GAP_START : 0); /* around the gap */
	p = vm_gpa(&big, gpa, len);
	if (p) {
		uintptr_t off = (uintptr_t)p - (uintptr_t)big.mem;

		FUZZ_CHECK(off <= big.mem_size && len <= big.mem_size - off);
		if (len) /* a non-empty range maps linearly, low RAM at 0 and the rest from VM_GAP_END */
			FUZZ_CHECK(gpa < VM_GAP_START ? off == gpa : gpa >= VM_GAP_END && off == gpa - VM_GAP_END + VM_GAP_START);
	}
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct fuzz_in in = { data, size, 0 };
	static struct virtq_chain c;
	struct virtq q;
	uint8_t ops[16], tmp[512];
	struct iovec iov[8];
	uint16_t start;
	unsigned i;

	if (!vm)
		vm = fake_vm_new(RAM, NULL);
	memset(vm->mem, 0, RAM);
	memset(&q, 0, sizeof(q));
	q.vm = vm;
	q.size = fuzz_u16(&in);
	q.desc_gpa = fuzz_u16(&in);
	q.avail_gpa = fuzz_u16(&in);
	q.used_gpa = fuzz_u16(&in);
	start = fuzz_u16(&in);
	fuzz_bytes(&in, ops, sizeof(ops));
	fuzz_bytes(&in, vm->mem, in.n - in.off < RAM ? in.n - in.off : RAM);
	gpa_gate(&in);
	if (virtq_enable(&q, QMAX) < 0)
		return 0;
	/* a queue restored from a snapshot resumes at any index: exercise the 16-bit wrap */
	q.last_avail = q.used_idx = start;
	virtq_has_avail(&q);
	for (i = 0; i < 4 * QMAX; i++) {
		uint8_t op = ops[i % sizeof(ops)];
		int r = virtq_pop(&q, &c);

		if (r <= 0)
			break;
		FUZZ_CHECK(c.n >= 1 && c.n <= VIRTQ_MAX_SEGS && c.n_read <= c.n && c.head < q.size);
		/* touch every byte the chain claims: ASan flags a segment that leaves RAM */
		for (unsigned k = 0; k < c.n; k++)
			if (c.seg[k].len)
				(void)*(volatile uint8_t *)(c.seg[k].ptr + c.seg[k].len - 1);
		virtq_chain_from(&c, op & 0x3f, tmp, sizeof(tmp));
		virtq_chain_to(&c, op >> 2, tmp, op & 1 ? sizeof(tmp) : 7);
		virtq_chain_iov(&c, op & 2, op, 1000, iov, 8);
		if ((op & 0xc0) == 0xc0) {
			virtq_unpop(&q);
			if (virtq_pop(&q, &c) <= 0)
				break;
		}
		if (virtq_push(&q, c.head, (uint32_t)c.write_len) < 0)
			break;
		virtq_want_irq(&q);
	}
	return 0;
}
