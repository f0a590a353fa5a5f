/*
 * Shared by the libFuzzer harnesses of the virtio devices: a fake VM (guest RAM
 * in a heap buffer, MMIO dispatch), a poll()-based evloop run inline, and
 * in-memory snapshot sections. Same approach as tests/c/test_virtio.c; each
 * harness is one translation unit, so the fakes are defined here.
 */
#ifndef SMOLVM_FUZZ_COMMON_H
#define SMOLVM_FUZZ_COMMON_H

#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "evloop.h"
#include "snapshot.h"
#include "vm.h"

#define FUZZ_CHECK(cond)                                                                  \
	do {                                                                              \
		if (!(cond)) {                                                            \
			fprintf(stderr, "fuzz harness: %s:%d: %s\n", __FILE__, __LINE__, #cond); \
			abort();                                                          \
		}                                                                         \
	} while (0)

/* ---- input reader: a cursor over the fuzzer's bytes; reads past the end give zeros ---- */

struct fuzz_in {
	const uint8_t *p;
	size_t n, off;
};

static inline bool fuzz_more(const struct fuzz_in *in)
{
	return in->off < in->n;
}

static inline uint8_t fuzz_u8(struct fuzz_in *in)
{
	return in->off < in->n ? in->p[in->off++] : 0;
}

static inline uint16_t fuzz_u16(struct fuzz_in *in)
{
	uint16_t lo = fuzz_u8(in);

	return (uint16_t)(lo | (uint16_t)fuzz_u8(in) << 8);
}

static inline uint32_t fuzz_u32(struct fuzz_in *in)
{
	uint32_t lo = fuzz_u16(in);

	return lo | (uint32_t)fuzz_u16(in) << 16;
}

static inline uint64_t fuzz_u64(struct fuzz_in *in)
{
	uint64_t lo = fuzz_u32(in);

	return lo | (uint64_t)fuzz_u32(in) << 32;
}

/* Copy up to len input bytes to dst (zero-filled when the input runs out). */
static inline void fuzz_bytes(struct fuzz_in *in, void *dst, size_t len)
{
	size_t have = in->n - in->off < len ? in->n - in->off : len;

	memcpy(dst, in->p + in->off, have);
	memset((uint8_t *)dst + have, 0, len - have);
	in->off += have;
}

/* ---- fakes: vm.h ---- */

int vm_add_mmio(struct vm *vm, uint64_t base, uint64_t len, void (*access)(void *, uint64_t, void *, uint32_t, bool),
		void *opaque)
{
	if (vm->nr_mmio >= VM_MAX_MMIO_DEVS)
		return -ENOSPC;
	vm->mmio[vm->nr_mmio++] = (struct vm_mmio_dev){ base, len, access, opaque };
	return 0;
}

int vm_irq_line(struct vm *vm, uint32_t gsi, int level)
{
	(void)vm;
	(void)gsi;
	(void)level;
	return 0;
}

void vm_request_exit(struct vm *vm, int reason, const char *msg)
{
	vm->exit_reason = reason;
	snprintf(vm->exit_msg, sizeof(vm->exit_msg), "%s", msg);
}

static inline struct vm *fuzz_vm_new(uint64_t ram, struct evloop *loop)
{
	struct vm *vm = calloc(1, sizeof(*vm));

	FUZZ_CHECK(vm);
	vm->kvm_fd = vm->vm_fd = -1; /* no KVM: ioeventfd/irqfd fall back */
	vm->mem = aligned_alloc(4096, ram);
	FUZZ_CHECK(vm->mem);
	memset(vm->mem, 0, ram);
	vm->mem_size = ram;
	vm->loop = loop;
	vm->console_fd = -1;
	return vm;
}

/* A 32-bit register access as a vCPU makes it, on the device registered last. */
static inline uint32_t fuzz_mr(struct vm *vm, uint64_t off)
{
	struct vm_mmio_dev *d = &vm->mmio[vm->nr_mmio - 1];
	uint32_t v = 0;

	d->access(d->opaque, off, &v, 4, false);
	return v;
}

static inline void fuzz_mw(struct vm *vm, uint64_t off, uint32_t v)
{
	struct vm_mmio_dev *d = &vm->mmio[vm->nr_mmio - 1];

	d->access(d->opaque, off, &v, 4, true);
}

/* ---- fakes: snapshot.h (sections kept in memory; unused by most harnesses) ---- */

void snap_put(struct snap_writer *w, uint32_t type, uint32_t index, const void *data, uint32_t len)
{
	(void)w;
	(void)type;
	(void)index;
	(void)data;
	(void)len;
}

const void *snap_get(const struct snap_reader *r, uint32_t type, uint32_t index, uint32_t *len)
{
	(void)r;
	(void)type;
	(void)index;
	*len = 0;
	return NULL;
}

/* ---- fakes: evloop.h, poll()-based, run inline by the harness ---- */

#define FUZZ_EV_MAX 32 /* watches: listening socket, work and notify eventfds, a few clients */

struct evloop {
	struct {
		int fd;
		uint32_t events;
		evloop_cb cb;
		void *opaque;
		bool on;
		unsigned gen;
	} w[FUZZ_EV_MAX];
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

static int fuzz_ev_find(struct evloop *l, int fd)
{
	int i;

	for (i = 0; i < FUZZ_EV_MAX; i++)
		if (l->w[i].on && l->w[i].fd == fd)
			return i;
	return -1;
}

int evloop_add(struct evloop *l, int fd, uint32_t events, evloop_cb cb, void *opaque)
{
	int i;

	if (fuzz_ev_find(l, fd) >= 0)
		return -EEXIST;
	for (i = 0; i < FUZZ_EV_MAX && l->w[i].on; i++)
		;
	if (i == FUZZ_EV_MAX)
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
	int i = fuzz_ev_find(l, fd);

	if (i < 0)
		return -ENOENT;
	l->w[i].events = events;
	return 0;
}

int evloop_del(struct evloop *l, int fd)
{
	int i = fuzz_ev_find(l, fd);

	if (i < 0)
		return -ENOENT;
	l->w[i].on = false;
	l->w[i].gen++;
	return 0;
}

int evloop_run(struct evloop *l)
{
	(void)l;
	return -ENOSYS; /* harnesses call fuzz_loop_once() */
}

void evloop_stop(struct evloop *l)
{
	(void)l;
}

/* One poll() round; callbacks of watches deleted meanwhile are skipped. Returns the callbacks run. */
static inline int fuzz_loop_once(struct evloop *l, int timeout_ms)
{
	struct pollfd pfd[FUZZ_EV_MAX];
	int idx[FUZZ_EV_MAX];
	unsigned gen[FUZZ_EV_MAX];
	int i, n = 0, r, ran = 0;

	for (i = 0; i < FUZZ_EV_MAX; i++) {
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

/* Run the loop until it goes quiet (at most `rounds` rounds). */
static inline void fuzz_loop_settle(struct evloop *l, int rounds)
{
	while (rounds-- > 0 && fuzz_loop_once(l, 0) > 0)
		;
}

#endif
