/* virtio-blk: checked block requests from one virtqueue, served asynchronously by the device's own io_uring. */
#define _GNU_SOURCE
#include "virtio/blk.h"

#include <errno.h>
#include <fcntl.h>
#include <liburing.h>
#include <poll.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/file.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <linux/fs.h>
#include <linux/virtio_blk.h>
#include <linux/virtio_ids.h>

#include "evloop.h"
#include "snapshot.h"
#include "uring_limit.h"
#include "virtio/mmio.h"
#include "vm.h"

#define BLK_HDR ((uint32_t)sizeof(struct virtio_blk_outhdr))
/* The only operations the disk submits (uring_limit.h). */
static const unsigned char blk_ring_ops[] = { IORING_OP_READV, IORING_OP_WRITEV, IORING_OP_FSYNC };
#define BLK_RETRIES 8 /* -EAGAIN/-EINTR resubmissions of one request, or failed submits in a row */

_Static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "virtio-blk fields are little-endian");
_Static_assert(BLK_HDR == 16, "virtio_blk_outhdr is 16 bytes");
_Static_assert(BLK_SERIAL_MAX == VIRTIO_BLK_ID_BYTES, "GET_ID answers 20 bytes");
_Static_assert(BLK_MAX_DATA % BLK_SECTOR == 0 && BLK_MAX_DATA < (1u << 31), "used length fits 32 bits");

/* One request handed to the kernel: a slot, its index is the io_uring user_data. */
struct blk_req {
	bool busy;
	uint32_t type;    /* VIRTIO_BLK_T_IN, _OUT or _FLUSH */
	uint16_t head;    /* chain to push when done */
	uint8_t *status;  /* last byte of the chain's writable part (checked by virtq_pop) */
	uint32_t written; /* used length reported on success */
	uint64_t off;     /* file offset of iov[first] */
	uint64_t left;    /* data bytes still to transfer */
	unsigned retries;
	int first, niov; /* iov[first..niov) still to transfer */
	struct iovec iov[VIRTQ_MAX_SEGS];
};

struct blk {
	struct virtio_mmio mmio; /* its lock guards everything below that changes */
	struct virtio_dev_ops ops;
	struct vm *vm;
	int fd, efd;
	bool ring_ok, efd_watched, read_only;
	uint64_t capacity; /* sectors; fixed at blk_new */
	struct io_uring ring;
	struct virtio_blk_config config;
	char serial[BLK_SERIAL_MAX];
	bool pushed;       /* used entries added since the last interrupt decision */
	bool restored;     /* interrupt the guest once the loop runs (blk_restore) */
	bool resized;      /* tell the guest its capacity changed once the loop runs (blk_restore) */
	unsigned inflight; /* busy slots */
	unsigned nfree;
	uint16_t free_slot[BLK_QUEUE_MAX];
	struct virtq_chain chain;
	struct blk_req req[BLK_QUEUE_MAX];
};

static struct virtq *blk_queue(struct blk *b)
{
	return virtio_mmio_queue(&b->mmio, 0);
}

/* Write the status byte and hand the chain back to the guest. */
static void blk_done(struct blk *b, uint16_t head, uint8_t *status, uint8_t st, uint32_t written)
{
	*status = st;
	if (virtq_push(blk_queue(b), head, written) == 0)
		b->pushed = true;
}

static void blk_release(struct blk *b, struct blk_req *r)
{
	r->busy = false;
	b->inflight--;
	b->free_slot[b->nfree++] = (uint16_t)(r - b->req);
}

/* Queue r's next transfer (or its flush) on the ring; io_uring_submit happens in blk_submit_all(). */
static int blk_submit(struct blk *b, struct blk_req *r)
{
	struct io_uring_sqe *sqe = io_uring_get_sqe(&b->ring);

	if (!sqe) {
		io_uring_submit(&b->ring);
		sqe = io_uring_get_sqe(&b->ring);
		if (!sqe)
			return -EBUSY;
	}
	if (r->type == VIRTIO_BLK_T_IN)
		io_uring_prep_readv(sqe, b->fd, r->iov + r->first, (unsigned)(r->niov - r->first), r->off);
	else if (r->type == VIRTIO_BLK_T_OUT)
		io_uring_prep_writev(sqe, b->fd, r->iov + r->first, (unsigned)(r->niov - r->first), r->off);
	else
		io_uring_prep_fsync(sqe, b->fd, IORING_FSYNC_DATASYNC);
	io_uring_sqe_set_data64(sqe, (uint64_t)(r - b->req));
	return 0;
}

