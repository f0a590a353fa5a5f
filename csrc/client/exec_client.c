/* Host side of one exec: the EXEC builder, STDIN frames out, and the handler of STDOUT/STDERR/EXIT frames, over agent_conn.c. */
#define _GNU_SOURCE
#include "exec_client.h"

#include <endian.h>
#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "agent_conn.h"
#include "proto.h"

#define EXEC_STDIN_CHUNK (64u << 10) /* input bytes per STDIN frame */

struct exec_stream {
	struct agent_conn conn;
	unsigned flags;
	struct exec_output *out;
	size_t out_cap, err_cap;
	bool truncated;
	bool has_input, input_eof_sent;
	const uint8_t *input;
	size_t input_len, input_off;
	/* EXEC_STREAM_EVENTS: chunks since the last exec_stream_events_clear() */
	uint8_t *ev;
	size_t ev_len, ev_cap;
};

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

static int exec_stream_header(void *ctx, uint16_t type, uint32_t len)
{
	struct exec_stream *xs = ctx;

	if (type != SMOLVM_STDOUT && type != SMOLVM_STDERR && type != SMOLVM_EXIT)
		return agent_conn_fail(&xs->conn, -EPROTO, "bad frame from the guest agent: type %u", type);
	if (type == SMOLVM_EXIT && len != sizeof(struct smolvm_exit))
		return agent_conn_fail(&xs->conn, -EPROTO, "bad EXIT frame from the guest agent: length %u", len);
	return 0;
}

