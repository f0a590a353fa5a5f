/* One connection to the guest agent: nonblocking Unix socket, CONNECT handshake, the outgoing frame queue and the frame reader every request shares, driven by io_uring (poll() where it is unavailable). */
#define _GNU_SOURCE
#include "agent_conn.h"

#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <liburing.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define AGENT_CONN_RBUF (256u << 10) /* receive buffer: raw frames go to bytes() from here */
#define AGENT_CONN_RING 8            /* ring entries: at most 4 operations are ever queued at once */

int64_t agent_conn_now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int agent_conn_fail(struct agent_conn *c, int err, const char *fmt, ...)
{
	va_list ap;

	if (c->error && c->error_size) {
		va_start(ap, fmt);
		vsnprintf(c->error, c->error_size, fmt, ap);
		va_end(ap);
	}
	return err;
}

int agent_conn_open(struct agent_conn *c, const char *uds_path, uint32_t port, int host_timeout_ms,
		    const struct agent_conn_ops *ops, void *ctx, char *error, size_t error_size)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	int ret;

	memset(c, 0, sizeof(*c));
	c->fd = -1;
	c->port = port;
	c->ops = ops;
	c->ctx = ctx;
	c->what = "before EXIT";
	c->error = error;
	c->error_size = error_size;
	c->deadline_ms = host_timeout_ms < 0 ? -1 : agent_conn_now_ms() + host_timeout_ms;
	if (!uds_path)
		return agent_conn_fail(c, -EINVAL, "no socket path");
	if (strlen(uds_path) >= sizeof(sa.sun_path))
		return agent_conn_fail(c, -ENAMETOOLONG, "socket path too long: %s", uds_path);
	strcpy(sa.sun_path, uds_path);
	c->rbuf = malloc(AGENT_CONN_RBUF);
	if (!c->rbuf)
		return agent_conn_fail(c, -ENOMEM, "out of memory");
	c->fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (c->fd < 0)
		return agent_conn_fail(c, -errno, "socket: %s", strerror(errno));
	while ((ret = connect(c->fd, (struct sockaddr *)&sa, sizeof(sa))) < 0 && errno == EINTR)
		;
	if (ret < 0)
		return agent_conn_fail(c, -errno, "connect %s: %s", uds_path, strerror(errno));
	if (fcntl(c->fd, F_SETFL, fcntl(c->fd, F_GETFL) | O_NONBLOCK) < 0)
		return agent_conn_fail(c, -errno, "fcntl: %s", strerror(errno));
	c->line_len = (size_t)snprintf(c->line, sizeof(c->line), "CONNECT %u\n", port);
	return 0;
}

static void agent_conn_ring_drain(struct agent_conn *c, bool may_shut);

void agent_conn_close(struct agent_conn *c)
{
	if (c->ring) {
		agent_conn_ring_drain(c, true);
		if (c->ring_busy)
			c->tx = c->rbuf = NULL; /* the kernel may still write them: leaked, never freed under it */
		io_uring_queue_exit(c->ring);
		free(c->ring);
		c->ring = NULL;
	}
	if (c->fd >= 0)
		close(c->fd);
	c->fd = -1;
	free(c->tx);
	free(c->rbuf);
	c->tx = c->rbuf = NULL;
	c->tx_off = c->tx_len = c->tx_cap = 0;
}

uint8_t *agent_conn_frame(struct agent_conn *c, size_t max_len)
{
	size_t need;

	if (c->tx_off == c->tx_len)
		c->tx_off = c->tx_len = 0;
	need = c->tx_len + AGENT_CONN_HDR + max_len;
	if (need > c->tx_cap) {
		uint8_t *n = realloc(c->tx, need);

		if (!n) {
			agent_conn_fail(c, -ENOMEM, "out of memory for a %zu-byte frame", max_len);
			return NULL;
		}
		c->tx = n;
		c->tx_cap = need;
	}
	c->tx_open = max_len;
	return c->tx + c->tx_len + AGENT_CONN_HDR;
}

void agent_conn_frame_done(struct agent_conn *c, uint16_t type, size_t len)
{
	struct smolvm_frame h;

	if (len > c->tx_open)
		len = c->tx_open;
	h.magic = htole32(SMOLVM_PROTO_MAGIC);
	h.type = htole16(type);
	h.flags = 0;
	h.len = htole32((uint32_t)len);
	memcpy(c->tx + c->tx_len, &h, sizeof(h));
	c->tx_len += AGENT_CONN_HDR + len;
	c->tx_open = 0;
}

