/* Split virtqueue: pop checked descriptor chains from the avail ring, push them to the used ring. */
#include "virtio/queue.h"

#include <errno.h>
#include <string.h>

#include <linux/virtio_ring.h>

#include "vm.h"

_Static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "virtio rings are little-endian");

/* Guest-shared fields: one untorn access each, never cached by the compiler. */
#define GUEST_LOAD(p) __atomic_load_n((p), __ATOMIC_RELAXED)
#define GUEST_STORE(p, v) __atomic_store_n((p), (v), __ATOMIC_RELAXED)

void virtq_reset(struct virtq *q)
{
	struct vm *vm = q->vm;

	memset(q, 0, sizeof(*q));
	q->vm = vm;
}

int virtq_enable(struct virtq *q, uint16_t max)
{
	uint64_t n = q->size;
	void *desc, *avail, *used;

	q->ready = false;
	if (n == 0 || n > max || (n & (n - 1)))
		return -EINVAL;
	if ((q->desc_gpa & (VRING_DESC_ALIGN_SIZE - 1)) || (q->avail_gpa & (VRING_AVAIL_ALIGN_SIZE - 1)) ||
	    (q->used_gpa & (VRING_USED_ALIGN_SIZE - 1)))
		return -EINVAL;
	/* desc[n]; avail: flags, idx, ring[n], used_event; used: flags, idx, ring[n], avail_event */
	desc = vm_gpa(q->vm, q->desc_gpa, 16 * n);
	avail = vm_gpa(q->vm, q->avail_gpa, 6 + 2 * n);
	used = vm_gpa(q->vm, q->used_gpa, 6 + 8 * n);
	if (!desc || !avail || !used)
		return -EFAULT;
	q->desc = desc;
	q->avail = avail;
	q->used = used;
	q->last_avail = q->used_idx = q->inflight = 0;
	q->broken = false;
	q->ready = true;
	return 0;
}

bool virtq_has_avail(struct virtq *q)
{
	if (!q->ready || q->broken)
		return false;
	return __atomic_load_n(&q->avail->idx, __ATOMIC_ACQUIRE) != q->last_avail;
}

/* Walk the chain starting at head; every index, length and address is the guest's word. */
static int virtq_walk(struct virtq *q, uint16_t head, struct virtq_chain *c)
{
	uint16_t i = head;
	unsigned count;

	c->head = head;
	c->n = c->n_read = 0;
	c->read_len = c->write_len = 0;
	for (count = 0;; count++) {
		struct vring_desc *d;
		struct virtq_seg *s;
		uint64_t addr;
		uint32_t len;
		uint16_t flags, next;
		void *p;

		/* a NEXT loop is caught here: no chain is longer than the queue */
		if (i >= q->size || count >= q->size || c->n >= VIRTQ_MAX_SEGS)
			return -EINVAL;
		d = &q->desc[i];
		addr = GUEST_LOAD(&d->addr);
		len = GUEST_LOAD(&d->len);
		flags = GUEST_LOAD(&d->flags);
		next = GUEST_LOAD(&d->next);
		if (flags & VRING_DESC_F_INDIRECT)
			return -EINVAL;
		if (!(flags & VRING_DESC_F_WRITE) && c->n > c->n_read)
			return -EINVAL; /* readable after writable */
		p = vm_gpa(q->vm, addr, len);
		if (!p)
			return -EFAULT;
		s = &c->seg[c->n++];
		s->ptr = p;
		s->len = len;
		s->write = flags & VRING_DESC_F_WRITE;
		if (s->write) {
			c->write_len += len;
		} else {
			c->n_read++;
			c->read_len += len;
		}
		if (!(flags & VRING_DESC_F_NEXT))
			return 0;
		i = next;
	}
}