/* Push queued SQEs to the kernel; a ring that keeps refusing them breaks the device. */
static void blk_submit_all(struct blk *b)
{
	unsigned tries;

	for (tries = 0; tries < BLK_RETRIES && io_uring_sq_ready(&b->ring); tries++) {
		int r = io_uring_submit(&b->ring);

		if (r < 0 && r != -EINTR && r != -EAGAIN && r != -EBUSY)
			break;
	}
	if (io_uring_sq_ready(&b->ring))
		virtio_mmio_fail(&b->mmio); /* requests stay in flight until a reset drains them */
}

/* Move r past n transferred bytes. */
static void blk_advance(struct blk_req *r, uint64_t n)
{
	r->off += n;
	r->left -= n;
	while (n && r->first < r->niov) {
		struct iovec *v = &r->iov[r->first];

		if (n < v->iov_len) {
			v->iov_base = (uint8_t *)v->iov_base + n;
			v->iov_len -= n;
			return;
		}
		n -= v->iov_len;
		r->first++;
	}
}

/* A completion for r: finish it, or resubmit the rest of a short transfer. */
static void blk_complete(struct blk *b, struct blk_req *r, int res)
{
	uint8_t st = VIRTIO_BLK_S_OK;

	if (res == -EINTR || res == -EAGAIN) {
		if (++r->retries <= BLK_RETRIES && blk_submit(b, r) == 0)
			return;
		st = VIRTIO_BLK_S_IOERR;
	} else if (res < 0) {
		st = VIRTIO_BLK_S_IOERR;
	} else if (r->type != VIRTIO_BLK_T_FLUSH) {
		if ((uint64_t)res > r->left) {
			st = VIRTIO_BLK_S_IOERR; /* the kernel moved more than asked: never trust it */
		} else if (res == 0 && r->type == VIRTIO_BLK_T_IN) {
			int i;

			/* end of file (the image shrank under us): the rest reads as zeros */
			for (i = r->first; i < r->niov; i++)
				memset(r->iov[i].iov_base, 0, r->iov[i].iov_len);
		} else if (res == 0) {
			st = VIRTIO_BLK_S_IOERR; /* a write that makes no progress */
		} else {
			blk_advance(r, (uint64_t)res);
			r->retries = 0;
			if (r->left) {
				if (blk_submit(b, r) == 0)
					return;
				st = VIRTIO_BLK_S_IOERR;
			}
		}
	}
	blk_done(b, r->head, r->status, st, st == VIRTIO_BLK_S_OK ? r->written : 1);
	blk_release(b, r);
}

/* The slot a CQE names, if it is one we submitted. */
static struct blk_req *blk_cqe_req(struct blk *b, const struct io_uring_cqe *cqe)
{
	uint64_t i = io_uring_cqe_get_data64(cqe);

	return i < BLK_QUEUE_MAX && b->req[i].busy ? &b->req[i] : NULL;
}

/* Take every completion the kernel has posted. */
static void blk_reap(struct blk *b)
{
	struct io_uring_cqe *cqe;

	while (io_uring_peek_cqe(&b->ring, &cqe) == 0) {
		struct blk_req *r = blk_cqe_req(b, cqe);
		int res = cqe->res;

		io_uring_cqe_seen(&b->ring, cqe);
		if (r)
			blk_complete(b, r, res);
	}
}

/*
 * Wait until the kernel is done with every request, dropping them without a
 * word to the guest: afterwards nothing writes guest memory for this device.
 */
static void blk_drain(struct blk *b)
{
	while (b->inflight) {
		struct io_uring_cqe *cqe;
		struct blk_req *r;
		int err = io_uring_peek_cqe(&b->ring, &cqe);

		if (err == -EAGAIN) {
			err = io_uring_submit_and_wait(&b->ring, 1);
			if (err < 0 && err != -EINTR && err != -EAGAIN && err != -EBUSY)
				return; /* the ring is unusable: nothing more will complete */
			continue;
		}
		if (err < 0)
			return;
		r = blk_cqe_req(b, cqe);
		io_uring_cqe_seen(&b->ring, cqe);
		if (r)
			blk_release(b, r);
	}
}

