/* Host side of one exec: CONNECT handshake, EXEC (+ STDIN) frames out, STDOUT/STDERR/EXIT frames in, step by step; and the io_uring connection file_client.c uses. */
#define _GNU_SOURCE
#include "exec_client.h"

#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <liburing.h>
#include <poll.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "proto.h"

#define EXEC_CLIENT_RBUF (64u << 10)
#define EXEC_CLIENT_SLICE_MS 100
#define EXEC_CLIENT_HS_MAX 64 /* longest "OK <n>\n" line accepted */
#define EXEC_CLIENT_UD_OP 1u
#define EXEC_CLIENT_UD_CANCEL 2u
#define EXEC_CLIENT_HDR sizeof(struct smolvm_frame)
#define EXEC_STDIN_CHUNK (64u << 10) /* input bytes per STDIN frame */

static int64_t exec_client_now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int exec_conn_fail(struct exec_conn *c, int err, const char *fmt, ...)
{
	va_list ap;

	if (c->error && c->error_size) {
		va_start(ap, fmt);
		vsnprintf(c->error, c->error_size, fmt, ap);
		va_end(ap);
	}
	return err;
}

void exec_frame_header(void *dst, uint16_t type, uint32_t len)
{
	struct smolvm_frame h;

	h.magic = htole32(SMOLVM_PROTO_MAGIC);
	h.type = htole16(type);
	h.flags = 0;
	h.len = htole32(len);
	memcpy(dst, &h, sizeof(h));
}

int exec_parse_error(const uint8_t *payload, size_t len, int *err, int *code, char *msg, size_t msg_size)
{
	struct smolvm_error e;
	size_t n;

	*err = 0;
	if (code)
		*code = SMOLVM_ERRC_REQUEST;
	if (msg_size)
		msg[0] = 0;
	if (len < sizeof(e))
		return -EPROTO;
	memcpy(&e, payload, sizeof(e));
	*err = (int32_t)le32toh((uint32_t)e.err);
	if (*err < 0 || *err > 4095)
		*err = 0; /* not an errno: a protocol error, which its message explains */
	if (code)
		*code = (int)le32toh(e.code);
	n = len - sizeof(e);
	if (msg_size) {
		if (n >= msg_size)
			n = msg_size - 1;
		memcpy(msg, payload + sizeof(e), n);
		msg[n] = 0;
	}
	return 0;
}

/* Cancel the operation in flight (if any) and wait until the kernel is done with its buffer. */
static void exec_conn_cancel(struct exec_conn *c)
{
	struct io_uring_sqe *sqe;
	struct io_uring_cqe *cqe;

	if (!c->in_flight)
		return;
	sqe = io_uring_get_sqe(&c->ring);
	if (sqe) {
		io_uring_prep_cancel64(sqe, EXEC_CLIENT_UD_OP, 0);
		io_uring_sqe_set_data64(sqe, EXEC_CLIENT_UD_CANCEL);
		io_uring_submit(&c->ring);
	}
	shutdown(c->fd, SHUT_RDWR); /* completes a recv/send the cancel could not catch */
	while (c->in_flight) {
		int ret = io_uring_wait_cqe(&c->ring, &cqe);
		if (ret == -EINTR)
			continue;
		if (ret < 0)
			return; /* in_flight stays true: the caller then leaks the buffer rather than free it */
		if (io_uring_cqe_get_data64(cqe) == EXEC_CLIENT_UD_OP)
			c->in_flight = false;
		io_uring_cqe_seen(&c->ring, cqe);
	}
}

/* A fresh SQE tagged as the operation; NULL cannot happen with one op in flight on a ring of 8. */
static struct io_uring_sqe *exec_conn_sqe(struct exec_conn *c)
{
	struct io_uring_sqe *sqe = io_uring_get_sqe(&c->ring);

	if (sqe)
		io_uring_sqe_set_data64(sqe, EXEC_CLIENT_UD_OP);
	return sqe;
}

/*
 * Submit the prepared operation and wait for its completion in slices of at
 * most 100 ms, checking the host deadline and interrupted() between slices.
 * Returns 0 with *res = the completion's result, or -ETIMEDOUT / -EINTR /
 * -errno (the operation then cancelled).
 */
