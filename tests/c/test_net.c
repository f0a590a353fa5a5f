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
#include <unistd.h>

#include <linux/virtio_config.h>
#include <linux/virtio_mmio.h>
#include <linux/virtio_net.h>
#include <linux/virtio_ring.h>

#include "dns.h"
#include "evloop.h"
#include "net_filter.h"
#include "fake_driver.h"
#include "fake_snap.h"
#include "fake_test.h"
#include "fake_vm.h"
#include "snapshot.h"
#include "virtio/mmio.h"
#include "virtio/net.h"
#include "virtio/queue.h"
#include "vm.h"

/* ---- the world: guest RAM, device, loop thread, backend peer ---- */

#define RAM_SIZE (16u << 20)
#define G_QSIZE 256u
#define G_RXBUF 0x100000ull /* RX buffers: 128 KiB each */
#define G_RXBUF_SIZE 0x20000u
#define G_TXBUF 0xa00000ull /* TX frames: 32 slots of 128 KiB, after the RX buffers */

struct world {
	struct evloop *loop;
	struct vm *vm;
	struct net *net;
	pthread_t thread;
	int peer; /* the backend's (passt's) end */
	struct fake_ring q[2];
};

static uint8_t *gmem(struct world *w, uint64_t gpa)
{
	return w->vm->mem + gpa;
}

static void g_probe(struct world *w)
{
	uint64_t features = fake_driver_negotiate(w->vm, 1);
	uint16_t mtu = 0;

	CHECK(features & (1u << VIRTIO_NET_F_MAC));
	CHECK(features & (1u << VIRTIO_NET_F_MTU));
	fake_vm_access(w->vm, VIRTIO_MMIO_CONFIG + 10, &mtu, 2, false);
	CHECK(mtu == NET_MTU);
	for (unsigned q = 0; q < 2; q++) {
		fake_ring_init(&w->q[q], w->vm, q, G_QSIZE, FAKE_RING_BASE(q));
		fake_ring_setup(&w->q[q]);
	}
	fake_driver_ok(w->vm);
}

/* Post a chain on queue q tagged tag (CHECKed to fit) and kick. */
static void gq_add(struct world *w, unsigned q, const struct fake_seg *s, int n, int tag)
{
	CHECK(fake_ring_add(&w->q[q], s, n, tag) >= 0);
	fake_ring_kick(&w->q[q]);
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

static void world_init_with(struct world *w, struct netf *filter)
{
	struct net_config cfg = { .base = 0xd0005000, .gsi = 10, .mac = { 0x52, 0x54, 0, 0x12, 0x34, 0x56 },
				  .filter = filter, .dns_ip = htonl(0x0a000203) };
	int sp[2];

	memset(w, 0, sizeof(*w));
	CHECK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sp) == 0);
	CHECK(fcntl(sp[0], F_SETFL, O_NONBLOCK) == 0);
	cfg.backend_fd = sp[0];
	w->peer = sp[1];
	CHECK(evloop_new(&w->loop) == 0);
	w->vm = fake_vm_new(RAM_SIZE, w->loop);
	CHECK(net_new(w->vm, &cfg, &w->net) == 0);
	CHECK(pthread_create(&w->thread, NULL, loop_main, w->loop) == 0);
	g_probe(w);
}

static void world_init(struct world *w)
{
	world_init_with(w, NULL);
}

static void world_fini(struct world *w)
{
	evloop_stop(w->loop);
	CHECK(pthread_join(w->thread, NULL) == 0);
	net_free(w->net);
	fake_vm_free(w->vm);
	evloop_free(w->loop);
	close(w->peer);
}

/* ---- helpers ---- */

/* Post a TX chain: header then frame, the frame split into nseg descriptors. */
static void g_tx(struct world *w, const struct virtio_net_hdr_v1 *h, uint32_t hlen, const uint8_t *frame,
		 uint32_t len, int nseg)
{
	static unsigned next;
	unsigned slot = next++ % 32;
	uint64_t base = G_TXBUF + (uint64_t)slot * 0x20000; /* chains in flight never share memory */
	struct fake_seg s[64];
	int n = 0;
	uint32_t off = 0;

	memcpy(gmem(w, base), h, hlen);
	s[n++] = (struct fake_seg){ base, hlen, false };
	memcpy(gmem(w, base + 0x1000), frame, len);
	for (int i = 0; i < nseg; i++) {
		uint32_t piece = i + 1 == nseg ? len - off : len / (uint32_t)nseg;

		s[n++] = (struct fake_seg){ base + 0x1000 + off, piece, false };
		off += piece;
	}
	gq_add(w, 1, s, n, (int)slot);
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
	struct fake_seg s = { G_RXBUF + (uint64_t)slot * G_RXBUF_SIZE, size, true };

	gq_add(w, 0, &s, 1, (int)slot);
}

