/* Unit tests for csrc/virtio: split queue, virtio-mmio transport and vsock, driven by a fake Linux guest. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <linux/kvm.h>
#include <linux/virtio_config.h>
#include <linux/virtio_mmio.h>
#include <linux/virtio_ring.h>
#include <linux/virtio_vsock.h>

#include "evloop.h"
#include "fake_driver.h"
#include "fake_loop.h"
#include "fake_test.h"
#include "fake_vm.h"
#include "proto.h"
#include "virtio/mmio.h"
#include "virtio/queue.h"
#include "virtio/vsock.h"
#include "vm.h"

#define RAM_SIZE (16u << 20)
#define G_QSIZE 256u

/* Tests run the loop inline (fake_loop_once) unless `threaded`, where a thread runs evloop_run(). */
static bool threaded;

/* Give the device time: run the loop here, or just wait for the loop thread. */
static void idle(struct evloop *l, int ms)
{
	if (threaded)
		poll(NULL, 0, ms);
	else
		fake_loop_once(l, ms);
}

/* ------------------------------------------------------------------ fake guest: Linux virtio_vsock */

#define G_RX_BUFS 64
#define G_RX_DATA 4096u
#define G_RX_BASE 0x100000ull
#define G_EV_BASE 0x200000ull
#define G_TX_SLOTS 48
#define G_TX_BASE 0x300000ull
#define G_TX_SLOT 0x12000ull
#define G_SCRATCH 0x900000ull
#define G_MAX_CONNS 96
#define G_CID 3u
#define HDR 44u

enum { RXQ, TXQ, EVQ };
enum rx_mode { RX_LINUX, RX_WEIRD, RX_ONE };
enum tx_split { TX_TWO, TX_ONE, TX_WEIRD };

struct gconn {
	bool used, closed;
	uint32_t gport, hport;
	uint32_t buf_alloc, fwd_cnt, fwd_told, rx_total;
	uint32_t tx_cnt, peer_buf_alloc, peer_fwd_cnt;
	uint8_t *data;
	size_t data_len, data_cap;
	uint32_t shut;
	bool got_rst;
};

struct guest {
	struct vm *vm;
	struct evloop *loop;
	struct fake_ring q[3];
	struct {
		struct fake_seg seg[8];
		int n;
	} rx[G_RX_BUFS];
	enum rx_mode rx_mode;
	enum tx_split tx_split;
	bool tx_busy[G_TX_SLOTS];
	struct gconn c[G_MAX_CONNS];
	uint32_t listen[4];
	int nlisten;
	uint32_t buf_alloc;     /* window given to new connections */
	bool consume;           /* application reads what arrives */
	bool rst_on_shutdown;   /* answer a full SHUTDOWN with RST, as Linux does when idle */
	uint32_t isr_seen; /* InterruptStatus bits acknowledged so far */
	bool tiny_first; /* post RX buffers too small for a header ahead of the real ones */
	int events, last_event;
	int rst_unknown;
	struct virtio_vsock_hdr last_rst;
	int violations;
};

static void g_kick(struct guest *g, unsigned q)
{
	fake_vm_mw(g->vm, VIRTIO_MMIO_QUEUE_NOTIFY, q);
}

static void g_post_rx(struct guest *g, int slot)
{
	uint64_t b = G_RX_BASE + (uint64_t)slot * 0x2000;
	int n = 0;

	if (g->rx_mode == RX_LINUX) {
		g->rx[slot].seg[n++] = (struct fake_seg){ b, HDR, true };
		g->rx[slot].seg[n++] = (struct fake_seg){ b + 0x100, G_RX_DATA, true };
	} else if (g->rx_mode == RX_ONE) {
		g->rx[slot].seg[n++] = (struct fake_seg){ b, HDR + G_RX_DATA, true };
	} else { /* header cut in three, payload in three odd pieces */
		g->rx[slot].seg[n++] = (struct fake_seg){ b, 3, true };
		g->rx[slot].seg[n++] = (struct fake_seg){ b + 0x10, 30, true };
		g->rx[slot].seg[n++] = (struct fake_seg){ b + 0x40, 20, true };
		g->rx[slot].seg[n++] = (struct fake_seg){ b + 0x100, 1, true };
		g->rx[slot].seg[n++] = (struct fake_seg){ b + 0x200, 1000, true };
		g->rx[slot].seg[n++] = (struct fake_seg){ b + 0x800, 777, true };
	}
	g->rx[slot].n = n;
	CHECK(fake_ring_add(&g->q[RXQ], g->rx[slot].seg, n, slot) >= 0);
}

static void g_gather(struct guest *g, const struct fake_seg *s, int n, uint8_t *dst, uint32_t len)
{
	int k;

	for (k = 0; k < n && len; k++) {
		uint32_t m = s[k].len < len ? s[k].len : len;

		memcpy(dst, g->vm->mem + s[k].gpa, m);
		dst += m;
		len -= m;
	}
}

static int g_tx_slot(struct guest *g)
{
	int tag, i, tries;
	uint32_t len;

	for (tries = 0; tries < 2000; tries++) {
		while (fake_ring_used(&g->q[TXQ], &tag, &len))
			g->tx_busy[tag] = false;
		for (i = 0; i < G_TX_SLOTS; i++)
			if (!g->tx_busy[i] && g->q[TXQ].nfree >= 8)
				return i;
		idle(g->loop, 1); /* let the device consume TX */
	}
	CHECK(!"no free TX slot");
	return -1;
}

/* Send one packet the way the Linux driver does (header and payload as separate descriptors). */
static void g_send_split(struct guest *g, const struct virtio_vsock_hdr *h, const void *payload, uint32_t len,
			 enum tx_split split)
{
	int slot = g_tx_slot(g), n = 0;
	uint64_t b = G_TX_BASE + (uint64_t)slot * G_TX_SLOT;
	struct fake_seg s[8];

	CHECK(len <= 0x10000);
	memcpy(g->vm->mem + b, h, HDR);
	if (len)
		memcpy(g->vm->mem + b + HDR, payload, len);
	if (split == TX_ONE || (split == TX_TWO && !len)) {
		s[n++] = (struct fake_seg){ b, HDR + len, false };
	} else if (split == TX_TWO) {
		s[n++] = (struct fake_seg){ b, HDR, false };
		s[n++] = (struct fake_seg){ b + HDR, len, false };
	} else { /* 1 + 7 + 30 + (6 + a bit of payload) + rest of payload in two */
		uint32_t rest = HDR + len, cut[4] = { 1, 7, 30, 6 + (len > 5 ? 5 : len) };
		uint64_t at = b;
		int k;

		for (k = 0; k < 4; k++) {
			s[n++] = (struct fake_seg){ at, cut[k], false };
			at += cut[k];
			rest -= cut[k];
		}
		if (rest) {
			s[n++] = (struct fake_seg){ at, rest / 2, false };
			s[n++] = (struct fake_seg){ at + rest / 2, rest - rest / 2, false };
		}
	}
	g->tx_busy[slot] = true;
	CHECK(fake_ring_add(&g->q[TXQ], s, n, slot) >= 0);
	g_kick(g, TXQ);
}

static void g_send(struct guest *g, const struct virtio_vsock_hdr *h, const void *payload, uint32_t len)
{
	g_send_split(g, h, payload, len, g->tx_split);
}

static struct gconn *g_find(struct guest *g, uint32_t gport, uint32_t hport)
{
	int i;

	for (i = 0; i < G_MAX_CONNS; i++)
		if (g->c[i].used && !g->c[i].closed && g->c[i].gport == gport && g->c[i].hport == hport)
			return &g->c[i];
	return NULL;
}

static void g_hdr(struct guest *g, struct gconn *c, uint16_t op, struct virtio_vsock_hdr *h)
{
	(void)g;
	memset(h, 0, sizeof(*h));
	h->src_cid = G_CID;
	h->dst_cid = 2;
	h->src_port = c->gport;
	h->dst_port = c->hport;
	h->type = VIRTIO_VSOCK_TYPE_STREAM;
	h->op = op;
	h->buf_alloc = c->buf_alloc;
	h->fwd_cnt = c->fwd_cnt;
	c->fwd_told = c->fwd_cnt;
}

static void g_ctrl(struct guest *g, struct gconn *c, uint16_t op, uint32_t flags)
{
	struct virtio_vsock_hdr h;

	g_hdr(g, c, op, &h);
	h.flags = flags;
	g_send(g, &h, NULL, 0);
}

/* Application reads everything buffered; tell the host once a quarter window was freed. */
static void g_consume(struct guest *g, struct gconn *c)
{
	c->fwd_cnt = c->rx_total;
	if (!c->closed && c->fwd_cnt - c->fwd_told >= c->buf_alloc / 4)
		g_ctrl(g, c, VIRTIO_VSOCK_OP_CREDIT_UPDATE, 0);
}

