/* PUT and GET in the guest agent: a file written through a temporary file renamed into place, or read out in DATA frames. */
#define _GNU_SOURCE
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "agent.h"

/*
 * A GET reads the next AGENT_XFER_CHUNK only when less than one is queued (at most two per
 * connection); a PUT makes at most 3 * FILES_PUT_BURST reads per wake-up (fairness).
 */
#define FILES_PUT_BURST 4

void files_drop(struct agent_conn *c)
{
	if (c->xfd >= 0)
		close(c->xfd);
	c->xfd = -1;
	if (c->tmp_path && unlink(c->tmp_path) < 0)
		agent_log("unlink %s: %s", c->tmp_path, strerror(errno));
	free(c->tmp_path);
	c->tmp_path = NULL;
	conn_chunk_free(c->xbuf);
	c->xbuf = NULL;
}

/* The NUL-terminated absolute path at p[0..len) of a PUT or GET frame; NULL with ERROR queued (*ret set). */
static const char *files_path(struct agent_conn *c, const char *what, const uint8_t *p, uint32_t len, int *ret)
{
	const char *path = (const char *)p;

	*ret = 0;
	if (len == 0 || p[len - 1] != 0 || strlen(path) != len - 1) {
		*ret = conn_fail(c, 0, "bad %s frame: the path is not one NUL-terminated string", what);
		return NULL;
	}
	if (len > AGENT_PATH_MAX) {
		*ret = conn_fail(c, ENAMETOOLONG, "%s: the path is longer than %u bytes", what, AGENT_PATH_MAX - 1);
		return NULL;
	}
	if (path[0] != '/') {
		*ret = conn_fail(c, EINVAL, "%s %s: the path must be absolute", what, path);
		return NULL;
	}
	return path;
}

/* ---- PUT ---- */

/* All DATA arrived: fail with the write error, or set the mode and rename the file into place. */
static int files_put_finish(struct agent_conn *c)
{
	int err = c->xerr;
	const char *step = "write";

	if (!err && fchmod(c->xfd, c->xmode & 07777) < 0) {
		err = errno;
		step = "chmod";
	}
	if (!err) {
		int fd = c->xfd;

		c->xfd = -1;
		if (close(fd) < 0) {
			err = errno;
			step = "close";
		} else if (rename(c->tmp_path, c->path) < 0) {
			err = errno;
			step = "rename";
		}
	}
	if (err)
		return conn_fail(c, err, "PUT %s: %s: %s", c->path, step, strerror(err));
	free(c->tmp_path); /* renamed: nothing to remove any more */
	c->tmp_path = NULL;
	files_drop(c);
	return conn_done(c);
}

int files_put_start(struct agent_conn *c)
{
	uint32_t len = le32toh(c->hdr.len);
	struct smolvm_put put;
	const char *path, *base;
	struct stat st;
	int ret, fd, dir_len;

	if (len < sizeof(put) + 2)
		return conn_fail(c, 0, "bad PUT frame: payload of %u bytes has no room for a path", len);
	memcpy(&put, c->payload, sizeof(put));
	path = files_path(c, "PUT", c->payload + sizeof(put), len - (uint32_t)sizeof(put), &ret);
	if (!path)
		return ret;
	if (le32toh(put.flags))
		return conn_fail(c, EINVAL, "bad PUT frame: flags 0x%x", le32toh(put.flags));
	base = strrchr(path, '/') + 1;
	if (!*base || (stat(path, &st) == 0 && S_ISDIR(st.st_mode)))
		return conn_fail(c, EISDIR, "PUT %s: %s", path, strerror(EISDIR));
	c->path = strdup(path);
	dir_len = (int)(base - 1 - path);
	/* ".NAME.smolvm-XXXXXX" beside the path; NAME cut so that the name stays under NAME_MAX */
	if (!c->path || asprintf(&c->tmp_path, "%.*s/.%.200s.smolvm-XXXXXX", dir_len, path, base) < 0) {
		c->tmp_path = NULL;
		return -ENOMEM;
	}
	fd = mkostemp(c->tmp_path, O_CLOEXEC);
	if (fd < 0) {
		int err = errno;

		free(c->tmp_path);
		c->tmp_path = NULL;
		return conn_fail(c, err, "PUT %s: cannot create a file in %.*s: %s", path, dir_len ? dir_len : 1,
				 dir_len ? path : "/", strerror(err));
	}
	c->xfd = fd;
	c->xsize = le64toh(put.size);
	c->xmode = le32toh(put.mode);
	c->xdone = 0;
	c->xframe_left = 0;
	c->got = 0;
	free(c->payload);
	c->payload = NULL;
	ret = conn_frame(c, SMOLVM_READY, NULL, 0);
	if (ret < 0)
		return ret;
	c->state = AGENT_C_PUT;
	if (c->xsize == 0)
		return files_put_finish(c);
	c->xbuf = conn_chunk_xfer(SMOLVM_DATA);
	return c->xbuf ? 0 : -ENOMEM;
}

