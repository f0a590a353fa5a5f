/* Host side of file transfers: PUT streams a local file into the guest, GET writes a guest file to a local fd. */
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

#include "exec_client.h"
#include "proto.h"

#define FILE_CLIENT_HDR sizeof(struct smolvm_frame)
#define FILE_CLIENT_RBUF (256u << 10) /* receive buffer: GET's DATA is written to the local fd from here */
#define FILE_CLIENT_SMALL 512         /* READY / EXIT / ERROR payload bytes kept; the rest is skipped */

/* State of one file_put() / file_get() call. */
struct file_client {
	struct exec_conn conn;
	struct file_result *res;
	const char *path; /* the guest path, for messages */
	uint8_t *rbuf;
	size_t off, have; /* received bytes not yet parsed: rbuf[off..have) */
	bool send_cut;    /* a send hit EPIPE / ECONNRESET: the agent closed, maybe after ERROR */
};

#define file_client_fail(f, err, ...) exec_conn_fail(&(f)->conn, err, __VA_ARGS__)

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

/* At least one received byte in rbuf[off..have). Returns 0 or -errno (message set). */
static int file_client_fill(struct file_client *f)
{
	int n;

	if (f->off < f->have)
		return 0;
	f->off = f->have = 0;
	n = exec_conn_recv(&f->conn, f->rbuf, FILE_CLIENT_RBUF);
	if (n == 0 || n == -ECONNRESET || n == -EPIPE)
		return file_client_fail(f, -ECONNRESET, "the guest agent closed the connection during the transfer of %s%s",
					f->path, f->send_cut ? " (while data was being sent)" : "");
	if (n < 0)
		return n == -ETIMEDOUT || n == -EINTR ? n : file_client_fail(f, n, "recv: %s", strerror(-n));
	f->have = (size_t)n;
	return 0;
}

/* Copy the next len received bytes to dst (NULL: skip them). */
static int file_client_take(struct file_client *f, void *dst, size_t len)
{
	uint8_t *p = dst;

	while (len) {
		int ret = file_client_fill(f);
		size_t n = f->have - f->off;

		if (ret < 0)
			return ret;
		if (n > len)
			n = len;
		if (p) {
			memcpy(p, f->rbuf + f->off, n);
			p += n;
		}
		f->off += n;
		len -= n;
	}
	return 0;
}

/* The next frame header, checked. */
static int file_client_header(struct file_client *f, uint16_t *type, uint32_t *len)
{
	struct smolvm_frame h;
	uint32_t magic;
	int ret = file_client_take(f, &h, sizeof(h));

	if (ret < 0)
		return ret;
	magic = le32toh(h.magic);
	*type = le16toh(h.type);
	*len = le32toh(h.len);
	if (magic != SMOLVM_PROTO_MAGIC)
		return file_client_fail(f, -EPROTO, "bad frame from the guest agent: magic 0x%08x, want 0x%08x", magic,
					SMOLVM_PROTO_MAGIC);
	if (*len > SMOLVM_MAX_PAYLOAD)
		return file_client_fail(f, -EPROTO, "bad frame from the guest agent: length %u over %u", *len,
					SMOLVM_MAX_PAYLOAD);
	if (*type != SMOLVM_EXIT && *type != SMOLVM_ERROR && *type != SMOLVM_READY && *type != SMOLVM_DATA)
		return file_client_fail(f, -EPROTO, "bad frame from the guest agent: type %u during a file transfer", *type);
	return 0;
}

/* Read a small frame's payload into small (FILE_CLIENT_SMALL bytes), skipping the rest; *kept = bytes stored. */
static int file_client_small(struct file_client *f, uint32_t len, uint8_t *small, size_t *kept)
{
	size_t keep = len < FILE_CLIENT_SMALL ? len : FILE_CLIENT_SMALL;
	int ret = file_client_take(f, small, keep);

	*kept = keep;
	return ret < 0 ? ret : file_client_take(f, NULL, len - keep);
}

/*
 * A READY, EXIT or ERROR frame whose header was read: ERROR becomes the
 * guest's error; the other type than `want` a protocol error; `want` with
 * want_len payload bytes is copied to out. Returns 0 or -errno.
 */