/*
 * Check c against the header it starts with (read into *h): layout, data
 * direction, length and sector range. Returns VIRTIO_BLK_S_OK with the data
 * length in *data, or the status to answer with.
 */
static uint8_t blk_check(const struct blk *b, const struct virtq_chain *c, struct virtio_blk_outhdr *h,
			 uint64_t *data)
{
	*data = 0;
	if (c->read_len < BLK_HDR || virtq_chain_from(c, 0, h, BLK_HDR) != BLK_HDR)
		return VIRTIO_BLK_S_IOERR;
	switch (h->type) {
	case VIRTIO_BLK_T_IN:
		if (c->read_len != BLK_HDR)
			return VIRTIO_BLK_S_IOERR; /* data must be device-writable */
		*data = c->write_len - 1;
		break;
	case VIRTIO_BLK_T_OUT:
		if (c->write_len != 1 || b->read_only)
			return VIRTIO_BLK_S_IOERR; /* data must be device-readable; a read-only disk takes none */
		*data = c->read_len - BLK_HDR;
		break;
	case VIRTIO_BLK_T_FLUSH:
		return c->read_len == BLK_HDR && c->write_len == 1 ? VIRTIO_BLK_S_OK : VIRTIO_BLK_S_IOERR;
	case VIRTIO_BLK_T_GET_ID:
		return c->read_len == BLK_HDR ? VIRTIO_BLK_S_OK : VIRTIO_BLK_S_IOERR;
	default:
		return VIRTIO_BLK_S_UNSUPP;
	}
	if (*data > BLK_MAX_DATA || *data % BLK_SECTOR || h->sector > b->capacity ||
	    *data / BLK_SECTOR > b->capacity - h->sector)
		return VIRTIO_BLK_S_IOERR;
	return VIRTIO_BLK_S_OK;
}

/* Answer one request at once, or hand it to io_uring in a free slot. -EINVAL: no status byte to answer in. */
static int blk_start(struct blk *b, const struct virtq_chain *c)
{
	const struct virtq_seg *last = c->n ? &c->seg[c->n - 1] : NULL;
	struct virtio_blk_outhdr h;
	struct blk_req *r;
	uint8_t *status, st;
	uint64_t data;
	uint32_t n;

	if (!last || !last->write || last->len == 0)
		return -EINVAL;
	status = last->ptr + last->len - 1;
	st = blk_check(b, c, &h, &data);
	if (st != VIRTIO_BLK_S_OK) {
		blk_done(b, c->head, status, st, 1);
		return 0;
	}
	if (h.type == VIRTIO_BLK_T_GET_ID) {
		n = (uint32_t)(c->write_len - 1 < BLK_SERIAL_MAX ? c->write_len - 1 : BLK_SERIAL_MAX);
		virtq_chain_to(c, 0, b->serial, n);
		blk_done(b, c->head, status, VIRTIO_BLK_S_OK, n + 1);
		return 0;
	}
	if (h.type == VIRTIO_BLK_T_FLUSH ? b->read_only : data == 0) {
		blk_done(b, c->head, status, VIRTIO_BLK_S_OK, 1); /* nothing to write back, or to move */
		return 0;
	}
	r = &b->req[b->free_slot[--b->nfree]]; /* blk_process() made sure there is one */
	memset(r, 0, offsetof(struct blk_req, iov));
	r->busy = true;
	b->inflight++;
	r->type = h.type;
	r->head = c->head;
	r->status = status;
	r->written = h.type == VIRTIO_BLK_T_IN ? (uint32_t)data + 1 : 1;
	r->off = h.sector * BLK_SECTOR;
	r->left = data;
	if (h.type == VIRTIO_BLK_T_IN)
		r->niov = virtq_chain_iov(c, true, 0, data, r->iov, VIRTQ_MAX_SEGS);
	else if (h.type == VIRTIO_BLK_T_OUT)
		r->niov = virtq_chain_iov(c, false, BLK_HDR, data, r->iov, VIRTQ_MAX_SEGS);
	if (blk_submit(b, r) < 0) {
		blk_done(b, r->head, status, VIRTIO_BLK_S_IOERR, 1);
		blk_release(b, r);
	}
	return 0;
}