bool agent_conn_wants_write(const struct agent_conn *c)
{
	if (c->tx_closed || c->done)
		return false;
	return c->line_off < c->line_len || (c->handshaken && c->tx_off < c->tx_len);
}

/* An ERROR frame: its err and code into c->guest, its message into error[]; always -EPROTO. */
static int agent_conn_error_frame(struct agent_conn *c)
{
	struct smolvm_error e;
	size_t n = c->small_len - sizeof(e);

	if (c->small_len < sizeof(e))
		return agent_conn_fail(c, -EPROTO, "bad ERROR frame from the guest agent: %u bytes", c->len);
	memcpy(&e, c->small, sizeof(e));
	c->guest.set = true;
	c->guest.err = (int32_t)le32toh((uint32_t)e.err);
	if (c->guest.err < 0 || c->guest.err > 4095)
		c->guest.err = 0; /* not an errno: a protocol error, which its message explains */
	c->guest.code = (int)le32toh(e.code);
	if (n == 0)
		return agent_conn_fail(c, -EPROTO, "the guest agent sent an ERROR without a message");
	return agent_conn_fail(c, -EPROTO, "%.*s", (int)n, (const char *)c->small + sizeof(e));
}

static bool agent_conn_raw(uint16_t type)
{
	return type == SMOLVM_STDOUT || type == SMOLVM_STDERR || type == SMOLVM_DATA;
}

/* A frame header is complete: check it and ask the handler whether it is due. */
static int agent_conn_header(struct agent_conn *c)
{
	struct smolvm_frame h;
	uint32_t magic;

	memcpy(&h, c->hdr, sizeof(h));
	magic = le32toh(h.magic);
	c->type = le16toh(h.type);
	c->len = c->left = le32toh(h.len);
	c->small_len = 0;
	c->in_payload = true;
	if (magic != SMOLVM_PROTO_MAGIC)
		return agent_conn_fail(c, -EPROTO, "bad frame from the guest agent: magic 0x%08x, want 0x%08x", magic,
				       SMOLVM_PROTO_MAGIC);
	if (c->len > SMOLVM_MAX_PAYLOAD)
		return agent_conn_fail(c, -EPROTO, "bad frame from the guest agent: length %u over %u", c->len,
				       SMOLVM_MAX_PAYLOAD);
	if (c->type == SMOLVM_ERROR || !c->ops->header)
		return 0;
	return c->ops->header(c->ctx, c->type, c->len);
}

/* The frame reader: bytes in, the handler's callbacks out. Returns 0 or -errno. */
static int agent_conn_feed(struct agent_conn *c, const uint8_t *p, size_t n)
{
	int ret;

	while (n && !c->done) {
		if (!c->in_payload) {
			size_t take = AGENT_CONN_HDR - c->hdr_got < n ? AGENT_CONN_HDR - c->hdr_got : n;

			memcpy(c->hdr + c->hdr_got, p, take);
			c->hdr_got += take;
			p += take;
			n -= take;
			if (c->hdr_got < AGENT_CONN_HDR)
				break;
			ret = agent_conn_header(c);
			if (ret < 0)
				return ret;
		} else {
			size_t take = c->left < n ? c->left : n;

			if (agent_conn_raw(c->type)) {
				ret = c->ops->bytes ? c->ops->bytes(c->ctx, c->type, p, take) : 0;
				if (ret < 0)
					return ret;
			} else {
				size_t keep = sizeof(c->small) - c->small_len < take ? sizeof(c->small) - c->small_len : take;

				memcpy(c->small + c->small_len, p, keep);
				c->small_len += keep;
			}
			c->left -= (uint32_t)take;
			p += take;
			n -= take;
		}
		if (c->in_payload && c->left == 0) {
			c->in_payload = false;
			c->hdr_got = 0;
			if (c->type == SMOLVM_ERROR) {
				c->done = true;
				return agent_conn_error_frame(c);
			}
			if (agent_conn_raw(c->type))
				continue;
			ret = c->ops->frame ? c->ops->frame(c->ctx, c->type, c->small, c->small_len, c->len) : 1;
			if (ret < 0)
				return ret;
			if (ret > 0)
				c->done = true;
		}
	}
	return 0;
}

