/* io_uring event loop: one-shot POLL_ADD per watched fd, re-armed after each callback. */
#define _GNU_SOURCE
#include "evloop.h"

#include <errno.h>
#include <liburing.h>
#include <poll.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "uring_limit.h"

#define EVLOOP_QUEUE_DEPTH 256
#define EVLOOP_MAX_WATCH 1024

/* The only operations the loop submits (uring_limit.h). */
static const unsigned char evloop_ops[] = { IORING_OP_POLL_ADD, IORING_OP_POLL_REMOVE };

struct evloop_watch {
	int fd;          /* -1: free slot */
	uint32_t events; /* wanted mask; 0 = paused */
	uint32_t gen;    /* bumped on del so stale completions are ignored */
	bool armed;      /* a POLL_ADD is in flight */
	bool cancelling; /* a POLL_REMOVE is in flight for the armed poll */
	evloop_cb cb;
	void *opaque;
};

struct evloop {
	struct io_uring ring;
	int stop_fd;
	_Atomic bool stopping; /* written by evloop_stop() from any thread */
	struct evloop_watch w[EVLOOP_MAX_WATCH];
};

/* user_data: slot in the low 16 bits, generation above, bit 63 marks a POLL_REMOVE. */
#define EVLOOP_REMOVE_BIT (1ull << 63)

static uint64_t evloop_tag(struct evloop *l, int slot)
{
	return ((uint64_t)l->w[slot].gen << 16) | (uint64_t)slot;
}

static struct io_uring_sqe *evloop_sqe(struct evloop *l)
{
	struct io_uring_sqe *sqe = io_uring_get_sqe(&l->ring);

	if (!sqe) {
		io_uring_submit(&l->ring);
		sqe = io_uring_get_sqe(&l->ring);
	}
	return sqe;
}

static int evloop_arm(struct evloop *l, int slot)
{
	struct evloop_watch *w = &l->w[slot];
	struct io_uring_sqe *sqe;

	if (w->armed || !w->events)
		return 0;
	sqe = evloop_sqe(l);
	if (!sqe)
		return -EBUSY;
	io_uring_prep_poll_add(sqe, w->fd, w->events);
	io_uring_sqe_set_data64(sqe, evloop_tag(l, slot));
	w->armed = true;
	return 0;
}

static int evloop_cancel(struct evloop *l, int slot)
{
	struct evloop_watch *w = &l->w[slot];
	struct io_uring_sqe *sqe;

	if (!w->armed || w->cancelling)
		return 0;
	sqe = evloop_sqe(l);
	if (!sqe)
		return -EBUSY;
	io_uring_prep_poll_remove(sqe, evloop_tag(l, slot));
	io_uring_sqe_set_data64(sqe, evloop_tag(l, slot) | EVLOOP_REMOVE_BIT);
	w->cancelling = true;
	return 0;
}

static int evloop_find(struct evloop *l, int fd)
{
	for (int i = 0; i < EVLOOP_MAX_WATCH; i++)
		if (l->w[i].fd == fd)
			return i;
	return -1;
}

int evloop_new(struct evloop **out)
{
	struct evloop *l = calloc(1, sizeof(*l));
	int ret;

	if (!l)
		return -ENOMEM;
	for (int i = 0; i < EVLOOP_MAX_WATCH; i++)
		l->w[i].fd = -1;
	l->stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (l->stop_fd < 0) {
		ret = -errno;
		free(l);
		return ret;
	}
	ret = uring_limit_init(EVLOOP_QUEUE_DEPTH, &l->ring);
	if (ret >= 0 && (ret = uring_limit_enable(&l->ring, evloop_ops, sizeof(evloop_ops))) < 0)
		io_uring_queue_exit(&l->ring);
	if (ret < 0) {
		close(l->stop_fd);
		free(l);
		return ret;
	}
	*out = l;
	return 0;
}

void evloop_free(struct evloop *l)
{
	if (!l)
		return;
	io_uring_queue_exit(&l->ring);
	close(l->stop_fd);
	free(l);
}

int evloop_add(struct evloop *l, int fd, uint32_t events, evloop_cb cb, void *opaque)
{
	int slot;

	if (fd < 0 || !cb)
		return -EINVAL;
	if (evloop_find(l, fd) >= 0)
		return -EEXIST;
	slot = evloop_find(l, -1);
	if (slot < 0)
		return -ENOSPC;
	l->w[slot].fd = fd;
	l->w[slot].events = events;
	l->w[slot].cb = cb;
	l->w[slot].opaque = opaque;
	l->w[slot].armed = false;
	l->w[slot].cancelling = false;
	return evloop_arm(l, slot);
}

int evloop_mod(struct evloop *l, int fd, uint32_t events)
{
	int slot = evloop_find(l, fd);

	if (slot < 0)
		return -ENOENT;
	if (l->w[slot].events == events)
		return 0;
	l->w[slot].events = events;
	/* An armed poll with the old mask is cancelled; its completion re-arms. */
	if (l->w[slot].armed)
		return evloop_cancel(l, slot);
	return evloop_arm(l, slot);
}

int evloop_del(struct evloop *l, int fd)
{
	int slot = evloop_find(l, fd);
	int ret = 0;

	if (slot < 0)
		return -ENOENT;
	if (l->w[slot].armed)
		ret = evloop_cancel(l, slot);
	/* Forget the slot: completions carrying the old generation are dropped. */
	l->w[slot].fd = -1;
	l->w[slot].gen++;
	l->w[slot].armed = false;
	l->w[slot].cancelling = false;
	return ret;
}

static void evloop_complete(struct evloop *l, struct io_uring_cqe *cqe)
{
	uint64_t tag = io_uring_cqe_get_data64(cqe);
	int slot = (int)(tag & 0xffff);
	uint32_t gen = (uint32_t)((tag & ~EVLOOP_REMOVE_BIT) >> 16);
	struct evloop_watch *w;

	if (slot >= EVLOOP_MAX_WATCH)
		return;
	w = &l->w[slot];
	if (w->fd < 0 || w->gen != gen)
		return; /* deleted meanwhile */
	if (tag & EVLOOP_REMOVE_BIT) {
		w->cancelling = false;
		return;
	}
	w->armed = false;
	w->cancelling = false;
	if (cqe->res > 0)
		w->cb(w->opaque, w->fd, (uint32_t)cqe->res);
	/* The callback may have deleted the watch or changed its mask. */
	if (w->fd >= 0 && w->gen == gen)
		evloop_arm(l, slot);
}

static void evloop_on_stop(void *opaque, int fd, uint32_t revents)
{
	struct evloop *l = opaque;
	uint64_t v;

	(void)revents;
	if (read(fd, &v, sizeof(v)) < 0 && errno != EAGAIN)
		return;
	l->stopping = true;
}

int evloop_run(struct evloop *l)
{
	int ret = evloop_add(l, l->stop_fd, POLLIN, evloop_on_stop, l);

	if (ret < 0 && ret != -EEXIST)
		return ret;
	while (!l->stopping) {
		struct io_uring_cqe *cqe;
		unsigned head, n = 0;

		ret = io_uring_submit_and_wait(&l->ring, 1);
		if (ret < 0 && ret != -EINTR)
			return ret;
		io_uring_for_each_cqe(&l->ring, head, cqe) {
			evloop_complete(l, cqe);
			n++;
		}
		io_uring_cq_advance(&l->ring, n);
	}
	return 0;
}

void evloop_stop(struct evloop *l)
{
	uint64_t one = 1;
	ssize_t r = write(l->stop_fd, &one, sizeof(one));

	(void)r;
	l->stopping = true;
}