/* Take new requests while a slot is free (a guest never has more in flight than its queue holds). */
static void blk_process(struct blk *b)
{
	while (virtio_mmio_live(&b->mmio) && b->nfree) {
		int r = virtq_pop(blk_queue(b), &b->chain);

		if (r == 0)
			break;
		if (r < 0 || blk_start(b, &b->chain) < 0) {
			virtio_mmio_fail(&b->mmio);
			break;
		}
	}
}

/* Send what was queued and interrupt the guest once if it wants it. */
static void blk_flush_out(struct blk *b)
{
	blk_submit_all(b);
	if (b->pushed && virtq_want_irq(blk_queue(b)) && virtio_mmio_live(&b->mmio))
		virtio_mmio_signal(&b->mmio);
	b->pushed = false;
}

/* Loop thread: io_uring posted completions. */
static void blk_event_cb(void *opaque, int fd, uint32_t revents)
{
	struct blk *b = opaque;
	uint64_t cnt;

	(void)revents;
	if (read(fd, &cnt, sizeof(cnt)) < 0) {
		/* spurious wake-up: the CQ ring is the truth */
	}
	virtio_mmio_lock(&b->mmio);
	blk_reap(b);
	blk_process(b); /* slots came free: take what waited */
	if (b->restored)
		b->pushed = true;
	b->restored = false;
	if (b->resized)
		virtio_mmio_config_changed(&b->mmio);
	b->resized = false;
	blk_flush_out(b);
	virtio_mmio_unlock(&b->mmio);
}

/* ---- transport ops (transport lock held) ---- */

static void blk_config_read(void *dev, uint32_t off, void *data, uint32_t len)
{
	struct blk *b = dev;

	memcpy(data, (uint8_t *)&b->config + off, len);
}

static void blk_queue_notify(void *dev, unsigned q)
{
	struct blk *b = dev;

	(void)q;
	blk_process(b);
	blk_flush_out(b);
}

/* vCPU thread, queues already reset: the reset completes only once the kernel is done with guest memory. */
static void blk_reset(void *dev)
{
	struct blk *b = dev;
	unsigned i;

	blk_drain(b);
	if (b->inflight)
		return; /* the ring failed: keep the slots busy rather than reuse them */
	b->nfree = 0;
	for (i = BLK_QUEUE_MAX; i-- > 0;)
		b->free_slot[b->nfree++] = (uint16_t)i;
	b->pushed = false;
}

static const struct virtio_dev_ops blk_ops = {
	.device_id = VIRTIO_ID_BLOCK,
	.features = (1ull << VIRTIO_BLK_F_SEG_MAX) | (1ull << VIRTIO_BLK_F_FLUSH),
	.nr_queues = 1,
	.queue_max = BLK_QUEUE_MAX,
	.config_size = sizeof(struct virtio_blk_config),
	.config_read = blk_config_read,
	.queue_notify = blk_queue_notify,
	.reset = blk_reset,
};

/* ---- lifetime ---- */

/* Bytes in the image behind fd: a regular file's size or a block device's. */
static int blk_file_size(int fd, uint64_t *size)
{
	struct stat st;

	if (fstat(fd, &st) < 0)
		return -errno;
	if (S_ISREG(st.st_mode)) {
		*size = (uint64_t)st.st_size;
		return 0;
	}
	if (S_ISBLK(st.st_mode))
		return ioctl(fd, BLKGETSIZE64, size) < 0 ? -errno : 0;
	return -EINVAL;
}