static int exec_conn_wait(struct exec_conn *c, int *res)
{
	struct io_uring_cqe *cqe;
	int ret;

	ret = io_uring_submit(&c->ring);
	if (ret < 0)
		return exec_conn_fail(c, ret, "io_uring_submit: %s", strerror(-ret));
	c->in_flight = true;
	for (;;) {
		int64_t now = exec_client_now_ms(), slice = EXEC_CLIENT_SLICE_MS;
		struct __kernel_timespec ts;

		if (c->interrupted && now - c->last_poll_ms >= EXEC_CLIENT_SLICE_MS) {
			c->last_poll_ms = now;
			if (c->interrupted(c->opaque)) {
				ret = exec_conn_fail(c, -EINTR, "interrupted");
				goto out;
			}
		}
		if (c->deadline_ms >= 0) {
			if (now >= c->deadline_ms) {
				ret = exec_conn_fail(c, -ETIMEDOUT, "no answer from the guest agent within the host timeout");
				goto out;
			}
			if (c->deadline_ms - now < slice)
				slice = c->deadline_ms - now;
		}
		ts.tv_sec = slice / 1000;
		ts.tv_nsec = (slice % 1000) * 1000000;
		ret = io_uring_wait_cqe_timeout(&c->ring, &cqe, &ts);
		if (ret == -ETIME)
			continue;
		if (ret == -EINTR) {
			c->last_poll_ms = INT64_MIN / 2; /* a signal: ask interrupted() right away */
			continue;
		}
		if (ret < 0) {
			ret = exec_conn_fail(c, ret, "io_uring_wait_cqe_timeout: %s", strerror(-ret));
			goto out;
		}
		if (io_uring_cqe_get_data64(cqe) != EXEC_CLIENT_UD_OP) {
			io_uring_cqe_seen(&c->ring, cqe);
			continue;
		}
		*res = cqe->res;
		io_uring_cqe_seen(&c->ring, cqe);
		c->in_flight = false;
		return 0;
	}
out:
	exec_conn_cancel(c);
	return ret;
}

int exec_conn_send(struct exec_conn *c, const void *buf, size_t len)
{
	const uint8_t *p = buf;
	int ret, res;

	while (len) {
		struct io_uring_sqe *sqe = exec_conn_sqe(c);
		if (!sqe)
			return exec_conn_fail(c, -EBUSY, "io_uring: no free submission entry");
		io_uring_prep_send(sqe, c->fd, p, len, MSG_NOSIGNAL);
		ret = exec_conn_wait(c, &res);
		if (ret < 0)
			return ret;
		if (res == -EINTR || res == -EAGAIN)
			continue;
		if (res <= 0)
			return res < 0 ? res : -EIO;
		p += res;
		len -= (size_t)res;
	}
	return 0;
}

int exec_conn_recv(struct exec_conn *c, void *buf, size_t len)
{
	int ret, res;

	for (;;) {
		struct io_uring_sqe *sqe = exec_conn_sqe(c);
		if (!sqe)
			return exec_conn_fail(c, -EBUSY, "io_uring: no free submission entry");
		io_uring_prep_recv(sqe, c->fd, buf, len, 0);
		ret = exec_conn_wait(c, &res);
		if (ret < 0)
			return ret;
		if (res != -EINTR && res != -EAGAIN)
			return res;
	}
}

/* Read the "OK <n>\n" reply into buf; what follows the line is moved to the start of buf. */
static int exec_conn_handshake(struct exec_conn *c, uint32_t port, uint8_t *buf, size_t buf_size, size_t *extra)
{
	size_t have = 0, rest;
	uint8_t *nl = NULL;
	int n;

	while (!nl) {
		n = exec_conn_recv(c, buf + have, buf_size - have);
		if (n == 0 || n == -ECONNRESET || n == -EPIPE)
			return exec_conn_fail(c, -ECONNREFUSED, "the guest refused vsock port %u (is the agent up?)", port);
		if (n < 0)
			return n == -ETIMEDOUT || n == -EINTR ? n : exec_conn_fail(c, n, "vsock handshake: %s", strerror(-n));
		have += (size_t)n;
		nl = memchr(buf, '\n', have);
		if (!nl && (have > EXEC_CLIENT_HS_MAX || have == buf_size))
			break;
	}
	if (!nl || nl - buf < 3 || memcmp(buf, "OK ", 3) != 0)
		return exec_conn_fail(c, -ECONNREFUSED, "vsock handshake: unexpected reply \"%.*s\"",
				      (int)(have < 40 ? have : 40), (const char *)buf);
	rest = have - (size_t)(nl + 1 - buf);
	memmove(buf, nl + 1, rest);
	*extra = rest;
	return 0;
}