static int file_client_expect(struct file_client *f, uint16_t type, uint32_t len, uint16_t want, void *out,
			      size_t want_len)
{
	static const char *const names[] = { [SMOLVM_EXIT] = "EXIT", [SMOLVM_READY] = "READY", [SMOLVM_DATA] = "DATA" };
	uint8_t small[FILE_CLIENT_SMALL];
	size_t kept;
	int ret;

	if (type == SMOLVM_DATA)
		return file_client_fail(f, -EPROTO, "bad frame from the guest agent: DATA where %s was due", names[want]);
	ret = file_client_small(f, len, small, &kept);
	if (ret < 0)
		return ret;
	if (type == SMOLVM_ERROR) {
		int err;

		if (exec_parse_error(small, kept, &err, NULL, f->res->error, sizeof(f->res->error)) < 0)
			return file_client_fail(f, -EPROTO, "bad ERROR frame from the guest agent: %u bytes", len);
		if (!f->res->error[0])
			file_client_fail(f, 0, "the guest agent sent an ERROR without a message");
		f->res->origin = FILE_ORIGIN_GUEST;
		f->res->guest_err = err;
		return err ? -err : -EPROTO;
	}
	if (type != want || len != want_len)
		return file_client_fail(f, -EPROTO, "bad frame from the guest agent: %s of %u bytes where %s was due",
					names[type], len, names[want]);
	if (want_len)
		memcpy(out, small, want_len);
	return 0;
}

/* The final EXIT (or ERROR). */
static int file_client_finish(struct file_client *f)
{
	struct smolvm_exit ex;
	uint16_t type;
	uint32_t len;
	int ret = file_client_header(f, &type, &len);

	if (ret < 0)
		return ret;
	ret = file_client_expect(f, type, len, SMOLVM_EXIT, &ex, sizeof(ex));
	if (ret < 0)
		return ret;
	if (ex.exit_code != 0)
		return file_client_fail(f, -EPROTO, "the guest agent ended the transfer of %s with status %d", f->path,
					(int32_t)le32toh((uint32_t)ex.exit_code));
	return 0;
}

/* Connect and send the request frame (header + head + path + NUL). */
static int file_client_start(struct file_client *f, const char *uds_path, uint32_t port, int host_timeout_ms,
			     int (*interrupted)(void *), void *opaque, uint16_t type, const void *head,
			     size_t head_len)
{
	size_t plen = strlen(f->path) + 1, len = head_len + plen, extra = 0;
	uint8_t *msg;
	int ret;

	f->rbuf = malloc(FILE_CLIENT_RBUF);
	if (!f->rbuf)
		return file_client_fail(f, -ENOMEM, "out of memory");
	if (len > SMOLVM_MAX_PAYLOAD)
		return file_client_fail(f, -ENAMETOOLONG, "guest path too long (%zu bytes)", plen - 1);
	ret = exec_conn_open(&f->conn, uds_path, port, host_timeout_ms, interrupted, opaque, f->res->error,
			     sizeof(f->res->error), f->rbuf, FILE_CLIENT_RBUF, &extra);
	if (ret < 0)
		return ret;
	f->have = extra;
	msg = malloc(FILE_CLIENT_HDR + len);
	if (!msg)
		return file_client_fail(f, -ENOMEM, "out of memory");
	exec_frame_header(msg, type, (uint32_t)len);
	if (head_len)
		memcpy(msg + FILE_CLIENT_HDR, head, head_len);
	memcpy(msg + FILE_CLIENT_HDR + head_len, f->path, plen);
	ret = exec_conn_send(&f->conn, msg, FILE_CLIENT_HDR + len);
	free(msg); /* a completed send: the kernel is done with it */
	if (ret == -EPIPE || ret == -ECONNRESET) {
		f->send_cut = true; /* an early ERROR may be waiting */
		return 0;
	}
	return ret;
}

static void file_client_init(struct file_client *f, const char *guest_path, struct file_result *res)
{
	memset(res, 0, sizeof(*res));
	memset(f, 0, sizeof(*f));
	f->conn.fd = -1;
	f->conn.error = res->error;
	f->conn.error_size = sizeof(res->error);
	f->res = res;
	f->path = guest_path ? guest_path : "";
}

static int file_client_end(struct file_client *f, int ret, void *sbuf)
{
	if (!exec_conn_close(&f->conn))
		f->rbuf = sbuf = NULL; /* the kernel may still use them: leak rather than free */
	free(f->rbuf);
	free(sbuf);
	if (ret < 0) {
		if (f->res->origin == FILE_ORIGIN_NONE)
			f->res->origin = FILE_ORIGIN_TRANSPORT;
		if (!f->res->error[0])
			snprintf(f->res->error, sizeof(f->res->error), "%s", strerror(-ret));
	}
	return ret;
}