int blk_new(struct vm *vm, const struct blk_config *cfg, struct blk **out)
{
	struct blk *b = NULL;
	uint64_t size = 0;
	size_t serial_len = cfg->serial ? strlen(cfg->serial) : 0;
	unsigned i;
	int err;

	*out = NULL;
	if (!vm->loop || !cfg->path || serial_len > BLK_SERIAL_MAX)
		return -EINVAL;
	b = calloc(1, sizeof(*b));
	if (!b)
		return -ENOMEM;
	b->vm = vm;
	b->fd = b->efd = -1;
	b->read_only = cfg->read_only;
	memcpy(b->serial, cfg->serial ? cfg->serial : "", serial_len);
	for (i = BLK_QUEUE_MAX; i-- > 0;)
		b->free_slot[b->nfree++] = (uint16_t)i;
	b->ops = blk_ops;
	if (b->read_only)
		b->ops.features |= 1ull << VIRTIO_BLK_F_RO;

	b->fd = open(cfg->path, (b->read_only ? O_RDONLY : O_RDWR) | O_CLOEXEC);
	if (b->fd < 0) {
		err = -errno;
		goto out;
	}
	err = blk_file_size(b->fd, &size);
	if (err)
		goto out;
	err = -EINVAL;
	if (size % BLK_SECTOR)
		goto out;
	if (flock(b->fd, (b->read_only ? LOCK_SH : LOCK_EX) | LOCK_NB) < 0) {
		err = errno == EWOULDBLOCK ? -EBUSY : -errno;
		goto out;
	}
	b->capacity = size / BLK_SECTOR;
	b->config.capacity = b->capacity;
	b->config.seg_max = BLK_SEG_MAX;
	b->config.blk_size = BLK_SECTOR;

	err = uring_limit_init(BLK_QUEUE_MAX, &b->ring); /* CQ is twice as big: it never overflows */
	if (err)
		goto out;
	b->ring_ok = true;
	b->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	if (b->efd < 0) {
		err = -errno;
		goto out;
	}
	err = io_uring_register_eventfd(&b->ring, b->efd);
	if (!err)
		err = uring_limit_enable(&b->ring, blk_ring_ops, sizeof(blk_ring_ops));
	if (err)
		goto out;
	err = evloop_add(vm->loop, b->efd, POLLIN, blk_event_cb, b);
	if (err)
		goto out;
	b->efd_watched = true;
	err = virtio_mmio_init(&b->mmio, vm, cfg->base, cfg->gsi, &b->ops, b);
	if (err)
		goto out;
	*out = b;
out:
	if (err)
		blk_free(b);
	return err;
}

void blk_free(struct blk *b)
{
	if (!b)
		return;
	if (b->ring_ok)
		blk_drain(b); /* no other thread runs: the lock is not needed */
	virtio_mmio_destroy(&b->mmio);
	if (b->efd_watched)
		evloop_del(b->vm->loop, b->efd);
	if (b->ring_ok)
		io_uring_queue_exit(&b->ring);
	if (b->efd >= 0)
		close(b->efd);
	if (b->fd >= 0)
		close(b->fd);
	free(b);
}

uint64_t blk_capacity(const struct blk *b)
{
	return b->capacity;
}

/* ---- snapshot ---- */

struct blk_snap {
	uint64_t capacity;
	uint32_t read_only, reserved;
};

/* Run every posted request to completion; a paused guest posts no more, so this ends. */
static void blk_quiesce(struct blk *b)
{
	unsigned rounds;

	for (rounds = 0; rounds < 4 * BLK_QUEUE_MAX; rounds++) {
		int err;

		blk_process(b);
		blk_submit_all(b);
		if (!b->inflight)
			break;
		err = io_uring_submit_and_wait(&b->ring, 1);
		if (err < 0 && err != -EINTR && err != -EAGAIN && err != -EBUSY)
			break;
		blk_reap(b);
	}
	blk_flush_out(b);
}

void blk_save(struct blk *b, struct snap_writer *w, uint32_t index)
{
	struct blk_snap s = { b->capacity, b->read_only, 0 };

	virtio_mmio_lock(&b->mmio);
	blk_quiesce(b);
	virtio_mmio_save(&b->mmio, w, index);
	snap_put(w, SNAP_DEV_BLK, index, &s, sizeof(s));
	virtio_mmio_unlock(&b->mmio);
}

int blk_restore(struct blk *b, const struct snap_reader *r, uint32_t index)
{
	const struct blk_snap *s;
	uint32_t len = 0;
	uint64_t one = 1;
	int err;

	s = snap_get(r, SNAP_DEV_BLK, index, &len);
	if (!s || len != sizeof(*s) || s->read_only != b->read_only)
		return -EINVAL;
	/* Only a writable disk that was empty when the snapshot was taken may come back with
	 * another size: the guest cannot have used it, and learns the size from the interrupt. */
	if (s->capacity != b->capacity && (s->capacity != 0 || b->read_only))
		return -EINVAL;
	virtio_mmio_lock(&b->mmio);
	err = virtio_mmio_restore(&b->mmio, r, index);
	if (!err) {
		b->restored = true;
		b->resized = s->capacity != b->capacity;
		if (write(b->efd, &one, sizeof(one)) < 0) {
			/* counter saturated: the loop wakes anyway */
		}
	}
	virtio_mmio_unlock(&b->mmio);
	return err;
}