/* Handshake bytes: up to the "OK <n>\n" line; what follows goes to the frame reader. */
static int agent_conn_handshake(struct agent_conn *c, const uint8_t *p, size_t n)
{
	const uint8_t *nl = memchr(p, '\n', n);
	size_t take = nl ? (size_t)(nl - p) + 1 : n;

	if (c->hs_len + take > AGENT_CONN_HS_MAX)
		return agent_conn_fail(c, -ECONNREFUSED, "vsock handshake: no reply line within %d bytes",
				       AGENT_CONN_HS_MAX);
	memcpy(c->hs + c->hs_len, p, take);
	c->hs_len += take;
	if (!nl)
		return 0;
	c->hs[c->hs_len] = 0;
	if (c->hs_len < 4 || memcmp(c->hs, "OK ", 3) != 0)
		return agent_conn_fail(c, -ECONNREFUSED, "vsock handshake for port %u: unexpected reply \"%.40s\"", c->port,
				       c->hs);
	c->handshaken = true;
	return agent_conn_feed(c, p + take, n - take);
}

/* What to send next: the CONNECT line, then (handshaken) the queue, refilled when it runs dry. *len 0: nothing now. */
static int agent_conn_tx_next(struct agent_conn *c, const uint8_t **p, size_t *len)
{
	int ret;

	*len = 0;
	if (c->tx_closed || c->done)
		return 0;
	if (c->line_off < c->line_len) {
		*p = (const uint8_t *)c->line + c->line_off;
		*len = c->line_len - c->line_off;
		return 0;
	}
	if (!c->handshaken)
		return 0;
	if (c->tx_off == c->tx_len && c->ops->refill) {
		ret = c->ops->refill(c->ctx);
		if (ret < 0)
			return ret;
	}
	*p = c->tx + c->tx_off;
	*len = c->tx_len - c->tx_off;
	return 0;
}

/* n bytes of what agent_conn_tx_next() gave went out. */
static void agent_conn_sent(struct agent_conn *c, size_t n)
{
	if (c->line_off < c->line_len)
		c->line_off += n;
	else
		c->tx_off += n;
}

/* A send failed with err (positive): a peer that stopped reading is noted in tx_closed (0), anything else is -err. */
static int agent_conn_send_failed(struct agent_conn *c, int err)
{
	if (err == EPIPE || err == ECONNRESET) {
		c->tx_closed = true; /* the agent answered and closed, or rejected the request: read why */
		return 0;
	}
	return agent_conn_fail(c, -err, "send: %s", strerror(err));
}

/* n bytes came into rbuf (0: EOF, < 0: the receive's -errno): parse them. 1 once the last frame came, 0, -errno. */
static int agent_conn_received(struct agent_conn *c, ssize_t n)
{
	int ret;

	if (n <= 0 && !c->handshaken)
		return agent_conn_fail(c, -ECONNREFUSED, "the guest refused vsock port %u (is the agent up?)", c->port);
	if (n == 0 || n == -ECONNRESET || n == -EPIPE)
		return agent_conn_fail(c, -ECONNRESET, "the guest agent closed the connection %s%s", c->what,
				       c->tx_closed ? " (while the request was being sent)" : "");
	if (n < 0)
		return agent_conn_fail(c, (int)n, "recv: %s", strerror((int)-n));
	ret = c->handshaken ? agent_conn_feed(c, c->rbuf, (size_t)n) : agent_conn_handshake(c, c->rbuf, (size_t)n);
	return ret < 0 ? ret : c->done;
}

/* Send what the socket takes now. Returns 0 or -errno. */
static int agent_conn_send(struct agent_conn *c)
{
	for (;;) {
		const uint8_t *p;
		size_t len;
		ssize_t n;
		int ret = agent_conn_tx_next(c, &p, &len);

		if (ret < 0 || len == 0)
			return ret;
		n = send(c->fd, p, len, MSG_NOSIGNAL | MSG_DONTWAIT);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
			return 0;
		if (n < 0)
			return agent_conn_send_failed(c, errno);
		agent_conn_sent(c, (size_t)n);
	}
}

int agent_conn_step(struct agent_conn *c)
{
	int ret;

	if (c->done)
		return 1;
	if (c->fd < 0)
		return agent_conn_fail(c, -EBADF, "not connected");
	for (;;) {
		ssize_t n;

		ret = agent_conn_send(c);
		if (ret < 0)
			return ret;
		n = recv(c->fd, c->rbuf, AGENT_CONN_RBUF, MSG_DONTWAIT);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
			return 0;
		ret = agent_conn_received(c, n < 0 ? -errno : n);
		if (ret != 0)
			return ret;
	}
}