int exec_conn_open(struct exec_conn *c, const char *uds_path, uint32_t port, int host_timeout_ms,
		   int (*interrupted)(void *), void *opaque, char *error, size_t error_size, uint8_t *buf,
		   size_t buf_size, size_t *extra)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	struct io_uring_sqe *sqe;
	char line[32];
	int ret, res, n;

	memset(c, 0, sizeof(*c));
	c->fd = -1;
	c->error = error;
	c->error_size = error_size;
	c->interrupted = interrupted;
	c->opaque = opaque;
	c->last_poll_ms = exec_client_now_ms();
	c->deadline_ms = host_timeout_ms < 0 ? -1 : c->last_poll_ms + host_timeout_ms;
	*extra = 0;
	if (!uds_path || buf_size < EXEC_CLIENT_HS_MAX)
		return exec_conn_fail(c, -EINVAL, "exec_conn_open: no socket path, or a buffer under %d bytes",
				      EXEC_CLIENT_HS_MAX);
	if (strlen(uds_path) >= sizeof(sa.sun_path))
		return exec_conn_fail(c, -ENAMETOOLONG, "socket path too long: %s", uds_path);
	strcpy(sa.sun_path, uds_path);
	ret = io_uring_queue_init(8, &c->ring, 0);
	if (ret < 0)
		return exec_conn_fail(c, ret, "io_uring_queue_init: %s", strerror(-ret));
	c->ring_ready = true;
	c->fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (c->fd < 0)
		return exec_conn_fail(c, -errno, "socket: %s", strerror(errno));

	sqe = exec_conn_sqe(c);
	if (!sqe)
		return exec_conn_fail(c, -EBUSY, "io_uring: no free submission entry");
	io_uring_prep_connect(sqe, c->fd, (struct sockaddr *)&sa, sizeof(sa));
	ret = exec_conn_wait(c, &res);
	if (ret < 0)
		return ret;
	if (res < 0)
		return exec_conn_fail(c, res, "connect %s: %s", uds_path, strerror(-res));

	n = snprintf(line, sizeof(line), "CONNECT %u\n", port);
	ret = exec_conn_send(c, line, (size_t)n);
	if (ret == -EPIPE || ret == -ECONNRESET)
		return exec_conn_fail(c, -ECONNREFUSED, "the VMM closed %s during the vsock handshake", uds_path);
	if (ret < 0)
		return ret;
	return exec_conn_handshake(c, port, buf, buf_size, extra);
}

bool exec_conn_close(struct exec_conn *c)
{
	bool idle = true;

	if (c->ring_ready) {
		exec_conn_cancel(c);
		idle = !c->in_flight;
		io_uring_queue_exit(&c->ring);
		c->ring_ready = false;
	}
	if (c->fd >= 0)
		close(c->fd);
	c->fd = -1;
	return idle;
}

/* ---- exec_stream: one EXEC or SETUP, driven step by step over a nonblocking socket ---- */

enum exec_phase { EXEC_PH_HANDSHAKE, EXEC_PH_FRAMES, EXEC_PH_DONE };

struct exec_stream {
	int fd;
	uint32_t port;
	unsigned flags;
	enum exec_phase phase;
	int64_t deadline_ms; /* CLOCK_MONOTONIC; -1 = none */
	struct exec_output *out;
	size_t out_cap, err_cap;
	bool truncated;
	/* handshake reply */
	char hs[EXEC_CLIENT_HS_MAX + 1];
	size_t hs_len;
	/* outgoing: the CONNECT line, then the request frame, then STDIN frames */
	char line[32];
	uint8_t *req;
	size_t req_len;
	const uint8_t *tx;
	size_t tx_len, tx_off;
	bool req_sent, tx_closed;
	bool has_input, input_done, input_eof_queued;
	const uint8_t *input;
	size_t input_len, input_off;
	uint8_t in_hdr[EXEC_CLIENT_HDR];
	size_t in_hdr_off, in_frame_left;
	/* incoming frame parser */
	uint8_t hdr[EXEC_CLIENT_HDR];
	size_t hdr_got;
	bool in_payload;
	uint16_t type;
	uint32_t left;      /* payload bytes of the current frame still to come */
	uint8_t small[256]; /* EXIT payload, or the start of an ERROR payload */
	size_t small_len;
	/* EXEC_STREAM_EVENTS: chunks since the last exec_stream_events_clear() */
	uint8_t *ev;
	size_t ev_len, ev_cap;
	uint8_t rbuf[EXEC_CLIENT_RBUF];
};

