/* Unit tests for csrc/vmm/virtio/net.c: a fake guest driver, the real evloop on a thread, a socketpair as the passt backend. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <linux/virtio_config.h>
#include <linux/virtio_mmio.h>
#include <linux/virtio_net.h>
#include <linux/virtio_ring.h>

#include "evloop.h"
#include "snapshot.h"
#include "virtio/mmio.h"
#include "virtio/net.h"
#include "virtio/queue.h"
#include "vm.h"

static const char *cur_test;

#define CHECK(cond)                                                                              \
	do {                                                                                     \
		if (!(cond)) {                                                                   \
			fprintf(stderr, "FAIL %s: %s:%d: %s\n", cur_test, __FILE__, __LINE__, #cond); \
			exit(1);                                                                 \
		}                                                                                \
	} while (0)

static int64_t now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void fill_pattern(uint8_t *p, size_t len, uint32_t seed)
{
	uint32_t x = seed * 2654435761u + 1;

	for (size_t i = 0; i < len; i++) {
		x ^= x << 13;
		x ^= x >> 17;
		x ^= x << 5;
		p[i] = (uint8_t)x;
	}
}

/* ---- fakes: vm.h, snapshot.h ---- */

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

static struct {
	uint32_t type, index, len;
	_Alignas(8) uint8_t data[4096];
} snaps[8];
static int nsnaps;

void snap_put(struct snap_writer *w, uint32_t type, uint32_t index, const void *data, uint32_t len)
{
	(void)w;
	CHECK(nsnaps < 8 && len <= sizeof(snaps[0].data));
	snaps[nsnaps].type = type;
	snaps[nsnaps].index = index;
	snaps[nsnaps].len = len;
	memcpy(snaps[nsnaps].data, data, len);
	nsnaps++;
}

const void *snap_get(const struct snap_reader *r, uint32_t type, uint32_t index, uint32_t *len)
{
	(void)r;
	for (int i = 0; i < nsnaps; i++)
		if (snaps[i].type == type && snaps[i].index == index) {
			*len = snaps[i].len;
			return snaps[i].data;
		}
	return NULL;
}

/* ---- the world: guest RAM, device, loop thread, backend peer ---- */

#define RAM_SIZE (16u << 20)
#define G_QSIZE 256u
#define G_QBASE(q) (0x10000ull + (uint64_t)(q) * 0x4000) /* desc, avail at +0x1000, used at +0x2000 */
#define G_RXBUF 0x100000ull                              /* RX buffers: 128 KiB each */
#define G_RXBUF_SIZE 0x20000u
#define G_TXBUF 0xa00000ull /* TX frames: 32 slots of 128 KiB, after the RX buffers */

struct gq {
	struct vring_desc *desc;
	struct vring_avail *avail;
	struct vring_used *used;
	uint16_t avail_idx, last_used;
	uint16_t free_stack[G_QSIZE];
	int nfree;
};

struct world {
	struct evloop *loop;
	struct vm *vm;
	struct net *net;
	pthread_t thread;
	int peer; /* the backend's (passt's) end */
	struct gq q[2];
};

struct gseg {
	uint64_t gpa;
	uint32_t len;
	bool write;
};

static uint8_t *gmem(struct world *w, uint64_t gpa)
{
	return w->vm->mem + gpa;
}

static uint32_t mr(struct world *w, uint64_t off)
{
	struct vm_mmio_dev *d = &w->vm->mmio[0];
	uint32_t v = 0xdeadbeef;

	d->access(d->opaque, off, &v, 4, false);
	return v;
}

static void mw(struct world *w, uint64_t off, uint32_t v)
{
	struct vm_mmio_dev *d = &w->vm->mmio[0];

	d->access(d->opaque, off, &v, 4, true);
}

