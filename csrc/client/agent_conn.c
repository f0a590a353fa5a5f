/* One connection to the guest agent: nonblocking Unix socket, CONNECT handshake, the outgoing frame queue and the frame reader every request shares. */
#define _GNU_SOURCE
#include "agent_conn.h"

#include <endian.h>
#include <errno.h>
#include <fcntl.h>
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

void agent_conn_close(struct agent_conn *c)
{
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

/* Send what the socket takes now. Returns 0 or -errno; a peer that stopped reading is noted in tx_closed. */
static int agent_conn_send(struct agent_conn *c)
{
	int ret;

	for (;;) {
		const uint8_t *p;
		size_t len;
		ssize_t n;

		if (c->tx_closed || c->done)
			return 0;
		if (c->line_off < c->line_len) {
			p = (const uint8_t *)c->line + c->line_off;
			len = c->line_len - c->line_off;
		} else if (!c->handshaken) {
			return 0;
		} else {
			if (c->tx_off == c->tx_len && c->ops->refill) {
				ret = c->ops->refill(c->ctx);
				if (ret < 0)
					return ret;
			}
			if (c->tx_off == c->tx_len)
				return 0;
			p = c->tx + c->tx_off;
			len = c->tx_len - c->tx_off;
		}
		n = send(c->fd, p, len, MSG_NOSIGNAL | MSG_DONTWAIT);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN || errno == EWOULDBLOCK)
				return 0;
			if (errno == EPIPE || errno == ECONNRESET) {
				c->tx_closed = true; /* the agent answered and closed, or rejected the request: read why */
				return 0;
			}
			return agent_conn_fail(c, -errno, "send: %s", strerror(errno));
		}
		if (c->line_off < c->line_len)
			c->line_off += (size_t)n;
		else
			c->tx_off += (size_t)n;
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
		if (n <= 0 && !c->handshaken)
			return agent_conn_fail(c, -ECONNREFUSED, "the guest refused vsock port %u (is the agent up?)", c->port);
		if (n == 0 || (n < 0 && (errno == ECONNRESET || errno == EPIPE)))
			return agent_conn_fail(c, -ECONNRESET, "the guest agent closed the connection %s%s", c->what,
					       c->tx_closed ? " (while the request was being sent)" : "");
		if (n < 0)
			return agent_conn_fail(c, -errno, "recv: %s", strerror(errno));
		ret = c->handshaken ? agent_conn_feed(c, c->rbuf, (size_t)n) : agent_conn_handshake(c, c->rbuf, (size_t)n);
		if (ret < 0)
			return ret;
		if (c->done)
			return 1;
	}
}

int agent_conn_wait(struct agent_conn *c, int max_ms)
{
	struct pollfd pfd = { .fd = c->fd, .events = POLLIN };
	int timeout = max_ms;

	if (c->done)
		return 0;
	if (c->deadline_ms >= 0) {
		int64_t left = c->deadline_ms - agent_conn_now_ms();

		if (left <= 0)
			return agent_conn_fail(c, -ETIMEDOUT, "no answer from the guest agent within the host timeout");
		if (timeout < 0 || left < timeout)
			timeout = (int)left;
	}
	if (agent_conn_wants_write(c))
		pfd.events |= POLLOUT;
	if (poll(&pfd, 1, timeout) < 0) {
		if (errno != EINTR)
			return agent_conn_fail(c, -errno, "poll: %s", strerror(errno));
		c->signalled = true;
	}
	return 0;
}

int agent_conn_run(struct agent_conn *c, int (*interrupted)(void *), void *opaque)
{
	int64_t asked = agent_conn_now_ms();
	int ret;

	for (;;) {
		ret = agent_conn_step(c);
		if (ret != 0)
			return ret < 0 ? ret : 0;
		ret = agent_conn_wait(c, AGENT_CONN_SLICE_MS);
		if (ret < 0)
			return ret;
		if (interrupted && (c->signalled || agent_conn_now_ms() - asked >= AGENT_CONN_SLICE_MS)) {
			c->signalled = false;
			asked = agent_conn_now_ms();
			if (interrupted(opaque))
				return agent_conn_fail(c, -EINTR, "interrupted");
		}
	}
}
