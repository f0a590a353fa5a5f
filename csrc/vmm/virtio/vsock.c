/* virtio-vsock: guest stream sockets <-> host Unix-socket clients, with credit-based flow control. */
#define _GNU_SOURCE
#include "virtio/vsock.h"

#include "snapshot.h"

#include <errno.h>
#include <poll.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <unistd.h>

#include <linux/virtio_ids.h>
#include <linux/virtio_vsock.h>

#include "evloop.h"
#include "proto.h"
#include "virtio/mmio.h"
#include "virtio/queue.h"
#include "vm.h"

#define VSOCK_HOST_CID 2u
#define VSOCK_HDR ((uint32_t)sizeof(struct virtio_vsock_hdr))
#define VSOCK_MAX_PKT (64u << 10)       /* longest payload accepted from the guest */
#define VSOCK_CREDIT_THRESH (64u << 10) /* tell the guest once this much was forwarded */
#define VSOCK_QUEUE_MAX 256
#define VSOCK_RST_QUEUE 64 /* replies to packets of no connection; TX pauses when full */
#define VSOCK_FIRST_PORT 1024u
#define VSOCK_SHUT_BOTH (VIRTIO_VSOCK_SHUTDOWN_RCV | VIRTIO_VSOCK_SHUTDOWN_SEND)

_Static_assert(VSOCK_HDR == 44, "virtio_vsock_hdr is 44 bytes");
_Static_assert((VSOCK_BUF_ALLOC & (VSOCK_BUF_ALLOC - 1)) == 0, "ring buffer size is a power of two");

enum { VSOCK_RXQ, VSOCK_TXQ, VSOCK_EVQ, VSOCK_NR_QUEUES };

enum vsock_state {
	VSOCK_CONN_HANDSHAKE,  /* reading "CONNECT <port>\n" from the client */
	VSOCK_CONN_CONNECTING, /* REQUEST queued or sent, waiting for RESPONSE */
	VSOCK_CONN_ESTABLISHED,
};

struct vsock_conn {
	struct vsock *v;
	int fd;        /* host client; -1 once closed */
	uint32_t mask; /* events asked of the loop */
	enum vsock_state state;
	uint32_t host_port, guest_port;
	char line[32];
	uint32_t line_len;
	char ok[24];
	uint32_t ok_len, ok_off;
	bool opened;    /* made by vsock_open(): no "OK" line; the preface goes to the guest first */
	uint8_t preface[VSOCK_PREFACE_MAX];
	uint32_t preface_len, preface_off;
	bool req_pending, rst_pending, credit_pending;
	bool readable;  /* the client may have bytes (or EOF) for the guest */
	bool host_eof;  /* client EOF seen; SHUTDOWN sent to the guest */
	bool wr_shut;   /* shutdown(SHUT_WR) done on the client */
	uint32_t peer_shut; /* VIRTIO_VSOCK_SHUTDOWN_* received from the guest */
	/* host -> guest: the guest's window */
	uint32_t tx_cnt, peer_buf_alloc, peer_fwd_cnt;
	/* guest -> host: our window, buf[rx_cnt..fwd_cnt) mod VSOCK_BUF_ALLOC not yet written out */
	uint8_t *buf;
	uint32_t rx_cnt, fwd_cnt, fwd_sent;
};

struct vsock {
	struct virtio_mmio mmio; /* its lock guards everything below */
	struct vm *vm;
	uint64_t guest_cid;
	void (*on_ready)(void *opaque);
	void *opaque;
	int listen_fd, work_fd;
	bool listen_watched, work_watched;
	char path[sizeof(((struct sockaddr_un *)0)->sun_path)];
	bool drop_pending; /* drop all connections on the loop thread (reset) */
	bool tx_pending;   /* TX paused because rst_q was full */
	bool reset_waiting; /* TRANSPORT_RESET sent; hold new REQUESTs until the guest handled it */
	unsigned pushed;   /* queues pushed since the last interrupt decision */
	struct vsock_conn *conns[VSOCK_MAX_CONNS];
	unsigned rr;
	uint32_t next_port;
	struct virtio_vsock_hdr rst_q[VSOCK_RST_QUEUE];
	unsigned rst_head, rst_n;
	struct virtq_chain rxc, txc;
};

static void vsock_run(struct vsock *v);

static uint32_t vsock_min(uint64_t a, uint64_t b)
{
	return (uint32_t)(a < b ? a : b);
}

/* Wake the loop thread to do what a vCPU-thread op deferred. */
static void vsock_poke(struct vsock *v)
{
	uint64_t one = 1;

	if (write(v->work_fd, &one, sizeof(one)) < 0) {
		/* counter saturated: a wake-up is already pending */
	}
}