/* Write buf to the PUT's file unless a write already failed; a failure is remembered for the end. */
static void files_put_write(struct agent_conn *c, const uint8_t *buf, size_t len)
{
	while (len && !c->xerr) {
		ssize_t n = write(c->xfd, buf, len);

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0) {
			c->xerr = n < 0 ? errno : EIO;
			break;
		}
		buf += n;
		len -= (size_t)n;
	}
}

int files_put_read(struct agent_conn *c)
{
	uint8_t *buf = c->xbuf->data + AGENT_HDR;
	int burst = 3 * FILES_PUT_BURST; /* reads, headers included */
	ssize_t n;

	while (c->state == AGENT_C_PUT && burst > 0) {
		if (!c->xframe_left)
			n = conn_read(c, (uint8_t *)&c->hdr + c->got, AGENT_HDR - c->got);
		else
			n = conn_read(c, buf, c->xframe_left < AGENT_XFER_CHUNK ? c->xframe_left : AGENT_XFER_CHUNK);
		burst--;
		if (n <= 0)
			return (int)n; /* -ECONNRESET: the host gave up, and conn_close removes the temporary file */
		if (c->xframe_left) {
			c->xframe_left -= (uint32_t)n;
			c->xdone += (uint64_t)n;
			files_put_write(c, buf, (size_t)n);
		} else {
			uint32_t magic, type, len;

			c->got += (uint32_t)n;
			if (c->got < AGENT_HDR)
				continue;
			c->got = 0;
			magic = le32toh(c->hdr.magic);
			type = le16toh(c->hdr.type);
			len = le32toh(c->hdr.len);
			if (magic != SMOLVM_PROTO_MAGIC || type != SMOLVM_DATA || len > SMOLVM_MAX_PAYLOAD)
				return conn_fail(c, 0, "bad frame during PUT %s: magic 0x%08x type %u length %u", c->path, magic,
						 type, len);
			if (len > c->xsize - c->xdone)
				return conn_fail(c, 0, "bad DATA frame during PUT %s: %u bytes, only %llu announced", c->path,
						 len, (unsigned long long)(c->xsize - c->xdone));
			c->xframe_left = len;
		}
		if (c->xdone == c->xsize && !c->xframe_left)
			return files_put_finish(c);
	}
	return 0;
}

/* ---- GET ---- */

int files_get_start(struct agent_conn *c)
{
	struct smolvm_file info;
	const char *path;
	struct stat st;
	int ret, err;

	path = files_path(c, "GET", c->payload, le32toh(c->hdr.len), &ret);
	if (!path)
		return ret;
	/* O_NONBLOCK: a FIFO must not hang the agent in open(); regular files ignore it */
	c->xfd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
	if (c->xfd < 0 || fstat(c->xfd, &st) < 0) {
		err = errno;
		return conn_fail(c, err, "GET %s: %s", path, strerror(err));
	}
	if (!S_ISREG(st.st_mode)) {
		err = S_ISDIR(st.st_mode) ? EISDIR : EINVAL;
		return conn_fail(c, err, "GET %s: %s", path, S_ISDIR(st.st_mode) ? strerror(err) : "not a regular file");
	}
	c->path = strdup(path);
	if (!c->path)
		return -ENOMEM;
	free(c->payload);
	c->payload = NULL;
	c->xsize = (uint64_t)st.st_size;
	c->xdone = 0;
	info.size = htole64(c->xsize);
	info.mode = htole32((uint32_t)st.st_mode);
	info.reserved = 0;
	c->state = AGENT_C_GET;
	return conn_frame(c, SMOLVM_READY, &info, sizeof(info));
}

/* Reads are bounded by the queue (EPOLLOUT brings us back). 0 (a file error becomes ERROR) or -ENOMEM. */
int files_get_fill(struct agent_conn *c)
{
	struct agent_chunk *ch;
	uint64_t left = c->xsize - c->xdone;
	ssize_t n;

	if (c->qbytes >= AGENT_XFER_CHUNK)
		return 0;
	if (left == 0) {
		files_drop(c);
		return conn_done(c);
	}
	ch = conn_chunk_xfer(SMOLVM_DATA);
	if (!ch)
		return -ENOMEM;
	do
		n = read(c->xfd, ch->data + AGENT_HDR, left < AGENT_XFER_CHUNK ? (size_t)left : AGENT_XFER_CHUNK);
	while (n < 0 && errno == EINTR);
	if (n <= 0) {
		int err = n < 0 ? errno : EIO;

		conn_chunk_free(ch);
		if (n == 0)
			return conn_fail(c, EIO, "GET %s: the file shrank to %llu bytes while it was read (%llu announced)",
					 c->path, (unsigned long long)c->xdone, (unsigned long long)c->xsize);
		return conn_fail(c, err, "GET %s: read: %s", c->path, strerror(err));
	}
	conn_chunk_header(ch, SMOLVM_DATA, (uint32_t)n);
	conn_enqueue(c, ch);
	c->xdone += (uint64_t)n;
	if (c->xdone == c->xsize) {
		files_drop(c);
		return conn_done(c);
	}
	return 0;
}
