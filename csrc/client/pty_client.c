/* Host side of one PTY session: the PTY builder, STDIN and RESIZE frames out, and the handler of READY/STDOUT/EXIT frames, over agent_conn.c. */
#define _GNU_SOURCE
#include "pty_client.h"

#include <endian.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "agent_conn.h"
#include "proto.h"

#define PTY_STDIN_CHUNK (64u << 10) /* input bytes per STDIN frame */

struct pty_session {
	struct agent_conn conn;
	struct pty_status *st;
	bool ready;
	/* terminal output not yet taken: out[out_off..out_len) */
	uint8_t *out;
	size_t out_off, out_len, out_cap;
	/* input not yet queued: in[in_off..in_len) */
	uint8_t *in;
	size_t in_off, in_len, in_cap;
	bool resize;
	uint16_t rows, cols;
};

/* Room for need more bytes at buf[len..], moving the live part [off..len) to the front first. */
static int pty_reserve(uint8_t **buf, size_t *off, size_t *len, size_t *cap, size_t need)
{
	size_t live = *len - *off, ncap = *cap ? *cap : 4096;
	uint8_t *nbuf;

	if (*off) {
		memmove(*buf, *buf + *off, live);
		*off = 0;
		*len = live;
	}
	if (live + need <= *cap)
		return 0;
	while (ncap < live + need)
		ncap *= 2;
	nbuf = realloc(*buf, ncap);
	if (!nbuf)
		return -ENOMEM;
	*buf = nbuf;
	*cap = ncap;
	return 0;
}

static int pty_header(void *ctx, uint16_t type, uint32_t len)
{
	struct pty_session *ps = ctx;

	if (type == SMOLVM_READY && !ps->ready && len == sizeof(struct smolvm_pty_ready))
		return 0;
	if (ps->ready && (type == SMOLVM_STDOUT || (type == SMOLVM_EXIT && len == sizeof(struct smolvm_exit))))
		return 0;
	return agent_conn_fail(&ps->conn, -EPROTO, "bad frame from the guest agent in a PTY session: type %u, length %u%s",
			       type, len, ps->ready ? "" : " (want READY first)");
}

/* Terminal output: kept for the caller; past PTY_OUTPUT_CAP the oldest bytes go. */
static int pty_bytes(void *ctx, uint16_t type, const uint8_t *p, size_t n)
{
	struct pty_session *ps = ctx;
	size_t live;

	(void)type;
	if (n > PTY_OUTPUT_CAP) {
		p += n - PTY_OUTPUT_CAP;
		n = PTY_OUTPUT_CAP;
	}
	live = ps->out_len - ps->out_off;
	if (live + n > PTY_OUTPUT_CAP)
		ps->out_off += live + n - PTY_OUTPUT_CAP;
	if (pty_reserve(&ps->out, &ps->out_off, &ps->out_len, &ps->out_cap, n) < 0)
		return agent_conn_fail(&ps->conn, -ENOMEM, "out of memory for %zu bytes of terminal output", n);
	memcpy(ps->out + ps->out_len, p, n);
	ps->out_len += n;
	return 0;
}

/* READY (the pid) or EXIT (the last frame); the header check let nothing else through. */
static int pty_frame(void *ctx, uint16_t type, const uint8_t *payload, size_t kept, uint32_t len)
{
	struct pty_session *ps = ctx;
	struct smolvm_pty_ready r;
	struct smolvm_exit ex;

	(void)kept;
	(void)len;
	if (type == SMOLVM_READY) {
		memcpy(&r, payload, sizeof(r));
		ps->st->pid = (int32_t)le32toh((uint32_t)r.pid);
		ps->ready = true;
		return 0;
	}
	memcpy(&ex, payload, sizeof(ex));
	ps->st->exit_code = (int32_t)le32toh((uint32_t)ex.exit_code);
	ps->st->signal = (int32_t)le32toh((uint32_t)ex.signal);
	ps->st->timed_out = !!(le32toh(ex.flags) & SMOLVM_EXIT_TIMED_OUT);
	return 1;
}

/* The queue ran dry: a pending resize, then the next piece of input. */
static int pty_refill(void *ctx)
{
	struct pty_session *ps = ctx;
	size_t chunk = ps->in_len - ps->in_off;
	uint8_t *p;

	if (ps->resize) {
		struct smolvm_winsize w = { htole16(ps->rows), htole16(ps->cols), 0 };

		p = agent_conn_frame(&ps->conn, sizeof(w));
		if (!p)
			return -ENOMEM;
		memcpy(p, &w, sizeof(w));
		agent_conn_frame_done(&ps->conn, SMOLVM_RESIZE, sizeof(w));
		ps->resize = false;
	}
	if (!chunk)
		return 0;
	if (chunk > PTY_STDIN_CHUNK)
		chunk = PTY_STDIN_CHUNK;
	p = agent_conn_frame(&ps->conn, chunk);
	if (!p)
		return -ENOMEM;
	memcpy(p, ps->in + ps->in_off, chunk);
	agent_conn_frame_done(&ps->conn, SMOLVM_STDIN, chunk);
	ps->in_off += chunk;
	return 0;
}

static const struct agent_conn_ops pty_ops = {
	.header = pty_header,
	.bytes = pty_bytes,
	.frame = pty_frame,
	.refill = pty_refill,
};