static void vsock_conn_set_mask(struct vsock_conn *c)
{
	uint32_t want = 0;

	if (c->fd < 0)
		return;
	if (c->state == VSOCK_CONN_HANDSHAKE) {
		want = POLLIN;
	} else if (c->state == VSOCK_CONN_ESTABLISHED && !c->rst_pending) {
		if (!c->readable && !c->host_eof && !(c->peer_shut & VIRTIO_VSOCK_SHUTDOWN_RCV))
			want |= POLLIN;
		if (c->ok_off < c->ok_len || c->rx_cnt != c->fwd_cnt)
			want |= POLLOUT;
	}
	if (want != c->mask && evloop_mod(c->v->vm->loop, c->fd, want) == 0)
		c->mask = want;
}

static void vsock_conn_close_sock(struct vsock_conn *c)
{
	if (c->fd < 0)
		return;
	evloop_del(c->v->vm->loop, c->fd);
	close(c->fd);
	c->fd = -1;
	c->mask = 0;
}

static void vsock_conn_free(struct vsock_conn *c)
{
	struct vsock *v = c->v;
	unsigned i;

	vsock_conn_close_sock(c);
	for (i = 0; i < VSOCK_MAX_CONNS; i++)
		if (v->conns[i] == c)
			v->conns[i] = NULL;
	free(c->buf);
	free(c);
}

/* Abort: close the client now, tell the guest with RST (sent by the pump, which then frees c). */
static void vsock_conn_reset(struct vsock_conn *c)
{
	vsock_conn_close_sock(c);
	c->rst_pending = true;
}

/*
 * Close connections; unless `all`, keep those the guest has not heard of yet
 * (still reading CONNECT, or REQUEST not sent): they go on after a reset.
 */
static void vsock_drop(struct vsock *v, bool all)
{
	unsigned i;

	for (i = 0; i < VSOCK_MAX_CONNS; i++) {
		struct vsock_conn *c = v->conns[i];

		if (!c)
			continue;
		if (!all && (c->state == VSOCK_CONN_HANDSHAKE || (c->state == VSOCK_CONN_CONNECTING && c->req_pending)))
			continue;
		vsock_conn_free(c);
	}
	v->rst_n = v->rst_head = 0;
	v->tx_pending = false;
	v->drop_pending = false;
}

/* Loop thread, lock held: carry out a drop a reset asked for from another thread. */
static void vsock_sync(struct vsock *v)
{
	if (v->drop_pending)
		vsock_drop(v, false);
}

static void vsock_fail(struct vsock *v)
{
	virtio_mmio_fail(&v->mmio);
	v->drop_pending = true;
}

/* Credit the guest gives us for host -> guest bytes. */
static uint32_t vsock_conn_peer_credit(const struct vsock_conn *c)
{
	uint32_t in_flight = c->tx_cnt - c->peer_fwd_cnt;

	return in_flight > c->peer_buf_alloc ? 0 : c->peer_buf_alloc - in_flight;
}

/* Should we tell the guest how much we forwarded? */
static bool vsock_conn_credit_due(const struct vsock_conn *c)
{
	uint32_t told = c->fwd_cnt - c->fwd_sent;
	uint32_t guest_view = VSOCK_BUF_ALLOC - (c->rx_cnt - c->fwd_sent);

	return c->credit_pending || (told && (told >= VSOCK_CREDIT_THRESH || guest_view < VSOCK_CREDIT_THRESH));
}

static void vsock_conn_hdr(struct vsock_conn *c, uint16_t op, struct virtio_vsock_hdr *h)
{
	memset(h, 0, sizeof(*h));
	h->src_cid = VSOCK_HOST_CID;
	h->dst_cid = c->v->guest_cid;
	h->src_port = c->host_port;
	h->dst_port = c->guest_port;
	h->type = VIRTIO_VSOCK_TYPE_STREAM;
	h->op = op;
	h->buf_alloc = VSOCK_BUF_ALLOC;
	h->fwd_cnt = c->fwd_cnt;
	c->fwd_sent = c->fwd_cnt;
	c->credit_pending = false;
}

