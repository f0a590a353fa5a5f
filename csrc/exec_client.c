/* Host side of one exec: CONNECT handshake, EXEC frame, then STDOUT/STDERR/EXIT frames, all waited on with io_uring. */
#define _GNU_SOURCE
#include "exec_client.h"

#include <endian.h>
#include <errno.h>
#include <liburing.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
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

/* State of one exec_run() call. */
struct exec_client {
	struct exec_conn conn;
	struct exec_output *out;
	size_t out_cap, err_cap;
	bool truncated;
	/* frame parser */
	uint8_t hdr[EXEC_CLIENT_HDR];
	size_t hdr_got;
	bool in_payload;
	uint16_t type;
	uint32_t left;      /* payload bytes of the current frame still to come */
	uint8_t small[256]; /* EXIT payload, or the start of an ERROR payload */
	size_t small_len;
	bool done; /* EXIT or ERROR seen */
};

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

#define exec_client_fail(x, err, ...) exec_conn_fail(&(x)->conn, err, __VA_ARGS__)

void exec_frame_header(void *dst, uint16_t type, uint32_t len)
{
	struct smolvm_frame h;

	h.magic = htole32(SMOLVM_PROTO_MAGIC);
	h.type = htole16(type);
	h.flags = 0;
	h.len = htole32(len);
	memcpy(dst, &h, sizeof(h));
}