/* How long to wait: max_ms (-1: no limit), never past the deadline. Returns 0, or -ETIMEDOUT once it passed. */
static int agent_conn_timeout(struct agent_conn *c, int max_ms, int *timeout)
{
	int64_t left = c->deadline_ms - agent_conn_now_ms();

	*timeout = max_ms;
	if (c->deadline_ms < 0)
		return 0;
	if (left <= 0)
		return agent_conn_fail(c, -ETIMEDOUT, "no answer from the guest agent within the host timeout");
	if (max_ms < 0 || left < max_ms)
		*timeout = (int)left;
	return 0;
}

/* Between waits of agent_conn_run(): ask interrupted() after a signal or a slice since *asked. 0 or -EINTR. */
static int agent_conn_ask(struct agent_conn *c, int64_t *asked, int (*interrupted)(void *), void *opaque)
{
	int64_t now = agent_conn_now_ms();

	if (!interrupted || (!c->signalled && now - *asked < AGENT_CONN_SLICE_MS))
		return 0;
	c->signalled = false;
	*asked = now;
	return interrupted(opaque) ? agent_conn_fail(c, -EINTR, "interrupted") : 0;
}

/* ---- io_uring: a RECV into rbuf and a SEND of the queue's head in flight (run()), or a POLL_ADD (wait()) ---- */

/* user_data of each operation, bit (1 << op) of ring_busy while in flight. *_LINK: a POLL_ADD linked before it. */
enum { AGENT_CONN_RECV, AGENT_CONN_SEND, AGENT_CONN_POLL, AGENT_CONN_RECV_LINK, AGENT_CONN_SEND_LINK, AGENT_CONN_OPS };
#define AGENT_CONN_CANCEL AGENT_CONN_OPS /* an ASYNC_CANCEL's own completion */
#define AGENT_CONN_BUSY(c, op) (((c)->ring_busy >> (op)) & 1u)

/* The ring, made on first use; NULL where io_uring is unavailable (then the poll() path serves). */
static struct io_uring *agent_conn_ring(struct agent_conn *c)
{
	if (c->ring || c->ring_failed)
		return c->ring;
	c->ring = malloc(sizeof(*c->ring));
	if (c->ring && io_uring_queue_init(AGENT_CONN_RING, c->ring, 0) == 0)
		return c->ring;
	free(c->ring); /* -ENOSYS, -EPERM (a seccomp filter), -ENOMEM (RLIMIT_MEMLOCK) */
	c->ring = NULL;
	c->ring_failed = true;
	return NULL;
}

/* Queue op (a POLL_ADD's events in len); RECV and SEND go behind a linked POLL_ADD once the kernel answered -EAGAIN. */
static int agent_conn_ring_queue(struct agent_conn *c, unsigned op, const void *p, size_t len)
{
	bool link = op != AGENT_CONN_POLL && ((c->ring_poll_first >> op) & 1u);
	struct io_uring_sqe *sqe;

	if (io_uring_sq_space_left(c->ring) < 1u + link)
		return agent_conn_fail(c, -EBUSY, "io_uring: no free submission entry");
	if (link) {
		sqe = io_uring_get_sqe(c->ring);
		io_uring_prep_poll_add(sqe, c->fd, op == AGENT_CONN_RECV ? POLLIN : POLLOUT);
		io_uring_sqe_set_data64(sqe, op + AGENT_CONN_RECV_LINK);
		sqe->flags |= IOSQE_IO_LINK;
		c->ring_busy |= 1u << (op + AGENT_CONN_RECV_LINK);
	}
	sqe = io_uring_get_sqe(c->ring);
	if (op == AGENT_CONN_RECV)
		io_uring_prep_recv(sqe, c->fd, c->rbuf, AGENT_CONN_RBUF, 0);
	else if (op == AGENT_CONN_SEND)
		io_uring_prep_send(sqe, c->fd, p, len < INT_MAX ? len : INT_MAX, MSG_NOSIGNAL);
	else
		io_uring_prep_poll_add(sqe, c->fd, (unsigned)len);
	io_uring_sqe_set_data64(sqe, op);
	c->ring_busy |= 1u << op;
	return 0;
}