/* Output bytes: kept (up to EXEC_OUTPUT_CAP per stream) and, with EXEC_STREAM_EVENTS, logged. */
static int exec_stream_bytes(void *ctx, uint16_t type, const uint8_t *p, size_t n)
{
	struct exec_stream *xs = ctx;
	bool is_out = type == SMOLVM_STDOUT;
	uint8_t **buf = is_out ? &xs->out->out : &xs->out->err;
	size_t *len = is_out ? &xs->out->out_len : &xs->out->err_len;
	size_t keep = n;

	if (xs->flags & EXEC_STREAM_EVENTS) {
		uint32_t n32 = (uint32_t)n;

		if (exec_stream_reserve(&xs->ev, &xs->ev_cap, xs->ev_len + 5 + n, SIZE_MAX / 2) < 0)
			return agent_conn_fail(&xs->conn, -ENOMEM, "out of memory for %zu bytes of output", n);
		xs->ev[xs->ev_len] = (uint8_t)type;
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
		return agent_conn_fail(&xs->conn, -ENOMEM, "out of memory for %zu bytes of output", *len + keep);
	memcpy(*buf + *len, p, keep);
	*len += keep;
	return 0;
}

/* EXIT (the header check let nothing else through): the last frame. */
static int exec_stream_frame(void *ctx, uint16_t type, const uint8_t *payload, size_t kept, uint32_t len)
{
	struct exec_stream *xs = ctx;
	struct smolvm_exit ex;

	(void)type;
	(void)kept;
	(void)len;
	memcpy(&ex, payload, sizeof(ex));
	xs->out->exit_code = (int32_t)le32toh((uint32_t)ex.exit_code);
	xs->out->signal = (int32_t)le32toh((uint32_t)ex.signal);
	xs->out->timed_out = !!(le32toh(ex.flags) & SMOLVM_EXIT_TIMED_OUT);
	return 1;
}

/* The next STDIN frame once the previous one is out; the empty one ends the input. */
static int exec_stream_refill(void *ctx)
{
	struct exec_stream *xs = ctx;
	size_t chunk = xs->input_len - xs->input_off;
	uint8_t *p;

	if (!xs->has_input || xs->input_eof_sent)
		return 0;
	if (chunk > EXEC_STDIN_CHUNK)
		chunk = EXEC_STDIN_CHUNK;
	p = agent_conn_frame(&xs->conn, chunk);
	if (!p)
		return -ENOMEM;
	if (chunk)
		memcpy(p, xs->input + xs->input_off, chunk);
	agent_conn_frame_done(&xs->conn, SMOLVM_STDIN, chunk);
	xs->input_off += chunk;
	xs->input_eof_sent = chunk == 0;
	return 0;
}

static const struct agent_conn_ops exec_stream_ops = {
	.header = exec_stream_header,
	.bytes = exec_stream_bytes,
	.frame = exec_stream_frame,
	.refill = exec_stream_refill,
};

/* The request frame: EXEC (struct smolvm_exec, command, cwd, env strings). */
static int exec_stream_build(struct exec_stream *xs, const struct exec_request *req)
{
	const char *cwd = req->cwd ? req->cwd : "";
	struct smolvm_exec ex;
	size_t len, off;
	uint8_t *m;
	uint32_t i;

	len = sizeof(ex) + strlen(req->command) + 1 + strlen(cwd) + 1;
	if (req->n_env && !req->env)
		return agent_conn_fail(&xs->conn, -EINVAL, "n_env is %u but env is NULL", req->n_env);
	for (i = 0; i < req->n_env; i++) {
		if (!req->env[i] || !strchr(req->env[i], '=') || req->env[i][0] == '=')
			return agent_conn_fail(&xs->conn, -EINVAL, "env entry %u is not KEY=VALUE", i);
		len += strlen(req->env[i]) + 1;
		if (len > SMOLVM_MAX_PAYLOAD)
			break;
	}
	if (len > SMOLVM_MAX_PAYLOAD)
		return agent_conn_fail(&xs->conn, -E2BIG,
				       "command, cwd and env take more than the %u bytes one EXEC frame holds",
				       SMOLVM_MAX_PAYLOAD);
	m = agent_conn_frame(&xs->conn, len);
	if (!m)
		return -ENOMEM;
	ex.timeout_ms = htole32(req->timeout_ms);
	ex.n_env = htole32(req->n_env);
	ex.flags = htole32(req->has_input ? SMOLVM_EXEC_STDIN : 0);
	memcpy(m, &ex, sizeof(ex));
	off = sizeof(ex);
	memcpy(m + off, req->command, strlen(req->command) + 1);
	off += strlen(req->command) + 1;
	memcpy(m + off, cwd, strlen(cwd) + 1);
	off += strlen(cwd) + 1;
	for (i = 0; i < req->n_env; i++) {
		memcpy(m + off, req->env[i], strlen(req->env[i]) + 1);
		off += strlen(req->env[i]) + 1;
	}
	agent_conn_frame_done(&xs->conn, SMOLVM_EXEC, off);
	return 0;
}

int exec_stream_open(struct exec_stream **xsp, const char *uds_path, uint32_t port, const struct exec_request *req,
		     int host_timeout_ms, unsigned flags, struct exec_output *out)
{
	struct exec_stream *xs;
	int ret;

	*xsp = NULL;
	memset(out, 0, sizeof(*out));
	xs = calloc(1, sizeof(*xs));
	if (!xs) {
		snprintf(out->error, sizeof(out->error), "out of memory");
		return -ENOMEM;
	}
	xs->out = out;
	xs->flags = flags;
	xs->conn.fd = -1;
	if (!uds_path || !req || !req->command) {
		snprintf(out->error, sizeof(out->error), "uds_path, req and req->command are required");
		ret = -EINVAL;
		goto fail;
	}
	ret = agent_conn_open(&xs->conn, uds_path, port, host_timeout_ms, &exec_stream_ops, xs, out->error,
			      sizeof(out->error));
	if (ret == 0)
		ret = exec_stream_build(xs, req);
	if (ret < 0)
		goto fail;
	xs->has_input = req->has_input;
	xs->input = req->input;
	xs->input_len = req->input ? req->input_len : 0;
	*xsp = xs;
	return 0;
fail:
	exec_stream_free(xs);
	return ret;
}

int exec_stream_fd(const struct exec_stream *xs)
{
	return xs->conn.fd;
}

bool exec_stream_wants_write(const struct exec_stream *xs)
{
	return agent_conn_wants_write(&xs->conn);
}

/* The conn's result with the ERROR frame's err and code copied out, and the truncation note on success. */
static int exec_stream_result(struct exec_stream *xs, int ret)
{
	xs->out->guest_err = xs->conn.guest.err;
	xs->out->guest_code = xs->conn.guest.code;
	if (ret > 0 && xs->truncated)
		snprintf(xs->out->error, sizeof(xs->out->error), "output truncated: each stream keeps its first %u MiB",
			 EXEC_OUTPUT_CAP >> 20);
	return ret;
}

int exec_stream_step(struct exec_stream *xs)
{
	return exec_stream_result(xs, agent_conn_step(&xs->conn));
}

int exec_stream_wait(struct exec_stream *xs, int max_ms)
{
	return agent_conn_wait(&xs->conn, max_ms);
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
	agent_conn_close(&xs->conn);
	free(xs->ev);
	free(xs);
}

int exec_run(const char *uds_path, uint32_t port, const struct exec_request *req, int host_timeout_ms,
	     int (*interrupted)(void *), void *opaque, struct exec_output *out)
{
	struct exec_stream *xs = NULL;
	int ret;

	ret = exec_stream_open(&xs, uds_path, port, req, host_timeout_ms, 0, out);
	if (ret == 0)
		ret = exec_stream_result(xs, agent_conn_run(&xs->conn, interrupted, opaque) ?: 1);
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