/* ---- tests ---- */

static void test_tx(void)
{
	struct world w;
	struct virtio_net_hdr_v1 h = { 0 };
	static uint8_t frame[NET_MAX_FRAME], got[NET_MAX_FRAME];
	int tag;
	uint32_t used;

	cur_test = "tx";
	world_init(&w);
	for (uint32_t len = 14; len <= NET_MAX_FRAME; len = len * 3 + 1 > NET_MAX_FRAME && len != NET_MAX_FRAME
							      ? NET_MAX_FRAME : len * 3 + 1) {
		fake_test_pattern(frame, len, len);
		g_tx(&w, &h, sizeof(h), frame, len, len > 64 ? 5 : 1);
		CHECK(fake_ring_wait(&w.q[1], &tag, &used) && used == 0);
		CHECK(peer_frame(&w, got, sizeof(got)) == len);
		CHECK(memcmp(got, frame, len) == 0);
	}
	/* NEEDS_CSUM: the device completes the checksum (a UDP-like layout, sum field at 40) */
	fake_test_pattern(frame, 200, 9);
	frame[40] = frame[41] = 0;
	h.flags = VIRTIO_NET_HDR_F_NEEDS_CSUM;
	h.csum_start = 34;
	h.csum_offset = 6;
	g_tx(&w, &h, sizeof(h), frame, 200, 3);
	CHECK(fake_ring_wait(&w.q[1], &tag, &used));
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
	int tag;
	uint32_t used;
	struct fake_seg s[2];

	cur_test = "tx hostile";
	world_init(&w);
	fake_test_pattern(frame, sizeof(frame), 3);
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
		CHECK(fake_ring_wait(&w.q[1], &tag, &used) && used == 0);
	CHECK(peer_quiet(&w, 200));
	/* a writable descriptor in a TX chain is ignored past the readable part: the frame goes */
	s[0] = (struct fake_seg){ G_TXBUF, sizeof(h), false };
	memcpy(gmem(&w, G_TXBUF), &h, sizeof(h));
	s[1] = (struct fake_seg){ G_TXBUF + 0x1000, 60, false };
	gq_add(&w, 1, s, 2, 0);
	CHECK(fake_ring_wait(&w.q[1], &tag, &used));
	CHECK(peer_frame(&w, got, sizeof(got)) == 60);
	/* a descriptor outside guest RAM breaks the device (DEVICE_NEEDS_RESET), nothing else */
	s[1] = (struct fake_seg){ RAM_SIZE - 10, 100, false };
	gq_add(&w, 1, s, 2, 0);
	CHECK(!fake_ring_wait(&w.q[1], &tag, &used));
	CHECK(fake_driver_broken(w.vm));
	/* a reset and a new start bring it back */
	g_probe(&w);
	g_tx(&w, &h, sizeof(h), frame, 64, 2);
	CHECK(fake_ring_wait(&w.q[1], &tag, &used));
	CHECK(peer_frame(&w, got, sizeof(got)) == 64 && memcmp(got, frame, 64) == 0);
	world_fini(&w);
	printf("ok %s\n", cur_test);
}

static void test_rx(void)
{
	struct world w;
	static uint8_t frame[NET_MAX_FRAME];
	int tag;
	uint32_t used;
	struct virtio_net_hdr_v1 h;

	cur_test = "rx";
	world_init(&w);
	/* frames that come before any buffer wait (the backend is not read meanwhile) */
	for (uint32_t i = 0; i < 50; i++) {
		fake_test_pattern(frame, 60 + i, i);
		peer_send(&w, frame, 60 + i);
	}
	CHECK(gq_idle(&w, 0, 100));
	for (uint32_t i = 0; i < 50; i++) {
		g_rx_post(&w, 0, G_RXBUF_SIZE);
		CHECK(fake_ring_wait(&w.q[0], &tag, &used));
		CHECK(used == sizeof(h) + 60 + i);
		memcpy(&h, gmem(&w, G_RXBUF), sizeof(h));
		CHECK(h.num_buffers == 1 && h.gso_type == 0);
		fake_test_pattern(frame, 60 + i, i);
		CHECK(memcmp(gmem(&w, G_RXBUF + sizeof(h)), frame, 60 + i) == 0); /* in order, byte-exact */
	}
	/* the largest frame */
	fake_test_pattern(frame, NET_MAX_FRAME, 5);
	peer_send(&w, frame, NET_MAX_FRAME);
	g_rx_post(&w, 1, G_RXBUF_SIZE);
	CHECK(fake_ring_wait(&w.q[0], &tag, &used) && used == sizeof(h) + NET_MAX_FRAME);
	CHECK(memcmp(gmem(&w, G_RXBUF + G_RXBUF_SIZE + sizeof(h)), frame, NET_MAX_FRAME) == 0);
	/* a buffer too small for the frame: the frame is lost, the buffer takes the next one */
	peer_send(&w, frame, 2000);
	peer_send(&w, frame, 100);
	g_rx_post(&w, 2, 1500);
	CHECK(fake_ring_wait(&w.q[0], &tag, &used) && used == sizeof(h) + 100);
	/* a flood of small frames with buffers recycled */
	for (int i = 0; i < 32; i++)
		g_rx_post(&w, (unsigned)i, 2048);
	for (uint32_t i = 0; i < 3000; i++) {
		uint32_t len = 60 + i % 1400;

		frame[0] = (uint8_t)i;
		frame[1] = (uint8_t)(i >> 8);
		peer_send(&w, frame, len);
		CHECK(fake_ring_wait(&w.q[0], &tag, &used) && used == sizeof(h) + len);
		CHECK(*gmem(&w, G_RXBUF + (uint64_t)tag * G_RXBUF_SIZE + sizeof(h)) == (uint8_t)i);
		g_rx_post(&w, (unsigned)tag, 2048);
	}
	world_fini(&w);
	printf("ok %s\n", cur_test);
}