/* Write the client-bound bytes we hold; EAGAIN leaves them for POLLOUT. */
static void vsock_conn_flush(struct vsock_conn *c)
{
	while (c->fd >= 0 && c->ok_off < c->ok_len) {
		ssize_t n = send(c->fd, c->ok + c->ok_off, c->ok_len - c->ok_off, MSG_NOSIGNAL | MSG_DONTWAIT);

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
			goto out;
		if (n < 0) {
			vsock_conn_reset(c);
			return;
		}
		c->ok_off += (uint32_t)n;
	}
	while (c->fd >= 0 && c->rx_cnt != c->fwd_cnt) {
		uint32_t used = c->rx_cnt - c->fwd_cnt, off = c->fwd_cnt & (VSOCK_BUF_ALLOC - 1);
		uint32_t first = vsock_min(used, VSOCK_BUF_ALLOC - off);
		struct iovec iov[2] = { { c->buf + off, first }, { c->buf, used - first } };
		struct msghdr msg = { .msg_iov = iov, .msg_iovlen = used > first ? 2 : 1 };
		ssize_t n = sendmsg(c->fd, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
			break;
		if (n < 0) {
			vsock_conn_reset(c);
			return;
		}
		c->fwd_cnt += (uint32_t)n;
	}
	if (c->fd >= 0 && c->rx_cnt == c->fwd_cnt) {
		if ((c->peer_shut & VIRTIO_VSOCK_SHUTDOWN_SEND) && !c->wr_shut) {
			shutdown(c->fd, SHUT_WR);
			c->wr_shut = true;
		}
		if (c->peer_shut == VSOCK_SHUT_BOTH ||
		    (c->opened && c->host_eof && (c->peer_shut & VIRTIO_VSOCK_SHUTDOWN_SEND))) {
			/* the guest is done both ways and has all it sent delivered: finish with RST */
			vsock_conn_reset(c);
			return;
		}
	}
out:
	vsock_conn_set_mask(c);
}

static struct vsock_conn *vsock_lookup(struct vsock *v, const struct virtio_vsock_hdr *h)
{
	unsigned i;

	if (h->dst_cid != VSOCK_HOST_CID)
		return NULL;
	for (i = 0; i < VSOCK_MAX_CONNS; i++) {
		struct vsock_conn *c = v->conns[i];

		if (c && c->state != VSOCK_CONN_HANDSHAKE && c->host_port == h->dst_port && c->guest_port == h->src_port)
			return c;
	}
	return NULL;
}

static uint32_t vsock_alloc_port(struct vsock *v)
{
	for (;;) {
		uint32_t p = v->next_port++;
		unsigned i;

		if (v->next_port < VSOCK_FIRST_PORT)
			v->next_port = VSOCK_FIRST_PORT;
		for (i = 0; i < VSOCK_MAX_CONNS; i++)
			if (v->conns[i] && v->conns[i]->host_port == p)
				break;
		if (i == VSOCK_MAX_CONNS)
			return p; /* at most VSOCK_MAX_CONNS ports are taken, so this ends */
	}
}

/* Queue an RST answering h (a packet that has no connection). */
static void vsock_rst_reply(struct vsock *v, const struct virtio_vsock_hdr *h)
{
	struct virtio_vsock_hdr *r;

	if (h->op == VIRTIO_VSOCK_OP_RST || v->rst_n == VSOCK_RST_QUEUE)
		return;
	r = &v->rst_q[(v->rst_head + v->rst_n++) % VSOCK_RST_QUEUE];
	memset(r, 0, sizeof(*r));
	r->src_cid = h->dst_cid;
	r->dst_cid = v->guest_cid;
	r->src_port = h->dst_port;
	r->dst_port = h->src_port;
	r->type = VIRTIO_VSOCK_TYPE_STREAM;
	r->op = VIRTIO_VSOCK_OP_RST;
}

/* ---- guest -> host (TX queue) ---- */

static void vsock_conn_establish(struct vsock_conn *c)
{
	if (!c->buf)
		c->buf = malloc(VSOCK_BUF_ALLOC);
	if (!c->buf) {
		vsock_conn_reset(c);
		return;
	}
	c->state = VSOCK_CONN_ESTABLISHED;
	if (c->opened)
		c->readable = true; /* the preface is due even before the client sends anything */
	else
		c->ok_len = (uint32_t)snprintf(c->ok, sizeof(c->ok), "OK %u\n", c->host_port);
	vsock_conn_flush(c);
}

static void vsock_conn_from_guest(struct vsock_conn *c, const struct virtq_chain *ch, uint32_t len)
{
	uint32_t off = c->rx_cnt & (VSOCK_BUF_ALLOC - 1), first;

	if (c->state != VSOCK_CONN_ESTABLISHED || (c->peer_shut & VIRTIO_VSOCK_SHUTDOWN_SEND) ||
	    len > VSOCK_BUF_ALLOC - (c->rx_cnt - c->fwd_cnt)) {
		vsock_conn_reset(c); /* out of order, or more than the credit we gave */
		return;
	}
	first = vsock_min(len, VSOCK_BUF_ALLOC - off);
	virtq_chain_from(ch, VSOCK_HDR, c->buf + off, first);
	virtq_chain_from(ch, VSOCK_HDR + first, c->buf, len - first);
	c->rx_cnt += len;
	vsock_conn_flush(c);
}

static void vsock_conn_guest_packet(struct vsock_conn *c, const struct virtio_vsock_hdr *h,
				    const struct virtq_chain *ch)
{
	c->peer_buf_alloc = h->buf_alloc;
	c->peer_fwd_cnt = h->fwd_cnt;
	switch (h->op) {
	case VIRTIO_VSOCK_OP_RESPONSE:
		if (c->state != VSOCK_CONN_CONNECTING || c->req_pending)
			vsock_conn_reset(c);
		else
			vsock_conn_establish(c);
		break;
	case VIRTIO_VSOCK_OP_RST:
		if (c->state == VSOCK_CONN_ESTABLISHED)
			vsock_conn_flush(c); /* best effort for bytes already received */
		vsock_conn_free(c);
		break;
	case VIRTIO_VSOCK_OP_RW:
		vsock_conn_from_guest(c, ch, h->len);
		break;
	case VIRTIO_VSOCK_OP_CREDIT_UPDATE:
		break; /* the window moved; the pump uses it */
	case VIRTIO_VSOCK_OP_CREDIT_REQUEST:
		c->credit_pending = true;
		break;
	case VIRTIO_VSOCK_OP_SHUTDOWN:
		if (c->state != VSOCK_CONN_ESTABLISHED) {
			vsock_conn_reset(c);
			break;
		}
		c->peer_shut |= h->flags & VSOCK_SHUT_BOTH;
		if ((c->peer_shut & VIRTIO_VSOCK_SHUTDOWN_RCV) && c->fd >= 0)
			shutdown(c->fd, SHUT_RD);
		vsock_conn_flush(c);
		break;
	default: /* REQUEST on a live connection, unknown ops */
		vsock_conn_reset(c);
		break;
	}
}

static void vsock_tx_packet(struct vsock *v, const struct virtq_chain *ch)
{
	struct virtio_vsock_hdr h;
	struct vsock_conn *c;

	if (virtq_chain_from(ch, 0, &h, VSOCK_HDR) < VSOCK_HDR || h.src_cid != v->guest_cid)
		return; /* too short to answer, or not from the guest's address: drop */
	c = vsock_lookup(v, &h);
	if (h.len > VSOCK_MAX_PKT || ch->read_len < (uint64_t)VSOCK_HDR + h.len ||
	    h.type != VIRTIO_VSOCK_TYPE_STREAM) {
		if (c)
			vsock_conn_reset(c);
		else
			vsock_rst_reply(v, &h);
		return;
	}
	if (c) {
		vsock_conn_guest_packet(c, &h, ch);
		return;
	}
	if (h.op == VIRTIO_VSOCK_OP_REQUEST && h.dst_cid == VSOCK_HOST_CID && h.dst_port == SMOLVM_READY_PORT &&
	    v->on_ready)
		v->on_ready(v->opaque);
	vsock_rst_reply(v, &h); /* we accept no guest-initiated connections */
}

static void vsock_tx_process(struct vsock *v)
{
	struct virtq *q = virtio_mmio_queue(&v->mmio, VSOCK_TXQ);

	while (virtio_mmio_live(&v->mmio)) {
		int r;

		if (v->rst_n == VSOCK_RST_QUEUE) {
			v->tx_pending = true; /* resume once the pump has sent some RSTs */
			return;
		}
		r = virtq_pop(q, &v->txc);
		if (r < 0) {
			vsock_fail(v);
			return;
		}
		if (r == 0)
			return;
		vsock_tx_packet(v, &v->txc);
		if (virtq_push(q, v->txc.head, 0) < 0) {
			vsock_fail(v);
			return;
		}
		v->pushed |= 1u << VSOCK_TXQ;
	}
}

/* ---- host -> guest (RX queue) ---- */

/* Pop the next RX buffer that can hold a header into v->rxc. Returns true if there is one. */
static bool vsock_rx_get(struct vsock *v)
{
	struct virtq *q = virtio_mmio_queue(&v->mmio, VSOCK_RXQ);
	unsigned tries;

	for (tries = 0; tries <= q->size; tries++) {
		int r = virtq_pop(q, &v->rxc);

		if (r < 0) {
			vsock_fail(v);
			return false;
		}
		if (r == 0)
			return false;
		if (v->rxc.write_len >= VSOCK_HDR)
			return true;
		if (virtq_push(q, v->rxc.head, 0) < 0) { /* useless buffer: hand it back empty */
			vsock_fail(v);
			return false;
		}
		v->pushed |= 1u << VSOCK_RXQ;
	}
	return false;
}

/* Complete v->rxc with header h followed by h->len payload bytes already in place. */
static void vsock_rx_put(struct vsock *v, const struct virtio_vsock_hdr *h)
{
	virtq_chain_to(&v->rxc, 0, h, VSOCK_HDR);
	if (virtq_push(virtio_mmio_queue(&v->mmio, VSOCK_RXQ), v->rxc.head, VSOCK_HDR + h->len) < 0) {
		vsock_fail(v);
		return;
	}
	v->pushed |= 1u << VSOCK_RXQ;
}

/* Header-only packet. Returns 1 if sent, -1 if no buffer. */
static int vsock_rx_ctrl(struct vsock *v, const struct virtio_vsock_hdr *h)
{
	if (!vsock_rx_get(v))
		return -1;
	vsock_rx_put(v, h);
	return 1;
}

/* Client data (or EOF) into one RX buffer. Returns 1 if something changed, 0 if not, -1 if no buffer. */
static int vsock_conn_to_guest(struct vsock *v, struct vsock_conn *c)
{
	uint32_t credit = vsock_conn_peer_credit(c), cap;
	struct virtio_vsock_hdr h;
	struct iovec iov[VIRTQ_MAX_SEGS];
	ssize_t n;
	int niov;

	if (credit == 0 && c->preface_off < c->preface_len)
		return 0; /* the preface waits for a CREDIT_UPDATE */
	if (credit == 0) {
		char b;

		/* no window: only look for EOF, which needs none */
		n = recv(c->fd, &b, 1, MSG_PEEK | MSG_DONTWAIT);
		if (n > 0)
			return 0; /* wait for a CREDIT_UPDATE */
		if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) {
			c->readable = false;
			vsock_conn_set_mask(c);
			return 0;
		}
		if (n < 0) {
			vsock_conn_reset(c);
			return 1;
		}
	}
	if (!vsock_rx_get(v))
		return -1;
	cap = vsock_min(v->rxc.write_len - VSOCK_HDR, vsock_min(credit, VSOCK_MAX_PKT));
	if (cap == 0 && credit) {
		virtq_unpop(virtio_mmio_queue(&v->mmio, VSOCK_RXQ)); /* header-only buffers: nothing fits */
		return -1;
	}
	if (c->preface_off < c->preface_len) {
		uint32_t k = vsock_min(cap, c->preface_len - c->preface_off);

		virtq_chain_to(&v->rxc, VSOCK_HDR, c->preface + c->preface_off, k);
		c->preface_off += k;
		vsock_conn_hdr(c, VIRTIO_VSOCK_OP_RW, &h);
		h.len = k;
		c->tx_cnt += k;
		vsock_rx_put(v, &h);
		return 1;
	}
	n = 0;
	if (cap) {
		niov = virtq_chain_iov(&v->rxc, true, VSOCK_HDR, cap, iov, VIRTQ_MAX_SEGS);
		do
			n = readv(c->fd, iov, niov);
		while (n < 0 && errno == EINTR);
	}
	if (n < 0) {
		virtq_unpop(virtio_mmio_queue(&v->mmio, VSOCK_RXQ));
		if (errno == EAGAIN || errno == EWOULDBLOCK) {
			c->readable = false;
			vsock_conn_set_mask(c);
			return 0;
		}
		vsock_conn_reset(c);
		return 1;
	}
	if (n == 0) {
		/* client EOF: the guest gets no more and may send no more */
		vsock_conn_hdr(c, VIRTIO_VSOCK_OP_SHUTDOWN, &h);
		/* an opened connection is half-closed: the guest's answer still reaches the client */
		h.flags = c->opened ? VIRTIO_VSOCK_SHUTDOWN_SEND : VSOCK_SHUT_BOTH;
		c->host_eof = true;
		c->readable = false;
		vsock_conn_set_mask(c);
		if (c->opened && (c->peer_shut & VIRTIO_VSOCK_SHUTDOWN_SEND) && c->rx_cnt == c->fwd_cnt) {
			vsock_rx_put(v, &h);
			vsock_conn_reset(c); /* both sides are done: RST follows */
			return 1;
		}
	} else {
		vsock_conn_hdr(c, VIRTIO_VSOCK_OP_RW, &h);
		h.len = (uint32_t)n;
		c->tx_cnt += (uint32_t)n;
	}
	vsock_rx_put(v, &h);
	return 1;
}