int virtq_pop(struct virtq *q, struct virtq_chain *c)
{
	uint16_t avail_idx, head;
	int err;

	if (!q->ready || q->broken)
		return -EIO;
	/* acquire: the ring entries and descriptors are read after the index */
	avail_idx = __atomic_load_n(&q->avail->idx, __ATOMIC_ACQUIRE);
	if (avail_idx == q->last_avail)
		return 0;
	if ((uint16_t)(avail_idx - q->last_avail) > q->size) {
		err = -EINVAL;
		goto out;
	}
	head = GUEST_LOAD(&q->avail->ring[q->last_avail & (q->size - 1)]);
	err = virtq_walk(q, head, c);
	if (err)
		goto out;
	q->last_avail++;
	q->inflight++;
	return 1;
out:
	q->broken = true;
	return err;
}

void virtq_unpop(struct virtq *q)
{
	if (q->inflight) {
		q->last_avail--;
		q->inflight--;
	}
}

int virtq_push(struct virtq *q, uint16_t head, uint32_t written)
{
	struct vring_used_elem *e;

	if (!q->ready || q->broken || head >= q->size || !q->inflight)
		return -EINVAL;
	e = &q->used->ring[q->used_idx & (q->size - 1)];
	GUEST_STORE(&e->id, head);
	GUEST_STORE(&e->len, written);
	q->used_idx++;
	q->inflight--;
	/*
	 * The element and buffer contents are visible before the index; seq_cst
	 * also orders this store before virtq_want_irq()'s load of the driver's
	 * flags (the driver does the mirror image: flags store, barrier, idx load).
	 */
	__atomic_store_n(&q->used->idx, q->used_idx, __ATOMIC_SEQ_CST);
	return 0;
}

bool virtq_want_irq(struct virtq *q)
{
	if (!q->ready)
		return false;
	return !(__atomic_load_n(&q->avail->flags, __ATOMIC_SEQ_CST) & VRING_AVAIL_F_NO_INTERRUPT);
}

/*
 * Describe bytes [off, off+len) of the readable or writable part as iovecs
 * (at most max). Returns the count.
 */
static int virtq_range(const struct virtq_chain *c, bool write, uint64_t off, size_t len,
		       struct iovec *iov, int max)
{
	unsigned i = write ? c->n_read : 0, end = write ? c->n : c->n_read;
	int cnt = 0;

	for (; i < end && len && cnt < max; i++) {
		const struct virtq_seg *s = &c->seg[i];
		size_t n;

		if (off >= s->len) {
			off -= s->len;
			continue;
		}
		n = s->len - off;
		if (n > len)
			n = len;
		iov[cnt].iov_base = s->ptr + off;
		iov[cnt].iov_len = n;
		cnt++;
		off = 0;
		len -= n;
	}
	return cnt;
}

size_t virtq_chain_from(const struct virtq_chain *c, uint64_t off, void *dst, size_t len)
{
	struct iovec iov[VIRTQ_MAX_SEGS];
	size_t done = 0;
	int i, cnt = virtq_range(c, false, off, len, iov, VIRTQ_MAX_SEGS);

	for (i = 0; i < cnt; i++) {
		memcpy((uint8_t *)dst + done, iov[i].iov_base, iov[i].iov_len);
		done += iov[i].iov_len;
	}
	return done;
}

size_t virtq_chain_to(const struct virtq_chain *c, uint64_t off, const void *src, size_t len)
{
	struct iovec iov[VIRTQ_MAX_SEGS];
	size_t done = 0;
	int i, cnt = virtq_range(c, true, off, len, iov, VIRTQ_MAX_SEGS);

	for (i = 0; i < cnt; i++) {
		memcpy(iov[i].iov_base, (const uint8_t *)src + done, iov[i].iov_len);
		done += iov[i].iov_len;
	}
	return done;
}

int virtq_chain_iov(const struct virtq_chain *c, bool write, uint64_t off, size_t len,
		    struct iovec *iov, int max)
{
	return virtq_range(c, write, off, len, iov, max);
}