static int exec_stream_fail(struct exec_stream *xs, int err, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int exec_stream_fail(struct exec_stream *xs, int err, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(xs->out->error, sizeof(xs->out->error), fmt, ap);
	va_end(ap);
	return err;
}

/* Grow *buf to hold need bytes (geometrically, at most max). */
static int exec_stream_reserve(uint8_t **buf, size_t *cap, size_t need, size_t max)
{
	size_t ncap = *cap ? *cap : 4096;
	uint8_t *nbuf;

	if (need <= *cap)
		return 0;
	while (ncap < need)
		ncap *= 2;
	if (ncap > max)
		ncap = max;
	if (ncap < need)
		return -ENOMEM;
	nbuf = realloc(*buf, ncap);
	if (!nbuf)
		return -ENOMEM;
	*buf = nbuf;
	*cap = ncap;
	return 0;
}

/* Output bytes of one frame: kept (up to EXEC_OUTPUT_CAP per stream) and, with EXEC_STREAM_EVENTS, logged. */
static int exec_stream_output(struct exec_stream *xs, const uint8_t *p, size_t n)
{
	bool is_out = xs->type == SMOLVM_STDOUT;
	uint8_t **buf = is_out ? &xs->out->out : &xs->out->err;
	size_t *len = is_out ? &xs->out->out_len : &xs->out->err_len;
	size_t keep = n;

	if (xs->flags & EXEC_STREAM_EVENTS) {
		uint32_t n32 = (uint32_t)n;

		if (exec_stream_reserve(&xs->ev, &xs->ev_cap, xs->ev_len + 5 + n, SIZE_MAX / 2) < 0)
			return exec_stream_fail(xs, -ENOMEM, "out of memory for %zu bytes of output", n);
		xs->ev[xs->ev_len] = (uint8_t)xs->type;
		memcpy(xs->ev + xs->ev_len + 1, &n32, 4);
		memcpy(xs->ev + xs->ev_len + 5, p, n);
		xs->ev_len += 5 + n;
	}
	if (keep > EXEC_OUTPUT_CAP - *len) {
		keep = EXEC_OUTPUT_CAP - *len;
		xs->truncated = true;
	}
	if (!keep)
		return 0;
	if (exec_stream_reserve(buf, is_out ? &xs->out_cap : &xs->err_cap, *len + keep, EXEC_OUTPUT_CAP) < 0)
		return exec_stream_fail(xs, -ENOMEM, "out of memory for %zu bytes of output", *len + keep);
	memcpy(*buf + *len, p, keep);
	*len += keep;
	return 0;
}

/* A frame's payload is complete. Returns 0, or -EPROTO for an ERROR frame. */
static int exec_stream_frame_done(struct exec_stream *xs)
{
	struct smolvm_exit ex;
	char msg[sizeof(xs->small)];

	xs->in_payload = false;
	xs->hdr_got = 0;
	if (xs->type == SMOLVM_EXIT) {
		memcpy(&ex, xs->small, sizeof(ex));
		xs->out->exit_code = (int32_t)le32toh((uint32_t)ex.exit_code);
		xs->out->signal = (int32_t)le32toh((uint32_t)ex.signal);
		xs->out->timed_out = !!(le32toh(ex.flags) & SMOLVM_EXIT_TIMED_OUT);
		xs->phase = EXEC_PH_DONE;
	} else if (xs->type == SMOLVM_ERROR) {
		xs->phase = EXEC_PH_DONE;
		if (exec_parse_error(xs->small, xs->small_len, &xs->out->guest_err, &xs->out->guest_code, msg,
				     sizeof(msg)) < 0)
			return exec_stream_fail(xs, -EPROTO, "bad ERROR frame from the guest agent: %zu bytes", xs->small_len);
		return exec_stream_fail(xs, -EPROTO, "%s", msg[0] ? msg : "the guest agent sent an empty ERROR");
	}
	return 0;
}

/* Feed received bytes to the frame parser. Returns 0 or -EPROTO (error[] says why). */
static int exec_stream_feed(struct exec_stream *xs, const uint8_t *p, size_t n)
{
	int ret;

	while (n && xs->phase != EXEC_PH_DONE) {
		if (!xs->in_payload) {
			struct smolvm_frame h;
			uint32_t magic, len;
			size_t take = EXEC_CLIENT_HDR - xs->hdr_got;

			if (take > n)
				take = n;
			memcpy(xs->hdr + xs->hdr_got, p, take);
			xs->hdr_got += take;
			p += take;
			n -= take;
			if (xs->hdr_got < EXEC_CLIENT_HDR)
				break;
			memcpy(&h, xs->hdr, sizeof(h));
			magic = le32toh(h.magic);
			len = le32toh(h.len);
			xs->type = le16toh(h.type);
			if (magic != SMOLVM_PROTO_MAGIC)
				return exec_stream_fail(xs, -EPROTO, "bad frame from the guest agent: magic 0x%08x, want 0x%08x",
							magic, SMOLVM_PROTO_MAGIC);
			if (xs->type < SMOLVM_STDOUT || xs->type > SMOLVM_ERROR)
				return exec_stream_fail(xs, -EPROTO, "bad frame from the guest agent: type %u", xs->type);
			if (len > SMOLVM_MAX_PAYLOAD)
				return exec_stream_fail(xs, -EPROTO, "bad frame from the guest agent: length %u over %u", len,
							SMOLVM_MAX_PAYLOAD);
			if (xs->type == SMOLVM_EXIT && len != sizeof(struct smolvm_exit))
				return exec_stream_fail(xs, -EPROTO, "bad EXIT frame from the guest agent: length %u", len);
			xs->left = len;
			xs->small_len = 0;
			xs->in_payload = true;
		} else {
			size_t take = xs->left < n ? xs->left : n;

			if (xs->type == SMOLVM_STDOUT || xs->type == SMOLVM_STDERR) {
				ret = exec_stream_output(xs, p, take);
				if (ret < 0)
					return ret;
			} else {
				size_t keep = sizeof(xs->small) - xs->small_len;
				if (keep > take)
					keep = take;
				memcpy(xs->small + xs->small_len, p, keep);
				xs->small_len += keep;
			}
			xs->left -= (uint32_t)take;
			p += take;
			n -= take;
		}
		if (xs->in_payload && xs->left == 0) {
			ret = exec_stream_frame_done(xs);
			if (ret < 0)
				return ret;
		}
	}
	return 0;
}

/* Handshake bytes: up to the "OK <n>\n" line; what follows goes to the frame parser. */
static int exec_stream_handshake(struct exec_stream *xs, uint32_t port, const uint8_t *p, size_t n)
{
	const uint8_t *nl = memchr(p, '\n', n);
	size_t take = nl ? (size_t)(nl - p) + 1 : n;

	if (xs->hs_len + take > EXEC_CLIENT_HS_MAX)
		return exec_stream_fail(xs, -ECONNREFUSED, "vsock handshake: no reply line within %d bytes",
					EXEC_CLIENT_HS_MAX);
	memcpy(xs->hs + xs->hs_len, p, take);
	xs->hs_len += take;
	if (!nl)
		return 0;
	xs->hs[xs->hs_len] = 0;
	if (xs->hs_len < 4 || memcmp(xs->hs, "OK ", 3) != 0)
		return exec_stream_fail(xs, -ECONNREFUSED, "vsock handshake for port %u: unexpected reply \"%.40s\"", port,
					xs->hs);
	xs->phase = EXEC_PH_FRAMES;
	return exec_stream_feed(xs, p + take, n - take);
}

/* The request frame: EXEC (header, struct smolvm_exec, command, cwd, env strings) or SETUP. */
static int exec_stream_build(struct exec_stream *xs, const struct exec_request *req)
{
	const struct exec_setup *su = req->setup;
	size_t len, off;
	uint8_t *m;
	uint32_t i;

	if (su) {
		size_t hlen = su->hostname ? strlen(su->hostname) : 0;
		struct smolvm_setup body;

		if (su->entropy_len > SMOLVM_SETUP_MAX_ENTROPY || hlen > SMOLVM_SETUP_MAX_HOSTNAME ||
		    (su->entropy_len && !su->entropy) || su->extra_len > SMOLVM_MAX_PAYLOAD / 2 ||
		    (su->extra_len && !su->extra))
			return exec_stream_fail(xs, -EINVAL,
						"setup: entropy (%u), hostname (%zu) or extra data (%u) too long",
						su->entropy_len, hlen, su->extra_len);
		len = sizeof(body) + su->entropy_len + hlen + su->extra_len;
		m = malloc(EXEC_CLIENT_HDR + len);
		if (!m)
			return exec_stream_fail(xs, -ENOMEM, "out of memory");
		exec_frame_header(m, SMOLVM_SETUP, (uint32_t)len);
		memset(&body, 0, sizeof(body));
		body.wall_ns = htole64(su->wall_ns);
		body.entropy_len = htole32(su->entropy_len);
		body.hostname_len = htole32((uint32_t)hlen);
		body.flags = htole32(su->flags);
		off = EXEC_CLIENT_HDR;
		memcpy(m + off, &body, sizeof(body));
		off += sizeof(body);
		if (su->entropy_len)
			memcpy(m + off, su->entropy, su->entropy_len);
		off += su->entropy_len;
		if (hlen)
			memcpy(m + off, su->hostname, hlen);
		off += hlen;
		if (su->extra_len)
			memcpy(m + off, su->extra, su->extra_len);
		xs->req = m;
		xs->req_len = off + su->extra_len;
		return 0;
	}

	const char *cwd = req->cwd ? req->cwd : "";
	struct smolvm_exec ex;

	len = sizeof(ex) + strlen(req->command) + 1 + strlen(cwd) + 1;
	if (req->n_env && !req->env)
		return exec_stream_fail(xs, -EINVAL, "n_env is %u but env is NULL", req->n_env);
	for (i = 0; i < req->n_env; i++) {
		if (!req->env[i] || !strchr(req->env[i], '=') || req->env[i][0] == '=')
			return exec_stream_fail(xs, -EINVAL, "env entry %u is not KEY=VALUE", i);
		len += strlen(req->env[i]) + 1;
		if (len > SMOLVM_MAX_PAYLOAD)
			break;
	}
	if (len > SMOLVM_MAX_PAYLOAD)
		return exec_stream_fail(xs, -E2BIG,
					"command, cwd and env take more than the %u bytes one EXEC frame holds",
					SMOLVM_MAX_PAYLOAD);
	m = malloc(EXEC_CLIENT_HDR + len);
	if (!m)
		return exec_stream_fail(xs, -ENOMEM, "out of memory");
	exec_frame_header(m, SMOLVM_EXEC, (uint32_t)len);
	ex.timeout_ms = htole32(req->timeout_ms);
	ex.n_env = htole32(req->n_env);
	ex.flags = htole32(req->has_input ? SMOLVM_EXEC_STDIN : 0);
	memcpy(m + EXEC_CLIENT_HDR, &ex, sizeof(ex));
	off = EXEC_CLIENT_HDR + sizeof(ex);
	memcpy(m + off, req->command, strlen(req->command) + 1);
	off += strlen(req->command) + 1;
	memcpy(m + off, cwd, strlen(cwd) + 1);
	off += strlen(cwd) + 1;
	for (i = 0; i < req->n_env; i++) {
		memcpy(m + off, req->env[i], strlen(req->env[i]) + 1);
		off += strlen(req->env[i]) + 1;
	}
	xs->req = m;
	xs->req_len = off;
	return 0;
}

int exec_stream_open(struct exec_stream **xsp, const char *uds_path, uint32_t port, const struct exec_request *req,
		     int host_timeout_ms, unsigned flags, struct exec_output *out)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	struct exec_stream *xs;
	int ret;

	*xsp = NULL;
	memset(out, 0, sizeof(*out));
	xs = calloc(1, sizeof(*xs));
	if (!xs) {
		snprintf(out->error, sizeof(out->error), "out of memory");
		return -ENOMEM;
	}
	xs->fd = -1;
	xs->out = out;
	xs->flags = flags;
	xs->deadline_ms = host_timeout_ms < 0 ? -1 : exec_client_now_ms() + host_timeout_ms;
	xs->in_hdr_off = EXEC_CLIENT_HDR;
	if (!uds_path || !req || (!req->command && !req->setup)) {
		ret = exec_stream_fail(xs, -EINVAL, "uds_path, req and req->command are required");
		goto fail;
	}
	if (strlen(uds_path) >= sizeof(sa.sun_path)) {
		ret = exec_stream_fail(xs, -ENAMETOOLONG, "socket path too long: %s", uds_path);
		goto fail;
	}
	strcpy(sa.sun_path, uds_path);
	ret = exec_stream_build(xs, req);
	if (ret < 0)
		goto fail;
	xs->has_input = !req->setup && req->has_input;
	xs->input = req->input;
	xs->input_len = req->input ? req->input_len : 0;
	xs->fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (xs->fd < 0) {
		ret = exec_stream_fail(xs, -errno, "socket: %s", strerror(errno));
		goto fail;
	}
	/* A Unix stream connect completes (or fails) at once; only the exchange after it waits. */
	while ((ret = connect(xs->fd, (struct sockaddr *)&sa, sizeof(sa))) < 0 && errno == EINTR)
		;
	if (ret < 0) {
		ret = exec_stream_fail(xs, -errno, "connect %s: %s", uds_path, strerror(errno));
		goto fail;
	}
	if (fcntl(xs->fd, F_SETFL, fcntl(xs->fd, F_GETFL) | O_NONBLOCK) < 0) {
		ret = exec_stream_fail(xs, -errno, "fcntl: %s", strerror(errno));
		goto fail;
	}
	xs->tx_len = (size_t)snprintf(xs->line, sizeof(xs->line), "CONNECT %u\n", port);
	xs->tx = (const uint8_t *)xs->line;
	xs->port = port;
	*xsp = xs;
	return 0;
fail:
	exec_stream_free(xs);
	return ret;
}