/* At most one packet for c. Returns 1 on progress, 0 if c has nothing to send, -1 if out of buffers. */
static int vsock_conn_rx_one(struct vsock *v, struct vsock_conn *c)
{
	struct virtio_vsock_hdr h;
	int r;

	if (c->rst_pending) {
		vsock_conn_hdr(c, VIRTIO_VSOCK_OP_RST, &h);
		r = vsock_rx_ctrl(v, &h);
		if (r > 0)
			vsock_conn_free(c);
		return r;
	}
	if (c->state == VSOCK_CONN_CONNECTING && c->req_pending) {
		/*
		 * After a transport reset the guest drops every connected socket: a
		 * connection made before it handled the event would be dropped too.
		 */
		if (v->reset_waiting)
			return 0;
		vsock_conn_hdr(c, VIRTIO_VSOCK_OP_REQUEST, &h);
		r = vsock_rx_ctrl(v, &h);
		if (r > 0)
			c->req_pending = false;
		return r;
	}
	if (c->state != VSOCK_CONN_ESTABLISHED)
		return 0;
	if ((c->readable || c->preface_off < c->preface_len) && c->fd >= 0 && !c->host_eof &&
	    !(c->peer_shut & VIRTIO_VSOCK_SHUTDOWN_RCV)) {
		r = vsock_conn_to_guest(v, c);
		if (r)
			return r;
	}
	if (vsock_conn_credit_due(c)) {
		vsock_conn_hdr(c, VIRTIO_VSOCK_OP_CREDIT_UPDATE, &h);
		return vsock_rx_ctrl(v, &h);
	}
	return 0;
}