/* A completion's operation, now no longer in flight; AGENT_CONN_OPS for one not ours (a cancel, liburing's timeout). */
static unsigned agent_conn_ring_op(struct agent_conn *c, const struct io_uring_cqe *cqe)
{
	uint64_t op = io_uring_cqe_get_data64(cqe);

	if (op >= AGENT_CONN_OPS)
		return AGENT_CONN_OPS;
	c->ring_busy &= ~(1u << op);
	return (unsigned)op;
}

/*
 * Cancel what is in flight and reap every completion, so that no CQE
 * outlives rbuf or tx. may_shut (the exchange is over): what a cancel did not
 * end within a second ends by shutting the socket down. If the ring fails,
 * ring_busy stays set and agent_conn_close() leaks the buffers.
 */
static void agent_conn_ring_drain(struct agent_conn *c, bool may_shut)
{
	for (unsigned op = 0; op < AGENT_CONN_OPS; op++) {
		struct io_uring_sqe *sqe = AGENT_CONN_BUSY(c, op) ? io_uring_get_sqe(c->ring) : NULL;

		if (sqe) {
			io_uring_prep_cancel64(sqe, op, 0);
			io_uring_sqe_set_data64(sqe, AGENT_CONN_CANCEL);
		}
	}
	while (c->ring_busy) {
		struct __kernel_timespec ts = { .tv_sec = 1 };
		struct io_uring_cqe *cqe;
		int ret;

		io_uring_submit(c->ring);
		ret = io_uring_wait_cqe_timeout(c->ring, &cqe, &ts);
		if (ret == -ETIME && may_shut) {
			shutdown(c->fd, SHUT_RDWR);
			may_shut = false;
			continue;
		}
		if (ret == -EINTR)
			continue;
		if (ret < 0)
			return;
		agent_conn_ring_op(c, cqe);
		io_uring_cqe_seen(c->ring, cqe);
	}
}

/* A RECV or SEND completed with res: 0, 1 (the last frame came) or -errno. */
static int agent_conn_ring_done(struct agent_conn *c, unsigned op, int res)
{
	if (res == -EAGAIN) /* a kernel that does not wait on a nonblocking socket: poll first from now on */
		c->ring_poll_first |= 1u << op;
	if (res == -EAGAIN || res == -EINTR || res == -ECANCELED) /* ECANCELED: its linked POLL_ADD failed */
		return 0;
	if (op == AGENT_CONN_RECV)
		return agent_conn_received(c, res);
	if (res < 0)
		return agent_conn_send_failed(c, -res);
	agent_conn_sent(c, (size_t)res);
	return 0;
}

/* Every completion that came, SENDs first (a peer that closed is noted before its EOF): 0, 1 (done) or -errno. */
static int agent_conn_ring_reap(struct agent_conn *c)
{
	struct io_uring_cqe *cqes[2 * AGENT_CONN_RING];
	unsigned n = io_uring_peek_batch_cqe(c->ring, cqes, 2 * AGENT_CONN_RING), ops[2 * AGENT_CONN_RING];
	int ret = 0;

	for (unsigned i = 0; i < n; i++)
		ops[i] = agent_conn_ring_op(c, cqes[i]);
	for (unsigned pass = 0; pass < 2; pass++)
		for (unsigned i = 0; i < n && ret == 0; i++)
			if (ops[i] == (pass ? AGENT_CONN_RECV : AGENT_CONN_SEND))
				ret = agent_conn_ring_done(c, ops[i], cqes[i]->res);
	io_uring_cq_advance(c->ring, n);
	return ret;
}

/* Keep a RECV in flight, and a SEND whenever there is something to send. */
static int agent_conn_ring_arm(struct agent_conn *c)
{
	const uint8_t *p;
	size_t len;
	int ret;

	if (!AGENT_CONN_BUSY(c, AGENT_CONN_RECV) && (ret = agent_conn_ring_queue(c, AGENT_CONN_RECV, NULL, 0)) < 0)
		return ret;
	if (AGENT_CONN_BUSY(c, AGENT_CONN_SEND))
		return 0;
	ret = agent_conn_tx_next(c, &p, &len);
	return ret < 0 || len == 0 ? ret : agent_conn_ring_queue(c, AGENT_CONN_SEND, p, len);
}