static void test_backend_hostile(void)
{
	struct world w;
	uint8_t frame[64] = { 0 }, b;
	int tag;
	uint32_t used;
	uint32_t huge = htonl(NET_MAX_FRAME + 1);

	cur_test = "backend hostile";
	world_init(&w);
	g_rx_post(&w, 0, 2048);
	peer_send(&w, frame, 0); /* an empty frame: a runt, dropped */
	peer_send(&w, frame, 5);
	peer_send(&w, frame, 64);
	CHECK(fake_ring_wait(&w.q[0], &tag, &used) && used == 12 + 64);
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
		CHECK(fake_ring_wait(&w.q[1], &tag, &used) && used == 0);
		CHECK(!fake_driver_broken(w.vm));
	}
	world_fini(&w);
	printf("ok %s\n", cur_test);
}

static void test_backend_gone(void)
{
	struct world w;
	uint8_t frame[64] = { 0 };
	struct virtio_net_hdr_v1 h = { 0 };
	int tag;
	uint32_t used;

	cur_test = "backend gone";
	world_init(&w);
	close(w.peer);
	w.peer = open("/dev/null", O_RDONLY);
	g_rx_post(&w, 0, 2048);
	for (int i = 0; i < 10; i++) {
		g_tx(&w, &h, sizeof(h), frame, 64, 1);
		CHECK(fake_ring_wait(&w.q[1], &tag, &used));
	}
	CHECK(!fake_driver_broken(w.vm));
	world_fini(&w);
	printf("ok %s\n", cur_test);
}

/* ---- the egress filter in the device ---- */

/* Ethernet + IPv4 from the guest (10.0.2.15) to dst carrying l4; returns the frame length. */
static uint32_t f_ip(uint8_t *f, uint8_t proto, uint32_t dst, const uint8_t *l4, uint32_t l4len)
{
	static const uint8_t hdr[14] = { 0x9a, 0x55, 0x9a, 0x55, 0x9a, 0x55, 0x52, 0x54, 0, 0x12, 0x34, 0x56, 8, 0 };
	uint32_t src = htonl(0x0a00020f), d = htonl(dst);
	uint8_t *ip = f + 14;

	memcpy(f, hdr, 14);
	memset(ip, 0, 20);
	ip[0] = 0x45;
	ip[2] = (uint8_t)((20 + l4len) >> 8);
	ip[3] = (uint8_t)(20 + l4len);
	ip[8] = 64;
	ip[9] = proto;
	memcpy(ip + 12, &src, 4);
	memcpy(ip + 16, &d, 4);
	memcpy(ip + 20, l4, l4len);
	return 34 + l4len;
}

static uint32_t f_syn(uint8_t *f, uint32_t dst)
{
	uint8_t t[20] = { 0xc0, 0x01, 0x1f, 0x90, 0, 0, 0x03, 0xe8, 0, 0, 0, 0, 5 << 4, 0x02 };

	return f_ip(f, 6, dst, t, 20);
}

static uint32_t f_dns(uint8_t *f, const char *label1, const char *label2)
{
	uint8_t u[128] = { 0x9c, 0x40, 0, 53, 0, 0, 0, 0, 0x12, 0x34, 0x01, 0, 0, 1, 0, 0, 0, 0, 0, 0 };
	uint32_t off = 20, l1 = (uint32_t)strlen(label1), l2 = (uint32_t)strlen(label2);

	u[off++] = (uint8_t)l1;
	memcpy(u + off, label1, l1);
	off += l1;
	if (l2) {
		u[off++] = (uint8_t)l2;
		memcpy(u + off, label2, l2);
		off += l2;
	}
	u[off++] = 0;
	u[off++] = 0;
	u[off++] = 1; /* A */
	u[off++] = 0;
	u[off++] = 1; /* IN */
	u[5] = (uint8_t)off;
	return f_ip(f, 17, 0x0a000203, u, off);
}

