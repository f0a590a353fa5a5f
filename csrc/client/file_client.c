/* Host side of file transfers: the PUT and GET builders and their handlers (READY, DATA, EXIT) over agent_conn.c. */
#define _GNU_SOURCE
#include "file_client.h"

#include <endian.h>
#include <errno.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "agent_conn.h"
#include "proto.h"

/* State of one file_put() / file_get() call. */
struct file_client {
	struct agent_conn conn;
	struct file_result *res;
	const char *path; /* the guest path, for messages */
	int fd;           /* the local file */
	bool get;
	bool ready;       /* READY came */
	uint64_t size;    /* PUT: the local file's size; GET: the guest file's */
	uint64_t queued;  /* PUT: bytes read into DATA frames so far */
	char what[256];   /* "during the transfer of PATH", for the connection's messages */
};

static int file_client_local(struct file_client *f, int err, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int file_client_local(struct file_client *f, int err, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(f->res->error, sizeof(f->res->error), fmt, ap);
	va_end(ap);
	f->res->origin = FILE_ORIGIN_LOCAL;
	return err;
}

static const char *file_client_name(uint16_t type)
{
	return type == SMOLVM_EXIT ? "EXIT" : type == SMOLVM_READY ? "READY" : type == SMOLVM_DATA ? "DATA" : "?";
}

/* READY first; then DATA (GET, within the announced size) until EXIT. */
static int file_client_header(void *ctx, uint16_t type, uint32_t len)
{
	struct file_client *f = ctx;
	uint16_t want = !f->ready ? SMOLVM_READY : f->get && f->res->size < f->size ? SMOLVM_DATA : SMOLVM_EXIT;
	uint32_t want_len = want == SMOLVM_EXIT ? sizeof(struct smolvm_exit)
			    : want == SMOLVM_READY ? (f->get ? sizeof(struct smolvm_file) : 0)
						   : len;

	if (type != SMOLVM_EXIT && type != SMOLVM_READY && type != SMOLVM_DATA)
		return agent_conn_fail(&f->conn, -EPROTO, "bad frame from the guest agent: type %u during a file transfer",
				       type);
	if (want == SMOLVM_DATA && type == SMOLVM_DATA && len > f->size - f->res->size)
		return agent_conn_fail(&f->conn, -EPROTO, "bad DATA frame from the guest agent: %u bytes, %llu due", len,
				       (unsigned long long)(f->size - f->res->size));
	if (want == SMOLVM_DATA && type != SMOLVM_DATA)
		return agent_conn_fail(&f->conn, -EPROTO, "bad frame from the guest agent: type %u after %llu of %llu bytes",
				       type, (unsigned long long)f->res->size, (unsigned long long)f->size);
	if (type != want || len != want_len)
		return agent_conn_fail(&f->conn, -EPROTO,
				       "bad frame from the guest agent: %s of %u bytes where %s was due",
				       file_client_name(type), len, file_client_name(want));
	return 0;
}

/* GET's DATA: written to the local file as it arrives. */
static int file_client_bytes(void *ctx, uint16_t type, const uint8_t *p, size_t n)
{
	struct file_client *f = ctx;

	(void)type;
	while (n) {
		ssize_t w = write(f->fd, p, n);

		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0)
			return file_client_local(f, w < 0 ? -errno : -EIO, "write: %s", strerror(w < 0 ? errno : EIO));
		p += w;
		n -= (size_t)w;
		f->res->size += (uint64_t)w;
	}
	return 0;
}

/* PUT: what the agent has taken counts as sent once the queue is empty. */
static void file_client_sent(struct file_client *f)
{
	if (!f->get && !agent_conn_wants_write(&f->conn))
		f->res->size = f->queued;
}

static int file_client_frame(void *ctx, uint16_t type, const uint8_t *payload, size_t kept, uint32_t len)
{
	struct file_client *f = ctx;
	struct smolvm_file info;
	struct smolvm_exit ex;

	(void)kept;
	(void)len;
	if (type == SMOLVM_READY) {
		f->ready = true;
		if (f->get) {
			memcpy(&info, payload, sizeof(info));
			f->size = le64toh(info.size);
			f->res->mode = le32toh(info.mode);
		}
		return 0;
	}
	file_client_sent(f);
	memcpy(&ex, payload, sizeof(ex));
	if (ex.exit_code != 0)
		return agent_conn_fail(&f->conn, -EPROTO, "the guest agent ended the transfer of %s with status %d", f->path,
				       (int32_t)le32toh((uint32_t)ex.exit_code));
	return 1;
}