static void g_rx_packet(struct guest *g, const uint8_t *pkt, uint32_t used_len)
{
	struct virtio_vsock_hdr h;
	struct gconn *c;
	int i;

	CHECK(used_len >= HDR);
	memcpy(&h, pkt, HDR);
	CHECK(h.len == used_len - HDR);
	CHECK(h.src_cid == 2 && h.dst_cid == G_CID && h.type == VIRTIO_VSOCK_TYPE_STREAM);
	c = g_find(g, h.dst_port, h.src_port);
	if (h.op == VIRTIO_VSOCK_OP_REQUEST) {
		bool ok = false;

		CHECK(!c);
		CHECK(h.src_port >= 1024);
		for (i = 0; i < g->nlisten; i++)
			ok |= g->listen[i] == h.dst_port;
		for (i = 0; i < G_MAX_CONNS && g->c[i].used; i++)
			;
		if (!ok || i == G_MAX_CONNS) {
			struct virtio_vsock_hdr r = h;

			r.src_cid = G_CID;
			r.dst_cid = 2;
			r.src_port = h.dst_port;
			r.dst_port = h.src_port;
			r.op = VIRTIO_VSOCK_OP_RST;
			r.len = 0;
			g_send(g, &r, NULL, 0);
			return;
		}
		c = &g->c[i];
		memset(c, 0, sizeof(*c));
		c->used = true;
		c->gport = h.dst_port;
		c->hport = h.src_port;
		c->buf_alloc = g->buf_alloc;
		c->peer_buf_alloc = h.buf_alloc;
		c->peer_fwd_cnt = h.fwd_cnt;
		g_ctrl(g, c, VIRTIO_VSOCK_OP_RESPONSE, 0);
		return;
	}
	if (!c) {
		if (h.op == VIRTIO_VSOCK_OP_RST) {
			g->rst_unknown++;
			g->last_rst = h;
		} else {
			fprintf(stderr, "guest: op %u for unknown %u:%u\n", h.op, h.dst_port, h.src_port);
			g->violations++;
		}
		return;
	}
	c->peer_buf_alloc = h.buf_alloc;
	c->peer_fwd_cnt = h.fwd_cnt;
	switch (h.op) {
	case VIRTIO_VSOCK_OP_RW:
		if ((c->rx_total - c->fwd_cnt) + h.len > c->buf_alloc || (c->shut & VIRTIO_VSOCK_SHUTDOWN_SEND)) {
			fprintf(stderr, "guest: credit violated (%u in flight + %u > %u)\n", c->rx_total - c->fwd_cnt,
				h.len, c->buf_alloc);
			g->violations++;
		}
		if (c->data_len + h.len > c->data_cap) {
			c->data_cap = (c->data_len + h.len) * 2;
			c->data = realloc(c->data, c->data_cap);
			CHECK(c->data);
		}
		memcpy(c->data + c->data_len, pkt + HDR, h.len);
		c->data_len += h.len;
		c->rx_total += h.len;
		break;
	case VIRTIO_VSOCK_OP_CREDIT_UPDATE:
		break;
	case VIRTIO_VSOCK_OP_CREDIT_REQUEST:
		g_ctrl(g, c, VIRTIO_VSOCK_OP_CREDIT_UPDATE, 0);
		break;
	case VIRTIO_VSOCK_OP_SHUTDOWN:
		c->shut |= h.flags;
		if (g->rst_on_shutdown && c->shut == 3) {
			g_ctrl(g, c, VIRTIO_VSOCK_OP_RST, 0);
			c->closed = true;
		}
		break;
	case VIRTIO_VSOCK_OP_RST:
		c->got_rst = true;
		c->closed = true;
		break;
	default:
		fprintf(stderr, "guest: unexpected op %u\n", h.op);
		g->violations++;
	}
}

static void g_poll(struct guest *g)
{
	static uint8_t pkt[HDR + 0x10000];
	uint32_t len, isr;
	int tag, i;

	while (fake_ring_used(&g->q[RXQ], &tag, &len)) {
		if (tag < 0) { /* a tiny buffer: must come back empty */
			CHECK(len == 0);
			continue;
		}
		CHECK(tag < G_RX_BUFS);
		if (len) {
			CHECK(len <= HDR + G_RX_DATA);
			g_gather(g, g->rx[tag].seg, g->rx[tag].n, pkt, len);
			g_rx_packet(g, pkt, len);
		}
		g_post_rx(g, tag);
		g_kick(g, RXQ);
	}
	while (fake_ring_used(&g->q[EVQ], &tag, &len)) {
		uint32_t id;

		CHECK(len == 4);
		memcpy(&id, g->vm->mem + G_EV_BASE + (uint64_t)tag * 16, 4);
		g->events++;
		g->last_event = (int)id;
	}
	while (fake_ring_used(&g->q[TXQ], &tag, &len))
		g->tx_busy[tag] = false;
	if (g->consume)
		for (i = 0; i < G_MAX_CONNS; i++)
			if (g->c[i].used && !g->c[i].closed)
				g_consume(g, &g->c[i]);
	/* an interrupt handler would do this */
	isr = fake_vm_mr(g->vm, VIRTIO_MMIO_INTERRUPT_STATUS);
	g->isr_seen |= isr;
	fake_vm_mw(g->vm, VIRTIO_MMIO_INTERRUPT_ACK, isr);
}

/* Probe like drivers/virtio/virtio_mmio.c + net/vmw_vsock/virtio_transport.c. */
static void g_probe(struct guest *g)
{
	struct vm *vm = g->vm;
	uint64_t cid = 0;
	uint32_t lo, hi;
	int i;

	CHECK((uint32_t)fake_driver_negotiate(vm, 19) == 0); /* VERSION_1 (checked there) and nothing else */
	for (i = 0; i < 3; i++) {
		fake_ring_init(&g->q[i], vm, (unsigned)i, G_QSIZE, FAKE_RING_BASE((unsigned)i));
		fake_ring_setup(&g->q[i]);
		CHECK(fake_vm_mr(vm, VIRTIO_MMIO_QUEUE_READY) == 1);
	}
	lo = fake_vm_mr(vm, VIRTIO_MMIO_CONFIG);
	hi = fake_vm_mr(vm, VIRTIO_MMIO_CONFIG + 4);
	cid = (uint64_t)hi << 32 | lo;
	CHECK(cid == G_CID);
	fake_driver_ok(vm);
	for (i = 0; g->tiny_first && i < 3; i++) {
		struct fake_seg tiny = { G_SCRATCH + (uint64_t)i * 64, 10, true };

		CHECK(fake_ring_add(&g->q[RXQ], &tiny, 1, -1) >= 0);
	}
	for (i = 0; i < G_RX_BUFS; i++)
		g_post_rx(g, i);
	g_kick(g, RXQ);
	for (i = 0; i < 8; i++) {
		struct fake_seg s = { G_EV_BASE + (uint64_t)i * 16, 4, true };

		CHECK(fake_ring_add(&g->q[EVQ], &s, 1, i) >= 0);
	}
	g_kick(g, EVQ);
	memset(g->tx_busy, 0, sizeof(g->tx_busy));
}

static void g_reset_state(struct guest *g)
{
	int i;

	for (i = 0; i < G_MAX_CONNS; i++)
		free(g->c[i].data);
	memset(g->c, 0, sizeof(g->c));
	g->rst_unknown = 0;
	g->events = 0;
}

/* ------------------------------------------------------------------ world: vm + loop + vsock + guest */

struct world {
	struct evloop *loop;
	struct vm *vm;
	struct vsock *vs;
	struct guest g;
	char path[108];
	int ready_calls;
	pthread_t loop_thread;
};

static void on_ready(void *opaque)
{
	__atomic_fetch_add(&((struct world *)opaque)->ready_calls, 1, __ATOMIC_RELAXED);
}

static void *loop_main(void *opaque)
{
	evloop_run(opaque);
	return NULL;
}

static void world_init(struct world *w)
{
	struct vsock_config cfg = { 0 };
	const char *tmp = getenv("TMPDIR");

	memset(w, 0, sizeof(*w));
	CHECK(evloop_new(&w->loop) == 0);
	w->vm = fake_vm_new(RAM_SIZE, w->loop);
	if (!tmp || strlen(tmp) > 60) /* sun_path holds 108 bytes */
		tmp = "/tmp";
	snprintf(w->path, sizeof(w->path), "%s/smolvm-test-vsock-%d.sock", tmp, (int)getpid());
	cfg.base = 0xd0000000;
	cfg.gsi = 5;
	cfg.uds_path = w->path;
	cfg.on_ready = on_ready;
	cfg.opaque = w;
	CHECK(vsock_new(w->vm, &cfg, &w->vs) == 0);
	w->g.vm = w->vm;
	w->g.loop = w->loop;
	w->g.listen[w->g.nlisten++] = SMOLVM_AGENT_PORT;
	w->g.listen[w->g.nlisten++] = 1000;
	w->g.buf_alloc = 64u << 10;
	w->g.consume = true;
	w->g.rst_on_shutdown = true;
	if (threaded)
		CHECK(pthread_create(&w->loop_thread, NULL, loop_main, w->loop) == 0);
	g_probe(&w->g);
}

static void world_fini(struct world *w)
{
	CHECK(w->g.violations == 0);
	if (threaded) {
		evloop_stop(w->loop);
		CHECK(pthread_join(w->loop_thread, NULL) == 0);
	}
	vsock_free(w->vs);
	CHECK(fake_loop_watches(w->loop) == 0); /* every watch was removed */
	CHECK(access(w->path, F_OK) != 0);
	g_reset_state(&w->g);
	fake_vm_free(w->vm);
	evloop_free(w->loop);
}

static void step(struct world *w)
{
	idle(w->loop, threaded ? 0 : 2);
	g_poll(&w->g);
}

#define WAIT(w, cond)                                                               \
	do {                                                                        \
		int64_t t0_ = fake_test_now_ms();                                             \
		while (!(cond)) {                                                   \
			step(w);                                                    \
			if (fake_test_now_ms() - t0_ > 10000) {                               \
				fprintf(stderr, "timeout waiting for %s\n", #cond); \
				CHECK(!"timeout");                                  \
			}                                                           \
		}                                                                   \
	} while (0)

/* ------------------------------------------------------------------ host clients */

static int client_connect(struct world *w)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);

	CHECK(fd >= 0);
	strcpy(sa.sun_path, w->path);
	CHECK(connect(fd, (struct sockaddr *)&sa, sizeof(sa)) == 0);
	CHECK(fcntl(fd, F_SETFL, O_NONBLOCK) == 0);
	return fd;
}

static void client_write_all(struct world *w, int fd, const char *s)
{
	size_t len = strlen(s), off = 0;

	while (off < len) {
		ssize_t n = send(fd, s + off, len - off, MSG_NOSIGNAL);

		if (n < 0 && errno == EAGAIN) {
			step(w);
			continue;
		}
		CHECK(n > 0);
		off += (size_t)n;
	}
}

/* Read one '\n'-terminated line byte by byte; returns length, or -1 on EOF. */
static int client_read_line(struct world *w, int fd, char *buf, size_t cap)
{
	size_t len = 0;
	int64_t t0 = fake_test_now_ms();

	for (;;) {
		char ch;
		ssize_t n = read(fd, &ch, 1);

		if (n == 0 || (n < 0 && errno == ECONNRESET))
			return -1;
		if (n < 0) {
			CHECK(errno == EAGAIN);
			step(w);
			CHECK(fake_test_now_ms() - t0 < 10000);
			continue;
		}
		if (ch == '\n') {
			buf[len] = 0;
			return (int)len;
		}
		CHECK(len + 1 < cap);
		buf[len++] = ch;
	}
}

