/* A fake evloop.h for device tests and fuzz harnesses: poll() over the watches (fake_loop.h). */
#define _GNU_SOURCE
#include "fake_loop.h"

#include <errno.h>
#include <poll.h>
#include <stdbool.h>
#include <stdlib.h>

struct evloop {
	struct {
		int fd;
		uint32_t events;
		evloop_cb cb;
		void *opaque;
		bool on;
		unsigned gen;
	} w[FAKE_LOOP_MAX];
	int stop;
};

int evloop_new(struct evloop **out)
{
	*out = calloc(1, sizeof(**out));
	return *out ? 0 : -ENOMEM;
}

void evloop_free(struct evloop *l)
{
	free(l);
}

static int fake_loop_find(struct evloop *l, int fd)
{
	int i;

	for (i = 0; i < FAKE_LOOP_MAX; i++)
		if (l->w[i].on && l->w[i].fd == fd)
			return i;
	return -1;
}

int evloop_add(struct evloop *l, int fd, uint32_t events, evloop_cb cb, void *opaque)
{
	int i;

	if (fake_loop_find(l, fd) >= 0)
		return -EEXIST;
	for (i = 0; i < FAKE_LOOP_MAX && l->w[i].on; i++)
		;
	if (i == FAKE_LOOP_MAX)
		return -ENOSPC;
	l->w[i].fd = fd;
	l->w[i].events = events;
	l->w[i].cb = cb;
	l->w[i].opaque = opaque;
	l->w[i].on = true;
	l->w[i].gen++;
	return 0;
}

int evloop_mod(struct evloop *l, int fd, uint32_t events)
{
	int i = fake_loop_find(l, fd);

	if (i < 0)
		return -ENOENT;
	l->w[i].events = events;
	return 0;
}

int evloop_del(struct evloop *l, int fd)
{
	int i = fake_loop_find(l, fd);

	if (i < 0)
		return -ENOENT;
	l->w[i].on = false;
	l->w[i].gen++;
	return 0;
}

int fake_loop_watches(struct evloop *l)
{
	int i, n = 0;

	for (i = 0; i < FAKE_LOOP_MAX; i++)
		n += l->w[i].on;
	return n;
}

int fake_loop_once(struct evloop *l, int timeout_ms)
{
	struct pollfd pfd[FAKE_LOOP_MAX];
	int idx[FAKE_LOOP_MAX];
	unsigned gen[FAKE_LOOP_MAX];
	int i, n = 0, r, ran = 0;

	for (i = 0; i < FAKE_LOOP_MAX; i++) {
		if (!l->w[i].on || !l->w[i].events)
			continue;
		pfd[n] = (struct pollfd){ .fd = l->w[i].fd, .events = (short)l->w[i].events };
		idx[n] = i;
		gen[n] = l->w[i].gen;
		n++;
	}
	r = poll(pfd, (nfds_t)n, timeout_ms);
	if (r <= 0)
		return 0;
	for (i = 0; i < n; i++) {
		int k = idx[i];

		if (!pfd[i].revents || !l->w[k].on || l->w[k].gen != gen[i])
			continue;
		l->w[k].cb(l->w[k].opaque, pfd[i].fd, (uint32_t)pfd[i].revents);
		ran++;
	}
	return ran;
}

void fake_loop_settle(struct evloop *l, int rounds)
{
	while (rounds-- > 0 && fake_loop_once(l, 0) > 0)
		;
}

int evloop_run(struct evloop *l)
{
	while (!__atomic_load_n(&l->stop, __ATOMIC_ACQUIRE))
		fake_loop_once(l, 10);
	return 0;
}

void evloop_stop(struct evloop *l)
{
	__atomic_store_n(&l->stop, 1, __ATOMIC_RELEASE);
}