/* The next frame the device gives the guest (an RX buffer posted first): its length, the frame into buf. */
static uint32_t g_rx_frame(struct world *w, uint8_t *buf)
{
	int tag;
	uint32_t used;

	g_rx_post(w, 0, G_RXBUF_SIZE);
	CHECK(fake_ring_wait(&w->q[0], &tag, &used));
	CHECK(used > sizeof(struct virtio_net_hdr_v1));
	memcpy(buf, gmem(w, G_RXBUF) + sizeof(struct virtio_net_hdr_v1), used - sizeof(struct virtio_net_hdr_v1));
	return used - (uint32_t)sizeof(struct virtio_net_hdr_v1);
}

static void test_filter(void)
{
	struct world w;
	struct virtio_net_hdr_v1 h = { 0 };
	static uint8_t frame[2048], got[NET_MAX_FRAME];
	struct netf *f;
	struct net_stats st;
	uint32_t len, gw = htonl(0x0a000202), lo = htonl(0x7f000001);
	int tag;
	uint32_t used;

	cur_test = "filter";
	CHECK(netf_new(&f) == 0);
	CHECK(netf_add_domain(f, "api.test") == 0 && netf_add_domain(f, "localhost") == 0);
	CHECK(netf_add_host(f, "api.test=10.0.2.2") == 0);
	world_init_with(&w, f);
	/* a SYN to the gateway before any answer: an RST to the guest, nothing to the backend */
	len = f_syn(frame, 0x0a000202);
	g_tx(&w, &h, sizeof(h), frame, len, 1);
	CHECK(fake_ring_wait(&w.q[1], &tag, &used));
	len = g_rx_frame(&w, got);
	CHECK(len == 54 && got[23] == 6 && (got[34 + 13] & 0x04) && memcmp(got + 26, &gw, 4) == 0);
	CHECK(peer_quiet(&w, 100));
	/* a refused name: NXDOMAIN; an allowed one from the extra hosts: its address, which opens it */
	len = f_dns(frame, "blocked", "test");
	g_tx(&w, &h, sizeof(h), frame, len, 1);
	CHECK(fake_ring_wait(&w.q[1], &tag, &used));
	len = g_rx_frame(&w, got);
	CHECK(len > 42 + 12 && got[23] == 17 && got[34 + 1] == 53 && got[42] == 0x12 && (got[42 + 3] & 0xf) == 3);
	len = f_dns(frame, "api", "test");
	g_tx(&w, &h, sizeof(h), frame, len, 2);
	CHECK(fake_ring_wait(&w.q[1], &tag, &used));
	len = g_rx_frame(&w, got);
	CHECK((got[42 + 3] & 0xf) == 0 && got[42 + 7] == 1 && memcmp(got + len - 4, &gw, 4) == 0);
	len = f_syn(frame, 0x0a000202);
	g_tx(&w, &h, sizeof(h), frame, len, 1);
	CHECK(fake_ring_wait(&w.q[1], &tag, &used));
	CHECK(peer_frame(&w, got, sizeof(got)) == len && memcmp(got, frame, len) == 0);
	/* a name for the host's resolver: answered from the resolver thread */
	len = f_dns(frame, "localhost", "");
	g_tx(&w, &h, sizeof(h), frame, len, 1);
	CHECK(fake_ring_wait(&w.q[1], &tag, &used));
	len = g_rx_frame(&w, got);
	CHECK((got[42 + 3] & 0xf) == 0 && got[42 + 7] >= 1 && memcmp(got + len - 4, &lo, 4) == 0);
	/* IPv6 and a DNS query cut short are dropped: nothing either way */
	len = f_dns(frame, "api", "test");
	frame[12] = 0x86;
	frame[13] = 0xdd;
	g_tx(&w, &h, sizeof(h), frame, len, 1);
	len = f_dns(frame, "api", "test");
	g_tx(&w, &h, sizeof(h), frame, len - 3, 1);
	for (int i = 0; i < 2; i++)
		CHECK(fake_ring_wait(&w.q[1], &tag, &used));
	CHECK(peer_quiet(&w, 100));
	g_rx_post(&w, 1, G_RXBUF_SIZE);
	CHECK(gq_idle(&w, 0, 100));
	net_get_stats(w.net, &st);
	CHECK(st.tx_filtered == 6 && st.dns_answered == 3 && st.tx_frames == 1);
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
	test_filter();
	printf("all net tests passed\n");
	return 0;
}