/* Full CONNECT handshake; returns the client fd and the guest's view of the connection. */
static int client_open(struct world *w, uint32_t port, struct gconn **gc)
{
	char line[64], want[64];
	int fd = client_connect(w), i;
	struct gconn *c = NULL;

	snprintf(line, sizeof(line), "CONNECT %u\n", port);
	client_write_all(w, fd, line);
	CHECK(client_read_line(w, fd, line, sizeof(line)) > 0);
	CHECK(strncmp(line, "OK ", 3) == 0);
	for (i = 0; i < G_MAX_CONNS; i++)
		if (w->g.c[i].used && !w->g.c[i].closed && w->g.c[i].gport == port &&
		    w->g.c[i].hport == (uint32_t)atoi(line + 3))
			c = &w->g.c[i];
	CHECK(c);
	snprintf(want, sizeof(want), "OK %u", c->hport);
	CHECK(strcmp(line, want) == 0);
	*gc = c;
	return fd;
}

/* True once the client sees EOF (after draining whatever is readable into sink, if given). */
static bool client_eof(int fd)
{
	char b[4096];
	ssize_t n;

	while ((n = read(fd, b, sizeof(b))) > 0)
		;
	return n == 0 || (n < 0 && errno == ECONNRESET);
}

/* ------------------------------------------------------------------ tests: queue */

static struct vm *qvm;

static void q_setup(struct virtq *q, uint16_t size)
{
	memset(qvm->mem, 0, 0x10000);
	memset(q, 0, sizeof(*q));
	q->vm = qvm;
	q->size = size;
	q->desc_gpa = 0x1000;
	q->avail_gpa = 0x2000;
	q->used_gpa = 0x3000;
}

static struct vring_desc *qdesc(unsigned i)
{
	return (struct vring_desc *)(qvm->mem + 0x1000) + i;
}

static struct vring_avail *qavail(void)
{
	return (struct vring_avail *)(qvm->mem + 0x2000);
}

static void qpublish(uint16_t head)
{
	struct vring_avail *a = qavail();

	a->ring[a->idx % 8] = head;
	a->idx++;
}

/* Chains a fresh queue of 8 must refuse: descriptors by index, the head published, what virtq_pop() returns. */
static const struct {
	struct {
		uint16_t i;
		struct vring_desc d;
	} desc[2];
	int nd;
	uint16_t head;
	int err;
} q_bad[] = {
	{ { { 0, { RAM_SIZE - 4, 8, 0, 0 } } }, 1, 0, -EFAULT },                /* descriptor past RAM */
	{ { { 0, { 0xfffffffffffff000ull, 0x2000, 0, 0 } } }, 1, 0, -EFAULT }, /* gpa + len wraps around 2^64 */
	{ { { 1, { 0x5000, 4, VRING_DESC_F_NEXT, 2 } }, { 2, { 0x5000, 4, VRING_DESC_F_NEXT, 1 } } }, 2, 1, -EINVAL }, /* NEXT loop 1 -> 2 -> 1 */
	{ { { 0, { 0x5000, 4, VRING_DESC_F_NEXT, 8 } } }, 1, 0, -EINVAL },      /* next index out of range */
	{ { { 0, { 0 } } }, 0, 9, -EINVAL },                                      /* head out of range */
	{ { { 0, { 0x5000, 16, VRING_DESC_F_INDIRECT, 0 } } }, 1, 0, -EINVAL }, /* indirect descriptors are not offered */
	{ { { 0, { 0x5000, 16, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 1 } }, { 1, { 0x6000, 16, 0, 0 } } },
	  2, 0, -EINVAL }, /* readable after writable is a spec violation */
};

static void test_queue(void)
{
	struct virtq q;
	struct virtq_chain c;
	struct vring_used *u = (struct vring_used *)(qvm->mem + 0x3000);
	uint8_t buf[64];
	struct iovec iov[4];
	unsigned i;
	int k;

	cur_test = "queue";
	/* sizes and layouts */
	q_setup(&q, 6);
	CHECK(virtq_enable(&q, 256) == -EINVAL); /* not a power of two */
	q_setup(&q, 512);
	CHECK(virtq_enable(&q, 256) == -EINVAL); /* above max */
	q_setup(&q, 0);
	CHECK(virtq_enable(&q, 256) == -EINVAL);
	q_setup(&q, 8);
	q.desc_gpa = 0x1008;
	CHECK(virtq_enable(&q, 256) == -EINVAL); /* misaligned */
	q_setup(&q, 8);
	q.used_gpa = RAM_SIZE - 8;
	CHECK(virtq_enable(&q, 256) == -EFAULT); /* ring past RAM */
	q_setup(&q, 8);
	q.avail_gpa = 0xfffffffffffffffeull;
	CHECK(virtq_enable(&q, 256) == -EFAULT); /* wraps */
	CHECK(!q.ready);

	/* a well-formed chain: 2 readable + 1 writable; copy helpers across segments */
	q_setup(&q, 8);
	CHECK(virtq_enable(&q, 256) == 0);
	CHECK(virtq_pop(&q, &c) == 0);
	*qdesc(0) = (struct vring_desc){ 0x5000, 10, VRING_DESC_F_NEXT, 3 };
	*qdesc(3) = (struct vring_desc){ 0x6000, 20, VRING_DESC_F_NEXT, 5 };
	*qdesc(5) = (struct vring_desc){ 0x7000, 30, VRING_DESC_F_WRITE, 0 };
	memcpy(qvm->mem + 0x5000, "0123456789", 10);
	memcpy(qvm->mem + 0x6000, "abcdefghijklmnopqrst", 20);
	qpublish(0);
	CHECK(virtq_has_avail(&q));
	CHECK(virtq_pop(&q, &c) == 1);
	CHECK(c.head == 0 && c.n == 3 && c.n_read == 2 && c.read_len == 30 && c.write_len == 30);
	CHECK(virtq_chain_from(&c, 8, buf, 6) == 6 && memcmp(buf, "89abcd", 6) == 0);
	CHECK(virtq_chain_from(&c, 25, buf, 64) == 5 && memcmp(buf, "pqrst", 5) == 0);
	CHECK(virtq_chain_to(&c, 28, "XYZW", 4) == 2 && memcmp(qvm->mem + 0x7000 + 28, "XY", 2) == 0);
	CHECK(virtq_chain_iov(&c, false, 5, 100, iov, 4) == 2 && iov[0].iov_len == 5 && iov[1].iov_len == 20);
	CHECK(virtq_chain_iov(&c, false, 5, 100, iov, 1) == 1);
	virtq_unpop(&q);
	CHECK(virtq_pop(&q, &c) == 1 && c.head == 0);
	CHECK(virtq_push(&q, 8, 0) == -EINVAL); /* head out of range */
	CHECK(virtq_push(&q, 0, 30) == 0);
	CHECK(u->idx == 1 && u->ring[0].id == 0 && u->ring[0].len == 30);
	CHECK(virtq_push(&q, 0, 30) == -EINVAL); /* nothing in flight */
	CHECK(virtq_want_irq(&q));
	qavail()->flags = VRING_AVAIL_F_NO_INTERRUPT;
	CHECK(!virtq_want_irq(&q));

	/* self loop on a big queue: bounded by VIRTQ_MAX_SEGS */
	q_setup(&q, 256);
	q.avail_gpa = 0x2000;
	q.used_gpa = 0x4000;
	CHECK(virtq_enable(&q, 256) == 0);
	*qdesc(4) = (struct vring_desc){ 0x5000, 4, VRING_DESC_F_NEXT, 4 };
	qavail()->ring[0] = 4;
	qavail()->idx = 1;
	CHECK(virtq_pop(&q, &c) == -EINVAL);

	/* avail idx jumps more than the queue size ahead */
	q_setup(&q, 8);
	CHECK(virtq_enable(&q, 256) == 0);
	qavail()->idx = 9;
	CHECK(virtq_pop(&q, &c) == -EINVAL);

	/* bad chains break the queue: nothing more is popped */
	for (i = 0; i < sizeof(q_bad) / sizeof(q_bad[0]); i++) {
		q_setup(&q, 8);
		CHECK(virtq_enable(&q, 256) == 0);
		for (k = 0; k < q_bad[i].nd; k++)
			*qdesc(q_bad[i].desc[k].i) = q_bad[i].desc[k].d;
		qpublish(q_bad[i].head);
		CHECK(virtq_pop(&q, &c) == q_bad[i].err);
		CHECK(q.broken && virtq_pop(&q, &c) == -EIO && !virtq_has_avail(&q));
	}

	/* reset forgets everything */
	virtq_reset(&q);
	CHECK(!q.ready && !q.broken && q.vm == qvm && virtq_pop(&q, &c) == -EIO);
	printf("ok %s\n", cur_test);
}

/* ------------------------------------------------------------------ tests: transport with a dummy device */

struct dummy {
	int notifies[2], activates, resets;
	uint8_t config[12];
};

static void dummy_config_read(void *dev, uint32_t off, void *data, uint32_t len)
{
	memcpy(data, ((struct dummy *)dev)->config + off, len);
}

static void dummy_config_write(void *dev, uint32_t off, const void *data, uint32_t len)
{
	memcpy(((struct dummy *)dev)->config + off, data, len);
}

static void dummy_notify(void *dev, unsigned q)
{
	CHECK(q < 2);
	((struct dummy *)dev)->notifies[q]++;
}

static void dummy_activate(void *dev)
{
	((struct dummy *)dev)->activates++;
}

static void dummy_reset(void *dev)
{
	((struct dummy *)dev)->resets++;
}

static const struct virtio_dev_ops dummy_ops = {
	.device_id = 42,
	.features = 1ull << 3,
	.nr_queues = 2,
	.queue_max = 64,
	.config_size = 12,
	.config_read = dummy_config_read,
	.config_write = dummy_config_write,
	.queue_notify = dummy_notify,
	.activate = dummy_activate,
	.reset = dummy_reset,
};