int exec_stream_fd(const struct exec_stream *xs)
{
	return xs->fd;
}

bool exec_stream_wants_write(const struct exec_stream *xs)
{
	if (xs->tx_closed || xs->phase == EXEC_PH_DONE)
		return false;
	if (xs->tx_off < xs->tx_len)
		return true;
	return xs->phase == EXEC_PH_FRAMES && (!xs->req_sent || (xs->has_input && !xs->input_done));
}

/* Send what the socket takes now. Returns 0 or -errno; a peer that stopped reading ends the input quietly. */
static int exec_stream_send(struct exec_stream *xs)
{
	while (exec_stream_wants_write(xs)) {
		struct iovec iov[2];
		struct msghdr mh = { .msg_iov = iov };
		bool input = false;
		ssize_t n;

		if (xs->tx_off < xs->tx_len) {
			iov[0] = (struct iovec){ (void *)(xs->tx + xs->tx_off), xs->tx_len - xs->tx_off };
			mh.msg_iovlen = 1;
		} else if (!xs->req_sent) {
			xs->tx = xs->req;
			xs->tx_len = xs->req_len;
			xs->tx_off = 0;
			xs->req_sent = true;
			continue;
		} else {
			if (xs->in_hdr_off == EXEC_CLIENT_HDR && xs->in_frame_left == 0) {
				size_t chunk = xs->input_len - xs->input_off;

				if (xs->input_eof_queued) {
					xs->input_done = true;
					continue;
				}
				if (chunk > EXEC_STDIN_CHUNK)
					chunk = EXEC_STDIN_CHUNK;
				exec_frame_header(xs->in_hdr, SMOLVM_STDIN, (uint32_t)chunk);
				xs->in_hdr_off = 0;
				xs->in_frame_left = chunk;
				xs->input_eof_queued = chunk == 0;
			}
			if (xs->in_hdr_off < EXEC_CLIENT_HDR)
				iov[mh.msg_iovlen++] =
					(struct iovec){ xs->in_hdr + xs->in_hdr_off, EXEC_CLIENT_HDR - xs->in_hdr_off };
			if (xs->in_frame_left)
				iov[mh.msg_iovlen++] = (struct iovec){ (void *)(xs->input + xs->input_off), xs->in_frame_left };
			input = true;
		}
		n = sendmsg(xs->fd, &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN || errno == EWOULDBLOCK)
				return 0;
			if (errno == EPIPE || errno == ECONNRESET) {
				xs->tx_closed = true; /* the agent answered and closed, or rejected the request: read why */
				return 0;
			}
			return exec_stream_fail(xs, -errno, "send: %s", strerror(errno));
		}
		if (!input) {
			xs->tx_off += (size_t)n;
			continue;
		}
		if (xs->in_hdr_off < EXEC_CLIENT_HDR) {
			size_t h = EXEC_CLIENT_HDR - xs->in_hdr_off;
			if ((size_t)n < h) {
				xs->in_hdr_off += (size_t)n;
				continue;
			}
			xs->in_hdr_off = EXEC_CLIENT_HDR;
			n -= (ssize_t)h;
		}
		xs->input_off += (size_t)n;
		xs->in_frame_left -= (size_t)n;
	}
	return 0;
}