/* Fill RX buffers: queued RSTs first, then the connections round-robin, one packet each per pass. */
static void vsock_rx_pump(struct vsock *v)
{
	bool progress = true;

	while (progress && virtio_mmio_live(&v->mmio)) {
		unsigned i;

		progress = false;
		while (v->rst_n) {
			if (vsock_rx_ctrl(v, &v->rst_q[v->rst_head]) < 0)
				return;
			v->rst_head = (v->rst_head + 1) % VSOCK_RST_QUEUE;
			v->rst_n--;
		}
		for (i = 0; i < VSOCK_MAX_CONNS && virtio_mmio_live(&v->mmio); i++) {
			struct vsock_conn *c = v->conns[(v->rr + i) % VSOCK_MAX_CONNS];
			int r;

			if (!c)
				continue;
			r = vsock_conn_rx_one(v, c);
			if (r < 0)
				return;
			if (r > 0)
				progress = true;
		}
		v->rr = (v->rr + 1) % VSOCK_MAX_CONNS;
	}
}

/* Loop thread, lock held: do all pending work, then interrupt the guest once if it wants it. */
static void vsock_run(struct vsock *v)
{
	unsigned q;
	bool irq = false;

	vsock_sync(v);
	while (virtio_mmio_live(&v->mmio)) {
		if (v->tx_pending && v->rst_n < VSOCK_RST_QUEUE) {
			v->tx_pending = false;
			vsock_tx_process(v);
		}
		vsock_rx_pump(v);
		if (!v->tx_pending || v->rst_n == VSOCK_RST_QUEUE)
			break;
	}
	for (q = 0; q < VSOCK_NR_QUEUES; q++)
		if ((v->pushed & (1u << q)) && virtq_want_irq(virtio_mmio_queue(&v->mmio, q)))
			irq = true;
	v->pushed = 0;
	if (irq && virtio_mmio_live(&v->mmio))
		virtio_mmio_signal(&v->mmio);
	vsock_sync(v);
}

