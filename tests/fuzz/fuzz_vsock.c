/*
 * libFuzzer harness: virtio-vsock (csrc/vmm/virtio/vsock.c) driven by a hostile
 * guest driver and real host clients on the device's Unix socket. Packets the
 * guest sends (any header: op, flags, len, credit fields, addresses), RX
 * buffers of any shape, host clients that connect, write, read, shut down and
 * close, transport resets and raw register writes, in the order the input says.
 * The device is reset between inputs (which drops every connection).
 *
 * Input: a list of steps, each [op] + arguments (see the switch below). TX
 * packets with `fix` & 1 get the guest's addresses and the ports of a
 * connection the host asked for (a REQUEST seen on the RX ring), so the
 * fuzzer reaches established connections and their credit accounting.
 */
#include "fuzz_common.h"

#include <fcntl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <linux/virtio_config.h>
#include <linux/virtio_mmio.h>
#include <linux/virtio_ring.h>
#include <linux/virtio_vsock.h>

#include "proto.h"
#include "virtio/mmio.h"
#include "virtio/vsock.h"

#define RAM (1u << 20)
#define QSIZE 64u
#define HDR 44u
#define EV_BUF 0xa000ull
#define RX_BUF 0x10000ull
#define TX_BUF 0x50000ull
#define SLOTS 32u
#define SLOT 0x2000ull
#define MAX_CLIENTS 8
#define MAX_REQS 16

enum { RXQ, TXQ, EVQ, NQ };

struct gq {
	uint64_t base;
	struct vring_desc *desc;
	struct vring_avail *avail;
	struct vring_used *used;
	uint16_t di, ai, last_used;
};

static struct evloop *loop;
static struct vm *vm;
static struct vsock *vs;
static char path[108];
static struct gq gq[NQ];
static int clients[MAX_CLIENTS];
static struct {
	uint32_t hport, gport;
} reqs[MAX_REQS];
static unsigned nreqs, rx_slot, tx_slot;
static int ready_calls;

static void on_ready(void *opaque)
{
	(void)opaque;
	ready_calls++;
}

static void unlink_path(void)
{
	unlink(path);
}

static void mw(uint64_t off, uint32_t v)
{
	fake_vm_mw(vm, off, v);
}

/* Post a chain of n segments; false when the guest would overrun its own ring. */
static bool gq_add(struct gq *q, const uint64_t *addr, const uint32_t *len, const bool *wr, int n)
{
	uint16_t used = __atomic_load_n(&q->used->idx, __ATOMIC_ACQUIRE), head = q->di % QSIZE;
	int k;

	if ((uint16_t)(q->ai - used) >= QSIZE || n > (int)QSIZE)
		return false;
	for (k = 0; k < n; k++) {
		struct vring_desc *d = &q->desc[q->di % QSIZE];

		d->addr = addr[k];
		d->len = len[k];
		d->flags = (uint16_t)((wr[k] ? VRING_DESC_F_WRITE : 0) | (k + 1 < n ? VRING_DESC_F_NEXT : 0));
		d->next = (uint16_t)((q->di + 1) % QSIZE);
		q->di++;
	}
	q->avail->ring[q->ai % QSIZE] = head;
	q->ai++;
	__atomic_store_n(&q->avail->idx, q->ai, __ATOMIC_RELEASE);
	return true;
}