int exec_parse_error(const uint8_t *payload, size_t len, int *err, char *msg, size_t msg_size)
{
	struct smolvm_error e;
	size_t n;

	*err = 0;
	if (msg_size)
		msg[0] = 0;
	if (len < sizeof(e))
		return -EPROTO;
	memcpy(&e, payload, sizeof(e));
	*err = (int32_t)le32toh((uint32_t)e.err);
	if (*err < 0 || *err > 4095)
		*err = 0; /* not an errno: a protocol error, which its message explains */
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

/* ---- exec_run ---- */

/* Append to one output stream, growing it geometrically, dropping what is beyond EXEC_OUTPUT_CAP. */
static int exec_client_append(struct exec_client *x, uint8_t **buf, size_t *len, size_t *cap, const uint8_t *p,
			      size_t n)
{
	if (n > EXEC_OUTPUT_CAP - *len) {
		n = EXEC_OUTPUT_CAP - *len;
		x->truncated = true;
	}
	if (!n)
		return 0;
	if (*len + n > *cap) {
		size_t ncap = *cap ? *cap : EXEC_CLIENT_RBUF;
		uint8_t *nbuf;

		while (ncap < *len + n)
			ncap *= 2;
		if (ncap > EXEC_OUTPUT_CAP)
			ncap = EXEC_OUTPUT_CAP;
		nbuf = realloc(*buf, ncap);
		if (!nbuf)
			return exec_client_fail(x, -ENOMEM, "out of memory for %zu bytes of output", ncap);
		*buf = nbuf;
		*cap = ncap;
	}
	memcpy(*buf + *len, p, n);
	*len += n;
	return 0;
}

/* A frame's payload is complete. Returns 0, or -EPROTO for an ERROR frame. */
static int exec_client_frame_done(struct exec_client *x)
{
	struct smolvm_exit ex;
	char msg[sizeof(x->small)];

	x->in_payload = false;
	x->hdr_got = 0;
	if (x->type == SMOLVM_EXIT) {
		memcpy(&ex, x->small, sizeof(ex));
		x->out->exit_code = (int32_t)le32toh((uint32_t)ex.exit_code);
		x->out->signal = (int32_t)le32toh((uint32_t)ex.signal);
		x->out->timed_out = !!(le32toh(ex.flags) & SMOLVM_EXIT_TIMED_OUT);
		x->done = true;
	} else if (x->type == SMOLVM_ERROR) {
		x->done = true;
		if (exec_parse_error(x->small, x->small_len, &x->out->guest_err, msg, sizeof(msg)) < 0)
			return exec_client_fail(x, -EPROTO, "bad ERROR frame from the guest agent: %zu bytes", x->small_len);
		return exec_client_fail(x, -EPROTO, "%s", msg[0] ? msg : "the guest agent sent an empty ERROR");
	}
	return 0;
}

/* Feed received bytes to the frame parser. Returns 0 or -EPROTO (error[] says why). */
static int exec_client_feed(struct exec_client *x, const uint8_t *p, size_t n)
{
	struct exec_output *o = x->out;
	int ret;

	while (n && !x->done) {
		if (!x->in_payload) {
			struct smolvm_frame h;
			uint32_t magic, len;
			size_t take = EXEC_CLIENT_HDR - x->hdr_got;

			if (take > n)
				take = n;
			memcpy(x->hdr + x->hdr_got, p, take);
			x->hdr_got += take;
			p += take;
			n -= take;
			if (x->hdr_got < EXEC_CLIENT_HDR)
				break;
			memcpy(&h, x->hdr, sizeof(h));
			magic = le32toh(h.magic);
			len = le32toh(h.len);
			x->type = le16toh(h.type);
			if (magic != SMOLVM_PROTO_MAGIC)
				return exec_client_fail(x, -EPROTO, "bad frame from the guest agent: magic 0x%08x, want 0x%08x",
							magic, SMOLVM_PROTO_MAGIC);
			if (x->type < SMOLVM_STDOUT || x->type > SMOLVM_ERROR)
				return exec_client_fail(x, -EPROTO, "bad frame from the guest agent: type %u", x->type);
			if (len > SMOLVM_MAX_PAYLOAD)
				return exec_client_fail(x, -EPROTO, "bad frame from the guest agent: length %u over %u", len,
							SMOLVM_MAX_PAYLOAD);
			if (x->type == SMOLVM_EXIT && len != sizeof(struct smolvm_exit))
				return exec_client_fail(x, -EPROTO, "bad EXIT frame from the guest agent: length %u", len);
			x->left = len;
			x->small_len = 0;
			x->in_payload = true;
		} else {
			size_t take = x->left < n ? x->left : n;

			if (x->type == SMOLVM_STDOUT)
				ret = exec_client_append(x, &o->out, &o->out_len, &x->out_cap, p, take);
			else if (x->type == SMOLVM_STDERR)
				ret = exec_client_append(x, &o->err, &o->err_len, &x->err_cap, p, take);
			else {
				size_t keep = sizeof(x->small) - x->small_len;
				memcpy(x->small + x->small_len, p, keep < take ? keep : take);
				x->small_len += keep < take ? keep : take;
				ret = 0;
			}
			if (ret < 0)
				return ret;
			x->left -= (uint32_t)take;
			p += take;
			n -= take;
		}
		if (x->in_payload && x->left == 0) {
			ret = exec_client_frame_done(x);
			if (ret < 0)
				return ret;
		}
	}
	return 0;
}

/* A buffer for one frame of `len` payload bytes, its header filled in; NULL (error set) on ENOMEM. */
static uint8_t *exec_client_frame_alloc(struct exec_client *x, uint16_t type, size_t len)
{
	uint8_t *m = malloc(EXEC_CLIENT_HDR + len);

	if (!m) {
		exec_client_fail(x, -ENOMEM, "out of memory");
		return NULL;
	}
	exec_frame_header(m, type, (uint32_t)len);
	return m;
}

/* The SETUP frame: header, struct smolvm_setup, entropy, hostname. */
static int exec_client_build_setup(struct exec_client *x, const struct exec_setup *su, uint8_t **msg,
				   size_t *msg_len)
{
	size_t hlen = su->hostname ? strlen(su->hostname) : 0;
	size_t len = sizeof(struct smolvm_setup) + su->entropy_len + hlen + su->extra_len;
	struct smolvm_setup body;
	uint8_t *m;

	if (su->entropy_len > SMOLVM_SETUP_MAX_ENTROPY || hlen > SMOLVM_SETUP_MAX_HOSTNAME ||
	    (su->entropy_len && !su->entropy) || su->extra_len > SMOLVM_MAX_PAYLOAD / 2 ||
	    (su->extra_len && !su->extra))
		return exec_client_fail(x, -EINVAL, "setup: entropy (%u) or hostname (%zu) too long",
					su->entropy_len, hlen);
	m = exec_client_frame_alloc(x, SMOLVM_SETUP, len);
	if (!m)
		return -ENOMEM;
	memset(&body, 0, sizeof(body));
	body.wall_ns = htole64(su->wall_ns);
	body.entropy_len = htole32(su->entropy_len);
	body.hostname_len = htole32((uint32_t)hlen);
	body.flags = htole32(su->flags);
	memcpy(m + EXEC_CLIENT_HDR, &body, sizeof(body));
	if (su->entropy_len)
		memcpy(m + EXEC_CLIENT_HDR + sizeof(body), su->entropy, su->entropy_len);
	if (hlen)
		memcpy(m + EXEC_CLIENT_HDR + sizeof(body) + su->entropy_len, su->hostname, hlen);
	if (su->extra_len)
		memcpy(m + EXEC_CLIENT_HDR + sizeof(body) + su->entropy_len + hlen, su->extra, su->extra_len);
	*msg = m;
	*msg_len = EXEC_CLIENT_HDR + len;
	return 0;
}

/* The EXEC frame: header, struct smolvm_exec, command, cwd, env strings. */
static int exec_client_build(struct exec_client *x, const struct exec_request *req, uint8_t **msg, size_t *msg_len)
{
	const char *cwd = req->cwd ? req->cwd : "";
	size_t len = sizeof(struct smolvm_exec) + strlen(req->command) + 1 + strlen(cwd) + 1, off;
	struct smolvm_exec ex;
	uint8_t *m;
	uint32_t i;

	if (req->n_env && !req->env)
		return exec_client_fail(x, -EINVAL, "n_env is %u but env is NULL", req->n_env);
	for (i = 0; i < req->n_env; i++) {
		if (!req->env[i] || !strchr(req->env[i], '=') || req->env[i][0] == '=')
			return exec_client_fail(x, -EINVAL, "env entry %u is not KEY=VALUE", i);
		len += strlen(req->env[i]) + 1;
		if (len > SMOLVM_MAX_PAYLOAD)
			break;
	}
	if (len > SMOLVM_MAX_PAYLOAD)
		return exec_client_fail(x, -E2BIG, "command, cwd and env take more than the %u bytes one EXEC frame holds",
					SMOLVM_MAX_PAYLOAD);
	m = exec_client_frame_alloc(x, SMOLVM_EXEC, len);
	if (!m)
		return -ENOMEM;
	ex.timeout_ms = htole32(req->timeout_ms);
	ex.n_env = htole32(req->n_env);
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
	*msg = m;
	*msg_len = off;
	return 0;
}

int exec_run(const char *uds_path, uint32_t port, const struct exec_request *req, int host_timeout_ms,
	     int (*interrupted)(void *), void *opaque, struct exec_output *out)
{
	struct exec_client x;
	uint8_t *msg = NULL, *rbuf = NULL;
	size_t msg_len = 0, extra = 0;
	int ret, send_err = 0, n;

	memset(out, 0, sizeof(*out));
	memset(&x, 0, sizeof(x));
	x.conn.fd = -1;
	x.conn.error = out->error;
	x.conn.error_size = sizeof(out->error);
	x.out = out;
	if (!uds_path || !req || (!req->command && !req->setup)) {
		ret = exec_client_fail(&x, -EINVAL, "uds_path, req and req->command are required");
		goto out;
	}
	if (req->setup)
		ret = exec_client_build_setup(&x, req->setup, &msg, &msg_len);
	else
		ret = exec_client_build(&x, req, &msg, &msg_len);
	if (ret < 0)
		goto out;
	rbuf = malloc(EXEC_CLIENT_RBUF);
	if (!rbuf) {
		ret = exec_client_fail(&x, -ENOMEM, "out of memory");
		goto out;
	}
	ret = exec_conn_open(&x.conn, uds_path, port, host_timeout_ms, interrupted, opaque, out->error,
			     sizeof(out->error), rbuf, EXEC_CLIENT_RBUF, &extra);
	if (ret < 0)
		goto out;
	ret = exec_client_feed(&x, rbuf, extra);
	if (ret < 0)
		goto out;

	/* If the agent rejects the request early it sends ERROR and closes: read that rather than EPIPE. */
	ret = exec_conn_send(&x.conn, msg, msg_len);
	if (ret == -EPIPE || ret == -ECONNRESET)
		send_err = ret;
	else if (ret < 0)
		goto out;
	free(msg);
	msg = NULL;

	while (!x.done) {
		n = exec_conn_recv(&x.conn, rbuf, EXEC_CLIENT_RBUF);
		if (n == 0 || n == -ECONNRESET || n == -EPIPE) {
			ret = exec_client_fail(&x, -ECONNRESET, "the guest agent closed the connection before EXIT%s",
					       send_err ? " (while the request was being sent)" : "");
			goto out;
		}
		if (n < 0) {
			ret = n == -ETIMEDOUT || n == -EINTR ? n : exec_client_fail(&x, n, "recv: %s", strerror(-n));
			goto out;
		}
		ret = exec_client_feed(&x, rbuf, (size_t)n);
		if (ret < 0)
			goto out;
	}
	ret = 0;
	if (x.truncated)
		snprintf(out->error, sizeof(out->error), "output truncated: each stream keeps its first %u MiB",
			 EXEC_OUTPUT_CAP >> 20);
out:
	if (!exec_conn_close(&x.conn))
		rbuf = msg = NULL; /* the kernel may still use them: leak rather than free */
	free(rbuf);
	free(msg);
	if (ret < 0 && !out->error[0])
		snprintf(out->error, sizeof(out->error), "%s", strerror(-ret));
	return ret;
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