int exec_stream_step(struct exec_stream *xs)
{
	int ret;

	if (xs->phase == EXEC_PH_DONE)
		return 1;
	for (;;) {
		ssize_t n;

		ret = exec_stream_send(xs);
		if (ret < 0)
			return ret;
		n = recv(xs->fd, xs->rbuf, sizeof(xs->rbuf), MSG_DONTWAIT);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
			break;
		if (n <= 0 && xs->phase == EXEC_PH_HANDSHAKE)
			return exec_stream_fail(xs, -ECONNREFUSED, "the guest refused vsock port %u (is the agent up?)",
						xs->port);
		if (n == 0 || (n < 0 && (errno == ECONNRESET || errno == EPIPE)))
			return exec_stream_fail(xs, -ECONNRESET, "the guest agent closed the connection before EXIT%s",
						xs->tx_closed ? " (while the request was being sent)" : "");
		if (n < 0)
			return exec_stream_fail(xs, -errno, "recv: %s", strerror(errno));
		if (xs->phase == EXEC_PH_HANDSHAKE)
			ret = exec_stream_handshake(xs, xs->port, xs->rbuf, (size_t)n);
		else
			ret = exec_stream_feed(xs, xs->rbuf, (size_t)n);
		if (ret < 0)
			return ret;
		if (xs->phase == EXEC_PH_DONE)
			break;
	}
	if (xs->phase != EXEC_PH_DONE)
		return 0;
	if (xs->truncated)
		snprintf(xs->out->error, sizeof(xs->out->error), "output truncated: each stream keeps its first %u MiB",
			 EXEC_OUTPUT_CAP >> 20);
	return 1;
}