static void driver_up(void)
{
	unsigned i;

	mw(VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER);
	mw(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
	mw(VIRTIO_MMIO_DRIVER_FEATURES, 1); /* VIRTIO_F_VERSION_1 */
	mw(VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK);
	for (i = 0; i < NQ; i++) {
		struct gq *q = &gq[i];

		memset(q, 0, sizeof(*q));
		q->base = 0x1000ull + 0x3000ull * i;
		memset(vm->mem + q->base, 0, 0x3000);
		q->desc = (void *)(vm->mem + q->base);
		q->avail = (void *)(vm->mem + q->base + 0x1000);
		q->used = (void *)(vm->mem + q->base + 0x2000);
		mw(VIRTIO_MMIO_QUEUE_SEL, i);
		mw(VIRTIO_MMIO_QUEUE_NUM, QSIZE);
		mw(VIRTIO_MMIO_QUEUE_DESC_LOW, (uint32_t)q->base);
		mw(VIRTIO_MMIO_QUEUE_AVAIL_LOW, (uint32_t)q->base + 0x1000);
		mw(VIRTIO_MMIO_QUEUE_USED_LOW, (uint32_t)q->base + 0x2000);
		mw(VIRTIO_MMIO_QUEUE_READY, 1);
	}
	mw(VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK |
				       VIRTIO_CONFIG_S_DRIVER_OK);
	for (i = 0; i < 4; i++) {
		uint64_t a = EV_BUF + 16 * i;
		uint32_t l = 8;
		bool w = true;

		gq_add(&gq[EVQ], &a, &l, &w, 1);
	}
}

/* RX buffers: mode 0 = Linux (header, then 4 KiB), 1 = one segment, 2 = too small for a header, 3 = odd pieces. */
static void post_rx(unsigned count, uint8_t mode, uint16_t odd)
{
	while (count--) {
		uint64_t b = RX_BUF + (rx_slot++ % SLOTS) * SLOT, a[4];
		uint32_t l[4];
		bool w[4] = { true, true, true, true };
		int n = 0;

		switch (mode & 3) {
		case 0:
			a[n] = b, l[n++] = HDR;
			a[n] = b + 0x100, l[n++] = 4096;
			break;
		case 1:
			a[n] = b, l[n++] = HDR + (odd % 4096);
			break;
		case 2:
			a[n] = b, l[n++] = odd % HDR;
			break;
		case 3:
			a[n] = b, l[n++] = 1 + odd % 40;
			a[n] = b + 0x40, l[n++] = 30;
			a[n] = b + 0x100, l[n++] = 1 + (odd >> 8);
			a[n] = b + 0x400, l[n++] = 700;
			break;
		}
		if (mode & 4)
			w[n - 1] = false; /* a readable segment after writable ones */
		if (!gq_add(&gq[RXQ], a, l, w, n))
			break;
	}
	mw(VIRTIO_MMIO_QUEUE_NOTIFY, RXQ);
}

/* Read what the device put in the used rings, as the guest's interrupt handler would. */
static void consume(void)
{
	struct gq *q = &gq[RXQ];

	while (q->last_used != __atomic_load_n(&q->used->idx, __ATOMIC_ACQUIRE)) {
		struct vring_used_elem e = q->used->ring[q->last_used % QSIZE];
		struct virtio_vsock_hdr h;

		q->last_used++;
		FUZZ_CHECK(e.id < QSIZE);
		if (e.len < HDR)
			continue;
		/* the header is at the start of the chain's first segment (every RX layout above keeps it whole
		   except the odd one, where a torn copy is fine for this purpose) */
		memcpy(&h, vm->mem + q->desc[e.id].addr, q->desc[e.id].len < HDR ? q->desc[e.id].len : HDR);
		if (h.op == VIRTIO_VSOCK_OP_REQUEST && nreqs < MAX_REQS) {
			reqs[nreqs].hport = h.src_port;
			reqs[nreqs].gport = h.dst_port;
			nreqs++;
		}
	}
	gq[TXQ].last_used = __atomic_load_n(&gq[TXQ].used->idx, __ATOMIC_ACQUIRE);
	gq[EVQ].last_used = __atomic_load_n(&gq[EVQ].used->idx, __ATOMIC_ACQUIRE);
	mw(VIRTIO_MMIO_INTERRUPT_ACK, fake_vm_mr(vm, VIRTIO_MMIO_INTERRUPT_STATUS));
}

static void send_tx(struct fuzz_in *in)
{
	struct virtio_vsock_hdr h;
	uint8_t fix = fuzz_u8(in), split = fuzz_u8(in);
	uint16_t plen = fuzz_u16(in) % 4097;
	uint64_t b = TX_BUF + (tx_slot++ % SLOTS) * SLOT, a[4];
	uint32_t l[4];
	bool w[4] = { false, false, false, false };
	int n = 0;

	memset(&h, 0, sizeof(h));
	h.op = fuzz_u8(in);
	h.flags = fuzz_u8(in);
	h.buf_alloc = fuzz_u32(in);
	h.fwd_cnt = fuzz_u32(in);
	h.len = plen;
	h.type = VIRTIO_VSOCK_TYPE_STREAM;
	h.src_cid = 3;
	h.dst_cid = 2;
	if (fix & 1) {
		unsigned r = nreqs ? (fix >> 4) % nreqs : 0;

		h.src_port = nreqs ? reqs[r].gport : SMOLVM_AGENT_PORT;
		h.dst_port = nreqs ? reqs[r].hport : 1024;
	} else {
		h.src_port = fuzz_u32(in);
		h.dst_port = fuzz_u32(in);
	}
	if (fix & 2)
		h.type = fuzz_u16(in);
	if (fix & 4)
		h.len = fuzz_u32(in); /* a length that need not match the buffer */
	if (fix & 8)
		h.src_cid = fuzz_u64(in), h.dst_cid = fuzz_u64(in);
	memcpy(vm->mem + b, &h, HDR);
	fuzz_bytes(in, vm->mem + b + HDR, plen < 64 ? plen : 64); /* a little real payload, then zeros */
	memset(vm->mem + b + HDR + (plen < 64 ? plen : 64), 0, plen > 64 ? plen - 64u : 0);
	switch (split & 3) {
	case 0: /* Linux: header, then payload */
		a[n] = b, l[n++] = HDR;
		if (plen)
			a[n] = b + HDR, l[n++] = plen;
		break;
	case 1:
		a[n] = b, l[n++] = HDR + plen;
		break;
	case 2: /* header torn in two, payload in two */
		a[n] = b, l[n++] = 1 + (split >> 3) % HDR;
		a[n] = b + l[0], l[n++] = HDR + plen / 2 - l[0];
		a[n] = b + HDR + plen / 2, l[n++] = plen - plen / 2;
		break;
	case 3: /* short: the buffer ends before the header or the payload does */
		a[n] = b, l[n++] = (split >> 2) % (HDR + plen + 1);
		break;
	}
	if (split & 4)
		w[n - 1] = true; /* a writable segment in a TX chain */
	if (gq_add(&gq[TXQ], a, l, w, n))
		mw(VIRTIO_MMIO_QUEUE_NOTIFY, TXQ);
}

static void client_connect(struct fuzz_in *in)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	uint8_t kind = fuzz_u8(in);
	char line[48];
	int i, fd, n;

	for (i = 0; i < MAX_CLIENTS && clients[i] >= 0; i++)
		;
	if (i == MAX_CLIENTS)
		return;
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	FUZZ_CHECK(fd >= 0);
	strcpy(sa.sun_path, path);
	if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
		close(fd);
		return;
	}
	clients[i] = fd;
	if (kind & 1) { /* a line of the fuzzer's own */
		n = kind >> 3;
		fuzz_bytes(in, line, (size_t)n);
	} else {
		n = snprintf(line, sizeof(line), "CONNECT %u\n", (kind & 2) ? SMOLVM_AGENT_PORT : fuzz_u16(in));
	}
	if (send(fd, line, (size_t)n, MSG_NOSIGNAL) < 0) {
		/* the device may have closed it already */
	}
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct fuzz_in in = { data, size, 0 };
	static uint8_t junk[1 << 16];
	unsigned steps = 0, i;

	if (!vm) {
		struct vsock_config cfg = { .base = 0xd0000000ull, .gsi = 5, .on_ready = on_ready };
		const char *tmp = getenv("TMPDIR");

		snprintf(path, sizeof(path), "%s/smolvm-fuzz-vsock-%d.sock", tmp && *tmp ? tmp : "/tmp", (int)getpid());
		cfg.uds_path = path;
		FUZZ_CHECK(evloop_new(&loop) == 0);
		vm = fake_vm_new(RAM, loop);
		FUZZ_CHECK(vsock_new(vm, &cfg, &vs) == 0);
		atexit(unlink_path);
		for (i = 0; i < MAX_CLIENTS; i++)
			clients[i] = -1;
		memset(junk, 'x', sizeof(junk));
	}
	/* reset: the device drops every connection on the loop */
	for (i = 0; i < MAX_CLIENTS; i++) {
		if (clients[i] >= 0)
			close(clients[i]);
		clients[i] = -1;
	}
	mw(VIRTIO_MMIO_STATUS, 0);
	fake_loop_settle(loop, 8);
	nreqs = rx_slot = tx_slot = 0;
	driver_up();
	post_rx(8, 0, 0);
	fake_loop_settle(loop, 8);

	while (fuzz_more(&in) && steps++ < 200) {
		uint8_t op = fuzz_u8(&in), arg = fuzz_u8(&in);
		int fd = clients[arg % MAX_CLIENTS];

		switch (op % 11) {
		case 0:
			client_connect(&in);
			break;
		case 1:
			send_tx(&in);
			break;
		case 2:
			post_rx(1 + arg % 8, fuzz_u8(&in), fuzz_u16(&in));
			break;
		case 3:
			consume();
			break;
		case 4: /* the host client writes */
			if (fd >= 0 && send(fd, junk, 1 + fuzz_u16(&in) % sizeof(junk), MSG_NOSIGNAL | MSG_DONTWAIT) < 0) {
				/* full or reset: fine */
			}
			break;
		case 5: /* the host client reads what it got */
			if (fd >= 0)
				while (read(fd, junk, sizeof(junk)) > 0)
					;
			break;
		case 6:
			if (fd >= 0) {
				if (arg & 8) {
					close(fd);
					clients[arg % MAX_CLIENTS] = -1;
				} else {
					shutdown(fd, (arg >> 4) % 3);
				}
			}
			break;
		case 7:
			fake_loop_settle(loop, 1 + arg % 16);
			break;
		case 8:
			vsock_reset_transport(vs);
			break;
		case 9: { /* a raw register write, e.g. QueueReady = 0 or a status change */
			uint16_t off = fuzz_u16(&in) & 0x1fc;
			uint32_t v = fuzz_u32(&in);

			if (off != VIRTIO_MMIO_STATUS || v != 0) /* a full reset is the next input's job */
				mw(off, v);
			break;
		}
		case 10: { /* config space (the guest CID), any width */
			uint64_t v = 0;
			struct vm_mmio_dev *md = &vm->mmio[0];

			md->access(md->opaque, VIRTIO_MMIO_CONFIG + (arg & 7), &v, 1u << ((arg >> 3) & 3), false);
			break;
		}
		}
	}
	fake_loop_settle(loop, 16);
	consume();
	return 0;
}