/* ---- host side: listening socket and clients ---- */

/* Read the CONNECT line byte by byte, so nothing after '\n' is taken. 1 = done, 0 = more, <0 = drop. */
static int vsock_conn_read_line(struct vsock_conn *c)
{
	for (;;) {
		char ch;
		ssize_t n = read(c->fd, &ch, 1);

		if (n == 0)
			return -ECONNRESET;
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return errno == EAGAIN || errno == EWOULDBLOCK ? 0 : -errno;
		}
		if (ch == '\n') {
			c->line[c->line_len] = '\0';
			return 1;
		}
		if (c->line_len >= sizeof(c->line) - 1)
			return -EINVAL;
		c->line[c->line_len++] = ch;
	}
}

/* "CONNECT <port>" (an optional '\r' before '\n'). */
static int vsock_parse_connect(const char *line, uint32_t *port)
{
	const char *p = line + 8;
	uint64_t val = 0;

	if (strncmp(line, "CONNECT ", 8) != 0 || !*p)
		return -EINVAL;
	for (; *p >= '0' && *p <= '9'; p++) {
		val = val * 10 + (uint64_t)(*p - '0');
		if (val > UINT32_MAX)
			return -EINVAL;
	}
	if (p == line + 8 || (*p && strcmp(p, "\r") != 0))
		return -EINVAL;
	*port = (uint32_t)val;
	return 0;
}

static void vsock_conn_handshake(struct vsock_conn *c)
{
	int r = vsock_conn_read_line(c);

	if (r == 0)
		return;
	if (r < 0 || vsock_parse_connect(c->line, &c->guest_port) < 0) {
		vsock_conn_free(c);
		return;
	}
	c->host_port = vsock_alloc_port(c->v);
	c->state = VSOCK_CONN_CONNECTING;
	c->req_pending = true;
	vsock_conn_set_mask(c);
}

static void vsock_conn_cb(void *opaque, int fd, uint32_t revents)
{
	struct vsock_conn *c = opaque;
	struct vsock *v = c->v;

	(void)fd;
	virtio_mmio_lock(&v->mmio);
	if (v->drop_pending) {
		vsock_sync(v); /* c is gone with the rest */
		goto out;
	}
	if (c->state == VSOCK_CONN_HANDSHAKE) {
		vsock_conn_handshake(c);
	} else if (c->state == VSOCK_CONN_ESTABLISHED) {
		if (revents & (POLLOUT | POLLHUP | POLLERR))
			vsock_conn_flush(c);
		if (revents & (POLLIN | POLLHUP | POLLERR))
			c->readable = true;
		vsock_conn_set_mask(c);
	}
out:
	vsock_run(v);
	virtio_mmio_unlock(&v->mmio);
}