static void test_mmio(bool with_loop)
{
	struct evloop *loop = NULL;
	struct vm *vm;
	struct virtio_mmio m;
	struct dummy d = { .config = "hello world" };
	struct vm_mmio_dev *dev;
	struct fake_ring gq;
	uint64_t v64 = 0;
	uint16_t v16 = 0;
	uint8_t v8 = 0;
	uint32_t v = 0;
	char line[64];

	cur_test = with_loop ? "mmio (notify via loop)" : "mmio (notify on vCPU)";
	if (with_loop)
		CHECK(evloop_new(&loop) == 0);
	vm = fake_vm_new(RAM_SIZE, loop);
	CHECK(virtio_mmio_init(&m, vm, 0xd0000000, 5, &dummy_ops, &d) == 0);
	dev = fake_vm_dev(vm);
	CHECK(dev->base == 0xd0000000 && dev->len == 0x200 && !m.ioeventfd && m.irq_fd == -1);
	CHECK(m.notify_watched == with_loop);

	CHECK(fake_vm_mr(vm, VIRTIO_MMIO_MAGIC_VALUE) == 0x74726976 && fake_vm_mr(vm, VIRTIO_MMIO_VERSION) == 2);
	CHECK(fake_vm_mr(vm, VIRTIO_MMIO_DEVICE_ID) == 42 && fake_vm_mr(vm, VIRTIO_MMIO_VENDOR_ID) != 0);
	/* only aligned 32-bit register accesses count */
	v = 0x1234;
	dev->access(dev->opaque, VIRTIO_MMIO_MAGIC_VALUE, &v, 2, false);
	CHECK(v == 0);
	dev->access(dev->opaque, VIRTIO_MMIO_MAGIC_VALUE + 1, &v, 4, false);
	CHECK(v == 0);
	v16 = 3;
	dev->access(dev->opaque, VIRTIO_MMIO_STATUS, &v16, 2, true);
	CHECK(fake_vm_mr(vm, VIRTIO_MMIO_STATUS) == 0);
	v = 0xffffffff;
	dev->access(dev->opaque, 0x1000, &v, 4, false); /* outside the window */
	CHECK(v == 0xffffffff);

	/* features: a subset of the offer plus VERSION_1, else FEATURES_OK is refused */
	fake_vm_mw(vm, VIRTIO_MMIO_STATUS, 3);
	fake_vm_mw(vm, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
	CHECK(fake_vm_mr(vm, VIRTIO_MMIO_DEVICE_FEATURES) == 8);
	fake_vm_mw(vm, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
	CHECK(fake_vm_mr(vm, VIRTIO_MMIO_DEVICE_FEATURES) == 1);
	fake_vm_mw(vm, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 2);
	CHECK(fake_vm_mr(vm, VIRTIO_MMIO_DEVICE_FEATURES) == 0);
	fake_vm_mw(vm, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
	fake_vm_mw(vm, VIRTIO_MMIO_DRIVER_FEATURES, 8 | 16);
	fake_vm_mw(vm, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
	fake_vm_mw(vm, VIRTIO_MMIO_DRIVER_FEATURES, 1);
	fake_vm_mw(vm, VIRTIO_MMIO_STATUS, 0xb);
	CHECK(fake_vm_mr(vm, VIRTIO_MMIO_STATUS) == 3); /* bit 4 was never offered */
	fake_vm_mw(vm, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
	fake_vm_mw(vm, VIRTIO_MMIO_DRIVER_FEATURES, 8);
	fake_vm_mw(vm, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
	fake_vm_mw(vm, VIRTIO_MMIO_DRIVER_FEATURES, 0);
	fake_vm_mw(vm, VIRTIO_MMIO_STATUS, 0xb);
	CHECK(fake_vm_mr(vm, VIRTIO_MMIO_STATUS) == 3); /* legacy (no VERSION_1) */
	fake_vm_mw(vm, VIRTIO_MMIO_DRIVER_FEATURES, 1);
	fake_vm_mw(vm, VIRTIO_MMIO_STATUS, 0xb);
	CHECK(fake_vm_mr(vm, VIRTIO_MMIO_STATUS) == 0xb);
	CHECK(m.drv_features == ((1ull << 32) | 8));
	fake_vm_mw(vm, VIRTIO_MMIO_DRIVER_FEATURES, 0); /* frozen after FEATURES_OK */
	CHECK(m.drv_features == ((1ull << 32) | 8));
	fake_vm_mw(vm, VIRTIO_MMIO_STATUS, 0x1); /* clearing bits is ignored */
	CHECK(fake_vm_mr(vm, VIRTIO_MMIO_STATUS) == 0xb);

	/* config space: 1/2/4/8-byte reads and writes, bounded */
	dev->access(dev->opaque, 0x100, &v64, 8, false);
	CHECK(memcmp(&v64, "hello wo", 8) == 0);
	dev->access(dev->opaque, 0x106, &v16, 2, false);
	CHECK(memcmp(&v16, "wo", 2) == 0);
	dev->access(dev->opaque, 0x10b, &v8, 1, false);
	CHECK(v8 == 0);
	v = 0xffffffff;
	dev->access(dev->opaque, 0x10a, &v, 4, false); /* crosses the end */
	CHECK(v == 0);
	dev->access(dev->opaque, 0x100, &v, 3, false); /* odd width */
	CHECK(v == 0);
	v = 0x44434241;
	dev->access(dev->opaque, 0x104, &v, 4, true);
	CHECK(memcmp(d.config + 4, "ABCD", 4) == 0);

	/* queues: bounds, bad sizes break the device, good ones go ready */
	fake_vm_mw(vm, VIRTIO_MMIO_QUEUE_SEL, 2);
	CHECK(fake_vm_mr(vm, VIRTIO_MMIO_QUEUE_NUM_MAX) == 0);
	fake_vm_mw(vm, VIRTIO_MMIO_QUEUE_READY, 1); /* no such queue: ignored */
	CHECK(fake_vm_mr(vm, VIRTIO_MMIO_QUEUE_READY) == 0);
	CHECK(!(fake_vm_mr(vm, VIRTIO_MMIO_STATUS) & 0x40));
	fake_ring_init(&gq, vm, 0, 48, FAKE_RING_BASE(0));
	fake_vm_mw(vm, VIRTIO_MMIO_QUEUE_SEL, 0);
	CHECK(fake_vm_mr(vm, VIRTIO_MMIO_QUEUE_NUM_MAX) == 64);
	fake_vm_mw(vm, VIRTIO_MMIO_QUEUE_NUM, 48);
	fake_vm_mw(vm, VIRTIO_MMIO_QUEUE_DESC_LOW, (uint32_t)gq.base);
	fake_vm_mw(vm, VIRTIO_MMIO_QUEUE_AVAIL_LOW, (uint32_t)gq.base + 0x1000);
	fake_vm_mw(vm, VIRTIO_MMIO_QUEUE_USED_LOW, (uint32_t)gq.base + 0x2000);
	fake_vm_mw(vm, VIRTIO_MMIO_QUEUE_READY, 1);
	CHECK(fake_vm_mr(vm, VIRTIO_MMIO_QUEUE_READY) == 0);
	CHECK(fake_vm_mr(vm, VIRTIO_MMIO_STATUS) & 0x40); /* DEVICE_NEEDS_RESET */
	fake_vm_mw(vm, VIRTIO_MMIO_STATUS, 0xf);
	CHECK(d.activates == 0); /* a broken device does not start */

	/* reset, then a clean bring-up */
	fake_vm_mw(vm, VIRTIO_MMIO_STATUS, 0);
	CHECK(fake_vm_mr(vm, VIRTIO_MMIO_STATUS) == 0 && d.resets == 1);
	fake_driver_features_ok(vm);
	fake_ring_init(&gq, vm, 0, 64, FAKE_RING_BASE(0));
	fake_ring_setup(&gq);
	CHECK(fake_vm_mr(vm, VIRTIO_MMIO_QUEUE_READY) == 1);
	fake_vm_mw(vm, VIRTIO_MMIO_QUEUE_DESC_LOW, 0x4000); /* ignored while ready */
	CHECK(m.vq[0].desc_gpa == gq.base);
	fake_vm_mw(vm, VIRTIO_MMIO_QUEUE_NOTIFY, 0); /* before DRIVER_OK: dropped */
	if (loop)
		fake_loop_once(loop, 0);
	CHECK(d.notifies[0] == 0);
	fake_vm_mw(vm, VIRTIO_MMIO_STATUS, 0xf);
	CHECK(d.activates == 1 && fake_vm_mr(vm, VIRTIO_MMIO_STATUS) == 0xf);
	fake_vm_mw(vm, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
	fake_vm_mw(vm, VIRTIO_MMIO_QUEUE_NOTIFY, 1); /* queue 1 not ready: dropped */
	fake_vm_mw(vm, VIRTIO_MMIO_QUEUE_NOTIFY, 7); /* no such queue */
	if (loop) {
		CHECK(d.notifies[0] == 0); /* delivered on the loop thread */
		fake_loop_once(loop, 0);
		fake_loop_once(loop, 0);
	}
	CHECK(d.notifies[0] == 1 && d.notifies[1] == 0);

	/* interrupts: status bit, edge on the line, ACK */
	virtio_mmio_lock(&m);
	virtio_mmio_signal(&m);
	virtio_mmio_unlock(&m);
	CHECK(fake_vm_irq_edges(vm) == 1 && fake_vm_mr(vm, VIRTIO_MMIO_INTERRUPT_STATUS) == 1);
	fake_vm_mw(vm, VIRTIO_MMIO_INTERRUPT_ACK, 1);
	CHECK(fake_vm_mr(vm, VIRTIO_MMIO_INTERRUPT_STATUS) == 0);
	virtio_mmio_lock(&m);
	virtio_mmio_fail(&m);
	CHECK(!virtio_mmio_live(&m));
	virtio_mmio_unlock(&m);
	CHECK(fake_vm_irq_edges(vm) == 2 && fake_vm_mr(vm, VIRTIO_MMIO_INTERRUPT_STATUS) == 2);
	CHECK(fake_vm_mr(vm, VIRTIO_MMIO_STATUS) == 0x4f);
	fake_vm_mw(vm, VIRTIO_MMIO_STATUS, 0x4f | 0x80); /* driver gives up: FAILED, NEEDS_RESET stays */
	CHECK(fake_vm_mr(vm, VIRTIO_MMIO_STATUS) == 0xcf);
	fake_vm_mw(vm, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
	if (loop)
		fake_loop_once(loop, 0);
	CHECK(d.notifies[0] == 1); /* no more kicks for a broken device */
	fake_vm_mw(vm, VIRTIO_MMIO_STATUS, 0);
	CHECK(fake_vm_mr(vm, VIRTIO_MMIO_STATUS) == 0 && fake_vm_mr(vm, VIRTIO_MMIO_INTERRUPT_STATUS) == 0);
	CHECK(!m.vq[0].ready && d.resets == 2);

	CHECK(virtio_mmio_cmdline(line, sizeof(line), 0xd0000000, 5) == (int)strlen(line));
	CHECK(strcmp(line, "virtio_mmio.device=512@0xd0000000:5") == 0);
	CHECK(virtio_mmio_cmdline(line, 10, 0xd0000000, 5) == -ENOSPC);

	virtio_mmio_destroy(&m);
	if (loop) {
		CHECK(fake_loop_watches(loop) == 0);
		evloop_free(loop);
	}
	fake_vm_free(vm);
	printf("ok %s\n", cur_test);
}

/*
 * With real KVM: a real-mode vCPU writes QueueNotify twice. The write of a
 * queue index is eaten by KVM_IOEVENTFD and reaches queue_notify through the
 * loop; the write of a bogus index exits to user space and is ignored.
 */
static void test_mmio_kvm(void)
{
	static const uint8_t code[] = {
		0xb8, 0x00, 0xd0,                   /* mov ax, 0xd000 */
		0x8e, 0xd8,                         /* mov ds, ax */
		0x66, 0xb8, 0x01, 0x00, 0x00, 0x00, /* mov eax, 1 */
		0x66, 0xa3, 0x50, 0x00,             /* mov [0x50], eax: QueueNotify(1) */
		0x66, 0xb8, 0x07, 0x00, 0x00, 0x00, /* mov eax, 7 */
		0x66, 0xa3, 0x50, 0x00,             /* mov [0x50], eax: QueueNotify(7) */
		0xe6, 0x10,                         /* out 0x10, al: done (hlt would sleep in-kernel) */
	};
	const uint64_t ram = 0x80000, base = 0xd0000;
	struct kvm_userspace_memory_region region = { 0 };
	struct kvm_sregs sregs;
	struct kvm_regs regs = { 0 };
	struct kvm_run *run = MAP_FAILED;
	struct evloop *loop = NULL;
	struct virtio_mmio m = { 0 };
	struct dummy d = { 0 };
	struct vm *vm = NULL;
	struct fake_ring gq;
	const char *skip = NULL;
	int kvm, vcpu = -1, exits = 0, edges;
	long run_size = 0;

	cur_test = "mmio with KVM ioeventfd/irqfd";
	kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm < 0) {
		skip = "no usable /dev/kvm";
		goto out;
	}
	CHECK(evloop_new(&loop) == 0);
	vm = fake_vm_new(ram, loop);
	vm->kvm_fd = kvm;
	vm->vm_fd = ioctl(kvm, KVM_CREATE_VM, 0);
	if (vm->vm_fd < 0 || ioctl(vm->vm_fd, KVM_SET_TSS_ADDR, 0xfffbd000ul) < 0 ||
	    ioctl(vm->vm_fd, KVM_CREATE_IRQCHIP, 0) < 0) {
		skip = "cannot create a VM with an irqchip";
		goto out;
	}
	region.memory_size = ram;
	region.userspace_addr = (uintptr_t)vm->mem;
	if (ioctl(vm->vm_fd, KVM_SET_USER_MEMORY_REGION, &region) < 0) {
		skip = "KVM_SET_USER_MEMORY_REGION failed";
		goto out;
	}
	memcpy(vm->mem + 0x1000, code, sizeof(code));

	CHECK(virtio_mmio_init(&m, vm, base, 5, &dummy_ops, &d) == 0);
	CHECK(m.ioeventfd && m.irq_fd >= 0);
	fake_driver_features_ok(vm);
	fake_ring_init(&gq, vm, 1, 64, FAKE_RING_BASE(1));
	fake_ring_setup(&gq);
	fake_vm_mw(vm, VIRTIO_MMIO_STATUS, 0xf);
	CHECK(fake_vm_mr(vm, VIRTIO_MMIO_STATUS) == 0xf);

	vcpu = ioctl(vm->vm_fd, KVM_CREATE_VCPU, 0);
	run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
	if (vcpu < 0 || run_size <= 0) {
		skip = "cannot create a vCPU";
		goto out;
	}
	run = mmap(NULL, (size_t)run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
	CHECK(run != MAP_FAILED);
	CHECK(ioctl(vcpu, KVM_GET_SREGS, &sregs) == 0);
	sregs.cs.base = 0;
	sregs.cs.selector = 0;
	CHECK(ioctl(vcpu, KVM_SET_SREGS, &sregs) == 0);
	regs.rip = 0x1000;
	regs.rflags = 2;
	CHECK(ioctl(vcpu, KVM_SET_REGS, &regs) == 0);
	for (;;) {
		if (ioctl(vcpu, KVM_RUN, 0) < 0) {
			skip = "KVM_RUN failed";
			goto out;
		}
		if (run->exit_reason == KVM_EXIT_IO && run->io.port == 0x10)
			break;
		if (run->exit_reason != KVM_EXIT_MMIO) {
			fprintf(stderr, "exit reason %u\n", run->exit_reason);
			skip = "unexpected vCPU exit";
			goto out;
		}
		CHECK(run->mmio.phys_addr == base + VIRTIO_MMIO_QUEUE_NOTIFY && run->mmio.is_write);
		CHECK(run->mmio.len == 4 && run->mmio.data[0] == 7);
		vm->mmio[0].access(vm->mmio[0].opaque, run->mmio.phys_addr - base, run->mmio.data, run->mmio.len,
				   true);
		CHECK(++exits < 4);
	}
	CHECK(exits == 1); /* QueueNotify(1) never left the kernel */
	CHECK(d.notifies[1] == 0);
	fake_loop_once(loop, 100);
	CHECK(d.notifies[1] == 1 && d.notifies[0] == 0);

	edges = fake_vm_irq_edges(vm);
	virtio_mmio_lock(&m);
	virtio_mmio_signal(&m); /* through the irqfd, not vm_irq_line() */
	virtio_mmio_unlock(&m);
	CHECK(fake_vm_irq_edges(vm) == edges && fake_vm_mr(vm, VIRTIO_MMIO_INTERRUPT_STATUS) == 1);
out:
	virtio_mmio_destroy(&m);
	if (loop)
		CHECK(fake_loop_watches(loop) == 0);
	if (run != MAP_FAILED)
		munmap(run, (size_t)run_size);
	if (vcpu >= 0)
		close(vcpu);
	if (vm && vm->vm_fd >= 0)
		close(vm->vm_fd);
	fake_vm_free(vm);
	if (kvm >= 0)
		close(kvm);
	evloop_free(loop);
	printf("%s %s%s%s\n", skip ? "skip" : "ok", cur_test, skip ? ": " : "", skip ? skip : "");
}

static void test_mmio_bad_ops(void)
{
	struct vm *vm = fake_vm_new(RAM_SIZE, NULL);
	struct virtio_mmio m;
	struct virtio_dev_ops ops = dummy_ops;

	cur_test = "mmio bad ops";
	ops.queue_max = 48;
	CHECK(virtio_mmio_init(&m, vm, 0xd0000000, 5, &ops, NULL) == -EINVAL);
	ops = dummy_ops;
	ops.nr_queues = 9;
	CHECK(virtio_mmio_init(&m, vm, 0xd0000000, 5, &ops, NULL) == -EINVAL);
	CHECK(vm->nr_mmio == 0);
	fake_vm_free(vm);
	printf("ok %s\n", cur_test);
}

/* ------------------------------------------------------------------ tests: vsock */

/* One host client <-> guest connection moving data both ways at once. */
struct xfer {
	int fd;
	struct gconn *gc;
	uint8_t *h2g, *g2h, *g2h_got;
	size_t len, h2g_sent, g2h_sent, g2h_recv;
	bool client_closed;
};

static void xfer_start(struct world *w, struct xfer *x, size_t len, uint32_t seed)
{
	memset(x, 0, sizeof(*x));
	x->fd = client_open(w, SMOLVM_AGENT_PORT, &x->gc);
	x->len = len;
	x->h2g = malloc(len);
	x->g2h = malloc(len);
	x->g2h_got = malloc(len);
	CHECK(x->h2g && x->g2h && x->g2h_got);
	fake_test_pattern(x->h2g, len, seed);
	fake_test_pattern(x->g2h, len, seed + 1000);
}

/* Guest sends what the host's credit allows, in packets of varying size. */
static void g_send_data(struct world *w, struct gconn *c, const uint8_t *data, size_t len, size_t *sent,
			uint32_t seed)
{
	while (*sent < len && !c->closed) {
		uint32_t credit = c->peer_buf_alloc - (c->tx_cnt - c->peer_fwd_cnt);
		uint32_t n = 1 + (uint32_t)((seed * 7919u + *sent) % 0x10000);
		struct virtio_vsock_hdr h;

		if (n > credit)
			n = credit;
		if (n > len - *sent)
			n = (uint32_t)(len - *sent);
		if (!n)
			return;
		g_hdr(&w->g, c, VIRTIO_VSOCK_OP_RW, &h);
		h.len = n;
		g_send(&w->g, &h, data + *sent, n);
		c->tx_cnt += n;
		*sent += n;
	}
}

static bool xfer_step(struct world *w, struct xfer *x, uint32_t seed, size_t read_chunk)
{
	ssize_t n;

	if (x->h2g_sent < x->len) {
		size_t want = x->len - x->h2g_sent;

		n = send(x->fd, x->h2g + x->h2g_sent, want > 100000 ? 100000 : want, MSG_NOSIGNAL);
		if (n > 0)
			x->h2g_sent += (size_t)n;
		else
			CHECK(errno == EAGAIN);
	}
	if (x->g2h_recv < x->len) {
		size_t want = x->len - x->g2h_recv;

		n = read(x->fd, x->g2h_got + x->g2h_recv, want > read_chunk ? read_chunk : want);
		if (n > 0)
			x->g2h_recv += (size_t)n;
		else
			CHECK(n < 0 && errno == EAGAIN);
	}
	g_send_data(w, x->gc, x->g2h, x->len, &x->g2h_sent, seed);
	return x->h2g_sent == x->len && x->g2h_recv == x->len && x->gc->data_len == x->len;
}

static void xfer_check(struct xfer *x)
{
	CHECK(x->gc->data_len == x->len && memcmp(x->gc->data, x->h2g, x->len) == 0);
	CHECK(x->g2h_recv == x->len && memcmp(x->g2h_got, x->g2h, x->len) == 0);
	free(x->h2g);
	free(x->g2h);
	free(x->g2h_got);
}

/* Move n transfers (seeds seed + i, host reads of read_chunk) until all are through; check them, close every client. */
static void xfer_all(struct world *w, struct xfer *x, int n, uint32_t seed, size_t read_chunk)
{
	int64_t t0 = fake_test_now_ms();
	int i, done;

	do {
		done = 0;
		for (i = 0; i < n; i++)
			done += xfer_step(w, &x[i], seed + (uint32_t)i, read_chunk);
		step(w);
		CHECK(fake_test_now_ms() - t0 < 30000);
	} while (done < n);
	for (i = 0; i < n; i++) {
		xfer_check(&x[i]);
		close(x[i].fd);
	}
	for (i = 0; i < n; i++)
		WAIT(w, x[i].gc->closed);
}

static void test_vsock_stream(void)
{
	struct world w;
	struct xfer x;
	int64_t t0;
	int edges;

	cur_test = "vsock stream";
	world_init(&w);
	edges = fake_vm_irq_edges(w.vm);
	/* 1 MiB each way: 16x the guest's window, 4x ours; host reads in small bites */
	xfer_start(&w, &x, 1u << 20, 1);
	t0 = fake_test_now_ms();
	while (!xfer_step(&w, &x, 1, 8192)) {
		step(&w);
		CHECK(fake_test_now_ms() - t0 < 20000);
	}
	xfer_check(&x);
	CHECK(fake_vm_irq_edges(w.vm) > edges);

	/* client EOF -> guest sees SHUTDOWN(both), answers RST -> host forgets the connection */
	close(x.fd);
	WAIT(&w, x.gc->shut == 3 && x.gc->closed);
	CHECK(w.g.violations == 0);
	world_fini(&w);
	printf("ok %s\n", cur_test);
}

static void test_vsock_guest_shutdown(void)
{
	struct world w;
	struct gconn *gc;
	struct virtio_vsock_hdr h;
	char buf[64];
	int fd;

	cur_test = "vsock guest shutdown";
	world_init(&w);
	fd = client_open(&w, 1000, &gc);
	/* guest writes, then shuts down sending: client reads the bytes, then EOF */
	g_hdr(&w.g, gc, VIRTIO_VSOCK_OP_RW, &h);
	h.len = 5;
	g_send(&w.g, &h, "hello", 5);
	g_ctrl(&w.g, gc, VIRTIO_VSOCK_OP_SHUTDOWN, VIRTIO_VSOCK_SHUTDOWN_SEND);
	WAIT(&w, read(fd, buf, sizeof(buf)) == 5);
	CHECK(memcmp(buf, "hello", 5) == 0);
	WAIT(&w, read(fd, buf, sizeof(buf)) == 0);
	/* the host may still send */
	CHECK(write(fd, "ping", 4) == 4);
	WAIT(&w, gc->data_len == 4);
	CHECK(memcmp(gc->data, "ping", 4) == 0);
	CHECK(!gc->got_rst);
	/* guest closes its side too: the device finishes with RST */
	g_ctrl(&w.g, gc, VIRTIO_VSOCK_OP_SHUTDOWN, VIRTIO_VSOCK_SHUTDOWN_RCV);
	WAIT(&w, gc->got_rst);
	WAIT(&w, client_eof(fd));
	close(fd);

	/* guest RST closes the client at once */
	fd = client_open(&w, 1000, &gc);
	g_ctrl(&w.g, gc, VIRTIO_VSOCK_OP_RST, 0);
	gc->closed = true;
	WAIT(&w, client_eof(fd));
	close(fd);

	/* CREDIT_REQUEST gets a CREDIT_UPDATE */
	fd = client_open(&w, 1000, &gc);
	gc->peer_buf_alloc = 0;
	g_ctrl(&w.g, gc, VIRTIO_VSOCK_OP_CREDIT_REQUEST, 0);
	WAIT(&w, gc->peer_buf_alloc == VSOCK_BUF_ALLOC);
	close(fd);
	WAIT(&w, gc->closed);
	world_fini(&w);
	printf("ok %s\n", cur_test);
}

static void test_vsock_credit_exhausted(void)
{
	struct world w;
	struct gconn *gc;
	static uint8_t big[200000];
	size_t off = 0;
	int fd, i;

	cur_test = "vsock credit";
	world_init(&w);
	w.g.consume = false; /* the guest application never reads */
	fd = client_open(&w, SMOLVM_AGENT_PORT, &gc);
	fake_test_pattern(big, sizeof(big), 9);
	while (off < sizeof(big)) {
		ssize_t n = send(fd, big + off, sizeof(big) - off, MSG_NOSIGNAL);

		if (n > 0)
			off += (size_t)n;
		step(&w);
		if (gc->data_len == w.g.buf_alloc)
			break;
	}
	for (i = 0; i < 50; i++)
		step(&w);
	CHECK(gc->data_len == w.g.buf_alloc); /* exactly the window, not a byte more */
	CHECK(memcmp(gc->data, big, gc->data_len) == 0);
	/* the guest reads it all: the rest follows */
	w.g.consume = true;
	while (off < sizeof(big)) {
		ssize_t n = send(fd, big + off, sizeof(big) - off, MSG_NOSIGNAL);

		if (n > 0)
			off += (size_t)n;
		step(&w);
	}
	WAIT(&w, gc->data_len == sizeof(big));
	CHECK(memcmp(gc->data, big, sizeof(big)) == 0);

	close(fd);
	WAIT(&w, gc->closed);

	/* window exactly full, then client EOF: SHUTDOWN needs no credit */
	w.g.consume = false;
	fd = client_open(&w, SMOLVM_AGENT_PORT, &gc);
	off = 0;
	while (off < w.g.buf_alloc) {
		ssize_t n = send(fd, big + off, w.g.buf_alloc - off, MSG_NOSIGNAL);

		if (n > 0)
			off += (size_t)n;
		step(&w);
	}
	WAIT(&w, gc->data_len == w.g.buf_alloc);
	for (i = 0; i < 20; i++)
		step(&w);
	CHECK(gc->shut == 0);
	shutdown(fd, SHUT_WR);
	WAIT(&w, gc->shut == 3 && gc->closed);
	WAIT(&w, client_eof(fd));
	close(fd);

	/* window full with more bytes behind it: EOF waits for those bytes */
	fd = client_open(&w, SMOLVM_AGENT_PORT, &gc);
	CHECK(send(fd, big, w.g.buf_alloc + 1000, MSG_NOSIGNAL) == (ssize_t)w.g.buf_alloc + 1000);
	shutdown(fd, SHUT_WR);
	WAIT(&w, gc->data_len == w.g.buf_alloc);
	for (i = 0; i < 20; i++)
		step(&w);
	CHECK(gc->shut == 0 && gc->data_len == w.g.buf_alloc);
	w.g.consume = true;
	WAIT(&w, gc->shut == 3 && gc->closed);
	CHECK(gc->data_len == w.g.buf_alloc + 1000 && memcmp(gc->data, big, gc->data_len) == 0);
	close(fd);
	world_fini(&w);
	printf("ok %s\n", cur_test);
}

static void test_vsock_guest_overrun(void)
{
	struct world w;
	struct gconn *gc;
	static uint8_t junk[0x10000];
	int fd;

	cur_test = "vsock guest overrun";
	world_init(&w);
	fd = client_open(&w, SMOLVM_AGENT_PORT, &gc);
	/* the client never reads: the guest ignores our credit and sends 1 MiB at once */
	for (int i = 0; i < 16 && !gc->closed; i++) {
		struct virtio_vsock_hdr h;

		g_hdr(&w.g, gc, VIRTIO_VSOCK_OP_RW, &h);
		h.len = sizeof(junk);
		g_send(&w.g, &h, junk, sizeof(junk));
		fake_loop_once(w.loop, 0);
	}
	WAIT(&w, gc->got_rst);
	WAIT(&w, client_eof(fd));
	CHECK(!fake_driver_broken(w.vm));
	close(fd);
	world_fini(&w);
	printf("ok %s\n", cur_test);
}

static void test_vsock_many(void)
{
	enum { N = 64, BIG = 6 };
	struct world w;
	static struct xfer x[N];
	int i;

	cur_test = "vsock many connections";
	world_init(&w);
	w.g.tx_split = TX_ONE;
	for (i = 0; i < N; i++)
		xfer_start(&w, &x[i], i < BIG ? 300000 : 3000 + (size_t)i * 17, (uint32_t)i + 7);
	xfer_all(&w, x, N, 7, 65536);
	world_fini(&w);
	printf("ok %s\n", cur_test);
}

static void test_vsock_refuse_and_ready(void)
{
	struct world w;
	struct virtio_vsock_hdr h = { 0 };
	char line[64];
	int fd, i;

	cur_test = "vsock refuse/ready";
	world_init(&w);
	/* guest has no listener on 7777: RST -> client closed without OK */
	fd = client_connect(&w);
	client_write_all(&w, fd, "CONNECT 7777\n");
	CHECK(client_read_line(&w, fd, line, sizeof(line)) == -1);
	close(fd);
	/* malformed CONNECT lines are closed without involving the guest */
	fd = client_connect(&w);
	client_write_all(&w, fd, "CONNECT x52\n");
	CHECK(client_read_line(&w, fd, line, sizeof(line)) == -1);
	close(fd);
	fd = client_connect(&w);
	client_write_all(&w, fd, "CONNECT 1111111111111111111111111111111111111111");
	CHECK(client_read_line(&w, fd, line, sizeof(line)) == -1);
	close(fd);

	/* the agent's ready connection: callback, then RST */
	h.src_cid = G_CID;
	h.dst_cid = 2;
	h.src_port = 49999;
	h.dst_port = SMOLVM_READY_PORT;
	h.type = VIRTIO_VSOCK_TYPE_STREAM;
	h.op = VIRTIO_VSOCK_OP_REQUEST;
	h.buf_alloc = 65536;
	g_send(&w.g, &h, NULL, 0);
	WAIT(&w, w.g.rst_unknown == 1);
	CHECK(w.ready_calls == 1);
	CHECK(w.g.last_rst.src_port == SMOLVM_READY_PORT && w.g.last_rst.dst_port == 49999);
	/* any other guest-initiated connection: RST only */
	h.dst_port = 80;
	g_send(&w.g, &h, NULL, 0);
	WAIT(&w, w.g.rst_unknown == 2);
	CHECK(w.ready_calls == 1 && w.g.last_rst.src_port == 80);
	/* a packet for no connection gets RST; an RST for none gets nothing */
	h.op = VIRTIO_VSOCK_OP_RW;
	h.len = 3;
	g_send(&w.g, &h, "abc", 3);
	WAIT(&w, w.g.rst_unknown == 3);
	h.op = VIRTIO_VSOCK_OP_RST;
	h.len = 0;
	g_send(&w.g, &h, NULL, 0);
	/* spoofed source CID: dropped silently */
	h.op = VIRTIO_VSOCK_OP_REQUEST;
	h.src_cid = 7;
	g_send(&w.g, &h, NULL, 0);
	for (i = 0; i < 20; i++)
		step(&w);
	CHECK(w.g.rst_unknown == 3 && w.ready_calls == 1);
	CHECK(!fake_driver_broken(w.vm));
	world_fini(&w);
	printf("ok %s\n", cur_test);
}

/* Malformed packets cost the connection, not the device. */
static void test_vsock_bad_packets(void)
{
	struct world w;
	struct gconn *gc;
	struct virtio_vsock_hdr h;
	static uint8_t big[0x10000 + 16];
	char buf[64];
	int fd, slot;
	uint64_t b;
	struct fake_seg s[2];

	cur_test = "vsock bad packets";
	world_init(&w);
	w.g.tiny_first = true;
	g_probe(&w.g);

	/* header and payload split weirdly, both ways */
	w.g.tx_split = TX_WEIRD;
	w.g.rx_mode = RX_WEIRD;
	fd = client_open(&w, SMOLVM_AGENT_PORT, &gc);
	g_hdr(&w.g, gc, VIRTIO_VSOCK_OP_RW, &h);
	h.len = 11;
	g_send(&w.g, &h, "split hello", 11);
	WAIT(&w, read(fd, buf, sizeof(buf)) == 11);
	CHECK(memcmp(buf, "split hello", 11) == 0);
	g_hdr(&w.g, gc, VIRTIO_VSOCK_OP_RW, &h);
	h.len = 3;
	g_send(&w.g, &h, "abc", 3); /* shorter than the weird cut */
	WAIT(&w, read(fd, buf, sizeof(buf)) == 3);
	CHECK(memcmp(buf, "abc", 3) == 0);
	fake_test_pattern(big, 3000, 3);
	CHECK(write(fd, big, 3000) == 3000);
	WAIT(&w, gc->data_len == 3000); /* arrives spread over the odd RX pieces */
	CHECK(memcmp(gc->data, big, 3000) == 0);
	w.g.tx_split = TX_TWO;
	w.g.rx_mode = RX_LINUX;

	/* oversized len: RST, device fine */
	g_hdr(&w.g, gc, VIRTIO_VSOCK_OP_RW, &h);
	h.len = 0x10001;
	slot = g_tx_slot(&w.g);
	b = G_TX_BASE + (uint64_t)slot * G_TX_SLOT;
	memcpy(w.vm->mem + b, &h, HDR);
	s[0] = (struct fake_seg){ b, HDR, false };
	s[1] = (struct fake_seg){ b + HDR, 0x10001, false };
	w.g.tx_busy[slot] = true;
	CHECK(fake_ring_add(&w.g.q[TXQ], s, 2, slot) >= 0);
	g_kick(&w.g, TXQ);
	WAIT(&w, gc->got_rst);
	WAIT(&w, client_eof(fd));
	close(fd);
	CHECK(!fake_driver_broken(w.vm));

	/* len claims more than the chain holds */
	fd = client_open(&w, SMOLVM_AGENT_PORT, &gc);
	g_hdr(&w.g, gc, VIRTIO_VSOCK_OP_RW, &h);
	h.len = 100;
	g_send_split(&w.g, &h, NULL, 0, TX_ONE);
	WAIT(&w, gc->got_rst);
	WAIT(&w, client_eof(fd));
	close(fd);

	/* unknown op and wrong type: RST */
	fd = client_open(&w, SMOLVM_AGENT_PORT, &gc);
	g_ctrl(&w.g, gc, 99, 0);
	WAIT(&w, gc->got_rst);
	WAIT(&w, client_eof(fd));
	close(fd);
	fd = client_open(&w, SMOLVM_AGENT_PORT, &gc);
	g_hdr(&w.g, gc, VIRTIO_VSOCK_OP_RW, &h);
	h.type = VIRTIO_VSOCK_TYPE_SEQPACKET;
	g_send(&w.g, &h, NULL, 0);
	WAIT(&w, gc->got_rst);
	WAIT(&w, client_eof(fd));
	close(fd);

	/* a header cut short (20 bytes in all): dropped */
	fd = client_open(&w, SMOLVM_AGENT_PORT, &gc);
	slot = g_tx_slot(&w.g);
	b = G_TX_BASE + (uint64_t)slot * G_TX_SLOT;
	g_hdr(&w.g, gc, VIRTIO_VSOCK_OP_RST, &h);
	memcpy(w.vm->mem + b, &h, HDR);
	s[0] = (struct fake_seg){ b, 20, false };
	w.g.tx_busy[slot] = true;
	CHECK(fake_ring_add(&w.g.q[TXQ], s, 1, slot) >= 0);
	g_kick(&w.g, TXQ);
	/* a TX chain that is device-writable only: no readable header either */
	slot = g_tx_slot(&w.g);
	s[0] = (struct fake_seg){ G_TX_BASE + (uint64_t)slot * G_TX_SLOT, 64, true };
	w.g.tx_busy[slot] = true;
	CHECK(fake_ring_add(&w.g.q[TXQ], s, 1, slot) >= 0);
	g_kick(&w.g, TXQ);
	CHECK(write(fd, "still alive", 11) == 11);
	WAIT(&w, gc->data_len == 11);
	CHECK(!gc->got_rst && !fake_driver_broken(w.vm));
	close(fd);
	WAIT(&w, gc->closed);
	world_fini(&w);
	printf("ok %s\n", cur_test);
}

/* Ring-level attacks: DEVICE_NEEDS_RESET, clients dropped, then a reset brings it back. */
static void hostile_case(int which)
{
	struct world w;
	struct gconn *gc;
	struct fake_ring *tq;
	struct vring_desc *d;
	char line[64];
	int fd, fd2;
	uint32_t st;

	world_init(&w);
	if (which == 7)
		w.g.buf_alloc = 1u << 20; /* credit is not what stops the host */
	fd = client_open(&w, SMOLVM_AGENT_PORT, &gc);
	tq = &w.g.q[TXQ];
	d = tq->desc;
	switch (which) {
	case 0: /* descriptor address past RAM */
		d[0] = (struct vring_desc){ RAM_SIZE - 16, 44, 0, 0 };
		break;
	case 1: /* gpa + len wraps */
		d[0] = (struct vring_desc){ 0xffffffffffffffc0ull, 0x100, 0, 0 };
		break;
	case 2: /* NEXT loop */
		d[0] = (struct vring_desc){ G_SCRATCH, 44, VRING_DESC_F_NEXT, 1 };
		d[1] = (struct vring_desc){ G_SCRATCH, 44, VRING_DESC_F_NEXT, 0 };
		break;
	case 3: /* next out of range */
		d[0] = (struct vring_desc){ G_SCRATCH, 44, VRING_DESC_F_NEXT, 60000 };
		break;
	case 4: /* indirect */
		d[0] = (struct vring_desc){ G_SCRATCH, 16, VRING_DESC_F_INDIRECT, 0 };
		break;
	}
	if (which <= 4) {
		tq->avail->ring[tq->avail_idx % tq->size] = 0;
		tq->avail_idx++;
		tq->avail->idx = tq->avail_idx;
	} else if (which == 5) { /* avail idx jumps past the ring */
		tq->avail->idx = (uint16_t)(tq->avail_idx + G_QSIZE + 1);
	} else if (which == 6) { /* head index out of range */
		tq->avail->ring[tq->avail_idx % tq->size] = 4000;
		tq->avail->idx = ++tq->avail_idx;
	} else if (which == 7) { /* the RX ring breaks instead: data from the host has nowhere valid to go */
		struct fake_ring *rq = &w.g.q[RXQ];

		rq->desc[rq->free_stack[rq->nfree - 1]] = (struct vring_desc){ RAM_SIZE, 1, VRING_DESC_F_WRITE, 0 };
		rq->avail->ring[rq->avail_idx % rq->size] = rq->free_stack[rq->nfree - 1];
		rq->avail->idx = ++rq->avail_idx;
		/* the good buffers before it are used up first */
	}
	if (which == 7) {
		static uint8_t blob[64 * 4096 + 100];

		size_t off = 0;
		int64_t t0 = fake_test_now_ms();

		/* no g_poll() here: nothing is re-posted, so the bad buffer is reached */
		while (!fake_driver_broken(w.vm)) {
			ssize_t n = send(fd, blob + off % sizeof(blob), 4096, MSG_NOSIGNAL);

			if (n > 0)
				off += (size_t)n;
			fake_loop_once(w.loop, 2);
			CHECK(fake_test_now_ms() - t0 < 10000);
		}
	} else {
		g_kick(&w.g, TXQ);
		WAIT(&w, fake_driver_broken(w.vm));
	}
	st = fake_vm_mr(w.vm, VIRTIO_MMIO_STATUS);
	CHECK(st == (0xf | VIRTIO_CONFIG_S_NEEDS_RESET));
	CHECK((w.g.isr_seen | fake_vm_mr(w.vm, VIRTIO_MMIO_INTERRUPT_STATUS)) & VIRTIO_MMIO_INT_CONFIG);
	WAIT(&w, client_eof(fd)); /* connections are dropped */
	close(fd);
	/* the host side keeps working: a new client waits for the device */
	fd2 = client_connect(&w);
	client_write_all(&w, fd2, "CONNECT 52\n");
	for (int i = 0; i < 10; i++)
		fake_loop_once(w.loop, 1);
	/* the driver resets and probes again; the waiting client gets through */
	g_reset_state(&w.g);
	g_probe(&w.g);
	CHECK(!fake_driver_broken(w.vm));
	CHECK(client_read_line(&w, fd2, line, sizeof(line)) > 0 && strncmp(line, "OK ", 3) == 0);
	close(fd2);
	for (int i = 0; i < G_MAX_CONNS; i++)
		if (w.g.c[i].used)
			WAIT(&w, w.g.c[i].closed);
	world_fini(&w);
}

static void test_vsock_hostile_rings(void)
{
	int i;

	cur_test = "vsock hostile rings";
	for (i = 0; i <= 7; i++)
		hostile_case(i);
	printf("ok %s\n", cur_test);
}

static void test_vsock_bad_queue_setup(void)
{
	struct world w;
	struct fake_ring gq;

	cur_test = "vsock bad queue setup";
	world_init(&w);
	fake_vm_mw(w.vm, VIRTIO_MMIO_STATUS, 0);
	fake_driver_features_ok(w.vm);
	fake_ring_init(&gq, w.vm, 0, 100, FAKE_RING_BASE(0)); /* not a power of two */
	fake_ring_setup(&gq);
	CHECK(fake_vm_mr(w.vm, VIRTIO_MMIO_QUEUE_READY) == 0 && fake_driver_broken(w.vm));
	fake_vm_mw(w.vm, VIRTIO_MMIO_STATUS, 0);
	fake_driver_features_ok(w.vm);
	fake_vm_mw(w.vm, VIRTIO_MMIO_QUEUE_SEL, 1);
	fake_vm_mw(w.vm, VIRTIO_MMIO_QUEUE_NUM, 256);
	fake_vm_mw(w.vm, VIRTIO_MMIO_QUEUE_DESC_LOW, 0);
	fake_vm_mw(w.vm, VIRTIO_MMIO_QUEUE_DESC_HIGH, 1); /* 4 GiB: no RAM there */
	fake_vm_mw(w.vm, VIRTIO_MMIO_QUEUE_READY, 1);
	CHECK(fake_vm_mr(w.vm, VIRTIO_MMIO_QUEUE_READY) == 0 && fake_driver_broken(w.vm));
	/* DRIVER_OK with no queues set up: the device breaks rather than touch them */
	fake_vm_mw(w.vm, VIRTIO_MMIO_STATUS, 0);
	fake_driver_features_ok(w.vm);
	fake_vm_mw(w.vm, VIRTIO_MMIO_STATUS, 0xf);
	fake_vm_mw(w.vm, VIRTIO_MMIO_QUEUE_NOTIFY, 1);
	for (int i = 0; i < 5; i++)
		fake_loop_once(w.loop, 1);
	CHECK(fake_driver_broken(w.vm));
	g_probe(&w.g);
	CHECK(!fake_driver_broken(w.vm));
	world_fini(&w);
	printf("ok %s\n", cur_test);
}

static void test_vsock_resets(void)
{
	struct world w;
	struct gconn *gc;
	int fd, fd2;

	cur_test = "vsock resets";
	world_init(&w);
	/* transport reset event (snapshot restore): event delivered, clients closed */
	fd = client_open(&w, SMOLVM_AGENT_PORT, &gc);
	CHECK(vsock_reset_transport(w.vs) == 0);
	WAIT(&w, w.g.events == 1);
	CHECK(w.g.last_event == VIRTIO_VSOCK_EVENT_TRANSPORT_RESET);
	WAIT(&w, client_eof(fd));
	close(fd);
	g_reset_state(&w.g);
	/* Until the driver handled the event (Linux re-reads the CID), new REQUESTs wait. */
	fd = client_connect(&w);
	client_write_all(&w, fd, "CONNECT 52\n");
	for (int k = 0; k < 50; k++)
		step(&w);
	CHECK(!w.g.c[0].used);
	(void)fake_vm_mr(w.vm, 0x100); /* config space: guest_cid */
	close(fd);
	fd = client_open(&w, SMOLVM_AGENT_PORT, &gc);
	CHECK(write(fd, "x", 1) == 1);
	WAIT(&w, gc->data_len == 1);

	/* device reset by the driver drops connections; a fresh probe works */
	fd2 = client_open(&w, 1000, &gc);
	fake_vm_mw(w.vm, VIRTIO_MMIO_STATUS, 0);
	WAIT(&w, client_eof(fd) && client_eof(fd2));
	close(fd);
	close(fd2);
	CHECK(vsock_reset_transport(w.vs) == -ENOTCONN);
	g_reset_state(&w.g);
	g_probe(&w.g);
	fd = client_open(&w, 1000, &gc);
	close(fd);
	WAIT(&w, gc->closed);
	world_fini(&w);
	printf("ok %s\n", cur_test);
}

/* The loop on its own thread, the guest (vCPU) and clients on this one: the real arrangement. */
static void test_vsock_threaded(void)
{
	enum { N = 4 };
	struct world w;
	static struct xfer x[N];
	int i;

	cur_test = "vsock threaded";
	threaded = true;
	world_init(&w);
	for (i = 0; i < N; i++)
		xfer_start(&w, &x[i], 700000, (uint32_t)i + 100);
	xfer_all(&w, x, N, 100, 16384);
	/* a device reset from the vCPU while the loop runs */
	x[0].fd = client_open(&w, SMOLVM_AGENT_PORT, &x[0].gc);
	fake_vm_mw(w.vm, VIRTIO_MMIO_STATUS, 0);
	WAIT(&w, client_eof(x[0].fd));
	close(x[0].fd);
	world_fini(&w);
	threaded = false;
	printf("ok %s\n", cur_test);
}

static void test_vsock_new_errors(void)
{
	struct evloop *loop;
	struct vm *vm;
	struct vsock *vs;
	struct vsock_config cfg = { .base = 0xd0000000, .gsi = 5, .uds_path = "/tmp/smolvm-test-x.sock" };
	char longp[200];

	cur_test = "vsock_new errors";
	CHECK(evloop_new(&loop) == 0);
	vm = fake_vm_new(RAM_SIZE, NULL);
	CHECK(vsock_new(vm, &cfg, &vs) == -EINVAL && !vs); /* no loop */
	vm->loop = loop;
	memset(longp, 'a', sizeof(longp) - 1);
	longp[sizeof(longp) - 1] = 0;
	cfg.uds_path = longp;
	CHECK(vsock_new(vm, &cfg, &vs) == -ENAMETOOLONG);
	cfg.uds_path = "/nonexistent-dir/x.sock";
	CHECK(vsock_new(vm, &cfg, &vs) < 0);
	cfg.uds_path = "/tmp/smolvm-test-x.sock";
	cfg.guest_cid = 2;
	CHECK(vsock_new(vm, &cfg, &vs) == -EINVAL);
	CHECK(fake_loop_watches(loop) == 0 && vm->nr_mmio == 0);
	fake_vm_free(vm);
	evloop_free(loop);
	printf("ok %s\n", cur_test);
}

/* vsock_open(): a connected host socket handed to the guest with a preface; half-closes both ways. */
static struct gconn *find_gconn(struct world *w, uint32_t gport)
{
	for (int i = 0; i < G_MAX_CONNS; i++)
		if (w->g.c[i].used && !w->g.c[i].closed && w->g.c[i].gport == gport)
			return &w->g.c[i];
	return NULL;
}

static void test_vsock_open(void)
{
	struct world w;
	struct gconn *gc = NULL;
	struct virtio_vsock_hdr h;
	uint8_t big[VSOCK_PREFACE_MAX + 1] = { 0 };
	char buf[64];
	int sp[2], sp2[2];

	cur_test = "vsock open";
	world_init(&w);
	CHECK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sp) == 0);
	CHECK(vsock_open(w.vs, -1, 1000, "", 0) == -EINVAL);
	CHECK(vsock_open(w.vs, sp[1], 1000, big, sizeof(big)) == -EINVAL);
	CHECK(write(sp[0], "abc", 3) == 3); /* sent before the guest accepted: waits */
	CHECK(vsock_open(w.vs, sp[1], 1000, "PRE", 3) == 0);
	WAIT(&w, (gc = find_gconn(&w, 1000)) && gc->data_len == 6);
	CHECK(memcmp(gc->data, "PREabc", 6) == 0); /* the preface, then the client's bytes; no "OK" line */
	g_hdr(&w.g, gc, VIRTIO_VSOCK_OP_RW, &h);
	h.len = 5;
	g_send(&w.g, &h, "hello", 5);
	WAIT(&w, read(sp[0], buf, sizeof(buf)) == 5);
	CHECK(memcmp(buf, "hello", 5) == 0);
	/* client EOF is a half-close: the guest hears SHUTDOWN(SEND) and may still answer */
	CHECK(shutdown(sp[0], SHUT_WR) == 0);
	WAIT(&w, gc->shut == VIRTIO_VSOCK_SHUTDOWN_SEND);
	CHECK(!gc->got_rst);
	g_hdr(&w.g, gc, VIRTIO_VSOCK_OP_RW, &h);
	h.len = 4;
	g_send(&w.g, &h, "late", 4);
	WAIT(&w, read(sp[0], buf, sizeof(buf)) == 4);
	CHECK(memcmp(buf, "late", 4) == 0);
	/* the guest is done sending too: the client gets EOF and the device finishes with RST */
	g_ctrl(&w.g, gc, VIRTIO_VSOCK_OP_SHUTDOWN, VIRTIO_VSOCK_SHUTDOWN_SEND);
	WAIT(&w, gc->got_rst);
	WAIT(&w, client_eof(sp[0]));
	close(sp[0]);

	/* a guest port nobody listens on: the guest refuses, the socket is closed */
	CHECK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sp2) == 0);
	CHECK(vsock_open(w.vs, sp2[1], 4242, "x", 1) == 0);
	WAIT(&w, client_eof(sp2[0]));
	close(sp2[0]);
	world_fini(&w);
	printf("ok %s\n", cur_test);
}

int main(void)
{
	struct evloop *l = NULL;

	setvbuf(stdout, NULL, _IONBF, 0);
	qvm = fake_vm_new(RAM_SIZE, l);
	test_queue();
	fake_vm_free(qvm);
	test_mmio(false);
	test_mmio(true);
	test_mmio_bad_ops();
	test_mmio_kvm();
	test_vsock_new_errors();
	test_vsock_stream();
	test_vsock_guest_shutdown();
	test_vsock_open();
	test_vsock_credit_exhausted();
	test_vsock_guest_overrun();
	test_vsock_refuse_and_ready();
	test_vsock_bad_packets();
	test_vsock_hostile_rings();
	test_vsock_bad_queue_setup();
	test_vsock_resets();
	test_vsock_many();
	test_vsock_threaded();
	printf("all virtio tests passed\n");
	return 0;
}