int file_put(const char *uds_path, uint32_t port, int local_fd, const char *guest_path, uint32_t mode,
	     int host_timeout_ms, int (*interrupted)(void *), void *opaque, struct file_result *res)
{
	struct file_client f;
	struct smolvm_put put;
	struct stat st;
	uint8_t *sbuf = NULL;
	uint64_t left;
	uint16_t type;
	uint32_t len;
	int ret;

	file_client_init(&f, guest_path, res);
	if (!uds_path || !guest_path) {
		ret = file_client_fail(&f, -EINVAL, "uds_path and guest_path are required");
		goto out;
	}
	if (fstat(local_fd, &st) < 0) {
		ret = file_client_local(&f, -errno, "fstat: %s", strerror(errno));
		goto out;
	}
	if (S_ISDIR(st.st_mode) || !S_ISREG(st.st_mode)) {
		ret = file_client_local(&f, S_ISDIR(st.st_mode) ? -EISDIR : -EINVAL, "%s",
					S_ISDIR(st.st_mode) ? "is a directory" : "not a regular file");
		goto out;
	}
	left = (uint64_t)st.st_size;
	put.size = htole64(left);
	put.mode = htole32(mode & 07777);
	put.flags = 0;
	ret = file_client_start(&f, uds_path, port, host_timeout_ms, interrupted, opaque, SMOLVM_PUT, &put, sizeof(put));
	if (ret < 0)
		goto out;
	ret = file_client_header(&f, &type, &len);
	if (ret == 0)
		ret = file_client_expect(&f, type, len, SMOLVM_READY, NULL, 0);
	if (ret < 0)
		goto out;

	sbuf = malloc(FILE_CLIENT_HDR + FILE_CLIENT_CHUNK);
	if (!sbuf) {
		ret = file_client_fail(&f, -ENOMEM, "out of memory");
		goto out;
	}
	while (left && !f.send_cut) {
		size_t want = left < FILE_CLIENT_CHUNK ? (size_t)left : FILE_CLIENT_CHUNK;
		ssize_t n = read(local_fd, sbuf + FILE_CLIENT_HDR, want);

		if (n < 0 && errno == EINTR)
			continue;
		/* Both cut the connection: the agent then removes its temporary file. */
		if (n < 0) {
			ret = file_client_local(&f, -errno, "read: %s", strerror(errno));
			goto out;
		}
		if (n == 0) {
			ret = file_client_local(&f, -EIO, "the file shrank while it was sent (%llu of %llu bytes)",
						(unsigned long long)res->size, (unsigned long long)st.st_size);
			goto out;
		}
		exec_frame_header(sbuf, SMOLVM_DATA, (uint32_t)n);
		ret = exec_conn_send(&f.conn, sbuf, FILE_CLIENT_HDR + (size_t)n);
		if (ret == -EPIPE || ret == -ECONNRESET) {
			f.send_cut = true; /* read what the agent said before it closed */
			break;
		}
		if (ret < 0)
			goto out;
		res->size += (uint64_t)n;
		left -= (uint64_t)n;
	}
	ret = file_client_finish(&f);
out:
	return file_client_end(&f, ret, sbuf);
}

int file_get(const char *uds_path, uint32_t port, const char *guest_path, int local_fd, int host_timeout_ms,
	     int (*interrupted)(void *), void *opaque, struct file_result *res)
{
	struct file_client f;
	struct smolvm_file info;
	uint64_t size;
	uint16_t type;
	uint32_t len;
	int ret;

	file_client_init(&f, guest_path, res);
	if (!uds_path || !guest_path) {
		ret = file_client_fail(&f, -EINVAL, "uds_path and guest_path are required");
		goto out;
	}
	ret = file_client_start(&f, uds_path, port, host_timeout_ms, interrupted, opaque, SMOLVM_GET, NULL, 0);
	if (ret < 0)
		goto out;
	ret = file_client_header(&f, &type, &len);
	if (ret == 0)
		ret = file_client_expect(&f, type, len, SMOLVM_READY, &info, sizeof(info));
	if (ret < 0)
		goto out;
	size = le64toh(info.size);
	res->mode = le32toh(info.mode);

	while (res->size < size) {
		ret = file_client_header(&f, &type, &len);
		if (ret < 0)
			goto out;
		if (type != SMOLVM_DATA) {
			ret = file_client_expect(&f, type, len, SMOLVM_DATA, NULL, 0);
			if (ret == -EPROTO && res->origin != FILE_ORIGIN_GUEST)
				snprintf(res->error, sizeof(res->error),
					 "bad frame from the guest agent: type %u after %llu of %llu bytes", type,
					 (unsigned long long)res->size, (unsigned long long)size);
			goto out;
		}
		if (len > size - res->size) {
			ret = file_client_fail(&f, -EPROTO, "bad DATA frame from the guest agent: %u bytes, %llu due", len,
					       (unsigned long long)(size - res->size));
			goto out;
		}
		while (len) {
			size_t n;

			ret = file_client_fill(&f);
			if (ret < 0)
				goto out;
			n = f.have - f.off < len ? f.have - f.off : len;
			while (n) {
				ssize_t w = write(local_fd, f.rbuf + f.off, n);

				if (w < 0 && errno == EINTR)
					continue;
				if (w <= 0) {
					ret = file_client_local(&f, w < 0 ? -errno : -EIO, "write: %s",
								strerror(w < 0 ? errno : EIO));
					goto out;
				}
				f.off += (size_t)w;
				n -= (size_t)w;
				len -= (uint32_t)w;
				res->size += (uint64_t)w;
			}
		}
	}
	ret = file_client_finish(&f);
out:
	return file_client_end(&f, ret, NULL);
}