static void vsock_accept(struct vsock *v)
{
	unsigned n;

	for (n = 0; n < 16; n++) {
		struct vsock_conn *c;
		unsigned i;
		int fd = accept4(v->listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);

		if (fd < 0)
			return;
		for (i = 0; i < VSOCK_MAX_CONNS && v->conns[i]; i++)
			;
		c = i < VSOCK_MAX_CONNS ? calloc(1, sizeof(*c)) : NULL;
		if (!c) {
			close(fd); /* table full */
			continue;
		}
		c->v = v;
		c->fd = fd;
		c->state = VSOCK_CONN_HANDSHAKE;
		if (evloop_add(v->vm->loop, fd, POLLIN, vsock_conn_cb, c) < 0) {
			close(fd);
			free(c);
			continue;
		}
		c->mask = POLLIN;
		v->conns[i] = c;
	}
}

static void vsock_listen_cb(void *opaque, int fd, uint32_t revents)
{
	struct vsock *v = opaque;

	(void)fd;
	(void)revents;
	virtio_mmio_lock(&v->mmio);
	vsock_sync(v);
	vsock_accept(v);
	vsock_run(v);
	virtio_mmio_unlock(&v->mmio);
}

static void vsock_work_cb(void *opaque, int fd, uint32_t revents)
{
	struct vsock *v = opaque;
	uint64_t cnt;

	(void)revents;
	if (read(fd, &cnt, sizeof(cnt)) < 0) {
		/* spurious wake-up */
	}
	virtio_mmio_lock(&v->mmio);
	vsock_sync(v);
	v->tx_pending = true; /* after activation: look at everything */
	vsock_run(v);
	virtio_mmio_unlock(&v->mmio);
}

int vsock_open(struct vsock *v, int fd, uint32_t guest_port, const void *preface, uint32_t preface_len)
{
	struct vsock_conn *c = NULL;
	unsigned i;
	int err = 0;

	if (fd < 0 || preface_len > VSOCK_PREFACE_MAX)
		return -EINVAL;
	virtio_mmio_lock(&v->mmio);
	vsock_sync(v);
	for (i = 0; i < VSOCK_MAX_CONNS && v->conns[i]; i++)
		;
	if (i == VSOCK_MAX_CONNS) {
		err = -EMFILE;
		goto out;
	}
	c = calloc(1, sizeof(*c));
	if (!c) {
		err = -ENOMEM;
		goto out;
	}
	c->v = v;
	c->fd = fd;
	c->opened = true;
	c->guest_port = guest_port;
	memcpy(c->preface, preface, preface_len);
	c->preface_len = preface_len;
	err = evloop_add(v->vm->loop, fd, 0, vsock_conn_cb, c);
	if (err) {
		free(c);
		goto out;
	}
	c->host_port = vsock_alloc_port(v);
	c->state = VSOCK_CONN_CONNECTING;
	c->req_pending = true;
	v->conns[i] = c;
	vsock_run(v);
out:
	virtio_mmio_unlock(&v->mmio);
	return err;
}

/* ---- transport ops (transport lock held) ---- */

static void vsock_config_read(void *dev, uint32_t off, void *data, uint32_t len)
{
	struct vsock *v = dev;
	uint64_t cid = v->guest_cid; /* le64 on a little-endian host */

	memcpy(data, (uint8_t *)&cid + off, len);
	/* Linux reads the CID while handling TRANSPORT_RESET, just before dropping its sockets. */
	if (v->reset_waiting) {
		v->reset_waiting = false;
		vsock_poke(v);
	}
}

static void vsock_queue_notify(void *dev, unsigned q)
{
	struct vsock *v = dev;

	vsock_sync(v);
	if (q == VSOCK_TXQ)
		v->tx_pending = true;
	vsock_run(v);
}

static void vsock_activate(void *dev)
{
	vsock_poke(dev); /* vCPU thread: the loop sends what waited for the driver */
}

static void vsock_reset(void *dev)
{
	struct vsock *v = dev;

	/* vCPU thread: sockets are the loop's, so they are closed there */
	v->drop_pending = true;
	v->reset_waiting = false;
	v->rst_n = v->rst_head = 0;
	v->tx_pending = false;
	v->pushed = 0;
	vsock_poke(v);
}

static const struct virtio_dev_ops vsock_ops = {
	.device_id = VIRTIO_ID_VSOCK,
	.features = 0,
	.nr_queues = VSOCK_NR_QUEUES,
	.queue_max = VSOCK_QUEUE_MAX,
	.config_size = sizeof(uint64_t),
	.config_read = vsock_config_read,
	.queue_notify = vsock_queue_notify,
	.activate = vsock_activate,
	.reset = vsock_reset,
};