/* The request frame: PTY (struct smolvm_pty, command, cwd, env strings). */
static int pty_build(struct pty_session *ps, const struct pty_request *req)
{
	const char *cwd = req->cwd ? req->cwd : "";
	struct smolvm_pty hdr;
	size_t len, off, n;
	uint8_t *m;
	uint32_t i;

	if (req->rows < 1 || req->cols < 1 || req->rows > SMOLVM_PTY_MAX_DIM || req->cols > SMOLVM_PTY_MAX_DIM)
		return agent_conn_fail(&ps->conn, -EINVAL, "terminal size %ux%u: rows and cols must be in 1..%u",
				       req->rows, req->cols, SMOLVM_PTY_MAX_DIM);
	if (req->n_env && !req->env)
		return agent_conn_fail(&ps->conn, -EINVAL, "n_env is %u but env is NULL", req->n_env);
	len = sizeof(hdr) + strlen(req->command) + 1 + strlen(cwd) + 1;
	for (i = 0; i < req->n_env && len <= SMOLVM_MAX_PAYLOAD; i++) {
		if (!req->env[i] || !strchr(req->env[i], '=') || req->env[i][0] == '=')
			return agent_conn_fail(&ps->conn, -EINVAL, "env entry %u is not KEY=VALUE", i);
		len += strlen(req->env[i]) + 1;
	}
	if (len > SMOLVM_MAX_PAYLOAD)
		return agent_conn_fail(&ps->conn, -E2BIG,
				       "command, cwd and env take more than the %u bytes one PTY frame holds",
				       SMOLVM_MAX_PAYLOAD);
	m = agent_conn_frame(&ps->conn, len);
	if (!m)
		return -ENOMEM;
	hdr.timeout_ms = htole32(req->timeout_ms);
	hdr.n_env = htole32(req->n_env);
	hdr.rows = htole16(req->rows);
	hdr.cols = htole16(req->cols);
	hdr.flags = 0;
	memcpy(m, &hdr, sizeof(hdr));
	off = sizeof(hdr);
	n = strlen(req->command) + 1;
	memcpy(m + off, req->command, n);
	off += n;
	n = strlen(cwd) + 1;
	memcpy(m + off, cwd, n);
	off += n;
	for (i = 0; i < req->n_env; i++) {
		n = strlen(req->env[i]) + 1;
		memcpy(m + off, req->env[i], n);
		off += n;
	}
	agent_conn_frame_done(&ps->conn, SMOLVM_PTY, off);
	return 0;
}

int pty_session_open(struct pty_session **psp, const char *uds_path, uint32_t port, const struct pty_request *req,
		     int host_timeout_ms, struct pty_status *st)
{
	struct pty_session *ps;
	int ret;

	*psp = NULL;
	memset(st, 0, sizeof(*st));
	ps = calloc(1, sizeof(*ps));
	if (!ps) {
		snprintf(st->error, sizeof(st->error), "out of memory");
		return -ENOMEM;
	}
	ps->st = st;
	ps->conn.fd = -1;
	if (!uds_path || !req || !req->command) {
		snprintf(st->error, sizeof(st->error), "uds_path, req and req->command are required");
		ret = -EINVAL;
		goto fail;
	}
	ret = agent_conn_open(&ps->conn, uds_path, port, host_timeout_ms, &pty_ops, ps, st->error, sizeof(st->error));
	if (ret == 0)
		ret = pty_build(ps, req);
	if (ret < 0)
		goto fail;
	ps->conn.what = "before the PTY session's EXIT";
	*psp = ps;
	return 0;
fail:
	pty_session_free(ps);
	return ret;
}

int pty_session_fd(const struct pty_session *ps)
{
	return ps->conn.fd;
}

bool pty_session_wants_write(const struct pty_session *ps)
{
	return agent_conn_wants_write(&ps->conn); /* after a step, input left over is in the queue (or waits for the handshake) */
}

int pty_session_step(struct pty_session *ps)
{
	int ret = agent_conn_step(&ps->conn);

	ps->st->guest_err = ps->conn.guest.err;
	ps->st->guest_code = ps->conn.guest.code;
	return ret;
}

int pty_session_wait(struct pty_session *ps, int max_ms)
{
	return agent_conn_wait(&ps->conn, max_ms);
}

int pty_session_write(struct pty_session *ps, const uint8_t *p, size_t n)
{
	if (!n)
		return 0;
	if (pty_reserve(&ps->in, &ps->in_off, &ps->in_len, &ps->in_cap, n) < 0)
		return agent_conn_fail(&ps->conn, -ENOMEM, "out of memory for %zu bytes of input", n);
	memcpy(ps->in + ps->in_len, p, n);
	ps->in_len += n;
	return 0;
}

int pty_session_resize(struct pty_session *ps, uint16_t rows, uint16_t cols)
{
	if (rows < 1 || cols < 1 || rows > SMOLVM_PTY_MAX_DIM || cols > SMOLVM_PTY_MAX_DIM)
		return agent_conn_fail(&ps->conn, -EINVAL, "terminal size %ux%u: rows and cols must be in 1..%u", rows,
				       cols, SMOLVM_PTY_MAX_DIM);
	ps->resize = true;
	ps->rows = rows;
	ps->cols = cols;
	return 0;
}

size_t pty_session_pending(const struct pty_session *ps)
{
	return ps->in_len - ps->in_off + (ps->conn.tx_len - ps->conn.tx_off);
}

const uint8_t *pty_session_output(const struct pty_session *ps, size_t *len)
{
	*len = ps->out_len - ps->out_off;
	return ps->out ? ps->out + ps->out_off : NULL;
}

void pty_session_consume(struct pty_session *ps, size_t n)
{
	size_t live = ps->out_len - ps->out_off;

	ps->out_off += n < live ? n : live;
	if (ps->out_off == ps->out_len)
		ps->out_off = ps->out_len = 0;
}

void pty_session_free(struct pty_session *ps)
{
	if (!ps)
		return;
	agent_conn_close(&ps->conn);
	free(ps->out);
	free(ps->in);
	free(ps);
}