/* agent_conn_run() on the ring: 0 (the last frame came) or -errno; the caller drains the ring. */
static int agent_conn_ring_run(struct agent_conn *c, int (*interrupted)(void *), void *opaque)
{
	int64_t asked = agent_conn_now_ms();

	for (;;) {
		struct __kernel_timespec ts;
		struct io_uring_cqe *cqe;
		int slice, ret = agent_conn_ring_arm(c);

		if (ret < 0)
			return ret;
		ret = io_uring_submit(c->ring); /* -EINTR, -EAGAIN, -EBUSY: again next round */
		if (ret < 0 && ret != -EINTR && ret != -EAGAIN && ret != -EBUSY)
			return agent_conn_fail(c, ret, "io_uring_submit: %s", strerror(-ret));
		ret = agent_conn_timeout(c, AGENT_CONN_SLICE_MS, &slice);
		if (ret < 0)
			return ret;
		ts.tv_sec = slice / 1000;
		ts.tv_nsec = slice % 1000 * 1000000L;
		ret = io_uring_wait_cqe_timeout(c->ring, &cqe, &ts);
		if (ret == -EINTR)
			c->signalled = true;
		else if (ret < 0 && ret != -ETIME)
			return agent_conn_fail(c, ret, "io_uring_wait_cqe_timeout: %s", strerror(-ret));
		else if (ret == 0 && (ret = agent_conn_ring_reap(c)) != 0)
			return ret < 0 ? ret : 0;
		ret = agent_conn_ask(c, &asked, interrupted, opaque);
		if (ret < 0)
			return ret;
	}
}

/* agent_conn_wait() on the ring: a POLL_ADD, kept armed across calls while the events wanted stay the same. */
static int agent_conn_ring_wait(struct agent_conn *c, int timeout)
{
	unsigned mask = POLLIN | (agent_conn_wants_write(c) ? POLLOUT : 0);
	struct __kernel_timespec ts = { .tv_sec = timeout / 1000, .tv_nsec = timeout % 1000 * 1000000L };
	struct io_uring_cqe *cqe;
	int ret;

	agent_conn_ring_reap(c); /* a POLL_ADD that fired before the caller's step(): stale */
	if (AGENT_CONN_BUSY(c, AGENT_CONN_POLL) && c->ring_mask != mask)
		agent_conn_ring_drain(c, false);
	if (!AGENT_CONN_BUSY(c, AGENT_CONN_POLL)) {
		ret = agent_conn_ring_queue(c, AGENT_CONN_POLL, NULL, mask);
		if (ret < 0)
			return ret;
		c->ring_mask = mask;
	}
	ret = io_uring_submit(c->ring);
	if (ret >= 0 || ret == -EINTR || ret == -EAGAIN || ret == -EBUSY)
		ret = io_uring_wait_cqe_timeout(c->ring, &cqe, timeout < 0 ? NULL : &ts);
	if (ret == -EINTR)
		c->signalled = true;
	else if (ret < 0 && ret != -ETIME)
		return agent_conn_fail(c, ret, "io_uring: %s", strerror(-ret));
	return 0;
}

/* poll() where io_uring is unavailable. */
static int agent_conn_poll(struct agent_conn *c, int timeout)
{
	struct pollfd pfd = { .fd = c->fd, .events = POLLIN };

	if (agent_conn_wants_write(c))
		pfd.events |= POLLOUT;
	if (poll(&pfd, 1, timeout) < 0) {
		if (errno != EINTR)
			return agent_conn_fail(c, -errno, "poll: %s", strerror(errno));
		c->signalled = true;
	}
	return 0;
}

int agent_conn_wait(struct agent_conn *c, int max_ms)
{
	int timeout, ret;

	if (c->done)
		return 0;
	ret = agent_conn_timeout(c, max_ms, &timeout);
	if (ret < 0 || timeout == 0)
		return ret;
	return agent_conn_ring(c) ? agent_conn_ring_wait(c, timeout) : agent_conn_poll(c, timeout);
}

int agent_conn_run(struct agent_conn *c, int (*interrupted)(void *), void *opaque)
{
	int64_t asked = agent_conn_now_ms();
	int ret;

	if (c->fd >= 0 && !c->done && agent_conn_ring(c)) {
		ret = agent_conn_ring_run(c, interrupted, opaque);
		agent_conn_ring_drain(c, true);
		return ret;
	}
	for (;;) {
		ret = agent_conn_step(c);
		if (ret != 0)
			return ret < 0 ? ret : 0;
		ret = agent_conn_wait(c, AGENT_CONN_SLICE_MS);
		if (ret == 0)
			ret = agent_conn_ask(c, &asked, interrupted, opaque);
		if (ret < 0)
			return ret;
	}
}