int vsock_reset_transport(struct vsock *v)
{
	struct virtq *q;
	uint32_t id = VIRTIO_VSOCK_EVENT_TRANSPORT_RESET;
	int err = 0, r;

	virtio_mmio_lock(&v->mmio);
	v->drop_pending = true;
	v->rst_n = v->rst_head = 0;
	v->tx_pending = false;
	vsock_poke(v);
	if (!virtio_mmio_live(&v->mmio)) {
		err = -ENOTCONN;
		goto out;
	}
	q = virtio_mmio_queue(&v->mmio, VSOCK_EVQ);
	r = virtq_pop(q, &v->rxc);
	if (r < 0) {
		vsock_fail(v);
		err = r;
		goto out;
	}
	if (r == 0 || v->rxc.write_len < sizeof(id)) {
		if (r)
			virtq_push(q, v->rxc.head, 0);
		err = -ENOBUFS;
		goto out;
	}
	virtq_chain_to(&v->rxc, 0, &id, sizeof(id));
	virtq_push(q, v->rxc.head, sizeof(id));
	v->reset_waiting = true;
	if (virtq_want_irq(q))
		virtio_mmio_signal(&v->mmio);
out:
	virtio_mmio_unlock(&v->mmio);
	return err;
}

/* ---- lifetime ---- */

static int vsock_listen(struct vsock *v, const char *path)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	int err;

	if (!path || strlen(path) >= sizeof(sa.sun_path))
		return -ENAMETOOLONG;
	strcpy(sa.sun_path, path);
	v->listen_fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (v->listen_fd < 0)
		return -errno;
	unlink(path);
	if (bind(v->listen_fd, (struct sockaddr *)&sa, sizeof(sa)) < 0)
		return -errno;
	strcpy(v->path, path);
	if (listen(v->listen_fd, SOMAXCONN) < 0)
		return -errno;
	err = evloop_add(v->vm->loop, v->listen_fd, POLLIN, vsock_listen_cb, v);
	if (err)
		return err;
	v->listen_watched = true;
	return 0;
}

int vsock_new(struct vm *vm, const struct vsock_config *cfg, struct vsock **out)
{
	struct vsock *v = NULL;
	int err;

	*out = NULL;
	if (!vm->loop)
		return -EINVAL;
	v = calloc(1, sizeof(*v));
	if (!v)
		return -ENOMEM;
	v->vm = vm;
	v->listen_fd = v->work_fd = -1;
	v->guest_cid = cfg->guest_cid ? cfg->guest_cid : VSOCK_GUEST_CID;
	v->on_ready = cfg->on_ready;
	v->opaque = cfg->opaque;
	v->next_port = VSOCK_FIRST_PORT;
	err = -EINVAL;
	if (v->guest_cid <= VSOCK_HOST_CID || v->guest_cid >= 0xffffffffu)
		goto out;
	v->work_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	if (v->work_fd < 0) {
		err = -errno;
		goto out;
	}
	err = evloop_add(vm->loop, v->work_fd, POLLIN, vsock_work_cb, v);
	if (err)
		goto out;
	v->work_watched = true;
	err = vsock_listen(v, cfg->uds_path);
	if (err)
		goto out;
	err = virtio_mmio_init(&v->mmio, vm, cfg->base, cfg->gsi, &vsock_ops, v);
	if (err)
		goto out;
	*out = v;
out:
	if (err)
		vsock_free(v);
	return err;
}

void vsock_free(struct vsock *v)
{
	if (!v)
		return;
	virtio_mmio_destroy(&v->mmio);
	vsock_drop(v, true);
	if (v->listen_fd >= 0) {
		if (v->listen_watched)
			evloop_del(v->vm->loop, v->listen_fd);
		close(v->listen_fd);
		if (v->path[0])
			unlink(v->path);
	}
	if (v->work_fd >= 0) {
		if (v->work_watched)
			evloop_del(v->vm->loop, v->work_fd);
		close(v->work_fd);
	}
	free(v);
}

struct vsock_snap {
	uint64_t guest_cid;
	uint32_t next_port, reserved;
};

void vsock_save(struct vsock *v, struct snap_writer *w)
{
	struct vsock_snap s = { v->guest_cid, v->next_port, 0 };

	virtio_mmio_lock(&v->mmio);
	virtio_mmio_save(&v->mmio, w, 0);
	snap_put(w, SNAP_DEV_VSOCK, 0, &s, sizeof(s));
	virtio_mmio_unlock(&v->mmio);
}

int vsock_restore(struct vsock *v, const struct snap_reader *r)
{
	const struct vsock_snap *s;
	uint32_t len = 0;
	int ret;

	s = snap_get(r, SNAP_DEV_VSOCK, 0, &len);
	if (!s || len != sizeof(*s) || s->guest_cid != v->guest_cid)
		return -EINVAL;
	virtio_mmio_lock(&v->mmio);
	ret = virtio_mmio_restore(&v->mmio, r, 0);
	v->next_port = s->next_port;
	virtio_mmio_unlock(&v->mmio);
	return ret;
}