int exec_stream_wait(struct exec_stream *xs, int max_ms)
{
	struct pollfd pfd = { .fd = xs->fd, .events = POLLIN };
	int timeout = max_ms;

	if (xs->phase == EXEC_PH_DONE)
		return 0;
	if (xs->deadline_ms >= 0) {
		int64_t left = xs->deadline_ms - exec_client_now_ms();

		if (left <= 0)
			return exec_stream_fail(xs, -ETIMEDOUT, "no answer from the guest agent within the host timeout");
		if (timeout < 0 || left < timeout)
			timeout = (int)left;
	}
	if (exec_stream_wants_write(xs))
		pfd.events |= POLLOUT;
	if (poll(&pfd, 1, timeout) < 0 && errno != EINTR)
		return exec_stream_fail(xs, -errno, "poll: %s", strerror(errno));
	return 0;
}

const uint8_t *exec_stream_events(const struct exec_stream *xs, size_t *len)
{
	*len = xs->ev_len;
	return xs->ev;
}

void exec_stream_events_clear(struct exec_stream *xs)
{
	xs->ev_len = 0;
}

void exec_stream_free(struct exec_stream *xs)
{
	if (!xs)
		return;
	if (xs->fd >= 0)
		close(xs->fd);
	free(xs->req);
	free(xs->ev);
	free(xs);
}

int exec_run(const char *uds_path, uint32_t port, const struct exec_request *req, int host_timeout_ms,
	     int (*interrupted)(void *), void *opaque, struct exec_output *out)
{
	struct exec_stream *xs = NULL;
	int64_t asked = exec_client_now_ms();
	int ret;

	ret = exec_stream_open(&xs, uds_path, port, req, host_timeout_ms, 0, out);
	while (ret == 0) {
		ret = exec_stream_step(xs);
		if (ret != 0)
			break;
		ret = exec_stream_wait(xs, EXEC_CLIENT_SLICE_MS);
		if (ret == 0 && interrupted && exec_client_now_ms() - asked >= EXEC_CLIENT_SLICE_MS) {
			asked = exec_client_now_ms();
			if (interrupted(opaque))
				ret = exec_stream_fail(xs, -EINTR, "interrupted");
		}
	}
	exec_stream_free(xs);
	if (ret < 0 && !out->error[0])
		snprintf(out->error, sizeof(out->error), "%s", strerror(-ret));
	return ret < 0 ? ret : 0;
}

void exec_output_free(struct exec_output *out)
{
	free(out->out);
	free(out->err);
	out->out = NULL;
	out->err = NULL;
	out->out_len = 0;
	out->err_len = 0;
}