static bool device_broken(struct world *w)
{
	return mr(w, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET;
}

static void g_probe(struct world *w)
{
	uint32_t lo;
	uint16_t mtu = 0;
	struct vm_mmio_dev *d = &w->vm->mmio[0];

	CHECK(mr(w, VIRTIO_MMIO_DEVICE_ID) == 1);
	mw(w, VIRTIO_MMIO_STATUS, 0);
	mw(w, VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER);
	mw(w, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
	lo = mr(w, VIRTIO_MMIO_DEVICE_FEATURES);
	CHECK(lo & (1u << VIRTIO_NET_F_MAC));
	CHECK(lo & (1u << VIRTIO_NET_F_MTU));
	d->access(d->opaque, VIRTIO_MMIO_CONFIG + 10, &mtu, 2, false);
	CHECK(mtu == NET_MTU);
	mw(w, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
	mw(w, VIRTIO_MMIO_DRIVER_FEATURES, 1);
	mw(w, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
	mw(w, VIRTIO_MMIO_DRIVER_FEATURES, lo);
	mw(w, VIRTIO_MMIO_STATUS, 0xb);
	CHECK(mr(w, VIRTIO_MMIO_STATUS) == 0xb);
	for (unsigned q = 0; q < 2; q++) {
		struct gq *g = &w->q[q];

		memset(gmem(w, G_QBASE(q)), 0, 0x3000);
		g->desc = (void *)gmem(w, G_QBASE(q));
		g->avail = (void *)gmem(w, G_QBASE(q) + 0x1000);
		g->used = (void *)gmem(w, G_QBASE(q) + 0x2000);
		g->avail_idx = g->last_used = 0;
		g->nfree = 0;
		for (int i = G_QSIZE - 1; i >= 0; i--)
			g->free_stack[g->nfree++] = (uint16_t)i;
		mw(w, VIRTIO_MMIO_QUEUE_SEL, q);
		mw(w, VIRTIO_MMIO_QUEUE_NUM, G_QSIZE);
		mw(w, VIRTIO_MMIO_QUEUE_DESC_LOW, (uint32_t)G_QBASE(q));
		mw(w, VIRTIO_MMIO_QUEUE_DESC_HIGH, 0);
		mw(w, VIRTIO_MMIO_QUEUE_AVAIL_LOW, (uint32_t)G_QBASE(q) + 0x1000);
		mw(w, VIRTIO_MMIO_QUEUE_AVAIL_HIGH, 0);
		mw(w, VIRTIO_MMIO_QUEUE_USED_LOW, (uint32_t)G_QBASE(q) + 0x2000);
		mw(w, VIRTIO_MMIO_QUEUE_USED_HIGH, 0);
		mw(w, VIRTIO_MMIO_QUEUE_READY, 1);
	}
	mw(w, VIRTIO_MMIO_STATUS, 0xf);
	CHECK(mr(w, VIRTIO_MMIO_STATUS) == 0xf);
}

static int gq_add(struct world *w, unsigned q, const struct gseg *s, int n)
{
	struct gq *g = &w->q[q];
	uint16_t idx[128];

	CHECK(n > 0 && n <= 128 && n <= g->nfree);
	for (int k = 0; k < n; k++)
		idx[k] = g->free_stack[--g->nfree];
	for (int k = 0; k < n; k++) {
		struct vring_desc *d = &g->desc[idx[k]];

		d->addr = s[k].gpa;
		d->len = s[k].len;
		d->flags = (uint16_t)((s[k].write ? VRING_DESC_F_WRITE : 0) | (k + 1 < n ? VRING_DESC_F_NEXT : 0));
		d->next = k + 1 < n ? idx[k + 1] : 0;
	}
	g->avail->ring[g->avail_idx % G_QSIZE] = idx[0];
	g->avail_idx++;
	__atomic_store_n(&g->avail->idx, g->avail_idx, __ATOMIC_RELEASE);
	mw(w, VIRTIO_MMIO_QUEUE_NOTIFY, q);
	return idx[0];
}

/* The next used entry of q within 10 s: its head and length. False if the device broke. */
static bool gq_wait(struct world *w, unsigned q, uint16_t *head, uint32_t *len)
{
	struct gq *g = &w->q[q];
	int64_t t0 = now_ms();

	while (__atomic_load_n(&g->used->idx, __ATOMIC_ACQUIRE) == g->last_used) {
		if (device_broken(w))
			return false;
		CHECK(now_ms() - t0 < 10000);
		poll(NULL, 0, 1);
	}
	struct vring_used_elem e = g->used->ring[g->last_used % G_QSIZE];
	g->last_used++;
	CHECK(e.id < G_QSIZE);
	for (uint16_t i = (uint16_t)e.id, n = 0; n < G_QSIZE; n++) {
		g->free_stack[g->nfree++] = i;
		if (!(g->desc[i].flags & VRING_DESC_F_NEXT))
			break;
		i = g->desc[i].next;
	}
	*head = (uint16_t)e.id;
	*len = e.len;
	return true;
}

static bool gq_idle(struct world *w, unsigned q, int ms)
{
	poll(NULL, 0, ms);
	return __atomic_load_n(&w->q[q].used->idx, __ATOMIC_ACQUIRE) == w->q[q].last_used;
}

static void *loop_main(void *opaque)
{
	evloop_run(opaque);
	return NULL;
}

static void world_init(struct world *w)
{
	struct net_config cfg = { .base = 0xd0005000, .gsi = 10, .mac = { 0x52, 0x54, 0, 0x12, 0x34, 0x56 } };
	int sp[2];

	memset(w, 0, sizeof(*w));
	CHECK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sp) == 0);
	CHECK(fcntl(sp[0], F_SETFL, O_NONBLOCK) == 0);
	cfg.backend_fd = sp[0];
	w->peer = sp[1];
	CHECK(evloop_new(&w->loop) == 0);
	w->vm = calloc(1, sizeof(*w->vm));
	CHECK(w->vm);
	w->vm->kvm_fd = w->vm->vm_fd = -1;
	w->vm->mem = aligned_alloc(4096, RAM_SIZE);
	CHECK(w->vm->mem);
	memset(w->vm->mem, 0, RAM_SIZE);
	w->vm->mem_size = RAM_SIZE;
	w->vm->loop = w->loop;
	w->vm->console_fd = -1;
	CHECK(net_new(w->vm, &cfg, &w->net) == 0);
	CHECK(pthread_create(&w->thread, NULL, loop_main, w->loop) == 0);
	g_probe(w);
}

static void world_fini(struct world *w)
{
	evloop_stop(w->loop);
	CHECK(pthread_join(w->thread, NULL) == 0);
	net_free(w->net);
	free(w->vm->mem);
	free(w->vm);
	evloop_free(w->loop);
	close(w->peer);
}

/* ---- helpers ---- */

/* Post a TX chain: header then frame, the frame split into nseg descriptors. */
static void g_tx(struct world *w, const struct virtio_net_hdr_v1 *h, uint32_t hlen, const uint8_t *frame,
		 uint32_t len, int nseg)
{
	static unsigned next;
	uint64_t base = G_TXBUF + (uint64_t)(next++ % 32) * 0x20000; /* chains in flight never share memory */
	struct gseg s[64];
	int n = 0;
	uint32_t off = 0;

	memcpy(gmem(w, base), h, hlen);
	s[n++] = (struct gseg){ base, hlen, false };
	memcpy(gmem(w, base + 0x1000), frame, len);
	for (int i = 0; i < nseg; i++) {
		uint32_t piece = i + 1 == nseg ? len - off : len / (uint32_t)nseg;

		s[n++] = (struct gseg){ base + 0x1000 + off, piece, false };
		off += piece;
	}
	gq_add(w, 1, s, n);
}

/* Read one length-prefixed frame from the backend peer within 10 s; returns its length. */
static uint32_t peer_frame(struct world *w, uint8_t *buf, uint32_t cap)
{
	uint32_t be, len, got = 0;
	struct pollfd p = { w->peer, POLLIN, 0 };

	CHECK(poll(&p, 1, 10000) == 1);
	CHECK(recv(w->peer, &be, 4, MSG_WAITALL) == 4);
	len = ntohl(be);
	CHECK(len <= cap);
	while (got < len) {
		ssize_t n = recv(w->peer, buf + got, len - got, 0);

		CHECK(n > 0);
		got += (uint32_t)n;
	}
	return len;
}

static bool peer_quiet(struct world *w, int ms)
{
	struct pollfd p = { w->peer, POLLIN, 0 };

	return poll(&p, 1, ms) == 0;
}

static void peer_send(struct world *w, const uint8_t *frame, uint32_t len)
{
	uint32_t be = htonl(len);

	CHECK(send(w->peer, &be, 4, MSG_NOSIGNAL) == 4);
	CHECK(len == 0 || send(w->peer, frame, len, MSG_NOSIGNAL) == (ssize_t)len);
}

static void g_rx_post(struct world *w, unsigned slot, uint32_t size)
{
	struct gseg s = { G_RXBUF + (uint64_t)slot * G_RXBUF_SIZE, size, true };

	gq_add(w, 0, &s, 1);
}

/* ---- tests ---- */

static void test_tx(void)
{
	struct world w;
	struct virtio_net_hdr_v1 h = { 0 };
	static uint8_t frame[NET_MAX_FRAME], got[NET_MAX_FRAME];
	uint16_t head;
	uint32_t used;

	cur_test = "tx";
	world_init(&w);
	for (uint32_t len = 14; len <= NET_MAX_FRAME; len = len * 3 + 1 > NET_MAX_FRAME && len != NET_MAX_FRAME
							      ? NET_MAX_FRAME : len * 3 + 1) {
		fill_pattern(frame, len, len);
		g_tx(&w, &h, sizeof(h), frame, len, len > 64 ? 5 : 1);
		CHECK(gq_wait(&w, 1, &head, &used) && used == 0);
		CHECK(peer_frame(&w, got, sizeof(got)) == len);
		CHECK(memcmp(got, frame, len) == 0);
	}
	/* NEEDS_CSUM: the device completes the checksum (a UDP-like layout, sum field at 40) */
	fill_pattern(frame, 200, 9);
	frame[40] = frame[41] = 0;
	h.flags = VIRTIO_NET_HDR_F_NEEDS_CSUM;
	h.csum_start = 34;
	h.csum_offset = 6;
	g_tx(&w, &h, sizeof(h), frame, 200, 3);
	CHECK(gq_wait(&w, 1, &head, &used));
	CHECK(peer_frame(&w, got, sizeof(got)) == 200);
	{
		uint32_t sum = 0;

		for (int i = 34; i < 200; i += 2)
			sum += (uint32_t)got[i] << 8 | got[i + 1];
		while (sum >> 16)
			sum = (sum & 0xffff) + (sum >> 16);
		CHECK(sum == 0xffff); /* a correct checksum sums to all ones */
		CHECK(memcmp(got, frame, 40) == 0 && memcmp(got + 42, frame + 42, 158) == 0);
	}
	world_fini(&w);
	printf("ok %s\n", cur_test);
}

static void test_tx_hostile(void)
{
	struct world w;
	struct virtio_net_hdr_v1 h = { 0 }, csum = { .flags = VIRTIO_NET_HDR_F_NEEDS_CSUM };
	static uint8_t frame[NET_MAX_FRAME + 100], got[NET_MAX_FRAME];
	uint16_t head;
	uint32_t used;
	struct gseg s[2];

	cur_test = "tx hostile";
	world_init(&w);
	fill_pattern(frame, sizeof(frame), 3);
	/* each of these is dropped: returned unused, nothing reaches the backend, the device lives */
	g_tx(&w, &h, 4, frame, 0, 0);                          /* shorter than the header */
	g_tx(&w, &h, sizeof(h), frame, 13, 1);                 /* runt frame */
	g_tx(&w, &h, sizeof(h), frame, NET_MAX_FRAME + 1, 20); /* over the limit */
	csum.csum_start = 60;
	csum.csum_offset = 0;
	g_tx(&w, &csum, sizeof(csum), frame, 60, 1); /* checksum start at the end */
	csum.csum_start = 20;
	csum.csum_offset = 39;
	g_tx(&w, &csum, sizeof(csum), frame, 60, 1); /* checksum field one byte past the end */
	csum.csum_start = 0xffff;
	csum.csum_offset = 0xffff;
	g_tx(&w, &csum, sizeof(csum), frame, 60, 1);
	h.gso_type = VIRTIO_NET_HDR_GSO_TCPV4; /* not offered */
	g_tx(&w, &h, sizeof(h), frame, 100, 1);
	h.gso_type = 0;
	for (int i = 0; i < 7; i++)
		CHECK(gq_wait(&w, 1, &head, &used) && used == 0);
	CHECK(peer_quiet(&w, 200));
	/* a writable descriptor in a TX chain is ignored past the readable part: the frame goes */
	s[0] = (struct gseg){ G_TXBUF, sizeof(h), false };
	memcpy(gmem(&w, G_TXBUF), &h, sizeof(h));
	s[1] = (struct gseg){ G_TXBUF + 0x1000, 60, false };
	gq_add(&w, 1, s, 2);
	CHECK(gq_wait(&w, 1, &head, &used));
	CHECK(peer_frame(&w, got, sizeof(got)) == 60);
	/* a descriptor outside guest RAM breaks the device (DEVICE_NEEDS_RESET), nothing else */
	s[1] = (struct gseg){ RAM_SIZE - 10, 100, false };
	gq_add(&w, 1, s, 2);
	CHECK(!gq_wait(&w, 1, &head, &used));
	CHECK(device_broken(&w));
	/* a reset and a new start bring it back */
	g_probe(&w);
	g_tx(&w, &h, sizeof(h), frame, 64, 2);
	CHECK(gq_wait(&w, 1, &head, &used));
	CHECK(peer_frame(&w, got, sizeof(got)) == 64 && memcmp(got, frame, 64) == 0);
	world_fini(&w);
	printf("ok %s\n", cur_test);
}

static void test_rx(void)
{
	struct world w;
	static uint8_t frame[NET_MAX_FRAME];
	uint16_t head;
	uint32_t used;
	struct virtio_net_hdr_v1 h;

	cur_test = "rx";
	world_init(&w);
	/* frames that come before any buffer wait (the backend is not read meanwhile) */
	for (uint32_t i = 0; i < 50; i++) {
		fill_pattern(frame, 60 + i, i);
		peer_send(&w, frame, 60 + i);
	}
	CHECK(gq_idle(&w, 0, 100));
	for (uint32_t i = 0; i < 50; i++) {
		g_rx_post(&w, 0, G_RXBUF_SIZE);
		CHECK(gq_wait(&w, 0, &head, &used));
		CHECK(used == sizeof(h) + 60 + i);
		memcpy(&h, gmem(&w, G_RXBUF), sizeof(h));
		CHECK(h.num_buffers == 1 && h.gso_type == 0);
		fill_pattern(frame, 60 + i, i);
		CHECK(memcmp(gmem(&w, G_RXBUF + sizeof(h)), frame, 60 + i) == 0); /* in order, byte-exact */
	}
	/* the largest frame */
	fill_pattern(frame, NET_MAX_FRAME, 5);
	peer_send(&w, frame, NET_MAX_FRAME);
	g_rx_post(&w, 1, G_RXBUF_SIZE);
	CHECK(gq_wait(&w, 0, &head, &used) && used == sizeof(h) + NET_MAX_FRAME);
	CHECK(memcmp(gmem(&w, G_RXBUF + G_RXBUF_SIZE + sizeof(h)), frame, NET_MAX_FRAME) == 0);
	/* a buffer too small for the frame: the frame is lost, the buffer takes the next one */
	peer_send(&w, frame, 2000);
	peer_send(&w, frame, 100);
	g_rx_post(&w, 2, 1500);
	CHECK(gq_wait(&w, 0, &head, &used) && used == sizeof(h) + 100);
	/* a flood of small frames with buffers recycled */
	for (int i = 0; i < 32; i++)
		g_rx_post(&w, (unsigned)i, 2048);
	for (uint32_t i = 0; i < 3000; i++) {
		uint32_t len = 60 + i % 1400;

		frame[0] = (uint8_t)i;
		frame[1] = (uint8_t)(i >> 8);
		peer_send(&w, frame, len);
		CHECK(gq_wait(&w, 0, &head, &used) && used == sizeof(h) + len);
		CHECK(gmem(&w, w.q[0].desc[head].addr)[sizeof(h)] == (uint8_t)i);
		gq_add(&w, 0, &(struct gseg){ w.q[0].desc[head].addr, 2048, true }, 1);
	}
	world_fini(&w);
	printf("ok %s\n", cur_test);
}

static void test_backend_hostile(void)
{
	struct world w;
	uint8_t frame[64] = { 0 }, b;
	uint16_t head;
	uint32_t used;
	uint32_t huge = htonl(NET_MAX_FRAME + 1);

	cur_test = "backend hostile";
	world_init(&w);
	g_rx_post(&w, 0, 2048);
	peer_send(&w, frame, 0); /* an empty frame: a runt, dropped */
	peer_send(&w, frame, 5);
	peer_send(&w, frame, 64);
	CHECK(gq_wait(&w, 0, &head, &used) && used == 12 + 64);
	/* a length over the limit ends the backend: the peer sees its socket close */
	CHECK(send(w.peer, &huge, 4, MSG_NOSIGNAL) == 4);
	{
		struct pollfd p = { w.peer, POLLIN, 0 };

		CHECK(poll(&p, 1, 10000) == 1);
		CHECK(recv(w.peer, &b, 1, 0) == 0);
	}
	/* the device still takes TX chains (dropped: no backend) */
	{
		struct virtio_net_hdr_v1 h = { 0 };

		g_tx(&w, &h, sizeof(h), frame, 64, 1);
		CHECK(gq_wait(&w, 1, &head, &used) && used == 0);
		CHECK(!device_broken(&w));
	}
	world_fini(&w);
	printf("ok %s\n", cur_test);
}

static void test_backend_gone(void)
{
	struct world w;
	uint8_t frame[64] = { 0 };
	struct virtio_net_hdr_v1 h = { 0 };
	uint16_t head;
	uint32_t used;

	cur_test = "backend gone";
	world_init(&w);
	close(w.peer);
	w.peer = open("/dev/null", O_RDONLY);
	g_rx_post(&w, 0, 2048);
	for (int i = 0; i < 10; i++) {
		g_tx(&w, &h, sizeof(h), frame, 64, 1);
		CHECK(gq_wait(&w, 1, &head, &used));
	}
	CHECK(!device_broken(&w));
	world_fini(&w);
	printf("ok %s\n", cur_test);
}

int main(void)
{
	setvbuf(stdout, NULL, _IONBF, 0);
	signal(SIGPIPE, SIG_IGN);
	test_tx();
	test_tx_hostile();
	test_rx();
	test_backend_hostile();
	test_backend_gone();
	printf("all net tests passed\n");
	return 0;
}