/* PUT, after READY: the next DATA frame read from the local file, until its size is queued. */
static int file_client_refill(void *ctx)
{
	struct file_client *f = ctx;
	size_t want = f->size - f->queued < FILE_CLIENT_CHUNK ? (size_t)(f->size - f->queued) : FILE_CLIENT_CHUNK;
	uint8_t *p;
	ssize_t n;

	if (f->get || !f->ready)
		return 0;
	f->res->size = f->queued;
	if (!want)
		return 0;
	p = agent_conn_frame(&f->conn, want);
	if (!p)
		return -ENOMEM;
	while ((n = read(f->fd, p, want)) < 0 && errno == EINTR)
		;
	/* Both cut the connection: the agent then removes its temporary file. */
	if (n < 0)
		return file_client_local(f, -errno, "read: %s", strerror(errno));
	if (n == 0)
		return file_client_local(f, -EIO, "the file shrank while it was sent (%llu of %llu bytes)",
					 (unsigned long long)f->queued, (unsigned long long)f->size);
	agent_conn_frame_done(&f->conn, SMOLVM_DATA, (size_t)n);
	f->queued += (uint64_t)n;
	return 0;
}

static const struct agent_conn_ops file_client_ops = {
	.header = file_client_header,
	.bytes = file_client_bytes,
	.frame = file_client_frame,
	.refill = file_client_refill,
};

/*
 * The whole transfer: connect, queue the request frame (type, head, path +
 * NUL), run to EXIT, and say which side a failure is about.
 */
static int file_client_run(struct file_client *f, const char *uds_path, uint32_t port, int host_timeout_ms,
			   int (*interrupted)(void *), void *opaque, uint16_t type, const void *head, size_t head_len)
{
	size_t plen = strlen(f->path) + 1;
	uint8_t *m;
	int ret;

	ret = agent_conn_open(&f->conn, uds_path, port, host_timeout_ms, &file_client_ops, f, f->res->error,
			      sizeof(f->res->error));
	if (ret < 0)
		goto out;
	snprintf(f->what, sizeof(f->what), "during the transfer of %s", f->path);
	f->conn.what = f->what;
	if (head_len + plen > SMOLVM_MAX_PAYLOAD) {
		ret = agent_conn_fail(&f->conn, -ENAMETOOLONG, "guest path too long (%zu bytes)", plen - 1);
		goto out;
	}
	m = agent_conn_frame(&f->conn, head_len + plen);
	if (!m) {
		ret = -ENOMEM;
		goto out;
	}
	if (head_len)
		memcpy(m, head, head_len);
	memcpy(m + head_len, f->path, plen);
	agent_conn_frame_done(&f->conn, type, head_len + plen);
	ret = agent_conn_run(&f->conn, interrupted, opaque);
out:
	agent_conn_close(&f->conn);
	if (ret < 0 && f->conn.guest.set) {
		f->res->origin = FILE_ORIGIN_GUEST;
		f->res->guest_err = f->conn.guest.err;
		f->res->guest_code = f->conn.guest.code;
		ret = f->conn.guest.err ? -f->conn.guest.err : -EPROTO;
	}
	if (ret < 0 && f->res->origin == FILE_ORIGIN_NONE)
		f->res->origin = FILE_ORIGIN_TRANSPORT;
	if (ret < 0 && !f->res->error[0])
		snprintf(f->res->error, sizeof(f->res->error), "%s", strerror(-ret));
	return ret;
}

static int file_client_init(struct file_client *f, const char *uds_path, const char *guest_path, int fd,
			    struct file_result *res)
{
	memset(res, 0, sizeof(*res));
	memset(f, 0, sizeof(*f));
	f->conn.fd = -1;
	f->res = res;
	f->path = guest_path ? guest_path : "";
	f->fd = fd;
	if (!uds_path || !guest_path) {
		snprintf(res->error, sizeof(res->error), "uds_path and guest_path are required");
		res->origin = FILE_ORIGIN_TRANSPORT;
		return -EINVAL;
	}
	return 0;
}

int file_put(const char *uds_path, uint32_t port, int local_fd, const char *guest_path, uint32_t mode,
	     int host_timeout_ms, int (*interrupted)(void *), void *opaque, struct file_result *res)
{
	struct file_client f;
	struct smolvm_put put;
	struct stat st;
	int ret = file_client_init(&f, uds_path, guest_path, local_fd, res);

	if (ret < 0)
		return ret;
	if (fstat(local_fd, &st) < 0)
		return file_client_local(&f, -errno, "fstat: %s", strerror(errno));
	if (!S_ISREG(st.st_mode))
		return file_client_local(&f, S_ISDIR(st.st_mode) ? -EISDIR : -EINVAL, "%s",
					 S_ISDIR(st.st_mode) ? "is a directory" : "not a regular file");
	f.size = (uint64_t)st.st_size;
	put.size = htole64(f.size);
	put.mode = htole32(mode & 07777);
	put.flags = 0;
	return file_client_run(&f, uds_path, port, host_timeout_ms, interrupted, opaque, SMOLVM_PUT, &put, sizeof(put));
}

int file_get(const char *uds_path, uint32_t port, const char *guest_path, int local_fd, int host_timeout_ms,
	     int (*interrupted)(void *), void *opaque, struct file_result *res)
{
	struct file_client f;
	int ret = file_client_init(&f, uds_path, guest_path, local_fd, res);

	if (ret < 0)
		return ret;
	f.get = true;
	return file_client_run(&f, uds_path, port, host_timeout_ms, interrupted, opaque, SMOLVM_GET, NULL, 0);
}
